//! Probes: a regularised logistic regression on features of each row (a model's hidden
//! states, or an embedder's vector), fitted on labelled rows of another file. The features
//! are standardised with the fit rows' means and deviations; the regularisation strength
//! and, when several are given, the layer and pooling are chosen by cross-validation on the
//! fit rows alone. The solver is linfa's (L-BFGS): binary for two labels, multinomial for
//! more, each the objective scikit-learn's `LogisticRegression(C)` minimises.

use linfa::DatasetBase;
use linfa::traits::Fit;
use linfa_logistic::{LogisticRegression, MultiLogisticRegression};
use ndarray::{Array1, Array2};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::answer::normalise;

/// Inverse regularisation strengths tried (scikit-learn's `C`: larger fits closer). Hidden
/// states have hundreds to thousands of dimensions, about as many as the fit rows, so the
/// rows are nearly separable and weak regularisation both overfits and is slow to fit: the
/// grid stops at 1.
pub const C_GRID: [f64; 5] = [0.0001, 0.001, 0.01, 0.1, 1.0];

/// L-BFGS iterations a fit may take: enough for a fit that converges to converge to 1e-8
/// (the scikit-learn pin), a bound on one that does not (scikit-learn's default, too).
const MAX_ITERATIONS: u64 = 100;

/// Folds of the cross-validation on the fit rows.
pub const FOLDS: usize = 5;

/// Everything about the solver that can change a fit, for the key of a stored fit.
pub fn solver() -> String {
    format!(
        "linfa-logistic 0.8 L-BFGS, standardised features, C {C_GRID:?}, {FOLDS} folds by row index, {MAX_ITERATIONS} iterations, gradient tolerance 1e-8"
    )
}

/// One candidate feature set: a layer and a pooling of a hidden-state task, or an
/// embedder's vector; `at` is its place among the row's concatenated features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub name: String,
    pub at: usize,
}

/// How one candidate and `C` did in cross-validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub candidate: String,
    pub c: f64,
    pub accuracy: f64,
    pub log_loss: f64,
}

/// A fitted probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeFit {
    /// The candidate chosen (e.g. `layer 0.5, mean`) and its place among the features.
    pub chosen: Candidate,
    /// How many candidates the row's features hold.
    pub candidates: usize,
    pub c: f64,
    /// Standardisation: each feature's mean and deviation over the fit rows.
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
    /// One weight row and intercept per label.
    pub weights: Vec<Vec<f64>>,
    pub intercept: Vec<f64>,
    /// The chosen setting's cross-validated accuracy on the fit rows, and every trial.
    pub cv_accuracy: f64,
    pub trials: Vec<Trial>,
    pub rows: usize,
}

/// Why a probe cannot be fitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProbeError {
    #[error("the fit rows hold {0} label(s); a probe needs rows of at least two")]
    OneLabel(usize),
    #[error("fit rows have {got} features where {expected} were expected")]
    Shape { got: usize, expected: usize },
    #[error("the solver failed: {0}")]
    Solver(String),
}

impl ProbeFit {
    /// Label log-probs (normalised) of a row from its features (all candidates').
    pub fn log_probs(&self, features: &[f32]) -> Option<Vec<f64>> {
        let d = features.len() / self.candidates.max(1);
        let x = features.get(self.chosen.at * d..(self.chosen.at + 1) * d)?;
        if x.len() != self.mean.len() {
            return None;
        }
        let z: Vec<f64> = x
            .iter()
            .zip(self.mean.iter().zip(&self.scale))
            .map(|(v, (m, s))| (f64::from(*v) - m) / s)
            .collect();
        let scores: Vec<f64> = self
            .weights
            .iter()
            .zip(&self.intercept)
            .map(|(w, b)| b + w.iter().zip(&z).map(|(w, x)| w * x).sum::<f64>())
            .collect();
        Some(normalise(&scores))
    }
}

/// A linear model over standardised features: one weight row and intercept per label.
struct Linear {
    mean: Vec<f64>,
    scale: Vec<f64>,
    weights: Vec<Vec<f64>>,
    intercept: Vec<f64>,
}

