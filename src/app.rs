//! The commands as library functions over a settled [`Config`]: `plan`, `run`, `report`,
//! `export` and the cache commands. The CLI parses arguments, calls one of these and prints
//! what it returns; tests, `pipeline serve` and sharded runs call them directly.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::backend::Backend;
use crate::cache::{Cache, CacheError, CacheStatus, GcReport, LoadReport};
use crate::config::Config;
use crate::diag::Diagnostic;
use crate::embed::{self, EmbedError};
use crate::exec::{self, ExecError, ExecOptions, ExecStats, ShardFilter};
use crate::key::Digest;
use crate::plan::{self, CellRef, CellStatus, Explanation, Plan, PlanOptions, Source};
use crate::report::{self, Provenance, ReportError, Written, html::Scripts};
use crate::shard::{self, Manifest, Shard, ShardError};
use crate::spec;
use crate::store::{Artifact, Store};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad input: the spec, a template, a dataset, a model file.
    #[error(transparent)]
    Input(#[from] Diagnostic),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Run(#[from] ExecError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("cell `{cell}` cannot be calibrated: {why}")]
    Calibration {
        cell: String,
        why: crate::predict::CalibrationError,
    },
    #[error("serve: {0}")]
    Serve(#[from] crate::serve::ServeError),
    #[error("serve: cascade `{cell}`: a threshold could not be fitted ({why})")]
    ServeThreshold { cell: String, why: String },
    #[error("cannot listen for SIGINT and SIGTERM: {0}")]
    Signals(#[source] std::io::Error),
    #[error("no cell `{cell}` in this plan; cells: {known}")]
    UnknownCell { cell: String, known: String },
    #[error(
        "cannot tell which cached rows {spec} needs: model `{model}` is not on this machine and the spec gives no sha256"
    )]
    UnknownModelDigest { spec: PathBuf, model: String },
    #[error("{}: not a pipeline cache folder (it has no {}/ inside)", .0.display(), crate::cache::LAYOUT)]
    NotACache(PathBuf),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("the plan's stages: {0}")]
    Dag(#[from] crate::dag::DagError),
    #[error("{}: is the cache itself; export into another folder", .0.display())]
    ExportIntoCache(PathBuf),
}

impl AppError {
    /// 2 for bad input, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Input(_)
            | AppError::UnknownCell { .. }
            | AppError::NotACache(_)
            | AppError::Shard(_)
            | AppError::ExportIntoCache(_) => 2,
            _ => 1,
        }
    }
}

/// Makes an inference backend; called on the worker thread of each stage that needs one
/// (embedding, inference), which then owns it.
pub type MakeBackend = Arc<dyn Fn() -> Box<dyn Backend> + Send + Sync>;

/// A plan and the caches it was checked against.
pub struct Planned {
    pub plan: Plan,
    pub cache: Cache,
    pub store: Store,
}

