//! The command line: `serve`, `generate`, `bench`, `fetch-model`.

mod bench;
mod generate;
mod serve;
mod train;

use crate::engine::SamplingParams;
use crate::model::{load_model, LoadedModel, ModelSource};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "steerling",
    version,
    about = "An inference server that steers the distribution of its outputs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the OpenAI-compatible HTTP server.
    Serve(serve::ServeArgs),
    /// Generate text for one prompt, streamed to stdout.
    Generate(generate::GenerateArgs),
    /// Measure prefill and decode speed at batch sizes 1, 4 and 16.
    Bench(bench::BenchArgs),
    /// Train a steering adapter offline (KL + KTO) and write it.
    Train(train::TrainArgs),
    /// Download the default model (SmolLM2-135M-Instruct Q4_1) into the cache.
    FetchModel,
    /// Print the OpenAPI document (as committed in openapi/openapi.json).
    Openapi,
}

/// Which model to load.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file, a Hugging Face folder, or `default` (SmolLM2-135M-Instruct, fetched if missing).
    #[arg(long, env = "STEERLING_MODEL", default_value = "default")]
    pub model: String,
    /// Longest sequence (prompt + output) in tokens.
    #[arg(long, env = "STEERLING_MAX_CONTEXT", default_value_t = 2048)]
    pub max_context: usize,
}

impl ModelArgs {
    pub fn resolve(&self) -> Result<PathBuf> {
        if self.model == "default" {
            crate::fetch::ensure_default_model()
        } else {
            Ok(PathBuf::from(&self.model))
        }
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let path = self.resolve()?;
        let source = ModelSource::from_path(&path)?;
        load_model(&source, self.max_context)
    }
}

/// Sampling flags shared by the commands that generate.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// TOKEN_ID:BIAS, repeatable (−100 bans a token).
    #[arg(long = "logit-bias", value_parser = parse_bias)]
    pub logit_bias: Vec<(u32, f32)>,
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            seed: self.seed,
            logprobs: None,
        }
    }
}

fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s.split_once(':').ok_or("expected TOKEN_ID:BIAS")?;
    Ok((
        id.trim()
            .parse()
            .map_err(|_| format!("bad token id `{id}`"))?,
        bias.trim()
            .parse()
            .map_err(|_| format!("bad bias `{bias}`"))?,
    ))
}

/// Logs to stderr: `STEERLING_LOG` filters (default `info`);
/// `STEERLING_LOG_FORMAT=json` writes one JSON object per line.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEERLING_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var("STEERLING_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run(args),
        Command::Openapi => {
            print!("{}", crate::api::openapi::document());
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::FetchModel => {
            let path =
                crate::fetch::ensure_default_model().context("cannot fetch the default model")?;
            println!("{}", path.display());
            Ok(())
        }
    }
}
