//! The inference keys of a cell's rows, held compactly: a study of forty cells over 25,000
//! reviews has a million rows, and a million full key components (six digests each) would
//! be most of what a plan holds.

use std::sync::Arc;

use crate::key::{Components, Digest};

/// What every row of a cell shares in its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shared {
    model: Digest,
    method: Digest,
    sampler: Digest,
    seed: Digest,
    engine: Digest,
}

/// The keys of a cell's rows: the parts every row shares, each row's prompt digest (shared
/// with every cell on the same prompt and row set), and each row's key, computed once.
/// A row's key is `None` when an input is not known yet (a model not downloaded without a
/// sha256, examples whose embeddings do not exist yet).
#[derive(Debug, Clone, Default)]
pub struct RowKeys {
    shared: Option<Shared>,
    prompts: Arc<[Option<Digest>]>,
    keys: Vec<Option<Digest>>,
}

impl RowKeys {
    /// The rows of a cell whose model digest is `model` (`None`: not known) over `prompts`.
    pub fn new(
        model: Option<Digest>,
        method: Digest,
        sampler: Digest,
        seed: Digest,
        engine: Digest,
        prompts: Arc<[Option<Digest>]>,
    ) -> Self {
        let shared = model.map(|model| Shared {
            model,
            method,
            sampler,
            seed,
            engine,
        });
        let mut keys = Self {
            shared,
            prompts,
            keys: Vec::new(),
        };
        keys.keys = (0..keys.prompts.len())
            .map(|i| keys.get(i).map(|c| c.row_key()))
            .collect();
        keys
    }

    /// Rows (a cell that runs no model has none).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Row `i`'s key components.
    pub fn get(&self, i: usize) -> Option<Components> {
        let s = self.shared?;
        Some(Components {
            model: s.model,
            prompt: (*self.prompts.get(i)?)?,
            method: s.method,
            sampler: s.sampler,
            seed: s.seed,
            engine: s.engine,
        })
    }

    /// Row `i`'s key.
    pub fn key(&self, i: usize) -> Option<Digest> {
        self.keys.get(i).copied().flatten()
    }

    /// Every row's components, in order.
    pub fn iter(&self) -> impl Iterator<Item = Option<Components>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Every row's key, in order.
    pub fn keys(&self) -> impl Iterator<Item = Option<Digest>> + '_ {
        self.keys.iter().copied()
    }
}
