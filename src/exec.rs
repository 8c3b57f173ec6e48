//! The executor: runs every row the cache lacks, model by model, on one worker thread that
//! owns the backend, and commits finished rows in small batches as they arrive.
//!
//! Rows are grouped by (model, prompt, dataset row): the prompt is evaluated once and every
//! cell that shares it (grid points, seeds, log-likelihood) is served from that state. A row
//! that cannot be computed (a prompt over the context, a decode error) is recorded with its
//! error and the run goes on; only a failure of the machinery (a model that does not load,
//! the cache, the worker) is an error of the run, and even then every finished row is kept.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::{Backend, BackendError, FailureKind, ModelLoad, PromptOutput, Task};
use crate::cache::{Cache, CacheError, CachedRow, Lookup};
use crate::key::{Components, Digest};
use crate::plan::Cell;
use crate::plan::{Plan, Routing};
use crate::progress::{Progress, ProgressMode};
use crate::prompt::{Example, Messages, Prompts};
use crate::row::Finish;
use crate::shard::{JobId, Manifest};
use crate::worker::{Batch, Next};

#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub threads: usize,
    /// Commit after this many finished rows...
    pub commit_rows: usize,
    /// ...or after this long, whichever comes first.
    pub commit_interval: Duration,
    pub progress: ProgressMode,
    /// Stop at the first row that cannot be computed.
    pub fail_fast: bool,
    /// Only these cells (by id), when set.
    pub only_cells: Option<HashSet<String>>,
    /// Only the jobs this shard owns, when set.
    pub shard: Option<ShardFilter>,
    /// One prompt at a time, or several per decode call.
    pub packing: crate::backend::Packing,
}

/// One shard's part of a split run.
#[derive(Debug, Clone)]
pub struct ShardFilter {
    pub manifest: Manifest,
    pub index: usize,
}

impl Default for ExecOptions {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            commit_rows: crate::worker::COMMIT_ROWS,
            commit_interval: crate::worker::COMMIT_INTERVAL,
            progress: ProgressMode::Off,
            fail_fast: false,
            only_cells: None,
            shard: None,
            packing: crate::backend::Packing::ONE_AT_A_TIME,
        }
    }
}

