//! The experiment spec: parse the YAML (rejecting unknown and duplicate keys), resolve
//! relative paths against the spec file's directory, and validate it into [`Spec`].

mod raw;

use std::path::{Path, PathBuf};

pub use raw::{MethodKind, ParseRule, ShotStrategy};
use raw::{OneOrMany, RawSpec, TemplateRef};
use serde_saphyr::Spanned;

use crate::diag::{Diagnostic, SourceLoc};

/// A value from the spec with the place it was written, for errors found after parsing.
#[derive(Debug, Clone)]
pub struct Located<T> {
    pub value: T,
    pub loc: SourceLoc,
    pub field: String,
}

impl<T> Located<T> {
    pub fn error(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(self.loc.clone(), self.field.clone(), message)
    }
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub path: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub dataset: DatasetSpec,
    pub models: Vec<ModelSpec>,
    pub prompts: Vec<PromptSpec>,
    pub methods: Vec<MethodSpec>,
    pub sampling: SamplingGrid,
    pub report: ReportSpec,
    pub compare: CompareSpec,
}

/// Paired comparisons between cells; with neither `baseline` nor `pairs`, every cell is
/// compared with the most accurate one.
#[derive(Debug, Clone)]
pub struct CompareSpec {
    pub baseline: Option<Located<String>>,
    pub pairs: Vec<(Located<String>, Located<String>)>,
    pub resamples: usize,
    pub seed: u64,
}

