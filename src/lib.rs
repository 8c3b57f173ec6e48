//! `pipeline`: evaluate small local LLMs from one YAML file.
//!
//! The modules follow the data flow: a [`spec`] is parsed and validated, expanded into a
//! [`plan`] of typed stages ([`dag`]) and cells whose rows carry content keys ([`key`]); the
//! [`cache`] says which rows are done; the [`schedule`]r brings the stages up to date, running
//! the rest through [`exec`] and a [`backend`]; [`metrics`] and [`report`] turn predictions
//! into tables and an HTML page. [`app`] holds the commands as functions over a settled
//! [`config::Config`]; the CLI ([`cli`]) parses once, calls them and renders what they return.

/// A closed set of names: a fieldless enum whose variants are written in snake_case in
/// tables, JSON and the cache (`TaskKind::Loglik` is `loglik`), parsed back from that
/// name, and shown as it.
macro_rules! named_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident,)+ }) => {
        $(#[$meta])*
        #[derive(
            Debug,
            Clone,
            Copy,
            PartialEq,
            Eq,
            Hash,
            PartialOrd,
            Ord,
            serde::Serialize,
            serde::Deserialize,
            strum::EnumString,
            strum::IntoStaticStr,
            strum::Display,
        )]
        #[serde(rename_all = "snake_case")]
        #[strum(serialize_all = "snake_case")]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }
    };
}

pub mod answer;
pub mod app;
pub mod backend;
pub mod cache;
pub mod calibrate;
pub mod cascade;
pub mod cli;
pub mod config;
pub mod cost;
pub mod dag;
pub mod dataset;
pub mod diag;
pub mod digest_memo;
pub mod embed;
pub mod ensemble;
pub mod error;
pub mod exec;
pub mod fs;
pub mod gguf;
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
pub mod probe;
pub mod progress;
pub mod prompt;
pub mod rate;
pub mod report;
pub mod rng;
pub mod row;
pub mod schedule;
pub mod score;
mod segments;
pub mod sequential;
pub mod serve;
pub mod shard;
pub mod spec;
pub mod store;
pub mod table;
pub mod worker;
