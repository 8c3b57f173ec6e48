//! The server's row cache and artifact store, with what it computed written in batches
//! (every 32 rows or 3 seconds, as a run commits) instead of one segment file per row.
//! Until a batch is written its rows answer from memory; a `kill -9` loses at most them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::cache::{Cache, CacheError, CachedRow, Lookup};
use crate::key::Digest;
use crate::plan::{vector, vector_artifact};
use crate::store::{Artifact, Store};

/// Rows or vectors waiting beyond this many are written at once (as a run commits).
pub const BATCH: usize = crate::worker::COMMIT_ROWS;
/// Waiting rows and vectors are written at least this often.
pub const INTERVAL: Duration = crate::worker::COMMIT_INTERVAL;

pub struct WriteBehind {
    cache: Mutex<Cache>,
    store: Mutex<Store>,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    rows: HashMap<Digest, CachedRow>,
    vectors: HashMap<Digest, Vec<f32>>,
}

impl Pending {
    fn len(&self) -> usize {
        self.rows.len() + self.vectors.len()
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("a serve lock is never poisoned")
}

impl WriteBehind {
    pub fn new(cache: Cache, store: Store) -> Self {
        Self {
            cache: Mutex::new(cache),
            store: Mutex::new(store),
            pending: Mutex::new(Pending::default()),
        }
    }

    /// A row's raw output (label log-probs, generated text), written or waiting.
    /// A computed row's log-probs and text, stored or waiting, if its prompt has at most
    /// `prompt_limit` tokens (a row computed under a larger `n_ctx` may not fit the cell's).
    pub fn row(
        &self,
        key: &Digest,
        prompt_limit: Option<u32>,
    ) -> Option<(Option<Vec<f64>>, Option<String>)> {
        let fits = |r: &&CachedRow| prompt_limit.is_none_or(|l| r.prompt_tokens <= l);
        let out = |r: &CachedRow| (r.logprobs.clone(), r.text.clone());
        {
            let cache = locked(&self.cache);
            if matches!(cache.lookup(key, prompt_limit), Lookup::Hit) {
                // One row read by projection; a read that fails computes the row again.
                if let Ok(rows) = cache.rows([*key])
                    && let Some(r) = rows.hit(key, prompt_limit)
                {
                    return Some((r.logprobs.clone(), r.text.as_deref().map(str::to_string)));
                }
            }
        }
        locked(&self.pending).rows.get(key).filter(fits).map(out)
    }

    /// A text's embedding, stored or waiting.
    pub fn vector(&self, key: &Option<Digest>) -> Option<Vec<f32>> {
        if let Some(v) = vector(&locked(&self.store), key) {
            return Some(v);
        }
        locked(&self.pending).vectors.get(key.as_ref()?).cloned()
    }

    /// Keep a computed row; true when a batch is due.
    pub fn add_row(&self, row: CachedRow) -> bool {
        let mut p = locked(&self.pending);
        p.rows.insert(row.key, row);
        p.len() >= BATCH
    }

    /// Keep a computed embedding; true when a batch is due.
    pub fn add_vector(&self, key: Digest, v: Vec<f32>) -> bool {
        let mut p = locked(&self.pending);
        p.vectors.insert(key, v);
        p.len() >= BATCH
    }

    /// Write what is waiting. What cannot be written stays waiting (and answering) for the
    /// next try.
    pub fn flush(&self) -> Result<(), CacheError> {
        let (rows, vectors) = {
            let p = locked(&self.pending);
            if p.len() == 0 {
                return Ok(());
            }
            (
                p.rows.values().cloned().collect::<Vec<_>>(),
                p.vectors
                    .iter()
                    .map(|(k, v)| vector_artifact(*k, v))
                    .collect::<Vec<Artifact>>(),
            )
        };
        let written_rows: Vec<Digest> = rows.iter().map(|r| r.key).collect();
        let written_vectors: Vec<Digest> = vectors.iter().map(|a| a.key).collect();
        locked(&self.cache).commit(rows)?;
        {
            let mut p = locked(&self.pending);
            for k in &written_rows {
                p.rows.remove(k);
            }
        }
        locked(&self.store).commit(vectors)?;
        let mut p = locked(&self.pending);
        for k in &written_vectors {
            p.vectors.remove(k);
        }
        Ok(())
    }

    /// Write what is waiting, then merge segments if there are many.
    pub fn close(&self) -> Result<(), CacheError> {
        self.flush()?;
        locked(&self.cache).compact_if_needed()?;
        locked(&self.store).compact(None)?;
        Ok(())
    }

    /// Rows and vectors not written yet.
    pub fn waiting(&self) -> usize {
        locked(&self.pending).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::row;

    #[test]
    fn rows_answer_before_and_after_their_batch_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let w = WriteBehind::new(
            Cache::open(dir.path()).unwrap(),
            Store::open(dir.path()).unwrap(),
        );
        let due: Vec<bool> = (0..BATCH as u8).map(|i| w.add_row(row(i))).collect();
        assert_eq!(due.iter().filter(|&&d| d).count(), 1, "due at the 32nd row");
        assert!(due[BATCH - 1]);
        let key = row(4).key;
        assert_eq!(
            w.row(&key, None).unwrap().0,
            row(4).logprobs,
            "answers while waiting"
        );
        assert_eq!(Cache::open_read_only(dir.path()).unwrap().len(), 0);
        w.flush().unwrap();
        assert_eq!(w.waiting(), 0);
        assert_eq!(
            w.row(&key, None).unwrap().0,
            row(4).logprobs,
            "answers once written"
        );
        // A row whose prompt does not fit the cell's context is not an answer for it.
        let tokens = row(4).prompt_tokens;
        assert!(w.row(&key, Some(tokens)).is_some());
        assert!(w.row(&key, Some(tokens - 1)).is_none());
        let on_disk = Cache::open_read_only(dir.path()).unwrap();
        assert_eq!(on_disk.len(), BATCH);
        assert_eq!(on_disk.report.segments, 1, "one segment for the batch");
    }
}
