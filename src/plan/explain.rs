//! What `pipeline plan` shows: each stage's items and how many are cached, and why a
//! cell's rows (or a stage's items) miss the cache.

use serde::Serialize;

use super::{Plan, Source};
use crate::cache::{Cache, Lookup};
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageKind {
    Load,
    Embed,
    Neighbours,
    Render,
    Infer,
    Calibrate,
    Cascade,
    Metrics,
    Report,
}

/// One stage of the plan's DAG.
#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub id: String,
    pub kind: StageKind,
    pub items: usize,
    /// Items whose output is already in the cache (stages that are not stored, because
    /// they take milliseconds, show 0).
    pub cached: usize,
    /// What the stage's items are.
    pub what: &'static str,
    /// The ids of the stages whose outputs it reads.
    pub inputs: Vec<String>,
}

/// The stage that reads, samples and cleans the dataset and the other row files.
pub const LOAD: &str = "load:rows";

/// The routing step after stage `k` of cascade `name`.
fn route_id(name: &str, k: usize) -> String {
    format!("route:{name}/{k}")
}

/// A cascade stage cell that computes only the rows sent on to it, and the routing step
/// that sends them.
struct Gate {
    cell_id: String,
    route: String,
}

impl Plan {
    fn cascade_gates(&self) -> Vec<Gate> {
        let mut gates = Vec::new();
        for cp in &self.cascades {
            let name = &self.spec.cascades[cp.spec].id;
            for (k, r) in cp.stages.iter().enumerate().skip(1) {
                let cell = self.cell(*r);
                if cell.masked.is_some() {
                    gates.push(Gate {
                        cell_id: cell.id.clone(),
                        route: route_id(name, k - 1),
                    });
                }
            }
            for (k, fs) in cp.fit_stages.iter().enumerate().skip(1) {
                if let Some(i) = fs
                    && self.support[*i].masked.is_some()
                {
                    gates.push(Gate {
                        cell_id: self.support[*i].id.clone(),
                        route: route_id(name, k - 1),
                    });
                }
            }
        }
        gates
    }
}

pub(super) fn count(v: &mut Vec<(String, usize)>, key: &str) {
    match v.iter_mut().find(|(k, _)| k == key) {
        Some((_, n)) => *n += 1,
        None => v.push((key.to_string(), 1)),
    }
}