impl Planned {
    /// When `reports_dir` holds a published report of this spec whose rows this cache lacks:
    /// who made it, and why a run here computes them again (the row cache is not part of a
    /// published report; another engine gives other keys).
    pub fn published_note(&self, reports_dir: &Path) -> Option<String> {
        let dir = reports_dir.join(&self.plan.spec.name);
        let run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("run.json")).ok()?).ok()?;
        let (rows, cached) = self
            .status()
            .iter()
            .fold((0, 0), |(r, c), s| (r + s.rows, c + s.cached));
        if cached == rows {
            return None;
        }
        let engine = run["engine"].as_str().unwrap_or("unknown");
        let date = run["last_run"]["date_utc"]
            .as_str()
            .or(run["date_utc"].as_str())
            .unwrap_or("an unknown date");
        let bundle = dir.join("rows");
        let carried = if bundle.join(crate::cache::LAYOUT).is_dir() {
            format!(
                "its rows are published beside it: `pipeline cache import {}` first, or `run` computes the other {}",
                bundle.display(),
                rows - cached
            )
        } else {
            format!(
                "a report does not carry the row cache, so `run` computes the other {}",
                rows - cached
            )
        };
        let mut note = format!(
            "note: {} was published on {} UTC with engine `{engine}`; this cache holds {cached} of its {rows} rows ({carried})",
            dir.display(),
            date,
        );
        if engine != self.plan.engine_version {
            note.push_str(&format!(
                "; this machine's engine is `{}`, and the engine is part of every row key, so rows cached by that run would not be reused here either (a binary built for the same CPU features reuses them: the portable x86-64-v3 build, README \"CPU features and the engine key\", gives `cpu sse3+ssse3+avx+avx2+f16c+fma+bmi2+llamafile` on any AVX2 machine)",
                self.plan.engine_version
            ));
        }
        Some(note)
    }

    pub fn status(&self) -> Vec<CellStatus> {
        self.plan.status(&self.cache)
    }

    /// When rows this plan lacks are cached under another engine key (another llama.cpp
    /// build, or the same build on a CPU with other features): how many, and why they are
    /// not reused.
    pub fn engine_note(&self) -> Option<String> {
        let strip = |c: &crate::key::Components| {
            let p = c.parts();
            [p[0], p[1], p[2], p[3], p[4]]
        };
        let mut missing: HashSet<[Digest; 5]> = HashSet::new();
        let mut engine = None;
        for c in self.plan.inference_cells() {
            for comps in c.rows.iter().flatten() {
                engine.get_or_insert(comps.engine);
                if self.cache.get(&comps.row_key()).is_none() {
                    missing.insert(strip(comps));
                }
            }
        }
        let engine = engine?;
        let elsewhere = self
            .cache
            .rows()
            .filter(|r| r.components.engine != engine && missing.contains(&strip(&r.components)))
            .count();
        (elsewhere > 0).then(|| {
            format!(
                "note: {elsewhere} of the rows to run are cached under another engine key (another llama.cpp build, or CPU features other than this machine's `{}`); the engine is part of every row key, so they are not reused",
                self.plan.engine_version
            )
        })
    }

    pub fn stages(&self) -> Vec<crate::plan::StageStatus> {
        self.plan.stages(&self.cache, &self.store)
    }

    /// The stages as one checked graph.
    pub fn dag(&self) -> Result<crate::dag::Dag, crate::dag::DagError> {
        crate::dag::Dag::new(self.stages())
    }

    /// Cache problems met while opening it (damaged segments, corrupt rows).
    pub fn warnings(&self) -> Vec<String> {
        let mut r = self.cache.report.clone();
        r.merge(&self.store.report);
        let mut w = self.plan.warnings.clone();
        w.extend(r.problems());
        w
    }

    /// Why a cell's rows (or a stage's items, given a stage id such as `embed:minilm`)
    /// miss the cache.
    pub fn explain(&self, cell: &str) -> Result<String, AppError> {
        if let Some(text) = self.plan.explain_stage(cell, &self.cache, &self.store) {
            return Ok(text);
        }
        Ok(self.explain_cell(cell)?.to_string())
    }

    pub fn explain_cell(&self, cell: &str) -> Result<Explanation, AppError> {
        let Some(ci) = self.plan.cell_by_id(cell) else {
            let stages = self.stages().into_iter().map(|s| s.id);
            return Err(AppError::UnknownCell {
                cell: cell.to_string(),
                known: self
                    .plan
                    .cells
                    .iter()
                    .map(|c| c.id.clone())
                    .chain(stages)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        Ok(self.plan.explain(ci, &self.cache))
    }
}

/// The plan of a spec against the cache; writes nothing, downloads and loads no model.
pub fn plan(cfg: &Config, spec_path: &Path, limit: Option<usize>) -> Result<Planned, AppError> {
    let cache = Cache::open_read_only(&cfg.cache_dir)?;
    let store = Store::open_read_only(&cfg.cache_dir)?;
    let plan = load_plan(cfg, spec_path, limit, Models::LocateOnly, &store, &cache)?;
    Ok(Planned { plan, cache, store })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Models {
    /// Find models on this machine, never download them; the digest memo is not written.
    LocateOnly,
    /// Download missing models.
    Fetch,
}

fn load_plan(
    cfg: &Config,
    spec_path: &Path,
    limit: Option<usize>,
    models: Models,
    store: &Store,
    cache: &Cache,
) -> Result<Plan, AppError> {
    let spec = spec::load(spec_path)?;
    let resolver = cfg.resolver(models == Models::LocateOnly);
    let fetch = models == Models::Fetch;
    let known = resolver.known_models(&spec.models, fetch)?;
    let embedder_specs: Vec<_> = spec.embedders.iter().map(|e| e.model.clone()).collect();
    let embedders = resolver.known_models(&embedder_specs, fetch)?;
    let mut plan = plan::build(
        spec,
        known,
        embedders,
        store,
        &PlanOptions {
            engine_version: cfg.engine_version(),
            limit,
        },
    )?;
    crate::cascade::resolve(&mut plan, cache, true);
    Ok(plan)
}

/// `pipeline run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub limit: Option<usize>,
    pub scripts: Scripts,
    /// Stop at the first row that cannot be computed.
    pub fail_fast: bool,
    /// Compute only this shard's part of the pending rows, and write no report (the
    /// report job does, after every shard).
    pub shard: Option<Shard>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            limit: None,
            scripts: Scripts::Inline,
            fail_fast: false,
            shard: None,
        }
    }
}

