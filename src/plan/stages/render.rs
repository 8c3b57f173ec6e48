//! `render:PROMPT`: each row's messages, with its retrieved examples where the prompt has
//! them.

use super::{Context, Kind, LOAD, StageKind, StageStatus};
use crate::plan::Serves;

pub(super) struct Render;

impl Kind for Render {
    fn stages(&self, cx: &Context) -> Vec<StageStatus> {
        let plan = cx.plan;
        let rows: usize = plan.sets.iter().map(|s| s.rows.len()).sum();
        (0..plan.prompts.len())
            .map(|p| {
                let mut inputs = vec![LOAD.to_string()];
                if let Some(r) = plan
                    .retrievals
                    .iter()
                    .find(|r| r.serves == Serves::Prompt(p))
                {
                    inputs.push(format!("neighbours:{}", r.id));
                }
                StageStatus::new(
                    format!("render:{}", plan.prompts.id(p)),
                    StageKind::Render,
                    rows,
                    0,
                    "rendered prompts (not stored)",
                )
                .reading(inputs)
            })
            .collect()
    }

    fn why(&self, _: &Context, _: &StageStatus) -> Option<String> {
        Some(
            "prompts are rendered on every run (milliseconds); their text keys the inference rows"
                .into(),
        )
    }
}
