//! `pipeline`: the command line. Arguments are parsed once into a [`Config`]; each command
//! then calls into the library (spec → plan → cache → exec → metrics → report).

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use pipeline::backend::BackendKind;
use pipeline::cache::Cache;
use pipeline::config::Config;
use pipeline::diag::Diagnostic;
use pipeline::exec::{self, ExecOptions};
use pipeline::metrics::CellMetrics;
use pipeline::model::HubOptions;
use pipeline::plan::{self, Plan, PlanOptions};
use pipeline::report::{self, Provenance, html::Scripts};
use pipeline::spec;

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
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Show the cells of a spec and how many of their rows are cached.
    Plan {
        spec: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Say why the rows of this cell miss the cache.
        #[arg(long, value_name = "CELL")]
        explain: Option<String>,
        /// Only the first N sampled rows.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, value_enum, default_value = "llama", hide = true)]
        backend: BackendKind,
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
        /// Generations of one prompt decoded side by side in one batch (1 to 16).
        #[arg(long, default_value_t = exec::DEFAULT_BATCH_SEQS as u64, value_parser = clap::value_parser!(u64).range(1..=16))]
        batch_seqs: u64,
        /// Inference backend (`fake` is a deterministic stand-in for tests).
        #[arg(long, value_enum, default_value = "llama")]
        backend: BackendKind,
    },
    /// llama.cpp's raw pp512 / tg32 speed on a model, through this build (for benchmarks).
    #[command(hide = true)]
    EngineBench {
        model: PathBuf,
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 3)]
        reps: usize,
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
        #[arg(long, value_enum, default_value = "llama", hide = true)]
        backend: BackendKind,
    },
    /// Rebuild the report from the cache alone (no model is loaded).
    Report {
        spec: PathBuf,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        cdn: bool,
        #[arg(long, value_enum, default_value = "llama", hide = true)]
        backend: BackendKind,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Csv,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<Diagnostic>() {
                Some(d) => eprintln!("error: {d}"),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::from(if e.is::<Diagnostic>() { 2 } else { 1 })
        }
    }
}

fn config(cli: &Cli, threads: Option<usize>, backend: BackendKind) -> Config {
    Config {
        cache_dir: cli.cache_dir.clone(),
        reports_dir: cli.reports_dir.clone(),
        models_dir: cli.models_dir.clone(),
        threads: threads.unwrap_or_else(exec::default_threads),
        backend,
        progress: !cli.quiet,
        hub: HubOptions {
            show_progress: !cli.quiet,
            ..Default::default()
        },
    }
}

fn open_cache(cfg: &Config) -> anyhow::Result<Cache> {
    let cache = Cache::open(&cfg.cache_dir)?;
    for p in cache.report.problems() {
        eprintln!("warning: {p}");
    }
    Ok(cache)
}

fn build_plan(
    spec_path: &std::path::Path,
    cfg: &Config,
    fetch: bool,
    limit: Option<usize>,
) -> anyhow::Result<Plan> {
    let spec = spec::load(spec_path)?;
    let resolver = cfg.resolver();
    Ok(plan::build(
        spec,
        &PlanOptions {
            resolver: &resolver,
            engine_version: cfg.backend.engine_version(),
            fetch_models: fetch,
            limit,
        },
    )?)
}

