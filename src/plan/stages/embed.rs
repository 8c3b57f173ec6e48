//! `embed:EMBEDDER`: the sentence embedding of each distinct text a pool or a query needs.

use super::{Context, Kind, LOAD, StageKind, StageStatus};

pub(super) struct Embed;

impl Kind for Embed {
    fn stages(&self, cx: &Context) -> Vec<StageStatus> {
        let plan = cx.plan;
        plan.embedders
            .iter()
            .enumerate()
            .map(|(e, emb)| {
                let keys: Vec<_> = plan
                    .embed_requests
                    .iter()
                    .filter(|r| r.embedder == e)
                    .collect();
                let cached = keys.iter().filter(|r| cx.store.contains(&r.key)).count();
                let mut digests: Vec<_> = keys.iter().map(|r| r.key).collect();
                digests.sort_by_key(|k| k.0);
                StageStatus::new(
                    format!("embed:{}", emb.id),
                    StageKind::Embed,
                    keys.len(),
                    cached,
                    "distinct texts",
                )
                .reading(vec![LOAD.into()])
                .keyed(digests.into_iter().map(Some))
            })
            .collect()
    }

    fn why(&self, cx: &Context, st: &StageStatus) -> Option<String> {
        let e = cx
            .plan
            .embedders
            .iter()
            .find(|e| format!("embed:{}", e.id) == st.id)?;
        let sha = e.sha256.as_deref().unwrap_or("unknown");
        Some(format!(
            "{} texts were never embedded with this embedder file (sha256 {sha}), its max_tokens and this engine; an embedding is keyed by those and the exact text",
            st.items - st.cached
        ))
    }
}
