//! A deterministic backend for tests: whitespace tokens, answers derived from a hash of the
//! prompt and the sampler, an optional delay per prompt, and a call counter. A prompt over
//! the context fails as llama.cpp's would, a prompt holding [`FAIL_MARKER`] fails to
//! decode and a model file holding [`LOAD_FAIL_MARKER`] fails to load, so that tests can
//! make single rows, or a whole model, fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{
    Backend, BackendError, ChatPrompt, EmbedSession, EmbedderLoad, Finish, ModelLoad, PromptOutput,
    Session, Task, TaskOutput, l2_normalise,
};
use crate::prompt::Messages;

pub const ENGINE_VERSION: &str = "fake-engine 1";

/// A prompt containing this text fails with a decode error.
pub const FAIL_MARKER: &str = "FAKE-DECODE-ERROR";

/// A model file containing this text fails to load.
pub const LOAD_FAIL_MARKER: &[u8] = b"FAKE-LOAD-ERROR";

/// Only a model file containing this text is an embedding model to the fake backend.
pub const EMBEDDER_MARKER: &[u8] = b"FAKE-EMBEDDER";

/// Dimensions of the fake embeddings.
const FAKE_DIMS: usize = 64;

/// Counts what the fake backend was asked to do.
#[derive(Debug, Default)]
pub struct FakeCalls {
    pub prompts: AtomicUsize,
    pub tasks: AtomicUsize,
    pub models_loaded: AtomicUsize,
    pub embedders_loaded: AtomicUsize,
    pub texts_embedded: AtomicUsize,
    /// Prompts evaluated per model id.
    pub prompts_by_model: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

impl FakeCalls {
    pub fn prompts_of(&self, model: &str) -> usize {
        self.prompts_by_model
            .lock()
            .expect("not poisoned")
            .get(model)
            .copied()
            .unwrap_or(0)
    }
}

pub struct FakeBackend {
    pub calls: Arc<FakeCalls>,
    /// Sleep this long per call of `run` (a prompt's evaluation, or a later part of its
    /// tasks), to test interruption and commits.
    pub delay: Duration,
}

impl FakeBackend {
    pub fn new(calls: Arc<FakeCalls>) -> Self {
        Self {
            calls,
            delay: Duration::ZERO,
        }
    }

    /// `PIPELINE_FAKE_DELAY_MS` sets the delay per prompt.
    pub fn from_env() -> Self {
        let ms = std::env::var("PIPELINE_FAKE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Self {
            calls: Arc::new(FakeCalls::default()),
            delay: Duration::from_millis(ms),
        }
    }
}

fn contains(bytes: &[u8], marker: &[u8]) -> bool {
    bytes.windows(marker.len()).any(|w| w == marker)
}

impl Backend for FakeBackend {
    fn engine_version(&self) -> String {
        ENGINE_VERSION.to_string()
    }

    fn with_embedder(
        &mut self,
        load: &EmbedderLoad,
        run: &mut dyn FnMut(&mut dyn EmbedSession) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let bytes = std::fs::read(&load.path).map_err(|e| BackendError::Load {
            path: load.path.clone(),
            reason: e.to_string(),
        })?;
        if !contains(&bytes, EMBEDDER_MARKER) {
            return Err(BackendError::NotEmbedding {
                path: load.path.clone(),
                reason: "its GGUF declares no pooling (simulated)".into(),
            });
        }
        self.calls.embedders_loaded.fetch_add(1, Ordering::SeqCst);
        run(&mut FakeEmbedder {
            calls: self.calls.clone(),
            max_tokens: load.max_tokens as usize,
        })
    }

    fn with_model(
        &mut self,
        model: &ModelLoad,
        run: &mut dyn FnMut(&mut dyn Session) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let bytes = std::fs::read(&model.path).map_err(|e| BackendError::Load {
            path: model.path.clone(),
            reason: e.to_string(),
        })?;
        if contains(&bytes, LOAD_FAIL_MARKER) {
            return Err(BackendError::Load {
                path: model.path.clone(),
                reason: "simulated load failure".into(),
            });
        }
        self.calls.models_loaded.fetch_add(1, Ordering::SeqCst);
        // `PIPELINE_FAKE_LOAD_MS`: a slow model load (to test readiness).
        if let Some(ms) = std::env::var("PIPELINE_FAKE_LOAD_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let mut s = FakeSession {
            model: model.id.clone(),
            model_salt: *blake3::hash(&bytes).as_bytes(),
            n_ctx: model.n_ctx,
            calls: self.calls.clone(),
            delay: self.delay,
            last_prompt: None,
        };
        run(&mut s)
    }
}

struct FakeSession {
    model: String,
    model_salt: [u8; 32],
    n_ctx: u32,
    calls: Arc<FakeCalls>,
    delay: Duration,
    /// The prompt of the last call: a call on the same prompt reuses its evaluation, as
    /// the llama session does for the parts of a prompt's tasks.
    last_prompt: Option<String>,
}

impl FakeSession {
    fn hash(&self, parts: &[&[u8]]) -> u64 {
        let mut h = blake3::Hasher::new();
        h.update(&self.model_salt);
        for p in parts {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
    }
}

impl Session for FakeSession {
    fn truncate(&self, text: &str, budget: super::TextBudget) -> String {
        let words: Vec<&str> = text.split_whitespace().collect();
        super::cut_text(
            words.len(),
            budget,
            |head| words[..head].join(" "),
            |from| words[from..].join(" "),
        )
        .unwrap_or_else(|| text.to_string())
    }