impl Plan {
    /// The stages in the order they run, with their items and what is cached.
    pub fn stages(&self, cache: &Cache, store: &Store) -> Vec<StageStatus> {
        let mut out = Vec::new();
        let stage = |id: String, kind, items, cached, what| StageStatus {
            id,
            kind,
            items,
            cached,
            what,
            inputs: Vec::new(),
        };
        out.push(StageStatus {
            inputs: Vec::new(),
            ..stage(
                LOAD.into(),
                StageKind::Load,
                self.sets.iter().map(|s| s.rows.len()).sum(),
                0,
                "rows read, sampled and cleaned (not stored)",
            )
        });
        for (e, emb) in self.embedders.iter().enumerate() {
            let keys: Vec<_> = self
                .embed_requests
                .iter()
                .filter(|r| r.embedder == e)
                .collect();
            let cached = keys.iter().filter(|r| store.contains(&r.key)).count();
            out.push(StageStatus {
                inputs: vec![LOAD.into()],
                ..stage(
                    format!("embed:{}", emb.id),
                    StageKind::Embed,
                    keys.len(),
                    cached,
                    "distinct texts",
                )
            });
        }
        for r in &self.retrievals {
            let items: usize = r.keys.iter().map(Vec::len).sum();
            let cached = r
                .keys
                .iter()
                .flatten()
                .filter(|k| k.is_some_and(|k| store.contains(&k)))
                .count();
            out.push(StageStatus {
                inputs: vec![format!(
                    "embed:{}",
                    self.embedders[self.pools[r.pool].embedder].id
                )],
                ..stage(
                    format!("neighbours:{}", r.id),
                    StageKind::Neighbours,
                    items,
                    cached,
                    "queries",
                )
            });
        }
        for p in 0..self.prompts.len() {
            let items: usize = self.sets.iter().map(|s| s.rows.len()).sum();
            let mut inputs = vec![LOAD.to_string()];
            let retrieval = format!("prompt:{}", self.prompts.id(p));
            if self.retrievals.iter().any(|r| r.id == retrieval) {
                inputs.push(format!("neighbours:{retrieval}"));
            }
            out.push(StageStatus {
                inputs,
                ..stage(
                    format!("render:{}", self.prompts.id(p)),
                    StageKind::Render,
                    items,
                    0,
                    "rendered prompts (not stored)",
                )
            });
        }
        // A cascade stage that computes only the rows sent on to it is its own infer stage,
        // after the routing step that sends them.
        let gates = self.cascade_gates();
        let infer_id = |c: &super::Cell| match gates.iter().find(|g| g.cell_id == c.id) {
            Some(g) => format!(
                "infer:{}@{}",
                self.models[c.model().unwrap_or(0)].id,
                g.route
            ),
            None => format!("infer:{}", self.models[c.model().unwrap_or(0)].id),
        };
        let mut infer_ids: Vec<String> = Vec::new();
        for c in self.inference_cells() {
            let id = infer_id(c);
            if !infer_ids.contains(&id) {
                infer_ids.push(id);
            }
        }
        for id in &infer_ids {
            let cells: Vec<&super::Cell> = self
                .inference_cells()
                .filter(|c| infer_id(c) == *id)
                .collect();
            let mut inputs: Vec<String> = Vec::new();
            for c in &cells {
                for i in std::iter::once(format!(
                    "render:{}",
                    self.prompts.id(c.prompt().unwrap_or(0))
                ))
                .chain(
                    gates
                        .iter()
                        .filter(|g| g.cell_id == c.id)
                        .map(|g| g.route.clone()),
                ) {
                    if !inputs.contains(&i) {
                        inputs.push(i);
                    }
                }
            }
            // Each distinct row, with the prompt limit of the cells that need it (a key is
            // one task of one prompt, so its cells share the limit).
            let mut keys = std::collections::HashMap::new();
            let mut unknown = 0;
            for c in cells {
                let limit = self.prompt_limit(c);
                for r in &c.rows {
                    match r {
                        Some(k) => {
                            keys.insert(k.row_key(), limit);
                        }
                        // A masked cascade stage does not need the rows not let in.
                        None if c.masked.is_some() => {}
                        None => unknown += 1,
                    }
                }
            }
            let cached = keys
                .iter()
                .filter(|(k, limit)| matches!(cache.lookup(k, **limit), Lookup::Hit(_)))
                .count();
            out.push(StageStatus {
                inputs,
                ..stage(
                    id.clone(),
                    StageKind::Infer,
                    keys.len() + unknown,
                    cached,
                    "distinct rows",
                )
            });
        }
        for c in self.cells.iter().filter(|c| c.calibration.is_some()) {
            let cached = usize::from(self.calibration_key(c).is_some_and(|k| store.contains(&k)));
            let support = &self.support[self.calibrations[c.calibration.unwrap_or(0)].support];
            out.push(StageStatus {
                inputs: vec![infer_id(support)],
                ..stage(
                    format!("calibrate:{}", c.id),
                    StageKind::Calibrate,
                    1,
                    cached,
                    "fits",
                )
            });
        }
        let calibrate_of = |c: &super::Cell| {
            (c.calibration.is_some() && self.cells.iter().any(|r| r.id == c.id))
                .then(|| format!("calibrate:{}", c.id))
        };
        for cp in &self.cascades {
            let res = cp.resolution.as_ref();
            let name = &self.spec.cascades[cp.spec].id;
            let stage_inputs = |k: usize| -> Vec<String> {
                let cell = self.cell(cp.stages[k]);
                let fit = cp
                    .fit_stages
                    .get(k)
                    .copied()
                    .flatten()
                    .map(|i| infer_id(&self.support[i]));
                std::iter::once(infer_id(cell))
                    .chain(fit)
                    .chain(calibrate_of(cell))
                    .collect()
            };
            // A routing step after each stage but the last: which rows go on.
            for k in 0..cp.stages.len().saturating_sub(1) {
                let mut inputs = stage_inputs(k);
                if k > 0 {
                    inputs.push(route_id(name, k - 1));
                }
                out.push(StageStatus {
                    inputs,
                    ..stage(
                        route_id(name, k),
                        StageKind::Cascade,
                        res.map_or(0, |r| r.reached[k]),
                        res.map_or(0, |r| r.reached[k] - r.reached[k + 1].min(r.reached[k])),
                        "rows reaching this step (cached: answered here)",
                    )
                });
            }
            let mut inputs: Vec<String> = (0..cp.stages.len()).flat_map(stage_inputs).collect();
            inputs.extend((0..cp.stages.len().saturating_sub(1)).map(|k| route_id(name, k)));
            inputs.dedup();
            out.push(StageStatus {
                inputs,
                ..stage(
                    format!("cascade:{name}"),
                    StageKind::Cascade,
                    self.dataset.rows.len(),
                    res.map_or(0, |r| r.answered()),
                    "rows answered (from the stages' cached rows)",
                )
            });
        }
        // Metrics read every reported cell: its inference (or a vote's neighbours), its fit,
        // its cascade.
        let mut metrics_inputs: Vec<String> = Vec::new();
        for c in &self.cells {
            let ids: Vec<String> = match c.source {
                super::Source::Llm { .. } => std::iter::once(infer_id(c))
                    .chain(calibrate_of(c))
                    .collect(),
                super::Source::Vote { retrieval } => {
                    vec![format!("neighbours:{}", self.retrievals[retrieval].id)]
                }
                super::Source::Cascade { cascade } => {
                    vec![format!(
                        "cascade:{}",
                        self.spec.cascades[self.cascades[cascade].spec].id
                    )]
                }
            };
            for id in ids {
                if !metrics_inputs.contains(&id) {
                    metrics_inputs.push(id);
                }
            }
        }
        out.push(StageStatus {
            inputs: metrics_inputs,
            ..stage(
                "metrics".into(),
                StageKind::Metrics,
                self.cells.len(),
                0,
                "cells (not stored)",
            )
        });
        out.push(StageStatus {
            inputs: vec!["metrics".into()],
            ..stage(
                "report".into(),
                StageKind::Report,
                1,
                0,
                "pages (not stored)",
            )
        });
        out
    }

