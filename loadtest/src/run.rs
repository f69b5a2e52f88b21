//! `run`: load at a fixed concurrency or a Poisson arrival rate.

use crate::client::{Outcome, Target};
use crate::stats::Summary;
use anyhow::{ensure, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone, Serialize)]
pub struct RunArgs {
    /// The server, e.g. http://127.0.0.1:8080 (loopback only).
    #[arg(long)]
    pub url: String,
    /// `model` sent with each request (default: none).
    #[arg(long)]
    pub model: Option<String>,
    /// Requests in flight at once (with --rate: the most in flight).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Poisson arrivals at this many requests per second instead of a
    /// closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests to send (after the warm-up).
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Stop sending after this many seconds; requests in flight then get
    /// 60 s more before they count as failed.
    #[arg(long, default_value_t = 300.0)]
    pub duration: f64,
    /// Untimed requests sent first, one at a time.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Prompt length, in words of a fixed list (about one token each).
    /// Each request gets its own random words, so no server can answer from
    /// a prompt cache.
    #[arg(long, default_value_t = 64)]
    pub prompt_words: usize,
    /// Wrap every prompt in this adapter's prompt format (its adapter.json),
    /// as the server does for requests to the adapter.
    #[arg(long)]
    pub prompt_format_of: Option<PathBuf>,
    /// Tokens to generate per request (ignore_eos is set, as in vLLM's bench).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// JSON object merged into every request body, e.g.
    /// '{"steering":{"policy":"off"}}'.
    #[arg(long)]
    pub extra: Option<String>,
    /// SLO for goodput: time to first token, ms.
    #[arg(long, default_value_t = 2000.0)]
    pub slo_ttft_ms: f64,
    /// SLO for goodput: time per output token, ms.
    #[arg(long, default_value_t = 200.0)]
    pub slo_tpot_ms: f64,
    /// One connection per request.
    #[arg(long)]
    pub no_keep_alive: bool,
    /// After a refusal with Retry-After, a client waits that long before its
    /// next request, as OpenAI's clients do (default: it sends at once).
    #[arg(long)]
    pub honor_retry_after: bool,
    /// The server's process id, to report its peak RSS.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// A name for this run in the reports.
    #[arg(long, default_value = "run")]
    pub label: String,
    /// Folder for <label>.json and <label>.md.
    #[arg(long, default_value = "target/loadtest")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub label: String,
    pub settings: RunArgs,
    pub completed: usize,
    pub failed: usize,
    /// Failures by HTTP status (`transport` when there was none).
    pub errors: BTreeMap<String, usize>,
    pub first_error: Option<String>,
    pub wall_seconds: f64,
    pub requests_per_second: f64,
    pub output_tokens: usize,
    pub output_tokens_per_second: f64,
    pub mean_prompt_tokens: Option<f64>,
    /// Completed requests within both SLOs, per second.
    pub goodput_requests_per_second: f64,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2e_ms: Summary,
    pub server_peak_rss_mib: Option<f64>,
}

const WORDS: &[&str] = &[
    "the", "river", "stone", "cloud", "market", "village", "road", "light", "winter", "garden",
    "music", "paper", "window", "summer", "bridge", "forest", "letter", "table", "morning", "city",
];

/// A prompt of `n` words from a fixed list; the same seed gives the same
/// prompt, for every server.
pub fn prompt(n: usize, seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let words: Vec<&str> = (0..n)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect();
    words.join(" ")
}

/// The requests of a run, built once: every body is the same apart from
/// its prompt words and seed.
pub struct Requests {
    template: Value,
    prefix: String,
    suffix: String,
    words: usize,
}

impl Requests {
    pub fn new(args: &RunArgs) -> Result<Self> {
        let (prefix, suffix) = match &args.prompt_format_of {
            None => (String::new(), String::new()),
            Some(path) => {
                let config: steerling::steering::AdapterConfig =
                    serde_json::from_str(&std::fs::read_to_string(path)?)?;
                (config.prompt_format.prefix, config.prompt_format.suffix)
            }
        };
        let mut template = json!({
            "max_tokens": args.max_tokens,
            "ignore_eos": true,
            "temperature": 1.0,
        });
        if let Some(m) = &args.model {
            template["model"] = json!(m);
        }
        if let Some(extra) = &args.extra {
            let extra: Value = serde_json::from_str(extra)?;
            let obj = extra
                .as_object()
                .ok_or_else(|| anyhow::anyhow!("--extra must be a JSON object"))?;
            for (k, v) in obj {
                template[k] = v.clone();
            }
        }
        Ok(Self {
            template,
            prefix,
            suffix,
            words: args.prompt_words,
        })
    }

    pub fn body(&self, seed: u64) -> Value {
        let mut body = self.template.clone();
        let (prefix, suffix) = (&self.prefix, &self.suffix);
        body["prompt"] = json!(format!("{prefix}{}{suffix}", prompt(self.words, seed)));
        body["seed"] = json!(seed);
        body
    }
}

pub async fn run(args: RunArgs) -> Result<()> {
    let report = measure(&args).await?;
    std::fs::create_dir_all(&args.out)?;
    let json_path = args.out.join(format!("{}.json", args.label));
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let md = markdown(&[&report]);
    std::fs::write(args.out.join(format!("{}.md", args.label)), &md)?;
    print!("{md}");
    eprintln!("written: {}", json_path.display());
    Ok(())
}

