//! `pipeline`: evaluate small local LLMs from one YAML file.
//!
//! The modules follow the data flow: a [`spec`] is parsed and validated, expanded into a
//! [`plan`] of cells whose rows carry content keys ([`key`]); the [`cache`] says which rows are
//! done; [`exec`] runs the rest through a [`backend`]; [`metrics`] and [`report`] turn
//! predictions into tables and an HTML page. [`app`] holds the commands as functions over a
//! settled [`config::Config`]; the CLI in `main.rs` is a thin layer on top.

pub mod answer;
pub mod app;
pub mod backend;
pub mod cache;
pub mod calibrate;
pub mod cascade;
pub mod cli;
pub mod config;
pub mod dag;
pub mod dataset;
pub mod diag;
pub mod digest_memo;
pub mod embed;
pub mod exec;
pub mod fs;
pub mod guard;
pub mod interrupt;
pub mod key;
#[cfg(test)]
mod lockfile;
pub mod metrics;
pub mod model;
pub mod names;
pub mod neighbours;
pub mod plan;
pub mod predict;
pub mod progress;
pub mod prompt;
pub mod report;
pub mod rng;
pub mod row;
mod segments;
pub mod serve;
pub mod shard;
pub mod spec;
pub mod store;
pub mod table;