/// Physical cores: llama.cpp gains nothing from hyper-threads.
pub fn default_threads() -> usize {
    num_cpus::get_physical().max(1)
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExecStats {
    /// Cell rows served from the cache before anything ran.
    pub cached_rows: usize,
    /// Cell rows computed (and committed) in this run.
    pub computed_rows: usize,
    /// Distinct rows (keys) computed; equal to `computed_rows` unless cells share keys.
    pub computed_keys: usize,
    /// Cell rows that could not be computed in this run (recorded with their error).
    pub failed_rows: usize,
    /// Failed cell rows by error kind.
    pub failed_by_kind: BTreeMap<FailureKind, usize>,
    pub prompts_evaluated: usize,
    pub prompt_tokens: u64,
    pub evaluated_tokens: u64,
    pub models_loaded: usize,
    pub wall_s: f64,
    pub interrupted: bool,
    /// Cell rows cached under a larger `n_ctx` that do not fit their cell's: reported as
    /// failed (context overflow) and not run.
    pub too_long_rows: usize,
    /// Rows computed in this run that could not be stored (the cache refused a commit):
    /// they are not in the cache and run again next time.
    pub unstored_rows: usize,
    /// Peak resident memory of the process (VmHWM), where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// CPU time the process used while the run computed, and its share of the engine
    /// threads' time over the run's wall-clock time: the load the run's wall-clock figures
    /// were measured under (near 1: the machine was the run's; well below: shared).
    pub cpu_s: Option<f64>,
    pub cpu_share: Option<f64>,
    /// The embed stage of this run.
    pub embed: crate::embed::EmbedStats,
    /// Keys computed by this run (the rest of the report's rows came from the cache).
    #[serde(skip)]
    pub computed: HashSet<Digest>,
}

impl ExecStats {
    /// Add a later pass of the same run (a cascade's later stages): its rows were not
    /// cached before the run, so only what it computed counts.
    pub fn absorb(&mut self, later: ExecStats) {
        self.computed_rows += later.computed_rows;
        self.computed_keys += later.computed_keys;
        self.failed_rows += later.failed_rows;
        for (k, n) in later.failed_by_kind {
            *self.failed_by_kind.entry(k).or_default() += n;
        }
        self.prompts_evaluated += later.prompts_evaluated;
        self.prompt_tokens += later.prompt_tokens;
        self.evaluated_tokens += later.evaluated_tokens;
        self.models_loaded += later.models_loaded;
        // The share over both, each weighted by its wall-clock time.
        self.cpu_share = match (self.cpu_share, later.cpu_share) {
            (Some(a), Some(b)) if self.wall_s + later.wall_s > 0.0 => {
                Some((a * self.wall_s + b * later.wall_s) / (self.wall_s + later.wall_s))
            }
            (a, b) => a.or(b),
        };
        self.cpu_s = match (self.cpu_s, later.cpu_s) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.wall_s += later.wall_s;
        self.interrupted |= later.interrupted;
        self.unstored_rows += later.unstored_rows;
        self.peak_rss_bytes = self.peak_rss_bytes.max(later.peak_rss_bytes);
        self.computed.extend(later.computed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("model `{model}`: {source}")]
    Backend {
        model: String,
        #[source]
        source: BackendError,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("the worker thread stopped unexpectedly")]
    WorkerDied,
    #[error("row `{row}` of cell `{cell}` failed ({source}); stopped there (--fail-fast)")]
    RowFailed {
        cell: String,
        row: String,
        #[source]
        source: BackendError,
    },
}

/// What a run did, and the error that stopped it early, if any: finished rows are in the
/// cache either way.
#[derive(Debug)]
pub struct ExecOutcome {
    pub stats: ExecStats,
    pub error: Option<ExecError>,
}

/// A task of one cell on one prompt.
struct PendingTask {
    cell: usize,
    key: Digest,
    components: Components,
    task: Task,
}

/// One prompt (model × prompt × row of a row set) and every task to compute from it.
pub(crate) struct Job {
    pub(crate) model: usize,
    pub(crate) prompt: usize,
    set: usize,
    row: usize,
    tasks: Vec<PendingTask>,
}

impl Job {
    pub(crate) fn cells(&self) -> impl Iterator<Item = usize> + '_ {
        self.tasks.iter().map(|t| t.cell)
    }

    /// The cells of some of its tasks.
    pub(crate) fn cells_of(&self, tasks: Range<usize>) -> impl Iterator<Item = usize> + '_ {
        self.tasks[tasks].iter().map(|t| t.cell)
    }

    fn id(&self) -> JobId {
        JobId {
            model: self.model,
            prompt: self.prompt,
            set: self.set,
            row: self.row,
        }
    }
}

/// A prompt evaluation still to do, as a split sees it.
#[derive(Debug, Clone)]
pub struct PendingJob {
    pub id: JobId,
    /// Its rows (tasks).
    pub rows: usize,
    /// Estimated tokens: the prompt's characters / 4, plus the tokens its generations may
    /// decode. No tokenizer is loaded to plan.
    pub tokens: u64,
}

/// Every prompt evaluation the cache lacks, in executor order.
pub fn pending_jobs(plan: &Plan, routing: &Routing, cache: &Cache) -> Vec<PendingJob> {
    collect_work(plan, routing, cache, None)
        .jobs
        .iter()
        .map(|j| {
            let chars = plan.sets[j.set].messages[j.prompt][j.row]
                .as_ref()
                .map(|m| m.system.as_deref().map_or(0, str::len) + m.user.len())
                .unwrap_or(0);
            let decode: u64 = j
                .tasks
                .iter()
                .map(|t| match &t.task {
                    Task::Generate { max_tokens, .. } => u64::from(*max_tokens),
                    Task::Loglik { .. } | Task::Hidden { .. } => 1,
                })
                .sum();
            PendingJob {
                id: j.id(),
                rows: j.tasks.len(),
                tokens: chars as u64 / 4 + decode,
            }
        })
        .collect()
}

