//! The plan: the spec as a DAG of content-hashed stages, embed → neighbours → render
//! prompts → infer → calibrate → metrics → report. Inference is expanded into cells
//! (model × prompt × method × grid point), each with one key per row; `knn_vote` methods are
//! cells without a model; calibrated `loglik` cells reuse their raw cell's inference and
//! add the rows their calibration is fitted on (support cells over other row sets).

mod explain;
mod retrieval;
mod routing;
mod row_keys;
mod stages;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

pub use explain::Explanation;
pub use retrieval::{
    EmbedRequest, Pool, Retrieval, Serves, embedding_key, vector, vector_artifact,
};
pub use routing::{Decided, Resolution, Routing};
pub use row_keys::RowKeys;
pub use stages::{LOAD, StageKind, StageStatus};

use crate::cache::{Cache, CacheError, Lookup};
use crate::dataset::{self, Dataset, Row};
use crate::diag::Diagnostic;
use crate::key::{
    CacheKey, Components, Digest, EnginePart, MethodPart, ModelPart, PromptPart, SamplerPart,
    SeedPart,
};
use crate::model::KnownModel;
use crate::neighbours::{Neighbours, Search};
use crate::prompt::{Example, Messages, Prompts, Shots};
use crate::spec::{
    Calibration, CalibrationKind, Escalate, Located, Method, MethodKind, SamplerPoint, ShotOrder,
    Spec,
};
use crate::store::{Artifact, Store};

/// What a cell is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A model answering a prompt.
    Llm { model: usize, prompt: usize },
    /// The label vote of a retrieval's neighbours (`knn_vote`).
    Vote { retrieval: usize },
    /// Other cells in turn, each answering only what the one before was unsure of.
    Cascade { cascade: usize },
    /// Other cells' label probabilities averaged.
    Ensemble { ensemble: usize },
    /// A probe on an embedder's vectors (no model).
    Embedding { probe: usize },
}

#[derive(Debug, Clone)]
pub struct Cell {
    pub id: String,
    pub source: Source,
    pub method: usize,
    /// Grid point (generation only).
    pub point: Option<SamplerPoint>,
    /// The row set (0: the evaluation rows).
    pub set: usize,
    /// Inference key of each row; `None` when an input is not known yet (a model not
    /// downloaded without a sha256, examples whose embeddings do not exist yet). Empty
    /// for vote cells.
    pub rows: RowKeys,
    /// Index into [`Plan::calibrations`] for calibrated cells.
    pub calibration: Option<usize>,
    /// A cascade stage that computes only the rows the cascade's routing sends it (`rows`
    /// holds every row's key; [`Routing`] says which are needed).
    pub gated: bool,
}

impl Plan {
    /// Every row key of every model cell (evaluation and support rows), whatever the
    /// routing: what a cache opened for this plan indexes.
    pub fn row_keys(&self) -> crate::cache::KeySet {
        crate::cache::KeySet::new(
            self.cells
                .iter()
                .chain(&self.support)
                .flat_map(|c| c.rows.keys().flatten()),
        )
    }

    /// Forget the rendered prompts: only running rows reads them, and a report over a
    /// large study need not hold them once the row keys are made.
    pub fn release_prompts(&mut self) {
        for set in &mut self.sets {
            set.messages = Vec::new();
        }
    }

    /// What a cell asks of row `row`'s prompt: with per-row choices, a log-likelihood task
    /// scores that row's own choices.
    pub fn row_task(&self, cell: &Cell, row: usize) -> crate::backend::Task {
        let mut task = self.task(cell);
        if let crate::backend::Task::Loglik { continuations, .. } = &mut task
            && let Some(r) = self.sets[cell.set].rows.get(row)
            && !r.choices.is_empty()
        {
            *continuations = r.choices.clone();
        }
        task
    }

    /// What a cell asks of each prompt (with per-row choices, the context a row's task keeps
    /// free; [`Plan::row_task`] names the row's choices).
    pub fn task(&self, cell: &Cell) -> crate::backend::Task {
        let method = &self.spec.methods[cell.method];
        match (method.generate(), &cell.point) {
            (Some(g), Some(p)) => crate::backend::Task::Generate {
                max_tokens: g.max_tokens,
                stop: g.stop.clone(),
                sampler: crate::backend::Sampler {
                    temperature: p.temperature,
                    top_p: p.top_p,
                    top_k: p.top_k,
                    min_p: p.min_p,
                    seed: crate::backend::sampler_seed(p.seed, p.repeat),
                },
            },
            _ => match method.probe().map(|p| &p.features) {
                Some(f @ crate::spec::ProbeFeatures::Hidden { .. }) => {
                    crate::backend::Task::Hidden { states: f.states() }
                }
                _ if self.spec.dataset.choices.is_some() => crate::backend::Task::Loglik {
                    continuations: Vec::new(),
                    reserve: Some(self.sets[cell.set].longest_choice),
                },
                _ => crate::backend::Task::Loglik {
                    continuations: self.dataset.label_names(),
                    reserve: None,
                },
            },
        }
    }

    /// The most prompt tokens a row of `cell` may have and still fit its model's `n_ctx`
    /// with the cell's task; `None` for cells without a model.
    pub fn prompt_limit(&self, cell: &Cell) -> Option<u32> {
        let model = cell.model()?;
        let n_ctx = self.spec.models[model].n_ctx as usize;
        let after = self.task(cell).context_after();
        Some(n_ctx.saturating_sub(after) as u32)
    }
}

impl Cell {
    /// A reported cell with no inference rows of its own (a vote, an embedder's probe, a
    /// cascade, an ensemble): what it answers is read from other stages.
    fn combined(id: String, source: Source, method: usize) -> Self {
        Self {
            id,
            source,
            method,
            point: None,
            set: 0,
            rows: RowKeys::default(),
            calibration: None,
            gated: false,
        }
    }

    pub fn model(&self) -> Option<usize> {
        match self.source {
            Source::Llm { model, .. } => Some(model),
            Source::Vote { .. }
            | Source::Cascade { .. }
            | Source::Ensemble { .. }
            | Source::Embedding { .. } => None,
        }
    }

    pub fn prompt(&self) -> Option<usize> {
        match self.source {
            Source::Llm { prompt, .. } => Some(prompt),
            Source::Vote { .. }
            | Source::Cascade { .. }
            | Source::Ensemble { .. }
            | Source::Embedding { .. } => None,
        }
    }
}

/// Cascade cells are named `cascade/ID`.
pub const CASCADE_PREFIX: &str = "cascade/";

/// Ensemble cells are named `ensemble/ID`.
pub const ENSEMBLE_PREFIX: &str = "ensemble/";

/// A probe on an embedder's vectors: the vectors of the evaluation rows and of its fit rows,
/// as the embed stage stored them (`None`: not embedded yet).
#[derive(Debug, Clone)]
pub struct EmbeddingProbe {
    pub method: usize,
    pub embedder: usize,
    /// The row set it is fitted on.
    pub fit_set: usize,
    pub eval: Vec<Option<Vec<f32>>>,
    pub fit: Vec<Option<Vec<f32>>>,
}

