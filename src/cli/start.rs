//! `pipeline validate`, `pipeline schema` and `pipeline init`: starting and checking a
//! spec, before anything is planned.

use std::process::ExitCode;

use super::args::{InitArgs, ValidateArgs};
use crate::app::AppError;
use crate::spec;

pub(super) fn validate(args: &ValidateArgs) -> Result<ExitCode, AppError> {
    let s = spec::load(&args.spec)?;
    out!(
        "{}: ok ({} models × {} prompts × {} methods: {} grid cells{}{})",
        args.spec.display(),
        s.models.len(),
        s.prompts.len(),
        s.methods.len(),
        s.grid_cells(),
        if s.cascades.is_empty() {
            String::new()
        } else {
            format!(", {} cascades", s.cascades.len())
        },
        if s.ensembles.is_empty() {
            String::new()
        } else {
            format!(", {} ensembles", s.ensembles.len())
        },
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn schema() -> Result<ExitCode, AppError> {
    out!(
        "{}",
        serde_json::to_string_pretty(&spec::json_schema()).expect("a schema serializes")
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn init(args: &InitArgs) -> Result<ExitCode, AppError> {
    let written = spec::starter::Starter::new(&args.name)?.write(&args.dir)?;
    for p in &written {
        out!("wrote {}", p.display());
    }
    out!(
        "next: pipeline plan {}",
        args.dir
            .join(format!("experiments/{}.yaml", args.name))
            .display()
    );
    Ok(ExitCode::SUCCESS)
}
