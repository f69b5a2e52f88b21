//! Tiny random-weight models, written as real GGUF files and Hugging Face
//! folders, for tests and benchmarks: a few MB, thousands of tokens/s, and
//! loaded through exactly the same code as real checkpoints.

use anyhow::Result;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// ChatML, as SmolLM2 and Qwen2 use it.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Text the tiny tokenizer's merges are learned from.
const CORPUS: &str = "The nurse said that she would help the patient. The engineer said that he \
would fix the machine. A teacher and a doctor went to the hospital with their children. \
She is a manager; he is a builder. They wrote a story about the farmer and his family. \
What is the capital of France? Paris is the capital of France. Hello world, hello there!";

#[derive(Debug, Clone)]
pub struct TinySpec {
    pub architecture: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub merges: usize,
    pub tie_embeddings: bool,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            architecture: "llama",
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            merges: 200,
            tie_embeddings: true,
            seed: 7,
        }
    }
}

pub use crate::tokenizer::byte_chars;

/// A byte-level BPE vocabulary: 256 byte tokens, `n_merges` merges learned
/// from a fixed corpus (deterministic), then the ChatML special tokens.
/// Returns (tokens, merges, special-token flags).
pub fn tiny_vocab(n_merges: usize) -> (Vec<String>, Vec<String>, Vec<bool>) {
    let table = byte_chars();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    // Words as the GPT-2 pre-tokenizer would see them: a leading space belongs to the word.
    let mut words: Vec<Vec<String>> = Vec::new();
    for (i, w) in CORPUS.split(' ').enumerate() {
        let text = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        words.push(
            text.bytes()
                .map(|b| table[b as usize].to_string())
                .collect(),
        );
    }
    let mut merges = Vec::new();
    for _ in 0..n_merges {
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for w in &words {
            for pair in w.windows(2) {
                *counts
                    .entry((pair[0].clone(), pair[1].clone()))
                    .or_default() += 1;
            }
        }
        let Some(((a, b), _)) = counts
            .into_iter()
            .max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(&x.0)))
        else {
            break;
        };
        let merged = format!("{a}{b}");
        for w in words.iter_mut() {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(merged.clone());
                    i += 2;
                } else {
                    out.push(w[i].clone());
                    i += 1;
                }
            }
            *w = out;
        }
        merges.push(format!("{a} {b}"));
        tokens.push(merged);
    }
    let mut special = vec![false; tokens.len()];
    for s in SPECIAL_TOKENS {
        tokens.push(s.to_string());
        special.push(true);
    }
    (tokens, merges, special)
}

struct TinyWeights {
    /// HF-named f32 tensors.
    tensors: Vec<(String, Tensor)>,
}

fn random_weights(spec: &TinySpec, vocab: usize) -> Result<TinyWeights> {
    let dev = Device::Cpu;
    let mut rng_seed = spec.seed;
    let mut rand = |shape: &[usize], scale: f32| -> Result<Tensor> {
        // A small xorshift keeps weights identical across runs and platforms.
        let n: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            rng_seed ^= rng_seed << 13;
            rng_seed ^= rng_seed >> 7;
            rng_seed ^= rng_seed << 17;
            v.push(((rng_seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale);
        }
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let (h, hd) = (spec.hidden, spec.hidden / spec.heads);
    let (q, kv, ff) = (spec.heads * hd, spec.kv_heads * hd, spec.intermediate);
    // Small enough that the tied head gives a spread-out distribution, as a
    // trained model's does, instead of always repeating the last token.
    // Bytes that are not printable ASCII (UTF-8 fragments, control codes)
    // get zero rows: the tied head then scores them 0 while real tokens
    // spread around it, so the model writes text rather than broken bytes.
    let printable: Vec<f32> = (0..vocab)
        .map(|i| {
            if i >= 256 || (32..127).contains(&i) || i == 10 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(printable, (vocab, 1), &dev)?;
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        rand(&[vocab, h], 0.15)?.broadcast_mul(&mask)?,
    )];
    let qwen = spec.architecture == "qwen2";
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        let s = 1.0 / (h as f32).sqrt();
        t.push((
            format!("{p}.input_layernorm.weight"),
            (rand(&[h], 0.2)? + 1.0)?,
        ));
        t.push((
            format!("{p}.self_attn.q_proj.weight"),
            rand(&[q, h], 2.0 * s)?,
        ));
        t.push((
            format!("{p}.self_attn.k_proj.weight"),
            rand(&[kv, h], 2.0 * s)?,
        ));
        t.push((format!("{p}.self_attn.v_proj.weight"), rand(&[kv, h], s)?));
        if qwen {
            t.push((format!("{p}.self_attn.q_proj.bias"), rand(&[q], 0.1)?));
            t.push((format!("{p}.self_attn.k_proj.bias"), rand(&[kv], 0.1)?));
            t.push((format!("{p}.self_attn.v_proj.bias"), rand(&[kv], 0.1)?));
        }
        t.push((format!("{p}.self_attn.o_proj.weight"), rand(&[h, q], s)?));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            (rand(&[h], 0.2)? + 1.0)?,
        ));
        t.push((format!("{p}.mlp.gate_proj.weight"), rand(&[ff, h], s)?));
        t.push((format!("{p}.mlp.up_proj.weight"), rand(&[ff, h], s)?));
        t.push((
            format!("{p}.mlp.down_proj.weight"),
            rand(&[h, ff], 1.0 / (ff as f32).sqrt())?,
        ));
    }
    t.push(("model.norm.weight".into(), (rand(&[h], 0.2)? + 1.0)?));
    if !spec.tie_embeddings {
        t.push(("lm_head.weight".into(), rand(&[vocab, h], 0.5)?));
    }
    Ok(TinyWeights { tensors: t })
}

