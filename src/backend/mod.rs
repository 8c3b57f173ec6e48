//! The inference backend, behind a small trait: the planner, cache and executor are tested
//! with the deterministic [`fake`] backend; [`llama`] runs GGUF models in-process.
//!
//! A backend is created on the executor's worker thread and never leaves it (a llama.cpp
//! context is not `Send`): [`Backend::with_model`] loads a model and lends a [`Session`] to
//! a closure that runs every prompt of that model.

pub mod fake;
pub mod llama;
mod llama_embed;
pub mod server;

pub use llama_embed::raw_embed_throughput;

use std::path::PathBuf;

use crate::prompt::Messages;
pub use crate::spec::TextBudget;

/// What stands between the head and the tail of a text cut to a head-and-tail budget.
pub const ELISION: &str = " [...] ";

/// A text cut to `budget` from its pieces: `head` and `tail` of `n` units (tokens, or the
/// fake backend's words) joined as [`Session::truncate`] says, `None` when it fits.
pub fn cut_text(
    n: usize,
    budget: TextBudget,
    head: impl FnOnce(usize) -> String,
    tail: impl FnOnce(usize) -> String,
) -> Option<String> {
    if n <= budget.tokens() as usize {
        return None;
    }
    let mut out = head(budget.head as usize);
    if budget.tail > 0 {
        out.push_str(ELISION);
        out.push_str(&tail(n - budget.tail as usize));
    }
    Some(out)
}

/// `text`, whose tokens are `tokens`, cut to `budget` with `piece` turning a run of tokens
/// back into text; a character split between two tokens at a cut is dropped there.
pub fn cut_tokens<T>(
    text: &str,
    tokens: &[T],
    budget: TextBudget,
    piece: impl Fn(&[T]) -> String,
) -> String {
    cut_text(
        tokens.len(),
        budget,
        |head| {
            piece(&tokens[..head])
                .trim_end_matches('\u{FFFD}')
                .to_string()
        },
        |from| {
            piece(&tokens[from..])
                .trim_start_matches('\u{FFFD}')
                .to_string()
        },
    )
    .unwrap_or_else(|| text.to_string())
}

/// How many of a prompt's `tokens` every row of its template shares, given the tokens of
/// the template's fixed text alone: those tokens less the last (which may merge with what
/// follows), or fewer where the prompt's tokens part from them earlier.
pub fn shared_prefix_tokens<T: PartialEq>(tokens: &[T], prefix: &[T]) -> usize {
    let common = tokens
        .iter()
        .zip(prefix)
        .take_while(|(a, b)| a == b)
        .count();
    common.min(prefix.len().saturating_sub(1))
}
pub use crate::row::Finish;

/// What the executor needs to load a model.
#[derive(Debug, Clone)]
pub struct ModelLoad {
    pub id: String,
    pub path: PathBuf,
    pub n_ctx: u32,
    pub threads: usize,
    /// How prompts are evaluated: one at a time, or several per decode call.
    pub packing: Packing,
    /// A model behind a server: its rows go there instead of to the in-process engine.
    pub server: Option<std::sync::Arc<server::ServerModel>>,
}

/// Rows per decode call. `rows` 1: one prompt at a time with shared-prefix reuse (the
/// default on a CPU, where one prompt already keeps every core busy). More: up to `rows`
/// prompts decoded together, each in its own KV stream, `batch` tokens per decode call (the
/// throughput path of a GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packing {
    pub rows: usize,
    pub batch: usize,
}

impl Packing {
    pub const ONE_AT_A_TIME: Packing = Packing {
        rows: 1,
        batch: 512,
    };

    /// This build's default: packed on a GPU, one at a time on a CPU (measured: packing does
    /// not raise a CPU's throughput, bench/RESULTS.md), or `rows` rows when given.
    pub fn for_device(rows: Option<usize>) -> Packing {
        let gpu = cfg!(feature = "cuda");
        let rows = rows.unwrap_or(if gpu { 16 } else { 1 }).max(1);
        Packing {
            rows,
            batch: if rows == 1 {
                512
            } else if gpu {
                4096
            } else {
                512.max(rows * 64)
            },
        }
    }

