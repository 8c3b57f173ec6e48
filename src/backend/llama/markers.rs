//! Texts are data. A chat prompt is the model's chat template around the messages; the
//! template's own markers (`<|im_start|>`, `<|im_end|>`, ...) are control tokens, and
//! nothing inside a message may become one: a text that contains `<|im_end|>` must not
//! close the user's turn. llama.cpp parses control tokens in a whole string or in none, so
//! the prompt is tokenized in pieces: the marker strings that fall inside a message are
//! tokenized as plain text, the rest with control tokens parsed. A prompt whose messages
//! hold no marker is one piece: tokenized exactly as before (and its cached rows stay
//! valid). Where a message does hold one, the text right at the marker's edges may be
//! tokenized a little differently from an untouched text (each piece starts afresh: a
//! SentencePiece vocabulary adds its space prefix, a BPE one splits at the edge); such rows
//! have keys of their own (`key::may_spell_a_chat_marker`).
//!
//! Which tokens are control tokens is the vocabulary's word: those llama.cpp matches only
//! when asked to parse special tokens (attribute CONTROL or UNKNOWN). A vocabulary's
//! user-defined tokens are matched in any text, as the model was trained.

use std::ops::Range;

use aho_corasick::{AhoCorasick, MatchKind};
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token_type::LlamaTokenAttr;
use llama_cpp_2::vocab::LlamaVocab;

use crate::backend::{BackendError, ChatPrompt};
use crate::prompt::Messages;

/// The model's control-token strings, to find them in message texts.
pub(super) struct Markers {
    finder: AhoCorasick,
}

/// Placeholders that stand for the messages while the template is applied once more, to
/// find where the messages sit in the prompt (private-use characters no tokenizer merges
/// with their neighbours in a way that matters: only their position is used).
const SYSTEM_PLACEHOLDER: &str = "\u{F0001}";
const USER_PLACEHOLDER: &str = "\u{F0002}";

/// Whether `token` is a control token: one llama.cpp matches in a text only when asked to
/// parse special tokens.
pub(super) fn is_control(vocab: &LlamaVocab<'_>, token: LlamaToken) -> bool {
    let attr = vocab.attr(token);
    attr.contains(LlamaTokenAttr::Control) || attr.contains(LlamaTokenAttr::Unknown)
}

impl Markers {
    /// The control tokens of `model`'s vocabulary; `None` when it has none.
    pub(super) fn of(model: &LlamaModel) -> Option<Self> {
        let vocab = model.vocab();
        let mut strings: Vec<String> = vocab
            .tokens()
            .filter(|&t| is_control(&vocab, t))
            .filter_map(|t| vocab.text(t).map(|s| s.to_string_lossy().into_owned()))
            .filter(|s| !s.is_empty())
            .collect();
        strings.sort();
        strings.dedup();
        if strings.is_empty() {
            return None;
        }
        let finder = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&strings)
            .ok()?;
        Some(Self { finder })
    }

    /// Byte ranges of `text` that spell a control token.
    fn find(&self, text: &str) -> Vec<Range<usize>> {
        self.finder.find_iter(text).map(|m| m.range()).collect()
    }
}

/// The byte ranges of `prompt` (the template applied to `m`) that must be tokenized as
/// plain text: the control-token strings inside the messages. `apply` is the chat
/// template. Errors only when a message holds a marker and the template rewrites the
/// messages so that they cannot be found in the prompt.
pub(super) fn plain_ranges(
    markers: Option<&Markers>,
    m: &Messages,
    prompt: &str,
    apply: impl Fn(&Messages) -> Result<String, BackendError>,
) -> Result<Vec<Range<usize>>, BackendError> {
    let Some(markers) = markers else {
        return Ok(Vec::new());
    };
    let contents: Vec<&str> = m
        .system
        .iter()
        .map(String::as_str)
        .chain([m.user.as_str()])
        .collect();
    if contents.iter().all(|c| markers.find(c).is_empty()) {
        return Ok(Vec::new());
    }
    let Some(spans) = message_spans(m, prompt, apply)? else {
        let marker = contents
            .iter()
            .flat_map(|c| markers.find(c).into_iter().map(move |r| &c[r]))
            .next()
            .unwrap_or_default();
        return Err(BackendError::Job(format!(
            "the text contains the chat marker `{marker}`, and this model's chat template rewrites messages, so it cannot be kept as plain text"
        )));
    };
    let mut out = Vec::new();
    for span in spans {
        out.extend(
            markers
                .find(&prompt[span.clone()])
                .into_iter()
                .map(|r| span.start + r.start..span.start + r.end),
        );
    }
    Ok(out)
}

