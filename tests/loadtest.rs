//! The load generator against a real server on the tiny model: every
//! request is counted and timed, load goes to loopback only, and the
//! distribution mode reports the draw per context and policy.

mod common;

use common::server::{Options, TestServer};
use serde_json::{json, Value};
use std::process::Command;
use steerling::model::{load_model, ModelSource};
use steerling::testing::{write_test_adapter, TestAdapter};

fn loadtest(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_steerling-loadtest"))
        .args(args)
        .output()
        .unwrap()
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_counts_and_times_every_request() {
    let s = TestServer::start(Options::default()).await;
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap().to_string();
    let base = s.base.clone();
    for (label, mode) in [
        ("closed", vec!["--concurrency", "4"]),
        ("poisson", vec!["--rate", "40"]),
    ] {
        let mut args = vec![
            "run",
            "--url",
            &base,
            "--requests",
            "12",
            "--max-tokens",
            "8",
            "--prompt-words",
            "10",
            "--warmup",
            "1",
            "--out",
            &dir,
            "--label",
            label,
        ];
        args.extend(mode);
        let o = tokio::task::block_in_place(|| loadtest(&args));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = read_json(&out.path().join(format!("{label}.json")));
        assert_eq!(r["completed"], 12, "{r}");
        assert_eq!(r["failed"], 0, "{r}");
        // ignore_eos: every request generates exactly max_tokens.
        assert_eq!(r["output_tokens"], 96, "{r}");
        assert_eq!(r["ttft_ms"]["count"], 12);
        assert_eq!(r["tpot_ms"]["count"], 12);
        let ttft = &r["ttft_ms"];
        assert!(ttft["p50"].as_f64().unwrap() <= ttft["p99"].as_f64().unwrap());
        assert!(r["e2e_ms"]["mean"].as_f64().unwrap() >= ttft["mean"].as_f64().unwrap());
        assert!(r["mean_prompt_tokens"].as_f64().unwrap() >= 10.0);
        let md = std::fs::read_to_string(out.path().join(format!("{label}.md"))).unwrap();
        assert!(md.contains(&format!("| {label} |")), "{md}");
    }
}

#[test]
fn load_goes_to_loopback_only() {
    let o = loadtest(&["run", "--url", "http://10.1.2.3:8080", "--requests", "1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("loopback"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribution_reports_each_policy_per_context() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_model(&ModelSource::Gguf(common::tiny_gguf()), 256).unwrap();
    let spec = TestAdapter {
        contexts: vec![
            ("apples".into(), vec![0.2, 0.8]),
            ("pears".into(), vec![0.7, 0.3]),
        ],
        ..TestAdapter::default()
    };
    write_test_adapter(
        dir.path(),
        "fruit",
        &loaded.model.config,
        &loaded.sha256,
        &spec,
    )
    .unwrap();
    let folder = dir.path().join("fruit");
    let prompts = json!([
        {"text": "a story about apples", "context": "apples"},
        {"text": "more on apples", "context": "apples"},
        {"text": "a story about pears", "context": "pears"},
    ]);
    std::fs::write(folder.join("eval_prompts.json"), prompts.to_string()).unwrap();
    let s = TestServer::start(Options {
        adapters: Some(dir.path().to_path_buf()),
        max_batch: 16,
        ..Options::default()
    })
    .await;
    let out = dir.path().join("report");
    let args = [
        "distribution",
        "--url",
        &s.base,
        "--adapter",
        folder.to_str().unwrap(),
        "--rounds",
        "20",
        "--policies",
        "off,balanced",
        "--max-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = tokio::task::block_in_place(|| loadtest(&args));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = read_json(&out.join("results.json"));
    let policies = r["policies"].as_array().unwrap();
    let (off, balanced) = (&policies[0], &policies[1]);
    assert_eq!(off["rounds"], 40);
    assert!(off["consistency"].is_null(), "off draws nothing");
    assert_eq!(balanced["rounds"], 40);
    // balanced keeps every value within one round of n·target: 4 and 16 of
    // 20 for apples, 14 and 6 for pears.
    let apples = &balanced["contexts"]["apples"]["drawn"];
    assert_eq!(
        (apples["v0"].as_u64(), apples["v1"].as_u64()),
        (Some(4), Some(16)),
        "{apples}"
    );
    let pears = &balanced["contexts"]["pears"]["drawn"];
    assert_eq!(
        (pears["v0"].as_u64(), pears["v1"].as_u64()),
        (Some(14), Some(6)),
        "{pears}"
    );
    assert_eq!(balanced["drawn_mae"].as_f64().unwrap(), 0.0);
    assert_eq!(balanced["convergence"].as_array().unwrap().len(), 20);
    let svg = std::fs::read_to_string(out.join("convergence.svg")).unwrap();
    assert!(svg.contains("<polyline") && svg.contains("balanced"));
    assert!(out.join("shares-balanced.svg").exists());
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| apples | 0.20 |"), "{md}");
}