/// An ensemble's cell and its members (reported cells with label scores).
#[derive(Debug, Clone)]
pub struct EnsemblePlan {
    /// Index into the spec's ensembles.
    pub spec: usize,
    /// Its reported cell.
    pub cell: usize,
    pub members: Vec<usize>,
}

/// A cell of the plan: reported, or a support cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellRef {
    Reported(usize),
    Support(usize),
}

/// A cascade's cells and what is known of its escalations.
#[derive(Debug, Clone)]
pub struct CascadePlan {
    /// Index into the spec's cascades.
    pub spec: usize,
    /// Its reported cell.
    pub cell: usize,
    /// Each stage's cell on the evaluation rows.
    pub stages: Vec<CellRef>,
    /// Each stage's support cell on the fit rows, for the steps fitted by `fraction`.
    pub fit_stages: Vec<Option<usize>>,
    pub fit_set: Option<usize>,
}

/// Rows that prompts are rendered for: the evaluation rows (set 0) or rows used only to
/// calibrate (labelled rows of another file; content-free inputs).
#[derive(Debug, Clone)]
pub struct RowSet {
    pub name: String,
    pub rows: Vec<Row>,
    /// `[prompt][row]`; `None` until the row's retrieved examples are known.
    pub messages: Vec<Vec<Option<Messages>>>,
    /// `[prompt][row]`: the retrieved examples shown (pool rows and similarities).
    pub shots: Vec<Vec<Option<Shown>>>,
    /// Per-row choices: the longest choice of any row, in bytes (the context every row's
    /// log-likelihood task keeps free).
    pub longest_choice: usize,
}

/// The examples a row was shown: the pool rows' ids and their similarity to the row.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    pub ids: Vec<String>,
    pub similarity: Vec<f32>,
    pub examples: Vec<Example>,
}

/// A calibrated cell's calibration: what it is fitted on.
#[derive(Debug, Clone)]
pub struct CalibrationPlan {
    pub kind: CalibrationKind,
    /// The support cell whose rows it is fitted on.
    pub support: usize,
}

/// Texts a content-free calibration scores (Zhao et al. 2021).
pub const CONTENT_FREE: [&str; 3] = ["N/A", "", "[MASK]"];

pub struct Plan {
    pub spec: Spec,
    /// The evaluation rows (the same as `sets[0].rows`).
    pub dataset: Dataset,
    pub prompts: Arc<Prompts>,
    pub models: Vec<KnownModel>,
    pub embedders: Vec<KnownModel>,
    pub engine_version: String,
    pub sets: Vec<RowSet>,
    /// Reported cells (evaluation rows).
    pub cells: Vec<Cell>,
    /// Cells computed only to calibrate others.
    pub support: Vec<Cell>,
    pub calibrations: Vec<CalibrationPlan>,
    pub cascades: Vec<CascadePlan>,
    pub ensembles: Vec<EnsemblePlan>,
    pub embedding_probes: Vec<EmbeddingProbe>,
    pub pools: Vec<Pool>,
    pub retrievals: Vec<Retrieval>,
    /// Texts to embed, one request per distinct key.
    pub embed_requests: Vec<EmbedRequest>,
    /// Neighbour lists computed while planning, for `run` to store.
    pub new_artifacts: Vec<Artifact>,
    /// Input accepted with a caveat (rows left out, a sample larger than its file).
    pub warnings: Vec<String>,
}