/// What the worker thread needs of a job, owned.
struct WorkerJob {
    model: usize,
    prompt: usize,
    text: String,
    /// The row's own choices (per-row choices only), to render again when the text is cut.
    choices: Vec<String>,
    messages: Messages,
    /// The row's retrieved examples (to render again when the text is cut).
    examples: Option<Vec<Example>>,
    tasks: Vec<Task>,
}

/// What the worker reports. A job's tasks may come in several parts (`tasks`, a range of
/// the job's tasks), so that a prompt with thousands of tasks is committed as it goes.
enum Msg {
    Done {
        job: usize,
        tasks: Range<usize>,
        out: PromptOutput,
    },
    RowFailed {
        job: usize,
        tasks: Range<usize>,
        error: BackendError,
    },
    ModelLoaded,
    ModelFailed {
        model: String,
        error: BackendError,
    },
}

/// The work a plan leaves to do.
struct Work {
    jobs: Vec<Job>,
    /// Cells whose row shares a key computed by another cell's task: (cell, key).
    followers: Vec<(usize, Digest)>,
    cached: usize,
    /// Cell rows computed under a larger `n_ctx` that do not fit their cell's.
    too_long: usize,
}

/// Cells by index: the reported cells, then the support cells (vote cells have no rows).
fn cells(plan: &Plan) -> Vec<&Cell> {
    plan.inference_cells().collect()
}

fn collect_work(
    plan: &Plan,
    routing: &Routing,
    cache: &Cache,
    only: Option<&HashSet<String>>,
) -> Work {
    let mut jobs: BTreeMap<JobId, Job> = BTreeMap::new();
    let mut scheduled: HashSet<Digest> = HashSet::new();
    let mut followers = Vec::new();
    let mut cached = 0;
    let mut too_long = 0;
    // A key shared by cells of models with different `n_ctx` (one GGUF file under two ids)
    // runs on the cell with the most room, so that it is not failed forever by the smallest
    // context; the others follow it.
    let mut by_room: Vec<(usize, &Cell, Option<u32>)> = cells(plan)
        .into_iter()
        .enumerate()
        .map(|(ci, c)| (ci, c, plan.prompt_limit(c)))
        .collect();
    by_room.sort_by_key(|&(_, _, limit)| std::cmp::Reverse(limit));
    for (ci, cell, limit) in by_room {
        let (Some(model), Some(prompt)) = (cell.model(), cell.prompt()) else {
            continue;
        };
        if only.is_some_and(|o| !o.contains(&cell.id)) {
            continue;
        }
        for (ri, comps) in plan.needed_rows(cell, routing) {
            // Unknown keys cannot run (their examples' embeddings failed): left to do.
            let Some(comps) = comps else { continue };
            let key = comps.row_key();
            match cache.lookup(&key, limit) {
                Lookup::Hit => {
                    cached += 1;
                    continue;
                }
                // Computed under a larger context; here it would overflow, and running it
                // would say so again: it is reported failed, not run.
                Lookup::TooLong { .. } => {
                    too_long += 1;
                    continue;
                }
                Lookup::Failed(_) | Lookup::Miss => {}
            }
            if !scheduled.insert(key) {
                followers.push((ci, key));
                continue;
            }
            jobs.entry(JobId {
                model,
                prompt,
                set: cell.set,
                row: ri,
            })
            .or_insert_with(|| Job {
                model,
                prompt,
                set: cell.set,
                row: ri,
                tasks: Vec::new(),
            })
            .tasks
            .push(PendingTask {
                cell: ci,
                key,
                components: comps,
                task: plan.row_task(cell, ri).for_row(&comps.prompt),
            });
        }
    }
    // Hidden states are read while the prompt is evaluated, so their tasks come first: the
    // parts after them start from that evaluation (a later hidden-state part would have to
    // evaluate the row's tokens again).
    for j in jobs.values_mut() {
        j.tasks
            .sort_by_key(|t| !matches!(t.task, Task::Hidden { .. }));
    }
    Work {
        jobs: jobs.into_values().collect(),
        followers,
        cached,
        too_long,
    }
}