impl Default for CompareSpec {
    fn default() -> Self {
        Self {
            baseline: None,
            pairs: Vec::new(),
            resamples: 2000,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DatasetSpec {
    pub path: Located<PathBuf>,
    pub text: Located<String>,
    pub label: Located<String>,
    pub id: Option<Located<String>>,
    /// Label values in the dataset and their names, in the order written.
    pub labels: Vec<LabelSpec>,
    pub labels_at: Located<()>,
    pub sample: Option<SampleSpec>,
    pub clean: CleanSpec,
    pub max_text_tokens: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSpec {
    pub value: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleSpec {
    pub n: usize,
    pub stratify: bool,
    pub seed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanSpec {
    pub replace: Vec<(String, String)>,
    pub collapse_whitespace: bool,
}

#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub id: String,
    pub gguf: Located<ModelSource>,
    pub sha256: Option<Located<String>>,
    pub n_ctx: u32,
}

pub const DEFAULT_N_CTX: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Path(PathBuf),
    Hub {
        owner: String,
        repo: String,
        file: String,
    },
}

impl ModelSource {
    /// The file name used to look the model up in `$PIPELINE_MODELS_DIR`.
    pub fn file_name(&self) -> Option<String> {
        match self {
            ModelSource::Path(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
            ModelSource::Hub { file, .. } => file.rsplit('/').next().map(str::to_string),
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Path(p) => write!(f, "{}", p.display()),
            ModelSource::Hub { owner, repo, file } => write!(f, "hf:{owner}/{repo}/{file}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PromptSpec {
    pub id: String,
    pub system: Option<TemplateSpec>,
    pub user: TemplateSpec,
    pub shots: Option<ShotsSpec>,
}

#[derive(Debug, Clone)]
pub struct TemplateSpec {
    /// Template name used in error messages: the file path, or `spec.yaml#prompts[0].user`.
    pub name: String,
    pub source: String,
    /// Where the template was named in the spec.
    pub at: Located<()>,
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ShotsSpec {
    pub k: usize,
    pub strategy: ShotStrategy,
    pub seed: u64,
    pub from: Located<PathBuf>,
    pub max_chars: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MethodSpec {
    pub id: String,
    pub kind: MethodKind,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub parse: ParseRule,
}

pub const DEFAULT_MAX_TOKENS: u32 = 16;

/// The sampling grid; its cartesian product applies to `generate` methods.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingGrid {
    pub temperature: Vec<f64>,
    pub top_p: Vec<f64>,
    pub top_k: Vec<i32>,
    pub min_p: Vec<f64>,
    pub seed: Vec<u64>,
    pub repeats: u32,
}

impl Default for SamplingGrid {
    fn default() -> Self {
        Self {
            temperature: vec![0.0],
            top_p: vec![1.0],
            top_k: vec![0],
            min_p: vec![0.0],
            seed: vec![0],
            repeats: 1,
        }
    }
}

/// One point of the sampling grid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerPoint {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: i32,
    pub min_p: f64,
    pub seed: u64,
    pub repeat: u32,
}

impl SamplingGrid {
    pub fn points(&self) -> Vec<SamplerPoint> {
        let mut out = Vec::new();
        for &temperature in &self.temperature {
            for &top_p in &self.top_p {
                for &top_k in &self.top_k {
                    for &min_p in &self.min_p {
                        for &seed in &self.seed {
                            for repeat in 0..self.repeats {
                                out.push(SamplerPoint {
                                    temperature,
                                    top_p,
                                    top_k,
                                    min_p,
                                    seed,
                                    repeat,
                                });
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// A short label for a grid point naming only the settings that vary in this grid
    /// (temperature is always named), e.g. `t=0.2` or `t=0.8,seed=2,r1`.
    pub fn label(&self, p: &SamplerPoint) -> String {
        let mut parts = vec![format!("t={}", p.temperature)];
        if self.top_p.len() > 1 {
            parts.push(format!("top_p={}", p.top_p));
        }
        if self.top_k.len() > 1 {
            parts.push(format!("top_k={}", p.top_k));
        }
        if self.min_p.len() > 1 {
            parts.push(format!("min_p={}", p.min_p));
        }
        if self.seed.len() > 1 {
            parts.push(format!("seed={}", p.seed));
        }
        if self.repeats > 1 {
            parts.push(format!("r{}", p.repeat));
        }
        parts.join(",")
    }
}

#[derive(Debug, Clone, Default)]
pub struct ReportSpec {
    pub title: Option<String>,
}

/// Parse and validate a spec file.
pub fn load(path: &Path) -> Result<Spec, Diagnostic> {
    let source = std::fs::read_to_string(path).map_err(|e| {
        Diagnostic::new(
            SourceLoc::file_only(path),
            "",
            format!("cannot read spec: {e}"),
        )
    })?;
    parse(path, &source)
}

/// Parse and validate spec text as if read from `path` (used for relative paths and errors).
pub fn parse(path: &Path, source: &str) -> Result<Spec, Diagnostic> {
    let mut options = serde_saphyr::Options::default();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    // serde_path_to_error records the field path of a failure (`methods[0].max_tokens`).
    let mut field = String::new();
    let raw: RawSpec =
        serde_saphyr::with_deserializer_from_str_with_options(source, options, |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                field = e.path().to_string();
                e.into_inner()
            })
        })
        .map_err(|e| yaml_error(path, source, &e, &field))?;
    let base = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."));
    let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    Validator {
        file: path.to_path_buf(),
        source,
        base: &base,
    }
    .spec(raw)
}

fn yaml_error(path: &Path, source: &str, e: &serde_saphyr::Error, field: &str) -> Diagnostic {
    let loc = e
        .location()
        .map(|l| SourceLoc::from_saphyr(path, &l))
        .unwrap_or_else(|| SourceLoc::file_only(path));
    let message = e.without_snippet().to_string();
    // saphyr prefixes its own location; we print ours in front, so drop the duplicate.
    let message = strip_location_suffix(&message);
    // The path ends at the offending key for unknown fields; `.` alone means the top level.
    // `Spanned` wrappers show up as `.value` segments; no spec field is called `value`.
    let field = field.replace(".value", "");
    let field = if field == "." || field == "?" {
        ""
    } else {
        field.as_str()
    };
    Diagnostic::new(loc, field, message).with_source(source)
}

fn strip_location_suffix(msg: &str) -> String {
    let msg = msg.trim();
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].trim_end_matches(',').to_string(),
        None => msg.to_string(),
    }
}

/// Characters that join the parts of a cell id; no id may contain them.
const CELL_ID_SEPARATORS: [char; 4] = ['/', '@', ',', '='];

struct Validator<'a> {
    file: PathBuf,
    source: &'a str,
    base: &'a Path,
}

impl Validator<'_> {
    fn loc(&self, l: &serde_saphyr::Location) -> SourceLoc {
        SourceLoc::from_saphyr(&self.file, l)
    }

    fn located<T, U>(&self, s: &Spanned<T>, field: impl Into<String>, value: U) -> Located<U> {
        Located {
            value,
            loc: self.loc(&s.referenced),
            field: field.into(),
        }
    }

    fn err<T>(
        &self,
        s: &Spanned<T>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic::new(self.loc(&s.referenced), field, msg).with_source(self.source)
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn id(
        &self,
        s: &Spanned<String>,
        field: &str,
        seen: &mut Vec<String>,
    ) -> Result<String, Diagnostic> {
        let id = s.value.trim();
        if id.is_empty() {
            return Err(self.err(s, field, "an id must not be empty"));
        }
        if let Some(c) = id.chars().find(|c| CELL_ID_SEPARATORS.contains(c)) {
            return Err(self.err(
                s,
                field,
                format!(
                    "id `{id}` must not contain `{c}`: cell ids are built as `model/prompt/method@t=0.2,seed=1`, so `/`, `@`, `,` and `=` would make two cells look alike"
                ),
            ));
        }
        if seen.iter().any(|x| x == id) {
            return Err(self.err(s, field, format!("duplicate id `{id}`")));
        }
        seen.push(id.to_string());
        Ok(id.to_string())
    }

    fn spec(&self, raw: RawSpec) -> Result<Spec, Diagnostic> {
        let name = raw.name.value.trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(self.err(
                &raw.name,
                "name",
                "the name names the report folder: use letters, digits, `-`, `_` or `.`",
            ));
        }
        let dataset = self.dataset(raw.dataset)?;
        let models = self.models(raw.models)?;
        let prompts = self.prompts(raw.prompts)?;
        let methods = self.methods(raw.methods)?;
        let sampling = self.sampling(raw.sampling.unwrap_or_default())?;
        let report = ReportSpec {
            title: raw.report.and_then(|r| r.title),
        };
        let compare = match raw.compare {
            None => CompareSpec::default(),
            Some(c) => {
                let (resamples, seed) = match &c.bootstrap {
                    Some(b) if b.resamples.value < 100 => {
                        return Err(self.err(
                            &b.resamples,
                            "compare.bootstrap.resamples",
                            "use at least 100 resamples",
                        ));
                    }
                    Some(b) => (b.resamples.value, b.seed),
                    None => (2000, 0),
                };
                let pairs = match &c.pairs {
                    Some(p) => p
                        .value
                        .iter()
                        .enumerate()
                        .map(|(i, (a, b))| {
                            (
                                self.located(p, format!("compare.pairs[{i}][0]"), a.clone()),
                                self.located(p, format!("compare.pairs[{i}][1]"), b.clone()),
                            )
                        })
                        .collect(),
                    None => Vec::new(),
                };
                CompareSpec {
                    baseline: c
                        .baseline
                        .as_ref()
                        .map(|b| self.located(b, "compare.baseline", b.value.clone())),
                    pairs,
                    resamples,
                    seed,
                }
            }
        };
        Ok(Spec {
            path: self.file.clone(),
            name,
            description: raw.description,
            dataset,
            models,
            prompts,
            methods,
            sampling,
            report,
            compare,
        })
    }

    fn dataset(&self, d: raw::RawDataset) -> Result<DatasetSpec, Diagnostic> {
        if d.labels.value.0.len() < 2 {
            return Err(self.err(
                &d.labels,
                "dataset.labels",
                "name at least two labels, e.g. `{0: negative, 1: positive}`",
            ));
        }
        let mut names: Vec<&str> = Vec::new();
        for (_, name) in &d.labels.value.0 {
            let n = name.trim();
            if n.is_empty() {
                return Err(self.err(&d.labels, "dataset.labels", "label names must not be empty"));
            }
            // Answers are matched to labels case-insensitively.
            if let Some(other) = names.iter().find(|o| o.to_lowercase() == n.to_lowercase()) {
                return Err(self.err(
                    &d.labels,
                    "dataset.labels",
                    format!(
                        "label names `{other}` and `{n}` differ only in case; answers are matched without case, so they could not be told apart"
                    ),
                ));
            }
            names.push(n);
        }
        let labels = d
            .labels
            .value
            .0
            .iter()
            .map(|(value, name)| LabelSpec {
                value: value.clone(),
                name: name.trim().to_string(),
            })
            .collect();
        let sample = match d.sample {
            None => None,
            Some(s) => {
                if s.n.value == 0 {
                    return Err(self.err(&s.n, "dataset.sample.n", "must be at least 1"));
                }
                Some(SampleSpec {
                    n: s.n.value,
                    stratify: s.stratify,
                    seed: s.seed,
                })
            }
        };
        let clean = d
            .clean
            .map(|c| CleanSpec {
                replace: c.replace.0,
                collapse_whitespace: c.collapse_whitespace,
            })
            .unwrap_or_default();
        if let Some(m) = &d.max_text_tokens
            && m.value == 0
        {
            return Err(self.err(m, "dataset.max_text_tokens", "must be at least 1"));
        }
        Ok(DatasetSpec {
            path: self.located(&d.path, "dataset.path", self.path(&d.path.value)),
            text: self.located(&d.text, "dataset.text", d.text.value.clone()),
            label: self.located(&d.label, "dataset.label", d.label.value.clone()),
            id: d
                .id
                .as_ref()
                .map(|s| self.located(s, "dataset.id", s.value.clone())),
            labels,
            labels_at: self.located(&d.labels, "dataset.labels", ()),
            sample,
            clean,
            max_text_tokens: d.max_text_tokens.map(|m| m.value),
        })
    }

    fn models(&self, models: Spanned<Vec<raw::RawModel>>) -> Result<Vec<ModelSpec>, Diagnostic> {
        if models.value.is_empty() {
            return Err(self.err(&models, "models", "list at least one model"));
        }
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (i, m) in models.value.iter().enumerate() {
            let id = self.id(&m.id, &format!("models[{i}].id"), &mut seen)?;
            let field = format!("models[{i}].gguf");
            let source = match m.gguf.value.strip_prefix("hf:") {
                Some(rest) => {
                    let mut parts = rest.splitn(3, '/');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(o), Some(r), Some(f))
                            if !o.is_empty() && !r.is_empty() && !f.is_empty() =>
                        {
                            ModelSource::Hub {
                                owner: o.to_string(),
                                repo: r.to_string(),
                                file: f.to_string(),
                            }
                        }
                        _ => {
                            return Err(self.err(
                                &m.gguf,
                                field,
                                "a hub model is written `hf:OWNER/REPO/FILE.gguf`",
                            ));
                        }
                    }
                }
                None => ModelSource::Path(self.path(&m.gguf.value)),
            };
            let sha256 = match &m.sha256 {
                Some(s) => {
                    let hex = s.value.trim().to_ascii_lowercase();
                    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                        return Err(self.err(
                            s,
                            format!("models[{i}].sha256"),
                            "expected 64 hexadecimal digits",
                        ));
                    }
                    Some(self.located(s, format!("models[{i}].sha256"), hex))
                }
                None => None,
            };
            let n_ctx = match &m.n_ctx {
                Some(n) if n.value < 64 => {
                    return Err(self.err(n, format!("models[{i}].n_ctx"), "must be at least 64"));
                }
                Some(n) => n.value,
                None => DEFAULT_N_CTX,
            };
            out.push(ModelSpec {
                id,
                gguf: self.located(&m.gguf, field, source),
                sha256,
                n_ctx,
            });
        }
        Ok(out)
    }

    fn template(
        &self,
        t: &Spanned<TemplateRef>,
        field: String,
    ) -> Result<TemplateSpec, Diagnostic> {
        let at = self.located(t, field.clone(), ());
        match &t.value {
            TemplateRef::Inline(src) => Ok(TemplateSpec {
                name: format!("{}#{}", self.file.display(), field),
                source: src.clone(),
                at,
                file: None,
            }),
            TemplateRef::File(p) => {
                let path = self.path(p);
                let source = std::fs::read_to_string(&path).map_err(|e| {
                    self.err(
                        t,
                        &field,
                        format!("cannot read template file {}: {e}", path.display()),
                    )
                })?;
                Ok(TemplateSpec {
                    name: path.display().to_string(),
                    source,
                    at,
                    file: Some(path),
                })
            }
        }
    }

    fn prompts(
        &self,
        prompts: Spanned<Vec<raw::RawPrompt>>,
    ) -> Result<Vec<PromptSpec>, Diagnostic> {
        if prompts.value.is_empty() {
            return Err(self.err(&prompts, "prompts", "list at least one prompt"));
        }
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (i, p) in prompts.value.iter().enumerate() {
            let id = self.id(&p.id, &format!("prompts[{i}].id"), &mut seen)?;
            let system = match &p.system {
                Some(s) => Some(self.template(s, format!("prompts[{i}].system"))?),
                None => None,
            };
            let user = self.template(&p.user, format!("prompts[{i}].user"))?;
            let shots = match &p.shots {
                Some(s) => {
                    if s.value.k.value == 0 {
                        return Err(self.err(
                            &s.value.k,
                            format!("prompts[{i}].shots.k"),
                            "must be at least 1",
                        ));
                    }
                    Some(ShotsSpec {
                        k: s.value.k.value,
                        strategy: s.value.strategy,
                        seed: s.value.seed,
                        from: self.located(
                            &s.value.from,
                            format!("prompts[{i}].shots.from"),
                            self.path(&s.value.from.value),
                        ),
                        max_chars: s.value.max_chars,
                    })
                }
                None => None,
            };
            out.push(PromptSpec {
                id,
                system,
                user,
                shots,
            });
        }
        Ok(out)
    }

    fn methods(
        &self,
        methods: Spanned<Vec<raw::RawMethod>>,
    ) -> Result<Vec<MethodSpec>, Diagnostic> {
        if methods.value.is_empty() {
            return Err(self.err(&methods, "methods", "list at least one method"));
        }
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (i, m) in methods.value.iter().enumerate() {
            let id = self.id(&m.id, &format!("methods[{i}].id"), &mut seen)?;
            let kind = m.kind.value;
            if kind == MethodKind::Loglik {
                let generate_only = [
                    m.max_tokens.as_ref().map(|s| ("max_tokens", &s.referenced)),
                    m.stop.as_ref().map(|s| ("stop", &s.referenced)),
                    m.parse.as_ref().map(|s| ("parse", &s.referenced)),
                ];
                if let Some((name, at)) = generate_only.into_iter().flatten().next() {
                    return Err(Diagnostic::new(
                        self.loc(at),
                        format!("methods[{i}].{name}"),
                        format!("`{name}` applies to `kind: generate` only"),
                    )
                    .with_source(self.source));
                }
            }
            let max_tokens = match &m.max_tokens {
                Some(t) if t.value == 0 => {
                    return Err(self.err(
                        t,
                        format!("methods[{i}].max_tokens"),
                        "must be at least 1",
                    ));
                }
                Some(t) => t.value,
                None => DEFAULT_MAX_TOKENS,
            };
            let stop = match &m.stop {
                Some(s) if s.value.iter().any(String::is_empty) => {
                    return Err(self.err(
                        s,
                        format!("methods[{i}].stop"),
                        "stop strings must not be empty",
                    ));
                }
                Some(s) => s.value.clone(),
                None => Vec::new(),
            };
            out.push(MethodSpec {
                id,
                kind,
                max_tokens,
                stop,
                parse: m.parse.as_ref().map(|p| p.value).unwrap_or_default(),
            });
        }
        Ok(out)
    }

    fn sampling(&self, s: raw::RawSampling) -> Result<SamplingGrid, Diagnostic> {
        let d = SamplingGrid::default();
        fn axis<T: Clone + PartialEq + std::fmt::Display>(
            v: &Self_,
            s: Option<Spanned<OneOrMany<T>>>,
            field: &str,
            default: Vec<T>,
            ok: impl Fn(&T) -> bool,
            rule: &str,
        ) -> Result<Vec<T>, Diagnostic> {
            let Some(s) = s else { return Ok(default) };
            let vals = &s.value.0;
            if vals.is_empty() {
                return Err(v.err(&s, field, "give at least one value"));
            }
            for (j, x) in vals.iter().enumerate() {
                if !ok(x) {
                    return Err(v.err(&s, field, format!("{x} is out of range: {rule}")));
                }
                if vals[..j].contains(x) {
                    return Err(v.err(&s, field, format!("{x} is listed twice")));
                }
            }
            Ok(vals.clone())
        }
        type Self_<'a> = Validator<'a>;
        let repeats = match &s.repeats {
            Some(r) if r.value == 0 => {
                return Err(self.err(r, "sampling.repeats", "must be at least 1"));
            }
            Some(r) => r.value,
            None => 1,
        };
        Ok(SamplingGrid {
            temperature: axis(
                self,
                s.temperature,
                "sampling.temperature",
                d.temperature,
                |t| t.is_finite() && *t >= 0.0 && *t <= 5.0,
                "0 <= temperature <= 5 (0 is greedy)",
            )?,
            top_p: axis(
                self,
                s.top_p,
                "sampling.top_p",
                d.top_p,
                |p| *p > 0.0 && *p <= 1.0,
                "0 < top_p <= 1",
            )?,
            top_k: axis(
                self,
                s.top_k,
                "sampling.top_k",
                d.top_k,
                |k| *k >= 0,
                "top_k >= 0 (0 disables it)",
            )?,
            min_p: axis(
                self,
                s.min_p,
                "sampling.min_p",
                d.min_p,
                |p| *p >= 0.0 && *p < 1.0,
                "0 <= min_p < 1",
            )?,
            seed: axis(self, s.seed, "sampling.seed", d.seed, |_| true, "")?,
            repeats,
        })
    }
}

#[cfg(test)]
mod tests;
