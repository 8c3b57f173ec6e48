//! Statistics, each checked in tests against independently computed values.

/// 95% two-sided normal quantile.
pub const Z95: f64 = 1.959_963_984_540_054;

/// Wilson score interval for `k` successes in `n` trials (Wilson 1927).
pub fn wilson(k: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n_f = n as f64;
    let p = k as f64 / n_f;
    let z2 = z * z;
    let denom = 1.0 + z2 / n_f;
    let center = (p + z2 / (2.0 * n_f)) / denom;
    let half = z * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// Quantile by linear interpolation between order statistics (numpy's default, type 7).
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

/// Precision, recall and F1 from counts; 0 where undefined (sklearn's `zero_division=0`).
pub fn prf(tp: u64, fp: u64, fn_: u64) -> (f64, f64, f64) {
    let p = if tp + fp == 0 {
        0.0
    } else {
        tp as f64 / (tp + fp) as f64
    };
    let r = if tp + fn_ == 0 {
        0.0
    } else {
        tp as f64 / (tp + fn_) as f64
    };
    let f = if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    };
    (p, r, f)
}

/// The discordant pairs of two cells' paired outcomes: rows only `a` got right, and rows
/// only `b` got right (McNemar's b and c).
pub fn discordant(a: &[bool], b: &[bool]) -> (u64, u64) {
    a.iter().zip(b).fold((0, 0), |(x, y), (p, q)| match (p, q) {
        (true, false) => (x + 1, y),
        (false, true) => (x, y + 1),
        _ => (x, y),
    })
}

/// Exact McNemar test (two-sided): with `b` and `c` the discordant pairs (A right and B
/// wrong, and the reverse), the p-value of a binomial test of `min(b, c)` in `b + c` at 1/2.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // Sum the binomial pmf in log space: n can be in the thousands.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_choose = 0.0; // ln C(n, 0)
    let mut tail = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

/// The standard normal quantile at 0.8: 80% power.
pub const Z_POWER_80: f64 = 0.841_621_233_572_914_3;

/// The smallest paired difference in accuracy (rows only A gets right minus rows only B
/// gets right, as a share of `n`) that a two-sided McNemar test at 5% detects with 80%
/// power, when a share `discordant` of the rows is answered right by one cell only (Connor
/// 1987's sample size, solved for the difference). `None` when even a difference as large
/// as the discordant share is out of reach.
pub fn mcnemar_detectable(n: u64, discordant: f64) -> Option<f64> {
    if n == 0 || !(discordant > 0.0 && discordant <= 1.0) {
        return None;
    }
    let needed = |d: f64| {
        let s = Z95 * discordant.sqrt() + Z_POWER_80 * (discordant - d * d).max(0.0).sqrt();
        s * s / (d * d)
    };
    let n = n as f64;
    if needed(discordant) > n {
        return None;
    }
    // `needed` falls as the difference grows: bisect for where it meets n.
    let (mut lo, mut hi) = (0.0, discordant);
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if needed(mid) > n { lo = mid } else { hi = mid }
    }
    Some(hi)
}

/// Half the width of the 95% Wilson interval on an accuracy of `accuracy` over `rows` rows.
pub fn wilson_half_width(accuracy: f64, rows: u64) -> f64 {
    let (lo, hi) = wilson((accuracy * rows as f64).round() as u64, rows, Z95);
    (hi - lo) / 2.0
}

/// What a sample of `rows` can resolve, said before anything runs: the half-width of a 95%
/// Wilson interval on one cell's accuracy (at 50%, its widest, and at the accuracy the user
/// expects), and the paired difference a McNemar test detects with 80% power when a given
/// share of the rows is discordant.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Resolution {
    pub rows: u64,
    pub half_width_at_50: f64,
    pub expected_accuracy: f64,
    pub half_width_at_expected: f64,
    pub discordant_share: f64,
    /// `None`: no difference is detectable with 80% power at this share.
    pub detectable_difference: Option<f64>,
}

impl Resolution {
    pub fn of(rows: u64, expected_accuracy: f64, discordant_share: f64) -> Self {
        Self {
            rows,
            half_width_at_50: wilson_half_width(0.5, rows),
            expected_accuracy,
            half_width_at_expected: wilson_half_width(expected_accuracy, rows),
            discordant_share,
            detectable_difference: mcnemar_detectable(rows, discordant_share),
        }
    }

