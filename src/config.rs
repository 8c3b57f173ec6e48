//! Settled run configuration: CLI flags and environment read once, then passed around.

use std::path::PathBuf;

use crate::backend::{BackendKind, Packing};
use crate::model::{HubOptions, Resolver};
use crate::progress::ProgressMode;

#[derive(Debug, Clone)]
pub struct Config {
    pub cache_dir: PathBuf,
    pub reports_dir: PathBuf,
    pub models_dir: Option<PathBuf>,
    pub threads: usize,
    pub backend: BackendKind,
    /// One prompt at a time, or several per decode call (part of the engine version).
    pub packing: Packing,
    pub progress: ProgressMode,
    pub hub: HubOptions,
}

impl Config {
    /// Defaults for everything but the folders (for tests and embedding).
    pub fn new(cache_dir: impl Into<PathBuf>, reports_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            reports_dir: reports_dir.into(),
            models_dir: None,
            threads: crate::exec::default_threads(),
            backend: BackendKind::Llama,
            packing: Packing::for_device(None),
            progress: ProgressMode::Off,
            hub: HubOptions::default(),
        }
    }

    /// The engine version every row key records: the backend's, and how it packs rows.
    pub fn engine_version(&self) -> String {
        format!(
            "{}{}",
            self.backend.engine_version(),
            self.packing.key_suffix()
        )
    }

    /// Where models are found. `read_only`: the sha256 memo in the cache is read, never
    /// written.
    pub fn resolver(&self, read_only: bool) -> Resolver {
        Resolver {
            models_dir: self.models_dir.clone(),
            hub: self.hub.clone(),
            digest_dir: self.cache_dir.join(crate::cache::LAYOUT).join("digests"),
            memo_read_only: read_only,
        }
    }
}
