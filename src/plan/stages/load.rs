//! `load:rows`: the dataset and the other row files, read, sampled and cleaned.

use super::{Context, Kind, LOAD, StageKind, StageStatus};
use crate::key::KeyEncoder;

pub(super) struct Load;

impl Kind for Load {
    fn stages(&self, cx: &Context) -> Vec<StageStatus> {
        let sets = &cx.plan.sets;
        let rows = sets.iter().map(|s| s.rows.len()).sum();
        // Its output is the rows themselves: each row set's name, and each row's id, text
        // and label.
        let items = sets.iter().flat_map(|s| {
            s.rows.iter().map(move |r| {
                let mut e = KeyEncoder::new("loaded-row");
                e.str("set", &s.name)
                    .str("id", &r.id)
                    .str("text", &r.text)
                    .u64("label", r.label as u64);
                Some(e.finish())
            })
        });
        vec![
            StageStatus::new(
                LOAD.into(),
                StageKind::Load,
                rows,
                0,
                "rows read, sampled and cleaned (not stored)",
            )
            .keyed(items),
        ]
    }

    fn why(&self, _: &Context, _: &StageStatus) -> Option<String> {
        Some("rows are read from their files on every run (milliseconds)".into())
    }
}
