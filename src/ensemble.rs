//! Ensembles: each row's label probabilities averaged over member cells, with weights. No
//! inference of its own: the members' predictions (calibrated where they are) are all it
//! reads, so an ensemble of cells already computed costs nothing to add.

use crate::answer::{argmax, normalise};
use crate::plan::{Plan, Source};
use crate::predict::Prediction;

/// The weighted mean of the members' label probabilities, as log-probs. Each member's
/// scores are normalised over the labels first (a raw `loglik` cell's are not).
pub fn combine(members: &[&[f64]], weights: &[f64]) -> Vec<f64> {
    let k = members.first().map_or(0, |m| m.len());
    let mut mean = vec![0.0; k];
    for (lp, w) in members.iter().zip(weights) {
        for (m, x) in mean.iter_mut().zip(normalise(lp)) {
            *m += w * x.exp();
        }
    }
    mean.iter().map(|p| p.max(f64::MIN_POSITIVE).ln()).collect()
}

/// The ensemble's predictions from its members': `predictions` sorted by (cell, row), as
/// [`crate::metrics::collect`] makes them. A row is answered when every member has scores
/// for it. Its cost is that of the prompt evaluations its members needed, each counted
/// once: members on one model and prompt (a raw cell and its calibrations, a probe) share
/// one evaluation.
pub fn predictions(plan: &Plan, ensemble: usize, predictions: &[Prediction]) -> Vec<Prediction> {
    let ep = &plan.ensembles[ensemble];
    let weights = &plan.spec.ensembles[ep.spec].weights;
    let of_cell = |cell: usize| {
        let start = predictions.partition_point(|p| p.cell < cell);
        let end = predictions.partition_point(|p| p.cell <= cell);
        &predictions[start..end]
    };
    let members: Vec<&[Prediction]> = ep.members.iter().map(|&m| of_cell(m)).collect();
    let mut out = Vec::new();
    for ri in 0..plan.dataset.rows.len() {
        let rows: Option<Vec<&Prediction>> = members
            .iter()
            .map(|m| {
                let at = m.binary_search_by_key(&ri, |p| p.row).ok()?;
                Some(&m[at]).filter(|p| p.logprobs.is_some())
            })
            .collect();
        let Some(rows) = rows else { continue };
        let scores: Vec<&[f64]> = rows
            .iter()
            .map(|p| p.logprobs.as_deref().expect("filtered"))
            .collect();
        let lp = combine(&scores, weights);
        // One evaluation per model and prompt among the members.
        let mut evaluations: Vec<(Source, &Prediction)> = Vec::new();
        for (&m, p) in ep.members.iter().zip(&rows) {
            let source = plan.cells[m].source;
            let shared = matches!(source, Source::Llm { .. })
                && evaluations.iter().any(|(s, _)| *s == source);
            if !shared {
                evaluations.push((source, p));
            }
        }
        let paid: Vec<&Prediction> = evaluations.iter().map(|(_, p)| *p).collect();
        let from_cache = rows.iter().all(|p| p.from_cache);
        out.push(Prediction {
            from_cache,
            ..Prediction {
                cell: ep.cell,
                row: ri,
                predicted: argmax(&lp),
                logprobs: Some(lp),
                uncalibrated: None,
                raw: None,
                stage: None,
                normalised: None,
                ..rows[0].clone()
            }
            .costing(&paid)
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ln(p: &[f64]) -> Vec<f64> {
        p.iter().map(|x| x.ln()).collect()
    }

    #[test]
    fn an_ensemble_averages_probabilities_not_log_probs() {
        // Member A is sure of label 0 (0.9), B leans to label 1 (0.4 / 0.6): the mean
        // probability of label 0 is 0.65. A mean of log-probs would give
        // exp((ln .9 + ln .4) / 2) = 0.6 before renormalising.
        let a = ln(&[0.9, 0.1]);
        let b = ln(&[0.4, 0.6]);
        let out = combine(&[&a, &b], &[0.5, 0.5]);
        assert!((out[0].exp() - 0.65).abs() < 1e-12, "{out:?}");
        assert!((out[1].exp() - 0.35).abs() < 1e-12, "{out:?}");
        // Weights move it: 0.25 × 0.9 + 0.75 × 0.4 = 0.525.
        let out = combine(&[&a, &b], &[0.25, 0.75]);
        assert!((out[0].exp() - 0.525).abs() < 1e-12, "{out:?}");
        // Raw, unnormalised scores count by their label probabilities only.
        let raw_a: Vec<f64> = a.iter().map(|x| x - 7.0).collect();
        let again = combine(&[&raw_a, &b], &[0.25, 0.75]);
        assert!((again[0] - out[0]).abs() < 1e-12);
        // Three labels, three members.
        let c = ln(&[0.2, 0.3, 0.5]);
        let d = ln(&[0.6, 0.3, 0.1]);
        let e = ln(&[0.1, 0.1, 0.8]);
        let out = combine(&[&c, &d, &e], &[1.0 / 3.0; 3]);
        let expected = [0.3, 0.7 / 3.0, 1.4 / 3.0];
        for (o, x) in out.iter().zip(expected) {
            assert!((o.exp() - x).abs() < 1e-12, "{out:?}");
        }
        assert_eq!(argmax(&out), Some(2));
    }
}
