//! What the server needs of a plan to answer a new text exactly as `pipeline run` would:
//! the same clean-up, the same retrieved examples, the same rendered prompt and so the same
//! row key, the same task and the same calibration.

use crate::answer::{argmax, parse_answer};
use crate::backend::Task;
use crate::calibrate::{self, Params};
use crate::dataset::{self, Row};
use crate::key::{CacheKey, Components, Digest, PromptPart};
use crate::neighbours::{self, Neighbours, PoolEntry, Query, Search};
use crate::plan::{Cell, Plan, Shown, Source, embedding_key};
use crate::prompt::{Example, Messages, Prompts};
use crate::spec::{CleanSpec, ParseRule};

/// A pool with its embeddings loaded.
pub struct LoadedPool {
    pub rows: Vec<Row>,
    pub vectors: Vec<Vec<f32>>,
}

impl LoadedPool {
    fn entries(&self) -> Vec<PoolEntry<'_>> {
        self.rows
            .iter()
            .zip(&self.vectors)
            .map(|(r, v)| PoolEntry {
                id: &r.id,
                text: &r.text,
                label: r.label,
                vector: v,
            })
            .collect()
    }

    /// The query's neighbours; a served text has no id, so the leak guard matches its
    /// text.
    pub fn search(&self, text: &str, vector: &[f32], how: Search) -> Neighbours {
        let q = Query {
            id: "\u{0}served",
            text,
            vector,
        };
        neighbours::search(&self.entries(), &[q], how).remove(0)
    }
}

/// How the cell computes an answer.
pub enum Kind {
    Llm {
        prompt: usize,
        task: Task,
        /// A `generate` cell's answer parsing (`None`: the cell scores the labels).
        parse: Option<ParseRule>,
        /// The key components every row of the cell shares (all but the prompt).
        fixed: Box<Components>,
        calibration: Option<Params>,
        /// The retrieval of a knn prompt: its pool index into `pools` and how it searches.
        retrieval: Option<(usize, Search)>,
        /// The most prompt tokens a cached row may have to serve this cell (its `n_ctx`).
        prompt_limit: Option<u32>,
    },
    Vote {
        pool: usize,
        search: Search,
    },
}

pub struct Scorer {
    pub cell: String,
    pub labels: Vec<String>,
    pub clean: CleanSpec,
    pub prompts: std::sync::Arc<Prompts>,
    pub kind: Kind,
    pub pools: Vec<LoadedPool>,
    /// The pool similar rows come from, if the spec has one.
    pub similar_pool: Option<usize>,
    /// The embedder and the facts its embedding keys need, when anything needs a vector.
    pub embedder: Option<EmbedderKey>,
}

/// A text's embedding key (`None` when the embedder's digest is unknown).
pub type EmbeddingKeyFn = dyn Fn(&str) -> Option<Digest> + Send + Sync;

/// What an embedding key is made of, besides the text.
#[derive(Clone)]
pub struct EmbedderKey {
    pub index: usize,
    pub key_of: std::sync::Arc<EmbeddingKeyFn>,
}

/// A text ready to score: its rendered prompt and row key (LLM cells), or its vote.
pub struct Prepared {
    pub text: String,
    pub messages: Option<Messages>,
    pub examples: Option<Vec<Example>>,
    pub shown: Option<Shown>,
    pub components: Option<Components>,
    pub key: Option<Digest>,
    /// A vote cell's label shares.
    pub vote: Option<Vec<f64>>,
}

/// An answer as the API gives it.
pub struct Answer {
    /// The label answered (`None`: the answer names none).
    pub label: Option<String>,
    pub confidence: Option<f64>,
    pub label_probs: Option<Vec<(String, f64)>>,
    pub raw_answer: Option<String>,
    /// The label log-probs the answer was read from (calibrated where the cell is).
    pub scores: Option<Vec<f64>>,
}

impl Answer {
    /// Nats between the two best labels' log-probs, exactly as a cascade measures a row
    /// in a run; an answer that names no label has none.
    pub fn margin(&self) -> f64 {
        let Some(lp) = self.scores.as_ref().filter(|_| self.label.is_some()) else {
            return f64::NEG_INFINITY;
        };
        let mut sorted = lp.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        match sorted.as_slice() {
            [a, b, ..] => a - b,
            _ => f64::NEG_INFINITY,
        }
    }
}

