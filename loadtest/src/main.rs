//! `steerling-loadtest`: measures any OpenAI-compatible `/v1/completions`
//! server on loopback.
//!
//! * `run`: a fixed concurrency or a Poisson arrival rate, bounded in count
//!   and time; TTFT, TPOT, ITL, end-to-end latency, throughput, goodput under
//!   an SLO and errors by status, as JSON and Markdown.
//! * `distribution`: R rounds per context to a steering adapter under each
//!   policy; served (detected) shares against the targets, detection
//!   consistency, and the convergence curve as SVG.

mod client;
mod distribution;
mod run;
mod stats;
mod svg;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Throughput and latency under load.
    Run(run::RunArgs),
    /// Served shares against targets, per policy, over R rounds per context.
    Distribution(distribution::DistributionArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run::run(args).await,
        Command::Distribution(args) => distribution::run(args).await,
    }
}
