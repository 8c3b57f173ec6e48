//! Several rows per decode call, each in its own KV stream (`kv_unified = false`, one stream
//! per sequence, as llama-server with an explicit `-np` runs): no attention crosses rows.
//! Packing rows into one decode of a *unified* KV cache gives wrong logits once a ubatch
//! holds 32+ tokens (ggml-org/llama.cpp#24962); separate streams do not share that path.
//!
//! The prompts are evaluated together in rounds of `batch / rows` tokens per row, logits
//! only on each row's last prompt token; then each task index runs for every row that has
//! it: single-token labels are read from the prompt logits, multi-token labels and
//! generations continue in each row's own stream, one decode call for all rows per step,
//! and every stream is cut back to its prompt afterwards. Nothing is reused between packs.
//!
//! A packed row's numbers depend on how llama.cpp splits each call into ubatches (rows of
//! equal length share one), so they agree with one-at-a-time evaluation within the noise
//! floor of a different ubatch layout, not bit for bit: the engine version records the
//! packing and packed rows are keyed apart.

use std::time::Instant;

use llama_cpp_2::token::LlamaToken;

use super::{Generation, LlamaSession, decode_err, log_sum_exp};
use crate::backend::{BackendError, ChatPrompt, Finish, PromptOutput, Task, TaskOutput};

/// One row of a pack.
struct Row<'a> {
    stream: i32,
    tokens: Vec<LlamaToken>,
    /// Its template's shared leading tokens (evaluated anew here, but a row's own work
    /// excludes them, as in the one-at-a-time path).
    prefix: usize,
    tasks: &'a [Task],
    /// The logits after its last prompt token.
    logits: Vec<f32>,
    outs: Vec<TaskOutput>,
}