/// What a run did. `error` is set when the machinery failed (a model that would not load,
/// the cache, the worker, or a failed row under `--fail-fast`): the report of what finished
/// was still written when it could be.
pub struct RunOutcome {
    pub stats: ExecStats,
    pub written: Option<Written>,
    pub warnings: Vec<String>,
    pub error: Option<AppError>,
}

/// Run every row the cache lacks with the configured backend, then write the report.
/// `cancel` stops the run after the current prompt (Ctrl-C); finished rows are kept.
pub fn run(
    cfg: &Config,
    spec_path: &Path,
    opts: &RunOptions,
    cancel: Arc<AtomicBool>,
) -> Result<RunOutcome, AppError> {
    let kind = cfg.backend;
    run_with_backend(
        cfg,
        spec_path,
        opts,
        cancel,
        Arc::new(move || kind.create()),
    )
}

/// [`run`] with a backend of the caller's choosing.
pub fn run_with_backend(
    cfg: &Config,
    spec_path: &Path,
    opts: &RunOptions,
    cancel: Arc<AtomicBool>,
    make_backend: MakeBackend,
) -> Result<RunOutcome, AppError> {
    let mut cache = Cache::open(&cfg.cache_dir)?;
    let mut store = Store::open(&cfg.cache_dir)?;
    let mut report = cache.report.clone();
    report.merge(&store.report);
    let mut warnings = report.problems();
    let mut plan = load_plan(cfg, spec_path, opts.limit, Models::Fetch, &store, &cache)?;
    warnings.extend(plan.warnings.iter().cloned());
    // Each stage makes its backend on its own worker thread.
    let backend_for_stage = || -> Box<dyn FnOnce() -> Box<dyn Backend> + Send> {
        let make = make_backend.clone();
        Box::new(move || make())
    };
    // Embed first: the neighbours, and so the prompts with retrieved examples, need it.
    let embed_stats = if plan.embed_requests.iter().any(|r| !store.contains(&r.key)) {
        let stats = embed::run(
            &plan,
            &mut store,
            backend_for_stage(),
            cfg.threads,
            cfg.progress == crate::progress::ProgressMode::Off,
            cancel.clone(),
        )
        .map_err(|e| embed_error(&plan, e))?;
        plan = load_plan(cfg, spec_path, opts.limit, Models::Fetch, &store, &cache)?;
        stats
    } else {
        embed::EmbedStats {
            cached: plan.embed_requests.len(),
            ..Default::default()
        }
    };
    store.commit(std::mem::take(&mut plan.new_artifacts))?;
    if opts.shard.is_some() {
        // Every shard must see the same plan: a cascade's later stage only once the stage
        // before it is complete.
        crate::cascade::resolve(&mut plan, &cache, false);
    }
    let shard = match opts.shard {
        Some(s) => Some(ShardFilter {
            manifest: shard_manifest(&plan, &cache, s.count, true)?,
            index: s.index,
        }),
        None => None,
    };
    let exec_opts = ExecOptions {
        threads: cfg.threads,
        progress: cfg.progress.clone(),
        fail_fast: opts.fail_fast,
        shard,
        packing: cfg.packing,
        ..Default::default()
    };
    let mut outcome = exec::execute(
        &plan,
        &mut cache,
        backend_for_stage(),
        &exec_opts,
        cancel.clone(),
    );
    // A cascade's later stages run the rows its earlier stages send on, known only now;
    // a chain needs a pass per step (and one per fitted step). A sharded run computes what
    // is known when it starts: its later stages need another round of shards.
    if opts.shard.is_none() && !plan.cascades.is_empty() {
        let passes = 2 * plan
            .cascades
            .iter()
            .map(|c| c.stages.len())
            .max()
            .unwrap_or(0);
        let mut last: Option<HashSet<(shard::JobId, usize)>> = None;
        for _ in 0..passes {
            if outcome.error.is_some() || outcome.stats.interrupted {
                break;
            }
            crate::cascade::resolve(&mut plan, &cache, true);
            let pending: HashSet<(shard::JobId, usize)> = exec::pending_jobs(&plan, &cache)
                .into_iter()
                .map(|j| (j.id, j.rows))
                .collect();
            // Nothing new (or only rows that just failed again): done.
            if pending.is_empty() || last.as_ref() == Some(&pending) {
                break;
            }
            last = Some(pending);
            let later = exec::execute(
                &plan,
                &mut cache,
                backend_for_stage(),
                &exec_opts,
                cancel.clone(),
            );
            outcome.error = later.error;
            outcome.stats.absorb(later.stats);
        }
        crate::cascade::resolve(&mut plan, &cache, true);
    }
    // Calibration fits whose rows are all computed are stored as the stage's output.
    let fits: Vec<Artifact> = plan
        .cells
        .iter()
        .filter_map(|c| {
            let key = plan.calibration_key(c)?;
            let params = crate::metrics::calibration(&plan, &cache, c.calibration?).ok()?;
            Some(Artifact {
                key,
                kind: crate::store::ArtifactKind::Calibration,
                value: serde_json::to_vec(&params).expect("parameters serialize"),
            })
        })
        .collect();
    if let Err(e) = store.commit(fits) {
        warnings.push(format!("calibration fits not stored: {e}"));
    }
    if let Err(e) = cache.compact_if_needed() {
        warnings.push(format!("cache compaction skipped: {e}"));
    }
    if let Err(e) = store.compact(None) {
        warnings.push(format!("artifact compaction skipped: {e}"));
    }
    let mut stats = outcome.stats;
    stats.embed = embed_stats;
    if opts.shard.is_some() {
        return Ok(RunOutcome {
            stats,
            written: None,
            warnings,
            error: outcome.error.map(AppError::from),
        });
    }
    let prov = Provenance::new(&plan, cfg.threads, Some(stats.clone()));
    let written = report::write(
        &plan,
        &cache,
        &stats.computed,
        &prov,
        &cfg.reports_dir,
        opts.scripts,
    );
    let (written, error) = match (written, outcome.error) {
        (Ok(w), e) => (Some(w), e.map(AppError::from)),
        (Err(r), Some(e)) => {
            warnings.push(format!("the report could not be written: {r}"));
            (None, Some(e.into()))
        }
        (Err(r), None) => (None, Some(r.into())),
    };
    Ok(RunOutcome {
        stats,
        written,
        warnings,
        error,
    })
}

