//! `steerling train --config job.json`: trains an adapter offline, with a
//! progress line, and writes it atomically into the adapters folder.

use super::ModelArgs;
use crate::steering::adapter::BaseModel;
use crate::training::data::TrainingData;
use crate::training::trainer::{train, write_adapter, TrainConfig};
use anyhow::{Context, Result};
use clap::Args;
use serde::Deserialize;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The job: {"name", "data": PATH or {…}, "output"?, "settings"?}.
    #[arg(long)]
    pub config: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Deserialize)]
struct Job {
    name: String,
    /// Training data inline, or a path to it (relative to the job file).
    data: serde_json::Value,
    #[serde(default = "default_output")]
    output: PathBuf,
    #[serde(default)]
    settings: TrainConfig,
}

fn default_output() -> PathBuf {
    PathBuf::from("adapters")
}

pub fn run(args: TrainArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read {}", args.config.display()))?;
    let job: Job = serde_json::from_str(&text).context("the job file is not valid")?;
    let data: TrainingData = match job.data {
        serde_json::Value::String(path) => {
            let path = args
                .config
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(path);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid training data", path.display()))?
        }
        inline => {
            serde_json::from_value(inline).context("the job's data is not valid training data")?
        }
    };
    let loaded = args.model.load()?;
    let base = BaseModel {
        name: loaded.name.clone(),
        sha256: loaded.sha256.clone(),
    };
    let mut err = std::io::stderr();
    let trained = train(
        &loaded.model,
        &loaded.tokenizer,
        data,
        &job.settings,
        base,
        |p| {
            if p.step == 0 {
                let _ = write!(err, "measuring the untrained adapter on held-out prompts…");
                let _ = err.flush();
                return true;
            }
            let width = 30;
            let filled = width * p.step / p.total.max(1);
            let kl = p.kl.map_or(String::new(), |k| format!(" kl {k:.4}"));
            let kto = p.kto.map_or(String::new(), |k| format!(" kto {k:.4}"));
            let _ = write!(
                err,
                "\r{:<6} [{}{}] {}/{} loss {:.4}{kl}{kto} eta {:.0}s   ",
                p.stage,
                "#".repeat(filled),
                " ".repeat(width - filled),
                p.step,
                p.total,
                p.loss,
                p.eta_secs
            );
            let _ = err.flush();
            true
        },
    )?;
    eprintln!();
    let path = write_adapter(&job.output, &job.name, &trained)?;
    let t = &trained.config.training;
    println!(
        "adapter written to {} (held-out prior MAE {:.4} → {:.4}, {:.0} s)",
        path.display(),
        t["held_out_prior_mae_before"].as_f64().unwrap_or(f64::NAN),
        t["held_out_prior_mae"].as_f64().unwrap_or(f64::NAN),
        t["train_seconds"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(())
}
