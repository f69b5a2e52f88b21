//! `distribution`: what a steering adapter serves, per context and policy.
//!
//! For each policy, R rounds per context on prompts the adapter's training
//! never saw (its folder's `eval_prompts.json`), contexts interleaved as
//! traffic would be. Each answer's value is detected with the adapter's own
//! patterns and rule. `off` is the baseline: the base model on the same
//! formatted prompt, no adapter.

use crate::client::{Outcome, Target};
use crate::svg;
use anyhow::{bail, Context, Result};
use clap::Args;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use steerling::steering::{AdapterConfig, Detected};

#[derive(Args, Debug, Clone, Serialize)]
pub struct DistributionArgs {
    /// The adapter's folder (adapter.json, eval_prompts.json).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Prompts to use instead of the folder's eval_prompts.json:
    /// [{"text", "context"}, …].
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// A running server (loopback). Default: start --server on a free port
    /// with the adapter's parent folder as --adapters, and stop it after.
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long, default_value = "target/release/steerling")]
    pub server: PathBuf,
    /// Rounds per context and policy.
    #[arg(long, default_value_t = 100)]
    pub rounds: usize,
    #[arg(long, value_delimiter = ',', default_value = "off,prior,balanced")]
    pub policies: Vec<String>,
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// Seed of the first request; request i uses seed + i.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600.0)]
    pub timeout: f64,
    #[arg(long, default_value = "target/distribution")]
    pub out: PathBuf,
}

#[derive(Deserialize, Clone)]
struct PromptSpec {
    text: String,
    context: String,
}

/// The adapter's own detection (the server's code), with value names.
struct Detector {
    names: Vec<String>,
    inner: steerling::steering::Detector,
}

impl Detector {
    fn new(a: &AdapterConfig) -> Result<Self> {
        Ok(Self {
            names: a.value_names(),
            inner: steerling::steering::Detector::new(a)?,
        })
    }

    /// A value's name, `none` or `ambiguous`.
    fn detect(&self, text: &str) -> String {
        match self.inner.detect(text) {
            Detected::Value(i) => self.names[i].clone(),
            Detected::None => "none".into(),
            Detected::Ambiguous => "ambiguous".into(),
        }
    }
}

struct Round {
    context: String,
    drawn: Option<String>,
    detected: String,
}

#[derive(Serialize)]
struct ContextResult {
    target: BTreeMap<String, f64>,
    rounds: usize,
    detected: BTreeMap<String, usize>,
    drawn: BTreeMap<String, usize>,
    /// Shares among answers that show a value.
    served_share: BTreeMap<String, f64>,
    mae: Option<f64>,
    consistent: usize,
}

#[derive(Serialize)]
struct PolicyResult {
    policy: String,
    rounds: usize,
    seconds: f64,
    failed: usize,
    /// Mean over contexts of the served shares' MAE against the target.
    mae: Option<f64>,
    /// The same for the drawn values (policies that draw).
    drawn_mae: Option<f64>,
    /// Rounds whose answer shows the drawn value.
    consistency: Option<f64>,
    none: f64,
    ambiguous: f64,
    /// MAE over contexts after r rounds per context, r = 1..R.
    convergence: Vec<Option<f64>>,
    contexts: BTreeMap<String, ContextResult>,
}

