//! One scheduler brings a spec's stages up to date, in the order of its DAG (`load` →
//! `embed` → `neighbours` → `render` → `infer` → `route` → gated `infer` … → `calibrate`),
//! for every command that needs them: `run` (every stage), a sharded run (its part of the
//! infer work known now), `serve` (the rows a served cell needs before its first request)
//! and `plan` (the dry run: nothing computed, the routing known from the cache).
//!
//! The plan is built once per change of what planning reads (after the embed stage, whose
//! vectors the neighbour lists and the prompts with retrieved examples need) and is never
//! changed: what a `route` stage decides is a [`Routing`], recomputed from the cache after
//! each wave of inference and read by the gated infer stages after it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::backend::Backend;
use crate::cache::Cache;
use crate::config::Config;
use crate::embed::{self, EmbedError};
use crate::error::AppError;
use crate::exec::{self, ExecOptions, ExecStats, ShardFilter};
use crate::plan::{self, CellRef, Decided, Plan, PlanOptions, Source};
use crate::shard::{self, JobId, Manifest, Shard};
use crate::spec;
use crate::store::{Artifact, ArtifactKind, Store};

/// Makes an inference backend; called on the worker thread of each stage that needs one
/// (embedding, inference), which then owns it.
pub type MakeBackend = Arc<dyn Fn() -> Box<dyn Backend> + Send + Sync>;

/// Whether planning may download models.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Models {
    /// Find models on this machine, never download them; the digest memo is not written.
    LocateOnly,
    /// Download missing models.
    Fetch,
}

/// The plan of a spec against the stores (render and neighbours from the stored
/// embeddings); nothing is computed.
pub fn load_plan(
    cfg: &Config,
    spec_path: &Path,
    limit: Option<usize>,
    models: Models,
    store: &Store,
) -> Result<Plan, AppError> {
    let spec = spec::load(spec_path)?;
    let resolver = cfg.resolver(models == Models::LocateOnly);
    let fetch = models == Models::Fetch;
    let mut known = resolver.known_models(&spec.models, fetch)?;
    // The engine's rate for each model: measured on this machine (`engine-bench --save`),
    // else as the report this plan's report replaces recorded it.
    let engine = cfg.engine_version();
    let recorded = crate::rate::recorded(&cfg.reports_dir.join(&spec.name).join("run.json"));
    for m in &mut known {
        m.rate = m.sha256.as_deref().and_then(|sha| {
            crate::rate::load(&cfg.cache_dir, sha, &engine, cfg.threads).or_else(|| {
                recorded
                    .iter()
                    .find(|r| r.is_for(sha, &engine, cfg.threads))
                    .cloned()
            })
        });
    }
    let embedder_specs: Vec<_> = spec.embedders.iter().map(|e| e.model.clone()).collect();
    let embedders = resolver.known_models(&embedder_specs, fetch)?;
    Ok(plan::build(
        spec,
        known,
        embedders,
        store,
        &PlanOptions {
            engine_version: cfg.engine_version(),
            limit,
        },
    )?)
}

/// The scheduler's dry run (`plan`, `cache status`, `cache gc`): the plan and what the
/// deciding stages decide from the caches as they are; nothing is computed or written, and
/// no model is downloaded or loaded.
pub fn dry_run(
    cfg: &Config,
    spec_path: &Path,
    limit: Option<usize>,
    cache: &Cache,
    store: &Store,
) -> Result<(Plan, Decided), AppError> {
    let plan = load_plan(cfg, spec_path, limit, Models::LocateOnly, store)?;
    let decided = crate::cascade::decide(&plan, cache, store, true)?;
    Ok((plan, decided))
}

/// What to bring up to date.
#[derive(Debug, Clone)]
pub enum Target {
    /// Every stage (`run`).
    Everything,
    /// One shard's part of the inference known when the run starts (a cascade's later
    /// stages need another round of shards).
    Shard(Shard),
    /// What the served cell (by id) needs before its first request (`serve`): the rows its
    /// calibrations are fitted on, a cascade's fit rows.
    Serve(String),
}