/// Why a cell cannot be served, or a text not prepared.
#[derive(Debug, thiserror::Error)]
pub enum ScorerError {
    #[error("the pool's embeddings are not all computed")]
    PoolNotEmbedded,
    #[error("a cascade is served stage by stage, each with a scorer")]
    Cascade,
    #[error("an ensemble is not served: serve one of its members")]
    Ensemble,
    #[error("a probe is not served: serve a `loglik` cell")]
    Probe,
    #[error(
        "a spec with per-row choices (`dataset.choices`) is not served: a request holds a text, not its choices"
    )]
    Choices,
    #[error(
        "a spec with reference answers (`dataset.reference`) is not served: a request has no reference to score its answer against"
    )]
    Reference,
    #[error("no embedding")]
    NoEmbedding,
    #[error("the cell's model digest is not known")]
    ModelDigestUnknown,
    #[error(transparent)]
    Render(#[from] crate::diag::Diagnostic),
}

impl Scorer {
    /// The scorer of a model or vote cell of a plan (a reported cell or a cascade's stage)
    /// whose embeddings are all in the store (`vectors` reads one) and whose calibration, if
    /// any, is fitted (`calibration`).
    pub fn new(
        plan: &Plan,
        c: &Cell,
        vectors: &dyn Fn(&Option<Digest>) -> Option<Vec<f32>>,
        calibration: Option<Params>,
    ) -> Result<Self, ScorerError> {
        let mut pools = Vec::new();
        let mut load_pool = |i: usize| -> Result<usize, ScorerError> {
            let p = &plan.pools[i];
            let v: Option<Vec<Vec<f32>>> = p.keys.iter().map(vectors).collect();
            pools.push(LoadedPool {
                rows: p.rows.clone(),
                vectors: v.ok_or(ScorerError::PoolNotEmbedded)?,
            });
            Ok(pools.len() - 1)
        };
        match plan.spec.dataset.shape() {
            crate::spec::TaskShape::Choices => return Err(ScorerError::Choices),
            crate::spec::TaskShape::Reference => return Err(ScorerError::Reference),
            crate::spec::TaskShape::Labels => {}
        }
        let method = &plan.spec.methods[c.method];
        if method.probe().is_some() {
            // Its answer needs the row's hidden states, which a served request's
            // evaluation does not keep.
            return Err(ScorerError::Probe);
        }
        let retrieval_of =
            |serves: crate::plan::Serves| plan.retrievals.iter().find(|r| r.serves == serves);
        let kind = match c.source {
            Source::Cascade { .. } => {
                return Err(ScorerError::Cascade);
            }
            Source::Ensemble { .. } => {
                return Err(ScorerError::Ensemble);
            }
            Source::Embedding { .. } => {
                return Err(ScorerError::Probe);
            }
            Source::Vote { retrieval } => {
                let r = &plan.retrievals[retrieval];
                Kind::Vote {
                    pool: load_pool(r.pool)?,
                    search: r.search,
                }
            }
            Source::Llm { prompt, .. } => {
                let fixed = c
                    .rows
                    .iter()
                    .flatten()
                    .next()
                    .ok_or(ScorerError::ModelDigestUnknown)?;
                let retrieval = match retrieval_of(crate::plan::Serves::Prompt(prompt)) {
                    Some(r) => Some((load_pool(r.pool)?, r.search)),
                    None => None,
                };
                Kind::Llm {
                    prompt,
                    task: plan.task(c),
                    parse: method.generate().map(|g| g.parse),
                    fixed: Box::new(fixed),
                    calibration,
                    retrieval,
                    prompt_limit: plan.prompt_limit(c),
                }
            }
        };
        // Similar rows come from the cell's own pool, else the spec's first one.
        let similar_pool = match &kind {
            Kind::Vote { pool, .. } => Some(*pool),
            Kind::Llm {
                retrieval: Some((pool, _)),
                ..
            } => Some(*pool),
            _ => match plan.retrievals.first() {
                Some(r) => Some(load_pool(r.pool)?),
                None => None,
            },
        };
        let embedder = plan.retrievals.first().map(|r| {
            let index = plan.pools[r.pool].embedder;
            let spec = plan.spec.clone();
            let embedders = plan.embedders.clone();
            let engine = plan.engine_version.clone();
            EmbedderKey {
                index,
                key_of: std::sync::Arc::new(move |text: &str| {
                    embedding_key(&spec, &embedders, index, text, &engine)
                }),
            }
        });
        Ok(Self {
            cell: c.id.clone(),
            labels: plan.dataset.label_names(),
            clean: plan.spec.dataset.clean.clone(),
            prompts: plan.prompts.clone(),
            kind,
            pools,
            similar_pool,
            embedder,
        })
    }

    /// The text as the study's rows are: cleaned the same way.
    pub fn clean(&self, text: &str) -> String {
        dataset::clean(text, &self.clean)
    }