pub async fn run(args: DistributionArgs) -> Result<()> {
    let adapter: AdapterConfig = read_json(&args.adapter.join("adapter.json"))?;
    let prompts: Vec<PromptSpec> = read_json(
        &args
            .prompts
            .clone()
            .unwrap_or_else(|| args.adapter.join("eval_prompts.json")),
    )?;
    let name = args
        .adapter
        .canonicalize()?
        .file_name()
        .context("the adapter folder has no name")?
        .to_string_lossy()
        .to_string();
    let detector = Detector::new(&adapter)?;
    let server = match &args.url {
        Some(_) => None,
        None => Some(Server::start(&args).await?),
    };
    let url = args
        .url
        .clone()
        .or_else(|| server.as_ref().map(|s| s.url.clone()))
        .unwrap_or_default();
    let target = Target::new(&url, true)?;
    let models = target.get_json("/v1/models").await?;
    let models = models["data"].as_array().cloned().unwrap_or_default();
    let base = models
        .iter()
        .find(|m| m["parent"].is_null())
        .and_then(|m| m["id"].as_str())
        .context("no base model in /v1/models")?
        .to_string();
    if !models.iter().any(|m| m["id"] == name.as_str()) {
        bail!("the server does not serve adapter `{name}`");
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let mut results = Vec::new();
    for policy in &args.policies {
        let started = Instant::now();
        let jobs = jobs(policy, &adapter, &prompts, &base, &name, &args);
        let outcomes: Vec<Outcome> = futures::stream::iter(jobs.iter().map(|(_, body)| {
            let target = target.clone();
            let body = body.clone();
            async move { with_retries(&target, body).await }
        }))
        .buffered(args.concurrency)
        .collect::<Vec<_>>()
        .await;
        if Instant::now() > deadline {
            bail!("--timeout passed");
        }
        let rounds: Vec<Option<Round>> = jobs
            .iter()
            .zip(&outcomes)
            .map(|((context, _), o)| {
                o.ok().then(|| Round {
                    context: context.clone(),
                    drawn: o.steering_value.clone(),
                    detected: detector.detect(&o.text),
                })
            })
            .collect();
        let r = summarize(
            policy,
            &rounds,
            &adapter,
            &detector,
            started.elapsed().as_secs_f64(),
        );
        eprintln!(
            "{policy}: {} rounds in {:.0} s, MAE {}, consistency {}",
            r.rounds,
            r.seconds,
            fmt(r.mae),
            fmt(r.consistency)
        );
        if let Some(e) = outcomes.iter().find_map(|o| o.error.clone()) {
            eprintln!("  {} failed, first: {e}", r.failed);
        }
        results.push(r);
    }
    drop(server);
    write(&args, &results, &detector)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
}

/// (context, request body) per round, contexts interleaved.
fn jobs(
    policy: &str,
    adapter: &AdapterConfig,
    prompts: &[PromptSpec],
    base: &str,
    name: &str,
    args: &DistributionArgs,
) -> Vec<(String, Value)> {
    let mut by_context: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in prompts {
        by_context.entry(&p.context).or_default().push(&p.text);
    }
    let mut out = Vec::new();
    for r in 0..args.rounds {
        for (context, texts) in &by_context {
            let text = texts[r % texts.len()];
            let seed = args.seed + out.len() as u64;
            let mut body = json!({
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "seed": seed,
            });
            if policy == "off" {
                let f = &adapter.prompt_format;
                body["model"] = json!(base);
                body["prompt"] = json!(format!("{}{text}{}", f.prefix, f.suffix));
            } else {
                body["model"] = json!(name);
                body["prompt"] = json!(text);
                body["steering"] = json!({"policy": policy, "context": context, "return": true});
            }
            out.push((context.to_string(), body));
        }
    }
    out
}

/// Retries 429 (the server shedding load) a few times.
async fn with_retries(target: &Target, body: Value) -> Outcome {
    let mut outcome = Outcome::default();
    for attempt in 0..5u64 {
        outcome = target.stream_completion(body.clone()).await;
        if outcome.status != Some(429) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500 * (attempt + 1))).await;
    }
    outcome
}

