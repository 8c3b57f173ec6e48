//! llama.cpp in-process through `llama-cpp-2`.
//!
//! One session keeps a single sequence in the KV cache and remembers its tokens, so that
//! consecutive prompts reuse their longest common prefix (chat header, system prompt,
//! few-shot examples) and only the rest is evaluated. Every task of a prompt starts from the
//! prompt's stored last-token logits, and the KV cache is cut back to the prompt after each
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
    Backend, BackendError, Finish, ModelLoad, PromptOutput, Sampler, Session, Task, TaskOutput,
};
use crate::prompt::Messages;

/// Tokens per decode call while evaluating a prompt.
const N_BATCH: usize = 512;

/// Most generations decoded side by side. llama.cpp (ggml-org/llama.cpp#24962) gives wrong
/// logits when one decode call with a unified KV cache holds tokens of several sequences and
/// 32 or more tokens in all; a batch of one token per generation stays well below that.
pub const MAX_SIDE_BY_SIDE: usize = 16;

/// Bump when the decoding procedure here changes in a way that can change outputs.
const DECODE_REVISION: u32 = 1;

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

/// The SIMD features llama.cpp was compiled with: its kernels, and so its exact numbers,
/// depend on them.
fn cpu_features() -> String {
    let features = [
        ("sse4.2", cfg!(target_feature = "sse4.2")),
        ("avx", cfg!(target_feature = "avx")),
        ("avx2", cfg!(target_feature = "avx2")),
        ("fma", cfg!(target_feature = "fma")),
        ("f16c", cfg!(target_feature = "f16c")),
        ("avx512f", cfg!(target_feature = "avx512f")),
        ("avx512vnni", cfg!(target_feature = "avx512vnni")),
        ("neon", cfg!(target_feature = "neon")),
    ];
    let on: Vec<&str> = features
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
    if on.is_empty() {
        "baseline".into()
    } else {
        on.join("+")
    }
}

/// llama.cpp's global state, initialised once per process.
fn llama_backend() -> &'static LlamaBackend {
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
        let load_err = |reason: String| BackendError::Load {
            path: load.path.clone(),
            reason,
        };
        let mut params = LlamaModelParams::default();
        if cfg!(feature = "cuda") {
            params = params.with_n_gpu_layers(1000);
        }
        let model = LlamaModel::load_from_file(backend, &load.path, &params)
            .map_err(|e| load_err(e.to_string()))?;
        let threads = i32::try_from(load.threads.max(1)).unwrap_or(1);
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(load.n_ctx))
            .with_n_batch(N_BATCH as u32)
            .with_n_ubatch(N_BATCH as u32)
            .with_n_seq_max(load.batch_seqs.clamp(1, MAX_SIDE_BY_SIDE) as u32 + 1)
            .with_kv_unified(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
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
            n_ctx: load.n_ctx,
            batch: LlamaBatch::new(N_BATCH, 1),
            batch_seqs: load.batch_seqs.clamp(1, MAX_SIDE_BY_SIDE),
        };
        run(&mut session)
    }
}

struct LlamaSession<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    template: Option<LlamaChatTemplate>,
    /// The tokens whose keys and values sit in the KV cache (sequence 0), in order.
    kv_tokens: Vec<LlamaToken>,
    n_ctx: u32,
    batch: LlamaBatch<'static>,
    /// Generations decoded side by side.
    batch_seqs: usize,
}

fn decode_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Decode(e.to_string())
}

