//! llama.cpp in-process through `llama-cpp-2`.
//!
//! A row's numbers are a function of its key alone. llama.cpp's floats depend on how a prompt
//! is split into decode calls and on how much of the KV cache is reused (on SmolLM2 the same
//! prompt moved by 0.29 nats), so each prompt is evaluated with a layout fixed by the prompt
//! itself: the part that every row of its template shares (chat header, system prompt, fixed
//! examples, the template text before the first row value) in `N_BATCH` pieces from position
//! 0, then the rest in `N_BATCH` pieces from there. One session keeps a single sequence in
//! the KV cache and reuses a cached prefix only where the same decode calls produced it, so
//! the shared part is evaluated once per template and model. Every task of a prompt starts
//! from the prompt's last-token logits, and the KV cache is cut back to the prompt after each
//! task: a task's result does not depend on which other tasks ran beside it.

use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;

use super::{
    Backend, BackendError, ChatPrompt, Finish, ModelLoad, Packing, PromptOutput, Sampler, Session,
    Task, TaskOutput,
};
use crate::prompt::Messages;

mod hidden;
mod markers;
mod packed;

/// Tokens per decode call while evaluating a prompt.
const N_BATCH: usize = 512;

/// Bump when the decoding procedure here changes in a way that can change outputs.
/// r2: the evaluation layout (ubatch boundaries, reused prefix) is a function of the prompt
/// alone, so a row's numbers no longer depend on what the session evaluated before it.
const DECODE_REVISION: u32 = 2;

pub fn engine_version() -> String {
    let device = if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "cpu"
    };
    format!(
        "llama.cpp via llama-cpp-sys-2 {}; {device} {}; decode r{DECODE_REVISION}",
        env!("PIPELINE_LLAMA_SYS_VERSION"),
        cpu_features()
    )
}

/// The SIMD features llama.cpp was compiled with, as ggml itself reports them: its kernels,
/// and so its exact numbers, depend on them.
fn cpu_features() -> String {
    use llama_cpp_sys_2 as sys;
    // SAFETY: each of these only returns a constant fixed when ggml was compiled.
    let features: [(&str, i32); 18] = unsafe {
        [
            ("sse3", sys::ggml_cpu_has_sse3()),
            ("ssse3", sys::ggml_cpu_has_ssse3()),
            ("avx", sys::ggml_cpu_has_avx()),
            ("avx2", sys::ggml_cpu_has_avx2()),
            ("avx_vnni", sys::ggml_cpu_has_avx_vnni()),
            ("f16c", sys::ggml_cpu_has_f16c()),
            ("fma", sys::ggml_cpu_has_fma()),
            ("bmi2", sys::ggml_cpu_has_bmi2()),
            ("avx512", sys::ggml_cpu_has_avx512()),
            ("avx512_vbmi", sys::ggml_cpu_has_avx512_vbmi()),
            ("avx512_vnni", sys::ggml_cpu_has_avx512_vnni()),
            ("avx512_bf16", sys::ggml_cpu_has_avx512_bf16()),
            ("amx_int8", sys::ggml_cpu_has_amx_int8()),
            ("neon", sys::ggml_cpu_has_neon()),
            ("dotprod", sys::ggml_cpu_has_dotprod()),
            ("matmul_int8", sys::ggml_cpu_has_matmul_int8()),
            ("sve", sys::ggml_cpu_has_sve()),
            ("llamafile", sys::ggml_cpu_has_llamafile()),
        ]
    };
    let on: Vec<&str> = features
        .iter()
        .filter(|(_, on)| *on != 0)
        .map(|(n, _)| *n)
        .collect();
    if on.is_empty() {
        "baseline".into()
    } else {
        on.join("+")
    }
}

/// llama.cpp's global state, initialised once per process.
pub(super) fn llama_backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        let mut b = LlamaBackend::init().expect("llama.cpp backend initialises once");
        if std::env::var_os("PIPELINE_LLAMA_LOG").is_none() {
            b.void_logs();
        }
        b
    })
}

pub struct LlamaEngine;

impl LlamaEngine {
    pub fn new() -> Self {
        llama_backend();
        Self
    }
}

impl Default for LlamaEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for LlamaEngine {
    fn engine_version(&self) -> String {
        engine_version()
    }

