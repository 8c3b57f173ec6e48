//! Cascades: the first cell answers every row; a row whose label margin is small goes on to
//! the next cell, and so on. The `route` stages of the DAG: which rows a later stage needs
//! is known only once the earlier stage's rows (and, for a `fraction` rule, its fit rows)
//! are cached, so [`route`] reads the cache and returns the [`Routing`] (the rows sent to
//! each gated stage cell); the scheduler runs the gated stages and routes again until
//! nothing new is sent.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::cache::{Cache, CacheError, Lookup, Rows};
use crate::calibrate::{CalibrationError, Params};
use crate::cost::Work;
use crate::key::Digest;
use crate::plan::{Cell, CellRef, Plan};
use crate::predict::{self as metrics, Prediction};
use crate::spec::Escalate;

pub use crate::plan::{Decided, Resolution, Routing};

/// The distance in nats between a row's two best label log-probs; an answer that names no
/// label (or a row without scores) has none and always goes on.
pub fn margin(p: &Prediction) -> f64 {
    let Some(lp) = p.logprobs.as_deref() else {
        return f64::NEG_INFINITY;
    };
    if p.predicted.is_none() || lp.len() < 2 {
        return f64::NEG_INFINITY;
    }
    let mut sorted: Vec<f64> = lp.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[0] - sorted[1]
}

/// The margin threshold that sends on `fraction` of rows with these margins: rows whose
/// margin is below it go on. Halfway between the last row sent and the first kept, so the
/// threshold does not sit on a fit row.
pub fn fit_threshold(margins: &[f64], fraction: f64) -> f64 {
    let mut m: Vec<f64> = margins.to_vec();
    m.sort_by(f64::total_cmp);
    let n = m.len();
    let j = ((fraction * n as f64).round() as usize).min(n);
    if n == 0 || j == n {
        return f64::INFINITY;
    }
    if j == 0 {
        return m[0];
    }
    if m[j - 1].is_finite() {
        (m[j - 1] + m[j]) / 2.0
    } else {
        m[j]
    }
}

/// A stage cell's rows as predictions, with its calibration fitted once. A gated cell is
/// read over all its rows: a cascade reads every row its rules reach.
struct StageRows<'a> {
    plan: &'a Plan,
    cache: &'a Rows<'a>,
    cell: Cell,
    params: Option<Result<Params, metrics::CalibrationError>>,
    /// The most prompt tokens a row of this stage may have (its `n_ctx`).
    prompt_limit: Option<u32>,
}

impl<'a> StageRows<'a> {
    fn new(plan: &'a Plan, cache: &'a Rows<'a>, decided: &Decided, r: CellRef) -> Self {
        let cell = plan.cell(r).clone();
        Self {
            plan,
            cache,
            params: cell.calibration.map(|c| decided.fit(c)),
            prompt_limit: plan.prompt_limit(&cell),
            cell,
        }
    }

    fn get(&self, ri: usize, computed: &HashSet<Digest>) -> Option<Prediction> {
        metrics::predict(
            self.plan,
            self.cache,
            0,
            &self.cell,
            ri,
            self.params.as_ref(),
            computed,
        )
    }

    fn key(&self, ri: usize) -> Option<Digest> {
        self.cell.rows.key(ri)
    }

    /// Whether the row failed for this stage: its last attempt failed, or it was computed
    /// under a larger `n_ctx` and does not fit this stage's (it is never run here).
    fn failed(&self, ri: usize) -> bool {
        self.key(ri).is_some_and(|k| {
            matches!(
                self.cache.lookup(&k, self.prompt_limit),
                Lookup::Failed(_) | Lookup::TooLong { .. }
            )
        })
    }
}

/// The deciding stages' outputs from the cache: each calibration's fit (the stored one,
/// else fitted from the cached rows) and then the routing, which reads the fits of
/// calibrated stage cells.
pub fn decide(
    plan: &Plan,
    cache: &Cache,
    store: &crate::store::Store,
    eager: bool,
) -> Result<Decided, CacheError> {
    let stored: Vec<Option<Result<Params, CalibrationError>>> = (0..plan.calibrations.len())
        .map(|c| stored_fit(plan, cache, store, c))
        .collect();
    // What the fits still to make and the routing read: bounded sets (the fit rows, the
    // cascades' stage cells), read once.
    let unfitted = stored
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .flat_map(|(c, _)| metrics::calibration_keys(plan, c));
    let rows = cache.rows(unfitted.chain(stage_keys(plan)))?;
    let fits = stored
        .into_iter()
        .enumerate()
        .map(|(c, s)| s.unwrap_or_else(|| metrics::calibration(plan, &rows, c)))
        .collect();
    let mut decided = Decided {
        fits,
        routing: Routing::default(),
    };
    decided.routing = route(plan, &rows, &decided, eager);
    Ok(decided)
}

