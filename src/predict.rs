//! A cached row as a prediction of its cell: the answer parsed or the label scores
//! calibrated, with what it cost. Metrics and cascades both read rows through here.

use std::collections::HashSet;

use crate::answer::{argmax, parse_answer};
use crate::cache::{Lookup, RowContent, Rows};
use crate::calibrate::{self, Params};
use crate::cost::{RowTokens, Work};
use crate::key::Digest;
use crate::plan::{Cell, Plan};
use crate::row::Finish;
use crate::spec::CalibrationKind;

pub use crate::calibrate::CalibrationError;

/// One dataset row under one cell.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub cell: usize,
    pub row: usize,
    pub gold: usize,
    /// `None`: an invalid (unparseable) answer.
    pub predicted: Option<usize>,
    pub raw: Option<std::sync::Arc<str>>,
    /// Label log-probs (calibrated and normalised over the labels in calibrated cells;
    /// the log of the vote shares in `knn_vote` cells).
    pub logprobs: Option<Vec<f64>>,
    /// A calibrated cell's scores before calibration.
    pub uncalibrated: Option<Vec<f64>>,
    pub prompt_tokens: u32,
    pub evaluated_tokens: u32,
    pub gen_tokens: u32,
    pub finish: Finish,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub shared_by: u32,
    /// What the row asks of its model(s), from its tokens alone: its cost, the same on any
    /// machine under any load.
    pub work: Work,
    /// Time to compute this row alone: the whole prompt evaluation plus its own decoding
    /// (wall-clock, as measured when it was computed).
    pub latency_ms: f64,
    /// Its share when the prompt evaluation served `shared_by` cells.
    pub shared_latency_ms: f64,
    /// Served from the cache rather than computed in this run.
    pub from_cache: bool,
    /// The host and shard (`I/N`) that computed the row, where recorded.
    pub host: Option<std::sync::Arc<str>>,
    pub shard: Option<std::sync::Arc<str>>,
    /// In a cascade cell: the stage that answered (0: the first).
    pub stage: Option<usize>,
    /// A raw log-likelihood row: the label chosen when each label's log-prob is divided
    /// by its length (labels of several tokens pay for each of them).
    pub normalised: Option<LengthNormalised>,
}

/// The label a log-likelihood row chooses with its labels' log-probs divided by their
/// length: in tokens (where the row recorded them), and in UTF-8 bytes (lm-evaluation-
/// harness's `acc_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthNormalised {
    pub per_token: Option<usize>,
    pub per_byte: Option<usize>,
}

impl LengthNormalised {
    /// From a row's label log-probs, each label's tokens (if recorded) and the labels.
    pub fn choose(logprobs: &[f64], tokens: Option<&[u32]>, labels: &[String]) -> Self {
        let divided = |len: &dyn Fn(usize) -> Option<f64>| -> Option<usize> {
            let scores: Option<Vec<f64>> = logprobs
                .iter()
                .enumerate()
                .map(|(i, lp)| len(i).filter(|l| *l > 0.0).map(|l| lp / l))
                .collect();
            argmax(&scores?)
        };
        Self {
            per_token: tokens
                .filter(|t| t.len() == logprobs.len())
                .and_then(|t| divided(&|i| Some(f64::from(t[i])))),
            per_byte: (labels.len() == logprobs.len())
                .then(|| divided(&|i| Some(labels[i].len() as f64)))
                .flatten(),
        }
    }
}

impl Prediction {
    /// A row with nothing computed by a model (a vote's row).
    pub(crate) fn empty(cell: usize, row: usize, gold: usize) -> Self {
        Self {
            cell,
            row,
            gold,
            predicted: None,
            raw: None,
            logprobs: None,
            uncalibrated: None,
            prompt_tokens: 0,
            evaluated_tokens: 0,
            gen_tokens: 0,
            finish: Finish::Scored,
            prefill_ms: 0.0,
            decode_ms: 0.0,
            shared_by: 1,
            work: Work::none(),
            latency_ms: 0.0,
            shared_latency_ms: 0.0,
            from_cache: true,
            host: None,
            shard: None,
            stage: None,
            normalised: None,
        }
    }

    pub fn correct(&self) -> bool {
        self.predicted == Some(self.gold)
    }

