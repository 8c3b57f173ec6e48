//! Calibrating label scores of `loglik` cells with labelled data or content-free inputs.
//! Both work on the label log-probs normalised over the labels, and both only shift and
//! scale them, so a calibrated cell is computed from the very same cached inference as its
//! raw cell.

use serde::{Deserialize, Serialize};

/// Why a calibration cannot be fitted (yet).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibrationError {
    #[error("{computed} of {rows} {set} rows are computed")]
    RowsMissing {
        computed: usize,
        rows: usize,
        set: String,
    },
    #[error("no labels to fit")]
    NoLabels,
    /// A stage read the fits before the calibrate stage ran (a bug, never silently raw).
    #[error("the calibrate stage has not run")]
    NotDecided,
    #[error("the probe cannot be fitted: {0}")]
    Probe(String),
}

pub use crate::answer::normalise;

/// What a calibration learned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Params {
    /// Zhao et al. 2021: the mean label probabilities on content-free inputs, divided out.
    ContentFree { log_p: Vec<f64> },
    /// Batch calibration (Zhou et al. 2024): each label's mean normalised log-prob over the
    /// cell's own evaluated rows, subtracted. Needs no labels.
    Batch { mean_log_p: Vec<f64>, rows: usize },
    /// A per-label bias (the first label's is 0) and a temperature, fitted by maximum
    /// likelihood on labelled rows. For two labels, a threshold on the log-prob difference.
    Fit {
        bias: Vec<f64>,
        temperature: f64,
        rows: usize,
    },
    /// A probe: label scores from a row's features, not from its label log-probs.
    Probe(Box<crate::probe::ProbeFit>),
}

impl Params {
    /// Calibrated, normalised label log-probs of one row from its label log-probs (`None`
    /// for a probe, which reads the row's features: see [`Params::scores`]).
    pub fn apply(&self, lp: &[f64]) -> Option<Vec<f64>> {
        let n = normalise(lp);
        Some(match self {
            Params::Probe(_) => return None,
            Params::ContentFree { log_p: shift }
            | Params::Batch {
                mean_log_p: shift, ..
            } => normalise(&n.iter().zip(shift).map(|(x, c)| x - c).collect::<Vec<_>>()),
            Params::Fit {
                bias, temperature, ..
            } => normalise(&scaled(&n, bias, *temperature)),
        })
    }

    /// A row's label log-probs under this calibration or probe: from its label log-probs,
    /// or (a probe) from its hidden states.
    pub fn scores(&self, logprobs: Option<&[f64]>, hidden: Option<&[f32]>) -> Option<Vec<f64>> {
        match self {
            Params::Probe(p) => p.log_probs(hidden?),
            _ => self.apply(logprobs?),
        }
    }
}

fn scaled(n: &[f64], bias: &[f64], t: f64) -> Vec<f64> {
    n.iter().zip(bias).map(|(x, b)| x / t + b).collect()
}

/// Content-free calibration from the label log-probs of the content-free inputs.
pub fn content_free(rows: &[Vec<f64>]) -> Option<Params> {
    let k = rows.first()?.len();
    let mut mean = vec![0.0; k];
    for r in rows {
        for (m, x) in mean.iter_mut().zip(normalise(r)) {
            *m += x.exp() / rows.len() as f64;
        }
    }
    Some(Params::ContentFree {
        log_p: mean.iter().map(|p| p.max(1e-12).ln()).collect(),
    })
}

/// Batch calibration from the label log-probs of a cell's evaluated rows: the mean of
/// each label's normalised log-prob. A shift of the log-odds alone, so a row's calibrated
/// answer is its raw margin against the batch's mean margin.
pub fn batch(rows: &[Vec<f64>]) -> Option<Params> {
    let k = rows.first()?.len();
    let mut mean = vec![0.0; k];
    for r in rows {
        for (m, x) in mean.iter_mut().zip(normalise(r)) {
            *m += x / rows.len() as f64;
        }
    }
    Some(Params::Batch {
        mean_log_p: mean,
        rows: rows.len(),
    })
}

