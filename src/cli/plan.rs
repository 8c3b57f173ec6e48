//! `pipeline plan`: the cells, stages and shards of a spec against the cache, as a table or JSON.

use std::process::ExitCode;

use super::args::{Cli, PlanArgs};
use super::output::*;
use super::*;
use crate::app::{self, AppError};
use crate::plan::CellStatus;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

pub(super) fn command(cli: &Cli, args: &PlanArgs) -> Result<ExitCode, AppError> {
    let PlanArgs {
        spec,
        json,
        explain,
        limit,
        shards,
        dot,
        expect_accuracy,
        discordant,
    } = args;
    let cfg = config(cli, None);
    let planned = app::plan(&cfg, spec, *limit)?;
    warn(&planned.warnings());
    let dag = planned.dag()?;
    let resolution = crate::metrics::stats::Resolution::of(
        planned.plan.dataset.rows.len() as u64,
        *expect_accuracy,
        *discordant,
    );
    if *dot {
        out_inline!("{}", dag.dot());
    } else if let Some(n) = shards {
        let split = app::shard_plan(&planned, *n as usize)?;
        if *json {
            out!("{}", to_json(&split));
        } else {
            print_shards(&split);
        }
    } else if let Some(cell) = explain {
        if *json {
            out!("{}", to_json(&planned.explain_cell(cell)?));
        } else {
            out_inline!("{}", planned.explain(cell)?);
        }
    } else if *json {
        let mut v = planned
            .plan
            .to_json(&planned.cache, &planned.decided.routing, dag.stages());
        v["resolution"] = serde_json::to_value(resolution).unwrap_or_default();
        v["detectable_difference"] = resolution.detectable_difference.into();
        out!("{}", to_json(&v));
    } else {
        print_plan(&planned, &dag);
        out!("{}", resolution.sentence());
        for ci in 0..planned.plan.cascades.len() {
            out!(
                "{}",
                planned.plan.cascade_note(ci, &planned.decided.routing)
            );
        }
        if let Some(note) = planned.published_note(&cfg.reports_dir) {
            out!("{note}");
        }
        if let Some(note) = planned.engine_note()? {
            out!("{note}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_shards(split: &[app::ShardSummary]) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["shard", "prompts", "rows", "est. tokens", "models"]);
    for s in split {
        t.add_row(vec![
            format!("{}/{}", s.index, split.len()),
            s.prompts.to_string(),
            s.rows.to_string(),
            s.estimated_tokens.to_string(),
            s.models.join(", "),
        ]);
    }
    out!("{t}");
    let loads: usize = split.iter().map(|s| s.models.len()).sum();
    out!("{loads} model loads in all");
}

fn print_plan(planned: &app::Planned, dag: &crate::dag::Dag) {
    let plan = &planned.plan;
    let mut stages = Table::new();
    stages.load_preset(UTF8_FULL_CONDENSED);
    stages.set_header(vec!["stage", "items", "cached", "to run"]);
    for s in dag.stages() {
        stages.add_row(vec![
            s.id.clone(),
            format!("{} {}", s.items, s.what),
            s.cached.to_string(),
            (s.items - s.cached).to_string(),
        ]);
    }
    out!("{stages}");
    for r in &plan.retrievals {
        let (queries, with, excluded) = r.leaks();
        if excluded > 0 {
            out!(
                "leak guard: {}: {excluded} pool rows left out (same id or text) for {with} of {queries} queries",
                r.id
            );
        }
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["cell", "rows", "cached", "failed", "to run"]);
    let mut total = CellStatus::default();
    for (c, st) in plan.cells.iter().zip(planned.status()) {
        t.add_row(vec![
            c.id.clone(),
            st.rows.to_string(),
            st.cached.to_string(),
            (st.failed + st.too_long).to_string(),
            st.to_run().to_string(),
        ]);
        total.rows += st.rows;
        total.cached += st.cached;
        total.failed += st.failed;
        total.too_long += st.too_long;
    }
    t.add_row(vec![
        "total".to_string(),
        total.rows.to_string(),
        total.cached.to_string(),
        (total.failed + total.too_long).to_string(),
        total.to_run().to_string(),
    ]);
    if total.too_long > 0 {
        out!(
            "{} rows were computed with a larger n_ctx and do not fit this spec's: they count as failed (context overflow) and are not run",
            total.too_long
        );
    }
    out!("{t}");
    for m in plan.models.iter().chain(&plan.embedders) {
        if m.file.is_none() {
            out!(
                "note: model `{}` is not on this machine yet; `run` will fetch it",
                m.id
            );
        }
    }
}