/// The keys of every row of every cascade's stage cells (evaluation and fit rows).
pub fn stage_keys(plan: &Plan) -> impl Iterator<Item = Digest> + '_ {
    plan.cascades
        .iter()
        .flat_map(|cp| {
            cp.stages
                .iter()
                .copied()
                .chain(cp.fit_stages.iter().flatten().map(|s| CellRef::Support(*s)))
        })
        .flat_map(move |r| plan.cell(r).rows.iter().flatten().map(|c| c.row_key()))
}

/// Calibration `cal`'s fit as the calibrate stage stored it, if it did.
fn stored_fit(
    plan: &Plan,
    cache: &Cache,
    store: &crate::store::Store,
    cal: usize,
) -> Option<Result<Params, CalibrationError>> {
    let cell = plan
        .cells
        .iter()
        .chain(&plan.support)
        .find(|c| c.calibration == Some(cal))?;
    let artifact = store.get(&plan.calibration_key(cell, cache)?)?;
    serde_json::from_slice::<Params>(&artifact.value)
        .ok()
        .map(Ok)
}

/// The rows each cascade sends to its gated stages now, and what is known of each; the
/// stage cells' calibrations come from `decided`'s fits (its routing is not read). `eager`: send a row on as soon as the stage before has answered it; otherwise only once
/// that stage has every row (shards, which must all see one plan).
pub fn route(plan: &Plan, cache: &Rows, decided: &Decided, eager: bool) -> Routing {
    let mut sent: HashMap<String, Vec<bool>> = HashMap::new();
    let mut resolutions = Vec::new();
    for cp in &plan.cascades {
        let rules = &plan.spec.cascades[cp.spec].escalate;
        let steps = rules.len();
        let mut thresholds: Vec<Option<f64>> = rules
            .iter()
            .map(|e| match e {
                Escalate::Margin(m) => Some(*m),
                Escalate::Fraction { .. } => None,
            })
            .collect();
        let mut fit_rows = vec![None; steps];
        let mut admit = |r: CellRef, row: usize, n: usize| {
            let cell = plan.cell(r);
            if cell.gated {
                sent.entry(cell.id.clone())
                    .or_insert_with(|| vec![false; n])[row] = true;
            }
        };
        // The fit rows: each step's threshold from the rows that reach it.
        if let Some(set) = cp.fit_set {
            let n = plan.sets[set].rows.len();
            let mut reaching: Vec<usize> = (0..n).collect();
            for (k, fit_stage) in cp.fit_stages.iter().enumerate() {
                let Some(fs) = fit_stage else { break };
                let stage = StageRows::new(plan, cache, decided, CellRef::Support(*fs));
                let mut margins = Vec::new();
                let mut complete = true;
                for &r in &reaching {
                    admit(CellRef::Support(*fs), r, n);
                    match stage.get(r, &HashSet::new()) {
                        Some(p) => margins.push((r, margin(&p))),
                        None if stage.failed(r) => {}
                        None => complete = false,
                    }
                }
                if !complete || k >= steps {
                    break;
                }
                let t = match &rules[k] {
                    Escalate::Margin(m) => *m,
                    Escalate::Fraction { fraction, .. } => {
                        let m: Vec<f64> = margins.iter().map(|x| x.1).collect();
                        fit_rows[k] = Some(m.len());
                        fit_threshold(&m, *fraction)
                    }
                };
                thresholds[k] = Some(t);
                reaching = margins.iter().filter(|x| x.1 < t).map(|x| x.0).collect();
            }
        }
        // The evaluation rows, stage by stage.
        let stages: Vec<StageRows> = cp
            .stages
            .iter()
            .map(|r| StageRows::new(plan, cache, decided, *r))
            .collect();
        let n = plan.dataset.rows.len();
        let mut res = Resolution {
            thresholds: thresholds.clone(),
            fit_rows,
            answered_by: vec![None; n],
            reached: vec![0; steps + 1],
            pending: 0,
            failed: 0,
        };
        let mut at: Vec<usize> = (0..n).collect();
        for (k, stage) in stages.iter().enumerate() {
            res.reached[k] = at.len();
            let mut next = Vec::new();
            let mut complete = true;
            for &r in &at {
                admit(cp.stages[k], r, n);
                let Some(p) = stage.get(r, &HashSet::new()) else {
                    if stage.failed(r) {
                        res.failed += 1;
                    } else {
                        res.pending += 1;
                        complete = false;
                    }
                    continue;
                };
                match thresholds.get(k) {
                    None => res.answered_by[r] = Some(k),
                    Some(None) => complete = false,
                    Some(Some(t)) if margin(&p) < *t => next.push(r),
                    Some(Some(_)) => res.answered_by[r] = Some(k),
                }
            }
            // Not eager (split runs): a stage's rows are let in only once every row before
            // it is known, so that every shard sees the same plan.
            if !eager && !complete {
                break;
            }
            at = next;
        }
        resolutions.push(res);
    }
    Routing { resolutions, sent }
}