/// Config, cache and plan for the commands that only read (`plan`, `report`, `export`):
/// models are located but never downloaded or loaded.
fn read_only(
    cli: &Cli,
    spec: &std::path::Path,
    limit: Option<usize>,
    backend: BackendKind,
) -> anyhow::Result<(Config, Cache, Plan)> {
    let cfg = config(cli, None, backend);
    let cache = open_cache(&cfg)?;
    let plan = build_plan(spec, &cfg, false, limit)?;
    Ok((cfg, cache, plan))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Plan {
            spec,
            json,
            explain,
            limit,
            backend,
        } => {
            let (_, cache, plan) = read_only(&cli, spec, *limit, *backend)?;
            if let Some(cell) = explain {
                let Some(ci) = plan.cell_by_id(cell) else {
                    let ids: Vec<&str> = plan.cells.iter().map(|c| c.id.as_str()).collect();
                    anyhow::bail!("no cell `{cell}` in this plan; cells: {}", ids.join(", "));
                };
                let ex = plan.explain(ci, &cache);
                if *json {
                    println!("{}", serde_json::to_string_pretty(&ex)?);
                } else {
                    print!("{ex}");
                }
            } else if *json {
                println!("{}", serde_json::to_string_pretty(&plan.to_json(&cache))?);
            } else {
                print_plan(&plan, &cache);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            spec,
            limit,
            threads,
            cdn,
            batch_seqs,
            backend,
        } => {
            let cfg = config(&cli, *threads, *backend);
            let mut cache = open_cache(&cfg)?;
            let plan = build_plan(spec, &cfg, true, *limit)?;
            let cancel = Arc::new(AtomicBool::new(false));
            let handler_cancel = cancel.clone();
            ctrlc::set_handler(move || {
                if handler_cancel.swap(true, Ordering::SeqCst) {
                    eprintln!("\nstopping now");
                    std::process::exit(130);
                }
                eprintln!(
                    "\nstopping after the current prompt; finished rows are kept (Ctrl-C again to quit at once)"
                );
            })?;
            let opts = ExecOptions {
                threads: cfg.threads,
                batch_seqs: *batch_seqs as usize,
                progress: cfg.progress,
                ..Default::default()
            };
            let kind = cfg.backend;
            let result = exec::execute(
                &plan,
                &mut cache,
                Box::new(move || kind.create()),
                &opts,
                cancel,
            );
            let stats = match result {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    eprintln!("finished rows are in the cache; run again to continue");
                    return Ok(ExitCode::from(1));
                }
            };
            let _ = cache.compact_if_needed();
            let computed = stats.computed.clone();
            let prov = Provenance::new(&plan, cfg.threads, Some(stats.clone()));
            let scripts = if *cdn { Scripts::Cdn } else { Scripts::Inline };
            let written =
                report::write(&plan, &cache, &computed, &prov, &cfg.reports_dir, scripts)?;
            print_summary(&written.analysis.metrics);
            println!(
                "{} rows from cache, {} computed in {:.1} s ({} prompts, {} of {} prompt tokens evaluated){}",
                stats.cached_rows,
                stats.computed_rows,
                stats.wall_s,
                stats.prompts_evaluated,
                stats.evaluated_tokens,
                stats.prompt_tokens,
                if stats.interrupted {
                    "; interrupted"
                } else {
                    ""
                }
            );
            println!("report: {}", written.index.display());
            Ok(if stats.interrupted {
                ExitCode::from(130)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::EngineBench {
            model,
            threads,
            reps,
        } => {
            let threads = threads.unwrap_or_else(exec::default_threads);
            let (pp, tg) = pipeline::backend::llama::raw_throughput(model, threads, *reps)?;
            println!(
                "{}",
                serde_json::json!({
                    "model": model.file_name().map(|n| n.to_string_lossy().into_owned()),
                    "threads": threads,
                    "engine": pipeline::backend::llama::engine_version(),
                    "pp512_tok_s": pp,
                    "tg32_tok_s": tg,
                })
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            spec,
            format: ExportFormat::Csv,
            out,
            limit,
            backend,
        } => {
            let (cfg, cache, plan) = read_only(&cli, spec, *limit, *backend)?;
            let dir = out
                .clone()
                .unwrap_or_else(|| cfg.reports_dir.join(&plan.spec.name));
            for p in report::export_csv(&plan, &cache, &dir)? {
                println!("{}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            spec,
            limit,
            cdn,
            backend,
        } => {
            let (cfg, cache, plan) = read_only(&cli, spec, *limit, *backend)?;
            let prov = Provenance::new(&plan, cfg.threads, None);
            let scripts = if *cdn { Scripts::Cdn } else { Scripts::Inline };
            let written = report::write(
                &plan,
                &cache,
                &HashSet::new(),
                &prov,
                &cfg.reports_dir,
                scripts,
            )?;
            print_summary(&written.analysis.metrics);
            println!("report: {}", written.index.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_plan(plan: &Plan, cache: &Cache) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["cell", "rows", "cached", "to run"]);
    let mut totals = (0, 0);
    for (c, st) in plan.cells.iter().zip(plan.status(cache)) {
        t.add_row(vec![
            c.id.clone(),
            st.rows.to_string(),
            st.cached.to_string(),
            st.to_run().to_string(),
        ]);
        totals.0 += st.rows;
        totals.1 += st.cached;
    }
    t.add_row(vec![
        "total".to_string(),
        totals.0.to_string(),
        totals.1.to_string(),
        (totals.0 - totals.1).to_string(),
    ]);
    println!("{t}");
    for m in &plan.models {
        if m.resolved.is_none() {
            println!(
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
        "reviews/s",
        "cached",
        "computed",
    ]);
    for c in m {
        t.add_row(vec![
            c.cell.clone(),
            format!("{}/{}", c.n, c.planned),
            format!(
                "{:.3} ({:.3}–{:.3})",
                c.accuracy, c.accuracy_lo, c.accuracy_hi
            ),
            format!("{:.3}", c.macro_f1),
            c.invalid.to_string(),
            format!("{:.2}", c.reviews_per_s),
            c.cached.to_string(),
            c.computed.to_string(),
        ]);
    }
    println!("{t}");
}
