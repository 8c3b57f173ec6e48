//! Free answers scored against a reference: exact match, containment, a regular
//! expression's capture, or a number within a tolerance. Scoring runs on the cached raw
//! text, like answer parsing, so changing a score never runs a model again.
//!
//! Normalisation (exact match, containment, and a regex's capture): lower case, punctuation
//! removed, the articles "a", "an" and "the" dropped, and runs of whitespace made one space
//! (SQuAD's answer normalisation). Numbers: the last number in the answer (commas between
//! digit groups allowed, e.g. `1,234.5`) against the reference read as a number.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The classes of a reference-scored task: an answer matches its reference or not.
pub const OUTCOMES: [&str; 2] = ["correct", "incorrect"];

/// How a generated answer is compared with its row's reference answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Score {
    /// The normalised answer equals the normalised reference.
    ExactMatch,
    /// The normalised reference appears in the normalised answer, as whole words.
    Contains,
    /// The pattern's first capture group (or its whole match) in the answer, normalised,
    /// equals the normalised reference. No match: an invalid answer.
    Regex(Pattern),
    /// The answer's last number is within `tolerance` of the reference's. No number: an
    /// invalid answer.
    Numeric { tolerance: f64 },
}

/// A regular expression, compiled once when the spec is read (a score runs on every row);
/// equal and serialized as its text.
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    pub fn new(pattern: &str) -> Result<Self, ScoreError> {
        regex::Regex::new(pattern)
            .map(Pattern)
            .map_err(|e| ScoreError::Pattern(e.to_string()))
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

/// Why a score from a spec cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreError {
    #[error("the pattern does not compile: {0}")]
    Pattern(String),
    #[error("the tolerance must be a number ≥ 0, not {0}")]
    Tolerance(f64),
}

/// An answer scored: what was compared (`None`: nothing to compare, an invalid answer) and
/// whether it matched.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub extracted: Option<String>,
    pub correct: bool,
}

impl Score {
    /// Check what a spec cannot express: a tolerance that is a finite number ≥ 0 (a pattern
    /// is checked when it is compiled).
    pub fn check(&self) -> Result<(), ScoreError> {
        match self {
            Score::Numeric { tolerance } if !(tolerance.is_finite() && *tolerance >= 0.0) => {
                Err(ScoreError::Tolerance(*tolerance))
            }
            _ => Ok(()),
        }
    }

    /// Score `answer` against `reference`.
    pub fn apply(&self, answer: &str, reference: &str) -> Scored {
        match self {
            Score::ExactMatch => {
                let a = normalise(answer);
                Scored {
                    correct: a == normalise(reference),
                    extracted: Some(a),
                }
            }
            Score::Contains => {
                let (a, r) = (normalise(answer), normalise(reference));
                let padded = format!(" {a} ");
                Scored {
                    correct: !r.is_empty() && padded.contains(&format!(" {r} ")),
                    extracted: Some(a),
                }
            }
            Score::Regex(Pattern(re)) => {
                let found = re.captures(answer).map(|c| {
                    c.get(1)
                        .or_else(|| c.get(0))
                        .map_or("", |m| m.as_str())
                        .to_string()
                });
                match found {
                    Some(x) => Scored {
                        correct: normalise(&x) == normalise(reference),
                        extracted: Some(x),
                    },
                    None => Scored {
                        extracted: None,
                        correct: false,
                    },
                }
            }
            Score::Numeric { tolerance } => {
                let got = last_number(answer);
                let want = last_number(reference);
                Scored {
                    correct: matches!((got, want), (Some(g), Some(w)) if (g - w).abs() <= *tolerance),
                    extracted: got.map(|g| g.to_string()),
                }
            }
        }
    }
}

/// Lower case, punctuation removed, articles dropped, whitespace collapsed.
pub fn normalise(text: &str) -> String {
    let lower = text.to_lowercase();
    let no_punct: String = lower
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last number in `text`: an optional minus sign, digits with optional `,` between
/// groups of three, an optional fraction.
fn last_number(text: &str) -> Option<f64> {
    static NUMBER: std::sync::LazyLock<Option<regex::Regex>> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?").ok()
    });
    NUMBER
        .as_ref()?
        .find_iter(text)
        .last()
        .and_then(|m| m.as_str().replace(',', "").parse().ok())
}