impl LlamaSession<'_> {
    /// Drop every cached position from `pos` on.
    fn truncate_kv(&mut self, pos: usize) -> Result<(), BackendError> {
        if self.kv_tokens.len() > pos {
            self.ctx
                .clear_kv_cache_seq(Some(0), Some(pos as u32), None)
                .map_err(decode_err)?;
            self.kv_tokens.truncate(pos);
        }
        Ok(())
    }

    /// Append `tokens` at the end of the sequence; logits are kept for every token when
    /// `all_logits`, else for the last one only. Returns the batch size of the last chunk.
    fn append(&mut self, tokens: &[LlamaToken], all_logits: bool) -> Result<i32, BackendError> {
        let mut last = 0;
        let total = tokens.len();
        for (c, chunk) in tokens.chunks(N_BATCH).enumerate() {
            self.batch.clear();
            for (j, &t) in chunk.iter().enumerate() {
                let pos = self.kv_tokens.len() + j;
                let is_last = c * N_BATCH + j + 1 == total;
                self.batch
                    .add(t, pos as i32, &[0], all_logits || is_last)
                    .map_err(decode_err)?;
            }
            self.ctx.decode(&mut self.batch).map_err(decode_err)?;
            self.kv_tokens.extend_from_slice(chunk);
            last = chunk.len() as i32;
        }
        Ok(last)
    }

    /// One generation after another, each in sequence 0 after the prompt.
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
            self.append(&[tok], true)?;
            let logits = self.ctx.get_logits_ith(0).to_vec();
            next = g.step(&vocab, &logits)?;
        }
        self.truncate_kv(prompt_len)?;
        g.decode_ms = start.elapsed().as_secs_f64() * 1000.0;
        Ok(g.into_output())
    }

    /// Several generations side by side: each gets its own sequence, forked from the
    /// prompt in sequence 0 (the unified KV cache shares the prompt's cells), and every
    /// decode call advances all unfinished ones by a token.
    fn generate_batched(
        &mut self,
        prompt_len: usize,
        prompt_logits: &[f32],
        tasks: &[GenSpec],
    ) -> Result<Vec<TaskOutput>, BackendError> {
        let vocab = self.model.vocab();
        let mut gens: Vec<Generation> = tasks
            .iter()
            .map(|(m, stop, s)| Generation::new(*m, stop, s))
            .collect();
        let mut pending: Vec<(usize, LlamaToken)> = Vec::new();
        for (j, g) in gens.iter_mut().enumerate() {
            let t0 = Instant::now();
            if let Some(tok) = g.step(&vocab, prompt_logits)? {
                pending.push((j, tok));
            }
            g.decode_ms += t0.elapsed().as_secs_f64() * 1000.0;
        }
        for &(j, _) in &pending {
            self.ctx
                .copy_kv_cache_seq(0, j as i32 + 1, Some(0), Some(prompt_len as u32))
                .map_err(decode_err)?;
        }
        let result = (|| -> Result<(), BackendError> {
            while !pending.is_empty() {
                let t0 = Instant::now();
                self.batch.clear();
                for &(j, tok) in &pending {
                    let pos = prompt_len + gens[j].gen_tokens as usize - 1;
                    self.batch
                        .add(tok, pos as i32, &[j as i32 + 1], true)
                        .map_err(decode_err)?;
                }
                self.ctx.decode(&mut self.batch).map_err(decode_err)?;
                let mut next = Vec::with_capacity(pending.len());
                for (k, &(j, _)) in pending.iter().enumerate() {
                    let logits = self.ctx.get_logits_ith(k as i32).to_vec();
                    if let Some(tok) = gens[j].step(&vocab, &logits)? {
                        next.push((j, tok));
                    }
                }
                // The decode served every pending sequence: each pays its share.
                let share = t0.elapsed().as_secs_f64() * 1000.0 / pending.len() as f64;
                for &(j, _) in &pending {
                    gens[j].decode_ms += share;
                }
                pending = next;
            }
            Ok(())
        })();
        for j in 0..gens.len() {
            self.ctx
                .clear_kv_cache_seq(Some(j as u32 + 1), None, None)
                .map_err(decode_err)?;
        }
        result?;
        Ok(gens.into_iter().map(Generation::into_output).collect())
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
        for cont in continuations {
            let toks = self.model.vocab().tokenize(cont.as_bytes(), false, false);
            let Some(&first) = toks.first() else {
                return Err(BackendError::Job(format!("label `{cont}` has no tokens")));
            };
            let mut lp = f64::from(prompt_logits[first.0 as usize]) - first_norm;
            if toks.len() > 1 {
                // Multi-token label: feed all but its last token, read each next-token logit.
                self.append(&toks[..toks.len() - 1], true)?;
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
            gen_tokens: 0,
            finish: Finish::Scored,
            decode_ms: start.elapsed().as_secs_f64() * 1000.0,
        })
    }
}

