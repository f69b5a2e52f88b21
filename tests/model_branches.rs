//! Branch rows: candidates for the next position, run in the same step as
//! the rows before them, give what feeding each candidate afterwards gives.

mod common;

use candle_core::{Device, Tensor};
use common::segment;
use steerling::model::{load_model, Lora, LoraSet, Model, ModelSource, ProjKind, Segment};

/// Random rank-4 LoRA on q and v of every layer.
fn random_lora(model: &Model) -> LoraSet {
    let cfg = &model.config;
    let dev = Device::Cpu;
    let q_out = cfg.num_heads * cfg.head_dim;
    let v_out = cfg.num_kv_heads * cfg.head_dim;
    let lora = |out: usize| {
        let a = Tensor::randn(0f32, 0.1, (4, cfg.hidden_size), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, (out, 4), &dev).unwrap();
        Lora::new(&a, &b, 2.0).unwrap()
    };
    LoraSet::new(
        (0..cfg.num_layers)
            .map(|_| {
                let mut projs: [Option<Lora>; 7] = Default::default();
                projs[ProjKind::Q.index()] = Some(lora(q_out));
                projs[ProjKind::V.index()] = Some(lora(v_out));
                projs
            })
            .collect(),
    )
}

/// Runs one step; returns each segment's logits as rows.
fn step(model: &Model, segs: &mut [Segment]) -> Vec<Vec<Vec<f32>>> {
    model
        .forward(segs)
        .unwrap()
        .into_iter()
        .map(|t| t.to_vec2::<f32>().unwrap())
        .collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        scale > 0.0 && diff <= 1e-5 * scale,
        "{what}: max diff {diff} at scale {scale}"
    );
}

#[test]
fn branches_match_feeding_each_candidate_after_the_rows() {
    let loaded = load_model(&ModelSource::from_path(&common::tiny_gguf()).unwrap(), 256).unwrap();
    let model = &loaded.model;
    let lora = random_lora(model);
    let prompt = loaded
        .tokenizer
        .encode("The nurse said that she", true)
        .unwrap();
    let other_prompt = loaded.tokenizer.encode("Hello there", true).unwrap();
    let candidates = [5u32, 9, 13];
    let candidate_rows = model.embed_tokens(&candidates).unwrap();

    // Another sequence decodes in the same step, without LoRA, ahead of
    // the branched one, so row offsets and per-segment LoRA are exercised.
    let mut other = model.new_cache();
    step(
        model,
        &mut [segment(model, &other_prompt, &mut other, None)],
    );
    let mut branched = model.new_cache();
    let mut seg = segment(model, &prompt, &mut branched, Some(&lora));
    seg.branches = Some(&candidate_rows);
    let out = step(model, &mut [segment(model, &[7], &mut other, None), seg]);
    assert_eq!(out[0].len(), 1);
    assert_eq!(
        out[1].len(),
        1 + candidates.len(),
        "last row, then one per branch"
    );
    assert_eq!(branched.len(), prompt.len(), "branches are not cached");
    assert_eq!(branched.branch_count(), candidates.len());

    for (i, &candidate) in candidates.iter().enumerate() {
        let mut reference = model.new_cache();
        let last = step(
            model,
            &mut [segment(model, &prompt, &mut reference, Some(&lora))],
        );
        assert_close(&out[1][0], &last[0][0], "the prompt's last row");
        let fed = step(
            model,
            &mut [segment(model, &[candidate], &mut reference, Some(&lora))],
        );
        assert_close(&out[1][1 + i], &fed[0][0], &format!("branch {i}"));

        // Keeping the branch leaves the cache the sequence would have had.
        let mut kept = branched.clone();
        kept.keep_branch(i).unwrap();
        assert_eq!(kept.len(), prompt.len() + 1);
        assert_eq!(kept.branch_count(), 0);
        let after_kept = step(model, &mut [segment(model, &[11], &mut kept, Some(&lora))]);
        let after_fed = step(
            model,
            &mut [segment(model, &[11], &mut reference, Some(&lora))],
        );
        assert_close(
            &after_kept[0][0],
            &after_fed[0][0],
            &format!("the step after keeping branch {i}"),
        );
    }
    assert!(branched.clone().keep_branch(candidates.len()).is_err());
}