    /// This prediction with the cost of `parts` summed: a row of a cell made of other
    /// cells' rows (a cascade's stages, an ensemble's evaluations), counted once each.
    pub(crate) fn costing(self, parts: &[&Prediction]) -> Prediction {
        let sum = |f: &dyn Fn(&Prediction) -> f64| parts.iter().map(|p| f(p)).sum::<f64>();
        let sum_u32 = |f: &dyn Fn(&Prediction) -> u32| parts.iter().map(|p| f(p)).sum::<u32>();
        Prediction {
            prompt_tokens: sum_u32(&|p| p.prompt_tokens),
            evaluated_tokens: sum_u32(&|p| p.evaluated_tokens),
            gen_tokens: sum_u32(&|p| p.gen_tokens),
            prefill_ms: sum(&|p| p.prefill_ms),
            decode_ms: sum(&|p| p.decode_ms),
            latency_ms: sum(&|p| p.latency_ms),
            shared_latency_ms: sum(&|p| p.shared_latency_ms),
            shared_by: 1,
            work: Work::sum(parts.iter().map(|p| &p.work)),
            from_cache: parts.iter().all(|p| p.from_cache),
            ..self
        }
    }
}

/// A calibration's parameters, or why it cannot be fitted yet.
pub fn calibration(plan: &Plan, cache: &Rows, cal: usize) -> Result<Params, CalibrationError> {
    let c = &plan.calibrations[cal];
    let support = &plan.support[c.support];
    let rows = &plan.sets[support.set].rows;
    // A fit waits for all its rows (those recorded as failed aside): fitted on whatever
    // happens to be cached, a calibrated cell's answers would depend on what ran before.
    let mut failed = 0;
    let limit = plan.prompt_limit(support);
    let probe = c.kind == CalibrationKind::Probe;
    let mut features: Vec<Vec<f32>> = Vec::new();
    let scored: Vec<(Vec<f64>, usize)> = support
        .rows
        .iter()
        .zip(rows)
        .filter_map(|(comps, row)| {
            let key = comps.as_ref()?.row_key();
            match cache.lookup(&key, limit) {
                Lookup::Hit if probe => {
                    features.push(cache.hit(&key, limit)?.hidden.as_deref()?.to_vec());
                    Some((Vec::new(), row.label))
                }
                Lookup::Hit => Some((cache.hit(&key, limit)?.logprobs.clone()?, row.label)),
                Lookup::TooLong { .. } | Lookup::Failed(_) => {
                    failed += 1;
                    None
                }
                Lookup::Miss => None,
            }
        })
        .collect();
    let needed = match c.kind {
        CalibrationKind::ContentFree => rows.len(),
        CalibrationKind::Batch | CalibrationKind::Fit | CalibrationKind::Probe => {
            (rows.len() - failed).max(2)
        }
    };
    if scored.len() < needed {
        return Err(CalibrationError::RowsMissing {
            computed: scored.len(),
            rows: rows.len(),
            set: plan.sets[support.set].name.clone(),
        });
    }
    let unlabelled = || scored.iter().map(|(lp, _)| lp.clone()).collect::<Vec<_>>();
    let fitted = match c.kind {
        CalibrationKind::ContentFree => calibrate::content_free(&unlabelled()),
        CalibrationKind::Batch => calibrate::batch(&unlabelled()),
        CalibrationKind::Fit => calibrate::fit(&scored),
        CalibrationKind::Probe => {
            let labels: Vec<usize> = scored.iter().map(|(_, l)| *l).collect();
            let candidates = probe_candidates(&plan.spec.methods[support.method]);
            return crate::probe::fit(&features, &labels, plan.dataset.labels.len(), &candidates)
                .map(|p| Params::Probe(Box::new(p)))
                .map_err(|e| CalibrationError::Probe(e.to_string()));
        }
    };
    fitted.ok_or(CalibrationError::NoLabels)
}

/// The names of the feature blocks a probe's rows hold, in their order: each layer and
/// pooling of a hidden-state probe (layer-major, as the backend writes them).
pub fn probe_candidates(method: &crate::spec::MethodSpec) -> Vec<String> {
    match method.probe().map(|p| &p.features) {
        Some(f @ crate::spec::ProbeFeatures::Hidden { .. }) => {
            f.states().iter().map(ToString::to_string).collect()
        }
        _ => vec!["embedding".into()],
    }
}

/// The keys a calibration's fit reads: the rows of its support cell.
pub fn calibration_keys(plan: &Plan, cal: usize) -> impl Iterator<Item = Digest> + '_ {
    let support = &plan.support[plan.calibrations[cal].support];
    support.rows.iter().flatten().map(|c| c.row_key())
}

/// Row `ri` of a model cell as the cache holds it (`None`: not computed yet, or a
/// calibrated cell not fitted yet), calibrated with `params` (the cell's calibration).
pub fn predict(
    plan: &Plan,
    cache: &Rows,
    ci: usize,
    cell: &Cell,
    ri: usize,
    params: Option<&Result<Params, CalibrationError>>,
    computed: &HashSet<Digest>,
) -> Option<Prediction> {
    let key = cell.rows.key(ri)?;
    let r = cache.hit(&key, plan.prompt_limit(cell))?;
    let labels = plan.dataset.label_names();
    let p = prediction(plan, &labels, ci, cell, ri, r, params)?;
    Some(Prediction {
        from_cache: !computed.contains(&key),
        ..p
    })
}

