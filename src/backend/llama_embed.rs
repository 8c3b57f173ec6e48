//! Sentence embeddings through llama.cpp with embeddings on (the same engine as inference,
//! no second ML runtime): pooled as the GGUF says, L2-normalised here (llama.cpp returns
//! the raw pooled vector).
//!
//! Each text is evaluated in a decode call of its own, at position 0 of sequence 0: packing
//! several texts into one call changes their floats (a text's attention and matrix products
//! then run in a batch whose shape depends on its neighbours), and an embedding is cached
//! by its text alone, so its value must not depend on which texts ran beside it.

use std::num::NonZeroU32;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::llama::{decode_err, llama_backend, load_model, thread_count};
use super::{BackendError, EmbedSession, EmbedderLoad, l2_normalise};

pub(super) fn with_embedder(
    load: &EmbedderLoad,
    run: &mut dyn FnMut(&mut dyn EmbedSession) -> Result<(), BackendError>,
) -> Result<(), BackendError> {
    let backend = llama_backend();
    let model = load_model(&load.path)?;
    // An embedding model declares how its token vectors are pooled.
    let arch = model
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    let pooling = model
        .meta_val_str(&format!("{arch}.pooling_type"))
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    if pooling <= 0 {
        return Err(BackendError::NotEmbedding {
            path: load.path.clone(),
            reason: format!(
                "its GGUF declares no pooling (`{arch}.pooling_type`); use a sentence-embedding model such as all-MiniLM-L6-v2"
            ),
        });
    }
    let n = load.max_tokens.min(model.n_ctx_train().max(8));
    let threads = thread_count(load.threads);
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n))
        .with_n_batch(n)
        .with_n_ubatch(n)
        .with_n_seq_max(1)
        .with_embeddings(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let ctx = model
        .new_context(backend, ctx_params)
        .map_err(|e| BackendError::Load {
            path: load.path.clone(),
            reason: format!("cannot create an embedding context: {e}"),
        })?;
    let mut session = LlamaEmbedder {
        model: &model,
        ctx,
        max_tokens: n as usize,
        batch: LlamaBatch::new(n as usize, 1),
    };
    run(&mut session)
}

struct LlamaEmbedder<'m> {
    model: &'m LlamaModel,
    ctx: llama_cpp_2::context::LlamaContext<'m>,
    max_tokens: usize,
    batch: LlamaBatch<'static>,
}

impl LlamaEmbedder<'_> {
    /// `[CLS] text [SEP]`, cut to `max_tokens` keeping the closing special token.
    fn token_ids(&self, text: &str) -> Vec<LlamaToken> {
        let mut t = self.model.vocab().tokenize(text.as_bytes(), true, false);
        if t.len() > self.max_tokens {
            let last = t[t.len() - 1];
            t.truncate(self.max_tokens - 1);
            t.push(last);
        }
        t
    }
}

impl EmbedSession for LlamaEmbedder<'_> {
    fn tokens(&self, text: &str) -> Vec<i32> {
        self.token_ids(text).iter().map(|t| t.0).collect()
    }

    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, BackendError> {
        let mut out = Vec::with_capacity(texts.len());
        for text in texts {
            let tokens = self.token_ids(text);
            if tokens.is_empty() {
                return Err(BackendError::Job("a text with no tokens".into()));
            }
            self.ctx.clear_kv_cache();
            self.batch.clear();
            for (i, &t) in tokens.iter().enumerate() {
                self.batch
                    .add(t, i as i32, &[0], true)
                    .map_err(decode_err)?;
            }
            self.ctx.decode(&mut self.batch).map_err(decode_err)?;
            let mut v = self.ctx.embeddings_seq_ith(0).map_err(decode_err)?.to_vec();
            l2_normalise(&mut v);
            out.push(v);
        }
        Ok(out)
    }
}

/// llama.cpp's raw embedding speed through this binding: one decode call of `n_tokens`
/// tokens with embeddings on, from an empty context, as tokens per second (median of
/// `reps` after one warm-up). The yardstick for the embed stage's own rate.
pub fn raw_embed_throughput(
    path: &std::path::Path,
    threads: usize,
    n_tokens: u32,
    reps: usize,
) -> Result<f64, BackendError> {
    let backend = llama_backend();
    let err = |e: &dyn std::fmt::Display| BackendError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let model = load_model(path)?;
    let t = thread_count(threads);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_tokens))
        .with_n_batch(n_tokens)
        .with_n_ubatch(n_tokens)
        .with_n_seq_max(1)
        .with_embeddings(true)
        .with_n_threads(t)
        .with_n_threads_batch(t);
    let mut ctx = model.new_context(backend, params).map_err(|e| err(&e))?;
    let nv = model.n_vocab() as usize;
    let mut batch = LlamaBatch::new(n_tokens as usize, 1);
    let mut rates = Vec::new();
    for rep in 0..=reps {
        ctx.clear_kv_cache();
        batch.clear();
        for i in 0..n_tokens as usize {
            let tok = LlamaToken(((i * 7919 + 13) % nv) as i32);
            batch.add(tok, i as i32, &[0], true).map_err(decode_err)?;
        }
        let start = std::time::Instant::now();
        ctx.decode(&mut batch).map_err(decode_err)?;
        let _ = ctx.embeddings_seq_ith(0).map_err(decode_err)?;
        if rep > 0 {
            rates.push(f64::from(n_tokens) / start.elapsed().as_secs_f64());
        }
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}