fn summarize(
    policy: &str,
    rounds: &[Option<Round>],
    adapter: &AdapterConfig,
    detector: &Detector,
    seconds: f64,
) -> PolicyResult {
    let names = &detector.names;
    let target_of = |c: &str| {
        adapter
            .targets
            .contexts
            .get(c)
            .unwrap_or(&adapter.targets.default)
            .clone()
    };
    let mut contexts: BTreeMap<String, ContextResult> = BTreeMap::new();
    let mut convergence = Vec::new();
    let sweep = adapter_contexts(rounds).max(1);
    for (i, round) in rounds.iter().enumerate() {
        if let Some(r) = round {
            let c = contexts
                .entry(r.context.clone())
                .or_insert_with(|| ContextResult {
                    target: target_of(&r.context),
                    rounds: 0,
                    detected: BTreeMap::new(),
                    drawn: BTreeMap::new(),
                    served_share: BTreeMap::new(),
                    mae: None,
                    consistent: 0,
                });
            c.rounds += 1;
            *c.detected.entry(r.detected.clone()).or_default() += 1;
            if let Some(d) = &r.drawn {
                *c.drawn.entry(d.clone()).or_default() += 1;
                c.consistent += usize::from(*d == r.detected);
            }
        }
        // After each full sweep over the contexts: the MAE so far.
        if (i + 1) % sweep == 0 {
            convergence.push(mean(contexts.values().filter_map(|c| served_mae(c, names))));
        }
    }
    let mut drawn_maes = Vec::new();
    for c in contexts.values_mut() {
        let shown: usize = names
            .iter()
            .map(|n| c.detected.get(n).copied().unwrap_or(0))
            .sum();
        for n in names {
            if shown > 0 {
                let k = c.detected.get(n).copied().unwrap_or(0);
                c.served_share.insert(n.clone(), k as f64 / shown as f64);
            }
        }
        c.mae = served_mae(c, names);
        if !c.drawn.is_empty() {
            drawn_maes.push(
                names
                    .iter()
                    .map(|n| {
                        let k = c.drawn.get(n).copied().unwrap_or(0) as f64;
                        (k / c.rounds as f64 - c.target.get(n).copied().unwrap_or(0.0)).abs()
                    })
                    .sum::<f64>()
                    / names.len() as f64,
            );
        }
    }
    let done: usize = contexts.values().map(|c| c.rounds).sum();
    let count = |what: &str| -> f64 {
        contexts
            .values()
            .map(|c| c.detected.get(what).copied().unwrap_or(0))
            .sum::<usize>() as f64
            / done.max(1) as f64
    };
    let draws = policy != "off";
    PolicyResult {
        policy: policy.to_string(),
        rounds: done,
        seconds,
        failed: rounds.len() - done,
        mae: mean(contexts.values().filter_map(|c| c.mae)),
        drawn_mae: if draws { mean(drawn_maes) } else { None },
        consistency: draws.then(|| {
            contexts.values().map(|c| c.consistent).sum::<usize>() as f64 / done.max(1) as f64
        }),
        none: count("none"),
        ambiguous: count("ambiguous"),
        convergence,
        contexts,
    }
}

fn adapter_contexts(rounds: &[Option<Round>]) -> usize {
    let mut seen: Vec<&str> = rounds
        .iter()
        .flatten()
        .map(|r| r.context.as_str())
        .collect();
    seen.sort();
    seen.dedup();
    seen.len()
}

/// MAE of the served shares (among answers showing a value) against the target.
fn served_mae(c: &ContextResult, names: &[String]) -> Option<f64> {
    let shown: usize = names
        .iter()
        .map(|n| c.detected.get(n).copied().unwrap_or(0))
        .sum();
    (shown > 0).then(|| {
        names
            .iter()
            .map(|n| {
                let share = c.detected.get(n).copied().unwrap_or(0) as f64 / shown as f64;
                (share - c.target.get(n).copied().unwrap_or(0.0)).abs()
            })
            .sum::<f64>()
            / names.len() as f64
    })
}

fn mean(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let xs: Vec<f64> = xs.into_iter().collect();
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

fn fmt(x: Option<f64>) -> String {
    x.map_or("–".into(), |x| format!("{x:.3}"))
}

fn write(args: &DistributionArgs, results: &[PolicyResult], detector: &Detector) -> Result<()> {
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&json!({"settings": args, "policies": results}))?,
    )?;
    let md = markdown(args, results, &detector.names[0]);
    std::fs::write(args.out.join("results.md"), &md)?;
    let lines: Vec<(String, Vec<Option<f64>>)> = results
        .iter()
        .map(|r| (r.policy.clone(), r.convergence.clone()))
        .collect();
    std::fs::write(
        args.out.join("convergence.svg"),
        svg::convergence(
            &lines,
            "rounds per context",
            "MAE of served shares vs target",
        ),
    )?;
    for r in results {
        let first = &detector.names[0];
        let points: Vec<(f64, f64)> = r
            .contexts
            .values()
            .filter_map(|c| Some((*c.target.get(first)?, *c.served_share.get(first)?)))
            .collect();
        std::fs::write(
            args.out.join(format!("shares-{}.svg", r.policy)),
            svg::scatter(
                &points,
                &format!("policy {}: served vs target share of `{first}`", r.policy),
            ),
        )?;
    }
    print!("{md}");
    eprintln!("written to {}", args.out.display());
    Ok(())
}

