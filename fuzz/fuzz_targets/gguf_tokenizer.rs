//! The tokenizer built from GGUF metadata (tokenizer.ggml.*), with
//! arbitrary vocabularies, merges, token types, special ids and wrongly
//! typed values; a tokenizer that builds must encode, decode and stream
//! without panicking, whatever the ids.
#![no_main]

use arbitrary::Arbitrary;
use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use steerling::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Arbitrary, Debug)]
enum Field<T> {
    Missing,
    Right(T),
    /// The right key with a value of the wrong type.
    Wrong(u32),
}

#[derive(Arbitrary, Debug)]
struct Input {
    model: Field<String>,
    pre: Field<String>,
    tokens: Field<Vec<String>>,
    merges: Field<Vec<String>>,
    token_types: Field<Vec<i32>>,
    bos: Field<u32>,
    eos: Field<u32>,
    add_bos: Field<bool>,
    chat_template: Field<String>,
    text: String,
    ids: Vec<u32>,
}

fn put<T>(
    meta: &mut HashMap<String, Value>,
    key: &str,
    field: Field<T>,
    f: impl FnOnce(T) -> Value,
) {
    match field {
        Field::Missing => {}
        Field::Right(v) => {
            meta.insert(key.into(), f(v));
        }
        Field::Wrong(v) => {
            meta.insert(key.into(), Value::U32(v));
        }
    }
}

fn strings(v: Vec<String>) -> Value {
    Value::Array(v.into_iter().map(Value::String).collect())
}

fuzz_target!(|input: Input| {
    let mut meta = HashMap::new();
    put(
        &mut meta,
        "tokenizer.ggml.model",
        input.model,
        Value::String,
    );
    put(&mut meta, "tokenizer.ggml.pre", input.pre, Value::String);
    put(&mut meta, "tokenizer.ggml.tokens", input.tokens, strings);
    put(&mut meta, "tokenizer.ggml.merges", input.merges, strings);
    put(
        &mut meta,
        "tokenizer.ggml.token_type",
        input.token_types,
        |v| Value::Array(v.into_iter().map(Value::I32).collect()),
    );
    put(
        &mut meta,
        "tokenizer.ggml.bos_token_id",
        input.bos,
        Value::U32,
    );
    put(
        &mut meta,
        "tokenizer.ggml.eos_token_id",
        input.eos,
        Value::U32,
    );
    put(
        &mut meta,
        "tokenizer.ggml.add_bos_token",
        input.add_bos,
        Value::Bool,
    );
    put(
        &mut meta,
        "tokenizer.chat_template",
        input.chat_template,
        Value::String,
    );
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata: meta,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    let Ok(tok) = Tokenizer::from_gguf(&content) else {
        return;
    };
    let _ = tok.encode(&input.text, true);
    let _ = tok.decode(&input.ids);
    let _ = tok.decode_with_special(&input.ids);
    let mut stream = StreamDecoder::new();
    for &id in &input.ids {
        let _ = tok.token_display(id);
        let _ = stream.push(&tok, id);
    }
    let _ = stream.flush(&tok);
});