impl Session for LlamaSession<'_> {
    fn truncate(&self, text: &str, max_tokens: u32) -> String {
        let vocab = self.model.vocab();
        let toks = vocab.tokenize(text.as_bytes(), false, false);
        if toks.len() <= max_tokens as usize {
            return text.to_string();
        }
        let bytes = vocab.detokenize(&toks[..max_tokens as usize], false, false);
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\u{FFFD}')
            .to_string()
    }

    fn format_chat(&self, m: &Messages) -> Result<String, BackendError> {
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

    fn run(&mut self, prompt: &str, tasks: &[Task]) -> Result<PromptOutput, BackendError> {
        let start = Instant::now();
        let tokens = self.model.vocab().tokenize(prompt.as_bytes(), true, true);
        if tokens.is_empty() {
            return Err(BackendError::Job("empty prompt".into()));
        }
        // Cells needed past the prompt: generations side by side each need their own.
        let longest =
            |f: &dyn Fn(&Task) -> Option<usize>| tasks.iter().filter_map(f).max().unwrap_or(0);
        let gen_len = longest(&|t| match t {
            Task::Generate { max_tokens, .. } => Some(*max_tokens as usize),
            Task::Loglik { .. } => None,
        });
        let label_len = longest(&|t| match t {
            Task::Loglik { continuations } => continuations.iter().map(|c| c.len()).max(),
            Task::Generate { .. } => None,
        });
        let side_by_side = tasks
            .iter()
            .filter(|t| matches!(t, Task::Generate { .. }))
            .count()
            .clamp(1, self.batch_seqs);
        let to_generate = (gen_len * side_by_side).max(label_len);
        if tokens.len() + to_generate > self.n_ctx as usize {
            return Err(BackendError::ContextOverflow {
                needed: tokens.len() + to_generate,
                prompt: tokens.len(),
                generate: to_generate,
                n_ctx: self.n_ctx,
            });
        }
        // Reuse the longest common prefix, but always evaluate at least the last token so
        // that its logits are fresh.
        let common = self
            .kv_tokens
            .iter()
            .zip(&tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len() - 1);
        self.truncate_kv(common)?;
        let last = self.append(&tokens[common..], false)?;
        let prompt_logits = self.ctx.get_logits_ith(last - 1).to_vec();
        let prefill_ms = start.elapsed().as_secs_f64() * 1000.0;
        let n = tokens.len();
        let outs = match self.run_tasks(n, &prompt_logits, tasks) {
            Ok(o) => o,
            Err(e) => {
                // Leave the KV cache consistent with `kv_tokens` for the next prompt.
                self.kv_tokens.clear();
                self.ctx.clear_kv_cache();
                return Err(e);
            }
        };
        Ok(PromptOutput {
            prompt_tokens: n as u32,
            evaluated_tokens: (n - common) as u32,
            prefill_ms,
            tasks: outs,
        })
    }
}

impl LlamaSession<'_> {
    /// Every task from the evaluated prompt, results in task order. Generations run
    /// `batch_seqs` at a time when that is more than one.
    fn run_tasks(
        &mut self,
        n: usize,
        prompt_logits: &[f32],
        tasks: &[Task],
    ) -> Result<Vec<TaskOutput>, BackendError> {
        let mut outs: Vec<Option<TaskOutput>> = vec![None; tasks.len()];
        let gens: Vec<(usize, GenSpec)> = tasks
            .iter()
            .enumerate()
            .filter_map(|(i, t)| match t {
                Task::Generate {
                    max_tokens,
                    stop,
                    sampler,
                } => Some((i, (*max_tokens, stop.as_slice(), *sampler))),
                Task::Loglik { .. } => None,
            })
            .collect();
        if self.batch_seqs > 1 {
            for chunk in gens.chunks(self.batch_seqs) {
                let specs: Vec<GenSpec> = chunk.iter().map(|(_, g)| *g).collect();
                for ((i, _), o) in
                    chunk
                        .iter()
                        .zip(self.generate_batched(n, prompt_logits, &specs)?)
                {
                    outs[*i] = Some(o);
                }
            }
        } else {
            for (i, (max_tokens, stop, sampler)) in &gens {
                outs[*i] = Some(self.generate(n, prompt_logits, *max_tokens, stop, sampler)?);
            }
        }
        for (i, t) in tasks.iter().enumerate() {
            if let Task::Loglik { continuations } = t {
                outs[i] = Some(self.loglik(n, prompt_logits, continuations)?);
            }
        }
        Ok(outs
            .into_iter()
            .map(|o| o.expect("every task ran"))
            .collect())
    }
}

/// A generation task: `max_tokens`, stop strings, sampler.
type GenSpec<'a> = (u32, &'a [String], Sampler);

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
