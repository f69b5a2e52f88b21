//! LoRA on every projection: a model with an update gives what the same
//! model with the update merged into its weights gives, on an f32 base (the
//! dense path) and on an 8-bit GGUF base (the block kernels, where the
//! update runs inside the projections' own matmul), for a segment that has
//! the update beside one in the same step that has none.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::segment;
use std::collections::HashMap;
use std::path::Path;
use steerling::model::{load_model, Lora, LoraSet, Model, ModelSource, ProjKind};
use steerling::testing::{write_tiny_gguf, write_tiny_gguf_edited, write_tiny_hf, TinySpec};

const RANK: usize = 4;
const SCALE: f64 = 2.0;
const PROMPT: [u32; 6] = [5, 40, 41, 300, 17, 260];

/// A fixed spread of values in about −0.5..0.5 (the test is deterministic).
fn values(shape: (usize, usize), seed: &mut u64) -> Tensor {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A (rank, in) and B (out, rank) for every projection of every layer.
fn random_updates(model: &Model) -> Vec<Vec<(ProjKind, Tensor, Tensor)>> {
    let cfg = &model.config;
    let mut seed = 7;
    (0..cfg.num_layers)
        .map(|_| {
            ProjKind::ALL
                .iter()
                .map(|&kind| {
                    let (out, input) = cfg.proj_shape(kind);
                    let a = values((RANK, input), &mut seed);
                    let b = values((out, RANK), &mut seed);
                    (kind, a, b)
                })
                .collect()
        })
        .collect()
}

fn lora_set(updates: &[Vec<(ProjKind, Tensor, Tensor)>]) -> LoraSet {
    LoraSet::new(
        updates
            .iter()
            .map(|layer| {
                let mut projs: [Option<Lora>; 7] = Default::default();
                for (kind, a, b) in layer {
                    projs[kind.index()] = Some(Lora::new(a, b, SCALE).unwrap());
                }
                projs
            })
            .collect(),
    )
}

/// `w` (a weight by its Hugging Face name) with its update, scale · B A,
/// added, if it has one.
fn merge(
    name: &str,
    w: Tensor,
    updates: &[Vec<(ProjKind, Tensor, Tensor)>],
) -> anyhow::Result<Tensor> {
    for (l, layer) in updates.iter().enumerate() {
        for (kind, a, b) in layer {
            let block = match kind {
                ProjKind::Q | ProjKind::K | ProjKind::V | ProjKind::O => "self_attn",
                _ => "mlp",
            };
            if name == format!("model.layers.{l}.{block}.{}.weight", kind.hf_name()) {
                return Ok((w + (b.matmul(a)? * SCALE)?)?);
            }
        }
    }
    Ok(w)
}

/// A copy of the f32 folder `from` with the updates merged into its weights.
fn write_merged(from: &Path, to: &Path, updates: &[Vec<(ProjKind, Tensor, Tensor)>]) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    let file = to.join("model.safetensors");
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, w)| {
            let merged = merge(&name, w, updates).unwrap();
            (name, merged)
        })
        .collect();
    candle_core::safetensors::save(&tensors, &file).unwrap();
}

/// The last row's logits of PROMPT, run beside a second sequence (without
/// the update) in the same step.
fn logits(model: &Model, lora: Option<&LoraSet>) -> Vec<f32> {
    let (mut with, mut other) = (model.new_cache(), model.new_cache());
    let mut segs = [
        segment(model, &[9, 8, 7], &mut other, None),
        segment(model, &PROMPT, &mut with, lora),
    ];
    let out = model.forward(&mut segs).unwrap();
    out[1].rows.flatten_all().unwrap().to_vec1().unwrap()
}

fn norm(v: impl Iterator<Item = f32>) -> f32 {
    v.map(|x| x * x).sum::<f32>().sqrt()
}

/// How far `base` with the updates is from `merged`, relative to how far
/// the updates moved the logits (`base` to `merged`).
fn update_error(base: &Model, merged: &Model, set: &LoraSet) -> f32 {
    let (want, plain) = (logits(merged, None), logits(base, None));
    let got = logits(base, Some(set));
    let moved = norm(want.iter().zip(&plain).map(|(w, b)| w - b));
    assert!(
        moved > 1.0,
        "the update should move the logits (moved {moved})"
    );
    norm(got.iter().zip(want).map(|(g, w)| g - w)) / moved
}

#[test]
fn lora_on_every_projection_matches_merged_weights() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let base_dir = dir.path().join("base");
    write_tiny_hf(&base_dir, &spec, DType::F32).unwrap();
    let base = load_model(&ModelSource::HfFolder(base_dir.clone()), 64).unwrap();
    let updates = random_updates(&base.model);
    let set = lora_set(&updates);
    let merged_dir = dir.path().join("merged");
    write_merged(&base_dir, &merged_dir, &updates);
    let merged = load_model(&ModelSource::HfFolder(merged_dir), 64).unwrap();

    // 8-bit A, B and input: about 1% of the update.
    let err = update_error(&base.model, &merged.model, &set);
    assert!(err < 0.05, "f32 base: {err}");

    // The block kernels (Q8_0, as the default model's head): the merged
    // weights are quantized too, which costs far less than the update.
    let gguf = dir.path().join("base.gguf");
    write_tiny_gguf(&gguf, &spec, GgmlDType::Q8_0).unwrap();
    let merged_gguf = dir.path().join("merged.gguf");
    write_tiny_gguf_edited(&merged_gguf, &spec, GgmlDType::Q8_0, |name, w| {
        merge(name, w, &updates)
    })
    .unwrap();
    let quantized = load_model(&ModelSource::Gguf(gguf), 64).unwrap();
    let q_merged = load_model(&ModelSource::Gguf(merged_gguf), 64).unwrap();
    let err = update_error(&quantized.model, &q_merged.model, &set);
    assert!(err < 0.05, "Q8_0 base: {err}");
}
