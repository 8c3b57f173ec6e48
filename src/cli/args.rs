//! The command line's arguments, parsed once by clap into these types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::backend::BackendKind;
use crate::shard::Shard;

#[derive(Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Evaluate small local LLMs from one YAML spec, with exact row-level caching"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Row cache folder.
    #[arg(
        long,
        global = true,
        env = "PIPELINE_CACHE_DIR",
        default_value = "cache"
    )]
    pub cache_dir: PathBuf,
    /// Reports go to REPORTS_DIR/<spec name>/.
    #[arg(
        long,
        global = true,
        env = "PIPELINE_REPORTS_DIR",
        default_value = "reports"
    )]
    pub reports_dir: PathBuf,
    /// Folder searched for model files by name [default: the platform's cache folder's
    /// `pipeline-models`, e.g. ~/.cache/pipeline-models, where the scripts fetch them].
    #[arg(long, global = true, env = "PIPELINE_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// No progress output.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, global = true, default_value_t = 5.0, hide = true)]
    pub progress_interval: f64,
    /// Rows per decode call: 1 evaluates one prompt at a time (a CPU's default), more packs
    /// that many rows into each decode call, each in its own KV stream (a GPU's default
    /// is 16). Packed rows are keyed apart from rows evaluated one at a time.
    #[arg(long, global = true, env = "PIPELINE_PACK")]
    pub pack: Option<usize>,
    /// Inference backend (`fake` is a deterministic stand-in for tests).
    #[arg(long, global = true, value_enum, default_value = "llama", hide = true)]
    pub backend: BackendKind,
}

#[derive(Subcommand)]
pub enum Command {
    /// Show the cells of a spec and how many of their rows are cached.
    Plan(PlanArgs),
    /// Run every row the cache lacks, then write the report.
    Run(RunArgs),
    /// llama.cpp's raw pp512 / tg32 speed on a model, through this build (for benchmarks).
    #[command(hide = true)]
    EngineBench(EngineBenchArgs),
    /// Write the report's tables as CSV (predictions, metrics, comparisons).
    Export(ExportArgs),
    /// Rebuild the report from the cache alone (no model is loaded).
    Report(ReportArgs),
    /// Serve one cell of a spec as an HTTP API (its model, prompt, method and calibration).
    Serve(ServeArgs),
    /// Check a spec (its fields, templates and references) without planning or reading data.
    Validate(ValidateArgs),
    /// Print the spec's JSON Schema, for editors (yaml-language-server) and checks.
    Schema,
    /// Write a minimal working spec, its prompt and a tiny example dataset to start from.
    Init(InitArgs),
    /// Inspect, check and prune the row cache.
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Args)]
pub struct ValidateArgs {
    pub spec: PathBuf,
}

#[derive(Args)]
pub struct InitArgs {
    /// The new spec's name: writes experiments/NAME.yaml, prompts/NAME.j2 and
    /// experiments/data/NAME.jsonl (nothing is overwritten).
    #[arg(default_value = "my-eval")]
    pub name: String,
    /// The folder to write into.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

#[derive(Args)]
pub struct PlanArgs {
    pub spec: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print the stage graph for Graphviz (`pipeline plan SPEC --dot | dot -Tsvg`).
    #[arg(long, conflicts_with_all = ["json", "explain", "shards"])]
    pub dot: bool,
    /// Say why the rows of this cell (or the items of this stage, e.g. `embed:minilm`)
    /// miss the cache.
    #[arg(long, value_name = "CELL|STAGE")]
    pub explain: Option<String>,
    /// Only the first N sampled rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Show how the rows still to run split into N shards (`run --shard I/N`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub shards: Option<u64>,
    /// The accuracy you expect of a cell, for the interval `plan` states (default 0.8).
    #[arg(long, value_name = "A", default_value_t = 0.8, value_parser = share)]
    pub expect_accuracy: f64,
    /// The share of rows you expect two cells to answer differently, for the difference
    /// `plan` says is detectable (default 0.1).
    #[arg(long, value_name = "D", default_value_t = 0.1, value_parser = share)]
    pub discordant: f64,
}

/// A value that is not a share in (0, 1].
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a share above 0 and at most 1")]
pub struct BadShare(String);

/// A share in (0, 1].
fn share(s: &str) -> Result<f64, BadShare> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(BadShare(s.to_string())),
    }
}

