//! `pipeline`: the command line. Arguments are parsed once into a [`Config`]; each command
//! calls one function of [`pipeline::app`] and prints what it returns.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use pipeline::app::{self, AppError, RunOptions};
use pipeline::backend::BackendKind;
use pipeline::config::Config;
use pipeline::exec;
use pipeline::interrupt::StopRequest;
use pipeline::metrics::CellMetrics;
use pipeline::model::HubOptions;
use pipeline::plan::CellStatus;
use pipeline::progress::ProgressMode;
use pipeline::report::html::Scripts;
use pipeline::shard::{Shard, ShardError};

/// A closed stdout (`pipeline cache status | head`, `pipeline run | true`) ends the output,
/// not the program: once a write finds the pipe closed, later writes are skipped quietly,
/// and the command finishes its work and exits with its own status.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Write to stdout; a closed pipe stops the output, any other failure is said on stderr.
fn write_stdout(args: std::fmt::Arguments, newline: bool) {
    use std::io::Write as _;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| {
        if newline {
            out.write_all(b"\n")?;
        }
        out.flush()
    });
    if let Err(e) = written {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to stdout: {e}");
        }
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

/// `println!` over [`write_stdout`].
macro_rules! out {
    () => {
        write_stdout(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*), true)
    };
}

/// `print!` over [`write_stdout`].
macro_rules! out_inline {
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*), false)
    };
}

#[derive(Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Evaluate small local LLMs from one YAML spec, with exact row-level caching"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Row cache folder.
    #[arg(
        long,
        global = true,
        env = "PIPELINE_CACHE_DIR",
        default_value = "cache"
    )]
    cache_dir: PathBuf,
    /// Reports go to REPORTS_DIR/<spec name>/.
    #[arg(
        long,
        global = true,
        env = "PIPELINE_REPORTS_DIR",
        default_value = "reports"
    )]
    reports_dir: PathBuf,
    /// Folder searched for model files by name.
    #[arg(long, global = true, env = "PIPELINE_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// No progress output.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, global = true, default_value_t = 5.0, hide = true)]
    progress_interval: f64,
    /// Rows per decode call: 1 evaluates one prompt at a time (a CPU's default), more packs
    /// that many reviews into each decode call, each in its own KV stream (a GPU's default
    /// is 16). Packed rows are keyed apart from rows evaluated one at a time.
    #[arg(long, global = true, env = "PIPELINE_PACK")]
    pack: Option<usize>,
    /// Inference backend (`fake` is a deterministic stand-in for tests).
    #[arg(long, global = true, value_enum, default_value = "llama", hide = true)]
    backend: BackendKind,
}

