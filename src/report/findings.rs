//! Findings: sentences the report derives from its own statistics, by rules, each with the
//! numbers and the test behind it. A difference is called a win only when its paired
//! bootstrap interval excludes 0 and the exact McNemar test gives p < 0.05; otherwise it is
//! said to be not significant.

use serde::Serialize;

use super::Analysis;
use crate::cost::{Work, describe, seconds, significant};
use crate::metrics::CellKind;
use crate::metrics::stats;
use crate::plan::Plan;
use crate::spec::CalibrationKind;

/// A share of predictions this far (or more) from the gold share is a bias worth naming.
const BIAS_MIN: f64 = 0.15;
/// p below this, with an interval that excludes 0, makes a difference significant.
const ALPHA: f64 = 0.05;

/// One sentence of the Findings section.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Finding {
    /// What it is about: `models`, `prompts`, `bias`, `temperature`, `calibration`, `cost`,
    /// `baseline`, `validity`, `comparison`, `cascade`, `ensemble`, `probe`.
    pub topic: &'static str,
    pub text: String,
}

/// A model's best cell, as the report's summary shows it: picked after the run, so beside
/// it the honest estimate (the best chosen on half the rows, measured on the other half).
#[derive(Debug, Clone, Serialize)]
pub struct BestCell {
    pub model: String,
    pub cell: String,
    /// Of how many cells of the model it is the best.
    pub of: usize,
    pub accuracy: f64,
    pub honest: Option<f64>,
    pub work: Option<Work>,
}

/// Each model's best cell, in spec order (models with no answered cell left out).
pub fn best_cells(input: &Input) -> Vec<BestCell> {
    input
        .models
        .iter()
        .filter_map(|m| {
            let b = best(input, model_cells(input, m))?;
            Some(BestCell {
                model: m.clone(),
                cell: b.id.clone(),
                of: model_cells(input, m).filter(|c| c.n() > 0).count(),
                accuracy: b.accuracy(&input.gold)?,
                honest: honest_best(input, model_cells(input, m)),
                work: b.work,
            })
        })
        .collect()
}

/// The Findings a reader should see first: how the models compare and what each cascade
/// buys (at most `KEY_FINDINGS`); the page folds the rest.
pub fn key(findings: &[Finding]) -> Vec<usize> {
    let mut out: Vec<usize> = findings
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f.topic, "models" | "cascade" | "ensemble"))
        .map(|(i, _)| i)
        .take(KEY_FINDINGS)
        .collect();
    if out.is_empty() {
        out = (0..findings.len().min(3)).collect();
    }
    out
}

/// Findings shown unfolded at the top of the page, at most.
const KEY_FINDINGS: usize = 5;

/// The findings as a Markdown list, one sentence an item, grouped by topic.
pub fn markdown(findings: &[Finding]) -> String {
    let mut out = String::from(
        "# Findings\n\nDerived by rules from the report's statistics (`src/report/findings.rs`): a difference is a win only when its 95% paired bootstrap interval excludes 0 and the exact McNemar test gives p < 0.05.\n\n",
    );
    for f in findings {
        out.push_str(&format!("- **{}**: {}\n", f.topic, f.text));
    }
    out
}

/// A cell as the rules see it.
#[derive(Debug, Clone, Default)]
pub struct CellView {
    pub id: String,
    pub model: String,
    pub prompt: String,
    pub method: String,
    /// `generate`, `loglik` or `knn_vote`.
    pub kind: CellKind,
    /// `fit` or `content_free` for calibrated cells.
    pub calibration: Option<CalibrationKind>,
    /// Generation cells: the temperature, the seed, and the rest of the sampler setting.
    pub temperature: Option<f64>,
    pub seed: Option<u64>,
    pub sampler_rest: String,
    /// Each evaluation row's prediction: `None` when the cell has no row for it,
    /// `Some(None)` for an invalid answer.
    pub predictions: Vec<Option<Option<usize>>>,
    pub invalid: u64,
    /// What a row costs, from its tokens (never its wall-clock time, which moves with
    /// the machine's load); `None` where no model computed the cell's rows.
    pub work: Option<Work>,
    /// Cascade cells: the stages and what the cascade costs beside them.
    pub cascade: Option<CascadeView>,
    /// Ensemble cells: the member cells' ids.
    pub members: Vec<String>,
    /// Probe cells fitted on a model's hidden states: what was chosen on the fit rows.
    pub probe: Option<String>,
}

/// A cascade as the rules see it.
#[derive(Debug, Clone, Default)]
pub struct CascadeView {
    pub first: String,
    pub last: String,
    /// Each later stage, with the share of all rows that reach it.
    pub onward: Vec<(String, f64)>,
    pub compute_vs_first: Option<f64>,
    pub compute_vs_last: Option<f64>,
    pub expected_vs_first: Option<f64>,
    pub expected_vs_last: Option<f64>,
}

/// Everything the rules read.
#[derive(Debug, Clone, Default)]
pub struct Input {
    pub labels: Vec<String>,
    /// Fixed labels, per-row choices (the labels are then places: A, B, ...) or reference
    /// answers (the labels are then `correct` and `incorrect`).
    pub shape: crate::spec::TaskShape,
    /// The gold label of each evaluation row.
    pub gold: Vec<usize>,
    /// Models in spec order (smallest first, as specs list them by convention is not
    /// assumed: the order only decides which model is named first).
    pub models: Vec<String>,
    pub cells: Vec<CellView>,
    pub resamples: usize,
    pub seed: u64,
}

impl Input {
    pub fn new(plan: &Plan, a: &Analysis) -> Self {
        let n_rows = plan.dataset.rows.len();
        let mut predictions = vec![vec![None; n_rows]; plan.cells.len()];
        for p in &a.predictions {
            predictions[p.cell][p.row] = Some(p.predicted);
        }
        let cells = plan
            .cells
            .iter()
            .zip(&a.metrics)
            .zip(predictions)
            .map(|((cell, m), predictions)| CellView {
                id: cell.id.clone(),
                model: m.model.clone(),
                prompt: m.prompt.clone(),
                method: m.method.clone(),
                kind: m.kind,
                calibration: m.calibration.as_ref().map(|c| c.kind),
                temperature: cell.point.as_ref().map(|p| p.temperature),
                seed: cell.point.as_ref().map(|p| p.seed),
                sampler_rest: cell
                    .point
                    .as_ref()
                    .map(|p| {
                        format!(
                            "top_p={},top_k={},min_p={},repeat={}",
                            p.top_p, p.top_k, p.min_p, p.repeat
                        )
                    })
                    .unwrap_or_default(),
                predictions,
                invalid: m.invalid,
                work: m.work,
                cascade: m.cascade.as_ref().map(|s| CascadeView {
                    first: s.stages.first().cloned().unwrap_or_default(),
                    last: s.stages.last().cloned().unwrap_or_default(),
                    onward: s
                        .stages
                        .iter()
                        .zip(&s.reached)
                        .skip(1)
                        .map(|(stage, &n)| (stage.clone(), n as f64 / s.rows.max(1) as f64))
                        .collect(),
                    compute_vs_first: s.compute_vs_first,
                    compute_vs_last: s.compute_vs_last,
                    expected_vs_first: s.expected_vs_first,
                    expected_vs_last: s.expected_vs_last,
                }),
                probe: m.calibration.as_ref().and_then(|c| match &c.params {
                    Some(crate::calibrate::Params::Probe(p)) => Some(format!(
                        "{}, C = {}, chosen by cross-validation on {} fit rows at {}",
                        p.chosen.name,
                        p.c,
                        p.rows,
                        pct(p.cv_accuracy)
                    )),
                    _ => None,
                }),
                members: match cell.source {
                    crate::plan::Source::Ensemble { ensemble } => plan.ensembles[ensemble]
                        .members
                        .iter()
                        .map(|&m| plan.cells[m].id.clone())
                        .collect(),
                    _ => Vec::new(),
                },
            })
            .collect();
        Self {
            labels: plan.dataset.label_names(),
            shape: plan.spec.dataset.shape(),
            gold: plan.dataset.rows.iter().map(|r| r.label).collect(),
            models: plan.spec.models.iter().map(|m| m.id.clone()).collect(),
            cells,
            resamples: plan.spec.compare.resamples,
            seed: plan.spec.compare.seed,
        }
    }
}

/// The findings, in reading order.
pub fn derive(input: &Input) -> Vec<Finding> {
    let mut out = Vec::new();
    precision(input, &mut out);
    models(input, &mut out);
    prompts(input, &mut out);
    calibration(input, &mut out);
    bias(input, &mut out);
    classes(input, &mut out);
    temperature(input, &mut out);
    seeds_and_samplers(input, &mut out);
    baseline(input, &mut out);
    validity(input, &mut out);
    cost(input, &mut out);
    cascades(input, &mut out);
    ensembles(input, &mut out);
    probes(input, &mut out);
    out
}

impl CellView {
    fn n(&self) -> usize {
        self.predictions.iter().flatten().count()
    }