impl LlamaSession<'_> {
    /// Evaluate up to `rows` prompts together; one result per prompt. A prompt that does
    /// not fit its context fails alone; a failed decode fails the whole pack.
    pub(super) fn run_packed(
        &mut self,
        group: &[(ChatPrompt, Vec<Task>)],
    ) -> Vec<Result<PromptOutput, BackendError>> {
        let start = Instant::now();
        let mut results: Vec<Option<Result<PromptOutput, BackendError>>> =
            group.iter().map(|_| None).collect();
        let mut rows = Vec::new();
        let mut at = Vec::new();
        for (i, (prompt, tasks)) in group.iter().enumerate() {
            if tasks.iter().any(|t| matches!(t, Task::Hidden { .. })) {
                // Which rows of a packed ubatch a layer's output holds is llama.cpp's
                // business; hidden states are read one prompt at a time.
                results[i] = Some(Err(BackendError::Job(
                    "hidden states are read one prompt at a time: run a probe with `--pack 1`"
                        .into(),
                )));
                continue;
            }
            match self.prompt_tokens(prompt, tasks) {
                Ok(tokens) => {
                    rows.push(Row {
                        stream: rows.len() as i32,
                        prefix: self
                            .fixed_tokens(&tokens, prompt.fixed_text())
                            .min(tokens.len().saturating_sub(1)),
                        tokens,
                        tasks,
                        logits: Vec::new(),
                        outs: Vec::new(),
                    });
                    at.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if !rows.is_empty() {
            // Packed evaluation reuses nothing from before, and leaves nothing behind.
            self.reset_kv();
            match self.evaluate_pack(&mut rows, start) {
                Ok(prefill_ms) => {
                    for (i, row) in at.iter().zip(rows) {
                        results[*i] = Some(Ok(PromptOutput {
                            prompt_tokens: row.tokens.len() as u32,
                            evaluated_tokens: row.tokens.len() as u32,
                            prefix_tokens: Some(row.prefix as u32),
                            prefill_ms,
                            tasks: row.outs,
                        }));
                    }
                }
                Err(e) => {
                    for i in at {
                        results[i] = Some(Err(BackendError::Decode(e.to_string())));
                    }
                }
            }
            self.reset_kv();
        }
        results
            .into_iter()
            .map(|r| r.expect("every prompt has a result"))
            .collect()
    }

    /// Prefill every row, then run the tasks; returns each row's share of the prefill time.
    fn evaluate_pack(&mut self, rows: &mut [Row], start: Instant) -> Result<f64, BackendError> {
        let per_row = (self.packing.batch / rows.len()).max(1);
        let mut from = vec![0usize; rows.len()];
        loop {
            self.batch.clear();
            let mut lasts = Vec::new();
            let mut k = 0;
            for (r, row) in rows.iter().enumerate() {
                let n = row.tokens.len();
                let end = (from[r] + per_row).min(n);
                for pos in from[r]..end {
                    let last = pos + 1 == n;
                    self.batch
                        .add(row.tokens[pos], pos as i32, &[row.stream], last)
                        .map_err(decode_err)?;
                    if last {
                        lasts.push((r, k));
                    }
                    k += 1;
                }
                from[r] = end;
            }
            if k == 0 {
                break;
            }
            self.ctx.decode(&mut self.batch).map_err(decode_err)?;
            for (r, i) in lasts {
                rows[r].logits = self.ctx.get_logits_ith(i).to_vec();
            }
        }
        let prefill_ms = start.elapsed().as_secs_f64() * 1000.0 / rows.len() as f64;
        let most = rows.iter().map(|r| r.tasks.len()).max().unwrap_or(0);
        for t in 0..most {
            let gens: Vec<usize> = (0..rows.len())
                .filter(|&r| matches!(rows[r].tasks.get(t), Some(Task::Generate { .. })))
                .collect();
            let lls: Vec<usize> = (0..rows.len())
                .filter(|&r| matches!(rows[r].tasks.get(t), Some(Task::Loglik { .. })))
                .collect();
            self.generate_packed(rows, &gens, t)?;
            self.loglik_packed(rows, &lls, t)?;
        }
        Ok(prefill_ms)
    }

    /// Task `t` (a generation) of rows `who`, one token of each per decode call.
    fn generate_packed(
        &mut self,
        rows: &mut [Row],
        who: &[usize],
        t: usize,
    ) -> Result<(), BackendError> {
        if who.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let vocab = self.model.vocab();
        let mut gens = Vec::new();
        let mut next = Vec::new();
        for &r in who {
            let Some(Task::Generate {
                max_tokens,
                stop,
                sampler,
            }) = rows[r].tasks.get(t)
            else {
                unreachable!("only generations are passed")
            };
            let mut g = Generation::new(*max_tokens, stop, sampler);
            next.push(g.step(&vocab, &rows[r].logits)?);
            gens.push(g);
        }
        let mut len: Vec<usize> = who.iter().map(|&r| rows[r].tokens.len()).collect();
        while next.iter().any(Option::is_some) {
            self.batch.clear();
            let mut fed = Vec::new();
            for (j, tok) in next.iter().enumerate() {
                if let Some(tok) = tok {
                    self.batch
                        .add(*tok, len[j] as i32, &[rows[who[j]].stream], true)
                        .map_err(decode_err)?;
                    fed.push(j);
                    len[j] += 1;
                }
            }
            self.ctx.decode(&mut self.batch).map_err(decode_err)?;
            for (i, &j) in fed.iter().enumerate() {
                let logits = self.ctx.get_logits_ith(i as i32).to_vec();
                next[j] = gens[j].step(&vocab, &logits)?;
            }
        }
        self.cut_back(rows, who)?;
        let each = start.elapsed().as_secs_f64() * 1000.0 / who.len() as f64;
        for (g, &r) in gens.into_iter().zip(who) {
            let mut out = g.into_output();
            out.decode_ms = each;
            rows[r].outs.push(out);
        }
        Ok(())
    }

    /// Task `t` (label log-probs) of rows `who`: the first token of each label from the
    /// prompt logits, the rest fed in each row's stream, one decode call per label.
    fn loglik_packed(
        &mut self,
        rows: &mut [Row],
        who: &[usize],
        t: usize,
    ) -> Result<(), BackendError> {
        if who.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let labels = |r: usize| match rows[r].tasks.get(t) {
            Some(Task::Loglik { continuations, .. }) => continuations.clone(),
            _ => unreachable!("only label tasks are passed"),
        };
        let conts: Vec<Vec<String>> = who.iter().map(|&r| labels(r)).collect();
        let mut lps: Vec<Vec<f64>> = conts.iter().map(|c| vec![0.0; c.len()]).collect();
        let mut counts: Vec<Vec<u32>> = conts.iter().map(|c| vec![0; c.len()]).collect();
        let most = conts.iter().map(Vec::len).max().unwrap_or(0);
        // `c` is a label's place in every row's list, not an index into one vector.
        #[allow(clippy::needless_range_loop)]
        for c in 0..most {
            self.batch.clear();
            let mut fed: Vec<(usize, Vec<LlamaToken>, usize)> = Vec::new();
            let mut k = 0;
            for (j, &r) in who.iter().enumerate() {
                let Some(label) = conts[j].get(c) else {
                    continue;
                };
                let toks = self.model.vocab().tokenize(label.as_bytes(), false, false);
                let Some(&first) = toks.first() else {
                    return Err(BackendError::Job(format!("label `{label}` has no tokens")));
                };
                counts[j][c] = toks.len() as u32;
                let logits = &rows[r].logits;
                lps[j][c] = f64::from(logits[first.0 as usize]) - log_sum_exp(logits);
                let n = rows[r].tokens.len();
                for (i, &tok) in toks[..toks.len() - 1].iter().enumerate() {
                    self.batch
                        .add(tok, (n + i) as i32, &[rows[r].stream], true)
                        .map_err(decode_err)?;
                }
                if toks.len() > 1 {
                    fed.push((j, toks, k));
                    k += fed.last().map_or(0, |f| f.1.len() - 1);
                }
            }
            if fed.is_empty() {
                continue;
            }
            self.ctx.decode(&mut self.batch).map_err(decode_err)?;
            for (j, toks, first) in &fed {
                for (i, next) in toks[1..].iter().enumerate() {
                    let l = self.ctx.get_logits_ith((first + i) as i32);
                    lps[*j][c] += f64::from(l[next.0 as usize]) - log_sum_exp(l);
                }
            }
            self.cut_back(rows, who)?;
        }
        let each = start.elapsed().as_secs_f64() * 1000.0 / who.len() as f64;
        for ((lp, counts), &r) in lps.into_iter().zip(counts).zip(who) {
            rows[r].outs.push(TaskOutput {
                text: None,
                logprobs: Some(lp),
                choice_tokens: Some(counts),
                hidden: None,
                gen_tokens: 0,
                finish: Finish::Scored,
                decode_ms: each,
            });
        }
        Ok(())
    }

    /// Cut each row's stream back to its prompt.
    fn cut_back(&mut self, rows: &[Row], who: &[usize]) -> Result<(), BackendError> {
        for &r in who {
            self.ctx
                .clear_kv_cache_seq(
                    Some(rows[r].stream as u32),
                    Some(rows[r].tokens.len() as u32),
                    None,
                )
                .map_err(decode_err)?;
        }
        Ok(())
    }
}
