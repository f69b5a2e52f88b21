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
    /// Decode runs per batch size. Rounds go through the batch sizes in
    /// turn, so every size sees the same machine conditions; each size's
    /// median is reported.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Skip the candle-transformers baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Also measure the cost of steering: end-to-end latency of the same
    /// requests with a steering adapter (policy prior) and without (off).
    /// Uses ADAPTER from --adapters, or a generated rank-8 q/v adapter.
    #[arg(long, value_name = "ADAPTER", num_args = 0..=1, default_missing_value = "")]
    pub steering: Option<String>,
    /// Folder of adapters for --steering.
    #[arg(long, default_value = "adapters")]
    pub adapters: std::path::PathBuf,
    /// Request pairs (steered, then off, or the other way round) per
    /// --steering run.
    #[arg(long, default_value_t = 96, value_parser = clap::value_parser!(u32).range(1..))]
    pub steering_pairs: u32,
    /// Also measure seconds per training step (SFT, then KL + KTO) on this
    /// training data (default: the shipped adapter's data).
    #[arg(long, value_name = "DATA", num_args = 0..=1,
          default_missing_value = "adapters/occupation-gender/data.json")]
    pub training: Option<std::path::PathBuf>,
    /// Training steps timed per stage (after one untimed warm-up step).
    #[arg(long, default_value_t = 4)]
    pub training_steps: usize,
    /// Training batch size.
    #[arg(long, default_value_t = 8)]
    pub training_batch: usize,
}

/// What a user asks a steering adapter in `--steering` runs.
const USER_PROMPT: &str = "Write a short story about a nurse on a night shift.";

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
    let single = decode_rounds(&engine, short, &args)?;
    if let Some(name) = &args.steering {
        steering_cost(
            &engine,
            &path,
            name,
            &args.adapters,
            short,
            args.decode_tokens,
            args.steering_pairs as usize,
        )?;
    }
    if let Some(data) = &args.training {
        training_steps(&args, data)?;
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

/// Decode tokens/s at each batch size, `args.rounds` runs each, interleaved.
/// Prints each size's median, and against batch 1 the ratio of medians and
/// the range of the per-round ratios. Returns batch 1's median.
fn decode_rounds(engine: &Engine, prompt: &[u32], args: &BenchArgs) -> Result<Option<f64>> {
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); args.batch.len()];
    for _ in 0..args.rounds.max(1) {
        for (&b, runs) in args.batch.iter().zip(&mut runs) {
            let (_, decode) = run_batch(engine, prompt, b, args.decode_tokens)?;
            runs.push((b * (args.decode_tokens - 1)) as f64 / decode.as_secs_f64());
        }
    }
    let single = args.batch.iter().position(|&b| b == 1).map(|i| &runs[i]);
    for (&b, runs) in args.batch.iter().zip(&runs) {
        let tps = median(runs);
        let ratio = match single {
            Some(single) if b != 1 => {
                let per_round: Vec<f64> = runs.iter().zip(single).map(|(r, s)| r / s).collect();
                let lo = per_round.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = per_round.iter().cloned().fold(0.0, f64::max);
                format!(
                    " ({:.2}x batch 1; per round {lo:.2}-{hi:.2}x)",
                    tps / median(single)
                )
            }
            _ => String::new(),
        };
        println!(
            "decode batch {b:>2}: {tps:.1} tokens/s, median of {}{ratio}",
            runs.len()
        );
    }
    Ok(single.map(|s| median(s)))
}

