//! Tokenizers built from GGUF metadata: round trips, special tokens,
//! streaming without broken characters, and agreement with tokenizer.json.

mod common;

use candle_core::quantized::gguf_file;
use steerling::tokenizer::{StreamDecoder, Tokenizer};

fn from_gguf(path: &std::path::Path) -> Tokenizer {
    let mut f = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    Tokenizer::from_gguf(&content).unwrap()
}

const TEXTS: [&str; 7] = [
    "Hello world",
    "  leading and trailing spaces  ",
    "Numbers 12345 and 3.14159",
    "héllo naïve café — ‘quotes’",
    "emoji 🌍🚀 and CJK 日本語テキスト",
    "tabs\tand\nnew\r\nlines",
    "code: fn main() { println!(\"{}\", x); }",
];

#[test]
fn smollm2_round_trips_and_keeps_special_tokens_whole() {
    let tok = from_gguf(&common::smollm2());
    for text in TEXTS {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(ids.iter().filter(|&&i| i == 1 || i == 2).count(), 2);
    // SmolLM2 splits digits one by one.
    assert_eq!(tok.encode("12345", true).unwrap().len(), 5);
    assert_eq!(tok.eos, vec![2]);
    assert!(tok
        .chat_template
        .as_deref()
        .unwrap_or("")
        .contains("<|im_start|>"));
    // Special tokens are left out of decoded text.
    assert_eq!(tok.decode(&ids).unwrap(), "user\nHi");
}

#[test]
fn streaming_never_splits_a_character() {
    let tok = from_gguf(&common::smollm2());
    for text in TEXTS {
        let ids = tok.encode(text, true).unwrap();
        let mut dec = StreamDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            let piece = dec.push(&tok, id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "broken character in {piece:?} of {text:?}"
            );
            out += &piece;
        }
        out += &dec.flush(&tok).unwrap();
        assert_eq!(out, text);
    }
}

#[test]
fn gguf_tokenizer_matches_tokenizer_json_of_the_same_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let spec = steerling::testing::TinySpec::default();
    steerling::testing::write_tiny_hf(dir.path(), &spec, candle_core::DType::F32).unwrap();
    let from_json = Tokenizer::from_hf_folder(dir.path()).unwrap();
    let from_meta = from_gguf(&common::tiny_gguf());
    for text in TEXTS
        .iter()
        .chain(&["<|im_start|>user\nThe nurse said<|im_end|>\n"])
    {
        let a = from_json.encode(text, true).unwrap();
        let b = from_meta.encode(text, true).unwrap();
        assert_eq!(a, b, "{text:?}");
        assert_eq!(from_meta.decode(&b).unwrap(), from_json.decode(&a).unwrap());
    }
    // Learned merges are used: common words take fewer tokens than bytes.
    assert!(from_meta.encode(" the nurse", true).unwrap().len() < 6);
}

/// A SentencePiece-style ("llama") vocabulary: merges come from the scores,
/// spaces become ▁, unknown characters fall back to bytes.
#[test]
fn sentencepiece_vocabulary_from_gguf_metadata() {
    use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
    let mut tokens: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    for b in 0..=255u8 {
        tokens.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    for (piece, score) in [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("el", -3.0),
        ("▁h", -3.5),
        ("▁hel", -4.0),
        ("lo", -4.5),
        ("▁hello", -5.0),
        ("▁w", -5.5),
        ("or", -6.0),
        ("ld", -6.5),
        ("▁wor", -7.0),
        ("▁world", -7.5),
    ] {
        tokens.push((piece.into(), score, 1));
    }
    let id = |p: &str| tokens.iter().position(|t| t.0 == p).unwrap() as u32;
    let mut metadata = std::collections::HashMap::new();
    metadata.insert(
        "tokenizer.ggml.model".to_string(),
        Value::String("llama".into()),
    );
    metadata.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.iter().map(|t| Value::String(t.0.clone())).collect()),
    );
    metadata.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(tokens.iter().map(|t| Value::F32(t.1)).collect()),
    );
    metadata.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(tokens.iter().map(|t| Value::I32(t.2)).collect()),
    );
    metadata.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
    metadata.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos: Default::default(),
        tensor_data_offset: 0,
    };
    let tok = Tokenizer::from_gguf(&content).unwrap();
    let ids = tok.encode("hello world", true).unwrap();
    assert_eq!(
        ids,
        vec![1, id("▁hello"), id("▁world")],
        "BOS added, words merged"
    );
    assert_eq!(tok.decode(&ids).unwrap(), "hello world");
    let ids = tok.encode("hü", false).unwrap();
    assert_eq!(
        ids,
        vec![id("▁h"), id("<0xC3>"), id("<0xBC>")],
        "ü falls back to its UTF-8 bytes"
    );
    assert_eq!(tok.decode(&ids).unwrap(), "hü");
}