impl Linear {
    fn log_probs(&self, x: &[f64]) -> Vec<f64> {
        let scores: Vec<f64> = self
            .weights
            .iter()
            .zip(&self.intercept)
            .map(|(w, b)| {
                b + w
                    .iter()
                    .zip(x.iter().zip(self.mean.iter().zip(&self.scale)))
                    .map(|(w, (v, (m, s)))| w * (v - m) / s)
                    .sum::<f64>()
            })
            .collect();
        normalise(&scores)
    }
}

/// Each feature's mean and deviation over `rows` (a constant feature is left unscaled).
fn standardisation(rows: &[&[f64]]) -> (Vec<f64>, Vec<f64>) {
    let d = rows.first().map_or(0, |r| r.len());
    let n = rows.len().max(1) as f64;
    let mut mean = vec![0.0; d];
    for r in rows {
        for (m, x) in mean.iter_mut().zip(*r) {
            *m += x / n;
        }
    }
    let mut var = vec![0.0; d];
    for r in rows {
        for ((v, x), m) in var.iter_mut().zip(*r).zip(&mean) {
            *v += (x - m) * (x - m) / n;
        }
    }
    let scale = var
        .iter()
        .map(|v| if *v > 1e-24 { v.sqrt() } else { 1.0 })
        .collect();
    (mean, scale)
}

/// Fit a regularised logistic regression (`C`, scikit-learn's convention) on `rows` with
/// gold `labels` among `k`, features standardised.
fn fit_linear(rows: &[&[f64]], labels: &[usize], k: usize, c: f64) -> Result<Linear, ProbeError> {
    let (mean, scale) = standardisation(rows);
    let d = mean.len();
    let mut x = Array2::<f64>::zeros((rows.len(), d));
    for (i, r) in rows.iter().enumerate() {
        for j in 0..d {
            x[[i, j]] = (r[j] - mean[j]) / scale[j];
        }
    }
    let present: Vec<usize> = (0..k).filter(|l| labels.contains(l)).collect();
    if present.len() < 2 {
        return Err(ProbeError::OneLabel(present.len()));
    }
    let solver = |e: linfa_logistic::error::Error| ProbeError::Solver(e.to_string());
    let (weights, intercept) = if k == 2 {
        let y = Array1::from(labels.to_vec());
        let data = DatasetBase::new(x, y);
        let fitted = LogisticRegression::default()
            .alpha(1.0 / c)
            .max_iterations(MAX_ITERATIONS)
            .gradient_tolerance(1e-8)
            .fit(&data)
            .map_err(solver)?;
        // linfa's positive class is the label it saw more often: orient by it.
        let w: Vec<f64> = fitted.params().to_vec();
        let b = fitted.intercept();
        let pos = fitted.labels().pos.class;
        let (wp, wn) = (w.clone(), vec![0.0; d]);
        if pos == 1 {
            (vec![wn, wp], vec![0.0, b])
        } else {
            (vec![wp, vec![0.0; d]], vec![b, 0.0])
        }
    } else {
        let y = Array1::from(labels.to_vec());
        let data = DatasetBase::new(x, y);
        let fitted = MultiLogisticRegression::default()
            .alpha(1.0 / c)
            .max_iterations(MAX_ITERATIONS)
            .gradient_tolerance(1e-8)
            .fit(&data)
            .map_err(solver)?;
        // Columns are the classes seen, in linfa's order; an unseen label never wins.
        let mut weights = vec![vec![0.0; d]; k];
        let mut intercept = vec![-1e9; k];
        for (col, class) in fitted.classes().iter().enumerate() {
            weights[*class] = fitted.params().column(col).to_vec();
            intercept[*class] = fitted.intercept()[col];
        }
        (weights, intercept)
    };
    Ok(Linear {
        mean,
        scale,
        weights,
        intercept,
    })
}

