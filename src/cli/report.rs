//! `pipeline report`: the report from the cache alone.

use std::process::ExitCode;

use super::args::{Cli, ReportArgs};
use super::output::*;
use super::*;
use crate::app::{self, AppError};

pub(super) fn command(cli: &Cli, args: &ReportArgs) -> Result<ExitCode, AppError> {
    let ReportArgs { spec, limit, cdn } = args;

    let (written, warnings) = app::report(&config(cli, None), spec, *limit, scripts(*cdn))?;
    warn(&warnings);
    print_summary(&written.analysis.metrics);
    out!("report: {}", written.index.display());
    Ok(ExitCode::SUCCESS)
}
