//! The executor: runs every row the cache lacks, model by model, on one worker thread that
//! owns the backend, and commits finished rows in small batches as they arrive.
//!
//! Rows are grouped by (model, prompt, dataset row): the prompt is evaluated once and every
//! cell that shares it (grid points, seeds, log-likelihood) is served from that state.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::backend::{Backend, BackendError, ModelLoad, PromptOutput, Sampler, Task, sampler_seed};
use crate::cache::{Cache, CacheError, CachedRow};
use crate::key::{Components, Digest};
use crate::plan::Plan;
use crate::prompt::{Messages, Prompts};
use crate::spec::MethodKind;

#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub threads: usize,
    /// Generations of one prompt decoded side by side (see `DEFAULT_BATCH_SEQS`).
    pub batch_seqs: usize,
    /// Commit after this many finished rows...
    pub commit_rows: usize,
    /// ...or after this long, whichever comes first.
    pub commit_interval: Duration,
    pub progress: bool,
}

impl Default for ExecOptions {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            batch_seqs: DEFAULT_BATCH_SEQS,
            commit_rows: 32,
            commit_interval: Duration::from_secs(3),
            progress: false,
        }
    }
}

/// Generations decoded side by side by default; chosen from `scripts/bench` on 2 CPU cores.
pub const DEFAULT_BATCH_SEQS: usize = 1;

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
    pub prompts_evaluated: usize,
    pub prompt_tokens: u64,
    pub evaluated_tokens: u64,
    pub models_loaded: usize,
    pub wall_s: f64,
    pub interrupted: bool,
    /// Peak resident memory of the process (VmHWM), where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Keys computed by this run (the rest of the report's rows came from the cache).
    #[serde(skip)]
    pub computed: HashSet<Digest>,
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
}

/// A task of one cell on one prompt.
struct PendingTask {
    cell: usize,
    key: Digest,
    components: Components,
    task: Task,
}

/// One prompt (model × prompt × dataset row) and every task to compute from it.
struct Job {
    model: usize,
    prompt: usize,
    row: usize,
    text: String,
    messages: Messages,
    tasks: Vec<PendingTask>,
}

enum Msg {
    Done { job: usize, out: PromptOutput },
    ModelLoaded,
    Failed { model: String, error: BackendError },
}

/// Cell rows that some other cell with the same key already schedules.
struct Work {
    jobs: Vec<Job>,
    /// Cells whose row shares a key computed by another cell's task: (cell, key).
    followers: Vec<(usize, Digest)>,
    cached: usize,
}

fn collect_work(plan: &Plan, cache: &Cache) -> Work {
    let mut jobs: BTreeMap<(usize, usize, usize), Job> = BTreeMap::new();
    let mut scheduled: HashSet<Digest> = HashSet::new();
    let mut followers = Vec::new();
    let mut cached = 0;
    for (ci, cell) in plan.cells.iter().enumerate() {
        let method = &plan.spec.methods[cell.method];
        for (ri, comps) in cell.rows.iter().enumerate() {
            let comps = comps.expect("run plans know every model digest");
            let key = comps.row_key();
            if cache.get(&key).is_some() {
                cached += 1;
                continue;
            }
            if !scheduled.insert(key) {
                followers.push((ci, key));
                continue;
            }
            let task = match (method.kind, &cell.point) {
                (MethodKind::Generate, Some(p)) => Task::Generate {
                    max_tokens: method.max_tokens,
                    stop: method.stop.clone(),
                    sampler: Sampler {
                        temperature: p.temperature,
                        top_p: p.top_p,
                        top_k: p.top_k,
                        min_p: p.min_p,
                        seed: sampler_seed(p.seed, p.repeat),
                    },
                },
                _ => Task::Loglik {
                    continuations: plan.dataset.label_names(),
                },
            };
            jobs.entry((cell.model, cell.prompt, ri))
                .or_insert_with(|| Job {
                    model: cell.model,
                    prompt: cell.prompt,
                    row: ri,
                    text: plan.dataset.rows[ri].text.clone(),
                    messages: plan.messages[cell.prompt][ri].clone(),
                    tasks: Vec::new(),
                })
                .tasks
                .push(PendingTask {
                    cell: ci,
                    key,
                    components: comps,
                    task,
                });
        }
    }
    Work {
        jobs: jobs.into_values().collect(),
        followers,
        cached,
    }
}