/// A 95% interval for the ratio of mean latencies, steered over off, from
/// (steered, off) pairs: percentiles of the ratio over resamplings of the
/// pairs (a bootstrap, seeded). It tells how far one run's figure may be
/// from what the same conditions would give in a longer run; it does not
/// cover drifts of a shared machine between runs.
fn ratio_interval(pairs: &[(f64, f64)]) -> (f64, f64) {
    use rand::{Rng, SeedableRng};
    const RESAMPLES: usize = 2000;
    if pairs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(2604);
    let mut ratios: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let (mut steered, mut off) = (0.0, 0.0);
            for _ in 0..pairs.len() {
                let (s, o) = pairs[rng.random_range(0..pairs.len())];
                (steered, off) = (steered + s, off + o);
            }
            steered / off
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    (
        ratios[RESAMPLES * 25 / 1000],
        ratios[RESAMPLES * 975 / 1000],
    )
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
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

/// End-to-end latency of identical requests, steered (prior) and not (off),
/// interleaved so that both see the same machine conditions.
fn steering_cost(
    engine: &Engine,
    model_path: &std::path::Path,
    name: &str,
    dir: &std::path::Path,
    prompt: &[u32],
    tokens: usize,
    pairs: usize,
) -> Result<()> {
    use crate::steering::{BaseIdentity, Registry};
    let generated = tempfile_dir()?;
    let mut adapters = Vec::new();
    if name.is_empty() {
        // The default adapter's shape: rank-8 LoRA on q/v; and none, to
        // separate the draw and its hidden token from the LoRA's cost.
        for (label, lora) in [("rank-8 q/v LoRA", true), ("no LoRA", false)] {
            let folder = if lora { "lora" } else { "plain" };
            let spec = crate::testing::TestAdapter {
                head_scale: 0.05,
                lora,
                lora_rank: 8,
                seed: 1,
                ..Default::default()
            };
            crate::testing::write_test_adapter(
                &generated,
                folder,
                engine.model_config(),
                engine.model_sha256(),
                &spec,
            )?;
            adapters.push((generated.clone(), folder.to_string(), label));
        }
    } else {
        adapters.push((dir.to_path_buf(), name.to_string(), "adapter"));
    }
    let base = BaseIdentity {
        name: model_path.display().to_string(),
        sha256: engine.model_sha256().to_string(),
    };
    for (dir, name, label) in adapters {
        let registry = Registry::new(dir, base.clone(), engine.model_config().clone());
        let adapter = registry.load(&name)?;
        // The prompt a request to this adapter sends: a user's words inside
        // the adapter's prompt format (both arms get the same tokens). An
        // adapter without a format gets the plain short prompt.
        let format = &adapter.config.prompt_format;
        let formatted;
        let prompt = if format.prefix.is_empty() && format.suffix.is_empty() {
            prompt
        } else {
            let text = format!("{}{USER_PROMPT}{}", format.prefix, format.suffix);
            formatted = engine.tokenizer().encode(&text, false)?;
            &formatted[..]
        };
        // Per pair, (steered, off) seconds. Each pair runs back to back, so
        // slow drifts of a shared machine cancel in its ratio; the median
        // ignores the pairs a burst hit.
        let mut latencies = Vec::with_capacity(pairs);
        // Per pair, steered minus off: time to the first token, and the
        // mean time of each later token.
        let (mut first_gaps, mut token_gaps) = (Vec::new(), Vec::new());
        for i in 0..pairs {
            let mut pair = [Duration::ZERO; 2];
            let mut firsts = [Duration::ZERO; 2];
            for steer in [i % 2 == 0, i % 2 != 0] {
                let mut r = GenerateRequest::new(prompt.to_vec(), tokens, SamplingParams::greedy());
                r.ignore_eos = true;
                if steer {
                    let draw = Box::new(|prior: &[f64]| crate::engine::sampling::argmax_f64(prior));
                    r.steering = Some(crate::engine::Steering {
                        adapter: adapter.clone(),
                        draw,
                    });
                }
                let (first, took) = timed_request(engine, r)?;
                pair[usize::from(steer)] = took;
                firsts[usize::from(steer)] = first;
            }
            latencies.push((pair[1].as_secs_f64(), pair[0].as_secs_f64()));
            let later = |i: usize| (pair[i] - firsts[i]).as_secs_f64() / (tokens - 1).max(1) as f64;
            first_gaps.push((firsts[1].as_secs_f64() - firsts[0].as_secs_f64()) * 1e3);
            token_gaps.push((later(1) / later(0) - 1.0) * 100.0);
        }
        let (steered, plain) = latencies
            .iter()
            .fold((0.0, 0.0), |(a, b), (s, o)| (a + s, b + o));
        let mut ratios: Vec<f64> = latencies.iter().map(|(s, o)| s / o).collect();
        ratios.sort_by(f64::total_cmp);
        let (low, high) = ratio_interval(&latencies);
        println!(
            "steering (prior, {label}) vs off, end-to-end latency over {pairs} request pairs of {} prompt + {tokens} generated tokens: {:.1} ms vs {:.1} ms = {:.3}x (95% interval {low:.3}x to {high:.3}x; pair ratios: median {:.3}x, quartiles {:.3}x to {:.3}x)",
            prompt.len(),
            steered * 1e3 / pairs as f64,
            plain * 1e3 / pairs as f64,
            steered / plain,
            ratios[pairs / 2],
            ratios[pairs / 4],
            ratios[3 * pairs / 4],
        );
        println!(
            "  of which: first token {:+.2} ms, each later token {:+.2}% (medians over the pairs)",
            median(&first_gaps),
            median(&token_gaps),
        );
    }
    let _ = std::fs::remove_dir_all(&generated);
    Ok(())
}

/// Runs one request to its end: the time to its first token (or to its
/// end, if it has none) and to its end.
fn timed_request(engine: &Engine, request: GenerateRequest) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut events = engine.submit(request)?;
    let mut first = None;
    while let Some(e) = events.blocking_recv() {
        match e {
            Event::Error(e) => bail!(e),
            Event::Token { .. } => {
                first.get_or_insert_with(|| start.elapsed());
            }
            _ => {}
        }
    }
    let took = start.elapsed();
    Ok((first.unwrap_or(took), took))
}