#[derive(Args)]
pub struct RunArgs {
    pub spec: PathBuf,
    /// Only the first N sampled rows (a quick partial run; its rows count for later runs).
    #[arg(long)]
    pub limit: Option<usize>,
    /// CPU threads for llama.cpp (default: physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Link the Vega libraries from a CDN instead of inlining them.
    #[arg(long)]
    pub cdn: bool,
    /// Stop at the first row that cannot be computed (by default such a row is recorded
    /// with its error and the run goes on).
    #[arg(long)]
    pub fail_fast: bool,
    /// Compute only shard I of N (0-based) of the rows the cache lacks, and write no
    /// report; by default read from SLURM_ARRAY_TASK_ID/_MIN/_COUNT (a Slurm job array)
    /// or JOB_COMPLETION_INDEX with --shards (a Kubernetes Indexed Job).
    #[arg(long, value_name = "I/N", value_parser = Shard::parse)]
    pub shard: Option<Shard>,
    /// The number of shards, for schedulers that give only the index.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub shards: Option<u64>,
    /// Grow the rows in batches (prefixes of the spec's sample) until an anytime-valid
    /// test says these two cells differ, or `--max-rows` is reached.
    #[arg(long, num_args = 2, value_names = ["CELL_A", "CELL_B"], conflicts_with_all = ["limit", "shard", "shards"])]
    pub until_resolved: Option<Vec<String>>,
    /// With --until-resolved: at most this many rows (default: the spec's whole sample).
    #[arg(long, value_name = "N", requires = "until_resolved", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_rows: Option<u64>,
    /// With --until-resolved: rows added before each look at the evidence.
    #[arg(long, value_name = "N", requires = "until_resolved", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
}

#[derive(Args)]
pub struct EngineBenchArgs {
    pub model: PathBuf,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// An embedding model: one decode of this many tokens with embeddings on.
    #[arg(long)]
    pub embed_tokens: Option<u32>,
    /// Also llama.cpp's raw rate at this packing: ROWS sequences of BATCH/ROWS tokens
    /// each, in separate KV streams, in one decode call (`--packed 16x4096`).
    #[arg(long, value_parser = parse_packed)]
    pub packed: Option<(usize, usize)>,
    /// Keep the measured rate in the cache folder: reports then turn each row's compute
    /// into the time it is expected to take on this machine. Refused when the machine was
    /// busy (the process got under 80% of its threads' time).
    #[arg(long, conflicts_with_all = ["embed_tokens", "packed"])]
    pub save: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    pub spec: PathBuf,
    #[arg(long, value_enum, default_value = "csv")]
    pub format: ExportFormat,
    /// Output folder (default: the report folder, REPORTS_DIR/<spec name>/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Args)]
pub struct ReportArgs {
    pub spec: PathBuf,
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long)]
    pub cdn: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    pub spec: PathBuf,
    /// The cell to serve, e.g. `qwen2.5-coder-0.5b/knn-four-shot/loglik-fit`.
    #[arg(long)]
    pub cell: String,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,
    /// Requests waiting for the model beyond this many get 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Most texts in one batch request.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub body_limit: usize,
    /// CPU threads for llama.cpp (default: physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Subcommand)]
pub enum CacheCommand {
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
pub enum ExportFormat {
    Csv,
}

/// A `--packed` value that is not `ROWSxBATCH`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadPacking(String);

/// `ROWSxBATCH`, e.g. `16x4096`.
fn parse_packed(s: &str) -> Result<(usize, usize), BadPacking> {
    let (r, b) = s
        .split_once('x')
        .ok_or_else(|| BadPacking(format!("`{s}`: expected ROWSxBATCH, e.g. 16x4096")))?;
    let n = |v: &str| {
        v.parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| BadPacking(format!("`{s}`: {v} is not a positive number")))
    };
    Ok((n(r)?, n(b)?))
}
