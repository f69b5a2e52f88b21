//! SmolLM2's GGUF weights dequantized to f32 on both sides (candle reads
//! CANDLE_DEQUANTIZE_ALL when it builds a QMatMul, for the reference and for
//! us alike), so the two decoders can be compared exactly: within 1e-3.
//! Its own test binary, since the variable is process-wide.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use steerling::model::{load_model, Logits, ModelSource, Segment};

#[test]
fn smollm2_dequantized_matches_quantized_llama_within_1e_3() {
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = steerling::fetch::ensure_default_model().unwrap();
    let loaded = load_model(&ModelSource::Gguf(path.clone()), 512).unwrap();
    let prompt =
        "<|im_start|>user\nWrite a story about a nurse.<|im_end|>\n<|im_start|>assistant\n";
    let ids = loaded.tokenizer.encode(prompt, true).unwrap();
    let mut cache = loaded.model.new_cache();
    let mut segs = [Segment {
        embeds: loaded.model.embed_tokens(&ids).unwrap(),
        cache: &mut cache,
        lora: None,
        extra_head: None,
        logits: Logits::Last,
        branches: None,
    }];
    let ours: Vec<f32> = loaded.model.forward(&mut segs).unwrap()[0]
        .rows
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )
    .unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let theirs: Vec<f32> = reference
        .forward(&input, 0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = theirs
        .iter()
        .zip(&ours)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    assert!(diff < 1e-3, "relative max diff {diff}");
}
