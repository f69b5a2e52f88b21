//! The training forward agrees with the serving model, and every trainable
//! tensor gets the gradient finite differences give (in f64).

mod common;

use candle_core::{DType, Device, Tensor};
use steerling::model::{load_model, Logits, ModelSource, ProjKind, Segment};
use steerling::testing::{write_tiny_gguf, TinySpec};
use steerling::training::losses::token_logprobs;
use steerling::training::model::{forward, FrozenBase, Trainable};

fn tiny_f32_model() -> steerling::model::LoadedModel {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("tiny-f32-{}-{n}.gguf", std::process::id()));
    write_tiny_gguf(
        &path,
        &TinySpec::default(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    let loaded = load_model(&ModelSource::Gguf(path.clone()), 64).unwrap();
    let _ = std::fs::remove_file(path);
    loaded
}

#[test]
fn training_forward_matches_the_serving_model() {
    let loaded = tiny_f32_model();
    let model = &loaded.model;
    let base = FrozenBase::from_model(model, DType::F32, 64).unwrap();
    let init = base.embed_rows(&[40, 41]).unwrap();
    let tr = Trainable::new(&base, &init, 4, 8.0, &[ProjKind::Q, ProjKind::V], 0.0, 1).unwrap();
    let ids: Vec<u32> = loaded
        .tokenizer
        .encode("The nurse said that she", true)
        .unwrap();
    let t = ids.len();
    let logits = forward(
        &base,
        &tr,
        &Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        false,
        0,
    )
    .unwrap();
    let ours: Vec<f32> = logits
        .narrow(1, t - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // The serving path, with the steering rows as its extra head rows (LoRA B is 0).
    let mut cache = model.new_cache();
    let head = tr.steer_embed.as_tensor().clone();
    let mut segs = [Segment {
        embeds: model.embed_tokens(&ids).unwrap(),
        cache: &mut cache,
        lora: None,
        extra_head: Some(&head),
        logits: Logits::Last,
        branches: None,
    }];
    let out = model.forward(&mut segs).unwrap().remove(0);
    let mut serving: Vec<f32> = out.rows.flatten_all().unwrap().to_vec1().unwrap();
    serving.extend(out.extra.unwrap());
    assert_eq!(ours.len(), serving.len());
    let scale = serving.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(&serving)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    assert!(diff < 1e-4, "relative max diff {diff}");
    // Logits from a later position are the same rows, computed for fewer positions.
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let tail = forward(&base, &tr, &input, false, t - 2).unwrap();
    assert_eq!(tail.dims(), &[1, 2, logits.dim(2).unwrap()]);
    let tail_last: Vec<f32> = tail
        .narrow(1, 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let gap = tail_last
        .iter()
        .zip(&ours)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(gap <= 1e-5 * scale, "{gap}");
}

#[test]
fn gradients_match_finite_differences() {
    let loaded = tiny_f32_model();
    let base = FrozenBase::from_model(&loaded.model, DType::F64, 64).unwrap();
    let vocab = loaded.model.config.vocab_size as u32;
    let init = base.embed_rows(&[40, 41]).unwrap();
    let tr = Trainable::new(&base, &init, 2, 4.0, &[ProjKind::Q, ProjKind::V], 0.0, 7).unwrap();
    // B starts at zero in training; give it values so A's gradient is not trivially 0.
    for row in &tr.lora {
        for l in row.iter().flatten() {
            let shape = l.b.as_tensor().shape().clone();
            l.b.set(&(Tensor::randn(0f64, 0.05, shape, &Device::Cpu).unwrap()))
                .unwrap();
        }
    }
    // A steering token in the middle of the sequence, and as a target.
    let ids = [10u32, 20, 30, vocab, 50, 60, 70];
    let targets = [20u32, 30, vocab, 50, 60, 70, vocab + 1];
    let input = Tensor::new(&ids[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let target = Tensor::new(&targets[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let loss_of = |tr: &Trainable| -> Tensor {
        let logits = forward(&base, tr, &input, false, 0).unwrap();
        token_logprobs(&logits, &target)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap()
    };
    let grads = loss_of(&tr).backward().unwrap();
    let vars = tr.vars();
    assert_eq!(
        vars.len(),
        1 + 2 * 2 * 2,
        "steering rows + A, B for q and v in 2 layers"
    );
    let eps = 1e-5;
    for (vi, var) in vars.iter().enumerate() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("trainable tensor {vi} got no gradient"));
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let original = var.as_tensor().copy().unwrap();
        let values: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
        let mut checked_nonzero = false;
        for &i in &[0usize, values.len() / 3, values.len() - 1] {
            let at = |delta: f64| -> f64 {
                let mut v = values.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, original.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_of(&tr).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&original).unwrap();
            let tol = 1e-6 + 1e-4 * numeric.abs().max(g[i].abs());
            assert!(
                (numeric - g[i]).abs() < tol,
                "var {vi} index {i}: analytic {} vs numeric {numeric}",
                g[i]
            );
            checked_nonzero |= numeric.abs() > 1e-8;
        }
        assert!(
            checked_nonzero,
            "var {vi}: the checked entries all have zero gradient"
        );
    }
}
