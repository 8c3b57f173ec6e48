//! `pipeline export`: the report's tables as CSV.

use std::process::ExitCode;

use super::args::{Cli, ExportArgs, ExportFormat};
use super::output::*;
use super::*;
use crate::app::{self, AppError};

pub(super) fn command(cli: &Cli, args: &ExportArgs) -> Result<ExitCode, AppError> {
    let ExportArgs {
        spec,
        format: ExportFormat::Csv,
        out,
        limit,
    } = args;

    let (paths, warnings) = app::export(&config(cli, None), spec, *limit, out.as_deref())?;
    warn(&warnings);
    for p in paths {
        out!("{}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
