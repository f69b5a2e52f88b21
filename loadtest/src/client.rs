//! One streamed completion request, timed token by token.

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::Value;
use std::time::{Duration, Instant};

/// A server under test: loopback only.
#[derive(Clone)]
pub struct Target {
    pub base: String,
    client: reqwest::Client,
}

impl Target {
    /// `keep_alive: false` opens one connection per request (llama-server
    /// drops reused keep-alive connections).
    pub fn new(url: &str, keep_alive: bool) -> Result<Self> {
        let base = url.trim_end_matches('/').to_string();
        let host = base
            .strip_prefix("http://")
            .context("the target must be an http:// URL on loopback")?
            .split(['/', ':'])
            .next()
            .unwrap_or("");
        let rest = &base["http://".len()..];
        let loopback = ["127.0.0.1", "localhost"].contains(&host) || rest.starts_with("[::1]");
        if !loopback {
            bail!(
                "load is only sent to loopback targets (127.0.0.1, localhost, [::1]), not `{url}`"
            );
        }
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(600));
        if !keep_alive {
            builder = builder.pool_max_idle_per_host(0);
        }
        Ok(Self {
            base,
            client: builder.build()?,
        })
    }

    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    pub async fn ready(&self) -> bool {
        let url = format!("{}/ready", self.base);
        matches!(self.client.get(url).send().await, Ok(r) if r.status().is_success())
    }

    /// Sends `body` to /v1/completions with `stream: true` and times it.
    pub async fn stream_completion(&self, mut body: Value) -> Outcome {
        body["stream"] = Value::Bool(true);
        body["stream_options"] = serde_json::json!({"include_usage": true});
        let start = Instant::now();
        let mut out = Outcome::default();
        if let Err(e) = self.read_stream(body, start, &mut out).await {
            out.error = Some(format!("{e:#}"));
        }
        out.e2e = start.elapsed().as_secs_f64();
        out
    }

    async fn read_stream(&self, body: Value, start: Instant, out: &mut Outcome) -> Result<()> {
        let url = format!("{}/v1/completions", self.base);
        let response = self.client.post(url).json(&body).send().await?;
        let status = response.status();
        out.status = Some(status.as_u16());
        out.retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("{status}: {}", text.chars().take(300).collect::<String>());
        }
        let mut stream = response.bytes_stream();
        let mut buffer = Vec::new();
        while let Some(bytes) = stream.next().await {
            buffer.extend_from_slice(&bytes?);
            while let Some(end) = find(&buffer, b"\n\n") {
                let event: Vec<u8> = buffer.drain(..end + 2).collect();
                let at = start.elapsed().as_secs_f64();
                for line in String::from_utf8_lossy(&event).lines() {
                    let Some(data) = line.strip_prefix("data:") else {
                        continue;
                    };
                    let data = data.trim();
                    if data == "[DONE]" {
                        return Ok(());
                    }
                    out.chunk(serde_json::from_str(data)?, at);
                }
            }
        }
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What one request saw. Times are seconds from sending it.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub status: Option<u16>,
    pub error: Option<String>,
    /// Seconds the server asked to wait before retrying (its Retry-After).
    pub retry_after: Option<f64>,
    /// Arrival time of every chunk that carried text.
    pub token_times: Vec<f64>,
    pub e2e: f64,
    /// From the usage chunk when the server sends one.
    pub usage_completion_tokens: Option<usize>,
    pub usage_prompt_tokens: Option<usize>,
    pub text: String,
    /// The drawn value, with `steering.return`.
    pub steering_value: Option<String>,
}

impl Outcome {
    fn chunk(&mut self, chunk: Value, at: f64) {
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage_completion_tokens = usage["completion_tokens"].as_u64().map(|n| n as usize);
            self.usage_prompt_tokens = usage["prompt_tokens"].as_u64().map(|n| n as usize);
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return;
        };
        if let Some(text) = choice["text"].as_str().filter(|t| !t.is_empty()) {
            self.text.push_str(text);
            self.token_times.push(at);
        }
        if let Some(v) = choice["steering"]["value"].as_str() {
            self.steering_value = Some(v.to_string());
        }
    }

    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    pub fn ttft(&self) -> Option<f64> {
        self.token_times.first().copied()
    }

    /// Tokens generated: the server's count, else one per text chunk.
    pub fn output_tokens(&self) -> usize {
        self.usage_completion_tokens
            .unwrap_or(self.token_times.len())
    }

    /// Time per output token after the first.
    pub fn tpot(&self) -> Option<f64> {
        let n = self.output_tokens();
        let ttft = self.ttft()?;
        (n > 1).then(|| (self.e2e - ttft) / (n - 1) as f64)
    }

    /// Gaps between consecutive text chunks.
    pub fn itl(&self) -> impl Iterator<Item = f64> + '_ {
        self.token_times.windows(2).map(|w| w[1] - w[0])
    }
}