pub async fn measure(args: &RunArgs) -> Result<Report> {
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
    let target = Target::new(&args.url, !args.no_keep_alive)?;
    let requests = Requests::new(args)?;
    for i in 0..args.warmup {
        let o = target
            .stream_completion(requests.body(1_000_000 + i as u64))
            .await;
        if let Some(e) = o.error {
            anyhow::bail!("warm-up request failed: {e}");
        }
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let start = Instant::now();
    let stop_sending = start + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    let mut next_arrival = start;
    for i in 0..args.requests {
        if let Some(rate) = args.rate {
            // Exponential gaps: a Poisson process.
            let gap = -(1.0 - rng.random::<f64>()).ln() / rate;
            next_arrival += Duration::from_secs_f64(gap);
            tokio::time::sleep_until(next_arrival.into()).await;
        }
        if Instant::now() >= stop_sending {
            break;
        }
        let permit = permits.clone().acquire_owned().await?;
        let (target, body) = (target.clone(), requests.body(args.seed + i as u64));
        let honor_retry_after = args.honor_retry_after;
        tasks.push(tokio::spawn(async move {
            let o = target.stream_completion(body).await;
            if let Some(wait) = o.retry_after.filter(|_| honor_retry_after) {
                // The client's slot stays taken while it waits.
                tokio::time::sleep(Duration::from_secs_f64(wait.clamp(0.0, 60.0))).await;
            }
            drop(permit);
            o
        }));
    }
    let hard_stop = Instant::now().max(stop_sending) + Duration::from_secs(60);
    let mut outcomes = Vec::new();
    for t in tasks {
        let left = hard_stop.saturating_duration_since(Instant::now());
        outcomes.push(match tokio::time::timeout(left, t).await {
            Ok(Ok(o)) => o,
            _ => Outcome {
                error: Some("did not finish in time".into()),
                ..Default::default()
            },
        });
    }
    let wall = start.elapsed().as_secs_f64();
    Ok(summarize(args, &outcomes, wall))
}

fn summarize(args: &RunArgs, outcomes: &[Outcome], wall: f64) -> Report {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok()).collect();
    let mut errors = BTreeMap::new();
    for o in outcomes.iter().filter(|o| !o.ok()) {
        let key = o.status.map_or("transport".to_string(), |s| s.to_string());
        *errors.entry(key).or_insert(0) += 1;
    }
    let output_tokens: usize = ok.iter().map(|o| o.output_tokens()).sum();
    let good = ok
        .iter()
        .filter(|o| {
            o.ttft().is_some_and(|t| t * 1e3 <= args.slo_ttft_ms)
                && o.tpot().is_none_or(|t| t * 1e3 <= args.slo_tpot_ms)
        })
        .count();
    let prompt_tokens: Vec<usize> = ok.iter().filter_map(|o| o.usage_prompt_tokens).collect();
    Report {
        label: args.label.clone(),
        settings: args.clone(),
        completed: ok.len(),
        failed: outcomes.len() - ok.len(),
        errors,
        first_error: outcomes.iter().find_map(|o| o.error.clone()),
        wall_seconds: wall,
        requests_per_second: ok.len() as f64 / wall,
        output_tokens,
        output_tokens_per_second: output_tokens as f64 / wall,
        mean_prompt_tokens: (!prompt_tokens.is_empty())
            .then(|| prompt_tokens.iter().sum::<usize>() as f64 / prompt_tokens.len() as f64),
        goodput_requests_per_second: good as f64 / wall,
        ttft_ms: Summary::of_seconds(ok.iter().filter_map(|o| o.ttft())),
        tpot_ms: Summary::of_seconds(ok.iter().filter_map(|o| o.tpot())),
        itl_ms: Summary::of_seconds(ok.iter().flat_map(|o| o.itl())),
        e2e_ms: Summary::of_seconds(ok.iter().map(|o| o.e2e)),
        server_peak_rss_mib: args.server_pid.and_then(peak_rss_mib),
    }
}

/// VmHWM of a local process: its peak resident set size.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// One row per run.
pub fn markdown(reports: &[&Report]) -> String {
    let mut s = String::from(
        "| run | conc. | rate | done | failed | req/s | out tok/s | goodput req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | E2E p50 / p99 ms | peak RSS MiB |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in reports {
        let pair = |x: &Summary| format!("{:.0} / {:.0}", x.p50, x.p99);
        let pair_fine = |x: &Summary| format!("{:.1} / {:.1}", x.p50, x.p99);
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.2} | {} | {} | {} | {} | {} |\n",
            r.label,
            r.settings.concurrency,
            r.settings
                .rate
                .map_or("closed".into(), |x| format!("{x}/s")),
            r.completed,
            r.failed,
            r.requests_per_second,
            r.output_tokens_per_second,
            r.goodput_requests_per_second,
            pair(&r.ttft_ms),
            pair_fine(&r.tpot_ms),
            pair_fine(&r.itl_ms),
            pair(&r.e2e_ms),
            r.server_peak_rss_mib
                .map_or("–".into(), |m| format!("{m:.0}")),
        );
    }
    s
}
