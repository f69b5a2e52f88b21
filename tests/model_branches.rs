//! Branch rows: candidates for the next position, run in the same step as
//! the rows before them, give what feeding each candidate afterwards gives.

mod common;

use candle_core::{Device, Tensor};
use common::segment;
use steerling::model::{
    load_model, LoadedModel, Logits, Lora, LoraSet, Model, ModelSource, ProjKind, Segment,
};

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

/// The tiny model, a random LoRA for it, and a prompt.
fn tiny_with_lora() -> (LoadedModel, LoraSet, Vec<u32>) {
    let loaded = load_model(&ModelSource::from_path(&common::tiny_gguf()).unwrap(), 256).unwrap();
    let lora = random_lora(&loaded.model);
    let prompt = loaded
        .tokenizer
        .encode("The nurse said that she", true)
        .unwrap();
    (loaded, lora, prompt)
}

/// Runs one step; returns each segment's logits as rows.
fn step(model: &Model, segs: &mut [Segment]) -> Vec<Vec<Vec<f32>>> {
    model
        .forward(segs)
        .unwrap()
        .into_iter()
        .map(|out| out.rows.to_vec2::<f32>().unwrap())
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
    let (loaded, lora, prompt) = tiny_with_lora();
    let model = &loaded.model;
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

/// A step that draws: the prompt's last row is scored against the extra
/// head (an adapter's steering tokens) and not over the vocabulary, while
/// its branch rows get their vocabulary logits as usual.
#[test]
fn a_drawing_row_is_scored_against_the_extra_head_only() {
    let (loaded, lora, prompt) = tiny_with_lora();
    let model = &loaded.model;
    // The tied head's own rows for two of the prompt's tokens (some ids
    // have zero rows): as an extra head, they must score the last row as
    // the vocabulary head scores those tokens.
    let tokens = [prompt[1], prompt[2]];
    let ids = Tensor::new(&tokens[..], &Device::Cpu).unwrap();
    let extra_head = model.embeddings().index_select(&ids, 0).unwrap();
    let candidate_rows = model.embed_tokens(&[13, 17]).unwrap();

    let mut cache = model.new_cache();
    let mut seg = segment(model, &prompt, &mut cache, Some(&lora));
    seg.extra_head = Some(&extra_head);
    let last = model.forward(&mut [seg]).unwrap().remove(0);
    let vocab_row = last.rows.to_vec2::<f32>().unwrap().remove(0);
    let extra = last.extra.expect("the extra head's logits");
    let scale = vocab_row.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (&token, &got) in tokens.iter().zip(&extra) {
        let want = vocab_row[token as usize];
        // The vocabulary head runs on 8-bit activations; the extra head on floats.
        assert!(
            (got - want).abs() <= 0.02 * scale,
            "token {token}: {got} against {want} (scale {scale})"
        );
    }

    let (mut drawing, mut other) = (model.new_cache(), model.new_cache());
    let mut seg = segment(model, &prompt, &mut drawing, Some(&lora));
    seg.extra_head = Some(&extra_head);
    seg.logits = Logits::None;
    seg.branches = Some(&candidate_rows);
    let out = model
        .forward(&mut [segment(model, &[7, 8], &mut other, None), seg])
        .unwrap();
    assert!(out[0].extra.is_none(), "no extra head, no extra logits");
    assert_eq!(out[0].rows.dims(), &[1, model.config.vocab_size]);
    assert_eq!(
        out[1].rows.dims(),
        &[2, model.config.vocab_size],
        "the branch rows only"
    );
    assert_close(
        out[1].extra.as_deref().unwrap(),
        &extra,
        "the drawing row's extra logits",
    );
}
