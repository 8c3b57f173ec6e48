//! `pipeline run`: compute what the cache lacks, write the report, say what happened.

use std::process::ExitCode;

use super::args::{Cli, RunArgs};
use super::output::*;
use super::*;
use crate::app::{self, AppError, RunOptions};
use crate::interrupt::StopRequest;
use crate::shard::{Shard, ShardError};

pub(super) fn command(cli: &Cli, args: &RunArgs) -> Result<ExitCode, AppError> {
    let RunArgs {
        spec,
        limit,
        threads,
        cdn,
        fail_fast,
        shard,
        shards,
        until_resolved,
        max_rows,
        batch,
    } = args;

    let cfg = config(cli, *threads);
    let shard = match shard {
        Some(s) => Some(*s),
        None => {
            let count = shards.map(|n| n as usize);
            let found =
                Shard::from_env(|k| std::env::var(k).ok(), count).map_err(AppError::from)?;
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
    let outcome = match until_resolved.as_deref() {
        Some([a, b]) => {
            let kind = cfg.backend;
            let (outcome, seq) = app::run_until_resolved(
                &cfg,
                spec,
                &opts,
                cancel,
                std::sync::Arc::new(move || kind.create()),
                &app::UntilResolved {
                    cells: [a.clone(), b.clone()],
                    max_rows: max_rows.map(|n| n as usize),
                    batch: *batch as usize,
                },
            )?;
            out!("{}", seq.why);
            outcome
        }
        _ => app::run(&cfg, spec, &opts, cancel)?,
    };
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
