//! The commands as library functions over a settled [`Config`]: `plan`, `run`, `report`,
//! `export` and the cache commands. The CLI parses arguments, calls one of these and prints
//! what it returns; tests, `pipeline serve` and sharded runs call them directly.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::cache::{Cache, CacheError, CacheStatus, GcReport, LoadReport};
use crate::config::Config;
use crate::exec::{self, ExecStats};
use crate::key::Digest;
use crate::plan::{CellStatus, Decided, Explanation, Plan, Source};
use crate::report::{self, Provenance, Written, html::Scripts};
use crate::schedule::{Models, Scheduler, Target, dry_run, load_plan, served_cell, shard_manifest};
use crate::shard::Shard;
use crate::store::Store;

pub use crate::error::AppError;

pub use crate::schedule::MakeBackend;

/// A plan and the caches it was checked against.
pub struct Planned {
    pub plan: Plan,
    /// What the deciding stages (calibrate, route) decide from the caches as they are.
    pub decided: Decided,
    pub cache: Cache,
    pub store: Store,
    /// Each cell's status, counted once (a million rows' lookups are worth keeping).
    status: std::cell::OnceCell<Vec<CellStatus>>,
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
                "; this machine's engine is `{}`, and the engine is part of every row key, so rows cached by that run would not be reused here either (a binary built for the same CPU features reuses them: the portable x86-64-v3 build, docs/book/engine.md, \"CPU features and the engine key\", gives `cpu sse3+ssse3+avx+avx2+f16c+fma+bmi2+llamafile` on any AVX2 machine)",
                self.plan.engine_version
            ));
        }
        Some(note)
    }

    pub fn status(&self) -> Vec<CellStatus> {
        self.status
            .get_or_init(|| self.plan.status(&self.cache, &self.decided.routing))
            .clone()
    }

    /// When rows this plan lacks are cached under another engine key (another llama.cpp
    /// build, or the same build on a CPU with other features): how many, and why they are
    /// not reused.
    pub fn engine_note(&self) -> Result<Option<String>, CacheError> {
        if self.cache.is_empty() {
            return Ok(None);
        }
        // Every component but the engine, as one digest.
        let strip = |c: &crate::key::Components| {
            let mut e = crate::key::KeyEncoder::new("without-engine");
            for (name, d) in crate::key::Components::NAMES.iter().zip(c.parts()).take(5) {
                e.digest(name, &d);
            }
            e.finish()
        };
        let mut missing: HashSet<Digest> = HashSet::new();
        let mut engine = None;
        for c in self.plan.inference_cells() {
            for (ri, key) in self.plan.needed_keys(c, &self.decided.routing) {
                let Some(key) = key else { continue };
                if self.cache.contains(&key) {
                    continue;
                }
                let Some(comps) = c.rows.get(ri) else {
                    continue;
                };
                engine.get_or_insert(comps.engine);
                missing.insert(strip(&comps));
            }
        }
        let Some(engine) = engine else {
            return Ok(None);
        };
        // Only when rows are missing are the cached rows' components read (by projection).
        if missing.is_empty() {
            return Ok(None);
        }
        let mut elsewhere = HashSet::new();
        self.cache.identities(&mut |r| {
            if r.components.engine != engine && missing.contains(&strip(&r.components)) {
                elsewhere.insert(r.key);
            }
        })?;
        let elsewhere = elsewhere.len();
        Ok((elsewhere > 0).then(|| {
            format!(
                "note: {elsewhere} of the rows to run are cached under another engine key (another llama.cpp build, or CPU features other than this machine's `{}`); the engine is part of every row key, so they are not reused",
                self.plan.engine_version
            )
        }))
    }

    pub fn stages(&self) -> Vec<crate::plan::StageStatus> {
        self.plan
            .stages(&self.cache, &self.store, &self.decided.routing)
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
        if let Some(text) =
            self.plan
                .explain_stage(cell, &self.cache, &self.store, &self.decided.routing)
        {
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
        Ok(self.plan.explain(ci, &self.cache)?)
    }
}

/// Above this many stored rows, `plan`, `report` and `export` index only the rows their plan
/// needs (about 50 bytes a row either way): a whole index of two million rows is 100 MB.
const INDEX_WHOLE_CACHE_ROWS: u64 = 2_000_000;