    fn accuracy(&self, gold: &[usize]) -> Option<f64> {
        let n = self.n();
        (n > 0).then(|| {
            self.predictions
                .iter()
                .zip(gold)
                .filter(|(p, g)| **p == Some(Some(**g)))
                .count() as f64
                / n as f64
        })
    }

    /// A cell that reads a model's (or the vote's) scores as they are: not calibrated,
    /// and not combined from other cells.
    fn raw(&self) -> bool {
        self.calibration.is_none() && !matches!(self.kind, CellKind::Ensemble | CellKind::Cascade)
    }
}

/// A paired test of two cells on the rows both have.
#[derive(Debug, Clone, Copy)]
struct Paired {
    n: usize,
    a: f64,
    b: f64,
    lo: f64,
    hi: f64,
    p: f64,
    /// Where the test is one of a family of comparisons (the prompts against one baseline,
    /// the temperature pairs, calibrated against raw, ...): its McNemar p adjusted by Holm's
    /// step-down method over the family, which keeps the chance of any false win in the
    /// family below 5%.
    holm: Option<Holm>,
}

/// A test's Holm-adjusted p and the size of its family.
#[derive(Debug, Clone, Copy)]
struct Holm {
    p: f64,
    of: usize,
}

impl Paired {
    fn diff(&self) -> f64 {
        self.a - self.b
    }

    /// The p that decides: adjusted for its family where it has one.
    fn deciding_p(&self) -> f64 {
        self.holm.map_or(self.p, |h| h.p)
    }

    fn significant(&self) -> bool {
        (self.lo > 0.0 || self.hi < 0.0) && self.deciding_p() < ALPHA
    }

    /// "McNemar p = 0.012, Holm p = 0.048 of 7", or "McNemar p = 0.41" alone.
    fn p_values(&self) -> String {
        match self.holm {
            Some(h) => format!(
                "McNemar {}, Holm {} of {}",
                p_text(self.p),
                p_text(h.p),
                h.of
            ),
            None => format!("McNemar {}", p_text(self.p)),
        }
    }

    /// "(95% paired bootstrap −3.0 to +2.0, McNemar p = 0.41, 300 rows)".
    fn evidence(&self) -> String {
        format!(
            "95% paired bootstrap {} to {}, {}, {} rows",
            signed(self.lo),
            signed(self.hi),
            self.p_values(),
            self.n
        )
    }
}

/// Make `tests` one family: each McNemar p adjusted by Holm over all of them (a family of
/// one keeps its p as it is).
fn family<'a>(tests: impl IntoIterator<Item = &'a mut Paired>) {
    let mut tests: Vec<&mut Paired> = tests.into_iter().collect();
    if tests.len() < 2 {
        return;
    }
    let adjusted = stats::holm(&tests.iter().map(|t| t.p).collect::<Vec<_>>());
    let of = tests.len();
    for (t, p) in tests.iter_mut().zip(adjusted) {
        t.holm = Some(Holm { p, of });
    }
}

fn paired(input: &Input, a: &CellView, b: &CellView) -> Option<Paired> {
    let (x, y): (Vec<bool>, Vec<bool>) = a
        .predictions
        .iter()
        .zip(&b.predictions)
        .zip(&input.gold)
        .filter_map(|((p, q), g)| Some(((*p)? == Some(*g), (*q)? == Some(*g))))
        .unzip();
    if x.is_empty() {
        return None;
    }
    let acc = |v: &[bool]| v.iter().filter(|&&t| t).count() as f64 / v.len() as f64;
    let (lo, hi) = stats::paired_bootstrap(&x, &y, input.resamples, input.seed, 0.95);
    let (only_a, only_b) = stats::discordant(&x, &y);
    Some(Paired {
        n: x.len(),
        a: acc(&x),
        b: acc(&y),
        lo,
        hi,
        p: stats::mcnemar_exact(only_a, only_b),
        holm: None,
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// A difference in accuracy points, signed: "+3.0", "−1.5", "0.0".
fn signed(x: f64) -> String {
    let v = 100.0 * x;
    if v.abs() < 0.05 {
        "0.0".into()
    } else if v > 0.0 {
        format!("+{v:.1}")
    } else {
        format!("−{:.1}", -v)
    }
}

fn p_text(p: f64) -> String {
    if p < 0.001 {
        "p < 0.001".into()
    } else {
        format!("p = {p:.3}")
    }
}

/// "beats X by 3.0 points (…)" or "does not differ significantly from X: −1.0 points (…)".
fn verdict(t: &Paired, other: &str) -> String {
    if t.significant() {
        let (verb, d) = if t.diff() > 0.0 {
            ("beats", t.diff())
        } else {
            ("trails", -t.diff())
        };
        format!(
            "{verb} {other} by {:.1} points ({})",
            100.0 * d,
            t.evidence()
        )
    } else {
        // The two tests can disagree (few discordant rows, all one way, give a bootstrap
        // interval without 0 and an exact McNemar p above 0.05): say which one holds it back.
        let why = if t.lo > 0.0 || t.hi < 0.0 {
            "the interval excludes 0 but McNemar's p is not below 0.05, so not significant"
        } else if t.p < ALPHA && t.holm.is_some_and(|h| h.p >= ALPHA) {
            "McNemar's p is below 0.05 but not once adjusted for the family, so not significant"
        } else if t.deciding_p() < ALPHA {
            "McNemar's p is below 0.05 but the interval includes 0, so not significant"
        } else {
            "not significant"
        };
        format!(
            "does not differ significantly from {other}: {} points ({}; {why})",
            signed(t.diff()),
            t.evidence()
        )
    }
}

/// The accuracy of "the best cell" without the lift of having picked it on the same rows:
/// the cell most accurate on one half of the rows, measured on the other half, and the other
/// way round, averaged by the rows measured. Picking the best of many cells on the rows that
/// then measure it favours a cell that was lucky on them; this estimate is not inflated so.
fn honest_best<'a>(input: &Input, cells: impl Iterator<Item = &'a CellView>) -> Option<f64> {
    let cells = most_answered(cells);
    // The halves alternate within each label, so each half keeps the labels' shares (rows
    // are usually interleaved by label, and halves by row index alone would put one label
    // in each).
    let mut seen = vec![0usize; input.labels.len().max(1)];
    let half: Vec<usize> = input
        .gold
        .iter()
        .map(|&g| {
            let slot = g.min(seen.len() - 1);
            seen[slot] += 1;
            (seen[slot] - 1) % 2
        })
        .collect();
    let on_half = |c: &CellView, parity: usize| -> Option<(usize, usize)> {
        let (mut right, mut n) = (0, 0);
        for (i, (p, g)) in c.predictions.iter().zip(&input.gold).enumerate() {
            if half[i] == parity
                && let Some(p) = p
            {
                n += 1;
                right += usize::from(*p == Some(*g));
            }
        }
        (n > 0).then_some((right, n))
    };
    let (mut right, mut n) = (0, 0);
    for parity in [0, 1] {
        let (chosen, _) = first_best(&cells, |c| {
            on_half(c, parity).map(|(r, k)| r as f64 / k as f64)
        })?;
        let (r, k) = on_half(chosen, 1 - parity)?;
        right += r;
        n += k;
    }
    (n > 0).then(|| right as f64 / n as f64)
}

/// The most accurate of `cells` among those with the most answers (ties: the first): a
/// cell a stopped run left with a few rows is never called the best on them.
fn best<'a>(input: &Input, cells: impl Iterator<Item = &'a CellView>) -> Option<&'a CellView> {
    first_best(&most_answered(cells), |c| c.accuracy(&input.gold)).map(|(c, _)| c)
}

/// The cells with the most answers.
fn most_answered<'a>(cells: impl Iterator<Item = &'a CellView>) -> Vec<&'a CellView> {
    let cells: Vec<&CellView> = cells.collect();
    let most = cells.iter().map(|c| c.n()).max().unwrap_or(0);
    cells.into_iter().filter(|c| c.n() == most).collect()
}

/// The cell with the highest `score` (ties: the first), and that score.
fn first_best<'a>(
    cells: &[&'a CellView],
    score: impl Fn(&CellView) -> Option<f64>,
) -> Option<(&'a CellView, f64)> {
    let mut top: Option<(&CellView, f64)> = None;
    for &c in cells {
        if let Some(a) = score(c)
            && top.is_none_or(|(_, b)| a > b)
        {
            top = Some((c, a));
        }
    }
    top
}

/// The cell of `model` and `prompt` that scores labels raw: the first raw `loglik` method,
/// else the first generation cell.
fn reference_cell<'a>(input: &'a Input, model: &str, prompt: &str) -> Option<&'a CellView> {
    let of = |c: &&CellView| c.model == model && c.prompt == prompt && c.n() > 0;
    input
        .cells
        .iter()
        .filter(of)
        .find(|c| c.kind == CellKind::Loglik && c.raw())
        .or_else(|| {
            input
                .cells
                .iter()
                .filter(of)
                .find(|c| c.kind == CellKind::Generate)
        })
}