    /// Why a stage's items miss the cache, in words.
    pub fn explain_stage(&self, id: &str, cache: &Cache, store: &Store) -> Option<String> {
        let st = self.stages(cache, store).into_iter().find(|s| s.id == id)?;
        let todo = st.items - st.cached;
        let why = match st.kind {
            StageKind::Embed => {
                let e = self.embedders.iter().position(|e| format!("embed:{}", e.id) == id)?;
                let sha = self.embedders[e].sha256.as_deref().unwrap_or("unknown");
                format!("{todo} texts were never embedded with this embedder file (sha256 {sha}), its max_tokens and this engine; an embedding is keyed by those and the exact text")
            }
            StageKind::Neighbours => format!(
                "{todo} queries have no stored neighbours for this pool, query, k and order{}",
                if self.embed_requests.iter().any(|r| !store.contains(&r.key)) {
                    "; some embeddings they need are not computed yet"
                } else {
                    ""
                }
            ),
            StageKind::Load => "rows are read from their files on every run (milliseconds)".into(),
            StageKind::Render => "prompts are rendered on every run (milliseconds); their text keys the inference rows".into(),
            StageKind::Infer => format!("{todo} rows to run; `plan --explain CELL` says which key components changed"),
            StageKind::Calibrate => "the fit is computed from its rows' cached scores once they are all computed".into(),
            StageKind::Cascade => {
                let cp = self.cascades.iter().find(|c| format!("cascade:{}", self.spec.cascades[c.spec].id) == id)?;
                self.cascade_note(cp)
            }
            StageKind::Metrics | StageKind::Report => "computed from the cache on every run and report".into(),
        };
        Some(format!(
            "stage {id}: {} {}, {} cached\n  {why}\n",
            st.items, st.what, st.cached
        ))
    }