/// Run everything the cache lacks. `make_backend` is called on the worker thread.
pub fn execute(
    plan: &Plan,
    cache: &mut Cache,
    make_backend: Box<dyn FnOnce() -> Box<dyn Backend> + Send>,
    opts: &ExecOptions,
    cancel: Arc<AtomicBool>,
) -> Result<ExecStats, ExecError> {
    let start = Instant::now();
    let work = collect_work(plan, cache);
    let mut stats = ExecStats {
        cached_rows: work.cached,
        ..Default::default()
    };
    let total_tasks: usize = work.jobs.iter().map(|j| j.tasks.len()).sum();
    if total_tasks == 0 {
        stats.wall_s = start.elapsed().as_secs_f64();
        return Ok(stats);
    }

    // What the worker needs, owned: jobs without their keys, and the model list.
    let worker_jobs: Vec<(usize, usize, String, Messages, Vec<Task>)> = work
        .jobs
        .iter()
        .map(|j| {
            (
                j.model,
                j.prompt,
                j.text.clone(),
                j.messages.clone(),
                j.tasks.iter().map(|t| t.task.clone()).collect(),
            )
        })
        .collect();
    let loads: Vec<ModelLoad> = plan
        .models
        .iter()
        .map(|m| {
            let r = m.resolved.as_ref().expect("run plans resolve every model");
            ModelLoad {
                id: m.id.clone(),
                path: r.path.clone(),
                n_ctx: r.n_ctx,
                threads: opts.threads,
                batch_seqs: opts.batch_seqs,
            }
        })
        .collect();
    let prompts = plan.prompts.clone();
    let budget = plan.spec.dataset.max_text_tokens;
    let (tx, rx) = mpsc::channel::<Msg>();
    let worker_cancel = cancel.clone();
    let worker = std::thread::Builder::new()
        .name("pipeline-backend".into())
        .spawn(move || {
            worker(
                make_backend,
                loads,
                worker_jobs,
                prompts,
                budget,
                worker_cancel,
                tx,
            )
        })
        .expect("spawn worker thread");

    let progress = Progress::new(plan, &work.jobs, opts.progress);
    let mut buffer: Vec<CachedRow> = Vec::new();
    let mut last_commit = Instant::now();
    let mut failure = None;
    let mut keys_done: HashSet<Digest> = HashSet::new();
    for msg in rx {
        match msg {
            Msg::ModelLoaded => stats.models_loaded += 1,
            Msg::Failed { model, error } => {
                failure = Some(ExecError::Backend {
                    model,
                    source: error,
                });
            }
            Msg::Done { job, out } => {
                let j = &work.jobs[job];
                stats.prompts_evaluated += 1;
                stats.prompt_tokens += u64::from(out.prompt_tokens);
                stats.evaluated_tokens += u64::from(out.evaluated_tokens);
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                let shared_by = j.tasks.len() as u32;
                for (t, o) in j.tasks.iter().zip(out.tasks) {
                    buffer.push(CachedRow {
                        key: t.key,
                        components: t.components,
                        row_id: plan.dataset.rows[j.row].id.clone(),
                        cell_id: plan.cells[t.cell].id.clone(),
                        kind: match t.task {
                            Task::Generate { .. } => "generate".into(),
                            Task::Loglik { .. } => "loglik".into(),
                        },
                        text: o.text,
                        logprobs: o.logprobs,
                        prompt_tokens: out.prompt_tokens,
                        evaluated_tokens: out.evaluated_tokens,
                        gen_tokens: o.gen_tokens,
                        finish: o.finish,
                        prefill_ms: out.prefill_ms,
                        shared_by,
                        decode_ms: o.decode_ms,
                        created_unix_ms: now_ms,
                    });
                    keys_done.insert(t.key);
                    stats.computed_rows += 1;
                    progress.row_done(t.cell);
                }
                progress.job_done(plan, j);
                if buffer.len() >= opts.commit_rows || last_commit.elapsed() >= opts.commit_interval
                {
                    cache.commit(std::mem::take(&mut buffer))?;
                    last_commit = Instant::now();
                }
            }
        }
    }
    cache.commit(std::mem::take(&mut buffer))?;
    if worker.join().is_err() && failure.is_none() {
        failure = Some(ExecError::WorkerDied);
    }
    progress.finish();
    // Cells that share a key with a computed row are done too.
    stats.computed_rows += work
        .followers
        .iter()
        .filter(|(_, k)| keys_done.contains(k))
        .count();
    stats.computed_keys = keys_done.len();
    stats.computed = keys_done;
    stats.interrupted = cancel.load(Ordering::SeqCst);
    stats.wall_s = start.elapsed().as_secs_f64();
    stats.peak_rss_bytes = peak_rss_bytes();
    match failure {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}

type WorkerJob = (usize, usize, String, Messages, Vec<Task>);

fn worker(
    make_backend: Box<dyn FnOnce() -> Box<dyn Backend> + Send>,
    loads: Vec<ModelLoad>,
    jobs: Vec<WorkerJob>,
    prompts: Arc<Prompts>,
    budget: Option<u32>,
    cancel: Arc<AtomicBool>,
    tx: mpsc::Sender<Msg>,
) {
    let mut backend = make_backend();
    // Jobs are sorted model-major, so each model is loaded once.
    let mut start = 0;
    while start < jobs.len() {
        if cancel.load(Ordering::SeqCst) {
            return;
        }
        let model = jobs[start].0;
        let end = start + jobs[start..].iter().take_while(|j| j.0 == model).count();
        let load = &loads[model];
        let range = start..end;
        let result = backend.with_model(load, &mut |session| {
            let _ = tx.send(Msg::ModelLoaded);
            for idx in range.clone() {
                if cancel.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let (_, prompt, text, messages, tasks) = &jobs[idx];
                let truncated = budget.map(|b| session.truncate(text, b));
                let messages = match truncated {
                    Some(t) if t != *text => prompts
                        .render(*prompt, &t)
                        .map_err(|d| BackendError::Job(d.to_string()))?,
                    _ => messages.clone(),
                };
                let chat = session.format_chat(&messages)?;
                let out = session.run(&chat, tasks)?;
                if tx.send(Msg::Done { job: idx, out }).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        });
        if let Err(error) = result {
            let _ = tx.send(Msg::Failed {
                model: load.id.clone(),
                error,
            });
            return;
        }
        start = end;
    }
}

/// Progress bars: the whole run, and one per cell while it has rows left.
struct Progress {
    multi: MultiProgress,
    total: ProgressBar,
    cells: Vec<Option<ProgressBar>>,
}

impl Progress {
    fn new(plan: &Plan, jobs: &[Job], enabled: bool) -> Self {
        let target = if enabled {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let mut per_cell = vec![0u64; plan.cells.len()];
        for j in jobs {
            for t in &j.tasks {
                per_cell[t.cell] += 1;
            }
        }
        let total_rows: u64 = per_cell.iter().sum();
        let style = |tmpl: &str| ProgressStyle::with_template(tmpl).expect("valid template");
        let total = multi.add(ProgressBar::new(total_rows));
        total.set_style(style(
            "{spinner} {msg:40!} {bar:30} {pos}/{len} rows  {per_sec:>10}  eta {eta}",
        ));
        total.set_message("starting");
        total.enable_steady_tick(Duration::from_millis(200));
        let cells = per_cell
            .iter()
            .enumerate()
            .map(|(ci, &n)| {
                (n > 0).then(|| {
                    let b = multi.add(ProgressBar::new(n));
                    b.set_style(style(
                        "  {msg:40!} {bar:30} {pos}/{len}  {per_sec:>10}  eta {eta}",
                    ));
                    b.set_message(plan.cells[ci].id.clone());
                    b
                })
            })
            .collect();
        Self {
            multi,
            total,
            cells,
        }
    }

    fn row_done(&self, cell: usize) {
        self.total.inc(1);
        if let Some(b) = &self.cells[cell] {
            b.inc(1);
            if b.position() == b.length().unwrap_or(0) {
                b.finish_and_clear();
                self.multi.remove(b);
            }
        }
    }

    fn job_done(&self, plan: &Plan, j: &Job) {
        self.total.set_message(format!(
            "{} · {}",
            plan.models[j.model].id,
            plan.prompts.id(j.prompt)
        ));
    }

    fn finish(&self) {
        for b in self.cells.iter().flatten() {
            b.finish_and_clear();
        }
        self.total.finish_and_clear();
    }
}

/// Peak resident set size of this process, from `/proc/self/status` (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