fn markdown(args: &DistributionArgs, results: &[PolicyResult], first: &str) -> String {
    let mut s = format!(
        "{} rounds per context and policy; max_tokens {}, temperature {}, top_p {}. \
         Shares of `{first}` among answers that show a value.\n\n",
        args.rounds, args.max_tokens, args.temperature, args.top_p
    );
    s += "| context | target |";
    for r in results {
        s += &format!(" {} |", r.policy);
    }
    s += "\n| --- | ---: |";
    s += &" ---: |".repeat(results.len());
    s += "\n";
    let Some(first_result) = results.first() else {
        return s;
    };
    let mut contexts: Vec<(&String, f64)> = first_result
        .contexts
        .iter()
        .map(|(name, c)| (name, c.target.get(first).copied().unwrap_or(0.0)))
        .collect();
    contexts.sort_by(|a, b| a.1.total_cmp(&b.1));
    for (name, target) in contexts {
        s += &format!("| {name} | {target:.2} |");
        for r in results {
            let share = r.contexts.get(name).and_then(|c| c.served_share.get(first));
            s += &format!(" {} |", share.map_or("–".into(), |x| format!("{x:.2}")));
        }
        s += "\n";
    }
    let row = |label: &str, f: &dyn Fn(&PolicyResult) -> String| {
        let mut line = format!("| {label} | |");
        for r in results {
            line += &format!(" {} |", f(r));
        }
        line + "\n"
    };
    s += &row("**MAE, served (mean over contexts)**", &|r| {
        format!("**{}**", fmt(r.mae))
    });
    s += &row("MAE, drawn", &|r| fmt(r.drawn_mae));
    s += &row("detection consistency", &|r| fmt(r.consistency));
    s += &row("answers showing no value", &|r| format!("{:.3}", r.none));
    s += &row("answers showing both", &|r| format!("{:.3}", r.ambiguous));
    s += &row("failed requests", &|r| r.failed.to_string());
    s
}

/// A steerling server started for the measurement, stopped on drop.
struct Server {
    child: tokio::process::Child,
    url: String,
}

impl Server {
    async fn start(args: &DistributionArgs) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let adapters = args
            .adapter
            .canonicalize()?
            .parent()
            .context("the adapter folder has no parent")?
            .to_path_buf();
        std::fs::create_dir_all(&args.out)?;
        let log = std::fs::File::create(args.out.join("server.log"))?;
        let mut child = tokio::process::Command::new(&args.server)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--adapters")
            .arg(&adapters)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", args.server.display()))?;
        let url = format!("http://127.0.0.1:{port}");
        let target = Target::new(&url, true)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the server exited with {status}; see {}",
                    args.out.join("server.log").display()
                );
            }
            if target.ready().await {
                return Ok(Self { child, url });
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let _ = child.kill().await;
        bail!("the server was not ready after 300 s")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(rule: &str) -> Detector {
        let a: AdapterConfig = serde_json::from_value(json!({
            "format_version": 1,
            "base_model": {"name": "m", "sha256": "0"},
            "attribute": {"name": "gender", "values": [
                {"name": "female", "token": "<f>", "patterns": ["she", "her"]},
                {"name": "male", "token": "<m>", "patterns": ["he", "his"]}]},
            "detection": {"rule": rule},
            "targets": {"default": {"female": 0.5, "male": 0.5}},
            "lora": null
        }))
        .unwrap();
        Detector::new(&a).unwrap()
    }

    #[test]
    fn detection_follows_the_adapter_rule() {
        let last = detector("last_mention");
        assert_eq!(last.detect("She met him. He smiled at his friend"), "male");
        assert_eq!(last.detect("He said she was right"), "female");
        assert_eq!(last.detect("There was the shed"), "none");
        let majority = detector("majority");
        assert_eq!(majority.detect("She and her dog met him. He"), "female");
        assert_eq!(majority.detect("she he"), "ambiguous");
    }
}