    /// The calibration fit's key: its kind and the rows it is fitted on (`None` until
    /// every row's key is known).
    pub fn calibration_key(&self, cell: &super::Cell) -> Option<crate::key::Digest> {
        use crate::key::{CacheKey, CalibrationPart};
        let cal = &self.calibrations[cell.calibration?];
        let support = &self.support[cal.support];
        let rows: Option<Vec<_>> = support
            .rows
            .iter()
            .zip(&self.sets[support.set].rows)
            .map(|(c, r)| c.map(|c| (c.row_key(), (!cal.content_free).then_some(r.label))))
            .collect();
        let kind = if cal.content_free {
            "content_free"
        } else {
            "fit"
        };
        Some(CalibrationPart { kind, rows: &rows? }.digest())
    }

    /// What a cascade's rows wait for, and how many go on at each step.
    pub fn cascade_note(&self, cp: &super::CascadePlan) -> String {
        let spec = &self.spec.cascades[cp.spec];
        let Some(res) = &cp.resolution else {
            return format!("cascade {}: not resolved against the cache", spec.id);
        };
        let mut out = format!(
            "cascade {}: {} of {} rows answered",
            spec.id,
            res.answered(),
            self.dataset.rows.len()
        );
        for (k, e) in spec.escalate.iter().enumerate() {
            let to = &self.cell(cp.stages[k + 1]).id;
            let rule = match (e, res.thresholds[k]) {
                (crate::spec::Escalate::Margin(m), _) => format!("margin < {m}"),
                (crate::spec::Escalate::Fraction { fraction, .. }, Some(t)) => format!(
                    "margin < {t:.3}, fitted to send on {:.0}% of {} fit rows",
                    fraction * 100.0,
                    res.fit_rows[k].unwrap_or(0)
                ),
                (
                    crate::spec::Escalate::Fraction {
                        fraction, sample, ..
                    },
                    None,
                ) => format!(
                    "{:.0}% with the smallest margins; the threshold is fitted once the {} fit rows are computed",
                    fraction * 100.0,
                    sample.n
                ),
            };
            out.push_str(&format!(
                "; {} rows go on to {to} so far ({rule})",
                res.reached[k + 1]
            ));
        }
        if res.pending > 0 {
            out.push_str(&format!(
                "; {} stage rows to run before the rest is known",
                res.pending
            ));
        }
        if res.failed > 0 {
            out.push_str(&format!(
                "; {} rows wait on a stage row that failed",
                res.failed
            ));
        }
        out
    }

    /// Whether a cell's source is a model (not a vote).
    pub fn is_llm(&self, cell: usize) -> bool {
        matches!(self.cells[cell].source, Source::Llm { .. })
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Explanation {
    pub cell: String,
    pub rows: usize,
    pub cached: usize,
    /// Missing rows whose dataset row was never computed in any cell.
    pub never_computed: usize,
    /// Missing rows whose key is not known yet: the model file is not here (and the spec
    /// gives no sha256), or the row's retrieved examples need embeddings not computed yet.
    pub unknown: usize,
    /// For missing rows with a cached neighbour: the differing components and how many rows.
    pub differs: Vec<(String, usize)>,
    /// Rows whose last attempt failed, by error kind (they run again).
    pub failed: Vec<(String, usize)>,
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "cell {}: {} rows, {} cached",
            self.cell, self.rows, self.cached
        )?;
        for (what, n) in &self.differs {
            writeln!(
                f,
                "  {n} rows to run: {what} differs from the nearest cached row"
            )?;
        }
        for (kind, n) in &self.failed {
            writeln!(
                f,
                "  {n} rows to run: their last attempt failed ({kind}); the report lists the errors"
            )?;
        }
        if self.never_computed > 0 {
            writeln!(
                f,
                "  {} rows to run: never computed (no cached row for these dataset rows)",
                self.never_computed
            )?;
        }
        if self.unknown > 0 {
            writeln!(
                f,
                "  {} rows to run: their key is not known yet (a model file not here without a sha256 in the spec, or retrieved examples whose embeddings are not computed yet)",
                self.unknown
            )?;
        }
        Ok(())
    }
}
