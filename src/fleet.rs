//! Fleet mode (`--state redis://…`): several replicas share one served
//! distribution. The `balanced` policy's counts and the monitor's windows
//! live in Redis, each update one atomic script call, so two replicas
//! drawing at once can never both take the same deficit, and any replica's
//! report shows the whole fleet.
//!
//! Redis down or slow (every call has a short timeout): serving goes on.
//! Balanced draws continue on this replica's last view of the fleet's
//! counts, rounds wait in a bounded outbox, and the report says
//! `degraded`. A background task reconnects, then merges the outbox back:
//! the rounds with their original times, the draws into the shared counts.

use crate::monitor::report::WindowKind;
use crate::monitor::{AdapterRounds, Round, Windows};
use crate::steering::draw::BalancedCounts;
use crate::steering::{Detected, Registry};
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::Rng;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use utoipa::ToSchema;

/// Longest wait for one Redis call before this replica goes on alone.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// Between reconnection attempts, and between heartbeats.
const TICK: Duration = Duration::from_secs(1);
/// Rounds kept for merging while Redis is away; past it the oldest go.
pub const MAX_OUTBOX: usize = 100_000;
/// Rounds merged per pipelined batch.
const BATCH: usize = 500;
/// Hard cap on one time window's rounds in Redis, whatever its length.
const MAX_TIME_WINDOW: usize = 200_000;
const PREFIX: &str = "steerling";

/// Tijdeman's rule (the same as `steering::draw::balanced_choice`) on the
/// shared counts, and the increment, in one atomic step. Returns the chosen
/// value and the counts after it.
const DRAW: &str = r"
local k = #ARGV - 1
local u = tonumber(ARGV[1])
local fields = {}
for i = 1, k do fields[i] = tostring(i - 1) end
local raw = redis.call('HMGET', KEYS[1], unpack(fields))
local counts, n, positive = {}, 0, 0
for i = 1, k do
  counts[i] = tonumber(raw[i]) or 0
  n = n + counts[i]
  if tonumber(ARGV[i + 1]) > 0 then positive = positive + 1 end
end
local chosen = 1
if positive <= 1 then
  for i = 1, k do if tonumber(ARGV[i + 1]) > 0 then chosen = i break end end