/// The cascade's rows as predictions of its reported cell: the answer of the stage that
/// answered, the time and tokens of every stage the row went through.
pub fn predictions(
    plan: &Plan,
    decided: &Decided,
    cache: &Rows,
    cascade: usize,
    computed: &HashSet<Digest>,
) -> Vec<Prediction> {
    let cp = &plan.cascades[cascade];
    let Some(res) = decided.resolution(cascade) else {
        return Vec::new();
    };
    let stages: Vec<StageRows> = cp
        .stages
        .iter()
        .map(|r| StageRows::new(plan, cache, decided, *r))
        .collect();
    let mut out = Vec::new();
    for (ri, by) in res.answered_by.iter().enumerate() {
        let Some(k) = *by else { continue };
        let went: Option<Vec<Prediction>> = (0..=k).map(|s| stages[s].get(ri, computed)).collect();
        let Some(went) = went else { continue };
        out.push(combine(cp.cell, ri, k, &went));
    }
    out
}

/// One row of a cascade from the predictions of the stages it went through.
fn combine(cell: usize, row: usize, stage: usize, went: &[Prediction]) -> Prediction {
    let last = went.last().expect("a row goes through at least one stage");
    let parts: Vec<&Prediction> = went.iter().collect();
    Prediction {
        cell,
        row,
        stage: Some(stage),
        normalised: None,
        ..last.clone()
    }
    .costing(&parts)
}

/// A cascade beside its first and last stage alone, on the same rows.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub stages: Vec<String>,
    /// The margin threshold of each step, and how many fit rows fitted it.
    pub thresholds: Vec<Option<f64>>,
    pub fit_rows: Vec<Option<usize>>,
    /// Rows that reached each stage (of the rows answered).
    pub reached: Vec<u64>,
    /// Rows the cascade answered.
    pub rows: u64,
    pub accuracy: f64,
    pub first: Alone,
    pub last: Alone,
    /// The cascade's work per row (every stage a row went through), and its compute
    /// against each stage alone on the same rows: the cost that no load moves.
    pub work: Work,
    pub compute_vs_first: Option<f64>,
    pub compute_vs_last: Option<f64>,
    /// Its expected time against each stage's alone, at the engine rates measured on this
    /// machine (a model's rate weighs its compute: a larger model may use the cores better).
    pub expected_vs_first: Option<f64>,
    pub expected_vs_last: Option<f64>,
    /// Wall-clock time and prompt tokens per row against each stage alone (as measured).
    pub time_vs_first: Option<f64>,
    pub time_vs_last: Option<f64>,
    pub tokens_vs_first: Option<f64>,
    pub tokens_vs_last: Option<f64>,
    /// Accuracy and cost over the first step's threshold (later steps as given).
    pub curve: Vec<CurvePoint>,
}

/// One stage on its own, on the rows the cascade answered.
#[derive(Debug, Clone, Serialize)]
pub struct Alone {
    pub cell: String,
    /// Rows this stage computed of those (all of them for the first).
    pub rows: u64,
    pub accuracy: Option<f64>,
    pub seconds_per_row: f64,
    pub prompt_tokens_per_row: f64,
    /// Its work per row.
    pub work: Work,
    /// Cost from the rows it did compute, when it did not compute them all.
    pub estimated: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    /// Share of rows the first step sends on.
    pub escalated: f64,
    pub threshold: f64,
    pub accuracy: f64,
    pub seconds_per_row: f64,
    pub prompt_tokens_per_row: f64,
    /// Compute per row, where every stage's model size is known.
    pub gflop_per_row: Option<f64>,
}

/// Points on a cascade's curve, at most.
const CURVE_POINTS: usize = 41;

