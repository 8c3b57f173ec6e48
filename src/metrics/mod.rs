//! Metrics: read predictions from the cache (never run a model) and compute per-cell
//! accuracy with an interval, precision/recall/F1, confusion, invalid answers and speed.

pub mod stats;

use crate::predict;
pub use crate::predict::{CalibrationError, Prediction, calibration, predict};

use std::collections::HashSet;

use serde::Serialize;

use crate::answer::argmax;
use crate::cache::{Cache, CacheError, Lookup, Rows};
use crate::calibrate::Params;
use crate::key::Digest;
use crate::neighbours::{self, PoolEntry};
use crate::plan::{Decided, Plan, Source};
use crate::spec::{CalibrationKind, MethodKind};

/// A row of a cell whose last attempt failed (and that no run has computed since).
#[derive(Debug, Clone)]
pub struct Failure {
    pub cell: usize,
    pub row: usize,
    pub kind: crate::row::FailureKind,
    pub message: String,
}

/// Every recorded failure of the plan's rows.
pub fn collect_failures(plan: &Plan, cache: &Cache) -> Vec<Failure> {
    let mut out = Vec::new();
    for (ci, cell) in plan.cells.iter().enumerate() {
        let limit = plan.prompt_limit(cell);
        for (ri, key) in cell.rows.keys().enumerate() {
            let Some(key) = key else { continue };
            if let Lookup::TooLong {
                prompt_tokens,
                limit,
            } = cache.lookup(&key, limit)
            {
                out.push(Failure {
                    cell: ci,
                    row: ri,
                    kind: crate::row::FailureKind::ContextOverflow,
                    message: format!(
                        "the prompt has {prompt_tokens} tokens, and this cell's n_ctx leaves room for {limit} (the cached row was computed with a larger n_ctx)"
                    ),
                });
                continue;
            }
            if let Some(e) = cache.failure(&key) {
                out.push(Failure {
                    cell: ci,
                    row: ri,
                    kind: e.kind,
                    message: e.message.clone(),
                });
            }
        }
    }
    out
}

/// Every prediction the cache holds for the plan; rows not computed yet are left out.
///
/// The model cells' rows are read from the cache by projection, each row once however many
/// cells share it, a batch at a time: what is held is the predictions, never the rows.
/// `stages` holds the rows of the cascades' stage cells ([`crate::cascade::stage_keys`]).
pub fn collect(
    plan: &Plan,
    decided: &Decided,
    cache: &Cache,
    stages: &Rows,
    computed: &HashSet<Digest>,
) -> Result<Vec<Prediction>, CacheError> {
    let labels = plan.dataset.label_names();
    let mut out = Vec::new();
    let params: Vec<Option<Result<Params, CalibrationError>>> = plan
        .cells
        .iter()
        .map(|c| c.calibration.map(|c| decided.fit(c)))
        .collect();
    // (cell, row) of every cached row of a model cell.
    let mut wanted: Vec<(u32, u32)> = Vec::new();
    for (ci, cell) in plan.cells.iter().enumerate() {
        if !matches!(cell.source, Source::Llm { .. }) || matches!(params[ci], Some(Err(_))) {
            continue;
        }
        let limit = plan.prompt_limit(cell);
        for (ri, key) in cell.rows.keys().enumerate() {
            let Some(key) = key else {
                continue;
            };
            if matches!(cache.lookup(&key, limit), Lookup::Hit) {
                wanted.push((ci as u32, ri as u32));
            }
        }
    }
    let key_of = |&(ci, ri): &(u32, u32)| {
        plan.cells[ci as usize]
            .rows
            .key(ri as usize)
            .expect("only rows with keys are wanted")
    };
    out.reserve_exact(wanted.len());
    cache.content(&wanted, key_of, &mut |at, content| {
        let (ci, ri) = (wanted[at].0 as usize, wanted[at].1 as usize);
        let from_cache = !computed.contains(&key_of(&wanted[at]));
        let p = predict::prediction(
            plan,
            &labels,
            ci,
            &plan.cells[ci],
            ri,
            content,
            params[ci].as_ref(),
        );
        out.extend(p.map(|p| Prediction { from_cache, ..p }));
    })?;
    drop(wanted);
    for (ci, cell) in plan.cells.iter().enumerate() {
        if let Source::Vote { retrieval } = cell.source {
            let r = &plan.retrievals[retrieval];
            let pool = &plan.pools[r.pool].rows;
            let entries: Vec<PoolEntry> = pool
                .iter()
                .map(|p| PoolEntry {
                    id: &p.id,
                    text: &p.text,
                    label: p.label,
                    vector: &[],
                })
                .collect();
            for (ri, n) in r.results[0].iter().enumerate() {
                let Some(n) = n else { continue };
                let shares = neighbours::vote(&entries, n, labels.len());
                let lp: Vec<f64> = shares.iter().map(|s| s.max(1e-9).ln()).collect();
                out.push(Prediction {
                    predicted: argmax(&lp),
                    logprobs: Some(lp),
                    ..Prediction::empty(ci, ri, plan.dataset.rows[ri].label)
                });
            }
            continue;
        }
        if let Source::Cascade { cascade } = cell.source {
            out.extend(crate::cascade::predictions(
                plan, decided, stages, cascade, computed,
            ));
        }
        if let Source::Embedding { probe } = cell.source {
            out.extend(embedding_probe(plan, ci, probe));
        }
    }
    // In the plan's order: by cell, then by row.
    out.sort_unstable_by_key(|p| (p.cell, p.row));
    // Ensembles read their members' predictions, made above.
    let mut combined = Vec::new();
    for e in 0..plan.ensembles.len() {
        combined.extend(crate::ensemble::predictions(plan, e, &out));
    }
    if !combined.is_empty() {
        out.extend(combined);
        out.sort_unstable_by_key(|p| (p.cell, p.row));
    }
    Ok(out)
}