    /// One sentence for `plan`.
    pub fn sentence(&self) -> String {
        let detect = match self.detectable_difference {
            Some(d) => format!(
                "a paired difference of {:.1} points or more is detected with 80% power (McNemar, 5%)",
                100.0 * d
            ),
            None => "no paired difference is detected with 80% power (McNemar, 5%)".into(),
        };
        format!(
            "{} rows resolve one cell's accuracy to ±{:.1} points at 50% and ±{:.1} at the expected {:.0}% (95% Wilson); when {:.0}% of the rows are answered right by only one of two cells, {detect}.",
            self.rows,
            100.0 * self.half_width_at_50,
            100.0 * self.half_width_at_expected,
            100.0 * self.expected_accuracy,
            100.0 * self.discordant_share,
        )
    }
}

/// Holm's step-down adjustment of a family of p-values (Holm 1979): the `i`-th smallest is
/// multiplied by `m − i` (i from 0), made non-decreasing in that order, and capped at 1.
/// Rejecting where the adjusted p is below α controls the family-wise error rate at α
/// whatever the dependence between the tests. Returned in the input's order.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then(a.cmp(&b)));
    let mut out = vec![0.0; m];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        out[i] = running;
    }
    out
}

/// Percentile bootstrap interval of `mean(a) - mean(b)` over paired 0/1 outcomes: rows are
/// resampled with replacement `resamples` times with a seeded generator.
pub fn paired_bootstrap(
    a: &[bool],
    b: &[bool],
    resamples: usize,
    seed: u64,
    level: f64,
) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "paired outcomes");
    let n = a.len();
    if n == 0 || resamples == 0 {
        return (0.0, 0.0);
    }
    let d: Vec<i8> = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| i8::from(x) - i8::from(y))
        .collect();
    let mut rng = crate::rng::SplitMix64::new(seed);
    let bound = crate::rng::Bound::new(n as u64);
    let mut diffs = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let mut sum = 0i64;
        for _ in 0..n {
            sum += i64::from(d[rng.below_prepared(&bound) as usize]);
        }
        diffs.push(sum as f64 / n as f64);
    }
    let alpha = (1.0 - level) / 2.0;
    (
        quantile(&diffs, alpha).unwrap_or(0.0),
        quantile(&diffs, 1.0 - alpha).unwrap_or(0.0),
    )
}

/// Area under the ROC curve of `scores` for the positive class (`labels[i]` true), by the
/// rank-sum (Mann-Whitney) formula with average ranks for ties. `None` with one class only.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let n_pos = labels.iter().filter(|&&l| l).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&i, &j| scores[i].total_cmp(&scores[j]));
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = avg;
        }
        i = j + 1;
    }
    let rank_sum: f64 = (0..labels.len())
        .filter(|&k| labels[k])
        .map(|k| ranks[k])
        .sum();
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos * n_neg) as f64)
}