pub(crate) fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Run everything the cache lacks. `make_backend` is called on the worker thread.
pub fn execute(
    plan: &Plan,
    routing: &Routing,
    cache: &mut Cache,
    make_backend: Box<dyn FnOnce() -> Box<dyn Backend> + Send>,
    opts: &ExecOptions,
    cancel: Arc<AtomicBool>,
) -> ExecOutcome {
    let start = Instant::now();
    let cpu = crate::rate::CpuSince::now();
    let mut work = collect_work(plan, routing, cache, opts.only_cells.as_ref());
    if let Some(f) = &opts.shard {
        work.jobs.retain(|j| f.manifest.owner(&j.id()) == f.index);
        let mine: HashSet<Digest> = work
            .jobs
            .iter()
            .flat_map(|j| j.tasks.iter().map(|t| t.key))
            .collect();
        work.followers.retain(|(_, k)| mine.contains(k));
    }
    let mut stats = ExecStats {
        cached_rows: work.cached,
        too_long_rows: work.too_long,
        ..Default::default()
    };
    if work.jobs.is_empty() {
        stats.wall_s = start.elapsed().as_secs_f64();
        return ExecOutcome { stats, error: None };
    }

    let worker_jobs: Vec<WorkerJob> = work
        .jobs
        .iter()
        .map(|j| WorkerJob {
            model: j.model,
            prompt: j.prompt,
            text: plan.sets[j.set].rows[j.row].text.clone(),
            choices: plan.sets[j.set].rows[j.row].choices.clone(),
            messages: plan.sets[j.set].messages[j.prompt][j.row]
                .clone()
                .expect("a row with a key has its messages"),
            examples: plan.sets[j.set].shots[j.prompt][j.row]
                .as_ref()
                .map(|s| s.examples.clone()),
            tasks: j.tasks.iter().map(|t| t.task.clone()).collect(),
        })
        .collect();
    let loads: Vec<ModelLoad> = plan
        .models
        .iter()
        .map(|m| {
            let r = m.file.as_ref().expect("run plans resolve every model");
            ModelLoad {
                id: m.id.clone(),
                path: r.path.clone(),
                n_ctx: r.n_ctx,
                threads: opts.threads,
                // A server takes `concurrency` requests at a time: groups of that many rows
                // (two at least: a group runs each row's tasks together, so that one
                // evaluation serves a row's generations and log-likelihoods).
                packing: match &r.server {
                    Some(s) => crate::backend::Packing {
                        rows: s.spec.concurrency.max(2),
                        batch: crate::backend::Packing::ONE_AT_A_TIME.batch,
                    },
                    None => opts.packing,
                },
                server: r.server.clone(),
            }
        })
        .collect();
    let context = WorkerContext {
        prompts: plan.prompts.clone(),
        cancel: cancel.clone(),
        fail_fast: opts.fail_fast,
    };
    let (rx, worker) = crate::worker::spawn("pipeline-backend", move |tx| {
        worker(make_backend, loads, worker_jobs, context, tx)
    });

    let ids = cells(plan).iter().map(|c| c.id.clone()).collect();
    let mut per_cell = vec![0u64; cells(plan).len()];
    for c in work.jobs.iter().flat_map(Job::cells) {
        per_cell[c] += 1;
    }
    let progress = Progress::new(ids, per_cell, &opts.progress);
    let rows_done = |j: &Job, tasks: Range<usize>| {
        let cells: Vec<usize> = j.cells_of(tasks).collect();
        let what = || {
            format!(
                "{} · {}",
                plan.models[j.model].id,
                plan.prompts.id(j.prompt)
            )
        };
        progress.rows_done(&what, &cells);
    };
    let origin = Origin::of(opts);
    let mut buffer: Batch<CachedRow> = Batch::new(opts.commit_rows, opts.commit_interval);
    let mut error = None;
    let mut keys_done: HashSet<Digest> = HashSet::new();
    let mut keys_failed: HashSet<Digest> = HashSet::new();
    // The prompt evaluation of each job that has finished a part: every row of a prompt
    // records the evaluation its first successful part paid for.
    let mut evaluations: HashMap<usize, Prefill> = HashMap::new();
    loop {
        // Wake up when the next commit is due even if no row arrives: finished rows are
        // committed on time, however long the part in flight takes.
        let msg = match buffer.next(&rx) {
            Next::Message(m) => Some(m),
            Next::CommitDue => None,
            Next::Closed => break,
        };
        match msg {
            None => {}
            Some(Msg::ModelLoaded) => stats.models_loaded += 1,
            Some(Msg::ModelFailed { model, error: e }) => {
                error.get_or_insert(ExecError::Backend { model, source: e });
            }
            Some(Msg::Done { job, tasks, out }) => {
                let j = &work.jobs[job];
                // The job's first part that succeeds paid for the prompt's evaluation.
                let paid = *evaluations.entry(job).or_insert_with(|| {
                    stats.prompts_evaluated += 1;
                    stats.prompt_tokens += u64::from(out.prompt_tokens);
                    stats.evaluated_tokens += u64::from(out.evaluated_tokens);
                    Prefill {
                        evaluated_tokens: out.evaluated_tokens,
                        prefill_ms: out.prefill_ms,
                    }
                });
                let now_ms = now_unix_ms();
                for (t, o) in j.tasks[tasks.clone()].iter().zip(out.tasks) {
                    buffer.push(CachedRow {
                        text: o.text,
                        logprobs: o.logprobs,
                        hidden: o.hidden.map(crate::cache::stored_hidden),
                        choice_tokens: o.choice_tokens,
                        prefix_tokens: out.prefix_tokens,
                        prompt_tokens: out.prompt_tokens,
                        evaluated_tokens: paid.evaluated_tokens,
                        gen_tokens: o.gen_tokens,
                        finish: o.finish,
                        prefill_ms: paid.prefill_ms,
                        decode_ms: o.decode_ms,
                        ..row_of(plan, j, t, now_ms, &origin)
                    });
                    keys_done.insert(t.key);
                    stats.computed_rows += 1;
                }
                rows_done(j, tasks);
            }
            Some(Msg::RowFailed {
                job,
                tasks,
                error: e,
            }) => {
                let j = &work.jobs[job];
                let now_ms = now_unix_ms();
                let failure = e.to_row_error();
                for t in &j.tasks[tasks.clone()] {
                    buffer.push(CachedRow {
                        finish: Finish::Failed,
                        error: Some(failure.clone()),
                        ..row_of(plan, j, t, now_ms, &origin)
                    });
                    keys_failed.insert(t.key);
                    stats.failed_rows += 1;
                    *stats.failed_by_kind.entry(failure.kind).or_default() += 1;
                }
                let first_failed = tasks.start;
                rows_done(j, tasks);
                if opts.fail_fast && error.is_none() {
                    error = Some(ExecError::RowFailed {
                        cell: cells(plan)[j.tasks[first_failed].cell].id.clone(),
                        row: plan.sets[j.set].rows[j.row].id.clone(),
                        source: e,
                    });
                }
            }
        }
        if buffer.due() {
            let n = buffer.len();
            if let Err(e) = cache.commit(buffer.take()) {
                // Without a cache nothing more can be kept: stop the worker.
                cancel.store(true, Ordering::SeqCst);
                stats.unstored_rows += n;
                error.get_or_insert(e.into());
            }
        }
    }
    let n = buffer.len();
    if let Err(e) = cache.commit(buffer.take()) {
        stats.unstored_rows += n;
        error.get_or_insert(e.into());
    }
    if worker.join().is_err() {
        error.get_or_insert(ExecError::WorkerDied);
    }
    progress.finish();
    // Cells that share a key with a computed (or failed) row are done (or failed) too.
    for (_, k) in &work.followers {
        if keys_done.contains(k) {
            stats.computed_rows += 1;
        } else if keys_failed.contains(k) {
            stats.failed_rows += 1;
            if let Some(f) = cache.failure(k) {
                *stats.failed_by_kind.entry(f.kind).or_default() += 1;
            }
        }
    }
    stats.computed_keys = keys_done.len();
    stats.computed = keys_done;
    stats.interrupted = cancel.load(Ordering::SeqCst) && error.is_none();
    stats.wall_s = start.elapsed().as_secs_f64();
    stats.peak_rss_bytes = peak_rss_bytes();
    stats.cpu_s = cpu.seconds();
    stats.cpu_share = stats
        .cpu_s
        .and_then(|cpu| crate::rate::cpu_share(cpu, stats.wall_s, opts.threads));
    ExecOutcome { stats, error }
}