/// The predictions of a probe on an embedder's vectors: fitted (deterministically, in a
/// second or so) on its fit rows' vectors once every one is embedded; none before.
fn embedding_probe(plan: &Plan, ci: usize, probe: usize) -> Vec<Prediction> {
    let ep = &plan.embedding_probes[probe];
    let Some(fit): Option<Vec<Vec<f32>>> = ep.fit.iter().cloned().collect() else {
        return Vec::new();
    };
    let labels: Vec<usize> = plan.sets[ep.fit_set].rows.iter().map(|r| r.label).collect();
    let k = plan.dataset.labels.len();
    let Ok(p) = crate::probe::fit(&fit, &labels, k, &["embedding".to_string()]) else {
        return Vec::new();
    };
    ep.eval
        .iter()
        .enumerate()
        .filter_map(|(ri, v)| {
            let lp = p.log_probs(v.as_ref()?)?;
            Some(Prediction {
                predicted: argmax(&lp),
                logprobs: Some(lp),
                ..Prediction::empty(ci, ri, plan.dataset.rows[ri].label)
            })
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

named_enum! {
    /// What computes a cell's answers, as tables and Findings name it.
    #[derive(Default)]
    pub enum CellKind {
        Generate,
        /// The default of a cell view built in a test.
        #[default]
        Loglik,
        KnnVote,
        Probe,
        Cascade,
        Ensemble,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CellMetrics {
    pub cell: String,
    pub model: String,
    pub prompt: String,
    pub method: String,
    pub kind: CellKind,
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
    /// Rows that could not be computed (not in `n`; they run again next time).
    pub failed: u64,
    pub macro_f1: f64,
    pub classes: Vec<ClassMetrics>,
    /// `confusion[gold][predicted]`; the last column counts invalid answers.
    pub confusion: Vec<Vec<u64>>,
    /// What a row of this cell costs on average, from its tokens alone (the same on any
    /// machine, under any load); `None` when no model computed its rows (a vote).
    pub work: Option<crate::cost::Work>,
    /// Wall-clock, as measured when the rows were computed (it moves with the machine's
    /// load; `work` does not).
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    /// Time to compute the cell's rows on their own (prompt evaluation paid in full).
    pub compute_s: f64,
    /// Rows per second on their own: the cost of this cell if it were the only one.
    pub rows_per_s: f64,
    /// Rows per second with the prompt evaluation shared among the cells that used it.
    pub rows_per_s_shared: f64,
    /// Words of row text per second, on their own (the seed notebooks' unit).
    pub words_per_s: f64,
    pub prompt_tokens_per_s: f64,
    pub gen_tokens_per_s: f64,
    pub cached: u64,
    pub computed: u64,
    /// Log-likelihood cells: probabilities are the label log-probs normalised over the labels.
    pub roc_auc: Option<f64>,
    pub brier: Option<f64>,
    pub ece: Option<f64>,
    pub reliability: Vec<stats::ReliabilityBin>,
    /// Share of rows predicted as each label (the last entry: invalid answers), to set
    /// beside the gold shares.
    pub predicted_share: Vec<f64>,
    pub calibration: Option<CalibrationInfo>,
    pub uncalibrated: Option<Uncalibrated>,
    /// Cascade cells: the stages, how many rows went on, the cost against each stage alone.
    pub cascade: Option<crate::cascade::Summary>,
    /// Raw log-likelihood cells: accuracy with each label's log-prob divided by its length.
    pub length_normalised: Option<NormalisedAccuracy>,
}

/// Accuracy of a raw log-likelihood cell's length-normalised choices: per token (`None`
/// when some row did not record its labels' tokens) and per byte (lm-eval's `acc_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NormalisedAccuracy {
    pub per_token: Option<f64>,
    pub per_byte: Option<f64>,
}

impl NormalisedAccuracy {
    fn of(rows: &[&Prediction]) -> Option<Self> {
        let chosen: Vec<(crate::predict::LengthNormalised, usize)> = rows
            .iter()
            .map(|p| p.normalised.map(|n| (n, p.gold)))
            .collect::<Option<_>>()?;
        if chosen.is_empty() {
            return None;
        }
        let accuracy = |f: &dyn Fn(&crate::predict::LengthNormalised) -> Option<usize>| {
            let right: Option<Vec<bool>> = chosen
                .iter()
                .map(|(n, gold)| f(n).map(|c| c == *gold))
                .collect();
            right.map(|r| r.iter().filter(|x| **x).count() as f64 / r.len() as f64)
        };
        Some(Self {
            per_token: accuracy(&|n| n.per_token),
            per_byte: accuracy(&|n| n.per_byte),
        })
    }
}

impl CellMetrics {
    /// Rows per second as shown in tables: "–" for cells that no model computed (a vote
    /// costs a neighbour search, not an inference).
    pub fn rows_per_s_text(&self, digits: usize) -> String {
        if self.compute_s > 0.0 {
            format!("{:.digits$}", self.rows_per_s)
        } else {
            "–".into()
        }
    }
}

/// Calibration bins of the reliability diagrams.
pub const RELIABILITY_BINS: usize = 10;

pub fn compute(
    plan: &Plan,
    decided: &Decided,
    cache: &Rows,
    preds: &[Prediction],
    failures: &[Failure],
) -> Vec<CellMetrics> {
    let labels = plan.dataset.label_names();
    let k = labels.len();
    let calibrations: Vec<Result<Params, CalibrationError>> = (0..plan.calibrations.len())
        .map(|c| decided.fit(c))
        .collect();
    // Each cell's predictions, in order, and each dataset row's words: counted once, not
    // once per cell.
    let mut by_cell: Vec<Vec<&Prediction>> = vec![Vec::new(); plan.cells.len()];
    for p in preds {
        by_cell[p.cell].push(p);
    }
    let words_of: Vec<usize> = plan
        .dataset
        .rows
        .iter()
        .map(|r| r.text.split_whitespace().count())
        .collect();
    plan.cells
        .iter()
        .enumerate()
        .map(|(ci, cell)| {
            let rows: Vec<&Prediction> = std::mem::take(&mut by_cell[ci]);
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
            let words: usize = rows.iter().map(|p| words_of[p.row]).sum();
            let method = &plan.spec.methods[cell.method];
            let scored =
                |f: &dyn Fn(&Prediction) -> Option<&Vec<f64>>| -> Vec<(Vec<f64>, usize, bool)> {
                    rows.iter()
                        .filter_map(|p| {
                            let lp = f(p)?;
                            let mut probs = stats::label_probs(lp);
                            // A row with fewer choices than the most any row has: the
                            // places it lacks have probability 0.
                            probs.resize(k.max(probs.len()), 0.0);
                            let right = argmax(lp) == Some(p.gold);
                            Some((probs, p.gold, right))
                        })
                        .collect()
                };
            let (roc_auc, brier, ece, reliability) = if method.kind() != MethodKind::Generate {
                scores(&scored(&|p| p.logprobs.as_ref()), k)
            } else {
                (None, None, None, Vec::new())
            };
            let before = scored(&|p| p.uncalibrated.as_ref());
            let uncalibrated = (!before.is_empty()).then(|| {
                let (_, brier, ece, reliability) = scores(&before, k);
                Uncalibrated {
                    accuracy: before.iter().filter(|x| x.2).count() as f64 / before.len() as f64,
                    brier,
                    ece,
                    reliability,
                }
            });
            let (model, prompt, method_id) = plan.cell_names(cell);
            let calibration = cell.calibration.map(|ci| CalibrationInfo {
                kind: plan.calibrations[ci].kind,
                params: calibrations[ci].clone().ok(),
                pending: calibrations[ci].as_ref().err().map(ToString::to_string),
            });
            let predicted_share = (0..=k)
                .map(|c| {
                    let m: u64 = confusion.iter().map(|row| row[c]).sum();
                    if n == 0 { 0.0 } else { m as f64 / n as f64 }
                })
                .collect();
            let planned = match cell.source {
                Source::Vote { .. }
                | Source::Cascade { .. }
                | Source::Ensemble { .. }
                | Source::Embedding { .. } => plan.dataset.rows.len(),
                Source::Llm { .. } => cell.rows.len(),
            } as u64;
            CellMetrics {
                cell: cell.id.clone(),
                model,
                prompt,
                method: method_id,
                kind: match (cell.source, method.kind()) {
                    (Source::Cascade { .. }, _) => CellKind::Cascade,
                    (Source::Ensemble { .. }, _) => CellKind::Ensemble,
                    (_, MethodKind::Generate) => CellKind::Generate,
                    (_, MethodKind::Loglik) => CellKind::Loglik,
                    (_, MethodKind::KnnVote) => CellKind::KnnVote,
                    (_, MethodKind::Probe) => CellKind::Probe,
                },
                temperature: cell.point.map(|p| p.temperature),
                seed: cell.point.map(|p| p.seed),
                planned,
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
                failed: failures.iter().filter(|f| f.cell == ci).count() as u64,
                macro_f1,
                classes,
                confusion,
                work: {
                    let w = crate::cost::Work::sum(rows.iter().map(|p| &p.work));
                    (n > 0 && w.tokens() > 0.0).then(|| w.per_row(rows.len()))
                },
                latency_p50_ms: stats::quantile(&lat, 0.5).unwrap_or(0.0),
                latency_p95_ms: stats::quantile(&lat, 0.95).unwrap_or(0.0),
                compute_s,
                rows_per_s: per_s(n as f64, compute_s),
                rows_per_s_shared: per_s(n as f64, shared_s),
                words_per_s: per_s(words as f64, compute_s),
                prompt_tokens_per_s: per_s(eval_tokens, prefill_s),
                gen_tokens_per_s: per_s(gen_tokens, decode_s),
                cached: rows.iter().filter(|p| p.from_cache).count() as u64,
                computed: rows.iter().filter(|p| !p.from_cache).count() as u64,
                roc_auc,
                brier,
                ece,
                reliability,
                predicted_share,
                calibration,
                uncalibrated,
                cascade: match cell.source {
                    Source::Cascade { cascade } => {
                        crate::cascade::summary(plan, decided, cache, cascade)
                    }
                    _ => None,
                },
                length_normalised: NormalisedAccuracy::of(&rows),
            }
        })
        .collect()
}

/// ROC AUC (macro one-vs-rest), Brier score, ECE and reliability bins of scored rows
/// `(label probabilities, gold, right)`.
fn scores(
    scored: &[(Vec<f64>, usize, bool)],
    k: usize,
) -> (
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Vec<stats::ReliabilityBin>,
) {
    if scored.is_empty() {
        return (None, None, None, Vec::new());
    }
    let aucs: Vec<f64> = (0..k)
        .filter_map(|c| {
            let s: Vec<f64> = scored.iter().map(|(p, _, _)| p[c]).collect();
            let y: Vec<bool> = scored.iter().map(|(_, g, _)| *g == c).collect();
            stats::roc_auc(&s, &y)
        })
        .collect();
    let auc = (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64);
    let probs: Vec<Vec<f64>> = scored.iter().map(|(p, _, _)| p.clone()).collect();
    let gold: Vec<usize> = scored.iter().map(|(_, g, _)| *g).collect();
    let conf: Vec<f64> = probs
        .iter()
        .map(|p| p.iter().copied().fold(0.0, f64::max))
        .collect();
    let ok: Vec<bool> = scored.iter().map(|(_, _, c)| *c).collect();
    let (bins, ece) = stats::calibration(&conf, &ok, RELIABILITY_BINS);
    (auc, Some(stats::brier(&probs, &gold)), Some(ece), bins)
}

/// A calibrated cell's calibration.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationInfo {
    pub kind: CalibrationKind,
    pub params: Option<Params>,
    /// Why it is not fitted yet.
    pub pending: Option<String>,
}

/// A calibrated cell's scores before calibration.
#[derive(Debug, Clone, Serialize)]
pub struct Uncalibrated {
    pub accuracy: f64,
    pub brier: Option<f64>,
    pub ece: Option<f64>,
    pub reliability: Vec<stats::ReliabilityBin>,
}

/// Cells that differ only by seed or repeat: one sampling setting run several times.
#[derive(Debug, Clone, Serialize)]
pub struct SettingGroup {
    pub setting: String,
    pub cells: Vec<String>,
    pub runs: usize,
    pub mean_accuracy: f64,
    pub std_accuracy: f64,
    /// Accuracy of the per-row majority vote over the runs (rows present in every run).
    pub majority_accuracy: f64,
    pub majority_rows: u64,
}

pub fn setting_groups(
    plan: &Plan,
    preds: &[Prediction],
    metrics: &[CellMetrics],
) -> Vec<SettingGroup> {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (ci, cell) in plan.cells.iter().enumerate() {
        let Some(p) = &cell.point else { continue };
        let (model, prompt, method) = plan.cell_names(cell);
        let setting = format!(
            "{model}/{prompt}/{method}@t={},top_p={},top_k={},min_p={}",
            p.temperature, p.top_p, p.top_k, p.min_p
        );
        match groups.iter_mut().find(|(s, _)| *s == setting) {
            Some((_, v)) => v.push(ci),
            None => groups.push((setting, vec![ci])),
        }
    }
    groups
        .into_iter()
        .filter(|(_, cells)| cells.len() > 1)
        .map(|(setting, cells)| {
            let accs: Vec<f64> = cells
                .iter()
                .filter(|&&c| metrics[c].n > 0)
                .map(|&c| metrics[c].accuracy)
                .collect();
            let (mean, std) = stats::mean_std(&accs);
            let mut votes: std::collections::BTreeMap<usize, (usize, Vec<Option<usize>>)> =
                Default::default();
            for p in preds.iter().filter(|p| cells.contains(&p.cell)) {
                let e = votes.entry(p.row).or_insert((p.gold, Vec::new()));
                e.1.push(p.predicted);
            }
            let complete: Vec<&(usize, Vec<Option<usize>>)> = votes
                .values()
                .filter(|(_, v)| v.len() == cells.len())
                .collect();
            let right = complete
                .iter()
                .filter(|(g, v)| stats::majority(v) == Some(*g))
                .count();
            SettingGroup {
                setting,
                cells: cells.iter().map(|&c| plan.cells[c].id.clone()).collect(),
                runs: cells.len(),
                mean_accuracy: mean,
                std_accuracy: std,
                majority_accuracy: if complete.is_empty() {
                    0.0
                } else {
                    right as f64 / complete.len() as f64
                },
                majority_rows: complete.len() as u64,
            }
        })
        .collect()
}

/// A paired comparison of two cells on the rows both have.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub cell: String,
    pub reference: String,
    pub n: u64,
    pub accuracy: f64,
    pub reference_accuracy: f64,
    /// `accuracy - reference_accuracy`.
    pub difference: f64,
    pub ci_lo: f64,
    pub ci_hi: f64,
    /// Rows only the cell got right, and rows only the reference got right.
    pub cell_only: u64,
    pub reference_only: u64,
    /// Exact McNemar test.
    pub p_value: f64,
    /// `p_value` adjusted by Holm's step-down method over all the comparisons of the report
    /// (one family: the spec's `compare:` pairs, or every cell against the best).
    pub holm_p: f64,
}

/// The pairs to compare: the spec's `compare:` section, or every cell against the best one.
pub fn comparison_pairs(plan: &Plan, metrics: &[CellMetrics]) -> Vec<(usize, usize)> {
    let idx = |id: &str| {
        plan.cell_by_id(id)
            .expect("compare ids are checked by the plan")
    };
    let c = &plan.spec.compare;
    let mut pairs = Vec::new();
    let reference = match &c.baseline {
        Some(b) => Some(idx(&b.value)),
        None if c.pairs.is_empty() => metrics
            .iter()
            .enumerate()
            .filter(|(_, m)| m.n > 0)
            .max_by(|a, b| a.1.accuracy.total_cmp(&b.1.accuracy).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i),
        None => None,
    };
    if let Some(r) = reference {
        pairs.extend(
            (0..plan.cells.len())
                .filter(|&i| i != r && metrics[i].n > 0)
                .map(|i| (i, r)),
        );
    }
    for (a, b) in &c.pairs {
        pairs.push((idx(&a.value), idx(&b.value)));
    }
    pairs
}

pub fn compare(plan: &Plan, preds: &[Prediction], pairs: &[(usize, usize)]) -> Vec<Comparison> {
    let n_rows = plan.dataset.rows.len();
    let mut by_cell: Vec<Vec<Option<bool>>> = vec![vec![None; n_rows]; plan.cells.len()];
    for p in preds {
        by_cell[p.cell][p.row] = Some(p.correct());
    }
    // Each pair's bootstrap draws from its own generator: in parallel, the same numbers.
    use rayon::prelude::*;
    let mut out = pairs
        .par_iter()
        .map(|&(a, b)| {
            let (x, y): (Vec<bool>, Vec<bool>) = by_cell[a]
                .iter()
                .zip(&by_cell[b])
                .filter_map(|(x, y)| Some(((*x)?, (*y)?)))
                .unzip();
            let n = x.len() as u64;
            let acc = |v: &[bool]| {
                if v.is_empty() {
                    0.0
                } else {
                    v.iter().filter(|&&t| t).count() as f64 / v.len() as f64
                }
            };
            let (cell_only, reference_only) = stats::discordant(&x, &y);
            let (lo, hi) = stats::paired_bootstrap(
                &x,
                &y,
                plan.spec.compare.resamples,
                plan.spec.compare.seed,
                0.95,
            );
            Comparison {
                cell: plan.cells[a].id.clone(),
                reference: plan.cells[b].id.clone(),
                n,
                accuracy: acc(&x),
                reference_accuracy: acc(&y),
                difference: acc(&x) - acc(&y),
                ci_lo: lo,
                ci_hi: hi,
                cell_only,
                reference_only,
                p_value: stats::mcnemar_exact(cell_only, reference_only),
                holm_p: f64::NAN,
            }
        })
        .collect::<Vec<_>>();
    // The report's comparisons are one family.
    let adjusted = stats::holm(&out.iter().map(|c| c.p_value).collect::<Vec<_>>());
    for (c, p) in out.iter_mut().zip(adjusted) {
        c.holm_p = p;
    }
    out
}
