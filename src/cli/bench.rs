//! `steerling bench`: prefill and decode throughput at batch 1, 4, 16, and
//! candle-transformers' own quantized_llama loop on the same GGUF as the
//! baseline, measured in the same run.

use super::ModelArgs;
use crate::engine::{Engine, EngineConfig, Event, GenerateRequest, SamplingParams};
use crate::model::ModelSource;
use anyhow::{bail, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use clap::Args;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokens generated per sequence in decode runs.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Prompt length for the prefill run.
    #[arg(long, default_value_t = 256)]
    pub prefill_tokens: usize,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub batch: Vec<usize>,
    /// Skip the candle-transformers baseline.
    #[arg(long)]
    pub no_baseline: bool,
}

const TEXT: &str = "The history of the city begins with a small settlement on the river, where traders met to exchange grain, cloth and tools. ";

pub fn run(args: BenchArgs) -> Result<()> {
    let path = args.model.resolve()?;
    let loaded = args.model.load()?;
    let text = TEXT.repeat(args.prefill_tokens / 16 + 1);
    let mut prompt = loaded.tokenizer.encode(&text, true)?;
    prompt.truncate(args.prefill_tokens);
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    let engine = Engine::start(
        loaded,
        EngineConfig {
            max_batch,
            max_context: args.model.max_context,
            prefill_chunk: 512,
        },
    );
    // Warm-up: first calls allocate scratch buffers and fault in weights.
    run_batch(&engine, &prompt[..16], 1, 4)?;
    let (prefill, _) = run_batch(&engine, &prompt, 1, 1)?;
    println!(
        "prefill: {} tokens in {:.3}s = {:.1} tokens/s",
        prompt.len(),
        prefill.as_secs_f64(),
        prompt.len() as f64 / prefill.as_secs_f64()
    );
    let short = &prompt[..16];
    let mut single = None;
    for &b in &args.batch {
        let (_, decode) = run_batch(&engine, short, b, args.decode_tokens)?;
        let tps = (b * (args.decode_tokens - 1)) as f64 / decode.as_secs_f64();
        let ratio = single
            .map(|s: f64| format!(" ({:.2}x batch 1)", tps / s))
            .unwrap_or_default();
        println!("decode batch {b:>2}: {tps:.1} tokens/s{ratio}");
        if b == 1 {
            single = Some(tps);
        }
    }
    if !args.no_baseline {
        if let ModelSource::Gguf(path) = ModelSource::from_path(&path)? {
            let base = reference_decode(&path, short, args.decode_tokens)?;
            println!("candle-transformers quantized_llama, single stream: {base:.1} tokens/s");
            if let Some(s) = single {
                println!(
                    "steerling / candle-transformers single-stream decode: {:.2}x",
                    s / base
                );
            }
        }
    }
    Ok(())
}

/// Runs `batch` greedy sequences to `tokens` tokens each. Returns the time to
/// the last first token (prefill) and the time from then to the end (decode).
fn run_batch(
    engine: &Engine,
    prompt: &[u32],
    batch: usize,
    tokens: usize,
) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..batch {
        let mut r = GenerateRequest::new(prompt.to_vec(), tokens, SamplingParams::greedy());
        r.ignore_eos = true;
        streams.push(engine.submit(r)?);
    }
    let mut first = start;
    for s in streams.iter_mut() {
        match s.blocking_recv() {
            Some(Event::Token { .. }) => first = Instant::now(),
            Some(Event::Done { .. }) => first = Instant::now(),
            other => bail!("unexpected event {other:?}"),
        }
    }
    for s in streams.iter_mut() {
        while let Some(e) = s.blocking_recv() {
            if let Event::Error(e) = e {
                bail!(e);
            }
        }
    }
    Ok((first - start, first.elapsed()))
}

/// candle-transformers' own generation loop: prefill, then one token at a time.
fn reference_decode(path: &std::path::Path, prompt: &[u32], tokens: usize) -> Result<f64> {
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut model = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )?;
    let input = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let logits = model.forward(&input, 0)?;
    let mut next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
    let start = Instant::now();
    for i in 0..tokens - 1 {
        let input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&input, prompt.len() + i)?;
        next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
    }
    Ok((tokens - 1) as f64 / start.elapsed().as_secs_f64())
}