/// Where each message's content sits in `prompt`, found by applying the template to
/// placeholders and putting the contents back (each as it is, or trimmed of ASCII
/// whitespace, as llama.cpp's templates for some models do); `None` when no way gives the
/// prompt back.
fn message_spans(
    m: &Messages,
    prompt: &str,
    apply: impl Fn(&Messages) -> Result<String, BackendError>,
) -> Result<Option<Vec<Range<usize>>>, BackendError> {
    let placeholders = Messages::new(
        m.system.as_ref().map(|_| SYSTEM_PLACEHOLDER.to_string()),
        USER_PLACEHOLDER.to_string(),
    );
    let skeleton = apply(&placeholders)?;
    let content = |s: &str, trim: bool| {
        if trim {
            s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b')
                .to_string()
        } else {
            s.to_string()
        }
    };
    for (trim_user, trim_system) in [(false, false), (true, true), (true, false), (false, true)] {
        let mut parts: Vec<(&str, String)> = vec![(USER_PLACEHOLDER, content(&m.user, trim_user))];
        if let Some(s) = &m.system {
            parts.push((SYSTEM_PLACEHOLDER, content(s, trim_system)));
        }
        if let Some(spans) = fill(&skeleton, &parts)
            && spans.0 == prompt
        {
            return Ok(Some(spans.1));
        }
    }
    Ok(None)
}

/// `skeleton` with each placeholder (which must occur exactly once) replaced by its text;
/// the result and the spans of the texts in it.
fn fill(skeleton: &str, parts: &[(&str, String)]) -> Option<(String, Vec<Range<usize>>)> {
    let mut at: Vec<(usize, &str, &str)> = Vec::new();
    for (placeholder, text) in parts {
        let mut found = skeleton.match_indices(placeholder);
        let (pos, _) = found.next()?;
        if found.next().is_some() {
            return None;
        }
        at.push((pos, placeholder, text));
    }
    at.sort_by_key(|(pos, _, _)| *pos);
    let mut out =
        String::with_capacity(skeleton.len() + parts.iter().map(|p| p.1.len()).sum::<usize>());
    let mut spans = Vec::new();
    let mut from = 0;
    for (pos, placeholder, text) in at {
        out.push_str(&skeleton[from..pos]);
        spans.push(out.len()..out.len() + text.len());
        out.push_str(text);
        from = pos + placeholder.len();
    }
    out.push_str(&skeleton[from..]);
    Some((out, spans))
}

/// A piece of a prompt for the tokenizer.
pub(super) struct Piece<'a> {
    pub(super) text: &'a str,
    /// Whether control-token strings in it are control tokens (the template's text) or
    /// plain text (a marker inside a message).
    pub(super) parse_control: bool,
}

/// The prompt's pieces for the tokenizer, in order.
pub(super) fn pieces(prompt: &ChatPrompt) -> Vec<Piece<'_>> {
    let text = prompt.text.as_str();
    let piece = |r: Range<usize>, parse_control| Piece {
        text: &text[r],
        parse_control,
    };
    let mut out = Vec::new();
    let mut from = 0;
    for r in prompt.plain() {
        if r.start > from {
            out.push(piece(from..r.start, true));
        }
        out.push(piece(r.clone(), false));
        from = r.end;
    }
    if from < text.len() || out.is_empty() {
        out.push(piece(from..text.len(), true));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_plain_ranges_are_tokenized_without_control_tokens() {
        let text = "<s>user: a<e>b<e></s>".to_string();
        let prompt = ChatPrompt::new(text, "").with_plain(vec![10..13, 14..17]);
        let got: Vec<(&str, bool)> = pieces(&prompt)
            .iter()
            .map(|p| (p.text, p.parse_control))
            .collect();
        assert_eq!(
            got,
            vec![
                ("<s>user: a", true),
                ("<e>", false),
                ("b", true),
                ("<e>", false),
                ("</s>", true)
            ]
        );
        // No plain range: the whole prompt in one piece, as a single call tokenizes it.
        let whole = ChatPrompt::new("<s>x</s>".into(), "");
        assert_eq!(pieces(&whole).len(), 1);
    }

    #[test]
    fn fill_puts_the_texts_back_and_says_where() {
        let (out, spans) = fill(
            "<s>A\u{F0001}B\u{F0002}C",
            &[("\u{F0002}", "user".into()), ("\u{F0001}", "sys".into())],
        )
        .unwrap();
        assert_eq!(out, "<s>AsysBuserC");
        assert_eq!(&out[spans[0].clone()], "sys");
        assert_eq!(&out[spans[1].clone()], "user");
        // A placeholder missing or repeated: no answer.
        assert!(fill("A", &[("\u{F0002}", "x".into())]).is_none());
        assert!(fill("\u{F0002}\u{F0002}", &[("\u{F0002}", "x".into())]).is_none());
    }
}