    pub fn packed(&self) -> bool {
        self.rows > 1
    }

    /// What the engine version records: packed rows (or rows evaluated in other than
    /// 512-token calls) are not bitwise equal to the default's, so they are keyed apart.
    pub fn key_suffix(&self) -> String {
        if self.packed() {
            format!("; packed {}x{}", self.rows, self.batch)
        } else if *self != Self::ONE_AT_A_TIME {
            format!("; calls of {}", self.batch)
        } else {
            String::new()
        }
    }
}

/// What the embed stage needs to load a sentence-embedding model.
#[derive(Debug, Clone)]
pub struct EmbedderLoad {
    pub id: String,
    pub path: PathBuf,
    /// Texts are cut to this many tokens, special tokens included.
    pub max_tokens: u32,
    pub threads: usize,
}

/// A loaded embedding model.
pub trait EmbedSession {
    /// The token ids the embedder sees for `text`: special tokens included, cut to
    /// `max_tokens`.
    fn tokens(&self, text: &str) -> Vec<i32>;

    /// The L2-normalised pooled embedding of each text, in order. Each text's vector
    /// depends on that text alone.
    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, BackendError>;
}

/// A prompt in the model's own chat format, and how much of it every row of its template
/// shares. Only that shared part is ever reused from an earlier evaluation, so a row's
/// numbers do not depend on which rows ran before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatPrompt {
    pub text: String,
    /// Bytes of `text` that are the same for every row of the template.
    fixed: usize,
    /// Byte ranges of `text` that spell a control token but come from a message: they are
    /// tokenized as plain text (texts are data; only the chat template's markers are
    /// control tokens).
    plain: Vec<std::ops::Range<usize>>,
}

impl ChatPrompt {
    /// `fixed_render` is the chat template applied to the messages' fixed part; the two
    /// renderings agree on the prompt's fixed text.
    pub fn new(text: String, fixed_render: &str) -> Self {
        let mut fixed = 0;
        for ((i, a), b) in text.char_indices().zip(fixed_render.chars()) {
            if a != b {
                break;
            }
            fixed = i + a.len_utf8();
        }
        Self {
            text,
            fixed,
            plain: Vec::new(),
        }
    }

    /// The same prompt with these ranges (ascending, within `text`) kept as plain text.
    pub fn with_plain(mut self, plain: Vec<std::ops::Range<usize>>) -> Self {
        self.plain = plain;
        self
    }

    pub fn plain(&self) -> &[std::ops::Range<usize>] {
        &self.plain
    }

    pub fn fixed_text(&self) -> &str {
        &self.text[..self.fixed]
    }
}

/// One token of an evaluated prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptToken {
    pub id: i32,
    /// A control token of the vocabulary (a chat marker, BOS, EOS).
    pub control: bool,
}

/// Sampler settings of one generation; `temperature == 0` is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: i32,
    pub min_p: f64,
    /// Already mixed with the repeat index.
    pub seed: u64,
}

pub use crate::row::{FailureKind, TaskKind};

/// One thing to compute from an evaluated prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Free generation until an end-of-generation token, a stop string or `max_tokens`.
    Generate {
        max_tokens: u32,
        stop: Vec<String>,
        sampler: Sampler,
    },
    /// The log-probability of each continuation right after the prompt.
    Loglik {
        continuations: Vec<String>,
        /// Bytes of context kept free after the prompt, when more than the longest
        /// continuation: with per-row choices, the longest choice of the cell's rows, so that
        /// running a row and reading it back apply one limit.
        reserve: Option<usize>,
    },
    /// The hidden states the prompt's evaluation computes: `n_embd` values for each state,
    /// concatenated in order.
    Hidden {
        states: Vec<crate::spec::HiddenState>,
    },
}