/// The cache row of one task of a job, with its identity and nothing computed yet.
fn row_of(plan: &Plan, j: &Job, t: &PendingTask, now_ms: i64, origin: &Origin) -> CachedRow {
    CachedRow {
        key: t.key,
        components: t.components,
        row_id: plan.sets[j.set].rows[j.row].id.clone(),
        cell_id: cells(plan)[t.cell].id.clone(),
        kind: t.task.kind(),
        text: None,
        logprobs: None,
        hidden: None,
        choice_tokens: None,
        prefix_tokens: None,
        prompt_tokens: 0,
        evaluated_tokens: 0,
        gen_tokens: 0,
        finish: Finish::Scored,
        prefill_ms: 0.0,
        shared_by: j.tasks.len() as u32,
        decode_ms: 0.0,
        created_unix_ms: now_ms,
        error: None,
        host: Some(origin.host.clone()),
        shard: origin.shard.clone(),
    }
}

/// Where this run computes its rows, recorded in each of them.
struct Origin {
    host: String,
    /// `I/N` when the run is one shard of a split.
    shard: Option<String>,
}

impl Origin {
    fn of(opts: &ExecOptions) -> Self {
        Self {
            host: crate::row::this_host(),
            shard: opts
                .shard
                .as_ref()
                .map(|f| format!("{}/{}", f.index, f.manifest.count)),
        }
    }
}

