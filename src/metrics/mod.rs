//! Metrics: read predictions from the cache (never run a model) and compute per-cell
//! accuracy with an interval, precision/recall/F1, confusion, invalid answers and speed.

pub mod stats;

use std::collections::HashSet;

use serde::Serialize;

use crate::answer::{argmax, parse_answer};
use crate::backend::Finish;
use crate::cache::Cache;
use crate::key::Digest;
use crate::plan::Plan;
use crate::spec::MethodKind;

/// One dataset row under one cell.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub cell: usize,
    pub row: usize,
    pub gold: usize,
    /// `None`: an invalid (unparseable) answer.
    pub predicted: Option<usize>,
    pub raw: Option<String>,
    pub logprobs: Option<Vec<f64>>,
    pub prompt_tokens: u32,
    pub evaluated_tokens: u32,
    pub gen_tokens: u32,
    pub finish: Finish,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub shared_by: u32,
    /// Time to compute this row alone: the whole prompt evaluation plus its own decoding.
    pub latency_ms: f64,
    /// Its share when the prompt evaluation served `shared_by` cells.
    pub shared_latency_ms: f64,
    /// Served from the cache rather than computed in this run.
    pub from_cache: bool,
}

impl Prediction {
    pub fn correct(&self) -> bool {
        self.predicted == Some(self.gold)
    }
}

