//! What a row costs, from its tokens alone (issue #31): the same row costs the same
//! whichever machine computed it, however loaded, in whatever order, from the cache or not.
//!
//! A row's work is the prompt tokens a model must evaluate for it (its prompt beyond the
//! prefix every row of its template shares, which is evaluated once and reused; plus the
//! label tokens a log-likelihood row feeds after the prompt) and the tokens it generates.
//! Compute is the usual estimate of a decoder's forward pass, 2 × parameters a token
//! (Kaplan et al. 2020), with their N, the non-embedding parameters: every tensor but the
//! token-embedding table (a lookup) and the output head (whose product is computed only
//! for the tokens whose logits are read), tied or not, so that models of either kind count
//! alike. Attention over the context is left out: at a few hundred tokens it is a few
//! percent of a 0.5B model's. The time this work is
//! expected to take on this machine comes from the engine's rate measured once in a quiet
//! moment ([`crate::rate`]); wall-clock times, which move with the load, are kept beside it
//! and labelled as what they are.

use serde::Serialize;

use crate::model::KnownModel;

/// The work of one row, or of several summed (a cascade's stages, an ensemble's members).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Work {
    /// Tokens evaluated as prompt (batched): the row's own prompt tokens and label tokens.
    pub prompt_tokens: f64,
    /// Tokens generated (one decode call each).
    pub generated_tokens: f64,
    /// 2 × parameters × tokens; `None` where some model's parameter count is unknown.
    pub flops: Option<f64>,
    /// Seconds expected at the measured engine rates; `None` where some model has none.
    pub expected_s: Option<f64>,
}

/// What a cached row records of its tokens.
#[derive(Debug, Clone, Copy)]
pub struct RowTokens<'a> {
    pub prompt: u32,
    /// The template's shared prefix, where the row recorded it.
    pub prefix: Option<u32>,
    /// Tokens evaluated when it was computed (read only for rows that did not record
    /// their prefix: their prefix is what they reused).
    pub evaluated: u32,
    pub choices: Option<&'a [u32]>,
    pub generated: u32,
}

impl RowTokens<'_> {
    /// The prompt's leading tokens that the row does not pay for. Rows computed before the
    /// prefix was recorded: the tokens they reused from the row before, when they reused
    /// some (the first row of a template after another counts its prefix in full).
    fn prefix(&self) -> u32 {
        match self.prefix {
            Some(p) => p.min(self.prompt),
            None if self.evaluated > 0 && self.evaluated < self.prompt => {
                self.prompt - self.evaluated
            }
            None => 0,
        }
    }

    /// Label tokens fed after the prompt: all but each label's first, which the prompt's
    /// own logits score (summed wide: the counts come from a cache file).
    fn label_tokens(&self) -> u64 {
        self.choices.map_or(0, |c| {
            c.iter().map(|t| u64::from(t.saturating_sub(1))).sum()
        })
    }
}

impl Work {
    /// A row computed by `model`.
    pub fn of_row(t: RowTokens<'_>, model: &KnownModel) -> Self {
        let prompt = (u64::from(t.prompt - t.prefix()) + t.label_tokens()) as f64;
        let generated = f64::from(t.generated);
        Self {
            prompt_tokens: prompt,
            generated_tokens: generated,
            flops: model
                .parameters
                .map(|n| 2.0 * n as f64 * (prompt + generated)),
            expected_s: model.rate.as_ref().map(|r| r.seconds(prompt, generated)),
        }
    }

    /// No model work (a neighbour vote, a probe on sentence embeddings).
    pub fn none() -> Self {
        Self {
            flops: Some(0.0),
            expected_s: Some(0.0),
            ..Self::default()
        }
    }

    pub fn tokens(&self) -> f64 {
        self.prompt_tokens + self.generated_tokens
    }

    /// The work of several rows or stages together.
    pub fn sum<'a>(parts: impl IntoIterator<Item = &'a Work>) -> Self {
        let mut out = Self::none();
        for w in parts {
            out += w;
        }
        out
    }

    /// The mean work of `n` rows whose total is `self`.
    pub fn per_row(&self, n: usize) -> Self {
        let d = n.max(1) as f64;
        Self {
            prompt_tokens: self.prompt_tokens / d,
            generated_tokens: self.generated_tokens / d,
            flops: self.flops.map(|f| f / d),
            expected_s: self.expected_s.map(|s| s / d),
        }
    }

    /// This work's compute against `other`'s, where both are known (compute weighs each
    /// model by its size, so works of different models compare).
    pub fn ratio(&self, other: &Work) -> Option<f64> {
        divided(self.flops, other.flops)
    }

    /// This work's expected time against `other`'s, where both are known.
    pub fn expected_ratio(&self, other: &Work) -> Option<f64> {
        divided(self.expected_s, other.expected_s)
    }

    /// GFLOP, as tables and sentences state compute.
    pub fn gflop(&self) -> Option<f64> {
        self.flops.map(|f| f / 1e9)
    }
}