/// Times training steps of each stage on the model (dequantized to f32, as
/// training does), after one warm-up step per stage.
fn training_steps(args: &BenchArgs, data: &std::path::Path) -> Result<()> {
    use crate::training::data::TrainingData;
    use crate::training::trainer::{train, TrainConfig};
    let text = std::fs::read_to_string(data)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", data.display()))?;
    let mut data: TrainingData = serde_json::from_str(&text)?;
    // One held-out prompt keeps the before/after measurement short.
    data.held_out.truncate(1);
    let loaded = args.model.load()?;
    let steps = args.training_steps + 1;
    let cfg = TrainConfig {
        sft_steps: steps,
        kl_steps: steps,
        batch: args.training_batch,
        consistency_tokens: 0,
        ..TrainConfig::default()
    };
    let base = crate::steering::adapter::BaseModel {
        name: loaded.name.clone(),
        sha256: loaded.sha256.clone(),
    };
    // One mark per finished step; a step's time is the gap to the previous
    // mark of the same stage, so each stage's first step is the warm-up.
    let mut marks: Vec<(String, Instant)> = Vec::new();
    train(&loaded.model, &loaded.tokenizer, data, &cfg, base, |p| {
        marks.push((p.stage.clone(), Instant::now()));
        true
    })?;
    for stage in ["sft", "kl_kto"] {
        let secs: Vec<f64> = marks
            .windows(2)
            .filter(|w| w[0].0 == stage && w[1].0 == stage)
            .map(|w| w[1].1.duration_since(w[0].1).as_secs_f64())
            .collect();
        println!(
            "training {stage}, batch {}: {:.2} s per step (mean of {})",
            args.training_batch,
            secs.iter().sum::<f64>() / secs.len().max(1) as f64,
            secs.len()
        );
    }
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("steerling-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
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

#[cfg(test)]
mod tests {
    use super::ratio_interval;

    #[test]
    fn the_ratio_interval_is_as_wide_as_the_pairs_disagree() {
        // Every pair 10% slower steered: no doubt about the ratio.
        let same: Vec<(f64, f64)> = (1..=40).map(|i| (1.1 * i as f64, i as f64)).collect();
        let (low, high) = ratio_interval(&same);
        assert!(
            (low - 1.1).abs() < 1e-12 && (high - 1.1).abs() < 1e-12,
            "{low} {high}"
        );
        // Pairs at 1.0 and 1.2 in turn: the mean ratio is 1.1; the
        // interval lies around it, inside the pairs' range, and narrows
        // with four times the pairs (about by half).
        let mixed = |n: usize| -> Vec<(f64, f64)> {
            (0..n)
                .map(|i| (if i % 2 == 0 { 1.0 } else { 1.2 }, 1.0))
                .collect()
        };
        let (low, high) = ratio_interval(&mixed(40));
        assert!(
            1.0 < low && low < 1.1 && 1.1 < high && high < 1.2,
            "{low} {high}"
        );
        let (low4, high4) = ratio_interval(&mixed(160));
        let (wide, narrow) = (high - low, high4 - low4);
        assert!(
            narrow > 0.35 * wide && narrow < 0.65 * wide,
            "{wide} {narrow}"
        );
    }
}
