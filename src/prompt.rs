//! Prompt templates: minijinja in strict mode, checked before any row is rendered, so an
//! undefined variable is an error naming the template file, line and variable.

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Serialize;

use crate::dataset::Row;
use crate::diag::{Diagnostic, SourceLoc};
use crate::spec::{LabelSpec, PromptSpec, TemplateSpec};

/// The rendered chat messages of one row under one prompt.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Messages {
    pub system: Option<String>,
    pub user: String,
    /// How much of the messages every row of the prompt shares.
    pub fixed: FixedPart,
}

/// The part of a row's messages that is the same for every row of its prompt: the template
/// text (and fixed examples) before the first value that depends on the row, in bytes of
/// `system` and of `user`. `user` is 0 unless the whole system message is fixed. It is part
/// of the row key because it decides which evaluation can be reused for the row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FixedPart {
    pub system: usize,
    pub user: usize,
}

impl Messages {
    /// Messages without a fixed part (nothing shared with other rows).
    pub fn new(system: Option<String>, user: String) -> Self {
        Self {
            system,
            user,
            fixed: FixedPart::default(),
        }
    }

    /// The messages cut to their fixed part.
    pub fn fixed_part(&self) -> Messages {
        Messages {
            system: self
                .system
                .as_ref()
                .map(|s| s[..self.fixed.system].to_string()),
            user: self.user[..self.fixed.user].to_string(),
            fixed: self.fixed,
        }
    }
}

/// Texts that no real row starts with: rendering a template with each shows where the
/// row-dependent part begins.
const PROBES: [&str; 2] = ["\u{E000}", "\u{E001}"];

/// Choices of the two probe renders (per-row choices only): the fixed part ends where the
/// choices first appear, if before the text.
const PROBE_CHOICES: [[&str; 2]; 2] = [["\u{E002}", "\u{E003}"], ["\u{E004}", "\u{E005}"]];

/// Byte length of the longest common prefix of `a` and `b`, on a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = 0;
    for ((i, x), y) in a.char_indices().zip(b.chars()) {
        if x != y {
            break;
        }
        n = i + x.len_utf8();
    }
    n
}

/// What every row of a prompt shares, found by rendering it with two probe texts.
#[derive(Debug, Clone)]
struct FixedProbe {
    system: Option<String>,
    /// Bytes of the system message that do not depend on the row.
    system_fixed: usize,
    user: String,
    user_fixed: usize,
}

impl FixedProbe {
    fn new(a: &Messages, b: &Messages) -> Self {
        let system_fixed = match (&a.system, &b.system) {
            (Some(x), Some(y)) => common_prefix(x, y),
            _ => 0,
        };
        Self {
            system: a.system.clone(),
            system_fixed,
            user: a.user.clone(),
            user_fixed: common_prefix(&a.user, &b.user),
        }
    }

    /// The fixed part of one row's messages.
    fn fixed_part(&self, m: &Messages) -> FixedPart {
        let system = match (&m.system, &self.system) {
            (Some(s), Some(probe)) => common_prefix(s, probe).min(self.system_fixed),
            _ => 0,
        };
        let system_whole = match (&m.system, &self.system) {
            (None, None) => true,
            (Some(s), Some(probe)) => system == s.len() && s.len() == probe.len(),
            _ => false,
        };
        let user = if system_whole {
            common_prefix(&m.user, &self.user).min(self.user_fixed)
        } else {
            0
        };
        FixedPart { system, user }
    }
}

/// A few-shot example as templates see it: `{{ ex.text }}`, `{{ ex.label }}`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    /// The label's name; with per-row choices, the correct choice's text.
    pub label: String,
    /// The example's own choices (`{{ ex.choices }}`), with per-row choices.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
}

impl Example {
    /// A labelled row as an example.
    pub fn of(row: &Row, label_names: &[String]) -> Example {
        let label = match row.choices.get(row.label) {
            Some(c) => c.clone(),
            None => label_names.get(row.label).cloned().unwrap_or_default(),
        };
        Example {
            text: row.text.clone(),
            label,
            choices: row.choices.clone(),
        }
    }

    pub fn from_rows(rows: Vec<Row>, label_names: &[String]) -> Vec<Example> {
        rows.iter().map(|r| Example::of(r, label_names)).collect()
    }
}

