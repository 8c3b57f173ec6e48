//! `ensemble:ID`: each row's label probabilities averaged over the member cells, from their
//! rows (and calibrations) as computed; nothing is stored, it takes milliseconds.

use super::{Context, Kind, StageKind, StageStatus, add};
use crate::plan::{Plan, Source};

pub(super) struct Ensemble;

/// The stage of ensemble `e`.
pub(super) fn stage_id(plan: &Plan, e: usize) -> String {
    format!(
        "ensemble:{}",
        plan.spec.ensembles[plan.ensembles[e].spec].id
    )
}

impl Kind for Ensemble {
    fn stages(&self, cx: &Context) -> Vec<StageStatus> {
        let plan = cx.plan;
        (0..plan.ensembles.len())
            .map(|e| {
                let ep = &plan.ensembles[e];
                let mut inputs = Vec::new();
                for &m in &ep.members {
                    let cell = &plan.cells[m];
                    match cell.source {
                        Source::Llm { .. } => {
                            add(&mut inputs, cx.infer_id(cell));
                            if let Some(id) = cx.calibrate_id(cell) {
                                add(&mut inputs, id);
                            }
                        }
                        Source::Vote { retrieval } => add(
                            &mut inputs,
                            format!("neighbours:{}", plan.retrievals[retrieval].id),
                        ),
                        Source::Embedding { probe } => add(
                            &mut inputs,
                            format!(
                                "embed:{}",
                                plan.embedders[plan.embedding_probes[probe].embedder].id
                            ),
                        ),
                        Source::Cascade { .. } | Source::Ensemble { .. } => {}
                    }
                }
                StageStatus::new(
                    stage_id(plan, e),
                    StageKind::Ensemble,
                    plan.dataset.rows.len(),
                    plan.ensemble_rows_ready(e, cx.cache),
                    "rows averaged (cached: every member's row is)",
                )
                .reading(inputs)
            })
            .collect()
    }

    fn why(&self, cx: &Context, st: &StageStatus) -> Option<String> {
        let plan = cx.plan;
        let e = (0..plan.ensembles.len()).find(|&e| stage_id(plan, e) == st.id)?;
        let members: Vec<&str> = plan.ensembles[e]
            .members
            .iter()
            .map(|&m| plan.cells[m].id.as_str())
            .collect();
        Some(format!(
            "a row is averaged once every member has it: {}",
            members.join(", ")
        ))
    }
}