/// Row `ri` of a model cell from its cached content, calibrated with `params` (as served
/// from the cache: the caller says when this run computed it).
pub fn prediction(
    plan: &Plan,
    labels: &[String],
    ci: usize,
    cell: &Cell,
    ri: usize,
    r: &RowContent,
    params: Option<&Result<Params, CalibrationError>>,
) -> Option<Prediction> {
    let method = &plan.spec.methods[cell.method];
    let (logprobs, uncalibrated) = match params {
        None => (r.logprobs.clone(), None),
        Some(Err(_)) => return None,
        Some(Ok(p)) => (
            p.scores(r.logprobs.as_deref(), r.hidden.as_deref()),
            r.logprobs.clone(),
        ),
    };
    let row = &plan.sets[cell.set].rows[ri];
    let predicted = match method.generate() {
        Some(g) if g.score.is_some() => {
            let (score, reference) = (g.score.as_ref()?, row.reference.as_deref()?);
            r.text
                .as_deref()
                .and_then(|t| outcome(&score.apply(t, reference)))
        }
        Some(g) if !row.choices.is_empty() => r
            .text
            .as_deref()
            .and_then(|t| crate::answer::parse_choice(t, &row.choices, g.parse)),
        Some(g) => r
            .text
            .as_deref()
            .and_then(|t| parse_answer(t, labels, g.parse)),
        None => logprobs.as_deref().and_then(argmax),
    };
    let normalised = match (params, method.kind(), &r.logprobs) {
        (None, crate::spec::MethodKind::Loglik, Some(lp)) => Some(LengthNormalised::choose(
            lp,
            r.choice_tokens.as_deref(),
            if row.choices.is_empty() {
                labels
            } else {
                &row.choices
            },
        )),
        _ => None,
    };
    Some(Prediction {
        cell: ci,
        row: ri,
        gold: row.label,
        predicted,
        raw: r.text.clone(),
        logprobs,
        uncalibrated,
        prompt_tokens: r.prompt_tokens,
        evaluated_tokens: r.evaluated_tokens,
        gen_tokens: r.gen_tokens,
        finish: r.finish,
        prefill_ms: r.prefill_ms,
        decode_ms: r.decode_ms,
        shared_by: r.shared_by,
        work: match cell.source {
            crate::plan::Source::Llm { model, .. } => Work::of_row(
                RowTokens {
                    prompt: r.prompt_tokens,
                    prefix: r.prefix_tokens,
                    evaluated: r.evaluated_tokens,
                    choices: r.choice_tokens.as_deref(),
                    generated: r.gen_tokens,
                },
                &plan.models[model],
            ),
            _ => Work::none(),
        },
        latency_ms: r.prefill_ms + r.decode_ms,
        shared_latency_ms: r.latency_ms(),
        from_cache: true,
        host: r.host.clone(),
        shard: r.shard.clone(),
        stage: None,
        normalised,
    })
}

/// A scored answer as a class of [`crate::score::OUTCOMES`]: 0 when it matches its
/// reference, 1 when it does not, `None` (invalid) when nothing could be compared.
pub fn outcome(s: &crate::score::Scored) -> Option<usize> {
    s.extracted.as_ref()?;
    Some(usize::from(!s.correct))
}

#[cfg(test)]
mod tests {
    use super::LengthNormalised;

    #[test]
    fn length_normalised_choices_divide_by_tokens_and_by_bytes() {
        let labels = ["negative".to_string(), "very negative".to_string()];
        // Raw: "negative" (−2.0 > −3.0). Per token: −2.0/1 < −3.0/2 = −1.5: "very negative".
        // Per byte: −2.0/8 = −0.25 > −3.0/13 ≈ −0.23: "very negative" too.
        let lp = [-2.0, -3.0];
        let n = LengthNormalised::choose(&lp, Some(&[1, 2]), &labels);
        assert_eq!(n.per_token, Some(1));
        assert_eq!(n.per_byte, Some(1));
        // Per byte alone can disagree with per token: −2.0/8 = −0.25 > −4.0/13 ≈ −0.31.
        let n = LengthNormalised::choose(&[-2.0, -4.0], Some(&[1, 3]), &labels);
        assert_eq!(n.per_token, Some(1), "−4/3 ≈ −1.33 beats −2");
        assert_eq!(n.per_byte, Some(0));
        // Rows without recorded token counts have no per-token choice.
        let n = LengthNormalised::choose(&lp, None, &labels);
        assert_eq!(n.per_token, None);
        assert_eq!(n.per_byte, Some(1));
        // Counts that do not match the labels are not used.
        assert_eq!(
            LengthNormalised::choose(&lp, Some(&[1]), &labels).per_token,
            None
        );
    }
}
