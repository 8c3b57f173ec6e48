//! The error of a command: bad input (exit status 2) or a failure of the machinery (1).

use std::path::PathBuf;

use crate::cache::CacheError;
use crate::diag::Diagnostic;
use crate::embed::EmbedError;
use crate::exec::ExecError;
use crate::report::ReportError;
use crate::shard::ShardError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad input: the spec, a template, a dataset, a model file.
    #[error(transparent)]
    Input(#[from] Diagnostic),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Run(#[from] ExecError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("cell `{cell}` cannot be calibrated: {why}")]
    Calibration {
        cell: String,
        why: crate::predict::CalibrationError,
    },
    #[error("serve: {0}")]
    Serve(#[from] crate::serve::ServeError),
    #[error("serve: cascade `{cell}`: a threshold could not be fitted ({why})")]
    ServeThreshold { cell: String, why: String },
    #[error("cannot listen for SIGINT and SIGTERM: {0}")]
    Signals(#[source] std::io::Error),
    #[error("no cell `{cell}` in this plan; cells: {known}")]
    UnknownCell { cell: String, known: String },
    #[error(
        "cannot tell which cached rows {spec} needs: model `{model}` is not on this machine and the spec gives no sha256"
    )]
    UnknownModelDigest { spec: PathBuf, model: String },
    #[error("{}: not a pipeline cache folder (it has no {}/ inside)", .0.display(), crate::cache::LAYOUT)]
    NotACache(PathBuf),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("the plan's stages: {0}")]
    Dag(#[from] crate::dag::DagError),
    #[error("{}: is the cache itself; export into another folder", .0.display())]
    ExportIntoCache(PathBuf),
    #[error(transparent)]
    Starter(#[from] crate::spec::starter::StarterError),
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AppError {
    /// 2 for bad input, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Input(_)
            | AppError::UnknownCell { .. }
            | AppError::NotACache(_)
            | AppError::Shard(_)
            | AppError::ExportIntoCache(_)
            | AppError::Starter(
                crate::spec::starter::StarterError::BadName(_)
                | crate::spec::starter::StarterError::Exists(_),
            ) => 2,
            _ => 1,
        }
    }
}