/// A reported cell's index by its id; an unknown id is bad input that names the cells there
/// are.
pub fn reported_cell(plan: &Plan, cell: &str) -> Result<usize, AppError> {
    plan.cell_by_id(cell).ok_or_else(|| AppError::UnknownCell {
        cell: cell.to_string(),
        known: plan
            .cells
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// A served cell: its index, and the cells that answer (the cell, or a cascade's stages in
/// turn). An unknown id is bad input that names the cells there are.
pub fn served_cell(plan: &Plan, cell: &str) -> Result<(usize, Vec<CellRef>), AppError> {
    let ci = reported_cell(plan, cell)?;
    let stages = match plan.cells[ci].source {
        Source::Cascade { cascade } => plan.cascades[cascade].stages.clone(),
        _ => vec![CellRef::Reported(ci)],
    };
    Ok((ci, stages))
}

/// The cells whose rows a served cell needs before its first request, as `run` computes
/// them: the rows each answering cell's calibration is fitted on, and a cascade's fit rows
/// for its fitted thresholds.
fn served_needs(plan: &Plan, cell: &str) -> Result<HashSet<String>, AppError> {
    let (ci, stages) = served_cell(plan, cell)?;
    let mut needed: HashSet<String> = stages
        .iter()
        .filter_map(|r| plan.cell(*r).calibration)
        .map(|cal| plan.support[plan.calibrations[cal].support].id.clone())
        .collect();
    if let Source::Cascade { cascade } = plan.cells[ci].source {
        needed.extend(
            plan.cascades[cascade]
                .fit_stages
                .iter()
                .flatten()
                .map(|i| plan.support[*i].id.clone()),
        );
    }
    Ok(needed)
}

/// The stages brought up to date: the plan, what the deciding stages decided, what ran.
pub struct Scheduled {
    pub plan: Plan,
    pub decided: Decided,
    pub stats: ExecStats,
    /// Problems that did not stop the run (fits or compaction not stored).
    pub warnings: Vec<String>,
    /// Set when the machinery failed, or a row failed under `--fail-fast`: what finished is
    /// in the cache.
    pub error: Option<AppError>,
}

/// Brings stages up to date; see the module documentation.
pub struct Scheduler<'a> {
    pub cfg: &'a Config,
    pub spec_path: &'a Path,
    pub limit: Option<usize>,
    pub fail_fast: bool,
    pub make_backend: MakeBackend,
    pub cancel: Arc<AtomicBool>,
}

impl Scheduler<'_> {
    fn backend(&self) -> Box<dyn FnOnce() -> Box<dyn Backend> + Send> {
        let make = self.make_backend.clone();
        Box::new(move || make())
    }

    /// One wave of inference: the rows the routing decided so far needs, on a backend of
    /// its own.
    fn execute(
        &self,
        plan: &Plan,
        decided: &Decided,
        cache: &mut Cache,
        opts: &ExecOptions,
    ) -> exec::ExecOutcome {
        exec::execute(
            plan,
            &decided.routing,
            cache,
            self.backend(),
            opts,
            self.cancel.clone(),
        )
    }

    pub fn run(
        &self,
        cache: &mut Cache,
        store: &mut Store,
        target: &Target,
    ) -> Result<Scheduled, AppError> {
        let cfg = self.cfg;
        let mut plan = load_plan(cfg, self.spec_path, self.limit, Models::Fetch, store)?;
        if let Target::Serve(cell) = target {
            // Before anything is computed: an unknown cell is bad input.
            served_cell(&plan, cell)?;
        }
        // embed: the neighbours, and so the prompts with retrieved examples, read it.
        let embed_stats = if plan.embed_requests.iter().any(|r| !store.contains(&r.key)) {
            let stats = embed::run(
                &plan,
                store,
                self.backend(),
                cfg.threads,
                cfg.progress == crate::progress::ProgressMode::Off,
                self.cancel.clone(),
            )
            .map_err(|e| embed_error(&plan, e))?;
            plan = load_plan(cfg, self.spec_path, self.limit, Models::Fetch, store)?;
            stats
        } else {
            embed::EmbedStats {
                cached: plan.embed_requests.len(),
                ..Default::default()
            }
        };
        // neighbours: computed while planning, stored as their stage's output.
        store.commit(plan.new_artifacts.clone())?;
        let (decided, mut stats, error) = self.infer(&plan, cache, store, target)?;
        let mut warnings = Vec::new();
        if !matches!(target, Target::Serve(_)) {
            // calibrate: the fits whose rows are all computed are stored (the `decided` of the
            // last wave holds the same fits), and read back by later commands (`plan`,
            // `report`, the next run's routing).
            warnings.extend(store_fits(&plan, cache, &decided, store));
            if let Err(e) = cache.compact_if_needed() {
                warnings.push(format!("cache compaction skipped: {e}"));
            }
            if let Err(e) = store.compact(None) {
                warnings.push(format!("artifact compaction skipped: {e}"));
            }
        }
        stats.embed = embed_stats;
        Ok(Scheduled {
            plan,
            decided,
            stats,
            warnings,
            error,
        })
    }

    /// The infer and route stages, wave by wave: the inference whose inputs are known,
    /// then routing again from the cache, until nothing new is sent on (a chain needs a wave
    /// per step, and one per fitted step).
    fn infer(
        &self,
        plan: &Plan,
        cache: &mut Cache,
        store: &Store,
        target: &Target,
    ) -> Result<(Decided, ExecStats, Option<AppError>), AppError> {
        let cfg = self.cfg;
        let mut opts = ExecOptions {
            threads: cfg.threads,
            progress: cfg.progress.clone(),
            fail_fast: self.fail_fast,
            packing: cfg.packing,
            ..Default::default()
        };
        match target {
            Target::Shard(s) => {
                // Every shard must see the same plan: a cascade's later stage only once the
                // stage before it is complete.
                let decided = crate::cascade::decide(plan, cache, store, false)?;
                opts.shard = Some(ShardFilter {
                    manifest: shard_manifest(plan, &decided.routing, cache, s.count, true)?,
                    index: s.index,
                });
                let outcome = self.execute(plan, &decided, cache, &opts);
                return Ok((decided, outcome.stats, outcome.error.map(AppError::from)));
            }
            Target::Serve(cell) => opts.only_cells = Some(served_needs(plan, cell)?),
            Target::Everything => {}
        }
        let serving = opts.only_cells.as_ref().is_some_and(|c| !c.is_empty());
        if opts.only_cells.as_ref().is_some_and(HashSet::is_empty) {
            return Ok((
                crate::cascade::decide(plan, cache, store, true)?,
                ExecStats::default(),
                None,
            ));
        }
        let waves = 1 + 2 * plan
            .cascades
            .iter()
            .map(|c| c.stages.len())
            .max()
            .unwrap_or(0);
        let mut stats = ExecStats::default();
        let mut decided = crate::cascade::decide(plan, cache, store, true)?;
        let mut last: Option<HashSet<(JobId, usize)>> = None;
        for wave in 0..waves {
            // The first wave of a run always goes (it counts the cached rows); later ones
            // only while routing sends something new (not only rows that just failed again).
            if wave > 0 || serving {
                let pending: HashSet<(JobId, usize)> =
                    exec::pending_jobs(plan, &decided.routing, cache)
                        .into_iter()
                        .map(|j| (j.id, j.rows))
                        .collect();
                if pending.is_empty() || last.as_ref() == Some(&pending) {
                    break;
                }
                if wave > 0 {
                    last = Some(pending);
                }
            }
            let outcome = self.execute(plan, &decided, cache, &opts);
            let computed = outcome.stats.computed_rows;
            // Every wave before this one ran (a wave that does not run ends the loop).
            if wave == 0 {
                stats = outcome.stats;
            } else {
                stats.absorb(outcome.stats);
            }
            decided = crate::cascade::decide(plan, cache, store, true)?;
            if let Some(e) = outcome.error {
                return Ok((decided, stats, Some(e.into())));
            }
            if stats.interrupted
                || (serving && computed == 0)
                || (!serving && plan.cascades.is_empty())
            {
                break;
            }
        }
        Ok((decided, stats, None))
    }
}

/// The calibrate stage's output: each fit whose rows are all computed, stored under its key.
fn store_fits(plan: &Plan, cache: &Cache, decided: &Decided, store: &mut Store) -> Option<String> {
    let fits: Vec<Artifact> = plan
        .cells
        .iter()
        .filter_map(|c| {
            let key = plan.calibration_key(c, cache)?;
            if store.contains(&key) {
                return None;
            }
            let params = decided.fit(c.calibration?).ok()?;
            Some(Artifact {
                key,
                kind: ArtifactKind::Calibration,
                value: serde_json::to_vec(&params).ok()?,
            })
        })
        .collect();
    store
        .commit(fits)
        .err()
        .map(|e| format!("calibration fits not stored: {e}"))
}

/// The split of the plan's pending rows into `count` shards: the one the first shard wrote,
/// or (`create`) a new one written now, or (not `create`) what a split made now would be.
pub fn shard_manifest(
    plan: &Plan,
    routing: &crate::plan::Routing,
    cache: &Cache,
    count: usize,
    create: bool,
) -> Result<Manifest, AppError> {
    let digest = shard::plan_digest(plan.keys(routing));
    let dir = cache.root().join("shards");
    let make = || {
        let pending: Vec<_> = exec::pending_jobs(plan, routing, cache)
            .into_iter()
            .map(|j| (j.id, j.tokens))
            .collect();
        Manifest::split(digest, count, &pending)
    };
    Ok(if create {
        Manifest::load_or_create(&dir, &digest, count, make)?
    } else {
        Manifest::existing(&dir, &digest, count)?.unwrap_or_else(make)
    })
}

/// An embedder that is not an embedding model is bad input, located at its `gguf:` line.
fn embed_error(plan: &Plan, e: EmbedError) -> AppError {
    match e {
        EmbedError::Backend {
            embedder,
            source: crate::backend::BackendError::NotEmbedding { reason, .. },
            ..
        } => {
            let spec = &plan.spec.embedders[embedder].model;
            AppError::Input(spec.gguf.error(format!("not an embedding model: {reason}")))
        }
        other => other.into(),
    }
}