    fn with_model(
        &mut self,
        load: &ModelLoad,
        run: &mut dyn FnMut(&mut dyn Session) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let backend = llama_backend();
        let model = load_model(&load.path)?;
        let load_err = |reason: String| BackendError::Load {
            path: load.path.clone(),
            reason,
        };
        let threads = thread_count(load.threads);
        let p = load.packing;
        // Packed: one KV stream of `n_ctx` per row (non-unified: no attention crosses rows),
        // and decode calls of `batch` tokens.
        let (n_ctx, batch, seqs) = if p.packed() {
            (load.n_ctx * p.rows as u32, p.batch, p.rows as u32)
        } else {
            (load.n_ctx, p.batch, 1)
        };
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(batch as u32)
            .with_n_ubatch(batch as u32)
            .with_n_seq_max(seqs)
            .with_kv_unified(false)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let capture = hidden::Capture::new(usize::try_from(model.n_embd()).unwrap_or(0));
        let ctx_params = capture.install(ctx_params)?;
        let ctx = model.new_context(backend, ctx_params).map_err(|e| {
            load_err(format!(
                "cannot create a context with n_ctx {}: {e}",
                load.n_ctx
            ))
        })?;
        let mut session = LlamaSession {
            template: model.chat_template(None).ok(),
            model: &model,
            ctx,
            kv_tokens: Vec::new(),
            kv_chunks: Vec::new(),
            n_ctx: load.n_ctx,
            batch: LlamaBatch::new(batch, 1),
            packing: p,
            last_prompt: None,
            markers: markers::Markers::of(&model),
            capture,
        };
        run(&mut session)
    }

    fn with_embedder(
        &mut self,
        load: &super::EmbedderLoad,
        run: &mut dyn FnMut(&mut dyn super::EmbedSession) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        super::llama_embed::with_embedder(load, run)
    }
}

struct LlamaSession<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    template: Option<LlamaChatTemplate>,
    /// The tokens whose keys and values sit in the KV cache (sequence 0), in order.
    kv_tokens: Vec<LlamaToken>,
    /// End position of each decode call that produced `kv_tokens`, ascending: a cached
    /// position is reused only when it was computed by the very calls a fresh evaluation
    /// of the new prompt would make.
    kv_chunks: Vec<usize>,
    /// Context per row.
    n_ctx: u32,
    batch: LlamaBatch<'static>,
    packing: Packing,
    /// The last prompt evaluated and its last-token logits, while the KV cache still holds
    /// exactly that prompt from its own layout: the executor runs a prompt's tasks in parts,
    /// and every part after the first starts from these logits instead of evaluating the
    /// last chunk again. Same state, same logits: a row's numbers do not change.
    last_prompt: Option<EvaluatedPrompt>,
    /// The vocabulary's control-token strings, to keep them plain inside messages.
    markers: Option<markers::Markers>,
    /// What the eval callback copies of the layers' outputs (after `ctx`: dropped after
    /// the context that calls into it).
    capture: hidden::Capture,
}

/// A prompt whose evaluation sits in the KV cache.
struct EvaluatedPrompt {
    tokens: Vec<LlamaToken>,
    logits: Vec<f32>,
}

