//! Turning raw model output into a label: answer parsing for generation, argmax for
//! log-likelihood. Parsing runs on cached raw text, so a parser change never re-runs a model.
//! Chat markers in an answer are ordinary text here: generation ends at the model's
//! end-of-generation token and renders other control tokens as nothing, so a marker's
//! characters in an answer were written by the model as text.

use crate::spec::ParseRule;

/// The label a generated answer names, or `None` when it names none (an invalid answer).
pub fn parse_answer(text: &str, labels: &[String], rule: ParseRule) -> Option<usize> {
    let lower = text.to_lowercase();
    match rule {
        ParseRule::Exact => {
            let trimmed =
                lower.trim_matches(|c: char| c.is_whitespace() || c.is_ascii_punctuation());
            labels.iter().position(|l| l.to_lowercase() == trimmed)
        }
        ParseRule::FirstLabel => labels
            .iter()
            .enumerate()
            .filter_map(|(i, l)| first_word_match(&lower, &l.to_lowercase()).map(|pos| (pos, i)))
            .min()
            .map(|(_, i)| i),
    }
}

/// The choice a generated answer names among a row's own choices: by its text (as
/// [`parse_answer`] matches labels), else by its letter (A, B, C, ...) standing alone at the
/// start of the answer (`B`, `(B)`, `B) Paris`, `B. Paris`) or after "answer", "option" or
/// "choice" (`The answer is B`). `None`: it names none.
pub fn parse_choice(text: &str, choices: &[String], rule: ParseRule) -> Option<usize> {
    parse_answer(text, choices, rule).or_else(|| choice_letter(text, choices.len()))
}

fn choice_letter(text: &str, n: usize) -> Option<usize> {
    let words: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let letter = |w: &str| -> Option<usize> {
        let mut chars = w.chars();
        let c = chars.next()?;
        (chars.next().is_none() && c.is_ascii_uppercase())
            .then(|| (c as u8 - b'A') as usize)
            .filter(|i| *i < n)
    };
    if let Some(i) = words.first().and_then(|w| letter(w)) {
        return Some(i);
    }
    words.windows(2).find_map(|w| {
        let lead = w[0].to_lowercase();
        ["answer", "option", "choice", "is"]
            .contains(&lead.as_str())
            .then(|| letter(w[1]))
            .flatten()
    })
}

/// Byte offset of the first whole-word occurrence of `word` in `text`.
fn first_word_match(text: &str, word: &str) -> Option<usize> {
    if word.is_empty() {
        return None;
    }
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut from = 0;
    while let Some(p) = text[from..].find(word) {
        let start = from + p;
        let end = start + word.len();
        if !is_word(text[..start].chars().next_back()) && !is_word(text[end..].chars().next()) {
            return Some(start);
        }
        from = start + word.chars().next().map_or(1, char::len_utf8);
    }
    None
}

/// Log-probs normalised over the labels (a log-softmax).
pub fn normalise(lp: &[f64]) -> Vec<f64> {
    let max = lp.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z = max + lp.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    lp.iter().map(|x| x - z).collect()
}

/// Index of the largest log-probability (the first on ties); `None` if any is NaN.
pub fn argmax(logprobs: &[f64]) -> Option<usize> {
    if logprobs.is_empty() || logprobs.iter().any(|x| x.is_nan()) {
        return None;
    }
    let mut best = 0;
    for (i, &v) in logprobs.iter().enumerate() {
        if v > logprobs[best] {
            best = i;
        }
    }
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_choice_is_named_by_its_text_or_its_letter() {
        let c: Vec<String> = ["Paris", "Rome", "Berlin"].map(String::from).to_vec();
        let rule = ParseRule::FirstLabel;
        assert_eq!(parse_choice("It is Rome.", &c, rule), Some(1));
        assert_eq!(parse_choice("B", &c, rule), Some(1));
        assert_eq!(parse_choice("(C)", &c, rule), Some(2));
        assert_eq!(parse_choice("A) the first", &c, rule), Some(0));
        assert_eq!(parse_choice("The answer is C.", &c, rule), Some(2));
        // A letter past the row's choices, a lowercase article, or nothing at all: none.
        assert_eq!(parse_choice("D", &c, rule), None);
        assert_eq!(parse_choice("a city in Europe", &c, rule), None);
        assert_eq!(parse_choice("I do not know", &c, rule), None);
    }

    fn labels() -> Vec<String> {
        vec!["negative".into(), "positive".into()]
    }

    /// Generation stops at an end-of-generation token and renders other control tokens as
    /// nothing, so a marker can reach the parser only as characters the model wrote: it is
    /// ordinary text there, never a boundary the parser trusts.
    #[test]
    fn marker_text_in_an_answer_is_ordinary_text() {
        let l = labels();
        let answer = "<|im_start|>assistant\nnegative<|im_end|> positive";
        assert_eq!(parse_answer(answer, &l, ParseRule::FirstLabel), Some(0));
        assert_eq!(parse_answer(answer, &l, ParseRule::Exact), None);
        assert_eq!(
            parse_answer("positive<|im_end|>", &l, ParseRule::FirstLabel),
            Some(1)
        );
        assert_eq!(parse_answer("<|im_end|>", &l, ParseRule::FirstLabel), None);
    }

    #[test]
    fn first_label_finds_whole_words_case_insensitively() {
        let l = labels();
        assert_eq!(
            parse_answer("Positive.", &l, ParseRule::FirstLabel),
            Some(1)
        );
        assert_eq!(
            parse_answer("Sentiment: NEGATIVE", &l, ParseRule::FirstLabel),
            Some(0)
        );
        assert_eq!(
            parse_answer("positive, not negative", &l, ParseRule::FirstLabel),
            Some(1)
        );
        assert_eq!(
            parse_answer("it's nonpositive", &l, ParseRule::FirstLabel),
            None
        );
        assert_eq!(
            parse_answer("I cannot tell", &l, ParseRule::FirstLabel),
            None
        );
        assert_eq!(parse_answer("", &l, ParseRule::FirstLabel), None);
    }

    #[test]
    fn exact_needs_the_whole_answer() {
        let l = labels();
        assert_eq!(parse_answer(" positive!\n", &l, ParseRule::Exact), Some(1));
        assert_eq!(
            parse_answer("The answer is positive", &l, ParseRule::Exact),
            None
        );
    }

    #[test]
    fn argmax_takes_first_on_ties_and_rejects_nan() {
        assert_eq!(argmax(&[-1.0, -0.5, -0.5]), Some(1));
        assert_eq!(argmax(&[-1.0, f64::NAN]), None);
        assert_eq!(argmax(&[]), None);
    }
}