fn model_cells<'a>(input: &'a Input, model: &'a str) -> impl Iterator<Item = &'a CellView> {
    input
        .cells
        .iter()
        .filter(move |c| c.model == model && c.kind != CellKind::KnnVote)
}

fn prompts_of(input: &Input, model: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    // An ensemble's "prompt" is its id.
    for c in model_cells(input, model).filter(|c| c.kind != CellKind::Ensemble) {
        if !out.contains(&c.prompt) {
            out.push(c.prompt.clone());
        }
    }
    out
}

/// What the sample size buys: the interval on one cell, and the smallest paired difference
/// the report can call significant.
fn precision(input: &Input, out: &mut Vec<Finding>) {
    let mut accs: Vec<f64> = input
        .cells
        .iter()
        .filter_map(|c| c.accuracy(&input.gold))
        .collect();
    let n = input.gold.len();
    if accs.is_empty() || n == 0 {
        return;
    }
    accs.sort_by(f64::total_cmp);
    let median = accs[accs.len() / 2];
    let half = |a: f64| stats::wilson_half_width(a, n as u64);
    // The smallest net win the exact McNemar test calls significant when a tenth of the
    // rows are discordant.
    let discordant = ((n as f64 * 0.1).round() as u64).max(1);
    let needed = (0..=discordant)
        .map(|c| (discordant - c, c))
        .filter(|&(b, c)| b > c && stats::mcnemar_exact(b, c) < ALPHA)
        .map(|(b, c)| (b - c) as f64 / n as f64)
        .min_by(f64::total_cmp);
    out.push(Finding {
        topic: "sample",
        text: format!(
            "{n} rows: a 95% interval on one cell's accuracy is ±{:.1} points at the median cell's {} (±{:.1} at 50%); when two cells answer a tenth of the rows differently, {}.",
            100.0 * half(median),
            pct(median),
            100.0 * half(0.5),
            match needed {
                Some(d) => format!(
                    "a paired difference of {:.1} points or more is significant",
                    100.0 * d
                ),
                None => "no paired difference can be significant".into(),
            }
        ),
    });
}

/// The best cell of each model against the best of every other, and the models on the
/// same first prompt and method.
fn models(input: &Input, out: &mut Vec<Finding>) {
    for (i, a) in input.models.iter().enumerate() {
        for b in &input.models[i + 1..] {
            let count = |m: &str| model_cells(input, m).filter(|c| c.n() > 0).count();
            let (Some(ba), Some(bb)) = (
                best(input, model_cells(input, a)),
                best(input, model_cells(input, b)),
            ) else {
                continue;
            };
            let Some(t) = paired(input, bb, ba) else {
                continue;
            };
            let honest = |m: &str| {
                honest_best(input, model_cells(input, m))
                    .map(|h| format!("; {} chosen on half the rows, measured on the rest", pct(h)))
                    .unwrap_or_default()
            };
            let other = format!(
                "the best {a} cell, {} ({}, of {} cells{})",
                ba.id,
                pct(t.b),
                count(a),
                honest(a)
            );
            out.push(Finding {
                topic: "models",
                text: format!(
                    "The best {b} cell, {} ({}, the most accurate of {} cells{}), {}. Both were picked as the best after the run, which favours them: the honest estimates beside them choose the best cell on one half of the rows and measure it on the other, and the other way round.",
                    bb.id,
                    pct(t.a),
                    count(b),
                    honest(b),
                    verdict(&t, &other),
                ),
            });
            let Some(first) = prompts_of(input, a).into_iter().next() else {
                continue;
            };
            if let (Some(ra), Some(rb)) = (
                reference_cell(input, a, &first),
                reference_cell(input, b, &first),
            ) && let Some(t) = paired(input, rb, ra)
            {
                out.push(Finding {
                    topic: "models",
                    text: format!(
                        "On the same prompt and method ({first}, {}), {b} at {} {}.",
                        ra.method,
                        pct(t.a),
                        verdict(&t, &format!("{a} at {}", pct(t.b))),
                    ),
                });
            }
        }
    }
}

/// Each prompt against the model's first prompt, on the raw scoring cell and again on the
/// first calibrated one.
fn prompts(input: &Input, out: &mut Vec<Finding>) {
    for model in &input.models {
        let prompts = prompts_of(input, model);
        prompts_compared(input, model, &prompts, out, |p| {
            reference_cell(input, model, p)
        });
        // Calibration can remove what a prompt did to the label bias, so prompts are
        // compared again on the first calibrated scoring.
        let calibrated = |c: &&CellView| {
            c.model == *model && c.kind == CellKind::Loglik && c.calibration.is_some() && c.n() > 0
        };
        if let Some(method) = input.cells.iter().find(calibrated).map(|c| &c.method) {
            prompts_compared(input, model, &prompts, out, |p| {
                input
                    .cells
                    .iter()
                    .filter(calibrated)
                    .find(|c| c.prompt == p && c.method == *method)
            });
        }
    }
}

/// Each prompt's cell against the first prompt's, sorted into better, worse and not
/// significantly different; `pick` chooses the cell of a prompt (one scoring for all).
fn prompts_compared<'a>(
    input: &'a Input,
    model: &str,
    prompts: &[String],
    out: &mut Vec<Finding>,
    pick: impl Fn(&str) -> Option<&'a CellView>,
) {
    let Some((first, reference)) = prompts.iter().find_map(|p| pick(p).map(|c| (p, c))) else {
        return;
    };
    let mut better = Vec::new();
    let mut worse = Vec::new();
    let mut same = Vec::new();
    let mut tests: Vec<(&String, Paired)> = Vec::new();
    for p in prompts.iter().filter(|p| *p != first) {
        // A prompt whose cell has fewer answers than the reference (a stopped run) is
        // left out rather than judged on part of the rows.
        let Some(c) = pick(p).filter(|c| c.n() >= reference.n()) else {
            continue;
        };
        let Some(t) = paired(input, c, reference) else {
            continue;
        };
        tests.push((p, t));
    }
    family(tests.iter_mut().map(|(_, t)| t));
    for (p, t) in &tests {
        let holm = t
            .holm
            .map(|h| format!(", Holm {}", p_text(h.p)))
            .unwrap_or_default();
        let item = format!(
            "{p} {} ({}, {} to {}, {}{holm})",
            signed(t.diff()),
            pct(t.a),
            signed(t.lo),
            signed(t.hi),
            p_text(t.p)
        );
        match (t.significant(), t.diff() > 0.0) {
            (true, true) => better.push(item),
            (true, false) => worse.push(item),
            (false, _) => same.push(item),
        }
    }
    if better.is_empty() && worse.is_empty() && same.is_empty() {
        return;
    }
    let mut parts = Vec::new();
    for (name, items) in [
        ("better", better),
        ("worse", worse),
        ("not significantly different", same),
    ] {
        if !items.is_empty() {
            parts.push(format!("{name}: {}", items.join(", ")));
        }
    }
    out.push(Finding {
        topic: "prompts",
        text: format!(
            "On {model}, against {first} at {} ({} scoring; points, 95% paired bootstrap interval, McNemar p{}): {}.",
            pct(reference.accuracy(&input.gold).unwrap_or(0.0)),
            reference.method,
            if tests.len() > 1 {
                format!(" and its Holm adjustment over the {} prompts", tests.len())
            } else {
                String::new()
            },
            parts.join("; ")
        ),
    });
}

/// Calibrated cells against their raw cell.
fn calibration(input: &Input, out: &mut Vec<Finding>) {
    for model in &input.models {
        let mut tests: Vec<(&CellView, Paired)> = Vec::new();
        for c in model_cells(input, model).filter(|c| c.calibration.is_some()) {
            let raw = input.cells.iter().find(|r| {
                r.model == c.model && r.prompt == c.prompt && r.kind == c.kind && r.raw()
            });
            if let Some(raw) = raw
                && let Some(t) = paired(input, c, raw)
            {
                tests.push((c, t));
            }
        }
        family(tests.iter_mut().map(|(_, t)| t));
        let Some((top, t)) = tests
            .iter()
            .max_by(|x, y| x.1.diff().total_cmp(&y.1.diff()))
            .copied()
        else {
            continue;
        };
        let gains = tests
            .iter()
            .filter(|(_, t)| t.significant() && t.diff() > 0.0)
            .count();
        let losses = tests
            .iter()
            .filter(|(_, t)| t.significant() && t.diff() < 0.0)
            .count();
        out.push(Finding {
            topic: "calibration",
            text: format!(
                "Calibration on {model}: {gains} of {} calibrated cells are significantly more accurate than their raw cell and {losses} less{}; the largest change is {}, from {} to {} ({} points, {}{}).",
                tests.len(),
                if tests.len() > 1 {
                    format!(" (McNemar p Holm-adjusted over the {})", tests.len())
                } else {
                    String::new()
                },
                top.id,
                pct(t.b),
                pct(t.a),
                signed(t.diff()),
                t.evidence(),
                if t.significant() {
                    ""
                } else {
                    "; not significant"
                }
            ),
        });
    }
}