/// The split of the plan's pending rows into `count` shards: the one the first shard wrote,
/// or (`create`) a new one written now, or (not `create`) what a split made now would be.
fn shard_manifest(
    plan: &Plan,
    cache: &Cache,
    count: usize,
    create: bool,
) -> Result<Manifest, AppError> {
    let digest = shard::plan_digest(plan.keys());
    let dir = cache.root().join("shards");
    let make = || {
        let pending: Vec<_> = exec::pending_jobs(plan, cache)
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

/// One shard of `plan --shards N`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardSummary {
    pub index: usize,
    /// Prompt evaluations and rows it has still to compute.
    pub prompts: usize,
    pub rows: usize,
    pub estimated_tokens: u64,
    /// The models it loads, in order.
    pub models: Vec<String>,
}

/// `pipeline plan SPEC --shards N`: what each shard would compute now (by the split the
/// first shard wrote, if one did).
pub fn shard_plan(planned: &mut Planned, count: usize) -> Result<Vec<ShardSummary>, AppError> {
    crate::cascade::resolve(&mut planned.plan, &planned.cache, false);
    let (plan, cache) = (&planned.plan, &planned.cache);
    let manifest = shard_manifest(plan, cache, count, false)?;
    let mut out: Vec<ShardSummary> = (0..count)
        .map(|index| ShardSummary {
            index,
            prompts: 0,
            rows: 0,
            estimated_tokens: 0,
            models: Vec::new(),
        })
        .collect();
    for j in exec::pending_jobs(plan, cache) {
        let s = &mut out[manifest.owner(&j.id)];
        s.prompts += 1;
        s.rows += j.rows;
        s.estimated_tokens += j.tokens;
        let model = &plan.models[j.id.model].id;
        if s.models.last() != Some(model) {
            s.models.push(model.clone());
        }
    }
    Ok(out)
}

/// `pipeline serve`: prepare the cell (embeddings, the rows its calibration is fitted on,
/// computed when the cache lacks them), then serve it until SIGTERM. `on_listen` is told the
/// bound address.
pub fn serve(
    cfg: &Config,
    spec_path: &Path,
    cell: &str,
    opts: &crate::serve::ServeOptions,
    make_backend: MakeBackend,
    on_listen: Box<dyn FnOnce(std::net::SocketAddr) + Send>,
) -> Result<(), AppError> {
    let mut cache = Cache::open(&cfg.cache_dir)?;
    let mut store = Store::open(&cfg.cache_dir)?;
    let mut plan = load_plan(cfg, spec_path, None, Models::Fetch, &store, &cache)?;
    let unknown = |plan: &Plan| AppError::UnknownCell {
        cell: cell.to_string(),
        known: plan
            .cells
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    };
    plan.cell_by_id(cell).ok_or_else(|| unknown(&plan))?;
    let cancel = Arc::new(AtomicBool::new(false));
    let quiet = cfg.progress == crate::progress::ProgressMode::Off;
    if plan.embed_requests.iter().any(|r| !store.contains(&r.key)) {
        let make = make_backend.clone();
        embed::run(
            &plan,
            &mut store,
            Box::new(move || make()),
            cfg.threads,
            quiet,
            cancel.clone(),
        )
        .map_err(|e| embed_error(&plan, e))?;
        plan = load_plan(cfg, spec_path, None, Models::Fetch, &store, &cache)?;
    }
    store.commit(std::mem::take(&mut plan.new_artifacts))?;
    let ci = plan.cell_by_id(cell).ok_or_else(|| unknown(&plan))?;
    // The cells that answer: the cell, or a cascade's stages in turn.
    let stages: Vec<CellRef> = match plan.cells[ci].source {
        Source::Cascade { cascade } => plan.cascades[cascade].stages.clone(),
        _ => vec![CellRef::Reported(ci)],
    };
    // What they need before the first request, as `run` computes it: the rows each
    // calibration is fitted on, and a cascade's fit rows for its fitted thresholds.
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
    for _ in 0..=2 * stages.len() {
        crate::cascade::resolve(&mut plan, &cache, true);
        let pending = exec::pending_jobs(&plan, &cache).len();
        if needed.is_empty() || pending == 0 {
            break;
        }
        let make = make_backend.clone();
        let outcome = exec::execute(
            &plan,
            &mut cache,
            Box::new(move || make()),
            &ExecOptions {
                threads: cfg.threads,
                progress: cfg.progress.clone(),
                only_cells: Some(needed.clone()),
                packing: cfg.packing,
                ..Default::default()
            },
            cancel.clone(),
        );
        if let Some(e) = outcome.error {
            return Err(e.into());
        }
        if outcome.stats.computed_rows == 0 {
            break;
        }
    }
    crate::cascade::resolve(&mut plan, &cache, true);
    let mut answering = Vec::new();
    for r in &stages {
        let mut c = plan.cell(*r).clone();
        if let Some(full) = c.masked.take() {
            c.rows = full;
        }
        let params =
            match c.calibration {
                None => None,
                Some(cal) => Some(crate::metrics::calibration(&plan, &cache, cal).map_err(
                    |why| AppError::Calibration {
                        cell: c.id.clone(),
                        why,
                    },
                )?),
            };
        answering.push((c, params));
    }
    let thresholds = match plan.cells[ci].source {
        Source::Cascade { cascade } => {
            let res = plan.cascades[cascade].resolution.as_ref();
            let known: Option<Vec<f64>> = res.and_then(|r| r.thresholds.iter().copied().collect());
            known.ok_or_else(|| AppError::ServeThreshold {
                cell: cell.to_string(),
                why: plan.cascade_note(&plan.cascades[cascade]),
            })?
        }
        _ => Vec::new(),
    };
    crate::serve::serve(
        crate::serve::Startup {
            cell: plan.cells[ci].id.clone(),
            plan,
            stages: answering,
            thresholds,
            cache,
            store,
            packing: cfg.packing,
        },
        opts,
        make_backend,
        on_listen,
    )
    .map_err(AppError::Serve)
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

/// `pipeline report`: every report file from the cache alone (no model is loaded, the
/// cache is not written).
pub fn report(
    cfg: &Config,
    spec_path: &Path,
    limit: Option<usize>,
    scripts: Scripts,
) -> Result<(Written, Vec<String>), AppError> {
    let p = plan(cfg, spec_path, limit)?;
    let mut prov = Provenance::new(&p.plan, cfg.threads, None);
    prov.keep_last_run(&cfg.reports_dir.join(&p.plan.spec.name).join("run.json"));
    let written = report::write(
        &p.plan,
        &p.cache,
        &HashSet::new(),
        &prov,
        &cfg.reports_dir,
        scripts,
    )?;
    Ok((written, p.warnings()))
}

/// `pipeline export --format csv`: the report's tables as CSV in `out` (default: the
/// report folder).
pub fn export(
    cfg: &Config,
    spec_path: &Path,
    limit: Option<usize>,
    out: Option<&Path>,
) -> Result<(Vec<PathBuf>, Vec<String>), AppError> {
    let p = plan(cfg, spec_path, limit)?;
    let dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| cfg.reports_dir.join(&p.plan.spec.name));
    Ok((report::export_csv(&p.plan, &p.cache, &dir)?, p.warnings()))
}

/// `pipeline cache status`: the cache as a whole, and for each spec given, how many of its
/// rows it holds.
pub struct CacheReport {
    pub status: CacheStatus,
    pub load: LoadReport,
    /// Per spec: its name and the total of its cells' status.
    pub specs: Vec<(String, CellStatus)>,
    /// Stored stage outputs by kind (embeddings, neighbour lists, calibration fits).
    pub artifacts: std::collections::BTreeMap<crate::store::ArtifactKind, usize>,
    pub artifact_bytes: u64,
}

pub fn cache_status(cfg: &Config, specs: &[PathBuf]) -> Result<CacheReport, AppError> {
    let cache = Cache::open_read_only(&cfg.cache_dir)?;
    let store = Store::open_read_only(&cfg.cache_dir)?;
    let mut per_spec = Vec::new();
    for s in specs {
        let plan = load_plan(cfg, s, None, Models::LocateOnly, &store, &cache)?;
        let mut total = CellStatus::default();
        for st in plan.status(&cache) {
            total.rows += st.rows;
            total.cached += st.cached;
            total.failed += st.failed;
        }
        per_spec.push((plan.spec.name.clone(), total));
    }
    let mut load = cache.report.clone();
    load.merge(&store.report);
    let (artifacts, artifact_bytes) = store.status();
    Ok(CacheReport {
        status: cache.status(&cfg.cache_dir),
        load,
        specs: per_spec,
        artifacts,
        artifact_bytes,
    })
}

/// `pipeline cache gc --keep SPEC...`: remove every row that none of the specs needs (all
/// their rows, without `--limit`). A spec whose model digest cannot be known here is an
/// error rather than a guess: its rows could otherwise be removed.
pub fn cache_gc(cfg: &Config, keep: &[PathBuf], dry_run: bool) -> Result<GcReport, AppError> {
    let mut store = if dry_run {
        Store::open_read_only(&cfg.cache_dir)?
    } else {
        Store::open(&cfg.cache_dir)?
    };
    let mut cache = if dry_run {
        Cache::open_read_only(&cfg.cache_dir)?
    } else {
        Cache::open(&cfg.cache_dir)?
    };
    let (needed, needed_artifacts) = needed_by(cfg, keep, &store, &cache)?;
    let mut report = cache.gc(&cfg.cache_dir, &needed, dry_run)?;
    report.artifacts_removed = if dry_run {
        store.unneeded(&needed_artifacts)
    } else {
        store.compact(Some(&needed_artifacts))?
    };
    Ok(report)
}

/// Every row key and artifact key the specs need (all their rows, as without `--limit`).
/// A spec whose model digest cannot be known here is an error rather than a guess.
fn needed_by(
    cfg: &Config,
    specs: &[PathBuf],
    store: &Store,
    cache: &Cache,
) -> Result<(HashSet<Digest>, HashSet<Digest>), AppError> {
    let mut rows = HashSet::new();
    let mut artifacts = HashSet::new();
    for s in specs {
        let plan = load_plan(cfg, s, None, Models::LocateOnly, store, cache)?;
        if let Some(m) = plan
            .models
            .iter()
            .chain(&plan.embedders)
            .find(|m| m.sha256.is_none())
        {
            return Err(AppError::UnknownModelDigest {
                spec: s.clone(),
                model: m.id.clone(),
            });
        }
        rows.extend(plan.keys());
        artifacts.extend(plan.artifact_keys());
        artifacts.extend(plan.cells.iter().filter_map(|c| plan.calibration_key(c)));
    }
    Ok((rows, artifacts))
}

/// What `cache export` wrote or `cache import` added.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Transfer {
    pub rows: usize,
    /// Rows the destination held already.
    pub rows_present: usize,
    pub artifacts: usize,
    pub artifacts_present: usize,
    /// Damage found while reading the source (its bad rows are not copied).
    pub problems: Vec<String>,
}