/// The few-shot examples a prompt shows.
#[derive(Debug, Clone)]
pub enum Shots {
    None,
    /// The same examples for every row.
    Fixed(Vec<Row>),
    /// `k` examples chosen for each row (retrieved); given to [`Prompts::render_with`].
    PerRow {
        k: usize,
    },
}

struct Compiled {
    id: String,
    system: Option<(String, TemplateSpec)>,
    user: (String, TemplateSpec),
    /// Fixed examples; `Some(empty)` never happens.
    examples: Option<Vec<Example>>,
    /// Examples chosen per row (`k` of them), instead of fixed ones.
    per_row: Option<usize>,
    /// `None` when the template cannot be rendered with the probe texts (no shared part).
    probe: Option<FixedProbe>,
    /// How much of a row's text the prompt keeps.
    budget: Option<crate::spec::TextBudget>,
}

/// All prompts of a spec, compiled and checked.
pub struct Prompts {
    env: Environment<'static>,
    compiled: Vec<Compiled>,
    labels: Vec<String>,
}

/// Variables every template may use.
const BASE_VARS: &[&str] = &["text", "labels"];

impl Prompts {
    /// Compile each prompt; `shots[i]` are the few-shot examples of prompt `i`.
    pub fn compile(
        prompts: &[PromptSpec],
        labels: &[LabelSpec],
        shots: Vec<Shots>,
        shape: crate::spec::TaskShape,
    ) -> Result<Self, Diagnostic> {
        let choices = shape == crate::spec::TaskShape::Choices;
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        let label_names: Vec<String> = labels.iter().map(|l| l.name.clone()).collect();
        let mut compiled = Vec::new();
        for (p, shots) in prompts.iter().zip(shots) {
            let (examples, per_row) = match shots {
                Shots::None => (None, None),
                Shots::Fixed(rows) => (Some(Example::from_rows(rows, &label_names)), None),
                Shots::PerRow { k } => (None, Some(k)),
            };
            let mut allowed: Vec<&str> = BASE_VARS.to_vec();
            if choices {
                allowed.push("choices");
            }
            if shape == crate::spec::TaskShape::Reference {
                // Its classes (`correct`, `incorrect`) are not answers a model should give.
                allowed.retain(|v| *v != "labels");
            }
            if examples.is_some() || per_row.is_some() {
                allowed.push("examples");
            }
            let mut add = |role: &str,
                           t: &TemplateSpec|
             -> Result<(String, TemplateSpec), Diagnostic> {
                let key = format!("{}/{role}", p.id);
                env.add_template_owned(key.clone(), t.source.clone())
                    .map_err(|e| template_error(t, &e))?;
                let tmpl = env.get_template(&key).expect("just added");
                let mut used: Vec<String> = tmpl.undeclared_variables(false).into_iter().collect();
                used.sort();
                for var in used {
                    if !allowed.contains(&var.as_str()) {
                        let hint = if var == "examples" {
                            " (`examples` needs `shots:` on this prompt)".to_string()
                        } else {
                            String::new()
                        };
                        return Err(undefined_variable(t, &var, &allowed, &hint));
                    }
                }
                Ok((key, t.clone()))
            };
            let system = match &p.system {
                Some(t) => Some(add("system", t)?),
                None => None,
            };
            let user = add("user", &p.user)?;
            let uses_text = std::iter::once(&user)
                .chain(system.as_ref())
                .any(|(key, _)| {
                    env.get_template(key)
                        .expect("just added")
                        .undeclared_variables(false)
                        .contains("text")
                });
            if !uses_text {
                // Every row would get the same prompt: the model never sees the text.
                let (loc, field) = template_loc(&p.user, None);
                let mut d = Diagnostic::new(
                    loc,
                    field,
                    format!(
                        "prompt `{}` never uses `{{{{ text }}}}`: every row would get the same prompt",
                        p.id
                    ),
                );
                if p.user.file.is_none() {
                    d.snippet = None;
                }
                return Err(d);
            }
            compiled.push(Compiled {
                budget: p.budget,
                id: p.id.clone(),
                system,
                user,
                examples,
                per_row,
                probe: None,
            });
        }
        let mut prompts = Self {
            env,
            compiled,
            labels: label_names,
        };
        for i in 0..prompts.compiled.len() {
            // Retrieved examples depend on the row too: the probes bring their own.
            let probe_examples = |text: &str, label: usize| {
                prompts.compiled[i].per_row.map(|k| {
                    vec![
                        Example {
                            text: text.to_string(),
                            label: prompts.labels[label % prompts.labels.len()].clone(),
                            choices: Vec::new(),
                        };
                        k
                    ]
                })
            };
            let (ea, eb) = (probe_examples(PROBES[0], 0), probe_examples(PROBES[1], 1));
            let probe_choices = |j: usize| -> Vec<String> {
                if choices {
                    PROBE_CHOICES[j].map(String::from).to_vec()
                } else {
                    Vec::new()
                }
            };
            let a = prompts.render_text(i, PROBES[0], &probe_choices(0), ea.as_deref());
            let b = prompts.render_text(i, PROBES[1], &probe_choices(1), eb.as_deref());
            prompts.compiled[i].probe = match (a, b) {
                (Ok(a), Ok(b)) => Some(FixedProbe::new(&a, &b)),
                _ => None,
            };
        }
        Ok(prompts)
    }