/// Both work sums added; compute and expected time stay known only if both were.
impl std::ops::AddAssign<&Work> for Work {
    fn add_assign(&mut self, w: &Work) {
        self.prompt_tokens += w.prompt_tokens;
        self.generated_tokens += w.generated_tokens;
        self.flops = self.flops.zip(w.flops).map(|(a, b)| a + b);
        self.expected_s = self.expected_s.zip(w.expected_s).map(|(a, b)| a + b);
    }
}

/// `a / b` where both are known and `b` is positive.
fn divided(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// A row's compute for a sentence: "12.3 GFLOP a row" (tokens where a model's size is not
/// known), with the time expected on this machine where its engine rate was measured.
pub fn describe(w: &Work) -> String {
    let amount = match w.gflop() {
        Some(g) => format!("{} GFLOP a row", significant(g)),
        None => format!("{:.0} tokens a row", w.tokens()),
    };
    match w.expected_s {
        Some(s) if s > 0.0 => format!("{amount}, {} expected", seconds(s)),
        _ => amount,
    }
}

/// Three significant figures (whole numbers from 100 up), without an exponent.
pub fn significant(x: f64) -> String {
    if !x.is_finite() || x <= 0.0 {
        return format!("{x}");
    }
    let decimals = (2 - x.log10().floor() as i64).clamp(0, 12) as usize;
    format!("{x:.decimals$}")
}

/// A duration in the unit that reads best.
pub fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(parameters: Option<u64>, rate: bool) -> KnownModel {
        KnownModel {
            id: "m".into(),
            file: None,
            sha256: None,
            parameters,
            rate: rate.then(|| crate::rate::EngineRate {
                prompt_tok_s: 100.0,
                gen_tok_s: 10.0,
                model_sha256: String::new(),
                engine: String::new(),
                threads: 2,
                machine: String::new(),
                date_utc: String::new(),
                cpu_share: None,
            }),
        }
    }

    fn tokens(prefix: Option<u32>, evaluated: u32) -> RowTokens<'static> {
        RowTokens {
            prompt: 100,
            prefix,
            evaluated,
            choices: Some(&[1, 3]),
            generated: 4,
        }
    }

    #[test]
    fn a_row_pays_for_its_own_tokens_whatever_was_evaluated_before_it() {
        let m = model(Some(1_000), true);
        // The recorded prefix decides, not what the KV cache happened to hold.
        for evaluated in [0, 30, 100] {
            let w = Work::of_row(tokens(Some(30), evaluated), &m);
            assert_eq!(w.prompt_tokens, 70.0 + 2.0);
            assert_eq!(w.generated_tokens, 4.0);
            assert_eq!(w.flops, Some(2.0 * 1_000.0 * 76.0));
            assert_eq!(w.expected_s, Some(72.0 / 100.0 + 4.0 / 10.0));
        }
    }

    #[test]
    fn an_older_row_without_its_prefix_pays_for_what_it_did_not_reuse() {
        let m = model(None, false);
        assert_eq!(Work::of_row(tokens(None, 70), &m).prompt_tokens, 72.0);
        assert_eq!(Work::of_row(tokens(None, 100), &m).prompt_tokens, 102.0);
        assert_eq!(Work::of_row(tokens(None, 0), &m).prompt_tokens, 102.0);
        let w = Work::of_row(tokens(None, 70), &m);
        assert_eq!((w.flops, w.expected_s), (None, None));
        assert_eq!(describe(&w), "76 tokens a row");
    }

    #[test]
    fn sums_know_compute_only_when_every_part_does() {
        let known = Work::of_row(tokens(Some(30), 70), &model(Some(1_000), true));
        let unknown = Work::of_row(tokens(Some(30), 70), &model(None, false));
        let both = Work::sum([&known, &known]);
        assert_eq!(both.flops, Some(2.0 * known.flops.unwrap()));
        assert_eq!(both.per_row(2), known);
        assert_eq!(Work::sum([&known, &unknown]).flops, None);
        assert_eq!(both.ratio(&known), Some(2.0));
        assert_eq!(known.ratio(&unknown), None);
        assert_eq!(Work::sum([]), Work::none());
        assert_eq!(describe(&known), "0.000152 GFLOP a row, 1.12 s expected");
        assert_eq!(
            [1234.6, 98.76, 1.0, 0.5].map(significant),
            ["1235", "98.8", "1.00", "0.500"]
        );
    }
}
