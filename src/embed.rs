//! The embed stage: every text an embedder must embed that the store lacks, computed on one
//! worker thread that owns the backend (a llama.cpp context is not `Send`), committed in
//! batches as vectors arrive, so a stop loses only the batch in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendError, EmbedderLoad};
use crate::key::Digest;
use crate::plan::{EmbedRequest, Plan, vector_artifact};
use crate::segments::CacheError;
use crate::store::Store;
use crate::worker::{Batch, Next};

/// Texts per message from the worker (and per embed call).
const CHUNK: usize = 32;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EmbedStats {
    pub cached: usize,
    pub embedded: usize,
    pub embedders_loaded: usize,
    pub wall_s: f64,
    /// Texts per second while embedding (the model load excluded).
    pub texts_per_s: f64,
    pub tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("embedder `{id}`: {source}")]
    Backend {
        id: String,
        /// Index into the spec's embedders (for a located error).
        embedder: usize,
        #[source]
        source: BackendError,
    },
    #[error(transparent)]
    Store(#[from] CacheError),
    #[error("the embedding worker stopped unexpectedly")]
    WorkerDied,
}

enum Msg {
    Loaded,
    Done {
        keys: Vec<Digest>,
        vectors: Vec<Vec<f32>>,
        tokens: u64,
    },
    Failed {
        embedder: usize,
        error: BackendError,
    },
}

/// Embed every requested text the store lacks. `make_backend` is called on the worker.
pub fn run(
    plan: &Plan,
    store: &mut Store,
    make_backend: Box<dyn FnOnce() -> Box<dyn Backend> + Send>,
    threads: usize,
    quiet: bool,
    cancel: Arc<AtomicBool>,
) -> Result<EmbedStats, EmbedError> {
    let start = Instant::now();
    let todo: Vec<EmbedRequest> = plan
        .embed_requests
        .iter()
        .filter(|r| !store.contains(&r.key))
        .cloned()
        .collect();
    let mut stats = EmbedStats {
        cached: plan.embed_requests.len() - todo.len(),
        ..Default::default()
    };
    if todo.is_empty() {
        return Ok(stats);
    }
    let loads: Vec<EmbedderLoad> = plan
        .spec
        .embedders
        .iter()
        .zip(&plan.embedders)
        .map(|(spec, known)| EmbedderLoad {
            id: known.id.clone(),
            path: known
                .file
                .as_ref()
                .expect("run plans resolve every embedder")
                .path
                .clone(),
            max_tokens: spec.max_tokens,
            threads,
        })
        .collect();
    if !quiet {
        eprintln!(
            "embed: {} texts to embed ({} cached)",
            todo.len(),
            stats.cached
        );
    }
    let worker_cancel = cancel.clone();
    let (rx, worker) = crate::worker::spawn("pipeline-embed", move |tx| {
        worker(make_backend, loads, todo, worker_cancel, tx)
    });
    let mut error = None;
    let mut buffer = Batch::new(COMMIT_VECTORS, COMMIT_INTERVAL);
    let mut last_line = Instant::now();
    let mut busy = Duration::ZERO;
    let mut loaded_at = Instant::now();
    loop {
        let msg = match buffer.next(&rx) {
            Next::Message(m) => m,
            Next::CommitDue => {
                commit(store, &mut buffer, &cancel, &mut error);
                continue;
            }
            Next::Closed => break,
        };
        match msg {
            Msg::Loaded => {
                stats.embedders_loaded += 1;
                loaded_at = Instant::now();
            }
            Msg::Done {
                keys,
                vectors,
                tokens,
            } => {
                stats.embedded += keys.len();
                stats.tokens += tokens;
                busy += loaded_at.elapsed();
                loaded_at = Instant::now();
                buffer.extend(
                    keys.iter()
                        .zip(&vectors)
                        .map(|(k, v)| vector_artifact(*k, v)),
                );
                if buffer.due() {
                    commit(store, &mut buffer, &cancel, &mut error);
                }
                if !quiet && last_line.elapsed() >= Duration::from_secs(5) {
                    last_line = Instant::now();
                    eprintln!(
                        "embed: {} texts done, {:.1} texts/s",
                        stats.embedded,
                        stats.embedded as f64 / busy.as_secs_f64().max(1e-9)
                    );
                }
            }
            Msg::Failed { embedder, error: e } => {
                error.get_or_insert(EmbedError::Backend {
                    id: plan.embedders[embedder].id.clone(),
                    embedder,
                    source: e,
                });
            }
        }
    }
    if let Err(e) = store.commit(buffer.take()) {
        error.get_or_insert(e.into());
    }
    if worker.join().is_err() {
        error.get_or_insert(EmbedError::WorkerDied);
    }
    stats.wall_s = start.elapsed().as_secs_f64();
    stats.texts_per_s = stats.embedded as f64 / busy.as_secs_f64().max(1e-9);
    match error {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}

/// Vectors waiting beyond this many are committed at once.
const COMMIT_VECTORS: usize = 512;
/// Waiting vectors are committed at least this often (as rows are).
const COMMIT_INTERVAL: Duration = crate::worker::COMMIT_INTERVAL;

/// Commit the vectors waiting; without a store nothing more can be kept, so the worker is
/// stopped.
fn commit(
    store: &mut Store,
    buffer: &mut Batch<crate::store::Artifact>,
    cancel: &AtomicBool,
    error: &mut Option<EmbedError>,
) {
    if let Err(e) = store.commit(buffer.take()) {
        cancel.store(true, Ordering::SeqCst);
        error.get_or_insert(e.into());
    }
}

fn worker(
    make_backend: Box<dyn FnOnce() -> Box<dyn Backend> + Send>,
    loads: Vec<EmbedderLoad>,
    todo: Vec<EmbedRequest>,
    cancel: Arc<AtomicBool>,
    tx: mpsc::Sender<Msg>,
) {
    let mut backend = make_backend();
    for (e, load) in loads.iter().enumerate() {
        let mine: Vec<&EmbedRequest> = todo.iter().filter(|r| r.embedder == e).collect();
        if mine.is_empty() {
            continue;
        }
        let result = backend.with_embedder(load, &mut |session| {
            let _ = tx.send(Msg::Loaded);
            for chunk in mine.chunks(CHUNK) {
                if cancel.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let texts: Vec<&str> = chunk.iter().map(|r| r.text.as_str()).collect();
                let tokens = texts.iter().map(|t| session.tokens(t).len() as u64).sum();
                let vectors = session.embed(&texts)?;
                let keys = chunk.iter().map(|r| r.key).collect();
                if tx
                    .send(Msg::Done {
                        keys,
                        vectors,
                        tokens,
                    })
                    .is_err()
                {
                    return Ok(());
                }
            }
            Ok(())
        });
        if let Err(error) = result {
            let _ = tx.send(Msg::Failed { embedder: e, error });
            return;
        }
    }
}