    pub fn len(&self) -> usize {
        self.compiled.len()
    }

    pub fn is_empty(&self) -> bool {
        self.compiled.is_empty()
    }

    pub fn id(&self, prompt: usize) -> &str {
        &self.compiled[prompt].id
    }

    /// The token budget a row's text is cut to in this prompt (`None`: kept whole).
    pub fn budget(&self, prompt: usize) -> Option<crate::spec::TextBudget> {
        self.compiled[prompt].budget
    }

    pub fn examples(&self, prompt: usize) -> Option<&[Example]> {
        self.compiled[prompt].examples.as_deref()
    }

    /// The number of examples chosen per row, for prompts with retrieved examples.
    pub fn per_row(&self, prompt: usize) -> Option<usize> {
        self.compiled[prompt].per_row
    }

    /// The label names templates see.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Render the messages of prompt `prompt` for a row's `text` (and its own choices, with
    /// per-row choices).
    pub fn render(
        &self,
        prompt: usize,
        text: &str,
        choices: &[String],
    ) -> Result<Messages, Diagnostic> {
        self.render_with(prompt, text, choices, None)
    }

    /// Render with this row's own examples (prompts whose examples are chosen per row).
    pub fn render_with(
        &self,
        prompt: usize,
        text: &str,
        choices: &[String],
        examples: Option<&[Example]>,
    ) -> Result<Messages, Diagnostic> {
        let mut m = self.render_text(prompt, text, choices, examples)?;
        if let Some(probe) = &self.compiled[prompt].probe {
            m.fixed = probe.fixed_part(&m);
        }
        Ok(m)
    }

    fn render_text(
        &self,
        prompt: usize,
        text: &str,
        choices: &[String],
        row_examples: Option<&[Example]>,
    ) -> Result<Messages, Diagnostic> {
        let c = &self.compiled[prompt];
        let examples = row_examples.or(c.examples.as_deref());
        let ctx = minijinja::context! {
            text => text,
            labels => &self.labels,
            choices => choices.to_vec(),
            examples => minijinja::Value::from(minijinja::value::Serde(&examples)),
        };
        let render = |(key, spec): &(String, TemplateSpec)| -> Result<String, Diagnostic> {
            self.env
                .get_template(key)
                .and_then(|t| t.render(&ctx))
                .map_err(|e| template_error(spec, &e))
        };
        Ok(Messages::new(
            c.system.as_ref().map(render).transpose()?,
            render(&c.user)?,
        ))
    }
}

/// Where a line of a template is: the template file, or the spec field of an inline one.
fn template_loc(t: &TemplateSpec, line: Option<usize>) -> (SourceLoc, String) {
    match (&t.file, line) {
        (Some(f), Some(l)) => (SourceLoc::new(f, l as u64, 0), t.at.field.clone()),
        (Some(f), None) => (SourceLoc::file_only(f), t.at.field.clone()),
        (None, Some(l)) => (
            t.at.loc.clone(),
            format!("{} (inline template, line {l})", t.at.field),
        ),
        (None, None) => (t.at.loc.clone(), t.at.field.clone()),
    }
}

fn template_error(t: &TemplateSpec, e: &minijinja::Error) -> Diagnostic {
    let (loc, field) = template_loc(t, e.line());
    let mut msg = e
        .detail()
        .map(str::to_string)
        .unwrap_or_else(|| e.kind().to_string());
    if e.kind() == minijinja::ErrorKind::UndefinedError {
        msg = format!("undefined value in template: {msg}");
    } else {
        msg = format!("template error: {msg}");
    }
    let mut d = Diagnostic::new(loc, field, msg);
    if t.file.is_none() {
        d.snippet = None;
    }
    d
}