/// The GGUF name of an HF tensor name.
fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens", "token_embd"),
        ("model.norm", "output_norm"),
        ("lm_head", "output"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let mut name = hf.replace("model.layers.", "blk.");
    for (from, to) in map {
        name = name.replace(from, to);
    }
    name
}

/// Writes a tiny model as GGUF: matrices in `dtype` (e.g. Q4_1, Q8_0, F32),
/// norms and biases f32, the tokenizer in `tokenizer.ggml.*`.
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec, dtype: GgmlDType) -> Result<()> {
    write_tiny_gguf_edited(path, spec, dtype, |_, t| Ok(t))
}

/// As [`write_tiny_gguf`], each weight (by its Hugging Face name) passed
/// through `edit` first: e.g. a LoRA update merged into it.
pub fn write_tiny_gguf_edited(
    path: &Path,
    spec: &TinySpec,
    dtype: GgmlDType,
    edit: impl Fn(&str, Tensor) -> Result<Tensor>,
) -> Result<()> {
    let (tokens, merges, special) = tiny_vocab(spec.merges);
    let mut weights = random_weights(spec, tokens.len())?;
    for (name, t) in weights.tensors.iter_mut() {
        *t = edit(name, t.clone())?;
    }
    let arch = spec.architecture;
    let u32v = |v: usize| Value::U32(v as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String("tiny".into())),
        (format!("{arch}.context_length"), u32v(512)),
        (format!("{arch}.embedding_length"), u32v(spec.hidden)),
        (
            format!("{arch}.feed_forward_length"),
            u32v(spec.intermediate),
        ),
        (format!("{arch}.block_count"), u32v(spec.layers)),
        (format!("{arch}.attention.head_count"), u32v(spec.heads)),
        (
            format!("{arch}.attention.head_count_kv"),
            u32v(spec.kv_heads),
        ),
        (
            format!("{arch}.rope.dimension_count"),
            u32v(spec.hidden / spec.heads),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|m| Value::String(m.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                special
                    .iter()
                    .map(|&s| Value::I32(if s { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u32v(tokens.len() - 2)),
        ("tokenizer.ggml.eos_token_id".into(), u32v(tokens.len() - 1)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML_TEMPLATE.into()),
        ),
    ];
    md.sort_by(|a, b| a.0.cmp(&b.0));
    let mut qtensors = Vec::new();
    for (name, t) in &weights.tensors {
        let is_matrix = t.rank() == 2;
        let q = if is_matrix && dtype != GgmlDType::F32 {
            QTensor::quantize(t, dtype)?
        } else {
            QTensor::quantize(t, GgmlDType::F32)?
        };
        qtensors.push((gguf_name(name), q));
    }
    let mut file = std::fs::File::create(path)?;
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &md_refs, &t_refs)?;
    Ok(())
}

/// Writes a tiny model as a Hugging Face folder (config.json,
/// model.safetensors in `dtype`, tokenizer.json, tokenizer_config.json).
pub fn write_tiny_hf(dir: &Path, spec: &TinySpec, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let (tokens, merges, special) = tiny_vocab(spec.merges);
    let vocab = tokens.len();
    let weights = random_weights(spec, vocab)?;
    let config = serde_json::json!({
        "architectures": [if spec.architecture == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": spec.architecture,
        "vocab_size": vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "max_window_layers": spec.layers,
        "sliding_window": 512,
        "use_sliding_window": false,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tie_embeddings,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let tensors: HashMap<String, Tensor> = weights
        .tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    // tokenizer.json in the Hugging Face format, as SmolLM2's own is laid out.
    let vocab_map: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| !special[*i])
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| special[*i])
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab_map, "merges": merges}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tokenizer)?,
    )?;
    let tok_config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": CHATML_TEMPLATE,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_config)?,
    )?;
    Ok(())
}