/// Tasks of more than two classes: for each model's best cell, the class it finds worst
/// (lowest recall) and the confusion it makes most.
fn classes(input: &Input, out: &mut Vec<Finding>) {
    let k = input.labels.len();
    if k <= 2 || input.shape == crate::spec::TaskShape::Reference {
        return;
    }
    let what = match input.shape {
        crate::spec::TaskShape::Choices => "choice",
        _ => "class",
    };
    for model in &input.models {
        let Some(c) = best(input, model_cells(input, model)) else {
            continue;
        };
        let mut confusion = vec![vec![0usize; k]; k];
        for (p, g) in c.predictions.iter().zip(&input.gold) {
            if let Some(Some(p)) = p {
                confusion[*g][*p] += 1;
            }
        }
        let recall = |l: usize| -> Option<f64> {
            let support: usize = confusion[l].iter().sum();
            (support > 0).then(|| confusion[l][l] as f64 / support as f64)
        };
        let recalls: Vec<(usize, f64)> = (0..k).filter_map(|l| Some((l, recall(l)?))).collect();
        let (Some(worst), Some(best_class)) = (
            recalls.iter().min_by(|a, b| a.1.total_cmp(&b.1)),
            // The first of equals, in label order.
            recalls.iter().min_by(|a, b| b.1.total_cmp(&a.1)),
        ) else {
            continue;
        };
        let mut confusions: Vec<(usize, usize, usize)> = Vec::new();
        for (g, row) in confusion.iter().enumerate() {
            for (p, &n) in row.iter().enumerate() {
                if g != p && n > 0 {
                    confusions.push((n, g, p));
                }
            }
        }
        confusions.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let most = confusions
            .first()
            .map(|(n, g, p)| {
                format!(
                    "; its most common confusion is '{}' answered as '{}' ({n} rows)",
                    input.labels[*g], input.labels[*p]
                )
            })
            .unwrap_or_default();
        out.push(Finding {
            topic: "classes",
            text: format!(
                "Per {what}, the best {model} cell, {}, recalls '{}' best ({}) and '{}' worst ({}){most}.",
                c.id,
                input.labels[best_class.0],
                pct(best_class.1),
                input.labels[worst.0],
                pct(worst.1),
            ),
        });
    }
}

/// Raw cells whose predicted labels lean far from the gold shares.
fn bias(input: &Input, out: &mut Vec<Finding>) {
    if input.shape == crate::spec::TaskShape::Reference {
        // Gold is always `correct`: a lean toward `incorrect` is a low accuracy, said
        // elsewhere.
        return;
    }
    let k = input.labels.len();
    for model in &input.models {
        let mut leaning: Vec<(&CellView, usize, f64, f64)> = Vec::new();
        let mut raw = 0;
        for c in model_cells(input, model).filter(|c| c.raw()) {
            let rows: Vec<(Option<usize>, usize)> = c
                .predictions
                .iter()
                .zip(&input.gold)
                .filter_map(|(p, g)| Some(((*p)?, *g)))
                .collect();
            let n = rows.len();
            if n == 0 {
                continue;
            }
            raw += 1;
            let mut worst: Option<(usize, f64, f64)> = None;
            for l in 0..k {
                let pred = rows.iter().filter(|(p, _)| *p == Some(l)).count();
                let gold = rows.iter().filter(|(_, g)| *g == l).count() as f64 / n as f64;
                let share = pred as f64 / n as f64;
                // Named only when the Wilson interval of the share excludes the gold share.
                // Only an over-predicted label counts: with two labels the other one is
                // under-predicted by the same amount, up to rounding, and must not win.
                let (lo, _) = stats::wilson(pred as u64, n as u64, 1.959_964);
                if share - gold >= BIAS_MIN
                    && gold < lo
                    && worst.is_none_or(|(_, s, g)| share - gold > s - g)
                {
                    worst = Some((l, share, gold));
                }
            }
            if let Some((l, s, g)) = worst {
                leaning.push((c, l, s, g));
            }
        }
        let Some(&(c, l, s, g)) = leaning
            .iter()
            .max_by(|a, b| (a.2 - a.3).total_cmp(&(b.2 - b.3)))
        else {
            continue;
        };
        let mut by_label: Vec<(usize, usize)> = Vec::new();
        for (_, l, _, _) in &leaning {
            match by_label.iter_mut().find(|(x, _)| x == l) {
                Some((_, n)) => *n += 1,
                None => by_label.push((*l, 1)),
            }
        }
        let lean = by_label
            .iter()
            .map(|(l, n)| format!("{n} toward '{}'", input.labels[*l]))
            .collect::<Vec<_>>()
            .join(", ");
        out.push(Finding {
            topic: "bias",
            text: format!(
                "{} of {raw} uncalibrated cells of {model} over-predict one label by {:.0}+ points ({lean}); the most, {}, predicts '{}' for {} of rows (gold {}).",
                leaning.len(),
                100.0 * BIAS_MIN,
                c.id,
                input.labels[l],
                pct(s),
                pct(g)
            ),
        });
    }
}

/// Generation cells that differ only in temperature: answers changed and accuracy moved.
fn temperature(input: &Input, out: &mut Vec<Finding>) {
    for model in &input.models {
        let gens: Vec<&CellView> = model_cells(input, model)
            .filter(|c| c.kind == CellKind::Generate && c.temperature.is_some())
            .collect();
        let mut temps: Vec<f64> = gens.iter().filter_map(|c| c.temperature).collect();
        temps.sort_by(f64::total_cmp);
        temps.dedup();
        if temps.len() < 2 {
            continue;
        }
        let (low, high) = (temps[0], temps[temps.len() - 1]);
        let pairs: Vec<(&CellView, &CellView)> = gens
            .iter()
            .filter(|c| c.temperature == Some(low))
            .filter_map(|a| {
                gens.iter()
                    .find(|b| {
                        b.temperature == Some(high)
                            && b.prompt == a.prompt
                            && b.method == a.method
                            && b.seed == a.seed
                            && b.sampler_rest == a.sampler_rest
                    })
                    .map(|b| (*a, *b))
            })
            .collect();
        let (mut changed, mut both) = (0usize, 0usize);
        let mut diffs = Vec::new();
        for (a, b) in &pairs {
            for (p, q) in a.predictions.iter().zip(&b.predictions) {
                if let (Some(p), Some(q)) = (p, q) {
                    both += 1;
                    changed += usize::from(p != q);
                }
            }
            if let (Some(x), Some(y)) = (b.accuracy(&input.gold), a.accuracy(&input.gold)) {
                diffs.push(x - y);
            }
        }
        // Every pair tested; the one shown is the largest significant change, or the first
        // pair when none is significant, so a large effect on one prompt is not averaged away.
        let mut tested: Vec<(&CellView, Paired)> = pairs
            .iter()
            .filter_map(|(a, b)| Some((*a, paired(input, b, a)?)))
            .collect();
        family(tested.iter_mut().map(|(_, t)| t));
        let significant: Vec<&(&CellView, Paired)> =
            tested.iter().filter(|(_, t)| t.significant()).collect();
        let lower = significant.iter().filter(|(_, t)| t.diff() < 0.0).count();
        let shown = significant
            .iter()
            .max_by(|x, y| x.1.diff().abs().total_cmp(&y.1.diff().abs()))
            .copied()
            .or(tested.first());
        let Some((a, t)) = shown else {
            continue;
        };
        let tally = match (significant.len(), tested.len()) {
            (0, 1) => "the one pair does not differ significantly".to_string(),
            (0, n) => format!("none of the {n} pairs differs significantly"),
            (k, n) => format!(
                "{k} of {n} pairs {} significantly (McNemar p Holm-adjusted over the {n}; {lower} lower at t={high}); the largest",
                if k == 1 { "differs" } else { "differ" }
            ),
        };
        let prompts: std::collections::BTreeSet<&str> =
            pairs.iter().map(|(a, _)| a.prompt.as_str()).collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len().max(1) as f64;
        // The pair's shared settings, named as its cell ids name them (all but `t=`).
        let (base, point) = a.id.split_once('@').unwrap_or((&a.id, ""));
        let shared: Vec<&str> = point
            .split(',')
            .filter(|p| !p.is_empty() && !p.starts_with("t="))
            .collect();
        let setting = if shared.is_empty() {
            String::new()
        } else {
            format!(" ({})", shared.join(", "))
        };
        out.push(Finding {
            topic: "temperature",
            text: format!(
                "On {model}, temperature {high} changes {} of answers against {low} (same seed and sampler; {} cell pairs over {} prompt{}) and moves accuracy by {} points on average; {tally}: in {base}{setting}, t={high} at {} {}.",
                pct(changed as f64 / both.max(1) as f64),
                pairs.len(),
                prompts.len(),
                if prompts.len() == 1 { "" } else { "s" },
                signed(mean),
                pct(t.a),
                verdict(t, &format!("t={low} at {}", pct(t.b)))
            ),
        });
    }
}