fn undefined_variable(t: &TemplateSpec, var: &str, allowed: &[&str], hint: &str) -> Diagnostic {
    // The first line that mentions the variable inside a tag.
    let found = t
        .source
        .lines()
        .enumerate()
        .find_map(|(i, line)| find_word(line, var).map(|col| (i + 1, col + 1)));
    let (mut loc, field) = template_loc(t, found.map(|(l, _)| l));
    if let (Some((_, col)), Some(_)) = (found, &t.file) {
        loc.column = col as u64;
    }
    let mut d = Diagnostic::new(
        loc,
        field,
        format!(
            "undefined template variable `{var}`{hint}; available: {}",
            allowed.join(", ")
        ),
    );
    if t.file.is_none() {
        d.snippet = None;
    }
    d
}

fn find_word(line: &str, word: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut from = 0;
    while let Some(pos) = line[from..].find(word) {
        let start = from + pos;
        let end = start + word.len();
        let before_ok = start == 0 || !is_ident(bytes[start - 1]);
        let after_ok = end >= bytes.len() || !is_ident(bytes[end]);
        if before_ok && after_ok {
            return Some(start);
        }
        from = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Located;

    fn template(source: &str) -> TemplateSpec {
        TemplateSpec {
            name: "t".into(),
            source: source.into(),
            at: Located {
                value: (),
                loc: SourceLoc::file_only("spec.yaml"),
                field: "prompts[0].user".into(),
            },
            file: None,
        }
    }

    fn prompts(system: Option<&str>, user: &str, examples: Option<Vec<Row>>) -> Prompts {
        let shots = match examples {
            Some(rows) => Shots::Fixed(rows),
            None => Shots::None,
        };
        let labels = [("0", "negative"), ("1", "positive")].map(|(v, n)| LabelSpec {
            name: n.into(),
            values: vec![v.into()],
        });
        let spec = PromptSpec {
            id: "p".into(),
            system: system.map(template),
            user: template(user),
            shots: None,
            budget: None,
        };
        Prompts::compile(
            &[spec],
            &labels,
            vec![shots],
            crate::spec::TaskShape::Labels,
        )
        .unwrap()
    }

    #[test]
    fn the_fixed_part_ends_where_the_row_begins() {
        let p = prompts(Some("You judge texts."), "Text: {{ text }}\nAnswer.", None);
        let m = p.render(0, "Great film.", &[]).unwrap();
        assert_eq!(m.fixed.system, "You judge texts.".len());
        assert_eq!(&m.user[..m.fixed.user], "Text: ");
        let f = m.fixed_part();
        assert_eq!(f.system.as_deref(), Some("You judge texts."));
        assert_eq!(f.user, "Text: ");
        // Every row of the prompt shares it.
        assert_eq!(p.render(0, "Awful.", &[]).unwrap().fixed, m.fixed);
    }

    #[test]
    fn fixed_examples_belong_to_the_fixed_part() {
        let rows = vec![Row {
            index: 0,
            id: "e".into(),
            text: "An example text.".into(),
            label: 1,
            choices: Vec::new(),
            reference: None,
        }];
        let p = prompts(
            None,
            "{% for e in examples %}{{ e.text }} -> {{ e.label }}\n{% endfor %}Text: {{ text }}",
            Some(rows),
        );
        let m = p.render(0, "New text.", &[]).unwrap();
        assert_eq!(
            &m.user[..m.fixed.user],
            "An example text. -> positive\nText: "
        );
    }

    #[test]
    fn a_row_dependent_system_message_leaves_no_fixed_user_part() {
        let p = prompts(
            Some("Judge: {{ text }}"),
            "Answer {{ labels | join(' or ') }}.",
            None,
        );
        let m = p.render(0, "Fine.", &[]).unwrap();
        assert_eq!(m.fixed.system, "Judge: ".len());
        assert_eq!(m.fixed.user, 0);
    }

    #[test]
    fn a_row_that_starts_like_the_probe_still_gets_the_template_prefix_only() {
        let p = prompts(None, "{{ text }} is the text.", None);
        let m = p.render(0, "Anything", &[]).unwrap();
        assert_eq!(m.fixed.user, 0);
        let q = prompts(None, "R: {{ text }}", None);
        assert_eq!(q.render(0, "R: nested", &[]).unwrap().fixed.user, 3);
    }
}