impl<'de> Deserialize<'de> for Score {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Score;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "`exact_match`, `contains`, `{regex: PATTERN}` or `{numeric: {tolerance: T}}`",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Score, E> {
                match v {
                    "exact_match" => Ok(Score::ExactMatch),
                    "contains" => Ok(Score::Contains),
                    "numeric" => Ok(Score::Numeric { tolerance: 0.0 }),
                    other => Err(de::Error::unknown_variant(
                        other,
                        &["exact_match", "contains", "regex", "numeric"],
                    )),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Score, A::Error> {
                let Some(k) = map.next_key::<String>()? else {
                    return Err(de::Error::custom("an empty map names no score"));
                };
                let score = match k.as_str() {
                    "regex" => {
                        let p: String = map.next_value()?;
                        Score::Regex(Pattern::new(&p).map_err(de::Error::custom)?)
                    }
                    "numeric" => {
                        let n: Numeric = map.next_value()?;
                        Score::Numeric {
                            tolerance: n.tolerance,
                        }
                    }
                    other => return Err(de::Error::unknown_field(other, &["regex", "numeric"])),
                };
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom("name one score"));
                }
                score.check().map_err(de::Error::custom)?;
                Ok(score)
            }
        }
        d.deserialize_any(V)
    }
}

impl schemars::JsonSchema for Score {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Score".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "How a generated answer is scored against its row's reference: `exact_match`, `contains`, `{regex: PATTERN}` (its first group, else its match) or `{numeric: {tolerance: T}}` (the answer's last number).",
            "oneOf": [
                {"type": "string", "enum": ["exact_match", "contains", "numeric"]},
                {"type": "object", "properties": {"regex": {"type": "string"}}, "required": ["regex"], "additionalProperties": false},
                {"type": "object", "properties": {"numeric": {"type": "object", "properties": {"tolerance": {"type": "number", "minimum": 0}}, "additionalProperties": false}},
                 "required": ["numeric"], "additionalProperties": false}
            ]
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Numeric {
    #[serde(default)]
    tolerance: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_match_normalises_case_punctuation_articles_and_space() {
        let s = Score::ExactMatch;
        assert!(s.apply("  The Eiffel  Tower. ", "eiffel tower").correct);
        assert!(!s.apply("the tower", "eiffel tower").correct);
        assert_eq!(normalise("A cat, an owl & THE dog!"), "cat owl dog");
    }

    #[test]
    fn contains_needs_whole_words() {
        let s = Score::Contains;
        assert!(s.apply("I think it is Paris, France.", "paris").correct);
        assert!(!s.apply("Parisian food", "Paris").correct);
        assert!(!s.apply("anything", "").correct);
    }

    #[test]
    fn regex_compares_the_first_capture_and_no_match_is_invalid() {
        let s = Score::Regex(Pattern::new(r"(?i)answer:\s*(\w+)").unwrap());
        let hit = s.apply("Reasoning... Answer: Blue", "blue");
        assert!(hit.correct);
        assert_eq!(hit.extracted.as_deref(), Some("Blue"));
        let miss = s.apply("no idea", "blue");
        assert_eq!(miss.extracted, None);
        assert!(!miss.correct);
        assert!(Pattern::new("(").is_err());
    }

    #[test]
    fn numeric_reads_the_last_number_within_the_tolerance() {
        let s = Score::Numeric { tolerance: 0.01 };
        assert!(s.apply("3 apples and 4 pears make 7.001", "7").correct);
        assert!(s.apply("The total is 1,234.5 dollars", "1234.5").correct);
        assert!(!s.apply("It is 8", "7").correct);
        assert!(s.apply("-3", "-3.0").correct);
        assert_eq!(s.apply("none", "7").extracted, None);
        assert!(Score::Numeric { tolerance: -1.0 }.check().is_err());
    }

    #[test]
    fn scores_read_from_yaml() {
        let read = |y: &str| serde_saphyr::from_str::<Score>(y);
        assert_eq!(read("exact_match").unwrap(), Score::ExactMatch);
        assert_eq!(
            read("{regex: 'x(\\d)'}").unwrap(),
            Score::Regex(Pattern::new("x(\\d)").unwrap())
        );
        assert_eq!(
            read("{numeric: {tolerance: 0.5}}").unwrap(),
            Score::Numeric { tolerance: 0.5 }
        );
        assert!(read("fuzzy").is_err());
        assert!(read("{regex: '('}").is_err());
    }
}