    fn format_chat(&self, m: &Messages) -> Result<ChatPrompt, BackendError> {
        let chat = |m: &Messages| {
            let mut s = String::new();
            if let Some(sys) = &m.system {
                s.push_str(&format!("<|system|>\n{sys}\n"));
            }
            s.push_str(&format!("<|user|>\n{}\n<|assistant|>\n", m.user));
            s
        };
        Ok(ChatPrompt::new(chat(m), &chat(&m.fixed_part())))
    }

    fn run(&mut self, prompt: &ChatPrompt, tasks: &[Task]) -> Result<PromptOutput, BackendError> {
        let start = Instant::now();
        // As llama.cpp's session does: a prompt whose hidden states are read is evaluated
        // again, whatever was evaluated before.
        let capture = tasks.iter().any(|t| matches!(t, Task::Hidden { .. }));
        let reused = !capture && self.last_prompt.as_deref() == Some(prompt.text.as_str());
        self.last_prompt = None;
        if !reused {
            self.calls.prompts.fetch_add(1, Ordering::SeqCst);
            *self
                .calls
                .prompts_by_model
                .lock()
                .expect("not poisoned")
                .entry(self.model.clone())
                .or_default() += 1;
        }
        self.calls.tasks.fetch_add(tasks.len(), Ordering::SeqCst);
        // The words of the template's fixed text, less the last (which may run on into the
        // row's own text), as llama.cpp's session counts the shared prefix.
        let prefix_tokens = prompt
            .fixed_text()
            .split_whitespace()
            .count()
            .saturating_sub(1);
        let prompt = prompt.text.as_str();
        let prompt_tokens = prompt.split_whitespace().count();
        if prompt.contains(FAIL_MARKER) {
            return Err(BackendError::Decode(
                "llama_decode returned -1 (simulated)".into(),
            ));
        }
        // The llama backend's rule: the prompt and its longest task fit the context.
        let after = tasks
            .iter()
            .map(Task::context_after)
            .max()
            .unwrap_or(0)
            .max(1);
        if prompt_tokens + after > self.n_ctx as usize {
            return Err(BackendError::ContextOverflow {
                needed: prompt_tokens + after,
                prompt: prompt_tokens,
                generate: after,
                n_ctx: self.n_ctx,
            });
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let mut outs = Vec::new();
        for t in tasks {
            let out = match t {
                Task::Generate {
                    max_tokens,
                    stop,
                    sampler,
                } => {
                    let needed = prompt_tokens + *max_tokens as usize;
                    if needed > self.n_ctx as usize {
                        return Err(BackendError::ContextOverflow {
                            needed,
                            prompt: prompt_tokens,
                            generate: *max_tokens as usize,
                            n_ctx: self.n_ctx,
                        });
                    }
                    let h = if sampler.temperature == 0.0 {
                        self.hash(&[prompt.as_bytes(), b"greedy"])
                    } else {
                        self.hash(&[
                            prompt.as_bytes(),
                            &sampler.temperature.to_bits().to_le_bytes(),
                            &sampler.top_p.to_bits().to_le_bytes(),
                            &sampler.top_k.to_le_bytes(),
                            &sampler.min_p.to_bits().to_le_bytes(),
                            &sampler.seed.to_le_bytes(),
                        ])
                    };
                    let answers = ["positive", "negative", "Positive.", "It is hard to say"];
                    let mut text = answers[(h % answers.len() as u64) as usize].to_string();
                    let mut finish = Finish::Eog;
                    if let Some(i) = stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                        text.truncate(i);
                        finish = Finish::Stop;
                    }
                    let words = text.split_whitespace().count() as u32;
                    if words > *max_tokens {
                        text = text
                            .split_whitespace()
                            .take(*max_tokens as usize)
                            .collect::<Vec<_>>()
                            .join(" ");
                        finish = Finish::Length;
                    }
                    TaskOutput {
                        gen_tokens: words.min(*max_tokens),
                        text: Some(text),
                        logprobs: None,
                        choice_tokens: None,
                        hidden: None,
                        finish,
                        decode_ms: 0.1,
                    }
                }
                Task::Loglik { continuations, .. } => TaskOutput {
                    text: None,
                    logprobs: Some(
                        continuations
                            .iter()
                            .map(|c| {
                                -((self.hash(&[prompt.as_bytes(), c.as_bytes()]) % 1000) as f64)
                                    / 100.0
                            })
                            .collect(),
                    ),
                    // One token a word, as a tokenizer that splits on spaces would.
                    choice_tokens: Some(
                        continuations
                            .iter()
                            .map(|c| c.split_whitespace().count().max(1) as u32)
                            .collect(),
                    ),
                    hidden: None,
                    gen_tokens: 0,
                    finish: Finish::Scored,
                    decode_ms: 0.1,
                },
                Task::Hidden { states } => TaskOutput {
                    text: None,
                    logprobs: None,
                    choice_tokens: None,
                    hidden: Some(fake_hidden(prompt, states)),
                    gen_tokens: 0,
                    finish: Finish::Scored,
                    decode_ms: 0.1,
                },
            };
            outs.push(out);
        }
        self.last_prompt = Some(prompt.to_string());
        Ok(PromptOutput {
            prompt_tokens: prompt_tokens as u32,
            evaluated_tokens: if reused { 0 } else { prompt_tokens as u32 },
            prefix_tokens: Some(prefix_tokens.min(prompt_tokens.saturating_sub(1)) as u32),
            prefill_ms: start.elapsed().as_secs_f64() * 1000.0,
            tasks: outs,
        })
    }
}

/// Dimensions of the fake backend's hidden states.
pub const FAKE_HIDDEN_DIM: usize = 8;

/// Fake hidden states, per layer and pooling: `mean` is a bag of the prompt's words (each
/// word adds 1 to a dimension hashed with the layer), so rows that share words are alike and
/// a probe can learn from them; `last` is noise from the whole prompt's hash.
fn fake_hidden(prompt: &str, states: &[crate::spec::HiddenState]) -> Vec<f32> {
    let mut out = Vec::new();
    for crate::spec::HiddenState { layer, pool } in states {
        {
            let mut v = [0f32; FAKE_HIDDEN_DIM];
            match pool {
                crate::spec::Pooling::Mean => {
                    let words: Vec<String> = prompt
                        .split_whitespace()
                        .map(|w| {
                            w.trim_matches(|c: char| !c.is_alphanumeric())
                                .to_lowercase()
                        })
                        .collect();
                    for w in &words {
                        let h = blake3::hash(format!("{layer}:{w}").as_bytes());
                        v[h.as_bytes()[0] as usize % FAKE_HIDDEN_DIM] += 1.0 / words.len() as f32;
                    }
                }
                crate::spec::Pooling::Last => {
                    let h = blake3::hash(format!("{layer}:{prompt}").as_bytes());
                    for (x, b) in v.iter_mut().zip(h.as_bytes()) {
                        *x = f32::from(*b) / 255.0;
                    }
                }
            }
            out.extend_from_slice(&v);
        }
    }
    out
}

/// Bag-of-words embeddings: each lowercase word adds ±1 to a hashed dimension, so texts that
/// share words are similar, and the vector depends on the text alone.
struct FakeEmbedder {
    calls: Arc<FakeCalls>,
    max_tokens: usize,
}

impl EmbedSession for FakeEmbedder {
    fn tokens(&self, text: &str) -> Vec<i32> {
        text.split_whitespace()
            .take(self.max_tokens)
            .map(|w| (blake3::hash(w.to_lowercase().as_bytes()).as_bytes()[0]) as i32)
            .collect()
    }

    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, BackendError> {
        self.calls
            .texts_embedded
            .fetch_add(texts.len(), Ordering::SeqCst);
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0.0f32; FAKE_DIMS];
                v[0] = 0.01;
                for w in t.split_whitespace().take(self.max_tokens) {
                    let w: String = w
                        .to_lowercase()
                        .chars()
                        .filter(|c| c.is_alphanumeric())
                        .collect();
                    let h = blake3::hash(w.as_bytes());
                    let b = h.as_bytes();
                    let sign = if b[1] & 1 == 0 { 1.0 } else { -1.0 };
                    v[b[0] as usize % FAKE_DIMS] += sign;
                }
                l2_normalise(&mut v);
                v
            })
            .collect())
    }
}
