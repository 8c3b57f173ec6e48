//! The experiment spec: parse the YAML (rejecting unknown and duplicate keys), resolve
//! relative paths against the spec file's directory, and validate it into [`Spec`].

mod raw;
mod spanned;
pub mod starter;

use std::path::{Path, PathBuf};

use raw::Spanned;
pub use raw::{MethodKind, ParseRule, Pooling, ServerApi, ShotOrder, ShotStrategy};
use raw::{OneOrMany, RawCalibrate, RawPool, RawSpec, RawTruncate, TemplateRef};

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
    /// Sentence-embedding models, for retrieved examples and `knn_vote`.
    pub embedders: Vec<EmbedderSpec>,
    pub cascades: Vec<CascadeSpec>,
    pub ensembles: Vec<EnsembleSpec>,
}

/// An ensemble of cells with label scores: each row's label probabilities averaged over
/// the members (weighted), no inference of its own. Its cell is `ensemble/ID`.
#[derive(Debug, Clone)]
pub struct EnsembleSpec {
    pub id: String,
    pub cells: Vec<Located<String>>,
    /// One per member, summing to 1.
    pub weights: Vec<f64>,
}

/// A cascade of cells: the first answers every row, each next one only the rows the one
/// before it was unsure of. Its stages are named by cell id and checked against the plan.
#[derive(Debug, Clone)]
pub struct CascadeSpec {
    pub id: String,
    pub stages: Vec<Located<String>>,
    /// One rule per step (`stages.len() - 1`).
    pub escalate: Vec<Escalate>,
}

/// When a row goes on to the next cell of a cascade. The margin of a row is the distance in
/// nats between the log-probs of its two best labels (after calibration in calibrated
/// cells); an answer that names no label always goes on.
#[derive(Debug, Clone)]
pub enum Escalate {
    /// Rows whose margin is below this.
    Margin(f64),
    /// The `fraction` of rows with the smallest margins, by a margin threshold fitted on
    /// labelled rows of another file (never on the rows it is scored on).
    Fraction {
        fraction: f64,
        from: Located<PathBuf>,
        sample: SampleSpec,
    },
}

/// A sentence-embedding model: found, checked and digested like a model; texts are cut to
/// `max_tokens` tokens of its tokenizer (special tokens included).
#[derive(Debug, Clone)]
pub struct EmbedderSpec {
    pub model: ModelSpec,
    pub max_tokens: u32,
}

/// all-MiniLM-L6-v2 was trained on 256 tokens.
pub const DEFAULT_EMBED_MAX_TOKENS: u32 = 256;

/// Retrieved examples (`strategy: knn`).
#[derive(Debug, Clone)]
pub struct KnnSpec {
    /// Index into [`Spec::embedders`].
    pub embedder: usize,
    /// A seeded sample of `from`; every row when `None`.
    pub pool: Option<SampleSpec>,
    /// `k / labels` nearest examples of each label rather than the `k` nearest overall.
    pub per_label: bool,
    pub order: ShotOrder,
}

/// How a `loglik` method's label scores are calibrated.
#[derive(Debug, Clone)]
pub enum Calibration {
    /// Divide out the prompt's bias measured on content-free inputs (Zhao et al. 2021).
    ContentFree,
    /// Divide out each label's mean probability over the cell's own evaluated rows (batch
    /// calibration, Zhou et al. 2024): no labels, no extra inference.
    Batch,
    /// A per-label bias and a temperature fitted on labelled rows of another file, scored
    /// with the same model and prompt; the evaluation rows never take part.
    Fit {
        from: Located<PathBuf>,
        sample: SampleSpec,
    },
}

impl Calibration {
    pub fn kind(&self) -> CalibrationKind {
        match self {
            Calibration::ContentFree => CalibrationKind::ContentFree,
            Calibration::Batch => CalibrationKind::Batch,
            Calibration::Fit { .. } => CalibrationKind::Fit,
        }
    }
}

named_enum! {
    /// A calibration's kind, as tables and Findings name it.
    pub enum CalibrationKind {
        ContentFree,
        Batch,
        Fit,
        /// A probe's fit: a logistic regression on hidden states or embeddings.
        Probe,
    }
}

/// `kind: knn_vote`: the label vote of the `k` nearest pool examples, weighted by
/// similarity.
#[derive(Debug, Clone)]
pub struct VoteSpec {
    pub k: Located<usize>,
    pub embedder: usize,
    pub from: Located<PathBuf>,
    pub pool: Option<SampleSpec>,
}

/// `[cell, reference]`: the ids of two cells compared on paired rows.
pub type ComparePair = (Located<String>, Located<String>);

/// Paired comparisons between cells; with neither `baseline` nor `pairs`, every cell is
/// compared with the most accurate one.
#[derive(Debug, Clone)]
pub struct CompareSpec {
    pub baseline: Option<Located<String>>,
    pub pairs: Vec<ComparePair>,
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
    /// Label values in the dataset and their names, in the order written (empty with
    /// `choices`: the classes are then the choices' places, A, B, C, ...).
    pub labels: Vec<LabelSpec>,
    pub labels_at: Located<()>,
    /// The column of each row's own choices (multiple choice); the label column holds the
    /// correct choice's text or its index.
    pub choices: Option<Located<String>>,
    /// The column of each row's reference answer (free answers scored by a generate
    /// method's `score`); the classes are then [`crate::score::OUTCOMES`].
    pub reference: Option<Located<String>>,
    pub sample: Option<SampleSpec>,
    pub clean: CleanSpec,
    /// `max_text_tokens`, and which part of a longer text is kept (`truncate`).
    pub budget: Option<TextBudget>,
}

/// What a row's answer is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskShape {
    /// Labels fixed for the whole dataset (`labels`).
    #[default]
    Labels,
    /// Each row's own choices (`choices`); the classes are the choices' places.
    Choices,
    /// A free answer scored against the row's reference (`reference`).
    Reference,
}

impl DatasetSpec {
    pub fn shape(&self) -> TaskShape {
        match (&self.choices, &self.reference) {
            (Some(_), _) => TaskShape::Choices,
            (None, Some(_)) => TaskShape::Reference,
            (None, None) => TaskShape::Labels,
        }
    }
}

/// How many of a text's tokens a prompt keeps: the first `head` and the last `tail`, with
/// [`crate::backend::ELISION`] between them when both are cut from a longer text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextBudget {
    pub head: u32,
    pub tail: u32,
}

impl TextBudget {
    /// The first `tokens` only (`max_text_tokens` alone).
    pub fn head(tokens: u32) -> Self {
        Self {
            head: tokens,
            tail: 0,
        }
    }

    /// `truncate: head_tail`: a third of the budget from the start, two thirds from the end
    /// (a review's verdict is usually at its end; Sun et al. 2019 found head+tail best for
    /// long IMDB reviews).
    pub fn head_tail(tokens: u32) -> Self {
        let head = tokens / 3;
        Self {
            head,
            tail: tokens - head,
        }
    }

    pub fn tokens(&self) -> u32 {
        self.head + self.tail
    }
}

/// A class of the task: its name, and the label values of the dataset that mean it
/// (several when the spec maps several values to one name, e.g. star ratings to buckets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSpec {
    pub name: String,
    pub values: Vec<String>,
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
    /// Its parameter count as the spec states it (for a served model, or a file not here
    /// yet); a local GGUF file's header is checked against it.
    pub parameters: Option<Located<u64>>,
    pub n_ctx: u32,
    /// `false`: the model has no cells of its own and runs only the rows a cascade
    /// escalates to it.
    pub grid: bool,
    /// The prompt ids this model has cells for; `None`: every prompt. A costly model can
    /// skip the prompts a cheaper one has already ruled out.
    pub prompts: Option<Vec<String>>,
}

