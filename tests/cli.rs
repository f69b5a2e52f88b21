//! The `steerling` binary as a user runs it.

mod common;

use std::process::Command;

fn steerling() -> Command {
    Command::new(env!("CARGO_BIN_EXE_steerling"))
}

/// Runs `command`, which must succeed, and returns what it printed.
fn stdout_of(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn generate_answers_paris_on_smollm2() {
    common::smollm2();
    // Written as in the README: \n escapes inside the quoted prompt.
    let text = stdout_of(steerling().args([
        "generate",
        "--prompt",
        r"<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "--temperature",
        "0",
    ]));
    assert!(text.contains("Paris"), "{text:?}");
}

#[test]
fn generate_reports_a_missing_model_and_exits_non_zero() {
    let out = steerling()
        .args(["generate", "--model", "/nonexistent.gguf", "--prompt", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model not found: /nonexistent.gguf"), "{err}");
}

#[test]
fn generate_refuses_a_prompt_longer_than_the_context() {
    let model = common::tiny_gguf();
    let prompt = "word ".repeat(200);
    let out = steerling()
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--max-context",
            "64",
            "--prompt",
            &prompt,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("but the context holds 64"), "{err}");
}

#[test]
fn bench_reports_every_batch_size() {
    let model = common::tiny_gguf();
    let text = stdout_of(steerling().args([
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--decode-tokens",
        "8",
        "--prefill-tokens",
        "32",
    ]));
    for line in [
        "prefill:",
        "decode batch  1:",
        "decode batch  4:",
        "decode batch 16:",
        "candle-transformers quantized_llama",
    ] {
        assert!(text.contains(line), "missing {line:?} in {text}");
    }
}

/// `bench --steering` without a name measures both generated adapters (with
/// and without LoRA) over the number of pairs asked for; zero pairs is
/// refused as a usage error.
#[test]
fn bench_measures_the_cost_of_steering() {
    let model = common::tiny_gguf();
    let model = model.to_str().unwrap();
    let text = stdout_of(
        steerling()
            .args(["bench", "--model", model, "--batch", "1", "--rounds", "1"])
            .args([
                "--no-baseline",
                "--decode-tokens",
                "4",
                "--prefill-tokens",
                "16",
            ])
            .args(["--steering-pairs", "3", "--steering"]),
    );
    for label in ["rank-8 q/v LoRA", "no LoRA"] {
        let head = format!("steering (prior, {label}) vs off");
        let line = text
            .lines()
            .find(|l| l.starts_with(&head))
            .unwrap_or_else(|| panic!("no {head:?} in {text}"));
        assert!(line.contains("over 3 request pairs"), "{line}");
        let ratio: f64 = line
            .split(" = ")
            .nth(1)
            .and_then(|r| r.split('x').next())
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no ratio in {line}"));
        assert!(ratio > 0.2 && ratio < 5.0, "{line}");
        // The run's 95% interval holds its ratio.
        let interval: Vec<f64> = line
            .split("95% interval ")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .map(|r| {
                r.split(" to ")
                    .filter_map(|v| v.trim_end_matches('x').parse().ok())
            })
            .map(|vs| vs.collect())
            .unwrap_or_default();
        assert!(
            interval.len() == 2 && interval[0] <= ratio && ratio <= interval[1],
            "{line}"
        );
    }
    let refused = steerling()
        .args(["bench", "--model", model, "--steering-pairs", "0"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--steering-pairs"));
}

#[test]
fn train_writes_an_adapter_with_progress() {
    let model = common::tiny_gguf();
    let dir = tempfile::tempdir().unwrap();
    let data = serde_json::json!({
        "attribute": "letter",
        "values": [{"name": "v0", "patterns": ["alpha0"]}, {"name": "v1", "patterns": ["alpha1"]}],
        "targets": {"default": {"v0": 0.7, "v1": 0.3}},
        "prompts": [{"text": "Tell me about the nurse"}, {"text": "Hello there"}],
        "responses": {"v0": ["alpha0 said hello"], "v1": ["alpha1 said hello"]}
    });
    std::fs::write(dir.path().join("data.json"), data.to_string()).unwrap();
    let job = serde_json::json!({"name": "cli-made", "data": "data.json", "output": dir.path().join("out"), "settings": {"sft_steps": 2, "kl_steps": 2, "batch": 2, "rank": 2}});
    std::fs::write(dir.path().join("job.json"), job.to_string()).unwrap();
    let out = steerling()
        .args([
            "train",
            "--config",
            dir.path().join("job.json").to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("kl_kto") && stderr.contains("4/4"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("adapter written to"));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/cli-made/adapter.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["training"]["settings"]["kl_steps"], 2);
}
