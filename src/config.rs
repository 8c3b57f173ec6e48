//! Settled run configuration: CLI flags and environment read once, then passed around.

use std::path::PathBuf;

use crate::backend::BackendKind;
use crate::model::{HubOptions, Resolver};

#[derive(Debug, Clone)]
pub struct Config {
    pub cache_dir: PathBuf,
    pub reports_dir: PathBuf,
    pub models_dir: Option<PathBuf>,
    pub threads: usize,
    pub backend: BackendKind,
    pub progress: bool,
    pub hub: HubOptions,
}

impl Config {
    pub fn resolver(&self) -> Resolver {
        Resolver {
            models_dir: self.models_dir.clone(),
            hub: self.hub.clone(),
            digest_dir: self.cache_dir.join(crate::cache::LAYOUT).join("digests"),
        }
    }
}