impl Spec {
    /// The cells this spec's grid expands to (what [`MAX_GRID_CELLS`] bounds).
    pub fn grid_cells(&self) -> u64 {
        grid_cells(&self.models, &self.prompts, &self.methods, &self.sampling)
    }
}

impl ModelSpec {
    /// Whether the grid has cells of this model on this prompt.
    pub fn has_cells(&self, prompt: &str) -> bool {
        self.grid
            && self
                .prompts
                .as_ref()
                .is_none_or(|p| p.iter().any(|x| x == prompt))
    }
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
    /// A model behind an OpenAI-compatible server.
    Server(Box<ServerSpec>),
}

/// A model behind an OpenAI-compatible server, as the spec names it. The API key is never
/// here: only the name of the environment variable it is read from at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// The API's base URL, e.g. `http://127.0.0.1:8080/v1` (no trailing slash).
    pub url: String,
    /// The model name requests carry (`model`); `None`: the one the server lists first.
    pub model: Option<String>,
    pub api_key_env: Option<String>,
    /// Requests in flight at most.
    pub concurrency: usize,
    pub timeout_s: u64,
    /// Retries of a request that met a 429, a 5xx, a timeout or a dropped connection.
    pub retries: u32,
    pub api: ServerApi,
    /// A chat template (its text) used instead of the one the server reports.
    pub template: Option<String>,
}

impl ModelSource {
    /// The file name used to look the model up in `$PIPELINE_MODELS_DIR`.
    pub fn file_name(&self) -> Option<String> {
        match self {
            ModelSource::Path(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
            ModelSource::Hub { file, .. } => file.rsplit('/').next().map(str::to_string),
            ModelSource::Server(_) => None,
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Path(p) => write!(f, "{}", p.display()),
            ModelSource::Hub { owner, repo, file } => write!(f, "hf:{owner}/{repo}/{file}"),
            ModelSource::Server(s) => write!(f, "{}", s.url),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PromptSpec {
    pub id: String,
    pub system: Option<TemplateSpec>,
    pub user: TemplateSpec,
    pub shots: Option<ShotsSpec>,
    /// How much of a row's text the prompt keeps: the dataset's budget, or the prompt's own
    /// `truncate`.
    pub budget: Option<TextBudget>,
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
    pub k_at: Located<()>,
    pub strategy: ShotStrategy,
    pub seed: u64,
    pub from: Located<PathBuf>,
    pub max_chars: Option<usize>,
    /// Set when `strategy: knn`.
    pub knn: Option<KnnSpec>,
}

#[derive(Debug, Clone)]
pub struct MethodSpec {
    pub id: String,
    pub method: Method,
    /// The models and prompts it has cells for; `None`: all of them.
    pub models: Option<Vec<String>>,
    pub prompts: Option<Vec<String>>,
}

/// A method, with the options of its kind only.
#[derive(Debug, Clone)]
pub enum Method {
    Generate(GenerateSpec),
    Loglik { calibrate: Option<Calibration> },
    KnnVote(VoteSpec),
    Probe(ProbeSpec),
}

/// How a `generate` method asks and reads its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateSpec {
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub parse: ParseRule,
    /// With reference answers: how an answer is scored against its row's reference.
    pub score: Option<crate::score::Score>,
}

impl MethodSpec {
    /// Whether the grid has a cell of this method for `model` and `prompt`.
    pub fn has_cells(&self, model: &str, prompt: &str) -> bool {
        let has = |list: &Option<Vec<String>>, id: &str| {
            list.as_ref().is_none_or(|l| l.iter().any(|x| x == id))
        };
        has(&self.models, model) && has(&self.prompts, prompt)
    }

    pub fn kind(&self) -> MethodKind {
        match self.method {
            Method::Generate(_) => MethodKind::Generate,
            Method::Loglik { .. } => MethodKind::Loglik,
            Method::KnnVote(_) => MethodKind::KnnVote,
            Method::Probe(_) => MethodKind::Probe,
        }
    }

    pub fn probe(&self) -> Option<&ProbeSpec> {
        match &self.method {
            Method::Probe(p) => Some(p),
            _ => None,
        }
    }

    pub fn generate(&self) -> Option<&GenerateSpec> {
        match &self.method {
            Method::Generate(g) => Some(g),
            _ => None,
        }
    }

    /// A `loglik` method's calibration.
    pub fn calibrate(&self) -> Option<&Calibration> {
        match &self.method {
            Method::Loglik { calibrate } => calibrate.as_ref(),
            _ => None,
        }
    }

    pub fn vote(&self) -> Option<&VoteSpec> {
        match &self.method {
            Method::KnnVote(v) => Some(v),
            _ => None,
        }
    }
}

/// `kind: probe`: a regularised logistic regression on features of each row, fitted on
/// labelled rows of another file (never the evaluated rows).
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    pub features: ProbeFeatures,
    pub fit: FitRows,
}

/// Labelled rows drawn from another file to fit on.
#[derive(Debug, Clone)]
pub struct FitRows {
    pub from: Located<PathBuf>,
    pub sample: SampleSpec,
}

/// What a probe reads of each row.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeFeatures {
    /// The model's hidden states from the prompt's evaluation, at each of `layers` pooled
    /// each of `pools` ways; with more than one, the combination is chosen on the fit rows
    /// by cross-validation.
    Hidden {
        layers: Vec<Layer>,
        pools: Vec<Pooling>,
    },
    /// An embedder's pooled vector of the row's text (a model-free baseline).
    Embedder(usize),
}

/// One feature block of a hidden-state probe: a layer's output, pooled one way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HiddenState {
    pub layer: Layer,
    pub pool: Pooling,
}

impl std::fmt::Display for HiddenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layer {}, {}", self.layer, self.pool.as_str())
    }
}

impl ProbeFeatures {
    /// The hidden states a row's features hold, layer-major: every layer pooled every way,
    /// except the last layer's mean (llama.cpp computes the last layer only where logits
    /// are read). Empty for an embedder's probe.
    pub fn states(&self) -> Vec<HiddenState> {
        match self {
            ProbeFeatures::Hidden { layers, pools } => layers
                .iter()
                .flat_map(|&layer| pools.iter().map(move |&pool| HiddenState { layer, pool }))
                .filter(|s| !(s.layer.is_last() && s.pool == Pooling::Mean))
                .collect(),
            ProbeFeatures::Embedder(_) => Vec::new(),
        }
    }
}

/// A layer of a model: an index, a fraction of its depth (layer `f × (n_layer − 1)`,
/// rounded), or the last.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Layer {
    Index(u32),
    Fraction(f64),
    Last,
}

impl Layer {
    /// Whether it names the last layer whatever the model (`last`, or the fraction 1).
    pub fn is_last(self) -> bool {
        matches!(self, Layer::Last) || self == Layer::Fraction(1.0)
    }

    /// The layer's index in a model of `n_layer` layers (clamped to the last).
    pub fn index(self, n_layer: u32) -> u32 {
        let last = n_layer.saturating_sub(1);
        match self {
            Layer::Index(i) => i.min(last),
            Layer::Fraction(f) => ((f * f64::from(last)).round() as u32).min(last),
            Layer::Last => last,
        }
    }
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layer::Index(i) => write!(f, "{i}"),
            Layer::Fraction(x) => write!(f, "{x}"),
            Layer::Last => f.write_str("last"),
        }
    }
}

/// Neighbours a `knn_vote` counts by default.
pub const DEFAULT_VOTE_K: usize = 16;

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
    /// How many points [`points`](Self::points) gives, without making them.
    pub fn point_count(&self) -> u64 {
        [
            self.temperature.len(),
            self.top_p.len(),
            self.top_k.len(),
            self.min_p.len(),
            self.seed.len(),
        ]
        .iter()
        .fold(u64::from(self.repeats), |n, &l| n.saturating_mul(l as u64))
    }

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

