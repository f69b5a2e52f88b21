fn main() {
    let path = std::env::args().nth(1).unwrap();
    let mut f = std::fs::File::open(path).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut keys: Vec<_> = c.metadata.iter().collect();
    keys.sort_by_key(|k| k.0.clone());
    for (k, v) in keys {
        let s = format!("{v:?}");
        println!("{k} = {}", &s[..s.len().min(200)]);
    }
    let mut t: Vec<_> = c.tensor_infos.iter().collect();
    t.sort_by_key(|k| k.0.clone());
    for (k, v) in t.iter().take(14) { println!("{k} {:?} {:?}", v.ggml_dtype, v.shape); }
}