/// `pipeline cache export --spec SPEC... DIR`: the rows and stage outputs the specs need,
/// as a cache folder of its own (one segment each), to publish beside a report or carry to
/// another machine. Failed rows are left out: they run again wherever they are imported.
///
/// `without_embeddings` leaves the embeddings out: they are the largest stage output and the
/// cheapest to compute again (the neighbour lists, which decide the prompts, are kept).
pub fn cache_export(
    cfg: &Config,
    specs: &[PathBuf],
    out: &Path,
    without_embeddings: bool,
) -> Result<Transfer, AppError> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(out, &cfg.cache_dir) {
        return Err(AppError::ExportIntoCache(out.to_path_buf()));
    }
    let source = Cache::open_read_only(&cfg.cache_dir)?;
    let source_store = Store::open_read_only(&cfg.cache_dir)?;
    let (needed, needed_artifacts) = needed_by(cfg, specs, &source_store, &source)?;
    let mut t = Transfer {
        problems: source.report.problems(),
        ..Transfer::default()
    };
    t.problems.extend(source_store.report.problems());
    let mut bundle = Cache::open(out)?;
    let rows: Vec<_> = needed
        .iter()
        .filter_map(|k| source.get(k))
        .filter(|r| bundle.get(&r.key).is_none())
        .cloned()
        .collect();
    t.rows = rows.len();
    t.rows_present = needed.iter().filter(|k| bundle.get(k).is_some()).count();
    bundle.commit(rows)?;
    // One segment holding exactly what the specs need, whatever the folder held before.
    bundle.gc(out, &needed, false)?;
    let mut store = Store::open(out)?;
    let mut needed_artifacts = needed_artifacts;
    if without_embeddings {
        needed_artifacts.retain(|k| {
            source_store
                .get(k)
                .is_none_or(|a| a.kind != crate::store::ArtifactKind::Embedding)
        });
    }
    let items: Vec<Artifact> = needed_artifacts
        .iter()
        .filter_map(|k| source_store.get(k))
        .filter(|a| !store.contains(&a.key))
        .cloned()
        .collect();
    t.artifacts = items.len();
    t.artifacts_present = needed_artifacts
        .iter()
        .filter(|k| store.contains(k))
        .count();
    store.commit(items)?;
    store.compact(Some(&needed_artifacts))?;
    // A bundle carries segments only: not this machine's digest memo, locks or an empty
    // quarantine (it is meant to be committed and copied).
    let root = bundle.root().to_path_buf();
    let _ = std::fs::remove_dir_all(bundle.digest_dir());
    let _ = std::fs::remove_dir(root.join("quarantine"));
    for lock in ["rows.lock", "artifacts.lock"] {
        let _ = std::fs::remove_file(root.join(lock));
    }
    Ok(t)
}

