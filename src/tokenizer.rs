//! Text ↔ token ids: from `tokenizer.json` when the model folder has one,
//! otherwise built from GGUF metadata (`tokenizer.ggml.*`), the way llama.cpp
//! reads it. Also incremental decoding for streaming.

use ahash::AHashMap;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// How vocabulary strings map to bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pieces {
    /// GPT-2 byte-level: every byte is one printable character.
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` a raw byte.
    SentencePiece,
    Other,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pieces: Pieces,
    /// Prepended when encoding a prompt with special tokens.
    pub bos: Option<u32>,
    /// Any of these ends generation.
    pub eos: Vec<u32>,
    /// The model's Jinja chat template, when it ships one.
    pub chat_template: Option<String>,
    add_bos: bool,
}

impl Tokenizer {
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("cannot read tokenizer.json: {e}"))?;
        let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let token_of = |key: &str| -> Option<u32> {
            let v = config.get(key)?;
            let s = v.as_str().or_else(|| v.get("content")?.as_str())?;
            inner.token_to_id(s)
        };
        let mut eos: Vec<u32> = token_of("eos_token").into_iter().collect();
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
            let gen: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            match gen.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => eos.extend(n.as_u64().map(|x| x as u32)),
                Some(serde_json::Value::Array(a)) => {
                    eos.extend(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)))
                }
                _ => {}
            }
        }
        eos.sort_unstable();
        eos.dedup();
        let chat_template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let pieces = match inner.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => Pieces::ByteLevel,
            _ if matches!(inner.get_model(), tokenizers::ModelWrapper::BPE(b) if b.byte_fallback) => {
                Pieces::SentencePiece
            }
            _ => Pieces::Other,
        };
        Ok(Self {
            pieces,
            bos: token_of("bos_token"),
            eos,
            chat_template,
            // tokenizer.json's own post-processor adds BOS where the model wants it.
            add_bos: false,
            inner,
        })
    }

    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = |k: &str| content.metadata.get(k);
        let model = md("tokenizer.ggml.model")
            .context("GGUF has no tokenizer (tokenizer.ggml.model)")?
            .to_string()?
            .clone();
        let tokens = string_array(
            md("tokenizer.ggml.tokens").context("GGUF has no tokenizer.ggml.tokens")?,
        )?;
        let types: Vec<i32> = match md("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| t.to_i32())
                .collect::<Result<_, _>>()?,
            None => vec![1; tokens.len()],
        };
        let id = |k: &str| md(k).and_then(|v| v.to_u32().ok());
        let pre = md("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let mut inner = match model.as_str() {
            "gpt2" => {
                let merges = string_array(
                    md("tokenizer.ggml.merges")
                        .context("BPE tokenizer has no tokenizer.ggml.merges")?,
                )?;
                bpe_tokenizer(&tokens, &merges, pre.as_deref())?
            }
            "llama" => {
                let scores: Vec<f32> = match md("tokenizer.ggml.scores") {
                    Some(v) => v
                        .to_vec()?
                        .iter()
                        .map(|s| s.to_f32())
                        .collect::<Result<_, _>>()?,
                    None => vec![0.0; tokens.len()],
                };
                sentencepiece_tokenizer(&tokens, &scores, &types)?
            }
            other => bail!("unsupported tokenizer model `{other}` (supported: gpt2, llama)"),
        };
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == TOKEN_TYPE_CONTROL))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| anyhow::anyhow!("cannot add special tokens: {e}"))?;
        let mut eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| id(k))
            .collect();
        eos.dedup();
        let add_bos = md("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(model == "llama");
        Ok(Self {
            inner,
            pieces: if model == "gpt2" {
                Pieces::ByteLevel
            } else {
                Pieces::SentencePiece
            },
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            chat_template: md("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
            add_bos,
        })
    }

    /// Encodes text; special-token strings in it become their single ids.
    /// `add_bos` prepends BOS where the model expects it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_bos)
            .map_err(|e| anyhow::anyhow!("cannot tokenize: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if add_bos && self.add_bos {
            if let Some(bos) = self.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text, leaving special tokens out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("cannot decode: {e}"))
    }

    /// Decodes keeping special tokens (for echo and token strings).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("cannot decode: {e}"))
    }

    /// The raw bytes a token stands for (a byte-level token may be part of a
    /// UTF-8 character, which text decoding would turn into U+FFFD).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        match self.pieces {
            Pieces::ByteLevel => {
                let table = byte_decoder();
                let mut out = Vec::with_capacity(piece.len());
                for c in piece.chars() {
                    match table.get(&c) {
                        Some(&b) => out.push(b),
                        None => out.extend(c.to_string().as_bytes()),
                    }
                }
                out
            }
            Pieces::SentencePiece => {
                match piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                    Some(hex) if hex.len() == 2 => u8::from_str_radix(hex, 16)
                        .map(|b| vec![b])
                        .unwrap_or_default(),
                    _ => piece.replace('▁', " ").into_bytes(),
                }
            }
            Pieces::Other => self
                .decode_with_special(&[id])
                .unwrap_or_default()
                .into_bytes(),
        }
    }

    /// A token as text for log-probability listings: its text when its bytes
    /// are valid UTF-8, else `bytes:\xNN…` as OpenAI writes partial characters.
    pub fn token_display(&self, id: u32) -> String {
        let bytes = self.token_bytes(id);
        match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let mut out = String::from("bytes:");
                for b in e.as_bytes() {
                    out += &format!("\\x{b:02x}");
                }
                out
            }
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

fn string_array(v: &Value) -> Result<Vec<String>> {
    v.to_vec()?
        .iter()
        .map(|s| Ok(s.to_string()?.clone()))
        .collect()
}

/// GPT-2 style byte-level BPE, with the pre-tokenizer llama.cpp names in `pre`.
fn bpe_tokenizer(
    tokens: &[String],
    merges: &[String],
    pre: Option<&str>,
) -> Result<tokenizers::Tokenizer> {
    let vocab: AHashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("malformed merge `{m}`"))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build BPE: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let byte_level =
        |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow::anyhow!("bad pre-tokenizer regex: {e}"))?;
        Ok(PreTokenizerWrapper::Split(split))
    };
    let pre_tokenizer = match pre.unwrap_or("default") {
        "smollm" => PreSequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ]),
        "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => {
            PreSequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false)])
        }
        "qwen2" => PreSequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false)]),
        _ => PreSequence::new(vec![byte_level(true)]),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
        false, true, true,
    ))));
    Ok(tok)
}

/// SentencePiece (llama 1/2, Mistral v0.1) as BPE: merges come from the
/// vocabulary scores (a piece is a merge of two pieces, ranked by its score),
/// as Hugging Face's own converter does; unknown bytes fall back to <0xXX>.
fn sentencepiece_tokenizer(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
) -> Result<tokenizers::Tokenizer> {
    let vocab: AHashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut merges: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(1) != 1 {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push((
                    scores.get(id).copied().unwrap_or(0.0),
                    id as u32,
                    left.into(),
                    right.into(),
                ));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges = merges.into_iter().map(|(_, _, a, b)| (a, b)).collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if tokens.iter().any(|t| t == "<unk>") {
        builder = builder.unk_token("<unk>".into());
    }
    let bpe = builder
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build BPE: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let normalizer = tokenizers::normalizers::Sequence::new(vec![
        NormalizerWrapper::Prepend(Prepend::new("▁".into())),
        NormalizerWrapper::Replace(Replace::new(" ", "▁").map_err(|e| anyhow::anyhow!("{e}"))?),
    ]);
    tok.with_normalizer(Some(normalizer))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tok.with_decoder(Some(DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(|e| anyhow::anyhow!("{e}"))?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
        DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
    ])));
    Ok(tok)
}

/// GPT-2's byte → printable character table.
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).expect("valid code point");
    }
    table
}

fn byte_decoder() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        byte_chars()
            .into_iter()
            .enumerate()
            .map(|(b, c)| (c, b as u8))
            .collect()
    })
}

/// Turns a stream of token ids into text pieces without ever splitting a
/// multi-byte character: text is released only once it decodes cleanly.
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (an incomplete character at the end of the stream).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(
            if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
                full[prefix.len()..].to_string()
            } else {
                String::new()
            },
        )
    }
}
