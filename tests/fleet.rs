//! Fleet mode on real processes: a redis-server on a loopback port and two
//! `steerling serve` replicas of the tiny model sharing one adapter's
//! distribution through it. The balanced policy holds for the fleet, both
//! reports agree, and a Redis outage is served through and merged back.

mod common;

use common::child::{free_port, ChildServer};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use steerling::model::{load_model, ModelSource};
use steerling::testing::{write_test_adapter, TestAdapter};

const TARGET: [f64; 3] = [0.5, 0.3, 0.2];

/// redis-server on a free loopback port, its data in `dir` (append-only
/// file, synced on every write, so a restart finds it all).
struct Redis {
    port: u16,
    dir: std::path::PathBuf,
    child: Child,
}

impl Redis {
    fn start(dir: &std::path::Path, port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", dir.to_str().unwrap(), "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            // DEBUG SLEEP stands in for a stalled Redis.
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is needed (Debian package redis-server; .ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            port,
            dir: dir.to_path_buf(),
            child,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL: no goodbye to the replicas.
    fn kill(mut self) -> (std::path::PathBuf, u16) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.dir.clone(), self.port)
    }

    /// The balanced policy's counts for (adapter, context), as Redis has them.
    async fn counts(&self, adapter: &str, context: &str) -> Vec<u64> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
        let key = format!("steerling:balanced:{}:{}", hex(adapter), hex(context));
        let map: std::collections::HashMap<usize, u64> = redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        (0..TARGET.len())
            .map(|v| map.get(&v).copied().unwrap_or(0))
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn adapters_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_model(&ModelSource::Gguf(common::tiny_gguf()), 256).unwrap();
    let spec = TestAdapter {
        values: 3,
        default_target: TARGET.to_vec(),
        ..TestAdapter::default()
    };
    write_test_adapter(
        dir.path(),
        "abc",
        &loaded.model.config,
        &loaded.sha256,
        &spec,
    )
    .unwrap();
    dir
}

fn replica(id: &str, redis_url: &str, adapters: &std::path::Path) -> ChildServer {
    let model = common::tiny_gguf();
    ChildServer::start(
        &[
            "--model",
            model.to_str().unwrap(),
            "--adapters",
            adapters.to_str().unwrap(),
            "--max-context",
            "256",
            "--state",
            redis_url,
            "--replica-id",
            id,
            "--window-rounds",
            "5000",
        ],
        &[],
    )
}

