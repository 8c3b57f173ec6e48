//! `infer:MODEL` (and `infer:MODEL@route:CASCADE/K` for a cascade stage that computes only
//! the rows sent on to it): the model's rows, one per distinct key.

use super::{Context, Kind, StageKind, StageStatus, add};
use crate::cache::Lookup;
use crate::key::Digest;
use crate::plan::Cell;

pub(super) struct Infer;

impl Kind for Infer {
    fn stages(&self, cx: &Context) -> Vec<StageStatus> {
        let plan = cx.plan;
        let mut ids: Vec<String> = Vec::new();
        for c in plan.inference_cells() {
            add(&mut ids, cx.infer_id(c));
        }
        ids.into_iter()
            .map(|id| {
                let cells: Vec<&Cell> = plan
                    .inference_cells()
                    .filter(|c| cx.infer_id(c) == id)
                    .collect();
                let mut inputs = Vec::new();
                for c in &cells {
                    add(
                        &mut inputs,
                        format!("render:{}", plan.prompts.id(c.prompt().unwrap_or(0))),
                    );
                    if let Some(route) = cx.gate_of(c) {
                        add(&mut inputs, route.to_string());
                    }
                }
                // Each distinct row, with the prompt limit of the cells that need it (a key
                // is one task of one prompt, so its cells share the limit).
                // Sorted and deduplicated rather than hashed: a million keys in a vector
                // take a third of the memory of a map.
                let mut keys: Vec<(Digest, Option<u32>)> = Vec::new();
                let mut unknown = 0;
                for c in cells {
                    let limit = plan.prompt_limit(c);
                    for (i, r) in c.rows.keys().enumerate() {
                        match r {
                            // A gated cascade stage needs only the rows routed to it.
                            _ if !cx.routing.needs(c, i) => {}
                            Some(k) => keys.push((k, limit)),
                            None => unknown += 1,
                        }
                    }
                }
                keys.sort_unstable_by_key(|k| k.0);
                keys.dedup_by_key(|k| k.0);
                let cached = keys
                    .iter()
                    .filter(|(k, limit)| matches!(cx.cache.lookup(k, *limit), Lookup::Hit))
                    .count();
                let unknown_key = (unknown > 0).then_some(None);
                StageStatus::new(
                    id,
                    StageKind::Infer,
                    keys.len() + unknown,
                    cached,
                    "distinct rows",
                )
                .reading(inputs)
                .keyed(keys.iter().map(|k| Some(k.0)).chain(unknown_key))
            })
            .collect()
    }

    fn why(&self, _: &Context, st: &StageStatus) -> Option<String> {
        Some(format!(
            "{} rows to run; `plan --explain CELL` says which key components changed",
            st.items - st.cached
        ))
    }
}