/// What the worker needs besides its jobs.
struct WorkerContext {
    prompts: Arc<Prompts>,
    cancel: Arc<AtomicBool>,
    fail_fast: bool,
}

/// What evaluating a prompt cost, as its rows record it.
#[derive(Debug, Clone, Copy)]
struct Prefill {
    evaluated_tokens: u32,
    prefill_ms: f64,
}

/// How much decoding one part of a prompt's tasks may ask for (generated tokens, and a
/// token per label for log-likelihood tasks): small enough that a part takes a few seconds
/// on a CPU, so that commits and progress lines keep coming and a stop request is taken
/// between parts, whatever the shape of the grid (one prompt with thousands of sampled
/// cells included).
const PART_DECODE_BUDGET: u64 = 32;

/// The job's tasks in parts of at most [`PART_DECODE_BUDGET`] decode tokens (at least one
/// task each).
fn task_parts(tasks: &[Task]) -> Vec<Range<usize>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut cost = 0;
    for (i, t) in tasks.iter().enumerate() {
        let c = match t {
            Task::Generate { max_tokens, .. } => u64::from(*max_tokens).max(1),
            Task::Loglik { continuations, .. } => continuations.len() as u64,
            // Read during the prompt's evaluation: no decoding of its own.
            Task::Hidden { .. } => 0,
        };
        // A part's tasks need the same context past the prompt, so that whether a task
        // fits the context depends on the task alone (the backend checks a call's longest).
        let same_context = tasks[start].context_after() == t.context_after();
        if i > start && (cost + c > PART_DECODE_BUDGET || !same_context) {
            parts.push(start..i);
            start = i;
            cost = 0;
        }
        cost += c;
    }
    if start < tasks.len() {
        parts.push(start..tasks.len());
    }
    parts
}

/// How sending a job's parts ended.
enum Sent {
    All,
    /// At least one part failed as a row error (reported failed; with `--fail-fast` the
    /// parts after it are not run).
    RowFailed,
    /// The receiving side is gone: stop.
    ReceiverGone,
}

