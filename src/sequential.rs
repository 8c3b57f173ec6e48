//! Runs that stop when the answer is known: `run --until-resolved A B` grows the rows in
//! batches (prefixes of the spec's sample, each balanced by label) until an anytime-valid
//! test of the paired difference between two cells decides, or a cap is reached.
//!
//! The test is an e-process on the discordant rows (the rows exactly one of the two cells
//! gets right). With no difference between the cells, each discordant row is A's with
//! probability ½ (McNemar's null); the e-value is the likelihood ratio of a uniform mixture
//! over that probability against ½:
//!
//! `E = 2^(b+c) · B(b+1, c+1)`, with `b` rows only A gets right and `c` only B does.
//!
//! Under the null E is a nonnegative martingale with mean 1, so by Ville's inequality the
//! chance it *ever* reaches 1/α is at most α: it may be checked after every batch, and the
//! run stopped the first time it crosses, without the inflation repeated looks give a
//! fixed-sample test.

use serde::Serialize;

/// The level of the test: stop when the e-value reaches 1/α.
pub const ALPHA: f64 = 0.05;

/// The mixture e-value against "no difference" after `b` rows only the first cell got
/// right and `c` only the second did.
pub fn e_value(b: u64, c: u64) -> f64 {
    let n = b + c;
    // ln B(b+1, c+1) = ln b! + ln c! − ln (n+1)!
    let ln_fact = |k: u64| (1..=k).map(|i| (i as f64).ln()).sum::<f64>();
    (n as f64 * std::f64::consts::LN_2 + ln_fact(b) + ln_fact(c) - ln_fact(n + 1)).exp()
}

named_enum! {
    /// Why a sequential run stopped.
    pub enum Stopped {
        /// The e-value reached 1/α: the cells differ.
        Resolved,
        /// The cap on rows was reached first: no difference shown at this size.
        Cap,
        /// The run stopped early (a signal, or rows that failed), undecided.
        Incomplete,
    }
}

/// Where a sequential run stopped, and on what evidence (in `run.json` and the report).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sequential {
    pub cells: [String; 2],
    /// Rows of the sample run when it stopped, and the most it would run.
    pub rows: usize,
    pub max_rows: usize,
    pub batch: usize,
    /// Batches run (looks at the evidence).
    pub looks: usize,
    pub stopped: Stopped,
    /// Rows only the first cell got right, and only the second.
    pub first_only: u64,
    pub second_only: u64,
    pub e_value: f64,
    /// [`Sequential::sentence`] when it stopped.
    pub why: String,
}

impl Sequential {
    /// The evidence after a look at `rows` rows.
    pub fn look(&mut self, rows: usize, first_only: u64, second_only: u64) {
        self.rows = rows;
        self.looks += 1;
        self.first_only = first_only;
        self.second_only = second_only;
        self.e_value = e_value(first_only, second_only);
    }

    pub fn resolved(&self) -> bool {
        self.e_value >= 1.0 / ALPHA
    }

    /// One sentence: why it stopped, and at how many rows.
    pub fn sentence(&self) -> String {
        let [a, b] = &self.cells;
        let evidence = format!(
            "{} rows only {a} got right, {} only {b}; e-value {:.3} against no difference, threshold {:.0}",
            self.first_only,
            self.second_only,
            self.e_value,
            1.0 / ALPHA
        );
        match self.stopped {
            Stopped::Resolved => format!(
                "Stopped at {} of at most {} rows after {} looks: {a} and {b} differ ({evidence}; anytime-valid, so the looks cost no error).",
                self.rows, self.max_rows, self.looks
            ),
            Stopped::Cap => format!(
                "Ran to the cap of {} rows ({} looks) without a difference between {a} and {b} ({evidence}).",
                self.max_rows, self.looks
            ),
            Stopped::Incomplete => format!(
                "Stopped at {} rows before deciding ({evidence}).",
                self.rows
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e_value_matches_scipy_betaln() {
        // scipy: exp((b+c)*log(2) + betaln(b+1, c+1))
        let close = |a: f64, b: f64| ((a - b) / b).abs() < 1e-10;
        assert!(close(e_value(10, 2), 4.77389277389277));
        assert!(close(e_value(30, 10), 31.636906390224624));
        assert!(close(e_value(5, 5), 0.36940836940836935));
        assert!(close(e_value(40, 0), 26817356775.02436));
        assert_eq!(e_value(0, 0), 1.0);
        // Symmetric in the two cells.
        assert!(close(e_value(2, 10), e_value(10, 2)));
    }

    #[test]
    fn no_difference_rarely_crosses_even_when_looked_at_often() {
        // Fair coin flips, looked at after every 5 of 1000 discordant rows: the share of
        // 300 seeded streams that ever cross 1/α stays near or below α (a fixed-sample test
        // looked at 200 times would cross far more often).
        let mut crossed = 0;
        for seed in 0..300u64 {
            let mut rng = crate::rng::SplitMix64::for_stream(seed, "sequential-test");
            let (mut b, mut c) = (0, 0);
            for i in 1..=1000 {
                if rng.next_u64().is_multiple_of(2) {
                    b += 1
                } else {
                    c += 1
                }
                if i % 5 == 0 && e_value(b, c) >= 1.0 / ALPHA {
                    crossed += 1;
                    break;
                }
            }
        }
        assert!(crossed <= 300 / 20 + 6, "{crossed} of 300 crossed");
        // A real difference (3 in 4 discordant rows to A) crosses well before 1000.
        let mut rng = crate::rng::SplitMix64::for_stream(1, "sequential-test-alt");
        let (mut b, mut c) = (0, 0);
        let at = (1..=1000).find(|_| {
            if rng.next_u64().is_multiple_of(4) {
                c += 1
            } else {
                b += 1
            }
            e_value(b, c) >= 1.0 / ALPHA
        });
        assert!(at.is_some_and(|n| n < 100), "{at:?}");
    }
}
