//! Steering over HTTP on the tiny model with hand-built adapters: the draw
//! under each policy, hidden tokens, contexts, reproducibility, adapters as
//! models, damage, swaps, and the distribution report.

mod common;

use common::server::{sse_data, Options, TestServer};
use serde_json::{json, Value};
use steerling::model::{load_model, ModelSource};
use steerling::testing::{write_test_adapter, TestAdapter};

/// A server on the tiny model with the given adapters written to a folder.
async fn server_with(
    adapters: &[(&str, TestAdapter)],
    tweak: impl FnOnce(&mut Options),
) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_model(&ModelSource::Gguf(common::tiny_gguf()), 256).unwrap();
    for (name, spec) in adapters {
        write_test_adapter(dir.path(), name, &loaded.model.config, &loaded.sha256, spec).unwrap();
    }
    let mut opts = Options {
        adapters: Some(dir.path().to_path_buf()),
        max_batch: 16,
        ..Options::default()
    };
    tweak(&mut opts);
    (TestServer::start(opts).await, dir)
}

async fn complete(s: &TestServer, body: Value) -> Value {
    let (status, v) = s.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    v
}

fn drawn(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["steering"]["value"].as_str().unwrap().to_string())
        .collect()
}

/// Pearson statistic against probabilities, and the p-value.
fn chi2_p(counts: &[u64], probs: &[f64]) -> f64 {
    steerling::monitor::stats::chi_square(counts, probs).2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prior_and_target_policies_match_their_distributions() {
    let spec = TestAdapter {
        values: 3,
        head_scale: 0.15,
        default_target: vec![0.2, 0.3, 0.5],
        ..Default::default()
    };
    let (s, _dir) = server_with(&[("abc", spec)], |_| {}).await;
    let prompt = "The nurse said";
    for (policy, rounds) in [("prior", 2000), ("target", 2000)] {
        let mut counts = [0u64; 3];
        let mut prior: Option<Vec<f64>> = None;
        for seed in 0..rounds / 16 {
            let body = json!({"model": "abc", "prompt": prompt, "max_tokens": 1, "n": 16, "seed": seed,
                              "steering": {"policy": policy, "return": true}});
            let v = complete(&s, body).await;
            for c in v["choices"].as_array().unwrap() {
                let value = c["steering"]["value"].as_str().unwrap();
                counts[value[1..].parse::<usize>().unwrap()] += 1;
                let p: Vec<f64> = (0..3)
                    .map(|i| c["steering"]["prior"][format!("v{i}")].as_f64().unwrap())
                    .collect();
                if let Some(q) = &prior {
                    assert!(
                        p.iter().zip(q).all(|(a, b)| (a - b).abs() < 1e-9),
                        "the same prompt has the same prior"
                    );
                }
                prior = Some(p);
                assert_eq!(c["steering"]["policy"], policy);
            }
        }
        let prior = prior.unwrap();
        assert!((prior.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(
            prior.iter().all(|&p| p > 0.02 && p < 0.98),
            "a non-trivial prior: {prior:?}"
        );
        let expected = if policy == "prior" {
            prior.clone()
        } else {
            vec![0.2, 0.3, 0.5]
        };
        let p = chi2_p(&counts, &expected);
        assert!(
            p > 0.001,
            "{policy}: counts {counts:?} vs {expected:?}: p = {p}"
        );
        // And the other distribution is rejected when it differs enough.
        if policy == "target" {
            assert!(
                chi2_p(&counts, &prior) < 0.001
                    || prior
                        .iter()
                        .zip(&expected)
                        .all(|(a, b)| (a - b).abs() < 0.05)
            );
        }
    }
}

/// An adapter's prior calibration is what the draw uses: the same weights
/// with `scale` s and biases b give softmax(s·z + b), i.e. the uncalibrated
/// prior raised to s, times e^b, renormalized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_draw_uses_the_calibrated_prior() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_model(&ModelSource::Gguf(common::tiny_gguf()), 256).unwrap();
    let spec = TestAdapter {
        head_scale: 0.05,
        ..Default::default()
    };
    for name in ["raw", "cal"] {
        write_test_adapter(
            dir.path(),
            name,
            &loaded.model.config,
            &loaded.sha256,
            &spec,
        )
        .unwrap();
    }
    let config = dir.path().join("cal/adapter.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    v["prior_calibration"] = json!({"scale": 2.0, "bias": {"v0": 0.5, "v1": -0.5}});
    std::fs::write(&config, v.to_string()).unwrap();
    let s = TestServer::start(Options {
        adapters: Some(dir.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let mut priors = Vec::new();
    for name in ["raw", "cal"] {
        let body = json!({"model": name, "prompt": "The nurse said", "max_tokens": 1,
                          "steering": {"return": true}});
        let c = &complete(&s, body).await["choices"][0]["steering"]["prior"];
        priors.push([c["v0"].as_f64().unwrap(), c["v1"].as_f64().unwrap()]);
    }
    let [raw, cal] = [priors[0], priors[1]];
    let unnormalized = [
        raw[0].powi(2) * 0.5f64.exp(),
        raw[1].powi(2) * (-0.5f64).exp(),
    ];
    let total: f64 = unnormalized.iter().sum();
    for k in 0..2 {
        assert!(
            (cal[k] - unnormalized[k] / total).abs() < 1e-6,
            "raw {raw:?}, calibrated {cal:?}"
        );
    }
    assert!(
        (cal[0] - raw[0]).abs() > 0.05,
        "the calibration changes the prior"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_keeps_counts_within_one_at_every_step() {
    let targets: [&[f64]; 3] = [
        &[0.73, 0.27],
        &[0.5, 0.3, 0.2],
        &[0.05, 0.4, 0.15, 0.1, 0.3],
    ];
    let adapters: Vec<(String, TestAdapter)> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                format!("k{}", t.len()),
                TestAdapter {
                    values: t.len(),
                    default_target: t.to_vec(),
                    seed: i as u64 + 1,
                    ..Default::default()
                },
            )
        })
        .collect();
    let named: Vec<(&str, TestAdapter)> = adapters
        .iter()
        .map(|(n, a)| {
            (
                n.as_str(),
                TestAdapter {
                    default_target: a.default_target.clone(),
                    values: a.values,
                    seed: a.seed,
                    ..Default::default()
                },
            )
        })
        .collect();
    let (s, _dir) = server_with(&named, |_| {}).await;
    for (name, a) in &adapters {
        let k = a.values;
        let mut counts = vec![0u64; k];
        for t in 1..=150u64 {
            let v = complete(&s, json!({"model": name, "prompt": "Hello", "max_tokens": 1, "steering": {"policy": "balanced", "return": true}})).await;
            let value = &drawn(&v)[0];
            counts[value[1..].parse::<usize>().unwrap()] += 1;
            for i in 0..k {
                let dev = (counts[i] as f64 - t as f64 * a.default_target[i]).abs();
                assert!(dev < 1.0, "{name} t={t}: {counts:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_is_the_base_model_and_the_steering_token_never_shows() {
    let (s, _dir) = server_with(&[("ab", TestAdapter::default())], |_| {}).await;
    let base = complete(
        &s,
        json!({"prompt": "The engineer", "max_tokens": 12, "seed": 9, "logprobs": 2}),
    )
    .await;
    let off = complete(&s, json!({"model": "ab", "prompt": "The engineer", "max_tokens": 12, "seed": 9, "logprobs": 2, "steering": {"policy": "off", "return": true}})).await;
    assert_eq!(off["choices"][0]["text"], base["choices"][0]["text"]);
    assert!(off["choices"][0].get("steering").is_none());
    assert_eq!(off["model"], "ab");
    // Steered: nothing of the hidden token in text, logprobs, echo, usage or stream.
    let tok = s.engine().tokenizer();
    let vocab = s.engine().vocab_size();
    let prompt_len = tok.encode("The engineer", true).unwrap().len();
    for body in [
        json!({"model": "ab", "prompt": "The engineer", "max_tokens": 12, "seed": 1, "logprobs": 5, "echo": true}),
        json!({"model": "ab", "prompt": "The engineer", "max_tokens": 12, "seed": 2, "logprobs": 5}),
    ] {
        let v = complete(&s, body.clone()).await;
        let text = v.to_string();
        assert!(!text.contains("<steer"), "{text}");
        let lp = &v["choices"][0]["logprobs"];
        let echo = body["echo"].as_bool().unwrap_or(false);
        assert_eq!(
            lp["tokens"].as_array().unwrap().len(),
            12 + if echo { prompt_len } else { 0 }
        );
        assert_eq!(v["usage"]["completion_tokens"], 12);
        assert_eq!(v["usage"]["prompt_tokens"], prompt_len);
        if echo {
            assert!(v["choices"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with("The engineer"));
        }
    }
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "ab", "prompt": "The engineer", "max_tokens": 12, "seed": 1, "stream": true, "logprobs": 5, "echo": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    assert!(!body.contains("<steer"));
    let chunks = sse_data(&body);
    let usage: Value = serde_json::from_str(&chunks[chunks.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    // Token ids past the vocabulary (the steering tokens) cannot be sent in.
    let bad = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "ab", "prompt": [vocab as u32]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // The chat path, too.
    let chat: Value = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "ab", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "logprobs": true, "top_logprobs": 5, "steering": {"return": true}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!chat.to_string().contains("<steer"));
    // One entry per visible token (the turn may end before max_tokens).
    assert_eq!(
        chat["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .len() as u64,
        chat["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert!(chat["choices"][0]["steering"]["value"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_draw_and_text_and_contexts_pick_targets() {
    let spec = TestAdapter {
        contexts: vec![
            ("nurse".into(), vec![1.0, 0.0]),
            ("head nurse".into(), vec![0.0, 1.0]),
        ],
        ..Default::default()
    };
    let (s, _dir) = server_with(&[("ab", spec)], |_| {}).await;
    let body = json!({"model": "ab", "prompt": "A story about a farmer", "max_tokens": 10, "seed": 77, "n": 4, "steering": {"return": true}});
    let a = complete(&s, body.clone()).await;
    let b = complete(&s, body).await;
    assert_eq!(drawn(&a), drawn(&b));
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["choices"][0]["steering"]["context"], "default");
    // The longest context name in the prompt wins; target policy then follows it.
    let v = complete(&s, json!({"model": "ab", "prompt": "The head nurse said", "max_tokens": 1, "n": 8, "steering": {"policy": "target", "return": true}})).await;
    assert_eq!(v["choices"][0]["steering"]["context"], "head nurse");
    assert!(drawn(&v).iter().all(|d| d == "v1"));
    let v = complete(&s, json!({"model": "ab", "prompt": "The Nurse said", "max_tokens": 1, "n": 8, "steering": {"policy": "target", "return": true}})).await;
    assert!(drawn(&v).iter().all(|d| d == "v0"));
    // An explicit context overrides; an unknown one is refused.
    let v = complete(&s, json!({"model": "ab", "prompt": "The nurse said", "max_tokens": 1, "n": 8, "steering": {"policy": "target", "context": "head nurse", "return": true}})).await;
    assert!(drawn(&v).iter().all(|d| d == "v1"));
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "ab", "prompt": "x", "steering": {"context": "pilot"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "steering.context");
    // Steering options on the base model are refused; best_of with an adapter too.
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "x", "steering": {"policy": "balanced"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "ab", "prompt": "x", "best_of": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_are_models_and_leave_the_base_untouched() {
    let (s, _dir) = server_with(&[("ab", TestAdapter::default())], |_| {}).await;
    let before = complete(
        &s,
        json!({"prompt": "The teacher", "max_tokens": 10, "temperature": 0}),
    )
    .await;
    assert_eq!(s.model_ids().await, ["tiny", "ab"]);
    let models: Value = s.get_json("/v1/models").await;
    assert_eq!(models["data"][1]["parent"], "tiny");
    let steered = complete(
        &s,
        json!({"model": "ab", "prompt": "The teacher", "max_tokens": 10, "temperature": 0}),
    )
    .await;
    assert_ne!(
        steered["choices"][0]["text"], before["choices"][0]["text"],
        "the adapter changes generation"
    );
    let after = complete(
        &s,
        json!({"prompt": "The teacher", "max_tokens": 10, "temperature": 0}),
    )
    .await;
    assert_eq!(
        after["choices"][0]["text"], before["choices"][0]["text"],
        "the base model is unchanged"
    );
    let list: Value = reqwest::get(s.url("/adapters"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["name"], "ab");
    assert_eq!(list["data"][0]["values"], json!(["v0", "v1"]));
}

/// The same adapter machinery on an f32 Hugging Face folder base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_apply_on_f32_bases_too() {
    let model_dir = tempfile::tempdir().unwrap();
    steerling::testing::write_tiny_hf(
        model_dir.path(),
        &steerling::testing::TinySpec::default(),
        candle_core::DType::F32,
    )
    .unwrap();
    let loaded = load_model(&ModelSource::HfFolder(model_dir.path().to_path_buf()), 256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_test_adapter(
        dir.path(),
        "hf",
        &loaded.model.config,
        &loaded.sha256,
        &TestAdapter::default(),
    )
    .unwrap();
    let s = TestServer::start(Options {
        model: model_dir.path().to_path_buf(),
        adapters: Some(dir.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let base = complete(
        &s,
        json!({"prompt": "The teacher", "max_tokens": 10, "temperature": 0}),
    )
    .await;
    let steered = complete(&s, json!({"model": "hf", "prompt": "The teacher", "max_tokens": 10, "temperature": 0, "steering": {"return": true}})).await;
    assert!(steered["choices"][0]["steering"]["value"].is_string());
    assert_ne!(steered["choices"][0]["text"], base["choices"][0]["text"]);
    let again = complete(
        &s,
        json!({"prompt": "The teacher", "max_tokens": 10, "temperature": 0}),
    )
    .await;
    assert_eq!(again["choices"][0]["text"], base["choices"][0]["text"]);
}