/// One job, its prompt formed once and its tasks run in parts (see [`task_parts`]), each
/// part sent as it finishes. A part that fails as a row error (its task does not fit the
/// context, a decode error) is reported failed and the next part runs: whether a task
/// fits depends on the task alone. A stop request is taken between parts: the tasks not
/// run yet stay to do. An error that is not a row's own ends the model's work (`Err`).
fn run_job_in_parts(
    session: &mut dyn crate::backend::Session,
    job: &WorkerJob,
    idx: usize,
    ctx: &WorkerContext,
    tx: &mpsc::Sender<Msg>,
) -> Result<Sent, BackendError> {
    let failed = |tasks: Range<usize>, error: BackendError| {
        if !error.is_row_error() {
            return Err(error);
        }
        let sent = tx.send(Msg::RowFailed {
            job: idx,
            tasks,
            error,
        });
        Ok(if sent.is_ok() {
            Sent::RowFailed
        } else {
            Sent::ReceiverGone
        })
    };
    let chat = match chat(session, &ctx.prompts, &job.evaluation()) {
        Ok(c) => c,
        Err(e) => return failed(0..job.tasks.len(), e),
    };
    let mut result = Sent::All;
    for part in task_parts(&job.tasks) {
        if part.start > 0 && ctx.cancel.load(Ordering::SeqCst) {
            break;
        }
        match session.run(&chat, &job.tasks[part.clone()]) {
            Ok(out) => {
                let msg = Msg::Done {
                    job: idx,
                    tasks: part,
                    out,
                };
                if tx.send(msg).is_err() {
                    return Ok(Sent::ReceiverGone);
                }
            }
            Err(e) => match failed(part, e)? {
                Sent::ReceiverGone => return Ok(Sent::ReceiverGone),
                _ if ctx.fail_fast => return Ok(Sent::RowFailed),
                _ => result = Sent::RowFailed,
            },
        }
    }
    Ok(result)
}

impl WorkerJob {
    fn evaluation(&self) -> Evaluation<'_> {
        Evaluation {
            prompt: self.prompt,
            text: &self.text,
            choices: &self.choices,
            messages: &self.messages,
            examples: self.examples.as_deref(),
        }
    }

    /// The prompt's length in characters (to sort a packed run by).
    fn chars(&self) -> usize {
        self.messages.system.as_deref().map_or(0, str::len) + self.messages.user.len()
    }
}

/// Several jobs evaluated together (their prompts packed into shared decode calls); a job
/// whose prompt cannot be formed fails alone.
fn run_packed(
    session: &mut dyn crate::backend::Session,
    jobs: &[WorkerJob],
    group: &[usize],
    ctx: &WorkerContext,
) -> Vec<(usize, Result<PromptOutput, BackendError>)> {
    let mut out = Vec::new();
    let mut ready = Vec::new();
    let mut chats = Vec::new();
    for &i in group {
        let j = &jobs[i];
        match chat(session, &ctx.prompts, &j.evaluation()) {
            Ok(c) => {
                ready.push(i);
                chats.push((c, j.tasks.clone()));
            }
            Err(e) => out.push((i, Err(e))),
        }
    }
    out.extend(ready.into_iter().zip(session.run_many(&chats)));
    out
}

/// One row's prompt, as a run evaluates it.
pub struct Evaluation<'a> {
    pub prompt: usize,
    /// The row's (cleaned) text, before the budget cuts it.
    pub text: &'a str,
    /// The row's own choices (per-row choices only).
    pub choices: &'a [String],
    /// The messages rendered with the whole text.
    pub messages: &'a Messages,
    /// The row's retrieved examples, if its prompt has them.
    pub examples: Option<&'a [Example]>,
}

/// Evaluate a row on a loaded model exactly as `pipeline run` does (the server calls this
/// too): the text cut to the budget (the prompt rendered again when cut), the model's chat
/// template, then every task from one evaluation of the prompt.
pub fn evaluate(
    session: &mut dyn crate::backend::Session,
    prompts: &Prompts,
    e: &Evaluation,
    tasks: &[Task],
) -> Result<PromptOutput, BackendError> {
    let chat = chat(session, prompts, e)?;
    session.run(&chat, tasks)
}

/// The row's prompt in the model's chat format, its text cut to the budget.
fn chat(
    session: &dyn crate::backend::Session,
    prompts: &Prompts,
    e: &Evaluation,
) -> Result<crate::backend::ChatPrompt, BackendError> {
    let truncated = prompts
        .budget(e.prompt)
        .map(|b| session.truncate(e.text, b));
    let messages = match truncated {
        Some(t) if t != e.text => prompts
            .render_with(e.prompt, &t, e.choices, e.examples)
            .map_err(|d| BackendError::Job(d.to_string()))?,
        _ => e.messages.clone(),
    };
    session.format_chat(&messages)
}