/// How to build a plan.
pub struct PlanOptions {
    pub engine_version: String,
    /// Keep only the first N sampled rows.
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CellStatus {
    pub rows: usize,
    pub cached: usize,
    /// Rows whose last attempt failed (they run again).
    pub failed: usize,
    /// Rows computed under a larger `n_ctx` whose prompt does not fit this cell's: they
    /// would overflow here, so they are reported failed and not run.
    pub too_long: usize,
}

impl CellStatus {
    pub fn to_run(&self) -> usize {
        self.rows - self.cached - self.too_long
    }
}

/// Where a pool comes from; equal sources share one pool.
#[derive(Debug, Clone, PartialEq)]
struct PoolSource {
    embedder: usize,
    from: std::path::PathBuf,
    sample: Option<crate::spec::SampleSpec>,
    max_chars: Option<usize>,
}

/// A served model gets only the methods a server can compute: no hidden states (probes),
/// and log-likelihoods only through the completions endpoint.
fn check_served_models(spec: &Spec) -> Result<(), Diagnostic> {
    for m in &spec.models {
        let crate::spec::ModelSource::Server(server) = &m.gguf.value else {
            continue;
        };
        for method in &spec.methods {
            if !spec
                .prompts
                .iter()
                .any(|p| m.has_cells(&p.id) && method.has_cells(&m.id, &p.id))
            {
                continue;
            }
            let lacks = match (method.kind(), server.api) {
                (MethodKind::Probe, _)
                    if method.probe().is_some_and(|p| {
                        matches!(p.features, crate::spec::ProbeFeatures::Hidden { .. })
                    }) =>
                {
                    Some(
                        "reads the model's hidden states, which a server does not give (give the probe `models:` without this one, or use the model's gguf file)",
                    )
                }
                (MethodKind::Loglik, crate::spec::ServerApi::Chat) => Some(
                    "needs each label's exact log-prob, which a chat endpoint does not give (its top_logprobs list at most 20 tokens): use `api: completions`",
                ),
                _ => None,
            };
            if let Some(why) = lacks {
                return Err(m.gguf.error(format!("method `{}` {why}", method.id)));
            }
        }
    }
    Ok(())
}

/// Expand a spec into its stages and cells. `models` and `embedders` are the spec's
/// models as this machine knows them (see [`crate::model::Resolver::known_models`]);
/// `store` holds the stages' cached outputs. Nothing is downloaded, loaded or written.
pub fn build(
    spec: Spec,
    models: Vec<KnownModel>,
    embedders: Vec<KnownModel>,
    store: &Store,
    opts: &PlanOptions,
) -> Result<Plan, Diagnostic> {
    let engine = opts.engine_version.as_str();
    check_served_models(&spec)?;
    let mut dataset = dataset::load(&spec.dataset)?;
    if let Some(n) = opts.limit {
        dataset.rows.truncate(n);
    }
    // Warnings about the other labelled files (pools, shots, fit rows), said with the
    // dataset's own.
    let file_warnings = std::cell::RefCell::new(Vec::new());
    let grid_cells = spec.grid_cells();
    let grid_rows = grid_cells.saturating_mul(dataset.rows.len() as u64);
    if grid_rows > crate::spec::MAX_GRID_ROWS {
        return Err(spec.dataset.path.error(format!(
            "{grid_cells} cells × {} rows is {grid_rows} rows, more than this tool plans in one spec ({}): sample the dataset (`sample: {{n: ...}}`) or split the spec",
            dataset.rows.len(),
            crate::spec::MAX_GRID_ROWS
        )));
    }
    let labels = dataset.labels.len();

    // Pools: one per distinct source, shared by the prompts and methods that name it.
    let mut sources: Vec<PoolSource> = Vec::new();
    let mut pools: Vec<Pool> = Vec::new();
    let mut pool_of = |src: PoolSource, at: &Located<()>, k: usize, per_label: bool| {
        let i = match sources.iter().position(|s| *s == src) {
            Some(i) => i,
            None => {
                let from = Located {
                    value: src.from.clone(),
                    loc: at.loc.clone(),
                    field: at.field.clone(),
                };
                let rows = dataset::load_pool(
                    &from,
                    src.sample.as_ref(),
                    src.max_chars,
                    &spec.dataset,
                    &mut file_warnings.borrow_mut(),
                )?;
                pools.push(retrieval::pool(
                    &spec,
                    &embedders,
                    src.embedder,
                    rows,
                    engine,
                ));
                sources.push(src);
                sources.len() - 1
            }
        };
        check_pool_size(&pools[i].rows, k, per_label.then_some(labels), at)?;
        Ok::<usize, Diagnostic>(i)
    };
    let mut prompt_shots = Vec::new();
    let mut retrieval_specs: Vec<(String, usize, Search, Serves)> = Vec::new();
    for (pi, p) in spec.prompts.iter().enumerate() {
        prompt_shots.push(match &p.shots {
            None => Shots::None,
            Some(s) => match &s.knn {
                None => Shots::Fixed(dataset::load_shots(
                    s,
                    &spec.dataset,
                    &format!("shots/{}", p.id),
                    &mut file_warnings.borrow_mut(),
                )?),
                Some(knn) => {
                    let src = PoolSource {
                        embedder: knn.embedder,
                        from: s.from.value.clone(),
                        sample: knn.pool.clone(),
                        max_chars: s.max_chars,
                    };
                    let at = Located {
                        value: (),
                        loc: s.k_at.loc.clone(),
                        field: s.k_at.field.clone(),
                    };
                    if knn.per_label && s.k % labels != 0 {
                        return Err(s.k_at.error(format!(
                            "with `per_label: true`, k must be a multiple of the {labels} labels"
                        )));
                    }
                    let pool = pool_of(src, &at, s.k, knn.per_label)?;
                    let search = Search {
                        k: s.k,
                        per_label: knn.per_label.then_some(labels),
                        nearest_last: knn.order == ShotOrder::NearestLast,
                    };
                    retrieval_specs.push((
                        format!("prompt:{}", p.id),
                        pool,
                        search,
                        Serves::Prompt(pi),
                    ));
                    Shots::PerRow { k: s.k }
                }
            },
        });
    }
    for (mi, m) in spec.methods.iter().enumerate() {
        if let Some(v) = m.vote() {
            let src = PoolSource {
                embedder: v.embedder,
                from: v.from.value.clone(),
                sample: v.pool.clone(),
                max_chars: None,
            };
            let at = Located {
                value: (),
                loc: v.k.loc.clone(),
                field: v.k.field.clone(),
            };
            let pool = pool_of(src, &at, v.k.value, false)?;
            let search = Search {
                k: v.k.value,
                per_label: None,
                nearest_last: false,
            };
            retrieval_specs.push((format!("method:{}", m.id), pool, search, Serves::Vote(mi)));
        }
    }
    let prompts = Prompts::compile(
        &spec.prompts,
        &dataset.labels,
        prompt_shots,
        spec.dataset.shape(),
    )?;

    // Row sets: the evaluation rows, then the rows calibrations need.
    let mut sets = vec![RowSet::new("eval", dataset.rows.clone())];
    let mut fit_sets: Vec<(std::path::PathBuf, crate::spec::SampleSpec, usize)> = Vec::new();
    let mut method_sets: Vec<Option<(usize, CalibrationKind)>> = Vec::new();
    for m in &spec.methods {
        method_sets.push(match m.calibrate() {
            None => match m.probe() {
                None => None,
                // A probe is fitted on its fit rows' hidden states.
                Some(probe) => Some((
                    fit_set(
                        &mut sets,
                        &mut fit_sets,
                        &dataset,
                        &spec,
                        &probe.fit.from,
                        &probe.fit.sample,
                        &mut file_warnings.borrow_mut(),
                    )?,
                    CalibrationKind::Probe,
                )),
            },
            Some(Calibration::ContentFree) => {
                let i = match sets.iter().position(|s| s.name == "content-free") {
                    Some(i) => i,
                    None => {
                        let rows = CONTENT_FREE
                            .iter()
                            .enumerate()
                            .map(|(i, t)| Row {
                                index: i,
                                id: format!("content-free-{i}"),
                                text: t.to_string(),
                                label: 0,
                                choices: Vec::new(),
                                reference: None,
                            })
                            .collect();
                        sets.push(RowSet::new("content-free", rows));
                        sets.len() - 1
                    }
                };
                Some((i, CalibrationKind::ContentFree))
            }
            // Fitted on the cell's own rows: its support cell is the raw cell again.
            Some(Calibration::Batch) => Some((0, CalibrationKind::Batch)),
            Some(Calibration::Fit { from, sample }) => {
                let i = fit_set(
                    &mut sets,
                    &mut fit_sets,
                    &dataset,
                    &spec,
                    from,
                    sample,
                    &mut file_warnings.borrow_mut(),
                )?;
                Some((i, CalibrationKind::Fit))
            }
        });
    }
    // The rows each cascade's `fraction` steps are fitted on (one set per cascade).
    let mut cascade_sets = Vec::new();
    for c in &spec.cascades {
        let fit = c.escalate.iter().find_map(|e| match e {
            crate::spec::Escalate::Fraction { from, sample, .. } => Some((from, sample)),
            crate::spec::Escalate::Margin(_) => None,
        });
        cascade_sets.push(match fit {
            Some((from, sample)) => Some(fit_set(
                &mut sets,
                &mut fit_sets,
                &dataset,
                &spec,
                from,
                sample,
                &mut file_warnings.borrow_mut(),
            )?),
            None => None,
        });
    }

    // Embeddings, neighbours and the examples each row is shown.
    let mut requests: Vec<EmbedRequest> = Vec::new();
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut request = |embedder: usize, text: &str, key: Option<Digest>| {
        if let Some(k) = key
            && seen.insert(k)
        {
            requests.push(EmbedRequest {
                embedder,
                text: text.to_string(),
                key: k,
            });
        }
    };
    for pool in &pools {
        for (r, k) in pool.rows.iter().zip(&pool.keys) {
            request(pool.embedder, &r.text, *k);
        }
    }
    let mut retrievals = Vec::new();
    let mut new_artifacts = Vec::new();
    for (id, pool, search, serves) in retrieval_specs {
        let embedder = pools[pool].embedder;
        // A prompt's retrieval serves every row set; a vote, the evaluation rows.
        let queries: Vec<Option<Vec<retrieval::Query>>> = sets
            .iter()
            .enumerate()
            .map(|(s, set)| {
                (matches!(serves, Serves::Prompt(_)) || s == 0).then(|| {
                    set.rows
                        .iter()
                        .map(|r| {
                            (
                                r,
                                embedding_key(&spec, &embedders, embedder, &r.text, engine),
                            )
                        })
                        .collect()
                })
            })
            .collect();
        for (r, k) in queries.iter().flatten().flatten() {
            request(embedder, &r.text, *k);
        }
        let (keys, results, new) = retrieval::resolve(&pools[pool], search, &queries, store);
        new_artifacts.extend(new);
        retrievals.push(Retrieval {
            id,
            serves,
            pool,
            search,
            keys,
            results,
        });
    }

    // Probes on an embedder's vectors: every evaluation and fit row embedded.
    let mut embedding_probes = Vec::new();
    for (mi, m) in spec.methods.iter().enumerate() {
        let (Some(crate::spec::ProbeFeatures::Embedder(e)), Some((fit_set, _))) =
            (m.probe().map(|p| &p.features), method_sets[mi])
        else {
            continue;
        };
        let mut vectors = |set: usize| -> Vec<Option<Vec<f32>>> {
            sets[set]
                .rows
                .iter()
                .map(|r| {
                    let key = embedding_key(&spec, &embedders, *e, &r.text, engine);
                    request(*e, &r.text, key);
                    vector(store, &key)
                })
                .collect()
        };
        embedding_probes.push(EmbeddingProbe {
            method: mi,
            embedder: *e,
            fit_set,
            eval: vectors(0),
            fit: vectors(fit_set),
        });
    }

    // Render every prompt for every row set.
    for (s, set) in sets.iter_mut().enumerate() {
        for p in 0..prompts.len() {
            let retrieval = retrievals.iter().find(|r| r.serves == Serves::Prompt(p));
            let mut messages = Vec::with_capacity(set.rows.len());
            let mut shown = Vec::with_capacity(set.rows.len());
            for (i, row) in set.rows.iter().enumerate() {
                match retrieval {
                    None => {
                        messages.push(Some(prompts.render(p, &row.text, &row.choices)?));
                        shown.push(None);
                    }
                    Some(r) => {
                        let found = r.results[s][i]
                            .as_ref()
                            .map(|n| shown_examples(&pools[r.pool], n, prompts.labels()));
                        messages.push(match &found {
                            Some(f) => Some(prompts.render_with(
                                p,
                                &row.text,
                                &row.choices,
                                Some(&f.examples),
                            )?),
                            None => None,
                        });
                        shown.push(found);
                    }
                }
            }
            set.messages.push(messages);
            set.shots.push(shown);
        }
    }

    let factory = CellFactory::new(&spec, &models, &prompts, &sets, &method_sets, engine);
    let (mut cells, mut support, mut calibrations) =
        expand_cells(&factory, &retrievals, &embedders);
    for (probe, ep) in embedding_probes.iter().enumerate() {
        cells.push(Cell::combined(
            format!(
                "{}/{}",
                embedders[ep.embedder].id, spec.methods[ep.method].id
            ),
            Source::Embedding { probe },
            ep.method,
        ));
    }
    let cascades = plan_cascades(
        &factory,
        &cascade_sets,
        &mut cells,
        &mut support,
        &mut calibrations,
    )?;
    let ensembles = plan_ensembles(&spec, &mut cells)?;
    check_compare_ids(&spec, &cells)?;
    let mut warnings = dataset.warnings.clone();
    warnings.extend(file_warnings.into_inner());
    Ok(Plan {
        warnings,
        spec,
        dataset,
        prompts: Arc::new(prompts),
        models,
        embedders,
        engine_version: opts.engine_version.clone(),
        sets,
        cells,
        support,
        calibrations,
        cascades,
        ensembles,
        embedding_probes,
        pools,
        retrievals,
        embed_requests: requests,
        new_artifacts,
    })
}

/// The row set of labelled rows drawn from `from` for a fit, shared by every fit that
/// names the same file and sample. The evaluation rows never take part in a fit.
fn fit_set(
    sets: &mut Vec<RowSet>,
    fit_sets: &mut Vec<(std::path::PathBuf, crate::spec::SampleSpec, usize)>,
    dataset: &Dataset,
    spec: &Spec,
    from: &Located<std::path::PathBuf>,
    sample: &crate::spec::SampleSpec,
    warnings: &mut Vec<String>,
) -> Result<usize, Diagnostic> {
    if let Some((_, _, i)) = fit_sets
        .iter()
        .find(|(f, s, _)| *f == from.value && s == sample)
    {
        return Ok(*i);
    }
    let eval_ids: HashSet<&str> = dataset.rows.iter().map(|r| r.id.as_str()).collect();
    let eval_texts: HashSet<&str> = dataset.rows.iter().map(|r| r.text.as_str()).collect();
    let all = dataset::load_pool(from, None, None, &spec.dataset, warnings)?;
    let labels = dataset.labels.len();
    let rows = dataset::sample_excluding(all, sample, labels, &|r| {
        eval_ids.contains(r.id.as_str()) || eval_texts.contains(r.text.as_str())
    });
    let file = from.value.file_name().unwrap_or_default().to_string_lossy();
    sets.push(RowSet::new(
        &format!("fit:{file}:n={}:seed={}", sample.n, sample.seed),
        rows,
    ));
    fit_sets.push((from.value.clone(), sample.clone(), sets.len() - 1));
    Ok(sets.len() - 1)
}

impl RowSet {
    fn new(name: &str, rows: Vec<Row>) -> Self {
        let longest_choice = rows
            .iter()
            .flat_map(|r| r.choices.iter().map(String::len))
            .max()
            .unwrap_or(0);
        Self {
            name: name.to_string(),
            rows,
            messages: Vec::new(),
            shots: Vec::new(),
            longest_choice,
        }
    }
}

/// `k` examples (of each label, with `per_label`) must exist in the pool.
fn check_pool_size(
    rows: &[Row],
    k: usize,
    per_label: Option<usize>,
    at: &Located<()>,
) -> Result<(), Diagnostic> {
    match per_label {
        None if rows.len() < k => Err(at.error(format!(
            "k is {k} but the pool has only {} rows",
            rows.len()
        ))),
        Some(labels) => {
            let each = k / labels.max(1);
            for l in 0..labels {
                let n = rows.iter().filter(|r| r.label == l).count();
                if n < each {
                    return Err(at.error(format!(
                        "k is {k} ({each} per label) but the pool has only {n} rows of label {l}"
                    )));
                }
            }
            Ok(())
        }
        None => Ok(()),
    }
}

fn shown_examples(pool: &Pool, n: &Neighbours, labels: &[String]) -> Shown {
    let rows: Vec<&Row> = n.pool.iter().map(|&i| &pool.rows[i]).collect();
    Shown {
        ids: rows.iter().map(|r| r.id.clone()).collect(),
        similarity: n.similarity.clone(),
        examples: rows.iter().map(|r| Example::of(r, labels)).collect(),
    }
}

/// Makes the cells of one spec: each model × prompt × method × grid point on a row set,
/// with the support cell its calibration is fitted on.
struct CellFactory<'a> {
    spec: &'a Spec,
    models: &'a [KnownModel],
    prompts: &'a Prompts,
    sets: &'a [RowSet],
    method_sets: &'a [Option<(usize, CalibrationKind)>],
    label_names: Vec<String>,
    engine: Digest,
    /// `[set][prompt][row]`
    prompt_digests: Vec<Vec<Arc<[Option<Digest>]>>>,
}

