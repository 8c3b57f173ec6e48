//! `pipeline engine-bench`: llama.cpp's raw speed through this build, as JSON.

use std::process::ExitCode;

use super::args::{Cli, EngineBenchArgs};
use crate::app::AppError;

pub(super) fn command(_: &Cli, args: &EngineBenchArgs) -> Result<ExitCode, AppError> {
    let EngineBenchArgs {
        model,
        threads,
        reps,
        embed_tokens,
        packed,
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
    let (pp, tg) = crate::backend::llama::raw_throughput(model, threads, *reps).map_err(failed)?;
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
            "packed": packed.map(|(r, b)| serde_json::json!({"rows": r, "batch": b, "pp_tok_s": packed_pp})),
        })
    );
    Ok(ExitCode::SUCCESS)
}
