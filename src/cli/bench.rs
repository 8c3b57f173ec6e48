//! `pipeline engine-bench`: llama.cpp's raw speed through this build, as JSON.

use std::process::ExitCode;

use super::args::{Cli, EngineBenchArgs};
use crate::app::AppError;

pub(super) fn command(cli: &Cli, args: &EngineBenchArgs) -> Result<ExitCode, AppError> {
    let EngineBenchArgs {
        model,
        threads,
        reps,
        embed_tokens,
        packed,
        save,
    } = args;

    let threads = threads.unwrap_or_else(crate::exec::default_threads);
    let failed = |e| {
        AppError::Run(crate::exec::ExecError::Backend {
            model: model.display().to_string(),
            source: e,
        })
    };
    if let Some(n) = embed_tokens {
        let rate =
            crate::backend::raw_embed_throughput(model, threads, *n, *reps).map_err(failed)?;
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
    let (wall, cpu) = (std::time::Instant::now(), crate::rate::CpuSince::now());
    let (pp, tg) = crate::backend::llama::raw_throughput(model, threads, *reps).map_err(failed)?;
    let cpu_share = cpu
        .seconds()
        .and_then(|c| crate::rate::cpu_share(c, wall.elapsed().as_secs_f64(), threads));
    let saved = if *save {
        Some(save_rate(cli, model, threads, pp, tg, cpu_share)?)
    } else {
        None
    };
    let packed_pp = match packed {
        Some((rows, batch)) => Some(
            crate::backend::llama::raw_packed_throughput(model, threads, *rows, *batch, *reps)
                .map_err(failed)?,
        ),
        None => None,
    };
    out!(
        "{}",
        serde_json::json!({
            "model": model.file_name().map(|n| n.to_string_lossy().into_owned()),
            "threads": threads,
            "engine": crate::backend::llama::engine_version(),
            "pp512_tok_s": pp,
            "tg32_tok_s": tg,
            "cpu_share": cpu_share,
            "saved": saved.as_ref().map(ToString::to_string),
            "packed": packed.map(|(r, b)| serde_json::json!({"rows": r, "batch": b, "pp_tok_s": packed_pp})),
        })
    );
    Ok(match saved {
        Some(Saved::Busy { .. }) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// Where a measured rate was kept, or why it was not.
enum Saved {
    At(std::path::PathBuf),
    /// The process got under [`crate::rate::QUIET_CPU_SHARE`] of its threads' time.
    Busy {
        share: f64,
        threads: usize,
    },
}

impl std::fmt::Display for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Saved::At(p) => write!(f, "{}", p.display()),
            Saved::Busy { share, threads } => write!(
                f,
                "not saved: the machine was busy (the bench got {:.0}% of its {threads} threads' time); measure again when it is quiet",
                100.0 * share
            ),
        }
    }
}

/// Keep a rate measured on a quiet machine.
fn save_rate(
    cli: &Cli,
    model: &std::path::Path,
    threads: usize,
    pp: f64,
    tg: f64,
    cpu_share: Option<f64>,
) -> Result<Saved, AppError> {
    if let Some(share) = cpu_share.filter(|s| *s < crate::rate::QUIET_CPU_SHARE) {
        return Ok(Saved::Busy { share, threads });
    }
    let cfg = super::config(cli, Some(threads));
    let (sha256, _) = cfg
        .resolver(false)
        .sha256_memo(model)
        .map_err(|source| AppError::Io {
            what: "read",
            path: model.to_path_buf(),
            source,
        })?;
    let rate = crate::rate::EngineRate {
        prompt_tok_s: pp,
        gen_tok_s: tg,
        model_sha256: sha256,
        engine: crate::backend::llama::engine_version(),
        threads,
        machine: crate::report::machine_description(),
        date_utc: crate::report::utc_now(),
        cpu_share,
    };
    crate::rate::save(&cfg.cache_dir, &rate)
        .map(Saved::At)
        .map_err(|source| AppError::Io {
            what: "save the rate in",
            path: cfg.cache_dir.join("rates"),
            source,
        })
}
