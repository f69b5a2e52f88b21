//! A trained adapter leaving the trainer: its tensors as
//! adapter.safetensors names them, the weights as the engine would load them,
//! and the atomic write into the adapters folder.

use super::model::Trainable;
use super::trainer::Trained;
use crate::model::{Model, ProjKind};
use crate::steering::adapter::*;
use anyhow::Result;
use candle_core::{DType, Tensor};
use std::collections::HashMap;

/// The adapter as the engine would load it, to measure it as served.
pub(super) fn served_weights(
    tr: &Trainable,
    config: &AdapterConfig,
    model: &Model,
) -> Result<AdapterWeights> {
    AdapterWeights::from_tensors(
        export(tr, model.config.tie_word_embeddings)?,
        config,
        &model.config,
    )
}

/// The adapter's tensors, named as adapter.safetensors wants them.
pub(super) fn export(tr: &Trainable, tied: bool) -> Result<HashMap<String, Tensor>> {
    let mut t = HashMap::new();
    t.insert(
        "steering.embed".to_string(),
        tr.steer_embed.as_tensor().to_dtype(DType::F32)?,
    );
    if !tied {
        if let Some(h) = &tr.steer_head {
            t.insert(
                "steering.head".to_string(),
                h.as_tensor().to_dtype(DType::F32)?,
            );
        }
    }
    for (l, row) in tr.lora.iter().enumerate() {
        for kind in ProjKind::ALL {
            if let Some(lv) = &row[kind.index()] {
                t.insert(
                    lora_tensor_name(l, kind, "a"),
                    lv.a.as_tensor().to_dtype(DType::F32)?,
                );
                t.insert(
                    lora_tensor_name(l, kind, "b"),
                    lv.b.as_tensor().to_dtype(DType::F32)?,
                );
            }
        }
    }
    Ok(t)
}

/// Writes the adapter into `dir/<name>/` atomically: everything goes to a
/// temporary folder first, which then replaces the old one by renames, so
/// a crash at any point leaves either the old adapter or the new one.
pub fn write_adapter(
    dir: &std::path::Path,
    name: &str,
    trained: &Trained,
) -> Result<std::path::PathBuf> {
    crate::steering::registry::check_name(name)?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    std::fs::write(
        tmp.join(CONFIG_FILE),
        serde_json::to_string_pretty(&trained.config)?,
    )?;
    candle_core::safetensors::save(&trained.tensors, tmp.join(WEIGHTS_FILE))?;
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    let dest = dir.join(name);
    keep_other_files(&dest, &tmp)?;
    let old = dir.join(format!(".{name}.old-{}", std::process::id()));
    if dest.exists() {
        std::fs::rename(&dest, &old)?;
    }
    std::fs::rename(&tmp, &dest)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(dest)
}

/// Copies the files of an adapter folder that are not the adapter itself
/// (its README, training data) into the replacement, so retraining in place
/// keeps them.
fn keep_other_files(dest: &std::path::Path, tmp: &std::path::Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dest) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let own = name == CONFIG_FILE || name == WEIGHTS_FILE;
        if !own && entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), tmp.join(&name))?;
        }
    }
    Ok(())
}
