//! The spec file as written: serde types that mirror the YAML one to one.
//! Every field a later check may complain about is `Spanned`, so errors can point at it.

use std::fmt;
use std::marker::PhantomData;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

pub use super::spanned::Spanned;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub dataset: RawDataset,
    pub models: Spanned<Vec<RawModel>>,
    pub prompts: Spanned<Vec<RawPrompt>>,
    pub methods: Spanned<Vec<RawMethod>>,
    #[serde(default)]
    pub sampling: Option<RawSampling>,
    #[serde(default)]
    pub report: Option<RawReport>,
    #[serde(default)]
    pub compare: Option<RawCompare>,
    #[serde(default)]
    pub embedders: Option<Spanned<Vec<RawEmbedder>>>,
    #[serde(default)]
    pub cascades: Option<Spanned<Vec<RawCascade>>>,
    #[serde(default)]
    pub ensembles: Option<Spanned<Vec<RawEnsemble>>>,
}

/// An ensemble: the members' label probabilities averaged, with weights or equally.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEnsemble {
    pub id: Spanned<String>,
    pub cells: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub weights: Option<Spanned<Vec<f64>>>,
}

/// A cascade: `first` answers every row; rows it is unsure of go on to `then` (a cell, or
/// a list of cells for a longer chain).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCascade {
    pub id: Spanned<String>,
    pub first: Spanned<String>,
    pub then: Spanned<OneOrMany<String>>,
    /// One rule for every step, or one per step.
    pub escalate: Spanned<OneOrMany<RawEscalate>>,
}

/// When a row goes on to the next cell: `{margin: M}` or `{fraction: F, fit: {from, n, seed}}`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEscalate {
    #[serde(default)]
    pub margin: Option<f64>,
    #[serde(default)]
    pub fraction: Option<f64>,
    #[serde(default)]
    pub fit: Option<RawFit>,
}

/// A sentence-embedding model (llama.cpp with embeddings on).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEmbedder {
    pub id: Spanned<String>,
    pub gguf: Spanned<String>,
    #[serde(default)]
    pub sha256: Option<Spanned<String>>,
    #[serde(default)]
    pub max_tokens: Option<Spanned<u32>>,
}

/// Rows drawn from a labelled file: all of them, or a seeded sample.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub n: Spanned<usize>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "yes")]
    pub stratify: bool,
}

/// Which cells to compare on paired rows.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCompare {
    /// Compare every other cell with this one.
    #[serde(default)]
    pub baseline: Option<Spanned<String>>,
    /// Explicit pairs `[cell, reference]`.
    #[serde(default)]
    pub pairs: Option<Spanned<Vec<Spanned<Vec<String>>>>>,
    #[serde(default)]
    pub bootstrap: Option<RawBootstrap>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBootstrap {
    #[serde(default = "default_resamples")]
    pub resamples: Spanned<usize>,
    #[serde(default)]
    pub seed: u64,
}

fn default_resamples() -> Spanned<usize> {
    Spanned::new(
        2000,
        super::spanned::Location::UNKNOWN,
        super::spanned::Location::UNKNOWN,
    )
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDataset {
    pub path: Spanned<String>,
    pub text: Spanned<String>,
    /// The label column; with reference answers, the reference column stands in for it.
    #[serde(default)]
    pub label: Option<Spanned<String>>,
    #[serde(default)]
    pub id: Option<Spanned<String>>,
    /// Fixed labels: each label value and its name. Absent with `choices`.
    #[serde(default)]
    pub labels: Option<Spanned<OrderedMap<String>>>,
    /// Choices that differ per row: the column holding each row's list.
    #[serde(default)]
    pub choices: Option<Spanned<String>>,
    /// Free answers: the column of each row's reference answer (no labels).
    #[serde(default)]
    pub reference: Option<Spanned<String>>,
    #[serde(default)]
    pub sample: Option<RawSample>,
    #[serde(default)]
    pub clean: Option<Spanned<RawClean>>,
    #[serde(default)]
    pub max_text_tokens: Option<Spanned<u32>>,
    #[serde(default)]
    pub truncate: Option<Spanned<RawTruncate>>,
}

/// Which tokens of a long text are kept: `head` (the default), `head_tail`, or
/// `{head: H, tail: T}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawTruncate {
    Head,
    HeadTail,
    Split { head: u32, tail: u32 },
}