/// The parts of a cell's identity: model, prompt, method and grid point.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CellSpec {
    model: usize,
    prompt: usize,
    method: usize,
    point: Option<SamplerPoint>,
}

impl<'a> CellFactory<'a> {
    fn new(
        spec: &'a Spec,
        models: &'a [KnownModel],
        prompts: &'a Prompts,
        sets: &'a [RowSet],
        method_sets: &'a [Option<(usize, CalibrationKind)>],
        engine_version: &str,
    ) -> Self {
        let prompt_digests = sets
            .iter()
            .map(|set| {
                set.messages
                    .iter()
                    .enumerate()
                    .map(|(p, rows)| {
                        rows.iter()
                            .zip(&set.rows)
                            .map(|(m, row)| {
                                m.as_ref().map(|m| {
                                    PromptPart {
                                        messages: m,
                                        budget: prompts.budget(p),
                                        choices: &row.choices,
                                    }
                                    .digest()
                                })
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        Self {
            spec,
            models,
            prompts,
            sets,
            method_sets,
            label_names: prompts.labels().to_vec(),
            engine: EnginePart {
                version: engine_version,
            }
            .digest(),
            prompt_digests,
        }
    }

    /// Every model cell the spec's grid names, `grid: false` models included, in plan order.
    fn all(&self) -> Vec<CellSpec> {
        let points = self.spec.sampling.points();
        let mut out = Vec::new();
        for model in 0..self.models.len() {
            for prompt in 0..self.prompts.len() {
                for (method, m) in self.spec.methods.iter().enumerate() {
                    if !m.has_cells(&self.spec.models[model].id, self.prompts.id(prompt)) {
                        continue;
                    }
                    match m.kind() {
                        MethodKind::KnnVote => {}
                        MethodKind::Generate => {
                            for p in &points {
                                out.push(CellSpec {
                                    model,
                                    prompt,
                                    method,
                                    point: Some(*p),
                                });
                            }
                        }
                        MethodKind::Loglik => out.push(CellSpec {
                            model,
                            prompt,
                            method,
                            point: None,
                        }),
                        // A probe of a model's hidden states; an embedder's probe has no
                        // model cell.
                        MethodKind::Probe => {
                            if matches!(
                                m.probe().map(|p| &p.features),
                                Some(crate::spec::ProbeFeatures::Hidden { .. })
                            ) {
                                out.push(CellSpec {
                                    model,
                                    prompt,
                                    method,
                                    point: None,
                                });
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn id(&self, c: &CellSpec) -> String {
        let mut id = format!(
            "{}/{}/{}",
            self.models[c.model].id,
            self.prompts.id(c.prompt),
            self.spec.methods[c.method].id
        );
        if let Some(p) = &c.point {
            id.push('@');
            id.push_str(&self.spec.sampling.label(p));
        }
        id
    }

    /// The keys of a cell's rows on a row set.
    fn rows(&self, c: &CellSpec, set: usize) -> RowKeys {
        let model = self.models[c.model]
            .sha256
            .as_deref()
            .map(|s| ModelPart { sha256: s }.digest());
        let method = MethodPart {
            method: &self.spec.methods[c.method],
            labels: &self.label_names,
        }
        .digest();
        let sampler = SamplerPart {
            point: c.point.as_ref(),
        }
        .digest();
        let seed = SeedPart {
            point: c.point.as_ref(),
        }
        .digest();
        // A served model's rows are the server's: keyed by what it says it is, not by this
        // build's engine.
        let engine = self.models[c.model]
            .file
            .as_ref()
            .and_then(|f| f.engine())
            .map_or(self.engine, |version| {
                EnginePart { version: &version }.digest()
            });
        RowKeys::new(
            model,
            method,
            sampler,
            seed,
            engine,
            self.prompt_digests[set][c.prompt].clone(),
        )
    }

    /// A cell on the evaluation rows, and the support cell and calibration it is fitted
    /// with (pushed onto `support` and `calibrations`).
    fn cell(
        &self,
        c: &CellSpec,
        support: &mut Vec<Cell>,
        calibrations: &mut Vec<CalibrationPlan>,
    ) -> Cell {
        let id = self.id(c);
        let source = Source::Llm {
            model: c.model,
            prompt: c.prompt,
        };
        let calibration = self.method_sets[c.method].map(|(set, kind)| {
            support.push(Cell {
                id: format!("{id}#{}", self.sets[set].name),
                source,
                method: c.method,
                point: c.point,
                set,
                rows: self.rows(c, set),
                calibration: None,
                gated: false,
            });
            calibrations.push(CalibrationPlan {
                kind,
                support: support.len() - 1,
            });
            calibrations.len() - 1
        });
        Cell {
            id,
            source,
            method: c.method,
            point: c.point,
            set: 0,
            rows: self.rows(c, 0),
            calibration,
            gated: false,
        }
    }
}

/// Reported cells, support cells and calibrations.
fn expand_cells(
    factory: &CellFactory,
    retrievals: &[Retrieval],
    embedders: &[KnownModel],
) -> (Vec<Cell>, Vec<Cell>, Vec<CalibrationPlan>) {
    let spec = factory.spec;
    let mut cells = Vec::new();
    let mut support = Vec::new();
    let mut calibrations = Vec::new();
    for c in factory.all() {
        if spec.models[c.model].has_cells(factory.prompts.id(c.prompt)) {
            cells.push(factory.cell(&c, &mut support, &mut calibrations));
        }
    }
    for (ki, method) in spec.methods.iter().enumerate() {
        if method.kind() != MethodKind::KnnVote {
            continue;
        }
        let retrieval = retrievals
            .iter()
            .position(|r| r.serves == Serves::Vote(ki))
            .expect("every knn_vote method has its retrieval");
        let embedder = &embedders[method.vote().map_or(0, |v| v.embedder)].id;
        cells.push(Cell::combined(
            format!("{embedder}/{}", method.id),
            Source::Vote { retrieval },
            ki,
        ));
    }
    (cells, support, calibrations)
}

/// Each cascade's stages as cells: a reported cell where the grid has it, otherwise a
/// support cell computed only for the rows the cascade sends it (`grid: false` models);
/// on the fit rows, a support cell per step whose threshold is a fitted `fraction`. The
/// cascade itself becomes a reported cell.
#[allow(clippy::too_many_arguments)]
fn plan_cascades(
    factory: &CellFactory,
    fit_sets: &[Option<usize>],
    cells: &mut Vec<Cell>,
    support: &mut Vec<Cell>,
    calibrations: &mut Vec<CalibrationPlan>,
) -> Result<Vec<CascadePlan>, Diagnostic> {
    let spec = factory.spec;
    let all = factory.all();
    let mut out = Vec::new();
    for (ci, c) in spec.cascades.iter().enumerate() {
        let mut stages = Vec::new();
        let mut fit_stages = Vec::new();
        let fit_set = fit_sets[ci];
        let id = format!("{CASCADE_PREFIX}{}", c.id);
        if cells.iter().any(|x| x.id == id) {
            return Err(c.stages[0].error(format!(
                "cascade cell `{id}` has the id of another cell: rename the cascade"
            )));
        }
        for (k, name) in c.stages.iter().enumerate() {
            let last = k + 1 == c.stages.len();
            let found = all.iter().find(|s| factory.id(s) == name.value);
            let Some(cs) = found else {
                let model_cells: Vec<&str> = cells
                    .iter()
                    .filter(|c| matches!(c.source, Source::Llm { .. }))
                    .map(|c| c.id.as_str())
                    .collect();
                return Err(name.error(format!(
                    "no model cell `{}`; a cascade's stages are cells such as {}",
                    name.value,
                    model_cells
                        .iter()
                        .take(4)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let method = &spec.methods[cs.method];
            if !last && !matches!(method.kind(), MethodKind::Loglik | MethodKind::Probe) {
                return Err(name.error(format!(
                    "`{}` answers by generating text, so it has no label scores to be sure or unsure of; every stage but the last must be a `loglik` or `probe` cell",
                    name.value
                )));
            }
            if stages[..]
                .iter()
                .any(|s: &CellRef| cell_of(cells, support, *s).id == name.value)
            {
                return Err(name.error(format!(
                    "`{}` is already a stage of this cascade",
                    name.value
                )));
            }
            let stage = match cells.iter().position(|x| x.id == name.value) {
                Some(i) => CellRef::Reported(i),
                None => match support.iter().position(|x| x.id == name.value && x.gated) {
                    Some(i) => CellRef::Support(i),
                    None => {
                        let cell = factory.cell(cs, support, calibrations);
                        support.push(gated(cell));
                        CellRef::Support(support.len() - 1)
                    }
                },
            };
            // The fit rows are scored by every stage up to the last fitted step: the rows
            // that reach a fitted step are those the steps before it send on.
            let last_fit = c
                .escalate
                .iter()
                .rposition(|e| matches!(e, Escalate::Fraction { .. }));
            let fit_stage = match (last_fit, fit_set) {
                (Some(lf), Some(set)) if k <= lf => {
                    let calibration = cell_of(cells, support, stage).calibration;
                    let id = format!("{}#{}", name.value, factory.sets[set].name);
                    Some(match support.iter().position(|x| x.id == id) {
                        Some(i) => i,
                        None => {
                            support.push(gated(Cell {
                                id,
                                source: Source::Llm {
                                    model: cs.model,
                                    prompt: cs.prompt,
                                },
                                method: cs.method,
                                point: cs.point,
                                set,
                                rows: factory.rows(cs, set),
                                calibration,
                                gated: false,
                            }));
                            support.len() - 1
                        }
                    })
                }
                _ => None,
            };
            stages.push(stage);
            fit_stages.push(fit_stage);
        }
        let first = cell_of(cells, support, stages[0]);
        cells.push(Cell::combined(
            id,
            Source::Cascade { cascade: ci },
            first.method,
        ));
        out.push(CascadePlan {
            spec: ci,
            cell: cells.len() - 1,
            stages,
            fit_stages,
            fit_set,
        });
    }
    Ok(out)
}

/// Each ensemble as a reported cell over its members: reported cells with label scores
/// (`loglik`, calibrated or not, and `knn_vote`; not a generation, a cascade or another
/// ensemble, which have no label probabilities to average).
fn plan_ensembles(spec: &Spec, cells: &mut Vec<Cell>) -> Result<Vec<EnsemblePlan>, Diagnostic> {
    let mut out = Vec::new();
    for (ei, e) in spec.ensembles.iter().enumerate() {
        let id = format!("{ENSEMBLE_PREFIX}{}", e.id);
        if cells.iter().any(|x| x.id == id) {
            return Err(e.cells[0].error(format!(
                "ensemble cell `{id}` has the id of another cell: rename the ensemble"
            )));
        }
        let mut members = Vec::new();
        for name in &e.cells {
            let Some(m) = cells.iter().position(|c| c.id == name.value) else {
                let scored: Vec<&str> = cells
                    .iter()
                    .filter(|c| has_label_scores(spec, c))
                    .map(|c| c.id.as_str())
                    .take(4)
                    .collect();
                return Err(name.error(format!(
                    "no cell `{}`; an ensemble's members are cells with label scores, such as {}",
                    name.value,
                    scored.join(", ")
                )));
            };
            if !has_label_scores(spec, &cells[m]) {
                return Err(name.error(format!(
                    "`{}` has no label probabilities to average: an ensemble's members are `loglik`, `probe` or `knn_vote` cells",
                    name.value
                )));
            }
            members.push(m);
        }
        let first = &cells[members[0]];
        cells.push(Cell::combined(
            id,
            Source::Ensemble { ensemble: ei },
            first.method,
        ));
        out.push(EnsemblePlan {
            spec: ei,
            cell: cells.len() - 1,
            members,
        });
    }
    Ok(out)
}

/// Whether a cell's rows carry label probabilities (what an ensemble averages).
fn has_label_scores(spec: &Spec, cell: &Cell) -> bool {
    match cell.source {
        Source::Llm { .. } | Source::Vote { .. } => {
            spec.methods[cell.method].kind() != MethodKind::Generate
        }
        Source::Embedding { .. } => true,
        Source::Cascade { .. } | Source::Ensemble { .. } => false,
    }
}

/// A cell that computes only the rows a cascade's routing sends it.
fn gated(cell: Cell) -> Cell {
    Cell {
        gated: true,
        ..cell
    }
}

fn cell_of<'a>(cells: &'a [Cell], support: &'a [Cell], r: CellRef) -> &'a Cell {
    match r {
        CellRef::Reported(i) => &cells[i],
        CellRef::Support(i) => &support[i],
    }
}

/// Every cell named in `compare:` exists.
fn check_compare_ids(spec: &Spec, cells: &[Cell]) -> Result<(), Diagnostic> {
    let known = |id: &Located<String>| -> Result<(), Diagnostic> {
        if cells.iter().any(|c| c.id == id.value) {
            return Ok(());
        }
        let ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
        Err(id.error(format!("no cell `{}`; cells: {}", id.value, ids.join(", "))))
    };
    if let Some(b) = &spec.compare.baseline {
        known(b)?;
    }
    for (a, b) in &spec.compare.pairs {
        known(a)?;
        known(b)?;
    }
    Ok(())
}

impl Plan {
    pub fn cell(&self, r: CellRef) -> &Cell {
        cell_of(&self.cells, &self.support, r)
    }

    /// Reported cells and support cells: everything inference computes.
    pub fn inference_cells(&self) -> impl Iterator<Item = &Cell> {
        self.cells
            .iter()
            .chain(&self.support)
            .filter(|c| matches!(c.source, Source::Llm { .. }))
    }

    pub fn status(&self, cache: &Cache, routing: &Routing) -> Vec<CellStatus> {
        self.cells
            .iter()
            .map(|c| {
                if let Source::Vote { retrieval } = c.source {
                    let found = self.retrievals[retrieval].results[0]
                        .iter()
                        .filter(|n| n.is_some())
                        .count();
                    return CellStatus {
                        rows: self.dataset.rows.len(),
                        cached: found,
                        failed: 0,
                        too_long: 0,
                    };
                }
                if let Source::Cascade { cascade } = c.source {
                    let res = routing.resolution(cascade);
                    return CellStatus {
                        rows: self.dataset.rows.len(),
                        cached: res.map_or(0, |r| r.answered()),
                        failed: res.map_or(0, |r| r.failed),
                        too_long: 0,
                    };
                }
                if let Source::Embedding { probe } = c.source {
                    let eval = &self.embedding_probes[probe].eval;
                    return CellStatus {
                        rows: eval.len(),
                        cached: eval.iter().filter(|v| v.is_some()).count(),
                        failed: 0,
                        too_long: 0,
                    };
                }
                if let Source::Ensemble { ensemble } = c.source {
                    return CellStatus {
                        rows: self.dataset.rows.len(),
                        cached: self.ensemble_rows_ready(ensemble, cache),
                        failed: 0,
                        too_long: 0,
                    };
                }
                let keys = c.rows.keys().flatten();
                let limit = self.prompt_limit(c);
                let (mut cached, mut failed, mut too_long) = (0, 0, 0);
                for k in keys {
                    match cache.lookup(&k, limit) {
                        Lookup::Hit => cached += 1,
                        Lookup::TooLong { .. } => too_long += 1,
                        Lookup::Failed(_) => failed += 1,
                        Lookup::Miss => {}
                    }
                }
                CellStatus {
                    rows: c.rows.len(),
                    cached,
                    failed,
                    too_long,
                }
            })
            .collect()
    }

    /// The evaluation rows every member of ensemble `e` has computed.
    pub fn ensemble_rows_ready(&self, e: usize, cache: &Cache) -> usize {
        let members = &self.ensembles[e].members;
        (0..self.dataset.rows.len())
            .filter(|&ri| members.iter().all(|&m| self.row_ready(m, ri, cache)))
            .count()
    }

    /// Whether row `ri` of reported cell `ci` (a model or vote cell) is computed.
    fn row_ready(&self, ci: usize, ri: usize, cache: &Cache) -> bool {
        let c = &self.cells[ci];
        match c.source {
            Source::Llm { .. } => c
                .rows
                .key(ri)
                .is_some_and(|k| matches!(cache.lookup(&k, self.prompt_limit(c)), Lookup::Hit)),
            Source::Vote { retrieval } => self.retrievals[retrieval].results[0][ri].is_some(),
            Source::Embedding { probe } => self.embedding_probes[probe].eval[ri].is_some(),
            Source::Cascade { .. } | Source::Ensemble { .. } => false,
        }
    }

    /// Every inference row key the plan needs now (rows whose inputs are unknown have none;
    /// a gated cascade stage needs the rows routed to it).
    pub fn keys<'a>(&'a self, routing: &'a Routing) -> impl Iterator<Item = Digest> + 'a {
        self.inference_cells()
            .flat_map(move |c| self.needed_keys(c, routing).filter_map(|(_, k)| k))
    }

    /// Every artifact key the plan's stages read (embeddings and neighbour lists).
    pub fn artifact_keys(&self) -> HashSet<Digest> {
        let mut out: HashSet<Digest> = self.embed_requests.iter().map(|r| r.key).collect();
        for r in &self.retrievals {
            out.extend(r.keys.iter().flatten().flatten());
        }
        out
    }

    pub fn cell_by_id(&self, id: &str) -> Option<usize> {
        self.cells.iter().position(|c| c.id == id)
    }

    /// The cell's model, prompt and method names (`-` where it has none).
    pub fn cell_names(&self, cell: &Cell) -> (String, String, String) {
        let method = self.spec.methods[cell.method].id.clone();
        let by_embedder = |e: usize| {
            (
                self.embedders[e].id.clone(),
                "-".to_string(),
                method.clone(),
            )
        };
        match cell.source {
            Source::Llm { model, prompt } => (
                self.models[model].id.clone(),
                self.prompts.id(prompt).to_string(),
                method,
            ),
            // Cells without a model: named by their embedder.
            Source::Vote { retrieval } => {
                by_embedder(self.pools[self.retrievals[retrieval].pool].embedder)
            }
            Source::Embedding { probe } => by_embedder(self.embedding_probes[probe].embedder),
            // Model: the stages' models in turn; prompt: the cascade's id.
            Source::Cascade { cascade } => {
                let cp = &self.cascades[cascade];
                let models: Vec<&str> = cp
                    .stages
                    .iter()
                    .filter_map(|r| self.cell(*r).model())
                    .map(|m| self.models[m].id.as_str())
                    .collect();
                (
                    models.join("→"),
                    self.spec.cascades[cp.spec].id.clone(),
                    "cascade".into(),
                )
            }
            // Model: the members' model when they share one; prompt: the ensemble's id.
            Source::Ensemble { ensemble } => {
                let ep = &self.ensembles[ensemble];
                let mut models: Vec<String> = Vec::new();
                for &m in &ep.members {
                    let name = self.cell_names(&self.cells[m]).0;
                    if !models.contains(&name) {
                        models.push(name);
                    }
                }
                (
                    models.join("+"),
                    self.spec.ensembles[ep.spec].id.clone(),
                    "ensemble".into(),
                )
            }
        }
    }

    /// Cell parameters as JSON (sampler settings for generation).
    pub fn params(&self, cell: &Cell, routing: &Routing) -> serde_json::Value {
        if let Source::Embedding { probe } = cell.source {
            let ep = &self.embedding_probes[probe];
            return serde_json::json!({
                "kind": "probe",
                "embedder": self.embedders[ep.embedder].id,
                "fit_rows": self.sets[ep.fit_set].rows.len(),
            });
        }
        if let Source::Ensemble { ensemble } = cell.source {
            let ep = &self.ensembles[ensemble];
            return serde_json::json!({
                "kind": "ensemble",
                "members": ep.members.iter().map(|&m| self.cells[m].id.clone()).collect::<Vec<_>>(),
                "weights": self.spec.ensembles[ep.spec].weights,
            });
        }
        if let Source::Cascade { cascade } = cell.source {
            let cp = &self.cascades[cascade];
            let spec = &self.spec.cascades[cp.spec];
            let res = routing.resolution(cascade);
            return serde_json::json!({
                "kind": "cascade",
                "stages": cp.stages.iter().map(|r| self.cell(*r).id.clone()).collect::<Vec<_>>(),
                "escalate": spec.escalate.iter().enumerate().map(|(k, e)| {
                    let threshold = res.and_then(|r| r.thresholds[k]);
                    match e {
                        Escalate::Margin(m) => serde_json::json!({"margin": m}),
                        Escalate::Fraction { fraction, sample, .. } => serde_json::json!({
                            "fraction": fraction, "fit_rows": sample.n, "fit_seed": sample.seed,
                            "threshold": threshold,
                        }),
                    }
                }).collect::<Vec<_>>(),
                "reached": res.map(|r| r.reached.clone()),
            });
        }
        let m = &self.spec.methods[cell.method];
        match (&cell.point, &m.method) {
            (Some(p), Method::Generate(g)) => serde_json::json!({
                "kind": "generate",
                "temperature": p.temperature,
                "top_p": p.top_p,
                "top_k": p.top_k,
                "min_p": p.min_p,
                "seed": p.seed,
                "repeat": p.repeat,
                "max_tokens": g.max_tokens,
                "stop": g.stop,
            }),
            (_, Method::KnnVote(v)) => serde_json::json!({
                "kind": "knn_vote",
                "k": v.k.value,
            }),
            (_, Method::Probe(p)) => serde_json::json!({
                "kind": "probe",
                "features": match &p.features {
                    crate::spec::ProbeFeatures::Embedder(e) => {
                        format!("embedder {}", self.embedders[*e].id)
                    }
                    f @ crate::spec::ProbeFeatures::Hidden { .. } => f
                        .states()
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                },
                "fit": {"n": p.fit.sample.n, "seed": p.fit.sample.seed},
            }),
            _ => serde_json::json!({
                "kind": "loglik",
                "labels": self.dataset.label_names(),
                "calibrate": match m.calibrate() {
                    None => serde_json::Value::Null,
                    Some(Calibration::ContentFree) => "content_free".into(),
                    Some(Calibration::Batch) => "batch".into(),
                    Some(Calibration::Fit { sample, .. }) => serde_json::json!({"fit": {"n": sample.n, "seed": sample.seed}}),
                },
            }),
        }
    }

    /// The plan as `plan --json` prints it.
    /// The plan as JSON, with its `stages` (as [`Plan::stages`] lists them).
    pub fn to_json<'a>(
        &self,
        cache: &Cache,
        routing: &Routing,
        stages: impl Iterator<Item = &'a StageStatus>,
    ) -> serde_json::Value {
        let cells: Vec<serde_json::Value> = self
            .cells
            .iter()
            .zip(self.status(cache, routing))
            .map(|(c, st)| {
                let (model, prompt, method) = self.cell_names(c);
                serde_json::json!({
                    "id": c.id,
                    "model": model,
                    "prompt": prompt,
                    "method": method,
                    "params": self.params(c, routing),
                    "rows": st.rows,
                    "cached": st.cached,
                    "failed": st.failed,
                    "too_long": st.too_long,
                    "to_run": st.to_run(),
                })
            })
            .collect();
        let stages: Vec<serde_json::Value> = stages
            .map(|s| {
                serde_json::json!({
                    "id": s.id, "kind": s.kind, "items": s.items, "cached": s.cached,
                    "to_run": s.items.saturating_sub(s.cached), "what": s.what, "inputs": s.inputs,
                    "key": s.key,
                })
            })
            .collect();
        let leaks: Vec<serde_json::Value> = self
            .retrievals
            .iter()
            .map(|r| {
                let (queries, with, excluded) = r.leaks();
                serde_json::json!({"retrieval": r.id, "queries": queries,
                    "queries_with_self_excluded": with, "pool_rows_excluded": excluded})
            })
            .collect();
        let cascades: Vec<serde_json::Value> = self
            .cascades
            .iter()
            .enumerate()
            .map(|(ci, cp)| {
                let res = routing.resolution(ci);
                serde_json::json!({
                    "id": self.spec.cascades[cp.spec].id,
                    "cell": self.cells[cp.cell].id,
                    "stages": cp.stages.iter().map(|r| self.cell(*r).id.clone()).collect::<Vec<_>>(),
                    "thresholds": res.map(|r| r.thresholds.clone()),
                    "fit_rows": res.map(|r| r.fit_rows.clone()),
                    "reached": res.map(|r| r.reached.clone()),
                    "answered": res.map(|r| r.answered()),
                    "pending": res.map(|r| r.pending),
                    "note": self.cascade_note(ci, routing),
                })
            })
            .collect();
        serde_json::json!({
            "name": self.spec.name,
            "engine": self.engine_version,
            "cascades": cascades,
            "dataset_rows": self.dataset.rows.len(),
            "stages": stages,
            "cells": cells,
            "leak_guard": leaks,
        })
    }

    /// Why a cell's rows miss the cache: for each missing row, the cached row of the same
    /// dataset row that is nearest (fewest differing key components), and what differs.
    pub fn explain(&self, cell: usize, cache: &Cache) -> Result<Explanation, CacheError> {
        let c = &self.cells[cell];
        // The identities of the cached rows of this cell's dataset rows only.
        let ids: HashSet<&str> = self.dataset.rows.iter().map(|r| r.id.as_str()).collect();
        let mut by_row: HashMap<String, Vec<Components>> = HashMap::new();
        cache.identities(&mut |r| {
            if ids.contains(r.row_id.as_str()) {
                by_row.entry(r.row_id).or_default().push(r.components);
            }
        })?;
        let mut ex = Explanation {
            cell: c.id.clone(),
            rows: c.rows.len(),
            ..Default::default()
        };
        let limit = self.prompt_limit(c);
        for (i, comps) in c.rows.iter().enumerate() {
            let Some(comps) = comps else {
                ex.unknown += 1;
                continue;
            };
            match cache.lookup(&comps.row_key(), limit) {
                Lookup::Hit => {
                    ex.cached += 1;
                    continue;
                }
                Lookup::TooLong { .. } => {
                    explain::count(
                        &mut ex.failed,
                        crate::row::FailureKind::ContextOverflow.as_str(),
                    );
                    continue;
                }
                Lookup::Failed(_) | Lookup::Miss => {}
            }
            if let Some(e) = cache.failure(&comps.row_key()) {
                explain::count(&mut ex.failed, e.kind.as_str());
                continue;
            }
            let row_id = self.dataset.rows[i].id.as_str();
            let nearest = by_row.get(row_id).and_then(|cands| {
                cands
                    .iter()
                    .map(|k| comps.differing(k))
                    .min_by_key(Vec::len)
            });
            match nearest {
                Some(diff) => explain::count(&mut ex.differs, &diff.join("+")),
                None => ex.never_computed += 1,
            }
        }
        Ok(ex)
    }
}
