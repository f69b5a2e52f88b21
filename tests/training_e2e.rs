//! Training end to end on the tiny model: the held-out prior moves toward
//! the target, the adapter is written atomically and serves.

mod common;

use std::collections::BTreeMap;
use steerling::model::{load_model, ModelSource};
use steerling::steering::adapter::{BaseModel, PromptFormat, Targets};
use steerling::steering::{BaseIdentity, Registry};
use steerling::training::data::{PromptSpec, TrainingData, ValueSpec};
use steerling::training::trainer::{train, write_adapter, TrainConfig};

fn data() -> TrainingData {
    let prompt = |t: &str| PromptSpec {
        text: t.to_string(),
        context: None,
    };
    let responses: BTreeMap<String, Vec<String>> = [
        (
            "v0",
            vec![
                "the nurse said alpha0 would help",
                "alpha0 went to the hospital",
                "a teacher and alpha0",
                "they wrote about alpha0",
            ],
        ),
        (
            "v1",
            vec![
                "the engineer said alpha1 would fix it",
                "alpha1 is a builder",
                "the farmer and alpha1",
                "alpha1 wrote a story",
            ],
        ),
        ("v2", vec!["alpha1 and also alpha0"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    TrainingData {
        attribute: "letter".into(),
        values: vec![
            ValueSpec {
                name: "v0".into(),
                token: None,
                patterns: vec!["alpha0".into()],
            },
            ValueSpec {
                name: "v1".into(),
                token: None,
                patterns: vec!["alpha1".into()],
            },
        ],
        targets: Targets {
            default: [("v0".to_string(), 0.8), ("v1".to_string(), 0.2)].into(),
            contexts: Default::default(),
        },
        prompt_format: PromptFormat {
            prefix: "<|im_start|>user\n".into(),
            suffix: "<|im_end|>\n<|im_start|>assistant\n".into(),
        },
        prompts: [
            "Tell me about the nurse",
            "A story about the teacher",
            "Who is the doctor",
            "The manager said",
            "Write about the farmer",
            "The builder and the family",
            "Hello there",
            "What is the capital",
        ]
        .iter()
        .map(|t| prompt(t))
        .collect(),
        held_out: [
            "The engineer went",
            "A doctor and a teacher",
            "Tell me a story",
            "Hello world",
        ]
        .iter()
        .map(|t| prompt(t))
        .collect(),
        responses,
    }
}

#[test]
fn training_moves_the_prior_to_the_target_and_the_adapter_serves() {
    let loaded = load_model(&ModelSource::Gguf(common::tiny_gguf()), 256).unwrap();
    let mut d = data();
    // Unknown values in responses are refused before any training.
    let err = train(
        &loaded.model,
        &loaded.tokenizer,
        d.clone(),
        &TrainConfig::default(),
        BaseModel {
            name: "tiny".into(),
            sha256: loaded.sha256.clone(),
        },
        |_| true,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("unknown value `v2`"), "{err}");
    d.responses.remove("v2");
    // A response whose words contradict its label is dropped and reported.
    d.responses
        .get_mut("v0")
        .unwrap()
        .push("only alpha1 here".into());
    let cfg = TrainConfig {
        sft_steps: 60,
        kl_steps: 60,
        batch: 8,
        learning_rate: 1e-2,
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        ..TrainConfig::default()
    };
    let mut steps = Vec::new();
    let trained = train(
        &loaded.model,
        &loaded.tokenizer,
        d,
        &cfg,
        BaseModel {
            name: "tiny".into(),
            sha256: loaded.sha256.clone(),
        },
        |p| {
            steps.push((p.stage.clone(), p.step, p.loss, p.kl));
            true
        },
    )
    .unwrap();
    assert_eq!(
        trained.data.dropped_contradicting,
        vec!["v0: only alpha1 here".to_string()]
    );
    // Measuring the untrained adapter, 120 steps, measuring the trained one.
    assert_eq!(steps.len(), 122);
    assert_eq!((steps[0].0.as_str(), steps[0].1), ("measure", 0));
    assert_eq!(steps[120].1, 120);
    assert_eq!(steps.last().unwrap().0, "measure");
    assert!(steps[1..].iter().all(|s| s.2.is_finite()));
    let record = &trained.config.training;
    let (before, after) = (
        record["held_out_prior_kl_before"].as_f64().unwrap(),
        record["held_out_prior_kl"].as_f64().unwrap(),
    );
    assert!(
        after <= before / 2.0,
        "held-out KL(target‖prior) {before} → {after}"
    );
    let (c0, c1) = (
        record["greedy_consistency_before"]["overall"]
            .as_f64()
            .unwrap(),
        record["greedy_consistency"]["overall"].as_f64().unwrap(),
    );
    // A random 2-layer model learns little in 120 steps, but greedy answers
    // do start to show the drawn value (0 → 0.125 with these seeds).
    assert!(c1 > c0, "greedy detection consistency {c0} → {c1}");
    let mae = record["held_out_prior_mae"].as_f64().unwrap();
    assert!(mae < record["held_out_prior_mae_before"].as_f64().unwrap());
    // Written atomically, it loads and serves with the trained prior.
    let dir = tempfile::tempdir().unwrap();
    let path = write_adapter(dir.path(), "trained", &trained).unwrap();
    assert!(path.join("adapter.json").exists() && path.join("adapter.safetensors").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "no temporary folders left: {leftovers:?}"
    );
    let registry = Registry::new(
        dir.path().to_path_buf(),
        BaseIdentity {
            name: "tiny".into(),
            sha256: loaded.sha256.clone(),
        },
        loaded.model.config.clone(),
    );
    let adapter = registry.load("trained").unwrap();
    assert_eq!(adapter.config.value_names(), vec!["v0", "v1"]);
    // Writing again replaces the adapter and keeps the folder's other files.
    std::fs::write(path.join("README.md"), "how it was made").unwrap();
    std::fs::write(path.join("adapter.json"), "{ damaged").unwrap();
    write_adapter(dir.path(), "trained", &trained).unwrap();
    assert!(registry.load("trained").is_ok());
    assert_eq!(
        std::fs::read_to_string(path.join("README.md")).unwrap(),
        "how it was made"
    );
}
