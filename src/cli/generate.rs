//! `steerling generate`: one prompt, streamed to stdout.

use super::{ModelArgs, SamplingArgs};
use crate::engine::{Engine, EngineConfig, Event, GenerateRequest};
use anyhow::{bail, Result};
use clap::Args;
use std::io::Write;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt, used as is (no chat template). Escapes such as \n are
    /// processed, as llama.cpp does, unless --no-escape.
    #[arg(long, short)]
    pub prompt: String,
    #[arg(long)]
    pub no_escape: bool,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Stop strings, repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Processes \n, \t, \r, \\, \" and \' like llama.cpp's --escape.
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some('"') => out.push('"'),
            Some('\'') => out.push('\''),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let prompt = if args.no_escape {
        args.prompt.clone()
    } else {
        unescape(&args.prompt)
    };
    let ids = loaded.tokenizer.encode(&prompt, true)?;
    let engine = Engine::start(
        loaded,
        EngineConfig {
            max_context: args.model.max_context,
            ..EngineConfig::default()
        },
    );
    let mut request = GenerateRequest::new(ids, args.max_tokens, args.sampling.params());
    request.stop = args
        .stop
        .iter()
        .map(|s| {
            if args.no_escape {
                s.clone()
            } else {
                unescape(s)
            }
        })
        .collect();
    let mut events = engine.submit(request)?;
    let mut out = std::io::stdout().lock();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token { text, .. } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            Event::Done {
                tail,
                reason,
                completion_tokens,
                ..
            } => {
                out.write_all(tail.as_bytes())?;
                writeln!(out)?;
                tracing::info!(
                    tokens = completion_tokens,
                    finish_reason = reason.as_str(),
                    "done"
                );
                return Ok(());
            }
            Event::Error(e) => bail!(e),
            Event::PromptLogprobs(_) | Event::Steering { .. } => {}
        }
    }
    bail!("the engine stopped before finishing")
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescape_handles_common_escapes() {
        assert_eq!(super::unescape(r"a\nb\tc\\d\q"), "a\nb\tc\\d\\q");
    }
}