fn worker(
    make_backend: Box<dyn FnOnce() -> Box<dyn Backend> + Send>,
    loads: Vec<ModelLoad>,
    jobs: Vec<WorkerJob>,
    ctx: WorkerContext,
    tx: mpsc::Sender<Msg>,
) {
    let mut backend = make_backend();
    let stop = |ctx: &WorkerContext| ctx.cancel.load(Ordering::SeqCst);
    let mut stopped = false;
    // Jobs are sorted model-major, so each model is loaded once.
    let mut start = 0;
    while start < jobs.len() && !stopped && !stop(&ctx) {
        let model = jobs[start].model;
        let end = start
            + jobs[start..]
                .iter()
                .take_while(|j| j.model == model)
                .count();
        let load = &loads[model];
        // Packed: the longest prompts first, so that rows of like length share a decode
        // call (llama.cpp splits a call into ubatches of equal length per row).
        let mut order: Vec<usize> = (start..end).collect();
        let pack = load.packing.rows.max(1);
        if pack > 1 {
            order.sort_by_key(|&i| std::cmp::Reverse(jobs[i].chars()));
        }
        let mut run = |session: &mut dyn crate::backend::Session| {
            let _ = tx.send(Msg::ModelLoaded);
            for group in order.chunks(pack) {
                if stop(&ctx) {
                    return Ok(());
                }
                // A packed session keeps no evaluation between calls (each call re-evaluates
                // its prompts), so its jobs run whole, a group of prompts at a time.
                if pack == 1 {
                    match run_job_in_parts(session, &jobs[group[0]], group[0], &ctx, &tx)? {
                        Sent::All => {}
                        Sent::RowFailed => stopped |= ctx.fail_fast,
                        Sent::ReceiverGone => return Ok(()),
                    }
                    if stopped {
                        return Ok(());
                    }
                    continue;
                }
                for (idx, out) in run_packed(session, jobs.as_slice(), group, &ctx) {
                    let tasks = 0..jobs[idx].tasks.len();
                    let msg = match out {
                        Ok(out) => Msg::Done {
                            job: idx,
                            tasks,
                            out,
                        },
                        Err(error) if error.is_row_error() => {
                            stopped |= ctx.fail_fast;
                            Msg::RowFailed {
                                job: idx,
                                tasks,
                                error,
                            }
                        }
                        Err(error) => return Err(error),
                    };
                    if tx.send(msg).is_err() {
                        return Ok(());
                    }
                }
                if stopped {
                    return Ok(());
                }
            }
            Ok(())
        };
        let result = crate::backend::with_model(backend.as_mut(), load, &mut run);
        if let Err(error) = result {
            // This model's remaining rows stay to do; the other models still run.
            let _ = tx.send(Msg::ModelFailed {
                model: load.id.clone(),
                error,
            });
        }
        start = end;
    }
}

/// Peak resident set size of this process, from `/proc/self/status` (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generate(max_tokens: u32) -> Task {
        crate::backend::sampled_generation(max_tokens, 1)
    }

    #[test]
    fn a_prompt_with_many_tasks_is_run_in_small_parts() {
        let mut tasks = vec![generate(4); 400];
        tasks.push(Task::Loglik {
            continuations: vec!["negative".into(), "positive".into()],
            reserve: None,
        });
        let parts = task_parts(&tasks);
        // 8 generations of 4 tokens a part, and the log-likelihood task (other context
        // needs) in a part of its own.
        assert_eq!(parts.len(), 51);
        assert!(parts[..50].iter().all(|p| p.len() == 8));
        assert_eq!(parts[50], 400..401);
        // Contiguous and complete.
        assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!((parts[0].start, parts[50].end), (0, 401));
        // A task over the budget still gets a part.
        assert_eq!(
            task_parts(&[generate(500), generate(500)]),
            vec![0..1, 1..2]
        );
    }
}