impl Task {
    /// The kind a row of this task records.
    pub fn kind(&self) -> TaskKind {
        match self {
            Task::Generate { .. } => TaskKind::Generate,
            Task::Loglik { .. } => TaskKind::Loglik,
            Task::Hidden { .. } => TaskKind::Hidden,
        }
    }

    /// Context the task needs past the prompt: a generation's `max_tokens`; for
    /// log-likelihood, the longest continuation's length in bytes (a bound on its tokens
    /// that needs no tokenizer). A prompt fits a model's `n_ctx` with this task when
    /// `prompt tokens + context_after <= n_ctx`: the same rule runs the row and decides
    /// whether a cached row is valid for a cell with another `n_ctx`.
    pub fn context_after(&self) -> usize {
        match self {
            Task::Generate { max_tokens, .. } => *max_tokens as usize,
            Task::Loglik {
                continuations,
                reserve,
            } => continuations
                .iter()
                .map(String::len)
                .max()
                .unwrap_or(0)
                .max(reserve.unwrap_or(0)),
            Task::Hidden { .. } => 0,
        }
    }

    /// The task for the row with this prompt digest: a generation's seed mixed with it, so
    /// that the rows of one cell draw independently. With one seed for every row, every
    /// row would get the same uniform draw: a cell's accuracy would move with that one
    /// draw, and its rows would not be independent samples. Still a function of the row
    /// alone, as a cached row must be.
    pub fn for_row(mut self, prompt: &crate::key::Digest) -> Task {
        if let Task::Generate { sampler, .. } = &mut self {
            sampler.seed = mix_seed(
                b"pipeline-row-seed",
                &[&sampler.seed.to_le_bytes(), &prompt.0],
            );
        }
        self
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskOutput {
    /// Generated text (generation only).
    pub text: Option<String>,
    /// Log-probability of each continuation (log-likelihood only).
    pub logprobs: Option<Vec<f64>>,
    /// How many tokens each continuation has (log-likelihood only): what a per-token
    /// length-normalised choice divides by.
    pub choice_tokens: Option<Vec<u32>>,
    /// Pooled hidden states (hidden-state tasks only).
    pub hidden: Option<Vec<f32>>,
    pub gen_tokens: u32,
    pub finish: Finish,
    /// Time spent on this task after the prompt was evaluated.
    pub decode_ms: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptOutput {
    pub prompt_tokens: u32,
    /// Tokens actually evaluated: fewer than `prompt_tokens` when a prefix was reused.
    pub evaluated_tokens: u32,
    /// Leading tokens every row of the prompt's template shares (its fixed text): they are
    /// evaluated once and reused, so a row's own work is the rest. Unlike
    /// `evaluated_tokens` it does not depend on what ran before (issue #31); `None` where
    /// the backend does not know.
    pub prefix_tokens: Option<u32>,
    pub prefill_ms: f64,
    pub tasks: Vec<TaskOutput>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot load model {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("{path} is not an embedding model: {reason}")]
    NotEmbedding { path: PathBuf, reason: String },
    #[error(
        "prompt needs {needed} tokens of context ({prompt} prompt + {generate} to generate) but n_ctx is {n_ctx}; raise `n_ctx` or set `dataset.max_text_tokens`"
    )]
    ContextOverflow {
        needed: usize,
        prompt: usize,
        generate: usize,
        n_ctx: u32,
    },
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
    /// The executor's own work inside a session failed; the message says why.
    #[error("{0}")]
    Job(String),
    /// A model server failed a request for good (after its retries).
    #[error("{url}{}: {message}", status.map(|s| format!(" answered HTTP {s}")).unwrap_or_default())]
    Server {
        url: String,
        status: Option<u16>,
        message: String,
    },
}

impl BackendError {
    /// A short name for the kind of failure, recorded with a failed row.
    pub fn kind(&self) -> FailureKind {
        match self {
            BackendError::Load { .. } => FailureKind::Load,
            BackendError::NotEmbedding { .. } => FailureKind::NotEmbedding,
            BackendError::ContextOverflow { .. } => FailureKind::ContextOverflow,
            BackendError::ChatTemplate(_) => FailureKind::ChatTemplate,
            BackendError::Decode(_) => FailureKind::Decode,
            BackendError::Job(_) => FailureKind::Job,
            BackendError::Server { .. } => FailureKind::Server,
        }
    }

