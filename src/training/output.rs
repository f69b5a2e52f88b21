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
/// temporary folder first, synced, which then takes the old folder's place
/// in one rename (an exchange when one exists), so a crash at any point
/// leaves either the old adapter or the new one, plus leftovers that
/// [`recover_interrupted_writes`] clears at the next start.
pub fn write_adapter(
    dir: &std::path::Path,
    name: &str,
    trained: &Trained,
) -> Result<std::path::PathBuf> {
    crate::steering::registry::check_name(name)?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}{TMP_MARK}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    std::fs::write(
        tmp.join(CONFIG_FILE),
        serde_json::to_string_pretty(&trained.config)?,
    )?;
    crate::faults::pause_point("adapter-write:config");
    candle_core::safetensors::save(&trained.tensors, tmp.join(WEIGHTS_FILE))?;
    crate::faults::pause_point("adapter-write:weights");
    let dest = dir.join(name);
    keep_other_files(&dest, &tmp)?;
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    sync_dir(&tmp);
    publish(&tmp, &dest, name)?;
    sync_dir(dir);
    Ok(dest)
}

const TMP_MARK: &str = ".tmp-";
const OLD_MARK: &str = ".old-";

/// Puts the finished folder `tmp` at `dest`: a rename when `dest` is new,
/// else an atomic exchange, after which `tmp` holds the old version. Where
/// the file system cannot exchange, the old folder is first renamed aside
/// (a crash between the two renames is undone at the next start).
fn publish(tmp: &std::path::Path, dest: &std::path::Path, name: &str) -> Result<()> {
    if !dest.exists() {
        std::fs::rename(tmp, dest)?;
        crate::faults::pause_point("adapter-write:renamed");
        return Ok(());
    }
    if exchange(tmp, dest).is_err() {
        let old = dest.with_file_name(format!(".{name}{OLD_MARK}{}", std::process::id()));
        std::fs::rename(dest, &old)?;
        crate::faults::pause_point("adapter-write:moved-aside");
        std::fs::rename(tmp, dest)?;
        std::fs::rename(&old, tmp)?;
    }
    crate::faults::pause_point("adapter-write:exchanged");
    std::fs::remove_dir_all(tmp)?;
    Ok(())
}

/// Swaps two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &std::path::Path, b: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &std::path::Path, _: &std::path::Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Makes a folder's entries durable (best effort: not every file system
/// lets a directory be opened for syncing).
fn sync_dir(dir: &std::path::Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Clears what writes killed midway left in `dir`: temporary folders are
/// removed, and an old version renamed aside is put back if its
/// replacement never arrived. Folders of a writer still running are left
/// alone. Returns what it did, for the log.
pub fn recover_interrupted_writes(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut done = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some((name, mark, pid)) = leftover(&file) else {
            continue;
        };
        if writer_alive(pid) {
            continue;
        }
        let dest = dir.join(name);
        let path = entry.path();
        if mark == OLD_MARK && !dest.exists() && std::fs::rename(&path, &dest).is_ok() {
            done.push(format!("restored `{name}` from an interrupted replacement"));
        } else if std::fs::remove_dir_all(&path).is_ok() {
            done.push(format!("removed {file}, left by an interrupted write"));
        }
    }
    done
}

/// `.<name>.tmp-<pid>` or `.<name>.old-<pid>` → (name, mark, pid).
fn leftover(file: &str) -> Option<(&str, &'static str, u32)> {
    let rest = file.strip_prefix('.')?;
    [TMP_MARK, OLD_MARK].into_iter().find_map(|mark| {
        let (name, pid) = rest.rsplit_once(mark)?;
        let pid = pid.parse().ok()?;
        crate::steering::registry::check_name(name).ok()?;
        Some((name, mark, pid))
    })
}

/// Whether process `pid` (another writer) still runs.
fn writer_alive(pid: u32) -> bool {
    pid != std::process::id() && std::path::Path::new(&format!("/proc/{pid}")).exists()
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
