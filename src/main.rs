//! `pipeline`: parse the arguments, run the command (see [`pipeline::cli`]).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    pipeline::cli::run(pipeline::cli::args::Cli::parse())
}
