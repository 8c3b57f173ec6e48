//! `metrics` (every reported cell's metrics, from its rows, fit, votes or cascade) and
//! `report` (the page and tables): computed from the caches on every run and report.

use super::{Context, Kind, StageKind, StageStatus, add};
use crate::plan::Source;

pub(super) struct Summary;

impl Kind for Summary {
    fn stages(&self, cx: &Context) -> Vec<StageStatus> {
        let plan = cx.plan;
        let mut inputs = Vec::new();
        for c in &plan.cells {
            match c.source {
                Source::Llm { .. } => {
                    add(&mut inputs, cx.infer_id(c));
                    if let Some(id) = cx.calibrate_id(c) {
                        add(&mut inputs, id);
                    }
                }
                Source::Vote { retrieval } => {
                    add(
                        &mut inputs,
                        format!("neighbours:{}", plan.retrievals[retrieval].id),
                    );
                }
                Source::Cascade { cascade } => {
                    let name = &plan.spec.cascades[plan.cascades[cascade].spec].id;
                    add(&mut inputs, format!("cascade:{name}"));
                }
                Source::Embedding { probe } => {
                    let e = plan.embedding_probes[probe].embedder;
                    add(&mut inputs, format!("embed:{}", plan.embedders[e].id));
                }
                Source::Ensemble { ensemble } => {
                    add(&mut inputs, super::ensemble::stage_id(plan, ensemble));
                }
            }
        }
        vec![
            StageStatus::new(
                "metrics".into(),
                StageKind::Metrics,
                plan.cells.len(),
                0,
                "cells (not stored)",
            )
            .reading(inputs),
            StageStatus::new(
                "report".into(),
                StageKind::Report,
                1,
                0,
                "pages (not stored)",
            )
            .reading(vec!["metrics".into()]),
        ]
    }

    fn why(&self, _: &Context, _: &StageStatus) -> Option<String> {
        Some("computed from the cache on every run and report".into())
    }
}