    /// Whether answering needs the text's embedding (retrieved examples, a vote, or
    /// similar rows).
    pub fn needs_vector(&self, similar: bool) -> bool {
        self.embedder.is_some()
            && (similar
                || matches!(self.kind, Kind::Vote { .. })
                || matches!(
                    self.kind,
                    Kind::Llm {
                        retrieval: Some(_),
                        ..
                    }
                ))
    }

    /// Render a text's prompt and compute its row key, as the plan does for a row.
    pub fn prepare(&self, text: String, vector: Option<&[f32]>) -> Result<Prepared, ScorerError> {
        match &self.kind {
            Kind::Vote { pool, search } => {
                let v = vector.ok_or(ScorerError::NoEmbedding)?;
                let p = &self.pools[*pool];
                let n = p.search(&text, v, *search);
                let shares = neighbours::vote(&p.entries(), &n, self.labels.len());
                Ok(Prepared {
                    text,
                    messages: None,
                    examples: None,
                    shown: None,
                    components: None,
                    key: None,
                    vote: Some(shares),
                })
            }
            Kind::Llm {
                prompt,
                fixed,
                retrieval,
                ..
            } => {
                let shown = match retrieval {
                    Some((pool, search)) => {
                        let v = vector.ok_or(ScorerError::NoEmbedding)?;
                        let p = &self.pools[*pool];
                        let n = p.search(&text, v, *search);
                        Some(Shown {
                            ids: n.pool.iter().map(|&i| p.rows[i].id.clone()).collect(),
                            similarity: n.similarity.clone(),
                            examples: n
                                .pool
                                .iter()
                                .map(|&i| Example::of(&p.rows[i], &self.labels))
                                .collect(),
                        })
                    }
                    None => None,
                };
                let examples = shown.as_ref().map(|s| s.examples.clone());
                let messages =
                    self.prompts
                        .render_with(*prompt, &text, &[], examples.as_deref())?;
                let components = Components {
                    prompt: PromptPart {
                        messages: &messages,
                        budget: self.prompts.budget(*prompt),
                        choices: &[],
                    }
                    .digest(),
                    ..**fixed
                };
                Ok(Prepared {
                    text,
                    key: Some(components.row_key()),
                    components: Some(components),
                    messages: Some(messages),
                    examples,
                    shown,
                    vote: None,
                })
            }
        }
    }

    /// The answer from a row's raw output (log-probs or generated text) or a vote.
    pub fn answer(
        &self,
        logprobs: Option<&[f64]>,
        text: Option<&str>,
        vote: Option<&[f64]>,
    ) -> Answer {
        let probs = |lp: &[f64]| -> Vec<(String, f64)> {
            self.labels
                .iter()
                .cloned()
                .zip(calibrate::normalise(lp).iter().map(|x| x.exp()))
                .collect()
        };
        let from_logprobs = |lp: &[f64]| {
            let i = argmax(lp);
            let p = probs(lp);
            Answer {
                label: i.map(|i| self.labels[i].clone()),
                confidence: i.map(|i| p[i].1),
                label_probs: Some(p),
                raw_answer: None,
                scores: Some(lp.to_vec()),
            }
        };
        if let Some(shares) = vote {
            let lp: Vec<f64> = shares.iter().map(|s| s.max(1e-9).ln()).collect();
            return from_logprobs(&lp);
        }
        match &self.kind {
            Kind::Llm {
                parse: Some(parse), ..
            } => Answer {
                label: text
                    .and_then(|t| parse_answer(t, &self.labels, *parse))
                    .map(|i| self.labels[i].clone()),
                confidence: None,
                label_probs: None,
                raw_answer: text.map(str::to_string),
                scores: None,
            },
            Kind::Llm { calibration, .. } => match logprobs {
                Some(lp) => match calibration {
                    Some(c) => from_logprobs(&c.apply(lp).unwrap_or_default()),
                    None => from_logprobs(lp),
                },
                None => Answer {
                    label: None,
                    confidence: None,
                    label_probs: None,
                    raw_answer: None,
                    scores: None,
                },
            },
            Kind::Vote { .. } => from_logprobs(&[]),
        }
    }

    /// The `k` pool rows nearest the text, nearest first.
    pub fn similar(&self, text: &str, vector: &[f32], k: usize) -> Vec<(Row, f32)> {
        let Some(pool) = self.similar_pool else {
            return Vec::new();
        };
        let p = &self.pools[pool];
        let n = p.search(
            text,
            vector,
            Search {
                k: k.min(p.rows.len()),
                per_label: None,
                nearest_last: false,
            },
        );
        n.pool
            .iter()
            .zip(&n.similarity)
            .map(|(&i, &s)| (p.rows[i].clone(), s))
            .collect()
    }
}
