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
}