/// Load a GGUF model (every layer on the GPU in CUDA builds).
pub(super) fn load_model(path: &std::path::Path) -> Result<LlamaModel, BackendError> {
    let mut params = LlamaModelParams::default();
    if cfg!(feature = "cuda") {
        params = params.with_n_gpu_layers(1000);
    }
    LlamaModel::load_from_file(llama_backend(), path, &params).map_err(|e| BackendError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// llama.cpp's thread count.
pub(super) fn thread_count(threads: usize) -> i32 {
    i32::try_from(threads.max(1)).unwrap_or(1)
}

pub(super) fn decode_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Decode(e.to_string())
}

/// Which tokens of a decode call get logits.
#[derive(Clone, Copy, PartialEq)]
enum Logits {
    Last,
    All,
}

/// The decode calls that evaluate a prompt of `n` tokens whose first `fixed` tokens are the
/// same for every row of its template, as chunk end positions: the fixed prefix in
/// `chunk`-token pieces from 0, then the rest in such pieces from the prefix's end
/// (`N_BATCH` tokens unless a diagnostic asks for smaller calls).
/// llama.cpp's numbers depend on how tokens are grouped into ubatches, so the grouping is a
/// function of the prompt alone, never of what the KV cache held before.
fn layout(n: usize, fixed: usize, chunk: usize) -> Vec<usize> {
    let fixed = fixed.min(n);
    let mut ends: Vec<usize> = (1..=fixed.div_ceil(chunk))
        .map(|i| (i * chunk).min(fixed))
        .collect();
    let rest = n - fixed;
    ends.extend((1..=rest.div_ceil(chunk)).map(|i| fixed + (i * chunk).min(rest)));
    ends
}

/// The longest cached prefix that a fresh evaluation with `layout` would compute with the
/// same decode calls: it ends at a chunk end below the prompt's last chunk (whose logits
/// are needed), every earlier chunk end coincides, and the tokens are the same.
fn reusable(
    kv_tokens: &[LlamaToken],
    kv_chunks: &[usize],
    tokens: &[LlamaToken],
    layout: &[usize],
) -> usize {
    let mut best = 0;
    for (i, (&a, &b)) in kv_chunks.iter().zip(layout).enumerate() {
        if a != b || i + 1 == layout.len() || a > kv_tokens.len() {
            break;
        }
        if kv_tokens[best..a] != tokens[best..a] {
            break;
        }
        best = a;
    }
    best
}

impl LlamaSession<'_> {
    /// Drop every cached position from `pos` on (`pos` is a chunk end).
    fn truncate_kv(&mut self, pos: usize) -> Result<(), BackendError> {
        if self.kv_tokens.len() > pos {
            self.ctx
                .clear_kv_cache_seq(Some(0), Some(pos as u32), None)
                .map_err(decode_err)?;
            self.kv_tokens.truncate(pos);
        }
        self.kv_chunks.retain(|&end| end <= pos);
        Ok(())
    }

    /// Forget the whole KV cache (after an error, so that no half-done state is reused).
    fn reset_kv(&mut self) {
        self.ctx.clear_kv_cache();
        self.kv_tokens.clear();
        self.kv_chunks.clear();
        self.last_prompt = None;
    }

    /// One decode call appending `tokens` (at most a chunk) at the end of the sequence.
    fn decode(&mut self, tokens: &[LlamaToken], logits: Logits) -> Result<(), BackendError> {
        debug_assert!(!tokens.is_empty() && tokens.len() <= self.packing.batch);
        self.batch.clear();
        let start = self.kv_tokens.len();
        for (j, &t) in tokens.iter().enumerate() {
            let wanted = match logits {
                Logits::Last => j + 1 == tokens.len(),
                Logits::All => true,
            };
            self.batch
                .add(t, (start + j) as i32, &[0], wanted)
                .map_err(decode_err)?;
        }
        self.ctx.decode(&mut self.batch).map_err(decode_err)?;
        self.kv_tokens.extend_from_slice(tokens);
        self.kv_chunks.push(self.kv_tokens.len());
        Ok(())
    }

    /// The prompt's token count that is the same for every row of its template: the
    /// tokens of the fixed text, less the last one (which may merge with what follows).
    pub(super) fn fixed_tokens(&self, tokens: &[LlamaToken], fixed_text: &str) -> usize {
        if fixed_text.is_empty() {
            return 0;
        }
        let fixed = self
            .model
            .vocab()
            .tokenize(fixed_text.as_bytes(), true, true);
        super::shared_prefix_tokens(tokens, &fixed)
    }

    /// One generation in sequence 0 after the prompt; the KV cache is cut back afterwards.
    fn generate(
        &mut self,
        prompt_len: usize,
        prompt_logits: &[f32],
        max_tokens: u32,
        stop: &[String],
        s: &Sampler,
    ) -> Result<TaskOutput, BackendError> {
        let start = Instant::now();
        let vocab = self.model.vocab();
        let mut g = Generation::new(max_tokens, stop, s);
        let mut next = g.step(&vocab, prompt_logits)?;
        while let Some(tok) = next {
            self.decode(&[tok], Logits::Last)?;
            let logits = self.ctx.get_logits_ith(0).to_vec();
            next = g.step(&vocab, &logits)?;
        }
        self.truncate_kv(prompt_len)?;
        g.decode_ms = start.elapsed().as_secs_f64() * 1000.0;
        Ok(g.into_output())
    }

    fn loglik(
        &mut self,
        prompt_len: usize,
        prompt_logits: &[f32],
        continuations: &[String],
    ) -> Result<TaskOutput, BackendError> {
        let start = Instant::now();
        let first_norm = log_sum_exp(prompt_logits);
        let mut out = Vec::with_capacity(continuations.len());
        let mut counts = Vec::with_capacity(continuations.len());
        for cont in continuations {
            let toks = self.model.vocab().tokenize(cont.as_bytes(), false, false);
            counts.push(toks.len() as u32);
            let Some(&first) = toks.first() else {
                return Err(BackendError::Job(format!("label `{cont}` has no tokens")));
            };
            let mut lp = f64::from(prompt_logits[first.0 as usize]) - first_norm;
            if toks.len() > 1 {
                // Multi-token label: feed all but its last token in one decode call, read
                // each next-token logit.
                let fed = &toks[..toks.len() - 1];
                if fed.len() > self.packing.batch {
                    return Err(BackendError::Job(format!(
                        "label `{cont}` is longer than {} tokens",
                        self.packing.batch
                    )));
                }
                self.decode(fed, Logits::All)?;
                for (j, next) in toks[1..].iter().enumerate() {
                    let l = self.ctx.get_logits_ith(j as i32);
                    lp += f64::from(l[next.0 as usize]) - log_sum_exp(l);
                }
                self.truncate_kv(prompt_len)?;
            }
            out.push(lp);
        }
        Ok(TaskOutput {
            text: None,
            logprobs: Some(out),
            choice_tokens: Some(counts),
            hidden: None,
            gen_tokens: 0,
            finish: Finish::Scored,
            decode_ms: start.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Evaluate the prompt with its own layout, reusing only cached chunks that the same
    /// layout produced; returns the last token's logits and the tokens evaluated.
    fn prefill(
        &mut self,
        tokens: &[LlamaToken],
        fixed: usize,
        capture: bool,
    ) -> Result<(Vec<f32>, usize), BackendError> {
        let ends = layout(tokens.len(), fixed, self.packing.batch);
        if let Some(last) = &self.last_prompt
            && !capture
            && last.tokens == tokens
            && self.kv_tokens == tokens
            && self.kv_chunks == ends
        {
            return Ok((last.logits.clone(), 0));
        }
        self.last_prompt = None;
        let mut reuse = reusable(&self.kv_tokens, &self.kv_chunks, tokens, &ends);
        if capture {
            // Every token after the shared prefix is evaluated, so that its hidden states
            // are seen; the prefix's chunks are the same calls either way.
            reuse = ends
                .iter()
                .copied()
                .filter(|&e| e <= fixed.min(reuse))
                .max()
                .unwrap_or(0);
        }
        self.truncate_kv(reuse)?;
        let mut from = reuse;
        for &end in ends.iter().filter(|&&e| e > reuse) {
            // Every call asks for its last token's logits (a decode call with no output
            // rows is a path llama.cpp's CPU kernels are not exercised on).
            self.decode(&tokens[from..end], Logits::Last)?;
            from = end;
        }
        let last_call = ends.len().checked_sub(2).map_or(0, |i| ends[i]);
        let last = (tokens.len() - last_call.max(reuse)) as i32;
        let logits = self.ctx.get_logits_ith(last - 1).to_vec();
        self.last_prompt = Some(EvaluatedPrompt {
            tokens: tokens.to_vec(),
            logits: logits.clone(),
        });
        Ok((logits, tokens.len() - reuse))
    }
}

impl Session for LlamaSession<'_> {
    fn truncate(&self, text: &str, budget: super::TextBudget) -> String {
        let vocab = self.model.vocab();
        let toks = vocab.tokenize(text.as_bytes(), false, false);
        super::cut_tokens(text, &toks, budget, |range| {
            String::from_utf8_lossy(&vocab.detokenize(range, false, false)).into_owned()
        })
    }

    fn format_chat(&self, m: &Messages) -> Result<ChatPrompt, BackendError> {
        let text = self.apply_template(m)?;
        let fixed = self.apply_template(&m.fixed_part())?;
        let plain =
            markers::plain_ranges(self.markers.as_ref(), m, &text, |m| self.apply_template(m))?;
        Ok(ChatPrompt::new(text, &fixed).with_plain(plain))
    }

    fn tokens(&self, prompt: &ChatPrompt) -> Result<Vec<super::PromptToken>, BackendError> {
        let vocab = self.model.vocab();
        Ok(self
            .tokenize_prompt(prompt)
            .into_iter()
            .map(|t| super::PromptToken {
                id: t.0,
                control: markers::is_control(&vocab, t),
            })
            .collect())
    }

    fn run(&mut self, prompt: &ChatPrompt, tasks: &[Task]) -> Result<PromptOutput, BackendError> {
        if self.packing.packed() {
            // A packed session evaluates every prompt the packed way (its rows' keys say so).
            let one = [(prompt.clone(), tasks.to_vec())];
            return self.run_many(&one).remove(0);
        }
        let result = self.run_prompt(prompt, tasks);
        if result.is_err() {
            // Whatever the failure left in the KV cache is never reused.
            self.reset_kv();
        }
        result
    }

    fn run_many(
        &mut self,
        prompts: &[(ChatPrompt, Vec<Task>)],
    ) -> Vec<Result<PromptOutput, BackendError>> {
        if !self.packing.packed() {
            return prompts.iter().map(|(p, t)| self.run(p, t)).collect();
        }
        prompts
            .chunks(self.packing.rows)
            .flat_map(|group| self.run_packed(group))
            .collect()
    }
}

impl LlamaSession<'_> {
    /// The prompt's tokens: control tokens parsed in the template's text, never in the
    /// messages' (see [`markers`]); the BOS token first where the model wants one.
    fn tokenize_prompt(&self, prompt: &ChatPrompt) -> Vec<LlamaToken> {
        let vocab = self.model.vocab();
        let mut tokens = Vec::new();
        for (i, piece) in markers::pieces(prompt).into_iter().enumerate() {
            vocab.tokenize_into(
                piece.text.as_bytes(),
                &mut tokens,
                i == 0,
                piece.parse_control,
            );
        }
        tokens
    }

    fn apply_template(&self, m: &Messages) -> Result<String, BackendError> {
        let Some(tmpl) = &self.template else {
            return Err(BackendError::ChatTemplate(
                "the model has no chat template in its GGUF metadata".into(),
            ));
        };
        let mut msgs = Vec::new();
        let bad = |e: &dyn std::fmt::Display| BackendError::ChatTemplate(e.to_string());
        if let Some(sys) = &m.system {
            msgs.push(LlamaChatMessage::new("system".into(), sys.clone()).map_err(|e| bad(&e))?);
        }
        msgs.push(LlamaChatMessage::new("user".into(), m.user.clone()).map_err(|e| bad(&e))?);
        self.model
            .apply_chat_template(tmpl, &msgs, true)
            .map_err(|e| bad(&e))
    }

    /// The layer indices the tasks' hidden states come from, each once.
    fn wanted_layers(&self, tasks: &[Task]) -> Result<Vec<u32>, BackendError> {
        let n_layer = self.model.n_layer();
        let mut out = Vec::new();
        for t in tasks {
            if let Task::Hidden { states } = t {
                for s in states {
                    let i = s.layer.index(n_layer);
                    if i + 1 == n_layer && s.pool == crate::spec::Pooling::Mean {
                        return Err(BackendError::Job(format!(
                            "layer {} is the model's last ({i}), whose output llama.cpp computes only where logits are read: pool it `last`, or read an earlier layer",
                            s.layer
                        )));
                    }
                    if !out.contains(&i) {
                        out.push(i);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The prompt's tokens, if the prompt and its longest task fit the row's context.
    fn prompt_tokens(
        &self,
        prompt: &ChatPrompt,
        tasks: &[Task],
    ) -> Result<Vec<LlamaToken>, BackendError> {
        let tokens = self.tokenize_prompt(prompt);
        if tokens.is_empty() {
            return Err(BackendError::Job("empty prompt".into()));
        }
        // Context needed past the prompt: the longest generation or label.
        let after = tasks.iter().map(Task::context_after).max().unwrap_or(0);
        if tokens.len() + after > self.n_ctx as usize {
            return Err(BackendError::ContextOverflow {
                needed: tokens.len() + after,
                prompt: tokens.len(),
                generate: after,
                n_ctx: self.n_ctx,
            });
        }
        Ok(tokens)
    }

    fn run_prompt(
        &mut self,
        prompt: &ChatPrompt,
        tasks: &[Task],
    ) -> Result<PromptOutput, BackendError> {
        let start = Instant::now();
        let tokens = self.prompt_tokens(prompt, tasks)?;
        let fixed = self
            .fixed_tokens(&tokens, prompt.fixed_text())
            .min(tokens.len() - 1);
        let wanted = self.wanted_layers(tasks)?;
        if !wanted.is_empty() {
            self.capture.start(&wanted);
        }
        let prefilled = self.prefill(&tokens, fixed, !wanted.is_empty());
        let captured = if wanted.is_empty() {
            Vec::new()
        } else {
            self.capture.finish()?
        };
        let (prompt_logits, evaluated) = prefilled?;
        let prefill_ms = start.elapsed().as_secs_f64() * 1000.0;
        let n = tokens.len();
        let states = hidden::States {
            layers: &wanted,
            rows: &captured,
            n_embd: self.capture.n_embd(),
            n_layer: self.model.n_layer(),
            evaluated_from: n - evaluated,
            own_from: fixed,
            n,
        };
        let mut outs = Vec::with_capacity(tasks.len());
        for t in tasks {
            outs.push(match t {
                Task::Generate {
                    max_tokens,
                    stop,
                    sampler,
                } => self.generate(n, &prompt_logits, *max_tokens, stop, sampler)?,
                Task::Loglik { continuations, .. } => {
                    self.loglik(n, &prompt_logits, continuations)?
                }
                Task::Hidden { states: wanted } => states.pooled(wanted)?,
            });
        }
        Ok(PromptOutput {
            prompt_tokens: n as u32,
            evaluated_tokens: evaluated as u32,
            prefix_tokens: Some(fixed as u32),
            prefill_ms,
            tasks: outs,
        })
    }
}

/// The state of one generation: its sampler, what it produced, and why it stopped.
struct Generation<'a> {
    chain: Option<LlamaSampler>,
    max_tokens: u32,
    stop: &'a [String],
    bytes: Vec<u8>,
    text: String,
    gen_tokens: u32,
    finish: Finish,
    decode_ms: f64,
}

impl<'a> Generation<'a> {
    fn new(max_tokens: u32, stop: &'a [String], s: &Sampler) -> Self {
        Self {
            chain: (s.temperature > 0.0).then(|| sampler_chain(s)),
            max_tokens,
            stop,
            bytes: Vec::new(),
            text: String::new(),
            gen_tokens: 0,
            finish: Finish::Length,
            decode_ms: 0.0,
        }
    }

    /// Choose the next token from `logits` and record it; `Some(token)` when the generation
    /// goes on and that token must be fed to the model.
    fn step(
        &mut self,
        vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
        logits: &[f32],
    ) -> Result<Option<LlamaToken>, BackendError> {
        let tok = match self.chain.as_mut() {
            None => argmax(logits),
            Some(chain) => {
                let mut cand = LlamaTokenDataArray::from_iter(
                    logits
                        .iter()
                        .enumerate()
                        .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
                    false,
                );
                cand.apply_sampler(chain);
                cand.selected_token()
                    .ok_or_else(|| BackendError::Decode("sampler selected no token".into()))?
            }
        };
        if vocab.is_eog(tok) {
            self.finish = Finish::Eog;
            return Ok(None);
        }
        self.gen_tokens += 1;
        self.bytes.extend(vocab.token_to_piece(tok, false, None));
        self.text = String::from_utf8_lossy(&self.bytes).into_owned();
        if let Some(cut) = self
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(cut);
            self.finish = Finish::Stop;
            return Ok(None);
        }
        if self.gen_tokens == self.max_tokens {
            self.finish = Finish::Length;
            return Ok(None);
        }
        Ok(Some(tok))
    }

    fn into_output(self) -> TaskOutput {
        TaskOutput {
            text: Some(self.text),
            logprobs: None,
            choice_tokens: None,
            hidden: None,
            gen_tokens: self.gen_tokens,
            finish: self.finish,
            decode_ms: self.decode_ms,
        }
    }
}

/// The sampler chain in llama.cpp's usual order; `dist` draws with the task's own seed.
fn sampler_chain(s: &Sampler) -> LlamaSampler {
    let mut chain = Vec::new();
    if s.top_k > 0 {
        chain.push(LlamaSampler::top_k(s.top_k));
    }
    if s.top_p < 1.0 {
        chain.push(LlamaSampler::top_p(s.top_p as f32, 1));
    }
    if s.min_p > 0.0 {
        chain.push(LlamaSampler::min_p(s.min_p as f32, 1));
    }
    chain.push(LlamaSampler::temp(s.temperature as f32));
    chain.push(LlamaSampler::dist(s.seed as u32));
    LlamaSampler::chain_simple(chain)
}

/// Index of the largest logit (the first one on ties).
fn argmax(logits: &[f32]) -> LlamaToken {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    LlamaToken(best as i32)
}

fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    max + sum.ln()
}

/// llama.cpp's raw speed through this binding, as `llama-bench` measures it: `pp512` is one
/// 512-token batch evaluated from an empty KV cache, `tg32` is 32 single-token decodes from
/// position 0. One warm-up and `reps` timed repetitions; medians in tokens per second.
pub fn raw_throughput(
    path: &std::path::Path,
    threads: usize,
    reps: usize,
) -> Result<(f64, f64), BackendError> {
    let backend = llama_backend();
    let err = |e: &dyn std::fmt::Display| BackendError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .map_err(|e| err(&e))?;
    let t = i32::try_from(threads.max(1)).unwrap_or(1);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(4096))
        .with_n_batch(N_BATCH as u32)
        .with_n_ubatch(N_BATCH as u32)
        .with_n_threads(t)
        .with_n_threads_batch(t);
    let mut ctx = model.new_context(backend, params).map_err(|e| err(&e))?;
    let nv = model.n_vocab() as usize;
    let toks: Vec<LlamaToken> = (0..512)
        .map(|i| LlamaToken(((i * 7919 + 13) % nv) as i32))
        .collect();
    let mut batch = LlamaBatch::new(N_BATCH, 1);
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        ctx.clear_kv_cache();
        batch.clear();
        for (i, &tok) in toks.iter().enumerate() {
            batch
                .add(tok, i as i32, &[0], i + 1 == toks.len())
                .map_err(decode_err)?;
        }
        let start = Instant::now();
        ctx.decode(&mut batch).map_err(decode_err)?;
        let pp_s = start.elapsed().as_secs_f64();
        ctx.clear_kv_cache();
        let start = Instant::now();
        for (i, &tok) in toks[..32].iter().enumerate() {
            batch.clear();
            batch.add(tok, i as i32, &[0], true).map_err(decode_err)?;
            ctx.decode(&mut batch).map_err(decode_err)?;
        }
        let tg_s = start.elapsed().as_secs_f64();
        if rep > 0 {
            pp.push(512.0 / pp_s);
            tg.push(32.0 / tg_s);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(&mut pp), median(&mut tg)))
}

/// llama.cpp's raw prompt-processing rate when `rows` sequences of `batch / rows` tokens
/// each are decoded in one call, each in its own KV stream: the limit a packed run works
/// against. One warm-up and `reps` timed repetitions; the median in tokens per second.
pub fn raw_packed_throughput(
    path: &std::path::Path,
    threads: usize,
    rows: usize,
    batch: usize,
    reps: usize,
) -> Result<f64, BackendError> {
    let backend = llama_backend();
    let model = load_model(path)?;
    let per_row = (batch / rows.max(1)).max(1);
    let t = thread_count(threads);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new((rows * per_row.max(256)) as u32))
        .with_n_batch((rows * per_row) as u32)
        .with_n_ubatch((rows * per_row) as u32)
        .with_n_seq_max(rows as u32)
        .with_kv_unified(false)
        .with_n_threads(t)
        .with_n_threads_batch(t);
    let mut ctx = model
        .new_context(backend, params)
        .map_err(|e| BackendError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let nv = model.n_vocab() as usize;
    let mut b = LlamaBatch::new(rows * per_row, 1);
    let mut rates = Vec::new();
    for rep in 0..=reps {
        ctx.clear_kv_cache();
        b.clear();
        for r in 0..rows {
            for i in 0..per_row {
                let tok = LlamaToken((((r * per_row + i) * 7919 + 13) % nv) as i32);
                b.add(tok, i as i32, &[r as i32], i + 1 == per_row)
                    .map_err(decode_err)?;
            }
        }
        let start = Instant::now();
        ctx.decode(&mut b).map_err(decode_err)?;
        if rep > 0 {
            rates.push((rows * per_row) as f64 / start.elapsed().as_secs_f64());
        }
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}