/// Generation settings run with several seeds: how much the seed moves accuracy, and, when
/// settings differ in more than temperature, which setting did best and worst.
fn seeds_and_samplers(input: &Input, out: &mut Vec<Finding>) {
    for model in &input.models {
        // (prompt, method, temperature, sampler) -> the cells of its seeds.
        let mut settings: Vec<(String, Vec<&CellView>)> = Vec::new();
        for c in model_cells(input, model).filter(|c| c.kind == CellKind::Generate && c.n() > 0) {
            let key = format!(
                "{}/{}@t={},{}",
                c.prompt,
                c.method,
                c.temperature.unwrap_or(0.0),
                c.sampler_rest
            );
            match settings.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(c),
                None => settings.push((key, vec![c])),
            }
        }
        let stats: Vec<(&str, usize, f64, f64)> = settings
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(k, v)| {
                let accs: Vec<f64> = v.iter().filter_map(|c| c.accuracy(&input.gold)).collect();
                let (mean, std) = stats::mean_std(&accs);
                (k.as_str(), v.len(), mean, std)
            })
            .collect();
        if stats.is_empty() {
            continue;
        }
        let mean_std = stats.iter().map(|s| s.3).sum::<f64>() / stats.len() as f64;
        let widest = stats
            .iter()
            .max_by(|a, b| a.3.total_cmp(&b.3))
            .expect("not empty");
        out.push(Finding {
            topic: "seeds",
            text: format!(
                "On {model}, {} generation settings were each run with {} seeds: accuracy moves by a standard deviation of {:.1} points between seeds on average, {:.1} at most ({}).",
                stats.len(),
                widest.1,
                100.0 * mean_std,
                100.0 * widest.3,
                widest.0
            ),
        });
        let rests: std::collections::BTreeSet<&str> = settings
            .iter()
            .flat_map(|(_, v)| v.iter().map(|c| c.sampler_rest.as_str()))
            .collect();
        if rests.len() < 2 {
            continue;
        }
        let top = stats
            .iter()
            .max_by(|a, b| a.2.total_cmp(&b.2))
            .expect("not empty");
        let low = stats
            .iter()
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .expect("not empty");
        let first = |key: &str| {
            settings
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v[0])
                .expect("a setting of the list")
        };
        let (a, b) = (first(top.0), first(low.0));
        let Some(t) = paired(input, a, b) else {
            continue;
        };
        out.push(Finding {
            topic: "sampler",
            text: format!(
                "On {model}, over {} sampler settings (mean of their seeds), the best is {} at {} and the worst {} at {}; on one seed the best {}.",
                stats.len(),
                top.0,
                pct(top.2),
                low.0,
                pct(low.2),
                verdict(&t, "the worst")
            ),
        });
    }
}

/// A cell without a model (the kNN vote) against the best cell of each model.
fn baseline(input: &Input, out: &mut Vec<Finding>) {
    for v in input
        .cells
        .iter()
        .filter(|c| c.kind == CellKind::KnnVote && c.n() > 0)
    {
        for model in &input.models {
            let Some(b) = best(input, model_cells(input, model)) else {
                continue;
            };
            if let Some(t) = paired(input, v, b) {
                out.push(Finding {
                    topic: "baseline",
                    text: format!(
                        "The labelled data alone ({}, no model) at {} {}.",
                        v.id,
                        pct(t.a),
                        verdict(
                            &t,
                            &format!("the best {model} cell, {} at {}", b.id, pct(t.b))
                        ),
                    ),
                });
            }
        }
    }
}

/// Cells where generated answers often name no label.
fn validity(input: &Input, out: &mut Vec<Finding>) {
    let mut bad: Vec<(&CellView, f64)> = input
        .cells
        .iter()
        .filter(|c| c.n() > 0)
        .map(|c| (c, c.invalid as f64 / c.n() as f64))
        .filter(|(_, share)| *share >= 0.02)
        .collect();
    if bad.is_empty() {
        return;
    }
    bad.sort_by(|a, b| b.1.total_cmp(&a.1));
    let worst = bad
        .iter()
        .take(3)
        .map(|(c, s)| format!("{} {}", c.id, pct(*s)))
        .collect::<Vec<_>>()
        .join(", ");
    out.push(Finding {
        topic: "validity",
        text: format!(
            "In {} cells at least 2% of the generated answers name no label (counted as wrong); the most: {worst}.",
            bad.len()
        ),
    });
}

/// What each prompt costs per row against the first, and the models against each other:
/// in compute from the rows' tokens, so that the same rows give the same sentences on any
/// machine under any load (wall-clock time is in the page's speed table, labelled).
fn cost(input: &Input, out: &mut Vec<Finding>) {
    let work = |c: &CellView| c.work.filter(|w| w.tokens() > 0.0);
    for model in &input.models {
        let prompts = prompts_of(input, model);
        let Some((reference, w)) = prompts
            .first()
            .and_then(|p| reference_cell(input, model, p))
            .and_then(|c| Some((c, work(c)?)))
        else {
            continue;
        };
        let items: Vec<String> = prompts[1..]
            .iter()
            .filter_map(|p| reference_cell(input, model, p))
            .filter_map(|c| {
                let x = work(c)?;
                // One model: compute and tokens give the same ratio.
                let r = x
                    .ratio(&w)
                    .or_else(|| (w.tokens() > 0.0).then(|| x.tokens() / w.tokens()))?;
                Some(format!(
                    "{} {r:.2}× the compute ({:.0} tokens)",
                    c.prompt,
                    x.tokens()
                ))
            })
            .collect();
        out.push(Finding {
            topic: "cost",
            text: format!(
                "On {model}, {} costs {}: {:.0} prompt and {:.0} generated tokens beyond its template's shared prefix{}.",
                reference.prompt,
                describe(&w),
                w.prompt_tokens,
                w.generated_tokens,
                if items.is_empty() {
                    String::new()
                } else {
                    format!("; per row, {}", items.join(", "))
                }
            ),
        });
    }
    for (i, a) in input.models.iter().enumerate() {
        for b in &input.models[i + 1..] {
            let first = prompts_of(input, a).into_iter().next().unwrap_or_default();
            let (Some(x), Some(y)) = (
                reference_cell(input, a, &first).and_then(work),
                reference_cell(input, b, &first).and_then(work),
            ) else {
                continue;
            };
            if let Some(r) = y.ratio(&x) {
                let expected = match (y.expected_s, x.expected_s) {
                    (Some(ys), Some(xs)) => {
                        format!("; {} vs {} expected", seconds(ys), seconds(xs))
                    }
                    _ => String::new(),
                };
                out.push(Finding {
                    topic: "cost",
                    text: format!(
                        "{b} costs {r:.2}× the compute of {a} per row on {first} ({} vs {} GFLOP a row{expected}).",
                        y.gflop().map_or("?".into(), significant),
                        x.gflop().map_or("?".into(), significant),
                    ),
                });
            }
        }
    }
}

/// Each cascade against its first and its last cell alone: accuracy with the paired test,
/// the share sent on, and the time it costs.
fn cascades(input: &Input, out: &mut Vec<Finding>) {
    let by_id = |id: &str| input.cells.iter().find(|c| c.id == id && c.n() > 0);
    for c in input.cells.iter().filter(|c| c.n() > 0) {
        let Some(v) = &c.cascade else { continue };
        let Some(acc) = c.accuracy(&input.gold) else {
            continue;
        };
        let against =
            |r: Option<f64>, who: &str| r.map(|r| format!("{r:.2}× the compute of {who} alone"));
        let cost: Vec<String> = [
            against(v.compute_vs_first, &v.first),
            against(v.compute_vs_last, &v.last),
        ]
        .into_iter()
        .flatten()
        .collect();
        let per_row = match (cost.is_empty(), c.work) {
            (false, Some(w)) => match (v.expected_vs_first, v.expected_vs_last) {
                (Some(f), Some(l)) => format!(
                    " ({}: {f:.2}× and {l:.2}× theirs on this machine)",
                    describe(&w)
                ),
                _ => format!(" ({})", describe(&w)),
            },
            _ => String::new(),
        };
        // "18.0% of rows on from A to B" and, for longer chains, "and 4.3% on to C".
        let path = v
            .onward
            .iter()
            .enumerate()
            .map(|(i, (stage, share))| match i {
                0 => format!("{} of rows on from {} to {stage}", pct(*share), v.first),
                _ => format!(" and {} on to {stage}", pct(*share)),
            })
            .collect::<String>();
        let mut text = format!(
            "The cascade {} sends {path} and reaches {}{}",
            c.id,
            pct(acc),
            if cost.is_empty() {
                String::new()
            } else {
                format!(" at {}{per_row}", cost.join(" and "))
            }
        );
        let mut tests = Vec::new();
        for (other, who) in [(&v.last, "last"), (&v.first, "first")] {
            match by_id(other).and_then(|o| paired(input, c, o)) {
                Some(t) => tests.push(format!("against its {who} cell alone it {}", verdict(&t, other))),
                None if who == "last" => tests.push(format!(
                    "{other} computed only the rows sent to it, so the two cannot be compared on all rows"
                )),
                None => {}
            }
        }
        if !tests.is_empty() {
            text.push_str("; ");
            text.push_str(&tests.join("; "));
        }
        text.push('.');
        out.push(Finding {
            topic: "cascade",
            text,
        });
    }
}

