//! `pipeline serve`: one cell as an HTTP API until SIGTERM.

use std::process::ExitCode;

use super::args::{Cli, ServeArgs};
use super::*;
use crate::app::{self, AppError};

pub(super) fn command(cli: &Cli, args: &ServeArgs) -> Result<ExitCode, AppError> {
    let ServeArgs {
        spec,
        cell,
        addr,
        queue,
        max_batch,
        body_limit,
        threads,
    } = args;

    let cfg = config(cli, *threads);
    let opts = crate::serve::ServeOptions {
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
