//! Loaded adapters by name. Loading builds a complete new version before it
//! becomes visible; a request holds the version it started with, so a swap
//! or an unload never disturbs requests in flight.

use super::adapter::{AdapterConfig, AdapterWeights, CONFIG_FILE, WEIGHTS_FILE};
use super::detect::Detector;
use crate::model::ModelConfig;
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// One loaded version of an adapter.
#[derive(Debug)]
pub struct Adapter {
    pub name: String,
    /// Increases with every load, across all adapters.
    pub version: u64,
    pub config: AdapterConfig,
    pub weights: AdapterWeights,
    pub detector: Detector,
    /// Token ids the steering tokens take: vocab_size + index.
    pub first_token_id: u32,
}

impl Adapter {
    pub fn token_id(&self, value: usize) -> u32 {
        self.first_token_id + value as u32
    }
}

/// Adapter names: letters, digits, `-`, `_`, `.`; no path can be built from one.
pub fn check_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !name.starts_with('.'),
        "adapter name `{name}` is not allowed (use 1–64 letters, digits, '-', '_' or '.', not starting with '.')"
    );
    Ok(())
}

/// What the base model is, for checking adapters against it.
#[derive(Debug, Clone)]
pub struct BaseIdentity {
    pub name: String,
    pub sha256: String,
}

pub struct Registry {
    dir: PathBuf,
    base: BaseIdentity,
    model: ModelConfig,
    adapters: RwLock<BTreeMap<String, Arc<Adapter>>>,
    versions: AtomicU64,
}

impl Registry {
    pub fn new(dir: PathBuf, base: BaseIdentity, model: ModelConfig) -> Self {
        Self {
            dir,
            base,
            model,
            adapters: RwLock::new(BTreeMap::new()),
            versions: AtomicU64::new(0),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn get(&self, name: &str) -> Option<Arc<Adapter>> {
        self.adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn list(&self) -> Vec<Arc<Adapter>> {
        self.adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Reads and checks `dir/<name>/` completely, then publishes it.
    pub fn load(&self, name: &str) -> Result<Arc<Adapter>> {
        check_name(name)?;
        let folder = self.dir.join(name);
        ensure!(folder.is_dir(), "no adapter folder `{}`", folder.display());
        let adapter = self
            .read(name, &folder)
            .with_context(|| format!("adapter `{name}` refused"))?;
        let adapter = Arc::new(adapter);
        self.adapters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), adapter.clone());
        Ok(adapter)
    }

    fn read(&self, name: &str, folder: &Path) -> Result<Adapter> {
        // The folder must be a real directory inside `dir` (no symlink escape).
        let real = folder.canonicalize()?;
        let root = self.dir.canonicalize()?;
        ensure!(
            real.parent() == Some(root.as_path()),
            "adapter folder resolves outside {}",
            root.display()
        );
        for file in [CONFIG_FILE, WEIGHTS_FILE] {
            let meta = std::fs::symlink_metadata(folder.join(file))
                .with_context(|| format!("cannot read {file}"))?;
            ensure!(
                meta.is_file(),
                "{file} is not a regular file (links are refused)"
            );
        }
        let text = std::fs::read_to_string(folder.join(CONFIG_FILE))
            .with_context(|| format!("cannot read {CONFIG_FILE}"))?;
        let config: AdapterConfig =
            serde_json::from_str(&text).with_context(|| format!("{CONFIG_FILE} is not valid"))?;
        config.validate()?;
        if config.base_model.sha256 != self.base.sha256 {
            bail!(
                "it was made for base model `{}` (sha256 {}), but this server runs sha256 {}",
                config.base_model.name,
                config.base_model.sha256,
                self.base.sha256
            );
        }
        let weights = AdapterWeights::load(&folder.join(WEIGHTS_FILE), &config, &self.model)?;
        let detector = Detector::new(&config)?;
        Ok(Adapter {
            name: name.to_string(),
            version: self.versions.fetch_add(1, Ordering::Relaxed) + 1,
            config,
            weights,
            detector,
            first_token_id: self.model.vocab_size as u32,
        })
    }

    /// Loads every adapter folder; a damaged one is skipped with an error.
    pub fn load_all(&self) -> Vec<(String, Result<()>)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let r = self.load(&n).map(|_| ());
                (n, r)
            })
            .collect()
    }

    /// Removes an adapter; requests that hold it finish on it.
    pub fn unload(&self, name: &str) -> Option<Arc<Adapter>> {
        self.adapters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }
}
