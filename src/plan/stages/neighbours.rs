//! `neighbours:RETRIEVAL`: each query's nearest pool rows (a knn prompt's examples, a
//! `knn_vote`'s voters), from the stored embeddings.

use super::{Context, Kind, StageKind, StageStatus};

pub(super) struct Neighbours;

impl Kind for Neighbours {
    fn stages(&self, cx: &Context) -> Vec<StageStatus> {
        let plan = cx.plan;
        plan.retrievals
            .iter()
            .map(|r| {
                let items = r.keys.iter().map(Vec::len).sum();
                let cached = r
                    .keys
                    .iter()
                    .flatten()
                    .filter(|k| k.is_some_and(|k| cx.store.contains(&k)))
                    .count();
                let embedder = &plan.embedders[plan.pools[r.pool].embedder].id;
                StageStatus::new(
                    format!("neighbours:{}", r.id),
                    StageKind::Neighbours,
                    items,
                    cached,
                    "queries",
                )
                .reading(vec![format!("embed:{embedder}")])
                .keyed(r.keys.iter().flatten().copied())
            })
            .collect()
    }

    fn why(&self, cx: &Context, st: &StageStatus) -> Option<String> {
        let missing = cx
            .plan
            .embed_requests
            .iter()
            .any(|r| !cx.store.contains(&r.key));
        Some(format!(
            "{} queries have no stored neighbours for this pool, query, k and order{}",
            st.items - st.cached,
            if missing {
                "; some embeddings they need are not computed yet"
            } else {
                ""
            }
        ))
    }
}