    /// Whether the failure belongs to one row (the run goes on without it) rather than to
    /// the engine or the model (the run cannot go on).
    pub fn is_row_error(&self) -> bool {
        !matches!(
            self,
            BackendError::Load { .. } | BackendError::NotEmbedding { .. }
        )
    }

    pub fn to_row_error(&self) -> crate::row::RowError {
        crate::row::RowError {
            kind: self.kind(),
            message: self.to_string(),
        }
    }
}

/// An inference engine that can load models one at a time.
pub trait Backend {
    /// Everything about the engine that can change an output; part of every row key.
    fn engine_version(&self) -> String;

    /// Load `model` and lend a session on it to `run`; the model is freed afterwards.
    fn with_model(
        &mut self,
        model: &ModelLoad,
        run: &mut dyn FnMut(&mut dyn Session) -> Result<(), BackendError>,
    ) -> Result<(), BackendError>;

    /// Load an embedding model and lend a session on it to `run`.
    fn with_embedder(
        &mut self,
        load: &EmbedderLoad,
        run: &mut dyn FnMut(&mut dyn EmbedSession) -> Result<(), BackendError>,
    ) -> Result<(), BackendError>;
}

/// Load `load`'s model and lend a session on it to `run`: the server's, for a model behind
/// one, else `backend`'s.
pub fn with_model(
    backend: &mut dyn Backend,
    load: &ModelLoad,
    run: &mut dyn FnMut(&mut dyn Session) -> Result<(), BackendError>,
) -> Result<(), BackendError> {
    match &load.server {
        Some(s) => server::with_model(s, run),
        None => backend.with_model(load, run),
    }
}

/// `v` scaled to unit length (a zero vector stays zero).
pub fn l2_normalise(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        for x in v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}

/// A loaded model.
pub trait Session {
    /// `text` cut to the budget in tokens of this model's tokenizer: the text itself when it
    /// fits, else its first `head` tokens and, with a `tail`, [`ELISION`] and its last
    /// `tail` tokens.
    fn truncate(&self, text: &str, budget: TextBudget) -> String;

    /// The model's own chat template applied to `messages`, with the assistant turn opened.
    fn format_chat(&self, messages: &Messages) -> Result<ChatPrompt, BackendError>;

    /// Evaluate `prompt` once and compute every task from that state. The result depends on
    /// the prompt and the tasks alone, never on what the session evaluated before.
    fn run(&mut self, prompt: &ChatPrompt, tasks: &[Task]) -> Result<PromptOutput, BackendError>;

    /// The tokens `prompt` is evaluated as, each with whether it is a control token. Texts
    /// are data: only the chat template's own markers are control tokens.
    fn tokens(&self, _prompt: &ChatPrompt) -> Result<Vec<PromptToken>, BackendError> {
        Err(BackendError::Job("this backend has no tokenizer".into()))
    }

    /// Several prompts, each with its tasks, evaluated together where the session packs
    /// rows (see [`Packing`]); one result per prompt. By default, one after another.
    fn run_many(
        &mut self,
        prompts: &[(ChatPrompt, Vec<Task>)],
    ) -> Vec<Result<PromptOutput, BackendError>> {
        prompts.iter().map(|(p, t)| self.run(p, t)).collect()
    }
}

/// Which backend a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// llama.cpp in-process.
    Llama,
    /// Deterministic stand-in for tests: no model is loaded.
    Fake,
}

impl BackendKind {
    pub fn engine_version(&self) -> String {
        match self {
            BackendKind::Llama => llama::engine_version(),
            // Tests stand in for a node of another CPU type by naming another engine.
            BackendKind::Fake => std::env::var("PIPELINE_FAKE_ENGINE")
                .unwrap_or_else(|_| fake::ENGINE_VERSION.to_string()),
        }
    }