/// Fit a bias per label and a temperature on `(label log-probs, gold label)` rows by
/// maximising the likelihood, with a small ridge so that separable rows still give finite
/// values. Deterministic: a fixed number of damped gradient steps with backtracking.
pub fn fit(rows: &[(Vec<f64>, usize)]) -> Option<Params> {
    let k = rows.first()?.0.len();
    if k < 2 {
        return None;
    }
    let data: Vec<(Vec<f64>, usize)> = rows.iter().map(|(lp, g)| (normalise(lp), *g)).collect();
    // θ = (log T, b_1 .. b_{k-1}); b_0 = 0.
    let objective = |theta: &[f64]| -> f64 {
        let (t, bias) = unpack(theta, k);
        let ll: f64 = data
            .iter()
            .map(|(n, g)| normalise(&scaled(n, &bias, t))[*g])
            .sum();
        ll / data.len() as f64 - 1e-3 * theta.iter().map(|x| x * x).sum::<f64>()
    };
    let mut theta = vec![0.0; k];
    let mut value = objective(&theta);
    let mut step = 1.0;
    for _ in 0..400 {
        let grad: Vec<f64> = (0..k)
            .map(|i| {
                let h = 1e-6;
                let mut a = theta.clone();
                a[i] += h;
                let mut b = theta.clone();
                b[i] -= h;
                (objective(&a) - objective(&b)) / (2.0 * h)
            })
            .collect();
        let norm = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
        if norm < 1e-9 {
            break;
        }
        loop {
            let next: Vec<f64> = theta.iter().zip(&grad).map(|(x, g)| x + step * g).collect();
            let v = objective(&next);
            if v > value {
                theta = next;
                value = v;
                step *= 1.5;
                break;
            }
            step /= 2.0;
            if step < 1e-12 {
                break;
            }
        }
        if step < 1e-12 {
            break;
        }
    }
    let (temperature, bias) = unpack(&theta, k);
    Some(Params::Fit {
        bias,
        temperature,
        rows: rows.len(),
    })
}

fn unpack(theta: &[f64], k: usize) -> (f64, Vec<f64>) {
    let mut bias = vec![0.0; k];
    bias[1..].copy_from_slice(&theta[1..k]);
    (theta[0].exp(), bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argmax(v: &[f64]) -> usize {
        (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
    }

    /// Rows whose scores lean to label 0 by 2 nats whatever their gold label.
    fn biased(n: usize) -> Vec<(Vec<f64>, usize)> {
        (0..n)
            .map(|i| {
                let gold = i % 2;
                let signal = if gold == 1 { 1.0 } else { -1.0 } * (0.5 + (i % 7) as f64 * 0.2);
                (vec![0.0, signal - 2.0], gold)
            })
            .collect()
    }

    #[test]
    fn a_fitted_bias_undoes_a_constant_lean() {
        let rows = biased(200);
        let raw_right = rows.iter().filter(|(lp, g)| argmax(lp) == *g).count();
        let p = fit(&rows).unwrap();
        let cal_right = rows
            .iter()
            .filter(|(lp, g)| argmax(&p.apply(lp).unwrap()) == *g)
            .count();
        assert_eq!(raw_right, 100, "raw: always label 0");
        assert_eq!(cal_right, 200, "calibrated: the lean is removed ({p:?})");
        let Params::Fit { bias, .. } = &p else {
            panic!()
        };
        assert!(bias[1] > 0.0, "label 1 is lifted: {bias:?}");
        // Deterministic.
        assert_eq!(fit(&rows), Some(p));
    }

    #[test]
    fn batch_calibration_subtracts_the_mean_normalised_log_prob_of_each_label() {
        // Pinned against a hand computation (numpy): rows with p(label 0) .9, .6, .3.
        let rows: Vec<Vec<f64>> = [0.9f64, 0.6, 0.3]
            .iter()
            .map(|p| vec![p.ln(), (1.0 - p).ln()])
            .collect();
        let p = batch(&rows).unwrap();
        let Params::Batch {
            mean_log_p,
            rows: n,
        } = &p
        else {
            panic!("{p:?}")
        };
        assert_eq!(*n, 3);
        assert!((mean_log_p[0] - -0.6067196479165844).abs() < 1e-12);
        assert!((mean_log_p[1] - -1.1918502562689777).abs() < 1e-12);
        let expected = [0.8337019035452317, 0.4552040600889007, 0.1927205826611546];
        for (r, e) in rows.iter().zip(expected) {
            let out = p.apply(r).unwrap();
            assert!((out[0].exp() - e).abs() < 1e-12, "{out:?} vs {e}");
        }
        // The middle row leaned to label 0 raw, and to label 1 against the batch's lean.
        assert_eq!(argmax(&rows[1]), 0);
        assert_eq!(argmax(&p.apply(&rows[1]).unwrap()), 1);
        // Unnormalised scores give the same fit: only the label log-probs' differences count.
        let shifted: Vec<Vec<f64>> = rows.iter().map(|r| vec![r[0] - 5.0, r[1] - 5.0]).collect();
        let again = batch(&shifted).unwrap().apply(&rows[0]).unwrap();
        let once = p.apply(&rows[0]).unwrap();
        assert!((again[1] - once[1]).abs() < 1e-12, "{again:?} vs {once:?}");
    }

    #[test]
    fn content_free_divides_out_the_prompt_bias() {
        // The prompt alone favours label 0 at 80%.
        let cf = content_free(&[vec![0.8f64.ln(), 0.2f64.ln()]]).unwrap();
        let row = vec![0.6f64.ln(), 0.4f64.ln()];
        let out = cf.apply(&row).unwrap();
        assert_eq!(argmax(&out), 1, "{out:?}");
        let probs: Vec<f64> = out.iter().map(|x| x.exp()).collect();
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}