/// Every prediction the cache holds for the plan; rows not computed yet are left out.
pub fn collect(plan: &Plan, cache: &Cache, computed: &HashSet<Digest>) -> Vec<Prediction> {
    let labels = plan.dataset.label_names();
    let mut out = Vec::new();
    for (ci, cell) in plan.cells.iter().enumerate() {
        let method = &plan.spec.methods[cell.method];
        for (ri, comps) in cell.rows.iter().enumerate() {
            let Some(comps) = comps else { continue };
            let key = comps.row_key();
            let Some(r) = cache.get(&key) else { continue };
            let predicted = match method.kind {
                MethodKind::Generate => r
                    .text
                    .as_deref()
                    .and_then(|t| parse_answer(t, &labels, method.parse)),
                MethodKind::Loglik => r.logprobs.as_deref().and_then(argmax),
            };
            out.push(Prediction {
                cell: ci,
                row: ri,
                gold: plan.dataset.rows[ri].label,
                predicted,
                raw: r.text.clone(),
                logprobs: r.logprobs.clone(),
                prompt_tokens: r.prompt_tokens,
                evaluated_tokens: r.evaluated_tokens,
                gen_tokens: r.gen_tokens,
                finish: r.finish,
                prefill_ms: r.prefill_ms,
                decode_ms: r.decode_ms,
                shared_by: r.shared_by,
                latency_ms: r.prefill_ms + r.decode_ms,
                shared_latency_ms: r.latency_ms(),
                from_cache: !computed.contains(&key),
            });
        }
    }
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CellMetrics {
    pub cell: String,
    pub model: String,
    pub prompt: String,
    pub method: String,
    pub kind: String,
    pub temperature: Option<f64>,
    pub seed: Option<u64>,
    /// Rows the cell should have, and rows it has.
    pub planned: u64,
    pub n: u64,
    pub correct: u64,
    pub accuracy: f64,
    pub accuracy_lo: f64,
    pub accuracy_hi: f64,
    pub invalid: u64,
    pub macro_f1: f64,
    pub classes: Vec<ClassMetrics>,
    /// `confusion[gold][predicted]`; the last column counts invalid answers.
    pub confusion: Vec<Vec<u64>>,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    /// Time to compute the cell's rows on their own (prompt evaluation paid in full).
    pub compute_s: f64,
    /// Rows per second on their own: the cost of this cell if it were the only one.
    pub reviews_per_s: f64,
    /// Rows per second with the prompt evaluation shared among the cells that used it.
    pub reviews_per_s_shared: f64,
    pub prompt_tokens_per_s: f64,
    pub gen_tokens_per_s: f64,
    pub cached: u64,
    pub computed: u64,
}

pub fn compute(plan: &Plan, preds: &[Prediction]) -> Vec<CellMetrics> {
    let labels = plan.dataset.label_names();
    let k = labels.len();
    plan.cells
        .iter()
        .enumerate()
        .map(|(ci, cell)| {
            let rows: Vec<&Prediction> = preds.iter().filter(|p| p.cell == ci).collect();
            let n = rows.len() as u64;
            let correct = rows.iter().filter(|p| p.correct()).count() as u64;
            let invalid = rows.iter().filter(|p| p.predicted.is_none()).count() as u64;
            let mut confusion = vec![vec![0u64; k + 1]; k];
            for p in &rows {
                confusion[p.gold][p.predicted.unwrap_or(k)] += 1;
            }
            let classes: Vec<ClassMetrics> = (0..k)
                .map(|c| {
                    let tp = confusion[c][c];
                    let fp: u64 = (0..k).filter(|&g| g != c).map(|g| confusion[g][c]).sum();
                    let support: u64 = confusion[c].iter().sum();
                    let (precision, recall, f1) = stats::prf(tp, fp, support - tp);
                    ClassMetrics {
                        label: labels[c].clone(),
                        precision,
                        recall,
                        f1,
                        support,
                    }
                })
                .collect();
            let macro_f1 = if k == 0 {
                0.0
            } else {
                classes.iter().map(|c| c.f1).sum::<f64>() / k as f64
            };
            let (lo, hi) = stats::wilson(correct, n, stats::Z95);
            let lat: Vec<f64> = rows.iter().map(|p| p.latency_ms).collect();
            let compute_s = lat.iter().sum::<f64>() / 1000.0;
            let shared_s = rows.iter().map(|p| p.shared_latency_ms).sum::<f64>() / 1000.0;
            let share = |p: &&Prediction| f64::from(p.shared_by.max(1));
            let prefill_s: f64 = rows.iter().map(|p| p.prefill_ms / share(p)).sum::<f64>() / 1000.0;
            let eval_tokens: f64 = rows
                .iter()
                .map(|p| f64::from(p.evaluated_tokens) / share(p))
                .sum();
            let decode_s: f64 = rows.iter().map(|p| p.decode_ms).sum::<f64>() / 1000.0;
            let gen_tokens: f64 = rows.iter().map(|p| f64::from(p.gen_tokens)).sum();
            let per_s = |x: f64, s: f64| if s > 0.0 { x / s } else { 0.0 };
            let method = &plan.spec.methods[cell.method];
            CellMetrics {
                cell: cell.id.clone(),
                model: plan.models[cell.model].id.clone(),
                prompt: plan.prompts.id(cell.prompt).to_string(),
                method: method.id.clone(),
                kind: match method.kind {
                    MethodKind::Generate => "generate".into(),
                    MethodKind::Loglik => "loglik".into(),
                },
                temperature: cell.point.map(|p| p.temperature),
                seed: cell.point.map(|p| p.seed),
                planned: cell.rows.len() as u64,
                n,
                correct,
                accuracy: if n == 0 {
                    0.0
                } else {
                    correct as f64 / n as f64
                },
                accuracy_lo: lo,
                accuracy_hi: hi,
                invalid,
                macro_f1,
                classes,
                confusion,
                latency_p50_ms: stats::quantile(&lat, 0.5).unwrap_or(0.0),
                latency_p95_ms: stats::quantile(&lat, 0.95).unwrap_or(0.0),
                compute_s,
                reviews_per_s: per_s(n as f64, compute_s),
                reviews_per_s_shared: per_s(n as f64, shared_s),
                prompt_tokens_per_s: per_s(eval_tokens, prefill_s),
                gen_tokens_per_s: per_s(gen_tokens, decode_s),
                cached: rows.iter().filter(|p| p.from_cache).count() as u64,
                computed: rows.iter().filter(|p| !p.from_cache).count() as u64,
            }
        })
        .collect()
}