    /// Create the backend; call this on the thread that will use it.
    pub fn create(&self) -> Box<dyn Backend> {
        match self {
            BackendKind::Llama => Box::new(llama::LlamaEngine::new()),
            BackendKind::Fake => Box::new(fake::FakeBackend::from_env()),
        }
    }
}

/// Seed for llama.cpp's `dist` sampler (u32), mixed from the grid seed and repeat index.
/// `u32::MAX` means "random" to llama.cpp, so it is never returned.
pub fn sampler_seed(seed: u64, repeat: u32) -> u64 {
    mix_seed(
        b"pipeline-sampler-seed",
        &[&seed.to_le_bytes(), &repeat.to_le_bytes()],
    )
}

/// A u32 seed (never `u32::MAX`) from a domain and parts.
fn mix_seed(domain: &[u8], parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(domain);
    for p in parts {
        h.update(p);
    }
    let b = h.finalize();
    let s = u32::from_le_bytes(b.as_bytes()[..4].try_into().expect("4 bytes"));
    u64::from(if s == u32::MAX { 0 } else { s })
}

/// A sampled generation of `max_tokens` with `seed`, for unit tests.
#[cfg(test)]
pub(crate) fn sampled_generation(max_tokens: u32, seed: u64) -> Task {
    Task::Generate {
        max_tokens,
        stop: Vec::new(),
        sampler: Sampler {
            temperature: 0.8,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed,
        },
    }
}

#[cfg(test)]
mod cut_tests {
    use super::*;

    fn cut(text: &str, budget: TextBudget) -> String {
        let words: Vec<&str> = text.split(' ').collect();
        cut_text(
            words.len(),
            budget,
            |h| words[..h].join(" "),
            |f| words[f..].join(" "),
        )
        .unwrap_or_else(|| text.to_string())
    }

    #[test]
    fn a_head_and_tail_budget_keeps_both_ends_and_marks_the_cut() {
        let text = "a b c d e f g h i j";
        assert_eq!(cut(text, TextBudget::head(4)), "a b c d");
        // 6 tokens: 2 from the start, 4 from the end.
        let b = TextBudget::head_tail(6);
        assert_eq!((b.head, b.tail), (2, 4));
        assert_eq!(cut(text, b), "a b [...] g h i j");
        assert_eq!(cut(text, TextBudget { head: 0, tail: 3 }), " [...] h i j");
        // A text within the budget is kept whole, marker-free.
        assert_eq!(cut(text, TextBudget::head_tail(10)), text);
        assert_eq!(TextBudget::head_tail(384).head, 128);
        assert_eq!(TextBudget::head_tail(384).tokens(), 384);
    }
}

#[cfg(test)]
mod row_seed_tests {
    use super::*;
    use crate::key::Digest;

    fn generate(seed: u64) -> Task {
        sampled_generation(4, seed)
    }

    fn seed_of(t: &Task) -> Option<u64> {
        match t {
            Task::Generate { sampler, .. } => Some(sampler.seed),
            Task::Loglik { .. } | Task::Hidden { .. } => None,
        }
    }

    #[test]
    fn rows_of_one_cell_draw_with_their_own_seeds_and_a_row_always_with_the_same() {
        let cell = generate(sampler_seed(1, 0));
        let a = seed_of(&cell.clone().for_row(&Digest([1; 32])));
        let b = seed_of(&cell.clone().for_row(&Digest([2; 32])));
        assert_ne!(a, b);
        assert_eq!(a, seed_of(&cell.clone().for_row(&Digest([1; 32]))));
        // Another grid seed moves the same row's draw.
        let other = generate(sampler_seed(2, 0));
        assert_ne!(a, seed_of(&other.clone().for_row(&Digest([1; 32]))));
        assert!(a.is_some_and(|s| s < u64::from(u32::MAX)));
        // Log-likelihood has nothing to seed.
        let loglik = Task::Loglik {
            continuations: vec!["a".into()],
            reserve: None,
        };
        assert_eq!(loglik.clone().for_row(&Digest([1; 32])), loglik);
    }
}