/// Fit a probe on `rows` (each row's features: `candidates.len()` blocks of equal width)
/// with gold `labels` among `k`: every candidate and `C` cross-validated on the fit rows
/// (fold `i % FOLDS` for row `i`; the fit rows are a stratified sample, interleaved by
/// label, so each fold holds every label), the best by accuracy (then log-loss, then the
/// stronger regularisation) refitted on all of them.
pub fn fit(
    rows: &[Vec<f32>],
    labels: &[usize],
    k: usize,
    candidates: &[String],
) -> Result<ProbeFit, ProbeError> {
    let n_cand = candidates.len().max(1);
    let width = rows.first().map_or(0, Vec::len);
    if let Some(bad) = rows.iter().find(|r| r.len() != width) {
        return Err(ProbeError::Shape {
            got: bad.len(),
            expected: width,
        });
    }
    let d = width / n_cand;
    // Each candidate's block of each row, as f64.
    let blocks: Vec<Vec<Vec<f64>>> = (0..n_cand)
        .map(|c| {
            rows.iter()
                .map(|r| {
                    r[c * d..(c + 1) * d]
                        .iter()
                        .map(|x| f64::from(*x))
                        .collect()
                })
                .collect()
        })
        .collect();
    let folds = FOLDS.min(rows.len()).max(2);
    let settings: Vec<(usize, f64)> = (0..n_cand)
        .flat_map(|c| C_GRID.iter().map(move |&cc| (c, cc)))
        .collect();
    let trials: Vec<Result<Trial, ProbeError>> = settings
        .par_iter()
        .map(|&(cand, c)| {
            let (mut right, mut loss, mut n) = (0usize, 0.0, 0usize);
            for f in 0..folds {
                let train: Vec<usize> = (0..rows.len()).filter(|i| i % folds != f).collect();
                let test: Vec<usize> = (0..rows.len()).filter(|i| i % folds == f).collect();
                let x: Vec<&[f64]> = train.iter().map(|&i| blocks[cand][i].as_slice()).collect();
                let y: Vec<usize> = train.iter().map(|&i| labels[i]).collect();
                let model = fit_linear(&x, &y, k, c)?;
                for &i in &test {
                    let lp = model.log_probs(&blocks[cand][i]);
                    right += usize::from(crate::answer::argmax(&lp) == Some(labels[i]));
                    loss -= lp[labels[i]];
                    n += 1;
                }
            }
            Ok(Trial {
                candidate: candidates.get(cand).cloned().unwrap_or_default(),
                c,
                accuracy: right as f64 / n.max(1) as f64,
                log_loss: loss / n.max(1) as f64,
            })
        })
        .collect();
    let trials: Vec<Trial> = trials.into_iter().collect::<Result<_, _>>()?;
    let best = (0..trials.len())
        .min_by(|&a, &b| {
            let (x, y) = (&trials[a], &trials[b]);
            y.accuracy
                .total_cmp(&x.accuracy)
                .then(x.log_loss.total_cmp(&y.log_loss))
                .then(x.c.total_cmp(&y.c))
        })
        .expect("the grid is not empty");
    let (cand, c) = settings[best];
    let x: Vec<&[f64]> = blocks[cand].iter().map(Vec::as_slice).collect();
    let model = fit_linear(&x, labels, k, c)?;
    Ok(ProbeFit {
        chosen: Candidate {
            name: candidates.get(cand).cloned().unwrap_or_default(),
            at: cand,
        },
        candidates: n_cand,
        c,
        mean: model.mean,
        scale: model.scale,
        weights: model.weights,
        intercept: model.intercept,
        cv_accuracy: trials[best].accuracy,
        trials,
        rows: rows.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows the scikit-learn values below were computed on (42 rows, 3 features).
    fn data(k: usize) -> (Vec<Vec<f64>>, Vec<usize>) {
        (0..42)
            .map(|i| {
                let l = i % k;
                let f = i as f64;
                (
                    vec![
                        (f * 0.7).sin() + 0.8 * l as f64,
                        (f * 1.3).cos() - 0.5 * f64::from(u8::from(l == 2)),
                        ((i * 7) % 11) as f64 / 11.0 - 0.5,
                    ],
                    l,
                )
            })
            .unzip()
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() < tol, "{a} vs {b}");
    }

    /// Pinned against scikit-learn 1.9.1: `StandardScaler().fit_transform(X)`, then
    /// `LogisticRegression(C=0.5, tol=1e-12, max_iter=100000)`.
    #[test]
    fn the_fit_is_scikit_learns_for_two_and_three_labels() {
        let (x, y) = data(2);
        let rows: Vec<&[f64]> = x.iter().map(Vec::as_slice).collect();
        let m = fit_linear(&rows, &y, 2, 0.5).unwrap();
        let coef = [
            0.9279731602958898,
            -0.05862790834728898,
            0.06024077002039934,
        ];
        for (j, c) in coef.iter().enumerate() {
            close(m.weights[1][j] - m.weights[0][j], *c, 1e-5);
        }
        close(
            m.intercept[1] - m.intercept[0],
            -0.0037516247518772096,
            1e-5,
        );
        let p = [0.6704639865583215, 0.23874356455773105, 0.34447621901331127];
        for (r, p0) in rows.iter().zip(p) {
            close(m.log_probs(r)[0].exp(), p0, 1e-6);
        }

        let (x, y) = data(3);
        let rows: Vec<&[f64]> = x.iter().map(Vec::as_slice).collect();
        let m = fit_linear(&rows, &y, 3, 0.5).unwrap();
        let coef = [
            [-1.0345800117242065, 0.2037695546514403, 0.06880687271415975],
            [
                -0.049201215272853184,
                0.2924699378402319,
                0.03514711820643187,
            ],
            [
                1.0837812269970597,
                -0.4962394924916722,
                -0.10395399092059159,
            ],
        ];
        for (w, c) in m.weights.iter().zip(coef) {
            for (a, b) in w.iter().zip(c) {
                close(*a, b, 1e-4);
            }
        }
        let p = [
            [0.5777930783232825, 0.3915407461323281, 0.03066617554438943],
            [0.18559121960720307, 0.4818858023693255, 0.33252297802347147],
            [
                0.007462451195915242,
                0.05486187325682805,
                0.9376756755472566,
            ],
        ];
        for (r, p) in rows.iter().zip(p) {
            let lp = m.log_probs(r);
            for (a, b) in lp.iter().zip(p) {
                close(a.exp(), b, 1e-5);
            }
        }
    }

    #[test]
    fn cross_validation_chooses_the_candidate_that_carries_the_label() {
        // Two candidates of 3 features: noise first, the label (with noise) second.
        let rows: Vec<Vec<f32>> = (0..60)
            .map(|i| {
                let l = (i % 2) as f32;
                let h = |s: u64| {
                    (blake3::hash(&(i as u64 * 7 + s).to_le_bytes()).as_bytes()[0] as f32) / 255.0
                };
                vec![h(1), h(2), h(3), l + 0.6 * h(4), h(5), 1.0 - l + 0.6 * h(6)]
            })
            .collect();
        let labels: Vec<usize> = (0..60).map(|i| i % 2).collect();
        let names = vec!["noise".to_string(), "signal".to_string()];
        let p = fit(&rows, &labels, 2, &names).unwrap();
        assert_eq!(p.chosen.name, "signal");
        assert_eq!(p.chosen.at, 1);
        assert_eq!(p.trials.len(), 2 * C_GRID.len());
        assert!(p.cv_accuracy > 0.95, "{p:?}");
        let right = rows
            .iter()
            .zip(&labels)
            .filter(|(r, l)| crate::answer::argmax(&p.log_probs(r).unwrap()) == Some(**l))
            .count();
        assert_eq!(right, 60);
        // Deterministic.
        assert_eq!(fit(&rows, &labels, 2, &names).unwrap(), p);
        // One label only: an error, never a probe that always says it.
        let ones: Vec<usize> = vec![1; 60];
        assert_eq!(
            fit(&rows, &ones, 2, &names).unwrap_err(),
            ProbeError::OneLabel(1)
        );
    }
}
