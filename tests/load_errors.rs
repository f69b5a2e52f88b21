//! Broken or unsupported models are refused with a clear error, never a panic.

mod common;

use steerling::model::{load_model, ModelSource};
use steerling::testing::{write_tiny_gguf, write_tiny_hf, TinySpec};

fn load_err(source: ModelSource) -> String {
    match load_model(&source, 256) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn missing_model_is_named() {
    let err = ModelSource::from_path(std::path::Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(
        err.to_string()
            .contains("model not found: /nonexistent/model.gguf"),
        "{err}"
    );
}

#[test]
fn truncated_gguf_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(common::tiny_gguf()).unwrap();
    for keep in [bytes.len() / 2, 100, 3] {
        let path = dir.path().join(format!("cut-{keep}.gguf"));
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = load_err(ModelSource::Gguf(path));
        assert!(err.contains("cannot load GGUF model"), "{err}");
    }
}

#[test]
fn not_a_gguf_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.gguf");
    std::fs::write(&path, "just some text, not a model").unwrap();
    let err = load_err(ModelSource::Gguf(path));
    assert!(err.contains("not a readable GGUF file"), "{err}");
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("falcon.gguf");
    let spec = TinySpec {
        architecture: "falcon",
        ..TinySpec::default()
    };
    write_tiny_gguf(&path, &spec, candle_core::quantized::GgmlDType::F32).unwrap();
    let err = load_err(ModelSource::Gguf(path));
    assert!(err.contains("unsupported architecture `falcon`"), "{err}");

    let folder = dir.path().join("neox");
    write_tiny_hf(&folder, &TinySpec::default(), candle_core::DType::F32).unwrap();
    let config = std::fs::read_to_string(folder.join("config.json")).unwrap();
    std::fs::write(
        folder.join("config.json"),
        config.replace("\"llama\"", "\"gpt_neox\""),
    )
    .unwrap();
    let err = load_err(ModelSource::HfFolder(folder));
    assert!(err.contains("unsupported architecture `gpt_neox`"), "{err}");
}

#[test]
fn hf_folder_missing_a_tensor_or_with_wrong_shapes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(dir.path(), &TinySpec::default(), candle_core::DType::F32).unwrap();
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    // Claim three layers where the weights have two.
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    let err = load_err(ModelSource::HfFolder(dir.path().to_path_buf()));
    assert!(err.contains("missing tensor `model.layers.2."), "{err}");
    // Claim a wider MLP than the weights have.
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"intermediate_size\": 128", "\"intermediate_size\": 256"),
    )
    .unwrap();
    let err = load_err(ModelSource::HfFolder(dir.path().to_path_buf()));
    assert!(err.contains("expected [256, 64]"), "{err}");
}

#[test]
fn hf_folder_in_bf16_and_f16_loads() {
    for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_hf(dir.path(), &TinySpec::default(), dtype).unwrap();
        let loaded = load_model(&ModelSource::HfFolder(dir.path().to_path_buf()), 256).unwrap();
        assert_eq!(loaded.model.config.num_layers, 2);
    }
}