/// `pipeline cache import DIR...`: add the rows and stage outputs of other cache folders
/// (bundles from `cache export`, another machine's cache, a shard's) to this cache. Every
/// row's checksum is verified on reading; a damaged row is reported and not copied. Rows
/// are matched by key alone, so an imported row serves only the exact computation
/// (model file, prompt, method, sampler, seed, engine) that made it.
pub fn cache_import(cfg: &Config, from: &[PathBuf]) -> Result<Transfer, AppError> {
    let mut cache = Cache::open(&cfg.cache_dir)?;
    let mut store = Store::open(&cfg.cache_dir)?;
    let mut t = Transfer::default();
    for dir in from {
        if !dir.join(crate::cache::LAYOUT).is_dir() {
            return Err(AppError::NotACache(dir.clone()));
        }
        let source = Cache::open_read_only(dir)?;
        let source_store = Store::open_read_only(dir)?;
        t.problems.extend(source.report.problems());
        t.problems.extend(source_store.report.problems());
        let (new, present): (Vec<_>, Vec<_>) =
            source.rows().partition(|r| cache.get(&r.key).is_none());
        t.rows += new.len();
        t.rows_present += present.len();
        cache.commit(new.into_iter().cloned().collect())?;
        let (new, present): (Vec<_>, Vec<_>) =
            source_store.items().partition(|a| !store.contains(&a.key));
        t.artifacts += new.len();
        t.artifacts_present += present.len();
        store.commit(new.into_iter().cloned().collect())?;
    }
    cache.compact_if_needed()?;
    store.compact(None)?;
    Ok(t)
}

/// `pipeline cache verify`: read every segment and check every row's checksum; damaged
/// segments are quarantined and their good rows kept.
pub fn cache_verify(cfg: &Config) -> Result<Verified, AppError> {
    let mut report = Cache::open(&cfg.cache_dir)?.report;
    let store = Store::open(&cfg.cache_dir)?;
    report.merge(&store.report);
    let memo = cfg.resolver(false).memo();
    let memo = memo.verify().map_err(|e| {
        AppError::Cache(CacheError::Io {
            path: memo.dir.clone(),
            source: e,
        })
    })?;
    Ok(Verified { rows: report, memo })
}

/// `pipeline cache verify`: the rows and artifacts, and the model digest memo.
pub struct Verified {
    pub rows: LoadReport,
    pub memo: crate::digest_memo::MemoReport,
}

impl Verified {
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.rows.problems();
        p.extend(self.memo.problems());
        p
    }
}