pub fn summary(plan: &Plan, decided: &Decided, cache: &Rows, cascade: usize) -> Option<Summary> {
    let cp = &plan.cascades[cascade];
    let res = decided.resolution(cascade)?;
    let none = HashSet::new();
    let stages: Vec<StageRows> = cp
        .stages
        .iter()
        .map(|r| StageRows::new(plan, cache, decided, *r))
        .collect();
    let steps = stages.len() - 1;
    let rows: Vec<(usize, usize)> = res
        .answered_by
        .iter()
        .enumerate()
        .filter_map(|(r, k)| k.map(|k| (r, k)))
        .collect();
    let n = rows.len();
    if n == 0 {
        return None;
    }
    // Each stage's prediction of each row, where cached.
    let preds: Vec<Vec<Option<Prediction>>> = stages
        .iter()
        .map(|s| {
            (0..plan.dataset.rows.len())
                .map(|r| s.get(r, &none))
                .collect()
        })
        .collect();
    let mut reached = vec![0u64; steps + 1];
    let (mut correct, mut secs, mut tokens) = (0usize, 0.0, 0.0);
    let mut work = Vec::with_capacity(n);
    for &(r, k) in &rows {
        for x in reached.iter_mut().take(k + 1) {
            *x += 1;
        }
        let went: Vec<&Prediction> = (0..=k).filter_map(|s| preds[s][r].as_ref()).collect();
        correct += usize::from(went.last().is_some_and(|p| p.correct()));
        secs += went.iter().map(|p| p.latency_ms).sum::<f64>() / 1000.0;
        tokens += went.iter().map(|p| f64::from(p.prompt_tokens)).sum::<f64>();
        work.push(Work::sum(went.iter().map(|p| &p.work)));
    }
    let work = Work::sum(&work).per_row(n);
    let alone = |s: usize| -> Alone {
        let have: Vec<&Prediction> = rows
            .iter()
            .filter_map(|(r, _)| preds[s][*r].as_ref())
            .collect();
        let m = have.len();
        let mean = |f: &dyn Fn(&Prediction) -> f64| {
            if m == 0 {
                0.0
            } else {
                have.iter().map(|p| f(p)).sum::<f64>() / m as f64
            }
        };
        Alone {
            cell: stages[s].cell.id.clone(),
            rows: m as u64,
            accuracy: (m == n)
                .then(|| have.iter().filter(|p| p.correct()).count() as f64 / n as f64),
            seconds_per_row: mean(&|p| p.latency_ms / 1000.0),
            prompt_tokens_per_row: mean(&|p| f64::from(p.prompt_tokens)),
            work: Work::sum(have.iter().map(|p| &p.work)).per_row(m),
            estimated: m < n,
        }
    };
    let (first, last) = (alone(0), alone(steps));
    let per_row = |x: f64| x / n as f64;
    let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
    let thresholds = res.thresholds.clone();
    Some(Summary {
        stages: stages.iter().map(|s| s.cell.id.clone()).collect(),
        fit_rows: res.fit_rows.clone(),
        reached,
        rows: n as u64,
        accuracy: correct as f64 / n as f64,
        compute_vs_first: work.ratio(&first.work),
        compute_vs_last: work.ratio(&last.work),
        expected_vs_first: work.expected_ratio(&first.work),
        expected_vs_last: work.expected_ratio(&last.work),
        work,
        time_vs_first: ratio(per_row(secs), first.seconds_per_row),
        time_vs_last: ratio(per_row(secs), last.seconds_per_row),
        tokens_vs_first: ratio(per_row(tokens), first.prompt_tokens_per_row),
        tokens_vs_last: ratio(per_row(tokens), last.prompt_tokens_per_row),
        curve: curve(&preds, &rows, &thresholds),
        thresholds,
        first,
        last,
    })
}

