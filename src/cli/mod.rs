//! The command line: arguments parsed once ([`args`]) into a settled [`Config`], one call
//! into [`crate::app`] per command, and each command's output rendered by its own module.

#[macro_use]
pub mod output;
pub mod args;
mod bench;
mod cache;
mod export;
mod plan;
mod report;
mod run;
mod serve;
mod start;

use std::process::ExitCode;
use std::time::Duration;

use crate::app::AppError;
use crate::config::Config;
use crate::model::HubOptions;
use crate::progress::ProgressMode;
use crate::report::html::Scripts;
use args::{Cli, Command};

/// Run the parsed command; the exit status says how it went (2: bad input).
pub fn run(cli: Cli) -> ExitCode {
    match dispatch(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn dispatch(cli: &Cli) -> Result<ExitCode, AppError> {
    match &cli.command {
        Command::Plan(a) => plan::command(cli, a),
        Command::Run(a) => run::command(cli, a),
        Command::EngineBench(a) => bench::command(cli, a),
        Command::Export(a) => export::command(cli, a),
        Command::Report(a) => report::command(cli, a),
        Command::Serve(a) => serve::command(cli, a),
        Command::Cache(c) => cache::command(&config(cli, None), c),
        Command::Validate(a) => start::validate(a),
        Command::Schema => start::schema(),
        Command::Init(a) => start::init(a),
    }
}

pub(crate) fn config(cli: &Cli, threads: Option<usize>) -> Config {
    Config {
        cache_dir: cli.cache_dir.clone(),
        reports_dir: cli.reports_dir.clone(),
        models_dir: cli
            .models_dir
            .clone()
            .or_else(crate::model::default_models_dir),
        threads: threads.unwrap_or_else(crate::exec::default_threads),
        backend: cli.backend,
        packing: crate::backend::Packing::for_device(cli.pack),
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

pub(crate) fn scripts(cdn: bool) -> Scripts {
    if cdn { Scripts::Cdn } else { Scripts::Inline }
}