/// A probe and its tests against other cells (each named as a sentence names it).
struct ProbeTests<'a> {
    probe: &'a CellView,
    accuracy: f64,
    tests: Vec<(String, Paired)>,
}

/// Each probe against the best cell of its model that reads label scores (its raw and
/// calibrated `loglik` cells): what reading the hidden states bought. A probe without a
/// model (an embedder's) is set beside each model's best such cell.
fn probes(input: &Input, out: &mut Vec<Finding>) {
    let of_model = |m: &str| {
        best(
            input,
            input
                .cells
                .iter()
                .filter(move |c| c.model == m && c.kind == CellKind::Loglik && c.n() > 0),
        )
    };
    // Every probe against the best loglik cell of its model (an embedder's probe: of each
    // model), one family.
    let mut found: Vec<ProbeTests> = Vec::new();
    for p in input
        .cells
        .iter()
        .filter(|c| c.kind == CellKind::Probe && c.n() > 0)
    {
        let Some(acc) = p.accuracy(&input.gold) else {
            continue;
        };
        let models: Vec<&str> = if input.models.contains(&p.model) {
            vec![p.model.as_str()]
        } else {
            input.models.iter().map(String::as_str).collect()
        };
        let mut tests = Vec::new();
        for m in models {
            if let Some(b) = of_model(m)
                && let Some(t) = paired(input, p, b)
            {
                tests.push((
                    format!("the best {m} loglik cell {} ({})", b.id, pct(t.b)),
                    t,
                ));
            }
        }
        found.push(ProbeTests {
            probe: p,
            accuracy: acc,
            tests,
        });
    }
    family(
        found
            .iter_mut()
            .flat_map(|f| f.tests.iter_mut().map(|(_, t)| t)),
    );
    for ProbeTests {
        probe: p,
        accuracy: acc,
        tests,
    } in found
    {
        let how = p
            .probe
            .as_ref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        let mut text = format!("The probe {}{how} reaches {}", p.id, pct(acc));
        if !tests.is_empty() {
            let verdicts: Vec<String> = tests.iter().map(|(o, t)| verdict(t, o)).collect();
            text.push_str("; it ");
            text.push_str(&verdicts.join("; it "));
        }
        text.push('.');
        out.push(Finding {
            topic: "probe",
            text,
        });
    }
}