/// `n` balanced rounds, alternating between the replicas, 8 in flight;
/// every one must succeed.
async fn balanced_rounds(replicas: &[&ChildServer], n: usize) {
    use futures::stream::StreamExt;
    let client = reqwest::Client::new();
    let body = json!({"model": "abc", "prompt": "Hello", "max_tokens": 2,
                      "steering": {"policy": "balanced"}});
    let statuses: Vec<u16> = futures::stream::iter(0..n)
        .map(|i| {
            let url = format!("{}/v1/completions", replicas[i % replicas.len()].base);
            let (client, body) = (client.clone(), body.clone());
            async move {
                client
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
}

/// The report as the HTML page.
async fn page(replica: &ChildServer) -> String {
    let url = format!("{}/distribution", replica.base);
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

async fn report(replica: &ChildServer) -> Value {
    reqwest::get(format!("{}/distribution/report?window=count", replica.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn drawn(report: &Value) -> Vec<u64> {
    let window = &report["adapters"][0]["aggregate"][0];
    ["v0", "v1", "v2"]
        .iter()
        .map(|v| window["drawn"][v]["count"].as_u64().unwrap_or(0))
        .collect()
}

/// Polls until the replica's report is the fleet's and holds `n` rounds.
async fn wait_for_fleet_count(replica: &ChildServer, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = report(replica).await;
        if r["state"] == "redis" && drawn(&r).iter().sum::<u64>() == n {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "report never reached {n} rounds: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_rounds_across_two_replicas_hold_the_fleet_target() {
    let data = tempfile::tempdir().unwrap();
    let redis = Redis::start(data.path(), free_port());
    let adapters = adapters_dir();
    let r1 = replica("r1", &redis.url(), adapters.path());
    let r2 = replica("r2", &redis.url(), adapters.path());
    balanced_rounds(&[&r1, &r2], 1000).await;
    let one = wait_for_fleet_count(&r1, 1000).await;
    let two = wait_for_fleet_count(&r2, 1000).await;
    let counts = drawn(&one);
    for (v, (&c, p)) in counts.iter().zip(TARGET).enumerate() {
        let expected = 1000.0 * p;
        // One shared schedule keeps the fleet within 1 − 1/(2K−2) of its
        // target; replicas balancing alone could only promise 2.
        assert!(
            (c as f64 - expected).abs() < 1.0,
            "value {v}: {c} vs {expected} ({counts:?})"
        );
    }
    assert_eq!(counts, drawn(&two), "both replicas report the fleet");
    assert_eq!(
        one["adapters"][0]["aggregate"][0]["n"],
        two["adapters"][0]["aggregate"][0]["n"]
    );
    assert_eq!(redis.counts("abc", "default").await, counts);
    let seen: Vec<&str> = one["fleet"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(seen, ["r1", "r2"]);
    let page = page(&r2).await;
    assert!(page.contains("Fleet of 2 replicas: r1"), "{page:.600}");
    assert_eq!(one["fleet"]["replica"], "r1");
    assert_eq!(two["fleet"]["replica"], "r2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_served_through_and_merged_back() {
    let data = tempfile::tempdir().unwrap();
    let redis = Redis::start(data.path(), free_port());
    let url = redis.url();
    let adapters = adapters_dir();
    let r1 = replica("r1", &url, adapters.path());
    let r2 = replica("r2", &url, adapters.path());
    balanced_rounds(&[&r1, &r2], 200).await;
    wait_for_fleet_count(&r1, 200).await;
    // Redis goes away mid-run; every request still succeeds.
    let (dir, port) = redis.kill();
    balanced_rounds(&[&r1, &r2], 200).await;
    let degraded = report(&r1).await;
    assert_eq!(degraded["state"], "degraded", "{degraded}");
    assert_eq!(degraded["fleet"]["degraded"], true);
    assert!(degraded["fleet"]["missing"].is_string());
    let page = page(&r1).await;
    assert!(page.contains("<b>Degraded</b> (replica r1)"), "{page:.600}");
    assert!(
        degraded["fleet"]["buffered_rounds"].as_u64().unwrap() > 0,
        "{degraded}"
    );
    let (status, reset) = {
        let r = reqwest::Client::new()
            .post(format!("{}/distribution/reset", r1.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(
        status, 503,
        "nothing is reset while the fleet is unreachable: {reset}"
    );
    // Redis returns with its data; the replicas reconnect and merge.
    let redis = Redis::start(&dir, port);
    let merged = wait_for_fleet_count(&r1, 400).await;
    assert_eq!(drawn(&merged), drawn(&wait_for_fleet_count(&r2, 400).await));
    assert_eq!(merged["fleet"]["buffered_rounds"], 0);
    assert_eq!(merged["fleet"]["dropped_rounds"], 0);
    balanced_rounds(&[&r1, &r2], 100).await;
    let after = wait_for_fleet_count(&r2, 500).await;
    assert_eq!(
        redis.counts("abc", "default").await.iter().sum::<u64>(),
        500
    );
    assert_eq!(drawn(&after).iter().sum::<u64>(), 500);
}

/// The draw script on its own, from two replicas' handles taking turns at
/// random: the shared counts stay within 1 − 1/(2K−2) of t·target at every
/// step, as the in-memory schedule does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_schedule_stays_within_its_bound_at_every_step() {
    use rand::{Rng, SeedableRng};
    use steerling::fleet::{Fleet, FleetConfig};
    let data = tempfile::tempdir().unwrap();
    let redis = Redis::start(data.path(), free_port());
    let handle = |id: &str| {
        let fleet = Fleet::new(FleetConfig {
            url: redis.url(),
            replica: id.into(),
            window_rounds: 100,
            window_time: Duration::from_secs(60),
        })
        .unwrap();
        fleet.start();
        fleet
    };
    let fleets = [handle("a"), handle("b")];
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleets.iter().any(|f| f.is_degraded()) {
        assert!(Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for k in [2usize, 3, 5] {
        let raw: Vec<f64> = (0..k).map(|_| rng.random::<f64>() + 0.05).collect();
        let target: Vec<f64> = raw.iter().map(|x| x / raw.iter().sum::<f64>()).collect();
        let bound = 1.0 - 1.0 / (2.0 * k as f64 - 2.0);
        let context = format!("k{k}");
        let mut counts = vec![0u64; k];
        for t in 1..=300u64 {
            let fleet = &fleets[rng.random_range(0..2)];
            let v = fleet.balanced_next("x", &context, &target, &mut rng).await;
            assert!(!fleet.is_degraded());
            counts[v] += 1;
            for (i, (&c, p)) in counts.iter().zip(&target).enumerate() {
                let deviation = (c as f64 - t as f64 * p).abs();
                assert!(
                    deviation <= bound + 1e-9,
                    "K={k} t={t} value {i}: {counts:?}"
                );
            }
        }
    }
}

/// Redis stalls (DEBUG SLEEP) instead of going away: calls time out, the
/// replica serves alone meanwhile, then reconnects and merges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_is_served_through() {
    let data = tempfile::tempdir().unwrap();
    let redis = Redis::start(data.path(), free_port());
    let adapters = adapters_dir();
    let r1 = replica("r1", &redis.url(), adapters.path());
    balanced_rounds(&[&r1], 20).await;
    wait_for_fleet_count(&r1, 20).await;
    let mut stall = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "DEBUG", "SLEEP", "3"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Served while Redis is still asleep: nobody waited for it.
    balanced_rounds(&[&r1], 20).await;
    let during = report(&r1).await;
    stall.wait().unwrap();
    assert_eq!(during["state"], "degraded", "{during}");
    wait_for_fleet_count(&r1, 40).await;
}