#[derive(Subcommand)]
enum Command {
    /// Show the cells of a spec and how many of their rows are cached.
    Plan {
        spec: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Say why the rows of this cell (or the items of this stage, e.g. `embed:minilm`)
        /// miss the cache.
        #[arg(long, value_name = "CELL|STAGE")]
        explain: Option<String>,
        /// Only the first N sampled rows.
        #[arg(long)]
        limit: Option<usize>,
        /// Show how the rows still to run split into N shards (`run --shard I/N`).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        shards: Option<u64>,
    },
    /// Run every row the cache lacks, then write the report.
    Run {
        spec: PathBuf,
        /// Only the first N sampled rows (a quick partial run; its rows count for later runs).
        #[arg(long)]
        limit: Option<usize>,
        /// CPU threads for llama.cpp (default: physical cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Link the Vega libraries from a CDN instead of inlining them.
        #[arg(long)]
        cdn: bool,
        /// Stop at the first row that cannot be computed (by default such a row is recorded
        /// with its error and the run goes on).
        #[arg(long)]
        fail_fast: bool,
        /// Compute only shard I of N (0-based) of the rows the cache lacks, and write no
        /// report; by default read from SLURM_ARRAY_TASK_ID/_MIN/_COUNT (a Slurm job array)
        /// or JOB_COMPLETION_INDEX with --shards (a Kubernetes Indexed Job).
        #[arg(long, value_name = "I/N", value_parser = Shard::parse)]
        shard: Option<Shard>,
        /// The number of shards, for schedulers that give only the index.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        shards: Option<u64>,
    },
    /// llama.cpp's raw pp512 / tg32 speed on a model, through this build (for benchmarks).
    #[command(hide = true)]
    EngineBench {
        model: PathBuf,
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// An embedding model: one decode of this many tokens with embeddings on.
        #[arg(long)]
        embed_tokens: Option<u32>,
        /// Also llama.cpp's raw rate at this packing: ROWS sequences of BATCH/ROWS tokens
        /// each, in separate KV streams, in one decode call (`--packed 16x4096`).
        #[arg(long, value_parser = parse_packed)]
        packed: Option<(usize, usize)>,
    },
    /// Write the report's tables as CSV (predictions, metrics, comparisons).
    Export {
        spec: PathBuf,
        #[arg(long, value_enum, default_value = "csv")]
        format: ExportFormat,
        /// Output folder (default: the report folder, REPORTS_DIR/<spec name>/).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Rebuild the report from the cache alone (no model is loaded).
    Report {
        spec: PathBuf,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        cdn: bool,
    },
    /// Serve one cell of a spec as an HTTP API (its model, prompt, method and calibration).
    Serve {
        spec: PathBuf,
        /// The cell to serve, e.g. `qwen2.5-coder-0.5b/knn-four-shot/loglik-fit`.
        #[arg(long)]
        cell: String,
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        /// Requests waiting for the model beyond this many get 429.
        #[arg(long, default_value_t = 64)]
        queue: usize,
        /// Most reviews in one batch request.
        #[arg(long, default_value_t = 32)]
        max_batch: usize,
        /// Largest request body in bytes.
        #[arg(long, default_value_t = 1 << 20)]
        body_limit: usize,
        /// CPU threads for llama.cpp (default: physical cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Inspect, check and prune the row cache.
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Size, rows and segments; with specs, how many of each spec's rows are cached.
    Status {
        specs: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Remove every cached row that none of the listed specs needs.
    Gc {
        /// Specs whose rows are kept (all their rows, as without --limit).
        #[arg(long, num_args = 1.., required = true)]
        keep: Vec<PathBuf>,
        /// Say what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check every row's checksum; quarantine damaged segments, keeping their good rows.
    Verify,
    /// Copy the rows and stage outputs the specs need into DIR, a cache folder of its own
    /// (one segment each): publish it beside a report, or carry it to another machine.
    Export {
        /// Specs whose rows are exported (all their rows, as without --limit).
        #[arg(long, num_args = 1.., required = true)]
        spec: Vec<PathBuf>,
        dir: PathBuf,
        /// Leave the embeddings out (the largest stage output, and the cheapest to compute
        /// again); neighbour lists and fits are kept.
        #[arg(long)]
        without_embeddings: bool,
    },
    /// Add the rows and stage outputs of other cache folders (exports, another machine's
    /// cache) to this one; every row's checksum is verified first.
    Import {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Csv,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn config(cli: &Cli, threads: Option<usize>) -> Config {
    Config {
        cache_dir: cli.cache_dir.clone(),
        reports_dir: cli.reports_dir.clone(),
        models_dir: cli.models_dir.clone(),
        threads: threads.unwrap_or_else(exec::default_threads),
        backend: cli.backend,
        packing: pipeline::backend::Packing::for_device(cli.pack),
        progress: ProgressMode::detect(
            cli.quiet,
            Duration::from_secs_f64(cli.progress_interval.max(0.0)),
        ),
        hub: HubOptions {
            show_progress: !cli.quiet,
            ..Default::default()
        },
    }
}

fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// `ROWSxBATCH`, e.g. `16x4096`.
fn parse_packed(s: &str) -> Result<(usize, usize), String> {
    let (r, b) = s
        .split_once('x')
        .ok_or_else(|| format!("`{s}`: expected ROWSxBATCH, e.g. 16x4096"))?;
    let n = |v: &str| {
        v.parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("`{s}`: {v} is not a positive number"))
    };
    Ok((n(r)?, n(b)?))
}

fn scripts(cdn: bool) -> Scripts {
    if cdn { Scripts::Cdn } else { Scripts::Inline }
}

fn dispatch(cli: Cli) -> Result<ExitCode, AppError> {
    match &cli.command {
        Command::Plan {
            spec,
            json,
            explain,
            limit,
            shards,
        } => {
            let cfg = config(&cli, None);
            let mut planned = app::plan(&cfg, spec, *limit)?;
            warn(&planned.warnings());
            if let Some(n) = shards {
                let split = app::shard_plan(&mut planned, *n as usize)?;
                if *json {
                    out!("{}", to_json(&split));
                } else {
                    print_shards(&split);
                }
            } else if let Some(cell) = explain {
                if *json {
                    out!("{}", to_json(&planned.explain_cell(cell)?));
                } else {
                    out_inline!("{}", planned.explain(cell)?);
                }
            } else if *json {
                out!(
                    "{}",
                    to_json(&planned.plan.to_json(&planned.cache, &planned.store))
                );
            } else {
                print_plan(&planned);
                for cp in &planned.plan.cascades {
                    out!("{}", planned.plan.cascade_note(cp));
                }
                if let Some(note) = planned.published_note(&cfg.reports_dir) {
                    out!("{note}");
                }
                if let Some(note) = planned.engine_note() {
                    out!("{note}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            spec,
            limit,
            threads,
            cdn,
            fail_fast,
            shard,
            shards,
        } => {
            let cfg = config(&cli, *threads);
            let shard = match shard {
                Some(s) => Some(*s),
                None => {
                    let count = shards.map(|n| n as usize);
                    let found = Shard::from_env(|k| std::env::var(k).ok(), count)
                        .map_err(AppError::from)?;
                    if found.is_none() && count.is_some() {
                        return Err(AppError::from(ShardError::IndexMissing));
                    }
                    found
                }
            };
            if let Some(s) = shard {
                eprintln!("shard {}/{}", s.index, s.count);
            }
            let stop = StopRequest::install(|signal| {
                eprintln!(
                    "\n{signal}: stopping; finished rows are committed and the report of what finished is written (send it again to quit at once)"
                );
            })
            .map_err(AppError::Signals)?;
            let cancel = stop.cancel.clone();
            let opts = RunOptions {
                limit: *limit,
                scripts: scripts(*cdn),
                fail_fast: *fail_fast,
                shard,
            };
            let outcome = app::run(&cfg, spec, &opts, cancel)?;
            warn(&outcome.warnings);
            let stats = &outcome.stats;
            if let Some(w) = &outcome.written {
                print_summary(&w.analysis.metrics);
            }
            out!(
                "{} rows from cache, {} computed in {:.1} s ({} prompts, {} of {} prompt tokens evaluated){}{}",
                stats.cached_rows,
                stats.computed_rows,
                stats.wall_s,
                stats.prompts_evaluated,
                stats.evaluated_tokens,
                stats.prompt_tokens,
                if stats.failed_rows > 0 {
                    let kinds: Vec<String> = stats
                        .failed_by_kind
                        .iter()
                        .map(|(k, n)| format!("{n} {k}"))
                        .collect();
                    format!(
                        "; {} rows failed ({}), see the report; they run again next time",
                        stats.failed_rows,
                        kinds.join(", ")
                    )
                } else {
                    String::new()
                },
                if stats.interrupted {
                    "; interrupted"
                } else {
                    ""
                }
            );
            if let Some(w) = &outcome.written {
                out!("report: {}", w.index.display());
            } else if let Some(s) = shard {
                if stats.interrupted {
                    out!(
                        "shard {}/{} stopped; its finished rows are committed, and running it again goes on from there",
                        s.index,
                        s.count
                    );
                } else {
                    out!(
                        "shard {}/{} done; `pipeline report` once every shard is",
                        s.index,
                        s.count
                    );
                }
            }
            if let Some(e) = outcome.error {
                eprintln!("error: {e}");
                if stats.unstored_rows > 0 {
                    eprintln!(
                        "{} rows computed in this run could not be stored and run again next time; the rows committed before are in the cache",
                        stats.unstored_rows
                    );
                } else {
                    eprintln!("finished rows are in the cache; run again to continue");
                }
                return Ok(ExitCode::from(1));
            }
            Ok(match (stats.interrupted, stop.exit_code()) {
                (true, Some(code)) => ExitCode::from(code),
                (true, None) => ExitCode::from(130),
                (false, _) => ExitCode::SUCCESS,
            })
        }
        Command::EngineBench {
            model,
            threads,
            reps,
            embed_tokens,
            packed,
        } => {
            let threads = threads.unwrap_or_else(exec::default_threads);
            let failed = |e| {
                AppError::Run(exec::ExecError::Backend {
                    model: model.display().to_string(),
                    source: e,
                })
            };
            if let Some(n) = embed_tokens {
                let rate = pipeline::backend::raw_embed_throughput(model, threads, *n, *reps)
                    .map_err(failed)?;
                out!(
                    "{}",
                    serde_json::json!({
                        "model": model.file_name().map(|n| n.to_string_lossy().into_owned()),
                        "threads": threads,
                        "embed_tokens": n,
                        "embed_tok_s": rate,
                    })
                );
                return Ok(ExitCode::SUCCESS);
            }
            let (pp, tg) =
                pipeline::backend::llama::raw_throughput(model, threads, *reps).map_err(failed)?;
            let packed_pp = match packed {
                Some((rows, batch)) => Some(
                    pipeline::backend::llama::raw_packed_throughput(
                        model, threads, *rows, *batch, *reps,
                    )
                    .map_err(failed)?,
                ),
                None => None,
            };
            out!(
                "{}",
                serde_json::json!({
                    "model": model.file_name().map(|n| n.to_string_lossy().into_owned()),
                    "threads": threads,
                    "engine": pipeline::backend::llama::engine_version(),
                    "pp512_tok_s": pp,
                    "tg32_tok_s": tg,
                    "packed": packed.map(|(r, b)| serde_json::json!({"rows": r, "batch": b, "pp_tok_s": packed_pp})),
                })
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            spec,
            format: ExportFormat::Csv,
            out,
            limit,
        } => {
            let (paths, warnings) = app::export(&config(&cli, None), spec, *limit, out.as_deref())?;
            warn(&warnings);
            for p in paths {
                out!("{}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { spec, limit, cdn } => {
            let (written, warnings) =
                app::report(&config(&cli, None), spec, *limit, scripts(*cdn))?;
            warn(&warnings);
            print_summary(&written.analysis.metrics);
            out!("report: {}", written.index.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache(c) => cache_command(&config(&cli, None), c),
        Command::Serve {
            spec,
            cell,
            addr,
            queue,
            max_batch,
            body_limit,
            threads,
        } => {
            let cfg = config(&cli, *threads);
            let opts = pipeline::serve::ServeOptions {
                addr: *addr,
                queue: *queue,
                max_batch: *max_batch,
                body_limit: *body_limit,
                threads: cfg.threads,
            };
            let kind = cfg.backend;
            let cell_id = cell.clone();
            app::serve(
                &cfg,
                spec,
                cell,
                &opts,
                std::sync::Arc::new(move || kind.create()),
                Box::new(move |a| eprintln!("serving {cell_id} on http://{a}")),
            )?;
            eprintln!("stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn cache_command(cfg: &Config, c: &CacheCommand) -> Result<ExitCode, AppError> {
    match c {
        CacheCommand::Status { specs, json } => {
            let r = app::cache_status(cfg, specs)?;
            warn(&r.load.problems());
            let s = &r.status;
            if *json {
                let specs: Vec<serde_json::Value> = r
                    .specs
                    .iter()
                    .map(|(name, st)| {
                        serde_json::json!({"spec": name, "rows": st.rows, "cached": st.cached,
                            "failed": st.failed, "to_run": st.to_run()})
                    })
                    .collect();
                out!(
                    "{}",
                    to_json(
                        &serde_json::json!({"cache": s, "specs": specs, "artifacts": r.artifacts})
                    )
                );
                return Ok(ExitCode::SUCCESS);
            }
            out!("cache {}", s.root.display());
            out!(
                "  {} rows, {} failed rows, in {} segments ({})",
                s.rows,
                s.failures,
                s.segments,
                human_bytes(s.segment_bytes)
            );
            if s.quarantine_files > 0 {
                out!(
                    "  quarantine: {} files ({})",
                    s.quarantine_files,
                    human_bytes(s.quarantine_bytes)
                );
            }
            if s.temp_files > 0 {
                out!("  {} temporary files of unfinished writes", s.temp_files);
            }
            for (name, size) in &s.other_layouts {
                out!(
                    "  older layout {name}/ ({}) is no longer read; `pipeline cache gc` removes it",
                    human_bytes(*size)
                );
            }
            for (name, size) in &s.unknown_folders {
                out!(
                    "  {name}/ ({}) is not a layout this version reads (a newer layout, or not the cache's); `cache gc` leaves it",
                    human_bytes(*size)
                );
            }
            for (kind, n) in &r.artifacts {
                out!("  {n} stored {kind} artifacts");
            }
            if !r.artifacts.is_empty() {
                out!("  artifacts: {}", human_bytes(r.artifact_bytes));
            }
            for (name, st) in &r.specs {
                out!(
                    "  spec {name}: {} rows, {} cached, {} failed, {} to run",
                    st.rows,
                    st.cached,
                    st.failed,
                    st.to_run()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Gc { keep, dry_run } => {
            let r = app::cache_gc(cfg, keep, *dry_run)?;
            let verb = if r.dry_run { "would remove" } else { "removed" };
            out!(
                "{verb} {} rows and {} failed rows; kept {} rows and {} failed rows",
                r.rows_removed,
                r.failures_removed,
                r.rows_kept,
                r.failures_kept
            );
            if !r.dry_run {
                out!(
                    "segments: {} ({}) → {}",
                    r.segments_before,
                    human_bytes(r.bytes_before),
                    human_bytes(r.bytes_after)
                );
            }
            if r.artifacts_removed > 0 {
                out!(
                    "{verb} {} stored stage outputs (embeddings, neighbours, fits)",
                    r.artifacts_removed
                );
            }
            if r.quarantine_files_removed > 0 {
                out!("{verb} {} quarantined files", r.quarantine_files_removed);
            }
            for l in &r.layouts_removed {
                out!("{verb} the older layout {l}/");
            }
            for f in &r.folders_kept {
                out!("kept {f}/: not a layout this version knows to be older");
            }
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Export {
            spec,
            dir,
            without_embeddings,
        } => {
            let t = app::cache_export(cfg, spec, dir, *without_embeddings)?;
            warn(&t.problems);
            out!(
                "exported {} rows and {} stage outputs to {} ({} rows and {} outputs were there already)",
                t.rows,
                t.artifacts,
                dir.display(),
                t.rows_present,
                t.artifacts_present
            );
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Import { dirs } => {
            let t = app::cache_import(cfg, dirs)?;
            warn(&t.problems);
            out!(
                "imported {} rows and {} stage outputs ({} rows and {} outputs were cached already)",
                t.rows,
                t.artifacts,
                t.rows_present,
                t.artifacts_present
            );
            Ok(if t.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        CacheCommand::Verify => {
            let v = app::cache_verify(cfg)?;
            let r = &v.rows;
            out!(
                "{} segments, {} rows, {} failed rows checked",
                r.segments,
                r.rows,
                r.failures
            );
            out!(
                "{} model digests checked: {} hashed again and match, {} stale (their file changed or is gone; hashed again on next use)",
                v.memo.entries,
                v.memo.verified,
                v.memo.stale
            );
            let problems = v.problems();
            warn(&problems);
            Ok(if problems.is_empty() {
                out!("every row verifies");
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn print_shards(split: &[app::ShardSummary]) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["shard", "prompts", "rows", "est. tokens", "models"]);
    for s in split {
        t.add_row(vec![
            format!("{}/{}", s.index, split.len()),
            s.prompts.to_string(),
            s.rows.to_string(),
            s.estimated_tokens.to_string(),
            s.models.join(", "),
        ]);
    }
    out!("{t}");
    let loads: usize = split.iter().map(|s| s.models.len()).sum();
    out!("{loads} model loads in all");
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("plain data serializes")
}

fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

fn print_plan(planned: &app::Planned) {
    let plan = &planned.plan;
    let mut stages = Table::new();
    stages.load_preset(UTF8_FULL_CONDENSED);
    stages.set_header(vec!["stage", "items", "cached", "to run"]);
    for s in planned.stages() {
        stages.add_row(vec![
            s.id.clone(),
            format!("{} {}", s.items, s.what),
            s.cached.to_string(),
            (s.items - s.cached).to_string(),
        ]);
    }
    out!("{stages}");
    for r in &plan.retrievals {
        let (queries, with, excluded) = r.leaks();
        if excluded > 0 {
            out!(
                "leak guard: {}: {excluded} pool rows left out (same id or text) for {with} of {queries} queries",
                r.id
            );
        }
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["cell", "rows", "cached", "failed", "to run"]);
    let mut total = CellStatus::default();
    for (c, st) in plan.cells.iter().zip(planned.status()) {
        t.add_row(vec![
            c.id.clone(),
            st.rows.to_string(),
            st.cached.to_string(),
            (st.failed + st.too_long).to_string(),
            st.to_run().to_string(),
        ]);
        total.rows += st.rows;
        total.cached += st.cached;
        total.failed += st.failed;
        total.too_long += st.too_long;
    }
    t.add_row(vec![
        "total".to_string(),
        total.rows.to_string(),
        total.cached.to_string(),
        (total.failed + total.too_long).to_string(),
        total.to_run().to_string(),
    ]);
    if total.too_long > 0 {
        out!(
            "{} rows were computed with a larger n_ctx and do not fit this spec's: they count as failed (context overflow) and are not run",
            total.too_long
        );
    }
    out!("{t}");
    for m in plan.models.iter().chain(&plan.embedders) {
        if m.file.is_none() {
            out!(
                "note: model `{}` is not on this machine yet; `run` will fetch it",
                m.id
            );
        }
    }
}

fn print_summary(m: &[CellMetrics]) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec![
        "cell",
        "rows",
        "accuracy (95% CI)",
        "macro-F1",
        "invalid",
        "failed",
        "reviews/s",
        "cached",
        "computed",
    ]);
    for c in m {
        t.add_row(vec![
            c.cell.clone(),
            format!("{}/{}", c.n, c.planned),
            if c.n == 0 {
                "— (no rows)".into()
            } else {
                format!(
                    "{:.3} ({:.3}–{:.3})",
                    c.accuracy, c.accuracy_lo, c.accuracy_hi
                )
            },
            if c.n == 0 {
                "—".into()
            } else {
                format!("{:.3}", c.macro_f1)
            },
            c.invalid.to_string(),
            c.failed.to_string(),
            c.reviews_per_s_text(2),
            c.cached.to_string(),
            c.computed.to_string(),
        ]);
    }
    out!("{t}");
}