/// Accuracy and cost as the first step's threshold moves from sending no row on to
/// sending every row whose later stages are cached (all of them when the next stage is
/// a cell of its own).
fn curve(
    preds: &[Vec<Option<Prediction>>],
    rows: &[(usize, usize)],
    thresholds: &[Option<f64>],
) -> Vec<CurvePoint> {
    let steps = preds.len() - 1;
    // From stage 1 on, the answer and the cost of each row as the cascade's later rules
    // would give them; `None` where a stage row is not cached.
    let rest = |r: usize| -> Option<(bool, f64, f64, Work)> {
        let (mut secs, mut tokens, mut work) = (0.0, 0.0, Work::none());
        let mut k = 1;
        loop {
            let p = preds[k][r].as_ref()?;
            secs += p.latency_ms / 1000.0;
            tokens += f64::from(p.prompt_tokens);
            work += &p.work;
            if k == steps || margin(p) >= thresholds[k]? {
                return Some((p.correct(), secs, tokens, work));
            }
            k += 1;
        }
    };
    let mut by_margin: Vec<(f64, &Prediction, usize)> = rows
        .iter()
        .filter_map(|(r, _)| preds[0][*r].as_ref().map(|p| (margin(p), p, *r)))
        .collect();
    by_margin.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = by_margin.len();
    if n == 0 {
        return Vec::new();
    }
    let (mut correct, mut secs, mut tokens) = (0usize, 0.0, 0.0);
    let mut work = Work::none();
    for (_, p, _) in &by_margin {
        correct += usize::from(p.correct());
        secs += p.latency_ms / 1000.0;
        tokens += f64::from(p.prompt_tokens);
        work += &p.work;
    }
    let every = n.div_ceil(CURVE_POINTS - 1).max(1);
    let point = |j: usize, correct: usize, secs: f64, tokens: f64, work: &Work| CurvePoint {
        escalated: j as f64 / n as f64,
        threshold: if j == 0 {
            by_margin[0].0
        } else if j == n {
            f64::INFINITY
        } else {
            by_margin[j].0
        },
        accuracy: correct as f64 / n as f64,
        seconds_per_row: secs / n as f64,
        prompt_tokens_per_row: tokens / n as f64,
        gflop_per_row: work.per_row(n).gflop(),
    };
    let mut out = vec![point(0, correct, secs, tokens, &work)];
    for (j, &(_, p, r)) in by_margin.iter().enumerate() {
        let Some((right, s, t, w)) = rest(r) else {
            break;
        };
        correct = correct + usize::from(right) - usize::from(p.correct());
        secs += s;
        tokens += t;
        work += &w;
        if (j + 1) % every == 0 || j + 1 == n {
            out.push(point(j + 1, correct, secs, tokens, &work));
        }
    }
    out.retain(|p| p.threshold.is_finite() || p.escalated == 1.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fitted_threshold_sends_on_the_asked_fraction() {
        let margins: Vec<f64> = (0..100).map(|i| f64::from(i) / 10.0).collect();
        let t = fit_threshold(&margins, 0.3);
        assert_eq!(margins.iter().filter(|m| **m < t).count(), 30);
        assert!((t - 2.95).abs() < 1e-9, "halfway between 2.9 and 3.0: {t}");
        assert_eq!(
            margins
                .iter()
                .filter(|m| **m < fit_threshold(&margins, 0.999))
                .count(),
            100
        );
        assert_eq!(
            margins
                .iter()
                .filter(|m| **m < fit_threshold(&margins, 0.001))
                .count(),
            0
        );
    }

    #[test]
    fn unanswerable_rows_always_go_on_and_count_toward_the_fraction() {
        let margins = [f64::NEG_INFINITY, f64::NEG_INFINITY, 1.0, 2.0, 3.0];
        let t = fit_threshold(&margins, 0.4);
        assert_eq!(
            t, 1.0,
            "the two invalid rows are the 40%: the threshold is the next margin"
        );
        assert_eq!(margins.iter().filter(|m| **m < t).count(), 2);
    }

    #[test]
    fn the_margin_is_the_gap_between_the_two_best_labels() {
        let p = |lp: Vec<f64>, predicted| Prediction {
            logprobs: Some(lp),
            predicted,
            ..test_prediction()
        };
        assert!((margin(&p(vec![-0.1, -2.5, -3.0], Some(0))) - 2.4).abs() < 1e-12);
        assert_eq!(margin(&p(vec![-0.1, -2.5], None)), f64::NEG_INFINITY);
        assert_eq!(
            margin(&Prediction {
                logprobs: None,
                ..test_prediction()
            }),
            f64::NEG_INFINITY
        );
    }

    fn test_prediction() -> Prediction {
        Prediction {
            cell: 0,
            row: 0,
            gold: 0,
            predicted: Some(0),
            raw: None,
            logprobs: None,
            uncalibrated: None,
            prompt_tokens: 10,
            evaluated_tokens: 10,
            gen_tokens: 0,
            finish: crate::row::Finish::Scored,
            prefill_ms: 5.0,
            decode_ms: 1.0,
            shared_by: 1,
            work: Work::none(),
            latency_ms: 6.0,
            shared_latency_ms: 6.0,
            from_cache: true,
            host: None,
            shard: None,
            stage: None,
            normalised: None,
        }
    }
}