impl<'de> Deserialize<'de> for RawTruncate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawTruncate;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`head`, `head_tail` or a map `{head: H, tail: T}`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTruncate, E> {
                match v {
                    "head" => Ok(RawTruncate::Head),
                    "head_tail" => Ok(RawTruncate::HeadTail),
                    other => Err(de::Error::unknown_variant(other, &["head", "head_tail"])),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawTruncate, A::Error> {
                let (mut head, mut tail) = (None, None);
                while let Some(k) = map.next_key::<String>()? {
                    let slot = match k.as_str() {
                        "head" => &mut head,
                        "tail" => &mut tail,
                        other => return Err(de::Error::unknown_field(other, &["head", "tail"])),
                    };
                    if slot.is_some() {
                        return Err(de::Error::custom(format!("duplicate field `{k}`")));
                    }
                    *slot = Some(map.next_value::<u32>()?);
                }
                Ok(RawTruncate::Split {
                    head: head.ok_or_else(|| de::Error::missing_field("head"))?,
                    tail: tail.ok_or_else(|| de::Error::missing_field("tail"))?,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSample {
    pub n: Spanned<usize>,
    #[serde(default = "yes")]
    pub stratify: bool,
    #[serde(default)]
    pub seed: u64,
}

fn default_strategy() -> Spanned<ShotStrategy> {
    Spanned::new(
        ShotStrategy::default(),
        super::spanned::Location::UNKNOWN,
        super::spanned::Location::UNKNOWN,
    )
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawClean {
    #[serde(default)]
    pub replace: OrderedMap<String>,
    #[serde(default)]
    pub collapse_whitespace: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub id: Spanned<String>,
    /// A GGUF file run in-process (a path or `hf:OWNER/REPO/FILE`)...
    #[serde(default)]
    pub gguf: Option<Spanned<String>>,
    /// ... or a model behind an OpenAI-compatible server.
    #[serde(default)]
    pub server: Option<Spanned<RawServer>>,
    #[serde(default)]
    pub sha256: Option<Spanned<String>>,
    #[serde(default)]
    pub n_ctx: Option<Spanned<u32>>,
    /// The model's non-embedding parameter count (every weight but the token embedding and
    /// the output head): checked against the GGUF header where the file is here, and the
    /// only source for a served model (compute cost, issue #31).
    #[serde(default)]
    pub parameters: Option<Spanned<u64>>,
    /// `false`: no cells of its own; the model runs only the rows a cascade escalates to it.
    #[serde(default)]
    pub grid: Option<Spanned<bool>>,
    /// The prompts this model has cells for (default: every prompt).
    #[serde(default)]
    pub prompts: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `server:` of a model: where it is served and how to talk to it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub url: Spanned<String>,
    #[serde(default)]
    pub model: Option<Spanned<String>>,
    #[serde(default)]
    pub api_key_env: Option<Spanned<String>>,
    #[serde(default)]
    pub concurrency: Option<Spanned<u32>>,
    #[serde(default)]
    pub timeout_s: Option<Spanned<u64>>,
    #[serde(default)]
    pub retries: Option<Spanned<u32>>,
    #[serde(default)]
    pub api: Option<Spanned<ServerApi>>,
    /// A chat template file (Jinja, as in a GGUF's metadata) used instead of the server's.
    #[serde(default)]
    pub template: Option<Spanned<String>>,
}

/// Which endpoint a server model's prompts go to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, JsonSchema, serde::Serialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum ServerApi {
    /// The tool applies the chat template and sends the text to the completions endpoint:
    /// the server sees the tokens the in-process engine would.
    #[default]
    Completions,
    /// Messages to the chat endpoint; the server applies its own template.
    Chat,
}

impl ServerApi {
    pub fn as_str(&self) -> &'static str {
        match self {
            ServerApi::Completions => "completions",
            ServerApi::Chat => "chat",
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPrompt {
    pub id: Spanned<String>,
    #[serde(default)]
    pub system: Option<Spanned<TemplateRef>>,
    pub user: Spanned<TemplateRef>,
    #[serde(default)]
    pub shots: Option<Spanned<RawShots>>,
    /// Which tokens of a long text this prompt keeps (default: the dataset's `truncate`).
    #[serde(default)]
    pub truncate: Option<Spanned<RawTruncate>>,
}

/// A template given inline (a string) or by file (`{file: path}`).
#[derive(Debug, Clone, PartialEq)]
pub enum TemplateRef {
    Inline(String),
    File(String),
}

impl<'de> Deserialize<'de> for TemplateRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TemplateRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an inline template string or a map `{file: PATH}`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TemplateRef, E> {
                Ok(TemplateRef::Inline(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TemplateRef, A::Error> {
                let mut file = None;
                while let Some(k) = map.next_key::<String>()? {
                    match k.as_str() {
                        "file" if file.is_none() => file = Some(map.next_value::<String>()?),
                        "file" => return Err(de::Error::duplicate_field("file")),
                        other => return Err(de::Error::unknown_field(other, &["file"])),
                    }
                }
                file.map(TemplateRef::File)
                    .ok_or_else(|| de::Error::missing_field("file"))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawShots {
    pub k: Spanned<usize>,
    #[serde(default = "default_strategy")]
    pub strategy: Spanned<ShotStrategy>,
    #[serde(default)]
    pub seed: u64,
    pub from: Spanned<String>,
    #[serde(default)]
    pub max_chars: Option<usize>,
    /// `knn` only: the embedder, the pool drawn from `from`, one list per label or not,
    /// and where the nearest example goes.
    #[serde(default)]
    pub embedder: Option<Spanned<String>>,
    #[serde(default)]
    pub pool: Option<RawPool>,
    #[serde(default)]
    pub per_label: Option<Spanned<bool>>,
    #[serde(default)]
    pub order: Option<Spanned<ShotOrder>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShotStrategy {
    #[default]
    Balanced,
    Random,
    /// The examples most similar to the row (cosine of sentence embeddings).
    Knn,
}

/// Order of retrieved examples in the prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShotOrder {
    /// The most similar example last, right before the row.
    #[default]
    NearestLast,
    NearestFirst,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMethod {
    pub id: Spanned<String>,
    pub kind: Spanned<MethodKind>,
    #[serde(default)]
    pub max_tokens: Option<Spanned<u32>>,
    #[serde(default)]
    pub stop: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub parse: Option<Spanned<ParseRule>>,
    /// `loglik` only.
    #[serde(default)]
    pub calibrate: Option<Spanned<RawCalibrate>>,
    /// `generate` with `dataset.reference`: how an answer is scored against the reference.
    #[serde(default)]
    pub score: Option<Spanned<crate::score::Score>>,
    /// `knn_vote` only: neighbours, the embedder, the labelled file and its pool.
    #[serde(default)]
    pub k: Option<Spanned<usize>>,
    #[serde(default)]
    pub embedder: Option<Spanned<String>>,
    #[serde(default)]
    pub from: Option<Spanned<String>>,
    /// `knn_vote`: the pool sample (`{n, seed}`); `probe`: the pooling of hidden states
    /// (`last`, `mean`, or a list).
    #[serde(default)]
    pub pool: Option<Spanned<RawMethodPool>>,
    /// `probe` only: the layers whose hidden states it reads (one, or a list to choose
    /// from on the fit rows), and the labelled rows it is fitted on.
    #[serde(default)]
    pub layer: Option<Spanned<OneOrMany<RawLayer>>>,
    #[serde(default)]
    pub fit: Option<Spanned<RawFit>>,
    /// The models and prompts this method has cells for (default: all of them).
    #[serde(default)]
    pub models: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub prompts: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A method's `pool:`: a `knn_vote` pool sample (a map) or a probe's pooling (a name or a
/// list of names).
#[derive(Debug, Clone, PartialEq)]
pub enum RawMethodPool {
    Sample { n: usize, seed: u64, stratify: bool },
    Pooling(Vec<Pooling>),
}

impl<'de> Deserialize<'de> for RawMethodPool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        struct Sample {
            n: usize,
            #[serde(default)]
            seed: u64,
            #[serde(default = "yes")]
            stratify: bool,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawMethodPool;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a pool sample `{n: N, seed: S}` (knn_vote) or a pooling `last`, `mean` or a list of them (probe)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawMethodPool, E> {
                Pooling::deserialize(de::value::StrDeserializer::new(v))
                    .map(|p| RawMethodPool::Pooling(vec![p]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawMethodPool, A::Error> {
                let mut out = Vec::new();
                while let Some(p) = seq.next_element()? {
                    out.push(p);
                }
                Ok(RawMethodPool::Pooling(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawMethodPool, A::Error> {
                let s = Sample::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawMethodPool::Sample {
                    n: s.n,
                    seed: s.seed,
                    stratify: s.stratify,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A layer: its index (`12`), a fraction of the depth (`0.5`), or `last`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RawLayer {
    Index(u64),
    Fraction(f64),
    Last,
}

impl<'de> Deserialize<'de> for RawLayer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawLayer;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a layer index (`12`), a fraction of the depth (`0.5`) or `last`")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawLayer, E> {
                Ok(RawLayer::Index(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawLayer, E> {
                u64::try_from(v)
                    .map(RawLayer::Index)
                    .map_err(|_| E::custom("a layer index is 0 or more"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawLayer, E> {
                Ok(RawLayer::Fraction(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawLayer, E> {
                match v {
                    "last" => Ok(RawLayer::Last),
                    other => Err(de::Error::unknown_variant(other, &["last"])),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Which positions' hidden states a probe reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, JsonSchema, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The last prompt token: where the answer's first token is predicted.
    Last,
    /// The mean over the row's own tokens: every prompt token after the prefix that all
    /// rows of the prompt share (the text, and the template's few tokens after it).
    Mean,
}

impl Pooling {
    /// Its name as specs write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Last => "last",
            Pooling::Mean => "mean",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodKind {
    Generate,
    Loglik,
    /// No model: the similarity-weighted label vote of the nearest pool examples.
    KnnVote,
    /// A logistic regression on a model's hidden states (or an embedder's vectors), fitted
    /// on labelled rows of another file.
    Probe,
}

/// `calibrate: content_free`, `calibrate: batch` or `calibrate: {fit: {from, n, seed}}`.
#[derive(Debug, Clone, PartialEq)]
pub enum RawCalibrate {
    ContentFree,
    Batch,
    Fit(RawFit),
}

#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawFit {
    pub from: String,
    pub n: usize,
    #[serde(default)]
    pub seed: u64,
}

impl<'de> Deserialize<'de> for RawCalibrate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawCalibrate;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`content_free`, `batch` or a map `{fit: {from: PATH, n: N, seed: S}}`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawCalibrate, E> {
                match v {
                    "content_free" => Ok(RawCalibrate::ContentFree),
                    "batch" => Ok(RawCalibrate::Batch),
                    other => Err(de::Error::unknown_variant(
                        other,
                        &["content_free", "batch", "fit"],
                    )),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawCalibrate, A::Error> {
                let mut fit = None;
                while let Some(k) = map.next_key::<String>()? {
                    match k.as_str() {
                        "fit" if fit.is_none() => fit = Some(map.next_value::<RawFit>()?),
                        "fit" => return Err(de::Error::duplicate_field("fit")),
                        other => return Err(de::Error::unknown_field(other, &["fit"])),
                    }
                }
                fit.map(RawCalibrate::Fit)
                    .ok_or_else(|| de::Error::missing_field("fit"))
            }
        }
        d.deserialize_any(V)
    }
}

/// How a generated answer is mapped to a label.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParseRule {
    /// The label name that occurs first, as a whole word, case-insensitively.
    #[default]
    FirstLabel,
    /// The whole answer, trimmed of spaces and punctuation, equals a label name.
    Exact,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSampling {
    #[serde(default)]
    pub temperature: Option<Spanned<OneOrMany<f64>>>,
    #[serde(default)]
    pub top_p: Option<Spanned<OneOrMany<f64>>>,
    #[serde(default)]
    pub top_k: Option<Spanned<OneOrMany<i32>>>,
    #[serde(default)]
    pub min_p: Option<Spanned<OneOrMany<f64>>>,
    #[serde(default)]
    pub seed: Option<Spanned<OneOrMany<u64>>>,
    #[serde(default)]
    pub repeats: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawReport {
    #[serde(default)]
    pub title: Option<String>,
}

/// A value or a list of values (`temperature: 0.2` or `temperature: [0.2, 0.8]`).
#[derive(Debug, Clone, PartialEq)]
pub struct OneOrMany<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(OneOrMany(out))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                T::deserialize(de::value::I64Deserializer::new(v)).map(|x| OneOrMany(vec![x]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                T::deserialize(de::value::U64Deserializer::new(v)).map(|x| OneOrMany(vec![x]))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                T::deserialize(de::value::F64Deserializer::new(v)).map(|x| OneOrMany(vec![x]))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                T::deserialize(de::value::StrDeserializer::new(v)).map(|x| OneOrMany(vec![x]))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|x| OneOrMany(vec![x]))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A YAML mapping whose keys may be any scalar (e.g. `0: negative`), kept in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

/// A scalar key read as text: `0`, `yes`, `"pos"` all become strings.
struct ScalarKey(String);

impl<'de> Deserialize<'de> for ScalarKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ScalarKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ScalarKey, E> {
                Ok(ScalarKey(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ScalarKey, E> {
                Ok(ScalarKey(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ScalarKey, E> {
                Ok(ScalarKey(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ScalarKey, E> {
                Ok(ScalarKey(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some(ScalarKey(k)) = map.next_key()? {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(de::Error::custom(format!("duplicate key `{k}`")));
                    }
                    out.push((k, map.next_value()?));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}

// JSON Schema of the types read by hand above: what each accepts, as its visitor does.

impl JsonSchema for RawTruncate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Truncate".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Which tokens of a long text are kept: `head` (the default), `head_tail` (a third from the start, two thirds from the end) or `{head: H, tail: T}`.",
            "oneOf": [
                {"type": "string", "enum": ["head", "head_tail"]},
                {"type": "object", "properties": {"head": {"type": "integer", "minimum": 0}, "tail": {"type": "integer", "minimum": 0}},
                 "required": ["head", "tail"], "additionalProperties": false}
            ]
        })
    }
}

impl JsonSchema for TemplateRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Template".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A minijinja template inline, or `{file: PATH}` (relative to the spec).",
            "oneOf": [
                {"type": "string"},
                {"type": "object", "properties": {"file": {"type": "string"}}, "required": ["file"], "additionalProperties": false}
            ]
        })
    }
}

impl JsonSchema for RawMethodPool {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "MethodPool".into()
    }
    fn json_schema(g: &mut SchemaGenerator) -> Schema {
        let pooling = g.subschema_for::<Pooling>();
        json_schema!({
            "description": "`knn_vote`: the pool sample `{n, seed, stratify}`; `probe`: the pooling of hidden states (`last`, `mean`, or a list).",
            "oneOf": [
                {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}, "seed": {"type": "integer", "minimum": 0}, "stratify": {"type": "boolean"}},
                 "required": ["n"], "additionalProperties": false},
                pooling,
                {"type": "array", "items": pooling}
            ]
        })
    }
}

impl JsonSchema for RawLayer {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Layer".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A layer: its index (`12`), a fraction of the depth (`0.5`), or `last`.",
            "oneOf": [
                {"type": "integer", "minimum": 0},
                {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                {"const": "last"}
            ]
        })
    }
}

impl JsonSchema for RawCalibrate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Calibrate".into()
    }
    fn json_schema(g: &mut SchemaGenerator) -> Schema {
        let fit = g.subschema_for::<RawFit>();
        json_schema!({
            "description": "`content_free`, `batch`, or `{fit: {from: PATH, n: N, seed: S}}`.",
            "oneOf": [
                {"type": "string", "enum": ["content_free", "batch"]},
                {"type": "object", "properties": {"fit": fit}, "required": ["fit"], "additionalProperties": false}
            ]
        })
    }
}

impl<T: JsonSchema> JsonSchema for OneOrMany<T> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        format!("OneOrMany_{}", T::schema_name()).into()
    }
    fn json_schema(g: &mut SchemaGenerator) -> Schema {
        let one = g.subschema_for::<T>();
        json_schema!({
            "description": "A value or a list of values.",
            "anyOf": [one, {"type": "array", "items": one, "minItems": 1}]
        })
    }
}

impl<V: JsonSchema> JsonSchema for OrderedMap<V> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        format!("Map_{}", V::schema_name()).into()
    }
    fn json_schema(g: &mut SchemaGenerator) -> Schema {
        // Plain scalars are read as text where text is expected (`1: 1`, `yes: no`).
        let value = if V::schema_name() == "string" {
            json_schema!({"type": ["string", "number", "boolean"]})
        } else {
            g.subschema_for::<V>()
        };
        json_schema!({
            "description": "A mapping whose keys may be any scalar (`0: negative`), kept in file order.",
            "type": "object",
            "additionalProperties": value
        })
    }
}