/// The spec's JSON Schema (draft 2020-12), generated from the types a spec is read into:
/// every field, its type and its documentation, unknown fields refused. Editors give
/// completion and checks from it (`# yaml-language-server: $schema=...`); `load` checks
/// more than it can say (references between sections, files, ranges).
pub fn json_schema() -> serde_json::Value {
    let mut schema = schemars::schema_for!(raw::RawSpec);
    schema.insert("title".into(), "pipeline spec".into());
    schema.insert(
        "description".into(),
        "An evaluation: a dataset, models × prompts × methods (× a sampling grid), and what to compare. Written by `pipeline schema`.".into(),
    );
    schema.to_value()
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
        if let Err(why) = crate::names::check_id(id) {
            return Err(self.err(
                s,
                field,
                format!("id `{}` {why}: ids are plain names", id.escape_debug()),
            ));
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
        if let Err(why) = crate::names::check_folder_name(&name) {
            return Err(self.err(
                &raw.name,
                "name",
                format!(
                    "the name names the report folder, and `{}` {why}: use letters, digits, `-`, `_` or `.`, not starting with `.`",
                    name.escape_debug()
                ),
            ));
        }
        let dataset = self.dataset(raw.dataset)?;
        let embedders = match raw.embedders {
            Some(e) => self.embedders(e)?,
            None => Vec::new(),
        };
        let prompts = self.prompts(raw.prompts, &embedders, dataset.budget)?;
        let models = self.models(raw.models, &prompts)?;
        let methods_loc = self.loc(&raw.methods.referenced);
        if dataset.choices.is_some() {
            self.check_choice_methods(&raw.methods)?;
        }
        self.check_scores(&raw.methods, dataset.reference.is_some())?;
        let methods = self.methods(raw.methods, &embedders, &models, &prompts)?;
        let sampling = self.sampling(raw.sampling.unwrap_or_default())?;
        // Rows (cells × dataset rows) are checked against MAX_GRID_ROWS once the dataset is
        // read (`plan::build`), before the grid is expanded.
        let cells = grid_cells(&models, &prompts, &methods, &sampling);
        if cells > MAX_GRID_CELLS {
            return Err(Diagnostic::new(
                methods_loc,
                "methods",
                format!(
                    "the grid has {cells} cells, more than this tool runs in one spec ({MAX_GRID_CELLS}): split the spec, or narrow the sampling grid"
                ),
            )
            .with_source(self.source));
        }
        let cascades = match raw.cascades {
            Some(c) => self.cascades(c)?,
            None => Vec::new(),
        };
        let ensembles = match raw.ensembles {
            Some(e) => self.ensembles(e, &cascades)?,
            None => Vec::new(),
        };
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
                    Some(p) => self.compare_pairs(p)?,
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
            embedders,
            cascades,
            ensembles,
        })
    }

    fn ensembles(
        &self,
        ensembles: Spanned<Vec<raw::RawEnsemble>>,
        cascades: &[CascadeSpec],
    ) -> Result<Vec<EnsembleSpec>, Diagnostic> {
        // Cascade and ensemble cells share the `KIND/ID` names, so their ids are distinct.
        let mut seen: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for (i, e) in ensembles.value.iter().enumerate() {
            let field = format!("ensembles[{i}]");
            let id = self.id(&e.id, &format!("{field}.id"), &mut seen)?;
            if cascades.iter().any(|c| c.id == id) {
                // Not a clash of cell ids (`cascade/X` vs `ensemble/X`), but one name for
                // two things in Findings that say "X".
                return Err(self.err(
                    &e.id,
                    format!("{field}.id"),
                    format!("`{id}` is also a cascade's id: give the ensemble its own"),
                ));
            }
            if e.cells.value.len() < 2 {
                return Err(self.err(
                    &e.cells,
                    format!("{field}.cells"),
                    "an ensemble averages at least two cells",
                ));
            }
            let mut cells: Vec<Located<String>> = Vec::new();
            for (j, c) in e.cells.value.iter().enumerate() {
                let name = c.value.trim().to_string();
                if cells.iter().any(|x| x.value == name) {
                    return Err(self.err(
                        c,
                        format!("{field}.cells[{j}]"),
                        format!("`{name}` is already a member of this ensemble"),
                    ));
                }
                cells.push(self.located(c, format!("{field}.cells[{j}]"), name));
            }
            let weights = match &e.weights {
                None => vec![1.0 / cells.len() as f64; cells.len()],
                Some(w) => {
                    if w.value.len() != cells.len() {
                        return Err(self.err(
                            w,
                            format!("{field}.weights"),
                            format!(
                                "give one weight per cell ({}), not {}",
                                cells.len(),
                                w.value.len()
                            ),
                        ));
                    }
                    let total: f64 = w.value.iter().sum();
                    if w.value.iter().any(|x| !x.is_finite() || *x < 0.0) || total <= 0.0 {
                        return Err(self.err(
                            w,
                            format!("{field}.weights"),
                            "weights are 0 or more, and not all 0",
                        ));
                    }
                    w.value.iter().map(|x| x / total).collect()
                }
            };
            out.push(EnsembleSpec { id, cells, weights });
        }
        Ok(out)
    }

    fn cascades(
        &self,
        cascades: Spanned<Vec<raw::RawCascade>>,
    ) -> Result<Vec<CascadeSpec>, Diagnostic> {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (i, c) in cascades.value.iter().enumerate() {
            let field = format!("cascades[{i}]");
            let id = self.id(&c.id, &format!("{field}.id"), &mut seen)?;
            let mut stages = vec![self.located(
                &c.first,
                format!("{field}.first"),
                c.first.value.trim().to_string(),
            )];
            if c.then.value.0.is_empty() {
                return Err(self.err(&c.then, format!("{field}.then"), "name at least one cell"));
            }
            for (j, t) in c.then.value.0.iter().enumerate() {
                let at = if c.then.value.0.len() == 1 {
                    format!("{field}.then")
                } else {
                    format!("{field}.then[{j}]")
                };
                stages.push(self.located(&c.then, at, t.trim().to_string()));
            }
            let steps = stages.len() - 1;
            let rules = &c.escalate.value.0;
            if rules.len() != 1 && rules.len() != steps {
                return Err(self.err(
                    &c.escalate,
                    format!("{field}.escalate"),
                    format!(
                        "give one rule for every step or one per step ({steps}), not {}",
                        rules.len()
                    ),
                ));
            }
            let mut escalate = Vec::new();
            for j in 0..steps {
                let rule = &rules[if rules.len() == 1 { 0 } else { j }];
                let at = if rules.len() == 1 {
                    format!("{field}.escalate")
                } else {
                    format!("{field}.escalate[{j}]")
                };
                escalate.push(self.escalate(&c.escalate, &at, rule)?);
            }
            let fits: Vec<(&PathBuf, &SampleSpec)> = escalate
                .iter()
                .filter_map(|e| match e {
                    Escalate::Fraction { from, sample, .. } => Some((&from.value, sample)),
                    Escalate::Margin(_) => None,
                })
                .collect();
            if fits.windows(2).any(|w| w[0] != w[1]) {
                return Err(self.err(
                    &c.escalate,
                    format!("{field}.escalate"),
                    "the steps of one cascade are fitted on the same rows: give every `fit` the same `from`, `n` and `seed`",
                ));
            }
            out.push(CascadeSpec {
                id,
                stages,
                escalate,
            });
        }
        Ok(out)
    }

    fn escalate<T>(
        &self,
        at: &Spanned<T>,
        field: &str,
        rule: &raw::RawEscalate,
    ) -> Result<Escalate, Diagnostic> {
        match (rule.margin, rule.fraction, &rule.fit) {
            (Some(m), None, None) if m.is_finite() && m >= 0.0 => Ok(Escalate::Margin(m)),
            (Some(_), None, None) => Err(self.err(
                at,
                format!("{field}.margin"),
                "a margin is a distance in nats between two label log-probs: 0 or more",
            )),
            (None, Some(f), Some(fit)) => {
                if !(f > 0.0 && f < 1.0) {
                    return Err(self.err(
                        at,
                        format!("{field}.fraction"),
                        "a fraction is between 0 and 1 (exclusive)",
                    ));
                }
                if fit.n < 2 {
                    return Err(self.err(at, format!("{field}.fit.n"), "fit on at least 2 rows"));
                }
                Ok(Escalate::Fraction {
                    fraction: f,
                    from: self.located(at, format!("{field}.fit.from"), self.path(&fit.from)),
                    sample: SampleSpec {
                        n: fit.n,
                        stratify: true,
                        seed: fit.seed,
                    },
                })
            }
            (None, Some(_), None) => Err(self.err(
                at,
                format!("{field}.fit"),
                "a `fraction` is turned into a margin threshold on labelled rows that are not scored: add `fit: {from: PATH, n: N, seed: S}`",
            )),
            (Some(_), None, Some(_)) => Err(self.err(
                at,
                format!("{field}.fit"),
                "a `margin` is used as given; `fit` applies to `fraction` only",
            )),
            (Some(_), Some(_), _) => Err(self.err(
                at,
                field,
                "give either `margin` or `fraction`, not both",
            )),
            (None, None, _) => Err(self.err(
                at,
                field,
                "say when a row goes on: `{margin: M}` (nats) or `{fraction: F, fit: {from: PATH, n: N}}`",
            )),
        }
    }

    /// Fixed labels: several values may share a name (one class); names that differ only
    /// in case may not.
    fn labels(&self, l: &Spanned<raw::OrderedMap<String>>) -> Result<Vec<LabelSpec>, Diagnostic> {
        let mut labels: Vec<LabelSpec> = Vec::new();
        for (value, name) in &l.value.0 {
            let n = name.trim();
            if n.is_empty() {
                return Err(self.err(l, "dataset.labels", "label names must not be empty"));
            }
            match labels
                .iter_mut()
                .find(|c| c.name.to_lowercase() == n.to_lowercase())
            {
                Some(class) if class.name == n => class.values.push(value.clone()),
                // Answers are matched to labels case-insensitively.
                Some(other) => {
                    return Err(self.err(
                        l,
                        "dataset.labels",
                        format!(
                            "label names `{}` and `{n}` differ only in case; answers are matched without case, so they could not be told apart (give values of one class the same name)",
                            other.name
                        ),
                    ));
                }
                None => labels.push(LabelSpec {
                    name: n.to_string(),
                    values: vec![value.clone()],
                }),
            }
        }
        if labels.len() < 2 {
            return Err(self.err(
                l,
                "dataset.labels",
                "name at least two labels, e.g. `{0: negative, 1: positive}`",
            ));
        }
        Ok(labels)
    }

    fn dataset(&self, d: raw::RawDataset) -> Result<DatasetSpec, Diagnostic> {
        // The column whose value is each row's gold answer: the label, or the reference.
        let gold = match (&d.label, &d.reference) {
            (Some(l), Some(r)) if l.value != r.value => {
                return Err(self.err(
                    l,
                    "dataset.label",
                    format!(
                        "with reference answers the gold answer is the `reference` column (`{}`): leave out `label`",
                        r.value
                    ),
                ));
            }
            (Some(l), _) => l,
            (None, Some(r)) => r,
            (None, None) => {
                return Err(self.err(
                    &d.path,
                    "dataset.label",
                    "name the column of each row's label (`label: COLUMN`), or of its reference answer (`reference: COLUMN`)",
                ));
            }
        };
        if let Some(r) = &d.reference {
            let other = [
                d.labels.as_ref().map(|l| ("labels", &l.referenced)),
                d.choices.as_ref().map(|c| ("choices", &c.referenced)),
            ];
            if let Some((name, at)) = other.into_iter().flatten().next() {
                return Err(Diagnostic::new(
                    self.loc(at),
                    format!("dataset.{name}"),
                    format!(
                        "a dataset with reference answers (`reference: {}`) has no `{name}`: each answer is scored against its row's reference",
                        r.value
                    ),
                )
                .with_source(self.source));
            }
        }
        let (labels, labels_at) = match (&d.labels, &d.choices, &d.reference) {
            (None, None, Some(r)) => (
                crate::score::OUTCOMES
                    .iter()
                    .map(|o| LabelSpec {
                        name: o.to_string(),
                        values: Vec::new(),
                    })
                    .collect(),
                self.located(r, "dataset.reference", ()),
            ),
            (Some(l), None, _) => (self.labels(l)?, self.located(l, "dataset.labels", ())),
            (None, Some(c), _) => (Vec::new(), self.located(c, "dataset.choices", ())),
            (Some(l), Some(_), _) => {
                return Err(self.err(
                    l,
                    "dataset.labels",
                    "with `choices`, each row's label is its correct choice (its text or its index): leave out `labels`",
                ));
            }
            (None, None, None) => {
                return Err(self.err(
                    gold,
                    "dataset.labels",
                    "name the labels (`labels: {0: negative, 1: positive}`), the column of each row's choices (`choices: COLUMN`), or of its reference answer (`reference: COLUMN`)",
                ));
            }
        };
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
        let clean = match d.clean {
            Some(c) if c.value.replace.0.iter().any(|(from, _)| from.is_empty()) => {
                return Err(self.err(
                    &c,
                    "dataset.clean.replace",
                    "an empty text to replace matches everywhere: give each `replace` key some text",
                ));
            }
            Some(c) => CleanSpec {
                replace: c.value.replace.0,
                collapse_whitespace: c.value.collapse_whitespace,
            },
            None => CleanSpec::default(),
        };
        if let Some(m) = &d.max_text_tokens
            && m.value == 0
        {
            return Err(self.err(m, "dataset.max_text_tokens", "must be at least 1"));
        }
        let max = d.max_text_tokens.as_ref().map(|m| m.value);
        let budget = self.budget(d.truncate.as_ref(), max, "dataset.truncate", true)?;
        Ok(DatasetSpec {
            path: self.located(&d.path, "dataset.path", self.path(&d.path.value)),
            text: self.located(&d.text, "dataset.text", d.text.value.clone()),
            label: self.located(gold, "dataset.label", gold.value.clone()),
            id: d
                .id
                .as_ref()
                .map(|s| self.located(s, "dataset.id", s.value.clone())),
            labels,
            labels_at,
            choices: d
                .choices
                .as_ref()
                .map(|c| self.located(c, "dataset.choices", c.value.clone())),
            reference: d
                .reference
                .as_ref()
                .map(|r| self.located(r, "dataset.reference", r.value.clone())),
            sample,
            clean,
            budget,
        })
    }

    /// The token budget of `truncate` (at `field`) with `max_text_tokens` `max`; `exact`:
    /// an explicit `{head, tail}` must add up to `max` when both are given.
    fn budget(
        &self,
        truncate: Option<&Spanned<RawTruncate>>,
        max: Option<u32>,
        field: &str,
        exact: bool,
    ) -> Result<Option<TextBudget>, Diagnostic> {
        Ok(match (truncate, max) {
            (None, m) => m.map(TextBudget::head),
            (Some(t), m) => match (t.value, m) {
                (RawTruncate::Head, m) => m.map(TextBudget::head),
                (RawTruncate::HeadTail, Some(m)) if m < 3 => {
                    return Err(self.err(
                        t,
                        field,
                        "head_tail keeps a third of the budget from the start: give `max_text_tokens` of 3 or more",
                    ));
                }
                (RawTruncate::HeadTail, Some(m)) => Some(TextBudget::head_tail(m)),
                (RawTruncate::HeadTail, None) => {
                    return Err(self.err(
                        t,
                        field,
                        "head_tail splits a budget: give `dataset.max_text_tokens` too",
                    ));
                }
                (RawTruncate::Split { head, tail }, m) => {
                    let split = TextBudget { head, tail };
                    if split.tokens() == 0 {
                        return Err(self.err(t, field, "keep at least 1 token"));
                    }
                    if exact && m.is_some_and(|m| m != split.tokens()) {
                        return Err(self.err(
                            t,
                            field,
                            format!(
                                "head {head} + tail {tail} is {} tokens, but `max_text_tokens` is {}: give one budget",
                                split.tokens(),
                                m.unwrap_or_default()
                            ),
                        ));
                    }
                    Some(split)
                }
            },
        })
    }

    fn models(
        &self,
        models: Spanned<Vec<raw::RawModel>>,
        prompts: &[PromptSpec],
    ) -> Result<Vec<ModelSpec>, Diagnostic> {
        if models.value.is_empty() {
            return Err(self.err(&models, "models", "list at least one model"));
        }
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (i, m) in models.value.iter().enumerate() {
            let field = format!("models[{i}]");
            let id = self.id(&m.id, &format!("{field}.id"), &mut seen)?;
            let n_ctx = match &m.n_ctx {
                Some(n) if n.value < 64 => {
                    return Err(self.err(n, format!("{field}.n_ctx"), "must be at least 64"));
                }
                Some(n) => n.value,
                None => DEFAULT_N_CTX,
            };
            let mut model = match (&m.gguf, &m.server) {
                (Some(gguf), None) => {
                    self.model_file(id, gguf, m.sha256.as_ref(), &field, n_ctx)?
                }
                (None, Some(server)) => {
                    if let Some(s) = &m.sha256 {
                        return Err(self.err(
                            s,
                            format!("{field}.sha256"),
                            "a served model has no file here to check; the row keys hold what the server says it runs",
                        ));
                    }
                    self.server_model(id, server, &field, n_ctx)?
                }
                (Some(gguf), Some(_)) => {
                    return Err(self.err(
                        gguf,
                        format!("{field}.gguf"),
                        "a model is either a `gguf` file or a `server`, not both",
                    ));
                }
                (None, None) => {
                    return Err(self.err(
                        &m.id,
                        field,
                        "name the model's `gguf` file (a path or `hf:OWNER/REPO/FILE.gguf`) or a `server: {url: ...}`",
                    ));
                }
            };
            model.parameters = match &m.parameters {
                Some(p) if p.value == 0 => {
                    return Err(self.err(
                        p,
                        format!("{field}.parameters"),
                        "a model has at least one parameter (write the count, e.g. 357898112)",
                    ));
                }
                Some(p) => Some(self.located(p, format!("{field}.parameters"), p.value)),
                None => None,
            };
            model.grid = m.grid.as_ref().is_none_or(|g| g.value);
            model.prompts = match &m.prompts {
                Some(list) => {
                    Some(self.model_prompts(list, &format!("{field}.prompts"), prompts)?)
                }
                None => None,
            };
            out.push(model);
        }
        if !out.iter().any(|m| m.grid) {
            return Err(self.err(
                &models,
                "models",
                "every model has `grid: false`; at least one must have cells of its own",
            ));
        }
        Ok(out)
    }

    /// `compare.pairs`: each `[cell, reference]`, located at its own line.
    fn compare_pairs(
        &self,
        pairs: &Spanned<Vec<Spanned<Vec<String>>>>,
    ) -> Result<Vec<ComparePair>, Diagnostic> {
        let mut out = Vec::new();
        for (i, pair) in pairs.value.iter().enumerate() {
            let field = format!("compare.pairs[{i}]");
            let [a, b] = &pair.value[..] else {
                // An unquoted id such as `m/p/generate@t=0.2,seed=1` splits at its comma.
                let hint = if pair.value.len() > 2 {
                    "; quote a cell id that has a comma in it, e.g. \"m/p/generate@t=0.2,seed=1\""
                } else {
                    ""
                };
                return Err(self.err(
                    pair,
                    field,
                    format!(
                        "a pair is `[cell, reference]`, two cell ids, not {}{hint}",
                        pair.value.len()
                    ),
                ));
            };
            out.push((
                self.located(pair, format!("{field}[0]"), a.clone()),
                self.located(pair, format!("{field}[1]"), b.clone()),
            ));
        }
        Ok(out)
    }

    /// A model's `prompts:` list: ids of prompts the spec defines, each once.
    fn model_prompts(
        &self,
        list: &Spanned<Vec<Spanned<String>>>,
        field: &str,
        prompts: &[PromptSpec],
    ) -> Result<Vec<String>, Diagnostic> {
        if list.value.is_empty() {
            return Err(self.err(
                list,
                field,
                "list at least one prompt id, or drop `prompts:` for every prompt (`grid: false` for none)",
            ));
        }
        let known: Vec<&str> = prompts.iter().map(|p| p.id.as_str()).collect();
        self.id_list(list, field, &known, "prompt")
    }

    /// A list of ids of `what` (models, prompts) among `known`, each once.
    fn id_list(
        &self,
        list: &Spanned<Vec<Spanned<String>>>,
        field: &str,
        known: &[&str],
        what: &str,
    ) -> Result<Vec<String>, Diagnostic> {
        if list.value.is_empty() {
            return Err(self.err(
                list,
                field,
                format!("list at least one {what} id, or drop the list for all of them"),
            ));
        }
        let mut out: Vec<String> = Vec::new();
        for (j, id) in list.value.iter().enumerate() {
            let at = format!("{field}[{j}]");
            if !known.contains(&id.value.as_str()) {
                return Err(self.err(
                    id,
                    at,
                    format!(
                        "no {what} `{}`; the {what}s are {}",
                        id.value,
                        known.join(", ")
                    ),
                ));
            }
            if out.contains(&id.value) {
                return Err(self.err(id, at, format!("`{}` is listed twice", id.value)));
            }
            out.push(id.value.clone());
        }
        Ok(out)
    }

    /// `server:` of a model: the endpoint and how requests are made.
    fn server_model(
        &self,
        id: String,
        server: &Spanned<raw::RawServer>,
        field: &str,
        n_ctx: u32,
    ) -> Result<ModelSpec, Diagnostic> {
        let field = format!("{field}.server");
        let s = &server.value;
        let url = s.url.value.trim().trim_end_matches('/').to_string();
        match reqwest::Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                if !u.username().is_empty() || u.password().is_some() {
                    return Err(self.err(
                        &s.url,
                        format!("{field}.url"),
                        "put no credentials in the URL (it is recorded in run.json and reports): name an environment variable in `api_key_env`",
                    ));
                }
            }
            _ => {
                return Err(self.err(
                    &s.url,
                    format!("{field}.url"),
                    "expected an http:// or https:// URL, e.g. http://127.0.0.1:8080/v1",
                ));
            }
        }
        let bounded = |v: &Option<Spanned<u32>>,
                       name: &str,
                       range: std::ops::RangeInclusive<u32>,
                       default: u32| match v {
            Some(n) if !range.contains(&n.value) => Err(self.err(
                n,
                format!("{field}.{name}"),
                format!("must be between {} and {}", range.start(), range.end()),
            )),
            Some(n) => Ok(n.value),
            None => Ok(default),
        };
        let concurrency = bounded(&s.concurrency, "concurrency", 1..=256, 4)?;
        let retries = bounded(&s.retries, "retries", 0..=20, 5)?;
        let timeout_s = match &s.timeout_s {
            Some(t) if !(1..=3600).contains(&t.value) => {
                return Err(self.err(
                    t,
                    format!("{field}.timeout_s"),
                    "must be between 1 and 3600",
                ));
            }
            Some(t) => t.value,
            None => 120,
        };
        let api_key_env = match &s.api_key_env {
            Some(v)
                if v.value.is_empty()
                    || !v
                        .value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                return Err(self.err(
                    v,
                    format!("{field}.api_key_env"),
                    "the name of an environment variable (letters, digits, `_`), not the key itself",
                ));
            }
            Some(v) => Some(v.value.clone()),
            None => None,
        };
        let template = match &s.template {
            Some(t) => {
                let path = self.path(&t.value);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    self.err(
                        t,
                        format!("{field}.template"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Some(text)
            }
            None => None,
        };
        let spec = ServerSpec {
            url,
            model: s.model.as_ref().map(|m| m.value.clone()),
            api_key_env,
            concurrency: concurrency as usize,
            timeout_s,
            retries,
            api: s.api.as_ref().map(|a| a.value).unwrap_or_default(),
            template,
        };
        Ok(ModelSpec {
            id,
            gguf: self.located(server, field, ModelSource::Server(Box::new(spec))),
            sha256: None,
            parameters: None,
            n_ctx,
            grid: true,
            prompts: None,
        })
    }

    /// A model file reference: a local path or `hf:OWNER/REPO/FILE`, and its sha256.
    fn model_file(
        &self,
        id: String,
        gguf: &Spanned<String>,
        sha256: Option<&Spanned<String>>,
        field: &str,
        n_ctx: u32,
    ) -> Result<ModelSpec, Diagnostic> {
        let gguf_field = format!("{field}.gguf");
        let source = match gguf.value.strip_prefix("hf:") {
            Some(rest) => {
                let mut parts = rest.splitn(3, '/');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(o), Some(r), Some(f))
                        if !o.is_empty() && !r.is_empty() && !f.is_empty() =>
                    {
                        let checked = crate::names::check_folder_name(o)
                            .map_err(|e| ("owner", o, e))
                            .and_then(|_| {
                                crate::names::check_folder_name(r).map_err(|e| ("repository", r, e))
                            })
                            .and_then(|_| {
                                crate::names::check_hub_file(f).map_err(|e| ("file", f, e))
                            });
                        if let Err((part, value, why)) = checked {
                            return Err(self.err(
                                gguf,
                                gguf_field,
                                format!(
                                    "the hub model's {part} `{}` {why}; a hub model is written `hf:OWNER/REPO/FILE.gguf` with plain names",
                                    value.escape_debug()
                                ),
                            ));
                        }
                        ModelSource::Hub {
                            owner: o.to_string(),
                            repo: r.to_string(),
                            file: f.to_string(),
                        }
                    }
                    _ => {
                        return Err(self.err(
                            gguf,
                            gguf_field,
                            "a hub model is written `hf:OWNER/REPO/FILE.gguf`",
                        ));
                    }
                }
            }
            None => ModelSource::Path(self.path(&gguf.value)),
        };
        let sha256 = match sha256 {
            Some(s) => {
                let hex = s.value.trim().to_ascii_lowercase();
                if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(self.err(
                        s,
                        format!("{field}.sha256"),
                        "expected 64 hexadecimal digits",
                    ));
                }
                Some(self.located(s, format!("{field}.sha256"), hex))
            }
            None => None,
        };
        Ok(ModelSpec {
            id,
            gguf: self.located(gguf, gguf_field, source),
            sha256,
            parameters: None,
            n_ctx,
            grid: true,
            prompts: None,
        })
    }

    fn embedders(
        &self,
        embedders: Spanned<Vec<raw::RawEmbedder>>,
    ) -> Result<Vec<EmbedderSpec>, Diagnostic> {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (i, e) in embedders.value.iter().enumerate() {
            let field = format!("embedders[{i}]");
            let id = self.id(&e.id, &format!("{field}.id"), &mut seen)?;
            let max_tokens = match &e.max_tokens {
                Some(m) if !(8..=8192).contains(&m.value) => {
                    return Err(self.err(
                        m,
                        format!("{field}.max_tokens"),
                        "must be between 8 and 8192",
                    ));
                }
                Some(m) => m.value,
                None => DEFAULT_EMBED_MAX_TOKENS,
            };
            // The context holds one text at a time: room for its tokens.
            let model = self.model_file(id, &e.gguf, e.sha256.as_ref(), &field, max_tokens)?;
            out.push(EmbedderSpec { model, max_tokens });
        }
        Ok(out)
    }

    /// The index of the embedder named `name`.
    fn embedder(
        &self,
        name: &Spanned<String>,
        field: &str,
        embedders: &[EmbedderSpec],
    ) -> Result<usize, Diagnostic> {
        embedders
            .iter()
            .position(|e| e.model.id == name.value.trim())
            .ok_or_else(|| {
                let known: Vec<&str> = embedders.iter().map(|e| e.model.id.as_str()).collect();
                self.err(
                    name,
                    field,
                    if known.is_empty() {
                        format!("no embedder `{}`: add it under `embedders:`", name.value)
                    } else {
                        format!(
                            "no embedder `{}`; embedders: {}",
                            name.value,
                            known.join(", ")
                        )
                    },
                )
            })
    }

    /// A `knn_vote`'s `pool:` (a sample, never a pooling).
    fn vote_pool(
        &self,
        p: &Spanned<raw::RawMethodPool>,
        field: &str,
    ) -> Result<SampleSpec, Diagnostic> {
        match &p.value {
            raw::RawMethodPool::Sample { n: 0, .. } => {
                Err(self.err(p, format!("{field}.n"), "must be at least 1"))
            }
            raw::RawMethodPool::Sample { n, seed, stratify } => Ok(SampleSpec {
                n: *n,
                stratify: *stratify,
                seed: *seed,
            }),
            raw::RawMethodPool::Pooling(_) => Err(self.err(
                p,
                field,
                "a knn_vote's pool is a sample of its rows: `{n: N, seed: S}`",
            )),
        }
    }

    /// A `kind: probe` method: an embedder's vectors, or a model's hidden states at some
    /// layers and poolings; and the labelled rows it is fitted on.
    fn probe(
        &self,
        m: &raw::RawMethod,
        i: usize,
        embedders: &[EmbedderSpec],
    ) -> Result<ProbeSpec, Diagnostic> {
        let field = format!("methods[{i}]");
        let Some(fit) = &m.fit else {
            return Err(self.err(
                &m.kind,
                &field,
                "`kind: probe` is fitted on labelled rows of another file: add `fit: {from: PATH, n: N, seed: S}`",
            ));
        };
        if fit.value.n < 4 {
            return Err(self.err(fit, format!("{field}.fit.n"), "fit on at least 4 rows"));
        }
        let fit_rows = FitRows {
            from: self.located(fit, format!("{field}.fit.from"), self.path(&fit.value.from)),
            sample: SampleSpec {
                n: fit.value.n,
                stratify: true,
                seed: fit.value.seed,
            },
        };
        let features = match &m.embedder {
            Some(e) => {
                if let Some(l) = &m.layer {
                    return Err(self.err(
                        l,
                        format!("{field}.layer"),
                        "an embedder's probe reads its pooled vector: `layer` applies to a model's hidden states",
                    ));
                }
                if let Some(p) = &m.pool {
                    return Err(self.err(
                        p,
                        format!("{field}.pool"),
                        "an embedder's probe reads its pooled vector: `pool` applies to a model's hidden states",
                    ));
                }
                ProbeFeatures::Embedder(self.embedder(
                    e,
                    &format!("{field}.embedder"),
                    embedders,
                )?)
            }
            None => {
                let layers = match &m.layer {
                    None => vec![Layer::Fraction(0.5)],
                    Some(l) => {
                        let mut out = Vec::new();
                        for x in &l.value.0 {
                            let layer = match *x {
                                raw::RawLayer::Index(i) => {
                                    Layer::Index(u32::try_from(i).map_err(|_| {
                                        self.err(
                                            l,
                                            format!("{field}.layer"),
                                            "no model has that many layers",
                                        )
                                    })?)
                                }
                                raw::RawLayer::Fraction(f) if (0.0..=1.0).contains(&f) => {
                                    Layer::Fraction(f)
                                }
                                raw::RawLayer::Fraction(f) => {
                                    return Err(self.err(
                                        l,
                                        format!("{field}.layer"),
                                        format!("{f} is no layer: give an index (`12`), a fraction of the depth between 0 and 1 (`0.5`) or `last`"),
                                    ));
                                }
                                raw::RawLayer::Last => Layer::Last,
                            };
                            if out.contains(&layer) {
                                return Err(self.err(
                                    l,
                                    format!("{field}.layer"),
                                    format!("layer {layer} is listed twice"),
                                ));
                            }
                            out.push(layer);
                        }
                        if out.is_empty() {
                            return Err(self.err(l, format!("{field}.layer"), "name a layer"));
                        }
                        out
                    }
                };
                let pools = match &m.pool {
                    None => vec![Pooling::Mean],
                    Some(p) => match &p.value {
                        raw::RawMethodPool::Pooling(v) if v.is_empty() => {
                            return Err(self.err(p, format!("{field}.pool"), "name a pooling"));
                        }
                        raw::RawMethodPool::Pooling(v) => {
                            let mut out: Vec<Pooling> = Vec::new();
                            for x in v {
                                if !out.contains(x) {
                                    out.push(*x);
                                }
                            }
                            out
                        }
                        raw::RawMethodPool::Sample { .. } => {
                            return Err(self.err(
                                p,
                                format!("{field}.pool"),
                                "a probe's pool is how hidden states are pooled: `last`, `mean` or a list of them",
                            ));
                        }
                    },
                };
                let features = ProbeFeatures::Hidden { layers, pools };
                if features.states().is_empty() {
                    // Only the last layer's mean was asked for.
                    let why = "the last layer's output is computed only where logits are read, so it has no mean: pool it `last`, or read an earlier layer";
                    return Err(match &m.pool {
                        Some(p) => self.err(p, format!("{field}.pool"), why),
                        None => self.err(&m.kind, format!("{field}.pool"), why),
                    });
                }
                features
            }
        };
        Ok(ProbeSpec {
            features,
            fit: fit_rows,
        })
    }

    fn pool(&self, p: &RawPool, field: &str) -> Result<SampleSpec, Diagnostic> {
        if p.n.value == 0 {
            return Err(self.err(&p.n, format!("{field}.n"), "must be at least 1"));
        }
        Ok(SampleSpec {
            n: p.n.value,
            stratify: p.stratify,
            seed: p.seed,
        })
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
        embedders: &[EmbedderSpec],
        dataset_budget: Option<TextBudget>,
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
                Some(s) => Some(self.shots(s, &format!("prompts[{i}].shots"), embedders)?),
                None => None,
            };
            let budget = match &p.truncate {
                None => dataset_budget,
                Some(t) => self.budget(
                    Some(t),
                    dataset_budget.map(|b| b.tokens()),
                    &format!("prompts[{i}].truncate"),
                    false,
                )?,
            };
            out.push(PromptSpec {
                id,
                system,
                user,
                shots,
                budget,
            });
        }
        Ok(out)
    }

    fn shots(
        &self,
        s: &Spanned<raw::RawShots>,
        field: &str,
        embedders: &[EmbedderSpec],
    ) -> Result<ShotsSpec, Diagnostic> {
        let r = &s.value;
        if r.k.value == 0 {
            return Err(self.err(&r.k, format!("{field}.k"), "must be at least 1"));
        }
        let strategy = r.strategy.value;
        let knn = if strategy == ShotStrategy::Knn {
            let Some(e) = &r.embedder else {
                return Err(self.err(
                    s,
                    field,
                    "`strategy: knn` needs `embedder:` (one of `embedders:`)",
                ));
            };
            Some(KnnSpec {
                embedder: self.embedder(e, &format!("{field}.embedder"), embedders)?,
                pool: match &r.pool {
                    Some(p) => Some(self.pool(p, &format!("{field}.pool"))?),
                    None => None,
                },
                per_label: r.per_label.as_ref().is_some_and(|p| p.value),
                order: r.order.as_ref().map(|o| o.value).unwrap_or_default(),
            })
        } else {
            let knn_only = [
                r.embedder.as_ref().map(|x| ("embedder", &x.referenced)),
                r.pool.as_ref().map(|x| ("pool", &x.n.referenced)),
                r.per_label.as_ref().map(|x| ("per_label", &x.referenced)),
                r.order.as_ref().map(|x| ("order", &x.referenced)),
            ];
            if let Some((name, at)) = knn_only.into_iter().flatten().next() {
                return Err(Diagnostic::new(
                    self.loc(at),
                    format!("{field}.{name}"),
                    format!("`{name}` applies to `strategy: knn` only"),
                )
                .with_source(self.source));
            }
            None
        };
        Ok(ShotsSpec {
            k: r.k.value,
            k_at: self.located(&r.k, format!("{field}.k"), ()),
            strategy,
            seed: r.seed,
            from: self.located(&r.from, format!("{field}.from"), self.path(&r.from.value)),
            max_chars: r.max_chars,
            knn,
        })
    }

    /// With per-row choices, a class is a place (A, B, ...) whose text changes from row to
    /// row: a bias per place fitted on other rows, a probe's classes, a vote of neighbours'
    /// labels have nothing fixed to learn or count.
    fn check_choice_methods(
        &self,
        methods: &Spanned<Vec<raw::RawMethod>>,
    ) -> Result<(), Diagnostic> {
        for (i, m) in methods.value.iter().enumerate() {
            let why = match (m.kind.value, &m.calibrate) {
                (MethodKind::KnnVote, _) => "a `knn_vote` counts neighbours' labels",
                (MethodKind::Probe, _) => "a probe learns one weight vector per fixed label",
                (_, Some(c)) => {
                    return Err(self.err(
                        c,
                        format!("methods[{i}].calibrate"),
                        "with per-row choices (`dataset.choices`) the choices' texts change from row to row, so there is no fixed label bias to calibrate: leave out `calibrate`",
                    ));
                }
                _ => continue,
            };
            return Err(self.err(
                &m.kind,
                format!("methods[{i}].kind"),
                format!(
                    "{why}; with per-row choices (`dataset.choices`) the choices change from row to row: use `loglik` or `generate`"
                ),
            ));
        }
        Ok(())
    }

    /// Reference answers are scored by `generate` methods with a `score`, and only they
    /// use one.
    fn check_scores(
        &self,
        methods: &Spanned<Vec<raw::RawMethod>>,
        reference: bool,
    ) -> Result<(), Diagnostic> {
        for (i, m) in methods.value.iter().enumerate() {
            match (&m.score, reference, m.kind.value) {
                (Some(s), false, _) => {
                    return Err(self.err(
                        s,
                        format!("methods[{i}].score"),
                        "`score` compares an answer with its row's reference answer: name the reference column (`dataset.reference: COLUMN`)",
                    ));
                }
                (None, true, MethodKind::Generate) => {
                    return Err(self.err(
                        &m.kind,
                        format!("methods[{i}].score"),
                        "with reference answers, say how an answer is scored: `score: exact_match`, `contains`, `{regex: PATTERN}` or `{numeric: {tolerance: T}}`",
                    ));
                }
                (_, true, MethodKind::Generate) => {}
                (_, true, _) => {
                    return Err(self.err(
                        &m.kind,
                        format!("methods[{i}].kind"),
                        "with reference answers there are no labels to score, vote or fit: use `generate` with a `score`",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn methods(
        &self,
        methods: Spanned<Vec<raw::RawMethod>>,
        embedders: &[EmbedderSpec],
        models: &[ModelSpec],
        prompts: &[PromptSpec],
    ) -> Result<Vec<MethodSpec>, Diagnostic> {
        if methods.value.is_empty() {
            return Err(self.err(&methods, "methods", "list at least one method"));
        }
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (i, m) in methods.value.iter().enumerate() {
            let id = self.id(&m.id, &format!("methods[{i}].id"), &mut seen)?;
            let kind = m.kind.value;
            let misplaced =
                |options: [Option<(&str, &serde_saphyr::Location)>; 4], owner: &str| match options
                    .into_iter()
                    .flatten()
                    .next()
                {
                    Some((name, at)) => Err(Diagnostic::new(
                        self.loc(at),
                        format!("methods[{i}].{name}"),
                        format!("`{name}` applies to `kind: {owner}` only"),
                    )
                    .with_source(self.source)),
                    None => Ok(()),
                };
            if kind != MethodKind::Generate {
                misplaced(
                    [
                        m.max_tokens.as_ref().map(|s| ("max_tokens", &s.referenced)),
                        m.stop.as_ref().map(|s| ("stop", &s.referenced)),
                        m.parse.as_ref().map(|s| ("parse", &s.referenced)),
                        m.score.as_ref().map(|s| ("score", &s.referenced)),
                    ],
                    "generate",
                )?;
            }
            if kind != MethodKind::Loglik {
                misplaced(
                    [
                        m.calibrate.as_ref().map(|s| ("calibrate", &s.referenced)),
                        None,
                        None,
                        None,
                    ],
                    "loglik",
                )?;
            }
            if kind != MethodKind::KnnVote {
                misplaced(
                    [
                        m.k.as_ref().map(|s| ("k", &s.referenced)),
                        m.from.as_ref().map(|s| ("from", &s.referenced)),
                        None,
                        None,
                    ],
                    "knn_vote",
                )?;
            }
            if !matches!(kind, MethodKind::KnnVote | MethodKind::Probe) {
                misplaced(
                    [
                        m.embedder.as_ref().map(|s| ("embedder", &s.referenced)),
                        m.pool.as_ref().map(|s| ("pool", &s.referenced)),
                        None,
                        None,
                    ],
                    "knn_vote` or `kind: probe",
                )?;
            }
            if kind != MethodKind::Probe {
                misplaced(
                    [
                        m.layer.as_ref().map(|s| ("layer", &s.referenced)),
                        m.fit.as_ref().map(|s| ("fit", &s.referenced)),
                        None,
                        None,
                    ],
                    "probe",
                )?;
            }
            let calibrate = match &m.calibrate {
                None => None,
                Some(c) => Some(match &c.value {
                    RawCalibrate::ContentFree => Calibration::ContentFree,
                    RawCalibrate::Batch => Calibration::Batch,
                    RawCalibrate::Fit(f) => {
                        if f.n < 2 {
                            return Err(self.err(
                                c,
                                format!("methods[{i}].calibrate.fit.n"),
                                "fit on at least 2 rows",
                            ));
                        }
                        Calibration::Fit {
                            from: self.located(
                                c,
                                format!("methods[{i}].calibrate.fit.from"),
                                self.path(&f.from),
                            ),
                            sample: SampleSpec {
                                n: f.n,
                                stratify: true,
                                seed: f.seed,
                            },
                        }
                    }
                }),
            };
            let vote = if kind == MethodKind::KnnVote {
                let field = format!("methods[{i}]");
                let (Some(e), Some(from)) = (&m.embedder, &m.from) else {
                    return Err(self.err(
                        &m.kind,
                        &field,
                        "`kind: knn_vote` needs `embedder:` and `from:` (the labelled rows it votes with)",
                    ));
                };
                let k = match &m.k {
                    Some(k) if k.value == 0 => {
                        return Err(self.err(k, format!("{field}.k"), "must be at least 1"));
                    }
                    Some(k) => self.located(k, format!("{field}.k"), k.value),
                    None => self.located(&m.kind, format!("{field}.k"), DEFAULT_VOTE_K),
                };
                Some(VoteSpec {
                    k,
                    embedder: self.embedder(e, &format!("{field}.embedder"), embedders)?,
                    from: self.located(from, format!("{field}.from"), self.path(&from.value)),
                    pool: match &m.pool {
                        Some(p) => Some(self.vote_pool(p, &format!("{field}.pool"))?),
                        None => None,
                    },
                })
            } else {
                None
            };
            let probe = if kind == MethodKind::Probe {
                Some(self.probe(m, i, embedders)?)
            } else {
                None
            };
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
            let method = match (kind, vote, probe) {
                (MethodKind::Probe, _, Some(probe)) => Method::Probe(probe),
                (MethodKind::KnnVote, Some(vote), _) => Method::KnnVote(vote),
                (MethodKind::Loglik, _, _) => Method::Loglik { calibrate },
                _ => Method::Generate(GenerateSpec {
                    max_tokens,
                    stop,
                    parse: m.parse.as_ref().map(|p| p.value).unwrap_or_default(),
                    score: m.score.as_ref().map(|s| s.value.clone()),
                }),
            };
            let known_models: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
            let known_prompts: Vec<&str> = prompts.iter().map(|p| p.id.as_str()).collect();
            let restrict = |list: &Option<Spanned<Vec<Spanned<String>>>>,
                            name: &str,
                            known: &[&str]|
             -> Result<Option<Vec<String>>, Diagnostic> {
                let Some(l) = list else { return Ok(None) };
                let field = format!("methods[{i}].{name}s");
                if kind == MethodKind::KnnVote {
                    return Err(self.err(
                        l,
                        field,
                        "a knn_vote cell has no model or prompt: `models` and `prompts` apply to model cells",
                    ));
                }
                self.id_list(l, &field, known, name).map(Some)
            };
            out.push(MethodSpec {
                id,
                method,
                models: restrict(&m.models, "model", &known_models)?,
                prompts: restrict(&m.prompts, "prompt", &known_prompts)?,
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
            Some(r) if u64::from(r.value) > MAX_GRID_CELLS => {
                return Err(self.err(
                    r,
                    "sampling.repeats",
                    format!(
                        "{} repeats is more than the {MAX_GRID_CELLS} cells a spec may have",
                        r.value
                    ),
                ));
            }
            Some(r) => r.value,
            None => 1,
        };
        let grid = SamplingGrid {
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
        };
        if grid.point_count() > MAX_GRID_CELLS {
            return Err(Diagnostic::new(
                SourceLoc::file_only(&self.file),
                "sampling",
                format!(
                    "the sampling grid has {} points, more than the {MAX_GRID_CELLS} cells a spec may have",
                    grid.point_count()
                ),
            ));
        }
        Ok(grid)
    }
}

/// Most cells one spec may expand to: a spec is checked before anything is allocated for
/// its grid, so a typo (`repeats: 1000000`) is an error, not an out-of-memory abort.
pub const MAX_GRID_CELLS: u64 = 20_000;

/// Most rows (cells × sampled dataset rows) one spec may plan.
pub const MAX_GRID_ROWS: u64 = 5_000_000;

/// The cells a spec's grid expands to, counted without expanding it.
fn grid_cells(
    models: &[ModelSpec],
    prompts: &[PromptSpec],
    methods: &[MethodSpec],
    sampling: &SamplingGrid,
) -> u64 {
    let per_method = |m: &MethodSpec| match m.kind() {
        MethodKind::Generate => sampling.point_count(),
        _ => 1,
    };
    let mut cells = 0u64;
    for model in models {
        for p in prompts.iter().filter(|p| model.has_cells(&p.id)) {
            for m in methods.iter().filter(|m| m.has_cells(&model.id, &p.id)) {
                cells = cells.saturating_add(per_method(m));
            }
        }
    }
    cells
}

#[cfg(test)]
mod tests;