/// The plan of a spec against the cache (the scheduler's dry run: what is cached, what
/// would run); writes nothing, downloads and loads no model.
pub fn plan(cfg: &Config, spec_path: &Path, limit: Option<usize>) -> Result<Planned, AppError> {
    let store = Store::open_read_only(&cfg.cache_dir)?;
    let (cache, plan) = if Cache::stored_rows(&cfg.cache_dir)? <= INDEX_WHOLE_CACHE_ROWS {
        // The whole index is read while the plan is built: neither needs the other until
        // the deciding stages, and each is a good part of a large study's `plan`.
        std::thread::scope(|s| {
            let cache = s.spawn(|| Cache::open_read_only(&cfg.cache_dir));
            let plan = load_plan(cfg, spec_path, limit, Models::LocateOnly, &store);
            let cache = cache
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (cache, plan)
        })
    } else {
        // A large cache (many studies share it): only the plan's rows are indexed, so this
        // one pays the reading of the others' keys, not the memory of their rows.
        let plan = load_plan(cfg, spec_path, limit, Models::LocateOnly, &store)?;
        let cache = Cache::open_read_only_for(&cfg.cache_dir, plan.row_keys());
        (cache, Ok(plan))
    };
    let (cache, plan) = (cache?, plan?);
    let decided = crate::cascade::decide(&plan, &cache, &store, true)?;
    Ok(Planned {
        plan,
        decided,
        cache,
        store,
        status: Default::default(),
    })
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
    let scheduler = Scheduler {
        cfg,
        spec_path,
        limit: opts.limit,
        fail_fast: opts.fail_fast,
        make_backend,
        cancel,
    };
    let target = match opts.shard {
        Some(s) => Target::Shard(s),
        None => Target::Everything,
    };
    let done = scheduler.run(&mut cache, &mut store, &target)?;
    warnings.extend(done.plan.warnings.iter().cloned());
    warnings.extend(done.warnings);
    let stats = done.stats;
    if opts.shard.is_some() {
        return Ok(RunOutcome {
            stats,
            written: None,
            warnings,
            error: done.error,
        });
    }
    let prov = Provenance::new(&done.plan, cfg.threads, Some(stats.clone()));
    let written = report::write(
        &done.plan,
        &done.decided,
        &cache,
        &stats.computed,
        &prov,
        &cfg.reports_dir,
        opts.scripts,
    );
    let (written, error) = match (written, done.error) {
        (Ok(w), e) => (Some(w), e),
        (Err(r), Some(e)) => {
            warnings.push(format!("the report could not be written: {r}"));
            (None, Some(e))
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

/// `run --until-resolved A B`: the two cells, the most rows, and the rows added per look.
#[derive(Debug, Clone)]
pub struct UntilResolved {
    pub cells: [String; 2],
    /// At most this many of the spec's sampled rows (default: all of them).
    pub max_rows: Option<usize>,
    pub batch: usize,
}

/// Run growing prefixes of the spec's sample (`batch` rows more each time, every prefix
/// balanced by label) until the anytime-valid test of `until.cells` decides or the cap is
/// reached (`crate::sequential`); the last run's report and `run.json` say why it stopped.
pub fn run_until_resolved(
    cfg: &Config,
    spec_path: &Path,
    opts: &RunOptions,
    cancel: Arc<AtomicBool>,
    make_backend: MakeBackend,
    until: &UntilResolved,
) -> Result<(RunOutcome, crate::sequential::Sequential), AppError> {
    use crate::sequential::{Sequential, Stopped};
    let planned = plan(cfg, spec_path, None)?;
    for cell in &until.cells {
        crate::schedule::reported_cell(&planned.plan, cell)?;
    }
    let sampled = planned.plan.dataset.rows.len();
    drop(planned);
    let max_rows = until.max_rows.unwrap_or(sampled).min(sampled);
    let batch = until.batch.max(1);
    let mut seq = Sequential {
        cells: until.cells.clone(),
        rows: 0,
        max_rows,
        batch,
        looks: 0,
        stopped: Stopped::Incomplete,
        first_only: 0,
        second_only: 0,
        e_value: 1.0,
        why: String::new(),
    };
    let mut rows = batch.min(max_rows);
    loop {
        let step = RunOptions {
            limit: Some(rows),
            ..opts.clone()
        };
        let outcome =
            run_with_backend(cfg, spec_path, &step, cancel.clone(), make_backend.clone())?;
        let analysis = outcome.written.as_ref().map(|w| &w.analysis);
        let counts = analysis.and_then(|a| discordant(a, &until.cells));
        let stopped_early = outcome.error.is_some()
            || outcome.stats.interrupted
            || cancel.load(std::sync::atomic::Ordering::SeqCst);
        match counts {
            Some((b, c)) => seq.look(rows, b, c),
            None => seq.rows = rows,
        }
        let stop = if stopped_early || counts.is_none() {
            Some(Stopped::Incomplete)
        } else if seq.resolved() {
            Some(Stopped::Resolved)
        } else if rows >= max_rows {
            Some(Stopped::Cap)
        } else {
            None
        };
        if let Some(stopped) = stop {
            seq.stopped = stopped;
            seq.why = seq.sentence();
            // The last run's report again, now saying why the run stopped.
            let mut outcome = outcome;
            if outcome.written.is_some() {
                let p = plan(cfg, spec_path, Some(rows))?;
                let mut prov = Provenance::new(&p.plan, cfg.threads, Some(outcome.stats.clone()));
                prov.sequential = Some(seq.clone());
                outcome.written = Some(report::write(
                    &p.plan,
                    &p.decided,
                    &p.cache,
                    &outcome.stats.computed,
                    &prov,
                    &cfg.reports_dir,
                    opts.scripts,
                )?);
            }
            return Ok((outcome, seq));
        }
        rows = (rows + batch).min(max_rows);
    }
}

/// Rows only the first cell got right and rows only the second did, on the rows both
/// answered; `None` when either cell has no rows.
fn discordant(a: &crate::report::Analysis, cells: &[String; 2]) -> Option<(u64, u64)> {
    let index = |id: &str| a.metrics.iter().position(|m| m.cell == id);
    let (x, y) = (index(&cells[0])?, index(&cells[1])?);
    let mut right: std::collections::BTreeMap<usize, [Option<bool>; 2]> = Default::default();
    for p in &a.predictions {
        let slot = if p.cell == x {
            0
        } else if p.cell == y {
            1
        } else {
            continue;
        };
        right.entry(p.row).or_default()[slot] = Some(p.correct());
    }
    let (first, second): (Vec<bool>, Vec<bool>) = right
        .values()
        .filter_map(|[p, q]| Some(((*p)?, (*q)?)))
        .unzip();
    Some(crate::metrics::stats::discordant(&first, &second))
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
pub fn shard_plan(planned: &Planned, count: usize) -> Result<Vec<ShardSummary>, AppError> {
    let (plan, cache) = (&planned.plan, &planned.cache);
    // As a shard sees it: a cascade's later stage only once the stage before is complete.
    let routing = crate::cascade::decide(plan, cache, &planned.store, false)?.routing;
    let manifest = shard_manifest(plan, &routing, cache, count, false)?;
    let mut out: Vec<ShardSummary> = (0..count)
        .map(|index| ShardSummary {
            index,
            prompts: 0,
            rows: 0,
            estimated_tokens: 0,
            models: Vec::new(),
        })
        .collect();
    for j in exec::pending_jobs(plan, &routing, cache) {
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
    let scheduler = Scheduler {
        cfg,
        spec_path,
        limit: None,
        fail_fast: false,
        make_backend: make_backend.clone(),
        cancel: Arc::new(AtomicBool::new(false)),
    };
    let done = scheduler.run(&mut cache, &mut store, &Target::Serve(cell.to_string()))?;
    if let Some(e) = done.error {
        return Err(e);
    }
    let (plan, decided) = (done.plan, done.decided);
    let (ci, stages) = served_cell(&plan, cell)?;
    let mut answering = Vec::new();
    for r in &stages {
        let c = plan.cell(*r).clone();
        let params = match c.calibration {
            None => None,
            Some(cal) => Some(decided.fit(cal).map_err(|why| AppError::Calibration {
                cell: c.id.clone(),
                why,
            })?),
        };
        answering.push((c, params));
    }
    let thresholds = match plan.cells[ci].source {
        Source::Cascade { cascade } => {
            let res = decided.resolution(cascade);
            let known: Option<Vec<f64>> = res.and_then(|r| r.thresholds.iter().copied().collect());
            known.ok_or_else(|| AppError::ServeThreshold {
                cell: cell.to_string(),
                why: plan.cascade_note(cascade, &decided.routing),
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

/// `pipeline report`: every report file from the cache alone (no model is loaded, the
/// cache is not written).
pub fn report(
    cfg: &Config,
    spec_path: &Path,
    limit: Option<usize>,
    scripts: Scripts,
) -> Result<(Written, Vec<String>), AppError> {
    let mut p = plan(cfg, spec_path, limit)?;
    p.plan.release_prompts();
    let mut prov = Provenance::new(&p.plan, cfg.threads, None);
    prov.keep_last_run(&cfg.reports_dir.join(&p.plan.spec.name).join("run.json"));
    let written = report::write(
        &p.plan,
        &p.decided,
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
    let mut p = plan(cfg, spec_path, limit)?;
    p.plan.release_prompts();
    let dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| cfg.reports_dir.join(&p.plan.spec.name));
    Ok((
        report::export_csv(&p.plan, &p.decided, &p.cache, &dir)?,
        p.warnings(),
    ))
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
        let (plan, decided) = dry_run(cfg, s, None, &cache, &store)?;
        let routing = decided.routing;
        let mut total = CellStatus::default();
        for st in plan.status(&cache, &routing) {
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
        let (plan, decided) = dry_run(cfg, s, None, cache, store)?;
        let routing = decided.routing;
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
        rows.extend(plan.keys(&routing));
        artifacts.extend(plan.artifact_keys());
        artifacts.extend(
            plan.cells
                .iter()
                .filter_map(|c| plan.calibration_key(c, cache)),
        );
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
    t.rows_present = needed.iter().filter(|k| bundle.contains(k)).count();
    let copy: HashSet<Digest> = needed
        .iter()
        .filter(|k| source.contains(k) && !bundle.contains(k))
        .copied()
        .collect();
    t.rows = copy.len();
    source.whole_rows(&|k| copy.contains(k), &mut |rows| bundle.commit(rows))?;
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
    let items: Vec<crate::store::Artifact> = needed_artifacts
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
        let new: HashSet<Digest> = source
            .keys()
            .filter(|k| !cache.contains(k))
            .copied()
            .collect();
        t.rows += new.len();
        t.rows_present += source.len() - new.len();
        source.whole_rows(&|k| new.contains(k), &mut |rows| cache.commit(rows))?;
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
    let mut report = Cache::open_verifying(&cfg.cache_dir)?.report;
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