else
  local a = 1 / (2 * positive - 2)
  local t = n + 1
  local eps = 1e-9
  local best, best_key = {}, math.huge
  for i = 1, k do
    local p = tonumber(ARGV[i + 1])
    if p > 0 and counts[i] + 1 - t * p <= 1 - a + eps then
      local key = (counts[i] + 1 - a) / p
      if key < best_key - eps then best_key = key; best = {i}
      elseif math.abs(key - best_key) <= eps then best[#best + 1] = i end
    end
  end
  if #best == 0 then
    local deficit = -math.huge
    for i = 1, k do
      local p = tonumber(ARGV[i + 1])
      if p > 0 and t * p - counts[i] > deficit then deficit = t * p - counts[i]; chosen = i end
    end
  else
    chosen = best[math.floor(u * #best) + 1]
  end
end
counts[chosen] = counts[chosen] + 1
redis.call('HINCRBY', KEYS[1], tostring(chosen - 1), 1)
redis.call('SADD', KEYS[2], KEYS[1])
local out = {chosen - 1}
for i = 1, k do out[i + 1] = counts[i] end
return out
";

/// One round into its context's windows and the adapter's aggregate: the
/// count window is a list trimmed to N, the time window a sorted set by
/// time whose old rounds are removed and which expires when idle.
const RECORD: &str = r"
for j = 0, 1 do
  local count, time = KEYS[1 + 2 * j], KEYS[2 + 2 * j]
  redis.call('LPUSH', count, ARGV[1])
  redis.call('LTRIM', count, 0, tonumber(ARGV[3]) - 1)
  redis.call('ZADD', time, ARGV[2], ARGV[1])
  redis.call('ZREMRANGEBYSCORE', time, '-inf', '(' .. (tonumber(ARGV[5]) - tonumber(ARGV[4])))
  redis.call('ZREMRANGEBYRANK', time, 0, -tonumber(ARGV[9]) - 1)
  redis.call('PEXPIRE', time, ARGV[4])
end
redis.call('SADD', KEYS[5], ARGV[6], ARGV[7])
redis.call('HSET', KEYS[6], ARGV[8], ARGV[5])
return 1
";

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `redis://host:port/db`
    pub url: String,
    /// This replica's name in the report.
    pub replica: String,
    pub window_rounds: usize,
    pub window_time: Duration,
}

/// The fleet as one replica sees it, for the report.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetStatus {
    /// This replica.
    pub replica: String,
    /// True while Redis is unreachable: the figures are this replica's own.
    pub degraded: bool,
    /// What the figures lack while degraded.
    pub missing: Option<String>,
    /// Replicas that reported, with when they were last seen.
    pub replicas: Vec<ReplicaSeen>,
    /// This replica's rounds waiting to be merged into the fleet's windows.
    pub buffered_rounds: usize,
    /// Rounds the outbox could not hold (the oldest go first); lost to the
    /// fleet's windows, though this replica's own counters have them.
    pub dropped_rounds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReplicaSeen {
    pub id: String,
    /// Unix time, milliseconds.
    pub last_seen_ms: u64,
    pub seconds_ago: f64,
}

/// A round waiting for Redis.
struct Pending {
    adapter: String,
    context: String,
    entry: String,
    at_ms: u64,
}

#[derive(Default)]
struct Outbox {
    rounds: VecDeque<Pending>,
    /// Balanced draws made alone: (adapter, context, value) → how many.
    draws: HashMap<(String, String, usize), u64>,
    dropped: u64,
}

pub struct Fleet {
    client: redis::Client,
    config: FleetConfig,
    conn: Mutex<Option<MultiplexedConnection>>,
    /// Unix ms when Redis was last found unreachable; 0 while connected.
    down_since_ms: AtomicU64,
    outbox: Mutex<Outbox>,
    wake: tokio::sync::Notify,
    /// The fleet's counts as last seen, plus the draws made alone since.
    mirror: BalancedCounts,
    seq: AtomicU64,
    draw: redis::Script,
    record: redis::Script,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("replica", &self.config.replica)
            .field("degraded", &self.is_degraded())
            .finish()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Names go into keys hex-encoded: no separator can be forged.
fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// A series: one context's rounds, or (context `None`) the adapter's aggregate.
fn series(adapter: &str, context: Option<&str>) -> String {
    format!("{}:{}", hex(adapter), context.map_or("*".into(), hex))
}

fn key(kind: &str, rest: &str) -> String {
    format!("{PREFIX}:{kind}:{rest}")
}

/// `at_ms|drawn|detected|seq|replica|context`: unique per round, and all a
/// report needs (the context last, as it may hold any character).
fn encode(
    at_ms: u64,
    drawn: usize,
    detected: &Detected,
    seq: u64,
    replica: &str,
    context: &str,
) -> String {
    let detected = match detected {
        Detected::Value(v) => v.to_string(),
        Detected::None => "none".into(),
        Detected::Ambiguous => "ambiguous".into(),
    };
    format!("{at_ms}|{drawn}|{detected}|{seq}|{replica}|{context}")
}

fn decode(entry: &str, now: Instant, now_ms: u64) -> Option<Round> {
    let mut parts = entry.splitn(6, '|');
    let at_ms: u64 = parts.next()?.parse().ok()?;
    let drawn = parts.next()?.parse().ok()?;
    let detected = match parts.next()? {
        "none" => Detected::None,
        "ambiguous" => Detected::Ambiguous,
        v => Detected::Value(v.parse().ok()?),
    };
    let context = parts.nth(2)?.to_string();
    let age = Duration::from_millis(now_ms.saturating_sub(at_ms));
    Some(Round {
        at: now.checked_sub(age).unwrap_or(now),
        context,
        drawn,
        detected,
    })
}

impl Fleet {
    /// Checks the URL; connects later, in the background (`start`).
    pub fn new(config: FleetConfig) -> Result<Arc<Self>> {
        let client = redis::Client::open(config.url.as_str()).with_context(|| {
            format!("`{}` is not a Redis URL (redis://host:port/db)", config.url)
        })?;
        crate::steering::registry::check_name(&config.replica).context("the replica id")?;
        Ok(Arc::new(Self {
            client,
            config,
            conn: Mutex::new(None),
            down_since_ms: AtomicU64::new(now_ms()),
            outbox: Mutex::new(Outbox::default()),
            wake: tokio::sync::Notify::new(),
            mirror: BalancedCounts::default(),
            seq: AtomicU64::new(0),
            draw: redis::Script::new(DRAW),
            record: redis::Script::new(RECORD),
        }))
    }

    /// Starts the task that connects, reconnects, merges the outbox and
    /// reports this replica alive. Needs a tokio runtime.
    pub fn start(self: &Arc<Self>) {
        let fleet = self.clone();
        tokio::spawn(async move { fleet.run().await });
    }

    pub fn replica(&self) -> &str {
        &self.config.replica
    }

    pub fn is_degraded(&self) -> bool {
        self.down_since_ms.load(Ordering::Relaxed) != 0
    }

    fn connection(&self) -> Option<MultiplexedConnection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn mark_down(&self, error: &str) {
        let was_up = self
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some();
        let _ =
            self.down_since_ms
                .compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
        if was_up {
            tracing::warn!(
                error,
                "Redis unreachable: serving on local state until it returns"
            );
        }
    }

    /// Runs one Redis call with the timeout; a failure marks Redis down.
    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.mark_down(&e.to_string());
                None
            }
            Err(_) => {
                self.mark_down("timed out");
                None
            }
        }
    }

    /// The balanced policy's next value for (adapter, context), from the
    /// fleet's counts; alone on this replica's last view while Redis is away.
    /// (A draw whose reply timed out may still have counted in Redis: that
    /// round is then counted twice, once there and once merged later.)
    pub async fn balanced_next(
        &self,
        adapter: &str,
        context: &str,
        target: &[f64],
        rng: &mut StdRng,
    ) -> usize {
        if let Some(mut conn) = self.connection() {
            let mut invocation = self.draw.prepare_invoke();
            invocation
                .key(key("balanced", &series(adapter, Some(context))))
                .key(key("balanced-keys", "all"))
                .arg(rng.random::<f64>());
            for p in target {
                invocation.arg(*p);
            }
            if let Some(out) = self
                .call(invocation.invoke_async::<Vec<u64>>(&mut conn))
                .await
            {
                if let Some((&chosen, counts)) = out.split_first() {
                    self.mirror.set(adapter, context, counts.to_vec());
                    return chosen as usize;
                }
            }
        }
        let value = self.mirror.next(adapter, context, target, rng);
        let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        *outbox
            .draws
            .entry((adapter.to_string(), context.to_string(), value))
            .or_default() += 1;
        value
    }

    /// Queues a finished round for the fleet's windows (sent at once while
    /// connected, merged later while not).
    pub fn record(&self, adapter: &str, context: &str, drawn: usize, detected: &Detected) {
        let at_ms = now_ms();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let entry = encode(at_ms, drawn, detected, seq, &self.config.replica, context);
        let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        if outbox.rounds.len() >= MAX_OUTBOX {
            outbox.rounds.pop_front();
            outbox.dropped += 1;
        }
        outbox.rounds.push_back(Pending {
            adapter: adapter.to_string(),
            context: context.to_string(),
            entry,
            at_ms,
        });
        drop(outbox);
        self.wake.notify_one();
    }

    async fn run(self: Arc<Self>) {
        let mut last_beat = Instant::now() - TICK;
        let mut last_attempt: Option<Instant> = None;
        loop {
            // At most one connection attempt per tick, however many rounds wake us.
            if self.connection().is_none() && last_attempt.is_none_or(|t| t.elapsed() >= TICK) {
                last_attempt = Some(Instant::now());
                self.connect().await;
            }
            if self.connection().is_some() {
                self.flush().await;
                if last_beat.elapsed() >= TICK {
                    self.heartbeat().await;
                    last_beat = Instant::now();
                }
            }
            let buffered = self
                .outbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .rounds
                .len();
            metrics::gauge!(crate::metrics::FLEET_BUFFERED).set(buffered as f64);
            metrics::gauge!(crate::metrics::FLEET_DEGRADED)
                .set(f64::from(u8::from(self.is_degraded())));
            let _ = tokio::time::timeout(TICK, self.wake.notified()).await;
        }
    }

    async fn connect(&self) {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT));
        let Ok(Ok(mut conn)) = tokio::time::timeout(
            CALL_TIMEOUT * 2,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        else {
            return;
        };
        // Scripts are loaded on every new connection (a restarted Redis has none).
        let loaded = self.draw.load_async(&mut conn).await.is_ok()
            && self.record.load_async(&mut conn).await.is_ok();
        if loaded {
            *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
            let since = self.down_since_ms.swap(0, Ordering::Relaxed);
            tracing::info!(
                down_seconds = now_ms().saturating_sub(since) as f64 / 1e3,
                "connected to Redis; merging what was recorded meanwhile"
            );
        }
    }

    /// Sends queued draws and rounds, in batches; on failure they stay queued
    /// (at least once: a batch cut off midway may record some rounds twice
    /// in the count window; the time window keeps each once).
    async fn flush(&self) {
        let draws =
            std::mem::take(&mut self.outbox.lock().unwrap_or_else(|e| e.into_inner()).draws);
        if !draws.is_empty() {
            let mut pipe = redis::pipe();
            for ((adapter, context, value), n) in &draws {
                let counts = key("balanced", &series(adapter, Some(context)));
                pipe.hincr(&counts, value.to_string(), *n).ignore();
                pipe.sadd(key("balanced-keys", "all"), &counts).ignore();
            }
            if !self.send(pipe).await {
                let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
                for (k, n) in draws {
                    *outbox.draws.entry(k).or_default() += n;
                }
                return;
            }
        }
        loop {
            let batch: Vec<Pending> = {
                let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
                let n = outbox.rounds.len().min(BATCH);
                outbox.rounds.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            let mut pipe = redis::pipe();
            for p in &batch {
                self.add_record(&mut pipe, p);
            }
            if !self.send(pipe).await {
                let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
                for p in batch.into_iter().rev() {
                    outbox.rounds.push_front(p);
                }
                while outbox.rounds.len() > MAX_OUTBOX {
                    outbox.rounds.pop_front();
                    outbox.dropped += 1;
                }
                return;
            }
        }
    }

    fn add_record(&self, pipe: &mut redis::Pipeline, p: &Pending) {
        let context = series(&p.adapter, Some(&p.context));
        let all = series(&p.adapter, None);
        let window_ms = self.config.window_time.as_millis() as u64;
        pipe.cmd("EVALSHA")
            .arg(self.record.get_hash())
            .arg(6)
            .arg(key("count", &context))
            .arg(key("time", &context))
            .arg(key("count", &all))
            .arg(key("time", &all))
            .arg(key("series", "all"))
            .arg(key("replicas", "all"))
            .arg(&p.entry)
            .arg(p.at_ms)
            .arg(self.config.window_rounds.max(1))
            .arg(window_ms.max(1))
            .arg(now_ms())
            .arg(&context)
            .arg(&all)
            .arg(&self.config.replica)
            .arg(MAX_TIME_WINDOW)
            .ignore();
    }

    async fn send(&self, pipe: redis::Pipeline) -> bool {
        let Some(mut conn) = self.connection() else {
            return false;
        };
        self.call(pipe.query_async::<()>(&mut conn)).await.is_some()
    }

    async fn heartbeat(&self) {
        let mut pipe = redis::pipe();
        pipe.hset(key("replicas", "all"), &self.config.replica, now_ms())
            .ignore();
        self.send(pipe).await;
    }

    /// The fleet's windows for every adapter this replica has loaded.
    pub async fn snapshot(
        &self,
        registry: &Registry,
        adapter: Option<&str>,
        window: Option<WindowKind>,
    ) -> Result<BTreeMap<String, AdapterRounds>> {
        let kinds = WindowKind::selected(window);
        let mut conn = self.connection().context("Redis is unreachable")?;
        let members = self.members(&mut conn, "series").await?;
        let (now, now_ms) = (Instant::now(), now_ms());
        let since = now_ms.saturating_sub(self.config.window_time.as_millis() as u64);
        let mut out: BTreeMap<String, AdapterRounds> = BTreeMap::new();
        for member in members {
            let Some((a, c)) = member.split_once(':') else {
                continue;
            };
            let Some(name) = unhex(a) else { continue };
            if adapter.is_some_and(|want| want != name) {
                continue;
            }
            let Some(loaded) = registry.get(&name) else {
                continue;
            };
            let mut pipe = redis::pipe();
            for kind in &kinds {
                match kind {
                    WindowKind::Count => pipe.lrange(
                        key("count", &member),
                        0,
                        self.config.window_rounds as isize - 1,
                    ),
                    WindowKind::Time => pipe.zrangebyscore(key("time", &member), since, "+inf"),
                };
            }
            let lists: Vec<Vec<String>> = self
                .call(pipe.query_async(&mut conn))
                .await
                .context("Redis is unreachable")?;
            let mut windows = Windows::default();
            for (&kind, entries) in kinds.iter().zip(lists) {
                let mut rounds: Vec<Round> = entries
                    .iter()
                    .filter_map(|e| decode(e, now, now_ms))
                    .collect();
                // The count list is newest first; windows read oldest first.
                if kind == WindowKind::Count {
                    rounds.reverse();
                }
                *windows.get_mut(kind) = rounds;
            }
            let entry = out
                .entry(name)
                .or_insert_with(|| AdapterRounds::new(loaded));
            match c {
                "*" => entry.all = windows,
                hexed => {
                    if let Some(context) = unhex(hexed) {
                        entry.contexts.insert(context, windows);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The members of one of the fleet's index sets (`series`, `balanced-keys`).
    async fn members(&self, conn: &mut MultiplexedConnection, set: &str) -> Result<Vec<String>> {
        self.call(
            redis::cmd("SMEMBERS")
                .arg(key(set, "all"))
                .query_async(conn),
        )
        .await
        .context("Redis is unreachable")
    }

    /// The report's fleet section: the replicas seen, and what is missing.
    pub async fn status(&self) -> FleetStatus {
        let mut replicas = Vec::new();
        if let Some(mut conn) = self.connection() {
            let seen: Option<HashMap<String, u64>> = self
                .call(
                    redis::cmd("HGETALL")
                        .arg(key("replicas", "all"))
                        .query_async(&mut conn),
                )
                .await;
            let now = now_ms();
            replicas = seen
                .unwrap_or_default()
                .into_iter()
                .map(|(id, at)| ReplicaSeen {
                    id,
                    last_seen_ms: at,
                    seconds_ago: now.saturating_sub(at) as f64 / 1e3,
                })
                .collect();
            replicas.sort_by(|a, b| a.id.cmp(&b.id));
        }
        let outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        let degraded = self.is_degraded();
        FleetStatus {
            replica: self.config.replica.clone(),
            degraded,
            missing: degraded.then(|| {
                "Redis is unreachable: these figures are this replica's own rounds; other replicas' rounds are missing, and this replica's rounds since then are merged into the fleet's when Redis returns".to_string()
            }),
            replicas,
            buffered_rounds: outbox.rounds.len(),
            dropped_rounds: outbox.dropped,
        }
    }

    /// Clears the fleet's windows and balanced counts (one adapter, or all).
    pub async fn reset(&self, adapter: Option<&str>) -> Result<()> {
        let mut conn = self.connection().context("Redis is unreachable")?;
        let series_members = self.members(&mut conn, "series").await?;
        let counts_keys = self.members(&mut conn, "balanced-keys").await?;
        let wanted =
            |series: &str| adapter.is_none_or(|a| series.starts_with(&format!("{}:", hex(a))));
        let mut pipe = redis::pipe();
        for member in series_members.iter().filter(|m| wanted(m)) {
            pipe.del(key("count", member)).ignore();
            pipe.del(key("time", member)).ignore();
            pipe.srem(key("series", "all"), member).ignore();
        }
        let prefix = key("balanced", "");
        for counts in counts_keys
            .iter()
            .filter(|k| wanted(k.strip_prefix(&prefix).unwrap_or(k)))
        {
            pipe.del(counts).ignore();
            pipe.srem(key("balanced-keys", "all"), counts).ignore();
        }
        self.call(pipe.query_async::<()>(&mut conn))
            .await
            .context("Redis is unreachable")?;
        self.mirror.reset(adapter);
        let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        outbox
            .rounds
            .retain(|p| adapter.is_some_and(|a| a != p.adapter));
        outbox
            .draws
            .retain(|(a, _, _), _| adapter.is_some_and(|want| want != a));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_keys_and_entries() {
        for s in ["nurse", "a:b|c", "ünï", ""] {
            assert_eq!(unhex(&hex(s)).as_deref(), Some(s));
        }
        let now = Instant::now();
        let entry = encode(1_000, 2, &Detected::Ambiguous, 7, "r1", "x|y:z");
        let round = decode(&entry, now, 1_500).unwrap();
        assert_eq!(
            (round.drawn, round.detected, round.context.as_str()),
            (2, Detected::Ambiguous, "x|y:z")
        );
        assert_eq!(now.duration_since(round.at), Duration::from_millis(500));
        assert!(decode("garbage", now, 0).is_none());
    }
}