/// A hand-built steering adapter for tests: K values named `v0`, `v1`, …
/// (detected by the words `alpha0`, `alpha1`, …), random steering rows
/// scaled by `head_scale` (0 gives a uniform prior), optional LoRA on q/v, the given default and per-context targets.
pub struct TestAdapter {
    pub values: usize,
    pub head_scale: f32,
    pub lora: bool,
    /// LoRA rank (on q_proj and v_proj).
    pub lora_rank: usize,
    pub default_target: Vec<f64>,
    pub contexts: Vec<(String, Vec<f64>)>,
    pub seed: u64,
}

impl Default for TestAdapter {
    fn default() -> Self {
        Self {
            values: 2,
            head_scale: 1.0,
            lora: true,
            lora_rank: 2,
            default_target: vec![0.5, 0.5],
            contexts: vec![],
            seed: 3,
        }
    }
}

/// Writes `dir/<name>/adapter.json` and `adapter.safetensors` for a model.
pub fn write_test_adapter(
    dir: &Path,
    name: &str,
    model: &crate::model::ModelConfig,
    base_sha256: &str,
    spec: &TestAdapter,
) -> Result<()> {
    use crate::steering::adapter::*;
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder)?;
    let names: Vec<String> = (0..spec.values).map(|i| format!("v{i}")).collect();
    let dist =
        |p: &[f64]| -> Distribution { names.iter().cloned().zip(p.iter().copied()).collect() };
    let config = AdapterConfig {
        format_version: FORMAT_VERSION,
        base_model: BaseModel {
            name: "tiny".into(),
            sha256: base_sha256.into(),
        },
        prompt_format: PromptFormat::default(),
        attribute: Attribute {
            name: "letter".into(),
            values: names
                .iter()
                .enumerate()
                .map(|(i, n)| AttributeValue {
                    name: n.clone(),
                    token: format!("<steer:{n}>"),
                    patterns: vec![format!("alpha{i}")],
                })
                .collect(),
        },
        detection: Detection::default(),
        targets: Targets {
            default: dist(&spec.default_target),
            contexts: spec
                .contexts
                .iter()
                .map(|(c, p)| (c.clone(), dist(p)))
                .collect(),
        },
        lora: spec.lora.then(|| LoraConfig {
            rank: spec.lora_rank,
            alpha: 2.0 * spec.lora_rank as f64,
            targets: vec!["q_proj".into(), "v_proj".into()],
            dropout: 0.0,
        }),
        prior_calibration: None,
        training: serde_json::json!({"made_by": "steerling::testing"}),
    };
    std::fs::write(
        folder.join(CONFIG_FILE),
        serde_json::to_string_pretty(&config)?,
    )?;
    let dev = Device::Cpu;
    let mut seed = spec.seed.max(1);
    let mut rand = |shape: &[usize], scale: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let h = model.hidden_size;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("steering.embed".into(), rand(&[spec.values, h], 0.15)?);
    tensors.insert(
        "steering.head".into(),
        rand(&[spec.values, h], spec.head_scale)?,
    );
    if spec.lora {
        for l in 0..model.num_layers {
            for kind in [crate::model::ProjKind::Q, crate::model::ProjKind::V] {
                let (out, inp) = model.proj_shape(kind);
                tensors.insert(
                    lora_tensor_name(l, kind, "a"),
                    rand(&[spec.lora_rank, inp], 0.1)?,
                );
                tensors.insert(
                    lora_tensor_name(l, kind, "b"),
                    rand(&[out, spec.lora_rank], 0.1)?,
                );
            }
        }
    }
    candle_core::safetensors::save(&tensors, folder.join(WEIGHTS_FILE))?;
    Ok(())
}
