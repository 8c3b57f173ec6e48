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
}

/// A few-shot example as templates see it: `{{ ex.text }}`, `{{ ex.label }}`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    pub label: String,
}

struct Compiled {
    id: String,
    system: Option<(String, TemplateSpec)>,
    user: (String, TemplateSpec),
    examples: Option<Vec<Example>>,
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
    /// Compile each prompt; `examples[i]` are the few-shot rows of prompt `i`, if any.
    pub fn compile(
        prompts: &[PromptSpec],
        labels: &[LabelSpec],
        examples: Vec<Option<Vec<Row>>>,
    ) -> Result<Self, Diagnostic> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        let label_names: Vec<String> = labels.iter().map(|l| l.name.clone()).collect();
        let mut compiled = Vec::new();
        for (p, ex) in prompts.iter().zip(examples) {
            let examples = ex.map(|rows| {
                rows.into_iter()
                    .map(|r| Example {
                        text: r.text,
                        label: label_names[r.label].clone(),
                    })
                    .collect::<Vec<_>>()
            });
            let mut allowed: Vec<&str> = BASE_VARS.to_vec();
            if examples.is_some() {
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
            compiled.push(Compiled {
                id: p.id.clone(),
                system,
                user,
                examples,
            });
        }
        Ok(Self {
            env,
            compiled,
            labels: label_names,
        })
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

    pub fn examples(&self, prompt: usize) -> Option<&[Example]> {
        self.compiled[prompt].examples.as_deref()
    }

    /// Render the messages of prompt `prompt` for a review `text`.
    pub fn render(&self, prompt: usize, text: &str) -> Result<Messages, Diagnostic> {
        let c = &self.compiled[prompt];
        let ctx = minijinja::context! {
            text => text,
            labels => &self.labels,
            examples => minijinja::Value::from(minijinja::value::Serde(&c.examples)),
        };
        let render = |(key, spec): &(String, TemplateSpec)| -> Result<String, Diagnostic> {
            self.env
                .get_template(key)
                .and_then(|t| t.render(&ctx))
                .map_err(|e| template_error(spec, &e))
        };
        Ok(Messages {
            system: c.system.as_ref().map(render).transpose()?,
            user: render(&c.user)?,
        })
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