/// Each ensemble against its best member, on paired rows: what averaging bought.
fn ensembles(input: &Input, out: &mut Vec<Finding>) {
    // Each ensemble against its best member, the ensembles one family.
    let mut tests: Vec<(&CellView, &CellView, f64, Paired)> = Vec::new();
    for e in input
        .cells
        .iter()
        .filter(|c| !c.members.is_empty() && c.n() > 0)
    {
        let members = || {
            input
                .cells
                .iter()
                .filter(|c| e.members.contains(&c.id) && c.n() > 0)
        };
        let (Some(top), Some(acc)) = (best(input, members()), e.accuracy(&input.gold)) else {
            continue;
        };
        if let Some(t) = paired(input, e, top) {
            tests.push((e, top, acc, t));
        }
    }
    family(tests.iter_mut().map(|(_, _, _, t)| t));
    for (e, top, acc, t) in tests {
        out.push(Finding {
            topic: "ensemble",
            text: format!(
                "The ensemble {} averages {} cells and reaches {}; it {}.",
                e.id,
                e.members.len(),
                pct(acc),
                verdict(&t, &format!("its best member {} ({})", top.id, pct(t.b)))
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` rows, gold alternating 0/1.
    fn input(n: usize) -> Input {
        Input {
            labels: vec!["negative".into(), "positive".into()],
            shape: crate::spec::TaskShape::Labels,
            gold: (0..n).map(|i| i % 2).collect(),
            models: vec!["small".into(), "large".into()],
            cells: Vec::new(),
            resamples: 2000,
            seed: 1,
        }
    }

    /// A raw loglik cell right on the first `right` rows and wrong after (invalid answers
    /// never: a wrong answer is the other label).
    fn cell(inp: &Input, model: &str, prompt: &str, right: usize) -> CellView {
        CellView {
            id: format!("{model}/{prompt}/loglik"),
            model: model.into(),
            prompt: prompt.into(),
            method: "loglik".into(),
            kind: CellKind::Loglik,
            predictions: inp
                .gold
                .iter()
                .enumerate()
                .map(|(i, &g)| Some(Some(if i < right { g } else { 1 - g })))
                .collect(),
            // 300 prompt tokens a row, on a model of 100M parameters.
            work: Some(Work {
                prompt_tokens: 300.0,
                generated_tokens: 0.0,
                flops: Some(2.0 * 1e8 * 300.0),
                expected_s: None,
            }),
            ..Default::default()
        }
    }

    /// A raw cell of `model` that says 'negative' to the first `negatives` rows and
    /// 'positive' to the rest.
    fn says_negative(inp: &Input, model: &str, negatives: usize) -> CellView {
        let mut c = cell(inp, model, "zero", 0);
        c.predictions = (0..inp.gold.len())
            .map(|i| Some(Some(usize::from(i >= negatives))))
            .collect();
        c
    }

    fn texts(f: &[Finding], topic: &str) -> Vec<String> {
        f.iter()
            .filter(|x| x.topic == topic)
            .map(|x| x.text.clone())
            .collect()
    }

    #[test]
    fn four_classes_name_the_worst_recalled_class_and_the_commonest_confusion() {
        let mut inp = input(40);
        inp.labels = ["1-2", "3-4", "7-8", "9-10"].map(String::from).to_vec();
        inp.gold = (0..40).map(|i| i % 4).collect();
        let mut c = cell(&inp, "small", "zero", 40);
        // Every "3-4" row answered "1-2"; one "9-10" row answered "7-8".
        c.predictions = inp
            .gold
            .iter()
            .enumerate()
            .map(|(i, &g)| {
                Some(Some(match g {
                    1 => 0,
                    3 if i == 3 => 2,
                    g => g,
                }))
            })
            .collect();
        inp.cells = vec![c];
        let f = texts(&derive(&inp), "classes");
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].contains("recalls '1-2' best (100.0%) and '3-4' worst (0.0%)"),
            "{}",
            f[0]
        );
        assert!(
            f[0].contains("'3-4' answered as '1-2' (10 rows)"),
            "{}",
            f[0]
        );
        // Two labels: no per-class finding (the bias finding says it).
        let mut two = input(40);
        two.cells = vec![cell(&two, "small", "zero", 30)];
        assert!(texts(&derive(&two), "classes").is_empty());
        // Reference answers: neither.
        inp.shape = crate::spec::TaskShape::Reference;
        assert!(texts(&derive(&inp), "classes").is_empty());
    }

    #[test]
    fn a_significant_gap_is_a_win_with_its_numbers() {
        let mut inp = input(300);
        inp.cells = vec![
            cell(&inp, "small", "zero", 210),
            cell(&inp, "large", "zero", 270),
        ];
        let f = derive(&inp);
        let m = texts(&f, "models");
        assert!(m[0].contains("large/zero/loglik (90.0%"), "{}", m[0]);
        assert!(m[0].contains("beats the best small cell"), "{}", m[0]);
        assert!(m[0].contains("by 20.0 points"), "{}", m[0]);
        assert!(m[0].contains("McNemar p < 0.001, 300 rows"), "{}", m[0]);
        assert!(
            m[1].contains("large at 90.0% beats small at 70.0% by 20.0 points"),
            "{}",
            m[1]
        );
    }

    #[test]
    fn a_gap_whose_interval_includes_zero_is_never_a_win() {
        let mut inp = input(100);
        inp.cells = vec![
            cell(&inp, "small", "zero", 80),
            cell(&inp, "large", "zero", 83),
        ];
        for f in derive(&inp) {
            assert!(!f.text.contains("beats"), "{}", f.text);
            assert!(!f.text.contains("trails"), "{}", f.text);
        }
        let m = texts(&derive(&inp), "models");
        assert!(m[0].contains("does not differ significantly"), "{}", m[0]);
        assert!(m[0].contains("+3.0 points"), "{}", m[0]);
        assert!(m[0].contains("not significant"), "{}", m[0]);
    }

    #[test]
    fn when_the_two_tests_disagree_the_verdict_says_which_holds_it_back() {
        // Five rows only the large cell gets right, none the other way: every bootstrap
        // resample favours it, but the exact McNemar p is 0.0625.
        let mut inp = input(100);
        inp.cells = vec![
            cell(&inp, "small", "zero", 80),
            cell(&inp, "large", "zero", 85),
        ];
        let m = texts(&derive(&inp), "models");
        assert!(!m[0].contains("beats"), "{}", m[0]);
        assert!(
            m[0].contains("p = 0.062, 100 rows; the interval excludes 0 but McNemar's p is not below 0.05, so not significant"),
            "{}",
            m[0]
        );
    }

    #[test]
    fn a_biased_cell_is_named_with_its_share_and_the_gold_share() {
        let mut inp = input(200);
        // Says 'negative' to 170 of 200 rows (gold: 100).
        inp.cells = vec![
            says_negative(&inp, "small", 170),
            cell(&inp, "large", "zero", 200),
        ];
        let b = texts(&derive(&inp), "bias");
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].contains("predicts 'negative' for 85.0% of rows (gold 50.0%)"),
            "{}",
            b[0]
        );
        assert!(
            b[0].starts_with("1 of 1 uncalibrated cells of small"),
            "{}",
            b[0]
        );
    }

    #[test]
    fn a_lean_is_found_whatever_the_rounding_of_the_other_label() {
        // 272 of 300 'negative': |272/300 − 0.5| rounds a hair below |28/300 − 0.5|, which
        // once made the under-predicted label the "worst" and dropped the cell.
        let mut inp = input(300);
        inp.cells = vec![says_negative(&inp, "small", 272)];
        let b = texts(&derive(&inp), "bias");
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].contains("predicts 'negative' for 90.7% of rows"),
            "{}",
            b[0]
        );
    }

    #[test]
    fn a_small_lean_is_not_called_a_bias() {
        let mut inp = input(200);
        // 'negative' for 110 of 200: 5 points off, inside the noise.
        inp.cells = vec![says_negative(&inp, "small", 110)];
        assert!(texts(&derive(&inp), "bias").is_empty());
    }

    #[test]
    fn a_cell_with_few_answers_is_neither_best_nor_compared() {
        let mut inp = input(300);
        let mut partial = cell(&inp, "large", "reversed", 3);
        // Three answers, all right: 100%, on 3 rows of 300.
        for p in partial.predictions.iter_mut().skip(3) {
            *p = None;
        }
        inp.cells = vec![
            cell(&inp, "small", "zero", 210),
            cell(&inp, "large", "zero", 250),
            partial,
        ];
        let f = derive(&inp);
        let m = texts(&f, "models");
        assert!(
            m[0].starts_with("The best large cell, large/zero/loglik"),
            "{}",
            m[0]
        );
        assert!(
            texts(&f, "prompts").iter().all(|p| !p.contains("reversed")),
            "{:?}",
            texts(&f, "prompts")
        );
    }

    #[test]
    fn prompts_are_compared_again_after_calibration() {
        let mut inp = input(300);
        let fitted = |inp: &Input, prompt: &str, right: usize| {
            let mut c = cell(inp, "small", prompt, right);
            c.id = format!("small/{prompt}/loglik-fit");
            c.method = "loglik-fit".into();
            c.calibration = Some(CalibrationKind::Fit);
            c
        };
        // Raw, the reversed label order wins by 20 points; calibrated, the two prompts tie.
        inp.cells = vec![
            cell(&inp, "small", "zero", 200),
            fitted(&inp, "zero", 255),
            cell(&inp, "small", "reversed", 260),
            fitted(&inp, "reversed", 255),
        ];
        let p = texts(&derive(&inp), "prompts");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("(loglik scoring;"), "{}", p[0]);
        assert!(p[0].contains("better: reversed +20.0 (86.7%"), "{}", p[0]);
        assert!(
            p[1].contains("against zero at 85.0% (loglik-fit scoring;"),
            "{}",
            p[1]
        );
        assert!(
            p[1].contains("not significantly different: reversed 0.0 (85.0%"),
            "{}",
            p[1]
        );
    }

    #[test]
    fn ties_pick_the_first_cell_and_say_no_difference() {
        let mut inp = input(100);
        inp.cells = vec![
            cell(&inp, "small", "a", 70),
            cell(&inp, "small", "b", 70),
            cell(&inp, "large", "a", 70),
        ];
        let f = derive(&inp);
        let m = texts(&f, "models");
        assert!(m[0].contains("small/a/loglik"), "{}", m[0]);
        assert!(m[0].contains("0.0 points"), "{}", m[0]);
        assert!(m[0].contains("not significant"), "{}", m[0]);
        let p = texts(&f, "prompts");
        assert!(
            p[0].contains("not significantly different: b 0.0"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn the_honest_best_is_not_lifted_by_the_choice() {
        let mut inp = input(200);
        // Twenty cells right on a pseudo-random 70% of the rows each: the best of them on
        // all rows is lucky; chosen on one half and measured on the other, it is not.
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % 10
        };
        inp.cells = (0..20)
            .map(|k| {
                let mut c = cell(&inp, "small", &format!("p{k}"), 0);
                c.predictions = inp
                    .gold
                    .iter()
                    .map(|&g| Some(Some(if next() < 7 { g } else { 1 - g })))
                    .collect();
                c
            })
            .collect();
        let raw = best(&inp, inp.cells.iter())
            .and_then(|c| c.accuracy(&inp.gold))
            .unwrap();
        let honest = honest_best(&inp, inp.cells.iter()).unwrap();
        assert!(
            raw > 0.74,
            "the best of twenty 70% cells looks better: {raw}"
        );
        assert!(honest < raw - 0.03, "honest {honest} vs raw {raw}");
        // Rows alternate by label here: a cell that always says the first label is right on
        // every even row, and must not be chosen on a half that holds only those.
        let mut constant = cell(&inp, "small", "constant", 0);
        constant.predictions = inp.gold.iter().map(|_| Some(Some(0))).collect();
        let mut with_constant = inp.cells.clone();
        with_constant.push(constant);
        let honest_with = honest_best(
            &Input {
                cells: with_constant.clone(),
                ..input(200)
            },
            with_constant.iter(),
        )
        .unwrap();
        assert!(honest_with > 0.6, "{honest_with}");
        // A cell better on every row is chosen on both halves, and its estimate is exact.
        inp.cells.push(cell(&inp, "small", "good", 180));
        assert!((honest_best(&inp, inp.cells.iter()).unwrap() - 0.9).abs() < 1e-12);
    }

    #[test]
    fn a_family_of_prompts_is_judged_on_holm_adjusted_p_values() {
        let mut inp = input(300);
        // Right on rows 0..200 but for three of them, and on 200..212: 12 rows only this
        // prompt gets right, 3 only the reference does (McNemar p = 0.035 alone).
        let nearly = |inp: &Input, prompt: &str| {
            let mut c = cell(inp, "small", prompt, 212);
            for r in [0, 1, 2] {
                c.predictions[r] = Some(Some(1 - inp.gold[r]));
            }
            c
        };
        inp.cells = vec![cell(&inp, "small", "zero", 200), nearly(&inp, "a")];
        let one = texts(&derive(&inp), "prompts");
        assert!(one[0].contains("better: a +3.0 (69.7%"), "{}", one[0]);
        assert!(
            !one[0].contains("Holm"),
            "a family of one is not adjusted: {}",
            one[0]
        );
        inp.cells.push(nearly(&inp, "b"));
        inp.cells.push(nearly(&inp, "c"));
        let three = texts(&derive(&inp), "prompts");
        // statsmodels multipletests([0.0352]*3, method="holm"): 0.1055 each.
        assert!(
            three[0].contains("not significantly different: a +3.0 (69.7%, ")
                && three[0].contains("p = 0.035, Holm p = 0.105)"),
            "{}",
            three[0]
        );
        assert!(
            three[0].contains("its Holm adjustment over the 3 prompts"),
            "{}",
            three[0]
        );
    }

    #[test]
    fn calibration_and_prompts_are_sorted_into_better_and_worse() {
        let mut inp = input(300);
        let mut fit = cell(&inp, "small", "zero", 270);
        fit.id = "small/zero/loglik-fit".into();
        fit.method = "loglik-fit".into();
        fit.calibration = Some(CalibrationKind::Fit);
        inp.cells = vec![
            cell(&inp, "small", "zero", 210),
            fit,
            cell(&inp, "small", "reversed", 255),
            cell(&inp, "small", "terse", 150),
        ];
        let f = derive(&inp);
        let p = texts(&f, "prompts");
        assert!(p[0].contains("better: reversed +15.0 (85.0%"), "{}", p[0]);
        assert!(p[0].contains("worse: terse −20.0 (50.0%"), "{}", p[0]);
        let c = texts(&f, "calibration");
        assert!(
            c[0].starts_with(
                "Calibration on small: 1 of 1 calibrated cells are significantly more accurate"
            ),
            "{}",
            c[0]
        );
        assert!(
            c[0].contains("small/zero/loglik-fit, from 70.0% to 90.0% (+20.0 points"),
            "{}",
            c[0]
        );
    }

    #[test]
    fn seeds_report_their_spread_and_samplers_their_best_and_worst() {
        let mut inp = input(100);
        let generation = |inp: &Input, right: usize, seed: u64, top_k: i32| {
            let mut c = cell(inp, "small", "zero", right);
            c.kind = CellKind::Generate;
            c.method = "generate".into();
            c.temperature = Some(0.8);
            c.seed = Some(seed);
            c.sampler_rest = format!("top_p=1,top_k={top_k},min_p=0,repeat=0");
            c.id = format!("small/zero/generate@top_k={top_k},seed={seed}");
            c
        };
        inp.cells = vec![
            generation(&inp, 80, 1, 0),
            generation(&inp, 84, 2, 0),
            generation(&inp, 60, 1, 40),
            generation(&inp, 62, 2, 40),
        ];
        let f = derive(&inp);
        let seeds = texts(&f, "seeds");
        assert!(
            seeds[0].contains("2 generation settings were each run with 2 seeds"),
            "{}",
            seeds[0]
        );
        let s = texts(&f, "sampler");
        assert!(
            s[0].contains("the best is zero/generate@t=0.8,top_p=1,top_k=0"),
            "{}",
            s[0]
        );
        assert!(s[0].contains("at 82.0%"), "{}", s[0]);
        assert!(s[0].contains("beats the worst by 20.0 points"), "{}", s[0]);
    }

    /// A generate cell of `small` on `prompt` at temperature `t`, seed 1, right on the first
    /// `right` rows.
    fn generated(inp: &Input, prompt: &str, t: f64, right: usize) -> CellView {
        let mut c = cell(inp, "small", prompt, right);
        c.kind = CellKind::Generate;
        c.temperature = Some(t);
        c.seed = Some(1);
        c.id = format!("small/{prompt}/generate@t={t},top_k=40,seed=1");
        c
    }

    #[test]
    fn temperature_counts_changed_answers_between_paired_cells() {
        let mut inp = input(100);
        inp.cells = vec![
            generated(&inp, "zero", 0.2, 80),
            generated(&inp, "zero", 0.8, 70),
        ];
        let t = texts(&derive(&inp), "temperature");
        assert!(
            t[0].contains("temperature 0.8 changes 10.0% of answers against 0.2"),
            "{}",
            t[0]
        );
        assert!(t[0].contains("−10.0 points on average"), "{}", t[0]);
        // The pair shown is named by the settings it shares.
        assert!(
            t[0].contains("in small/zero/generate (top_k=40, seed=1), t=0.8 at 70.0%"),
            "{}",
            t[0]
        );
    }

    #[test]
    fn temperature_shows_the_largest_significant_change_not_the_first_pair() {
        let mut inp = input(100);
        inp.cells = vec![
            generated(&inp, "plain", 0.2, 80),
            generated(&inp, "plain", 0.8, 79),
            generated(&inp, "role", 0.2, 90),
            generated(&inp, "role", 0.8, 75),
        ];
        let t = texts(&derive(&inp), "temperature");
        assert!(
            t[0].contains("1 of 2 pairs differs significantly (McNemar p Holm-adjusted over the 2; 1 lower at t=0.8); the largest: in small/role/generate (top_k=40, seed=1), t=0.8 at 75.0% trails t=0.2 at 90.0% by 15.0 points"),
            "{}",
            t[0]
        );
        // With no significant pair, the first is shown and said not to differ.
        inp.cells.truncate(2);
        let t = texts(&derive(&inp), "temperature");
        assert!(
            t[0].contains("the one pair does not differ significantly: in small/plain/generate"),
            "{}",
            t[0]
        );
        assert!(t[0].contains("not significant"), "{}", t[0]);
    }

    /// A cascade of `small` then `large` that answers like `large` on the rows `large` gets
    /// right among the first `escalate` rows where `small` is wrong.
    fn cascade(inp: &Input, right: usize, last_reported: bool) -> CellView {
        let mut c = cell(inp, "small→large", "casc", right);
        c.id = "cascade/casc".into();
        c.kind = CellKind::Cascade;
        c.cascade = Some(CascadeView {
            first: "small/zero/loglik".into(),
            last: if last_reported {
                "large/zero/loglik".into()
            } else {
                "large/zero/hidden".into()
            },
            onward: vec![(
                if last_reported {
                    "large/zero/loglik".into()
                } else {
                    "large/zero/hidden".into()
                },
                0.25,
            )],
            compute_vs_first: Some(1.8),
            compute_vs_last: Some(0.45),
            expected_vs_first: None,
            expected_vs_last: None,
        });
        c
    }

    #[test]
    fn a_cascade_is_set_beside_both_its_cells_with_tests_and_cost() {
        let mut inp = input(200);
        // small 150/200, large 180/200, cascade 178/200: no different from large, far
        // better than small.
        inp.cells = vec![
            cell(&inp, "small", "zero", 150),
            cell(&inp, "large", "zero", 180),
            cascade(&inp, 178, true),
        ];
        let c = texts(&derive(&inp), "cascade");
        assert_eq!(c.len(), 1, "{c:?}");
        let t = &c[0];
        assert!(
            t.starts_with("The cascade cascade/casc sends 25.0% of rows on from small/zero/loglik to large/zero/loglik and reaches 89.0% at 1.80× the compute of small/zero/loglik alone and 0.45× the compute of large/zero/loglik alone (60.0 GFLOP a row)"),
            "{t}"
        );
        assert!(
            t.contains("against its last cell alone it does not differ significantly from large/zero/loglik: −1.0 points"),
            "{t}"
        );
        assert!(
            t.contains("against its first cell alone it beats small/zero/loglik by 14.0 points"),
            "{t}"
        );
        // The cascade is no model: the per-model rules do not count it.
        assert!(
            texts(&derive(&inp), "models")
                .iter()
                .all(|m| !m.contains("cascade/casc")),
            "{:?}",
            texts(&derive(&inp), "models")
        );
    }

    #[test]
    fn an_ensemble_is_set_beside_its_best_member_and_counts_as_its_models_cell() {
        let mut inp = input(300);
        let a = cell(&inp, "small", "zero", 210);
        let b = cell(&inp, "small", "four", 225);
        let mut e = cell(&inp, "small", "both", 270);
        e.id = "ensemble/both".into();
        e.kind = CellKind::Ensemble;
        e.members = vec![a.id.clone(), b.id.clone()];
        inp.cells = vec![a, b, e, cell(&inp, "large", "zero", 270)];
        let f = derive(&inp);
        let t = texts(&f, "ensemble");
        assert_eq!(t.len(), 1, "{t:?}");
        assert!(
            t[0].starts_with("The ensemble ensemble/both averages 2 cells and reaches 90.0%; it beats its best member small/four/loglik (75.0%) by 15.0 points"),
            "{}",
            t[0]
        );
        // It is the small model's best cell, and no prompt of its own, nor a raw cell.
        let m = texts(&f, "models");
        assert!(m[0].contains("ensemble/both"), "{m:?}");
        assert!(
            texts(&f, "prompts").iter().all(|p| !p.contains("both")),
            "{:?}",
            texts(&f, "prompts")
        );
    }

    #[test]
    fn a_probe_is_set_beside_its_models_best_loglik_cell() {
        let mut inp = input(300);
        let raw = cell(&inp, "small", "zero", 210);
        let mut fit = cell(&inp, "small", "zero", 240);
        fit.id = "small/zero/loglik-fit".into();
        fit.calibration = Some(CalibrationKind::Fit);
        let mut probe = cell(&inp, "small", "zero", 270);
        probe.id = "small/zero/probe".into();
        probe.kind = CellKind::Probe;
        probe.calibration = Some(CalibrationKind::Probe);
        probe.probe = Some("layer 0.5, mean, C = 0.1".into());
        inp.cells = vec![raw, fit, probe, cell(&inp, "large", "zero", 270)];
        let f = derive(&inp);
        let t = texts(&f, "probe");
        assert_eq!(t.len(), 1, "{t:?}");
        assert!(
            t[0].starts_with("The probe small/zero/probe (layer 0.5, mean, C = 0.1) reaches 90.0%; it beats the best small loglik cell small/zero/loglik-fit (80.0%) by 10.0 points"),
            "{}",
            t[0]
        );
        // The probe is the small model's best cell against the large one.
        assert!(texts(&f, "models")[0].contains("small/zero/probe"), "{f:?}");
    }

    #[test]
    fn a_chain_names_the_share_that_reaches_each_later_stage() {
        let mut inp = input(200);
        let mut chain = cascade(&inp, 178, true);
        if let Some(v) = chain.cascade.as_mut() {
            v.last = "large/four/loglik".into();
            v.onward.push(("large/four/loglik".into(), 0.1));
        }
        inp.cells = vec![
            cell(&inp, "small", "zero", 150),
            cell(&inp, "large", "four", 180),
            chain,
        ];
        let c = texts(&derive(&inp), "cascade");
        assert!(
            c[0].starts_with("The cascade cascade/casc sends 25.0% of rows on from small/zero/loglik to large/zero/loglik and 10.0% on to large/four/loglik and reaches 89.0%"),
            "{c:?}"
        );
    }

    #[test]
    fn a_cascade_whose_last_cell_saw_only_some_rows_is_not_compared_with_it() {
        let mut inp = input(100);
        inp.cells = vec![cell(&inp, "small", "zero", 70), cascade(&inp, 85, false)];
        let c = texts(&derive(&inp), "cascade");
        assert!(
            c[0].contains("large/zero/hidden computed only the rows sent to it"),
            "{}",
            c[0]
        );
        assert!(
            c[0].contains("against its first cell alone it beats"),
            "{}",
            c[0]
        );
    }
}