/// Brier score: the mean over rows of the squared error of the probability vector against the
/// one-hot gold label, halved so that the binary case equals sklearn's `brier_score_loss`.
pub fn brier(probs: &[Vec<f64>], gold: &[usize]) -> f64 {
    if probs.is_empty() {
        return 0.0;
    }
    let total: f64 = probs
        .iter()
        .zip(gold)
        .map(|(p, &g)| {
            p.iter()
                .enumerate()
                .map(|(k, &x)| {
                    let y = if k == g { 1.0 } else { 0.0 };
                    (x - y) * (x - y)
                })
                .sum::<f64>()
        })
        .sum();
    total / probs.len() as f64 / 2.0
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReliabilityBin {
    pub lo: f64,
    pub hi: f64,
    pub count: u64,
    pub mean_confidence: f64,
    pub accuracy: f64,
}

/// Reliability bins of top-label confidence (`bins` equal-width bins on [0, 1]; the last bin
/// includes 1) and the expected calibration error, sum over bins of
/// `count / n * |accuracy - mean confidence|` (Guo et al. 2017).
pub fn calibration(
    confidence: &[f64],
    correct: &[bool],
    bins: usize,
) -> (Vec<ReliabilityBin>, f64) {
    let n = confidence.len();
    let mut out: Vec<ReliabilityBin> = (0..bins)
        .map(|b| ReliabilityBin {
            lo: b as f64 / bins as f64,
            hi: (b + 1) as f64 / bins as f64,
            count: 0,
            mean_confidence: 0.0,
            accuracy: 0.0,
        })
        .collect();
    for (&c, &ok) in confidence.iter().zip(correct) {
        let b = ((c * bins as f64).floor() as usize).min(bins - 1);
        out[b].count += 1;
        out[b].mean_confidence += c;
        out[b].accuracy += f64::from(u8::from(ok));
    }
    let mut ece = 0.0;
    for b in &mut out {
        if b.count > 0 {
            b.mean_confidence /= b.count as f64;
            b.accuracy /= b.count as f64;
            ece += b.count as f64 / n.max(1) as f64 * (b.accuracy - b.mean_confidence).abs();
        }
    }
    (out, ece)
}

/// Probabilities over the labels from their log-probabilities (a softmax restricted to them).
pub fn label_probs(logprobs: &[f64]) -> Vec<f64> {
    let max = logprobs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logprobs.iter().map(|&l| (l - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

/// Mean and sample standard deviation (n - 1); the deviation is 0 for fewer than two values.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The most frequent valid vote; ties go to the label voted first; `None` if all are invalid.
pub fn majority(votes: &[Option<usize>]) -> Option<usize> {
    let mut counts: Vec<(usize, usize, usize)> = Vec::new(); // (label, count, first position)
    for (pos, v) in votes.iter().enumerate() {
        if let Some(l) = v {
            match counts.iter_mut().find(|(x, _, _)| x == l) {
                Some(e) => e.1 += 1,
                None => counts.push((*l, 1, pos)),
            }
        }
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))
        .map(|(l, _, _)| l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn wilson_matches_statsmodels() {
        // statsmodels 0.14 `proportion_confint(81, 263, method="wilson")`
        // = (0.2552885198782742, 0.36620957698280004) (run once; Newcombe 1998's example).
        let (lo, hi) = wilson(81, 263, Z95);
        assert!(close(lo, 0.255_288_519_878_274_2, 1e-12), "{lo}");
        assert!(close(hi, 0.366_209_576_982_800_04, 1e-12), "{hi}");
        // statsmodels: proportion_confint(15, 148, method="wilson") = (0.06238639953073628, 0.16048724172330803)
        let (lo, hi) = wilson(15, 148, Z95);
        assert!(
            close(lo, 0.062_386_399_530_736_28, 1e-12)
                && close(hi, 0.160_487_241_723_308_03, 1e-12)
        );
        // statsmodels: proportion_confint(0, 10, method="wilson") = (0.0, 0.27753279986288926)
        let (lo, hi) = wilson(0, 10, Z95);
        assert_eq!(lo, 0.0);
        assert!(close(hi, 0.277_532_799_862_889_26, 1e-12), "{hi}");
    }

    #[test]
    fn quantile_matches_numpy_linear() {
        // numpy.quantile([1, 2, 3, 4, 10], [0.5, 0.95]) = [3.0, 8.8]
        let v = [4.0, 1.0, 10.0, 3.0, 2.0];
        assert_eq!(quantile(&v, 0.5), Some(3.0));
        assert!(close(quantile(&v, 0.95).unwrap(), 8.8, 1e-12));
    }

    #[test]
    fn prf_matches_sklearn() {
        // sklearn precision_recall_fscore_support(y_true=[0,0,1,1,1], y_pred=[0,1,1,1,0])
        // class 1: tp=2, fp=1, fn=1 -> P=R=F=2/3
        let (p, r, f) = prf(2, 1, 1);
        assert!(
            close(p, 2.0 / 3.0, 1e-12) && close(r, 2.0 / 3.0, 1e-12) && close(f, 2.0 / 3.0, 1e-12)
        );
        assert_eq!(prf(0, 0, 3), (0.0, 0.0, 0.0));
    }
    #[test]
    fn detectable_difference_matches_connors_formula_solved_by_scipy() {
        // scipy: brentq(lambda d: (norm.ppf(.975)*sqrt(psi) + norm.ppf(.8)*sqrt(psi-d*d))**2
        //   / d**2 - n, 1e-9, psi)
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(close(
            mcnemar_detectable(300, 0.1),
            0.050_948_969_798_222_51
        ));
        assert!(close(
            mcnemar_detectable(1000, 0.1),
            0.027_982_836_304_473_485
        ));
        assert!(close(
            mcnemar_detectable(300, 0.2),
            0.072_052_724_077_581_95
        ));
        // 100 rows with 5% discordant: even the largest difference needs 155 rows.
        assert_eq!(mcnemar_detectable(100, 0.05), None);
        assert_eq!(mcnemar_detectable(0, 0.1), None);
    }

    #[test]
    fn holm_matches_statsmodels() {
        // statsmodels 0.14 multipletests(p, method="holm")[1]
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        let a = holm(&[0.01, 0.04, 0.03, 0.005]);
        assert!(close(&a, &[0.03, 0.06, 0.06, 0.02]), "{a:?}");
        let b = holm(&[0.2, 0.001, 0.049, 0.5, 0.0125]);
        assert!(close(&b, &[0.4, 0.005, 0.147, 0.5, 0.05]), "{b:?}");
        assert_eq!(holm(&[0.9]), vec![0.9]);
        assert!(holm(&[]).is_empty());
        // Capped at 1.
        assert_eq!(holm(&[0.6, 0.7]), vec![1.0, 1.0]);
    }

    #[test]
    fn discordant_counts_the_rows_each_cell_alone_got_right() {
        let a = [true, true, false, false, true];
        let b = [true, false, true, false, false];
        assert_eq!(discordant(&a, &b), (2, 1));
        assert_eq!(discordant(&b, &a), (1, 2));
        assert_eq!(discordant(&[], &[]), (0, 0));
    }

    #[test]
    fn mcnemar_matches_scipy_binomtest() {
        // scipy.stats.binomtest(3, 15, 0.5).pvalue = 0.03515625
        // (= statsmodels mcnemar([[10, 12], [3, 5]], exact=True).pvalue)
        assert!(close(mcnemar_exact(12, 3), 0.035_156_25, 1e-12));
        assert!(close(mcnemar_exact(3, 12), 0.035_156_25, 1e-12));
        // scipy.stats.binomtest(40, 100, 0.5).pvalue = 0.05688793364098089
        assert!(close(
            mcnemar_exact(60, 40),
            0.056_887_933_640_980_89,
            1e-10
        ));
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
    }

    #[test]
    fn roc_auc_and_brier_match_sklearn() {
        let y = [false, false, true, true, true, false, true, false];
        let s = [0.1, 0.4, 0.35, 0.8, 0.7, 0.4, 0.4, 0.2];
        // sklearn.metrics.roc_auc_score(y, s) = 0.8125 (ties at 0.4 count one half)
        assert!(close(roc_auc(&s, &y).unwrap(), 0.8125, 1e-12));
        assert_eq!(roc_auc(&s, &[true; 8]), None);
        // sklearn.metrics.brier_score_loss(y, s) = 0.16031250000000002
        let probs: Vec<Vec<f64>> = s.iter().map(|&p| vec![1.0 - p, p]).collect();
        let gold: Vec<usize> = y.iter().map(|&t| usize::from(t)).collect();
        assert!(close(brier(&probs, &gold), 0.160_312_5, 1e-12));
    }

    #[test]
    fn ece_matches_a_hand_computed_example() {
        // Bins of width 0.1: [0.9, 1] holds 0.92 (right) and 0.97 (wrong): |0.5 - 0.945| * 2/5;
        // [0.6, 0.7) holds 0.61, 0.68 (right) and 0.64 (wrong): |2/3 - 0.643333| * 3/5.
        // ECE = 0.178 + 0.014 = 0.192 (numpy re-computation: 0.19199999999999998).
        let (bins, ece) = calibration(
            &[0.92, 0.97, 0.61, 0.68, 0.64],
            &[true, false, true, true, false],
            10,
        );
        assert!(close(ece, 0.192, 1e-12), "{ece}");
        assert_eq!(bins[9].count, 2);
        assert_eq!(bins[6].count, 3);
        assert!(close(bins[6].accuracy, 2.0 / 3.0, 1e-12));
    }

    #[test]
    fn paired_bootstrap_matches_a_reference_implementation() {
        // The same procedure in Python (SplitMix64 seeded 42, rejection sampling for the
        // index, numpy.quantile of 1000 resampled differences) gives [-0.2, 0.6].
        let a = [
            true, true, false, true, false, true, true, false, true, true,
        ];
        let b = [
            true, false, false, true, true, false, true, false, false, true,
        ];
        let (lo, hi) = paired_bootstrap(&a, &b, 1000, 42, 0.95);
        assert!(close(lo, -0.2, 1e-12) && close(hi, 0.6, 1e-12), "{lo} {hi}");
        // Identical cells: the difference is exactly 0 in every resample.
        assert_eq!(paired_bootstrap(&a, &a, 200, 1, 0.95), (0.0, 0.0));
    }

    #[test]
    fn mean_std_matches_numpy_ddof1_and_majority_breaks_ties_by_first_vote() {
        // numpy: mean([0.8, 0.7, 0.75]) = 0.75, std(..., ddof=1) = 0.05
        let (m, s) = mean_std(&[0.8, 0.7, 0.75]);
        assert!(close(m, 0.75, 1e-12) && close(s, 0.05, 1e-12));
        assert_eq!(majority(&[Some(1), None, Some(0), Some(1)]), Some(1));
        assert_eq!(majority(&[Some(0), Some(1)]), Some(0));
        assert_eq!(majority(&[None, None]), None);
        let p = label_probs(&[(0.25f64).ln(), (0.75f64).ln()]);
        assert!(close(p[0], 0.25, 1e-12) && close(p[1], 0.75, 1e-12));
    }
}
