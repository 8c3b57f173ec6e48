//! The plan: the spec expanded into cells (model × prompt × method × grid point), each with
//! one key per dataset row, and what the cache already holds of them.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::cache::Cache;
use crate::dataset::{self, Dataset};
use crate::diag::Diagnostic;
use crate::key::{
    CacheKey, Components, Digest, EnginePart, MethodPart, ModelPart, PromptPart, SamplerPart,
    SeedPart,
};
use crate::model::KnownModel;
use crate::prompt::{Messages, Prompts};
use crate::spec::{MethodKind, SamplerPoint, Spec};

#[derive(Debug, Clone)]
pub struct Cell {
    pub id: String,
    pub model: usize,
    pub prompt: usize,
    pub method: usize,
    /// Grid point (generation only).
    pub point: Option<SamplerPoint>,
    /// Per dataset row; `None` when the model's digest is not known yet.
    pub rows: Vec<Option<Components>>,
}

pub struct Plan {
    pub spec: Spec,
    pub dataset: Dataset,
    pub prompts: Arc<Prompts>,
    pub models: Vec<KnownModel>,
    pub engine_version: String,
    /// Rendered messages, `[prompt][row]`, with the full (untruncated) text.
    pub messages: Vec<Vec<Messages>>,
    pub cells: Vec<Cell>,
}

/// How to build a plan.
pub struct PlanOptions {
    pub engine_version: String,
    /// Keep only the first N sampled rows.
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CellStatus {
    pub rows: usize,
    pub cached: usize,
    /// Rows whose last attempt failed (they run again).
    pub failed: usize,
}

impl CellStatus {
    pub fn to_run(&self) -> usize {
        self.rows - self.cached
    }
}

/// Expand a spec into cells over its sampled rows. `models` are the spec's models as this
/// machine knows them (see [`crate::model::Resolver::known_models`]); nothing is downloaded
/// or loaded here.
pub fn build(spec: Spec, models: Vec<KnownModel>, opts: &PlanOptions) -> Result<Plan, Diagnostic> {
    let mut dataset = dataset::load(&spec.dataset)?;
    if let Some(n) = opts.limit {
        dataset.rows.truncate(n);
    }
    let prompts = compile_prompts(&spec)?;
    let messages = (0..prompts.len())
        .map(|p| {
            dataset
                .rows
                .iter()
                .map(|r| prompts.render(p, &r.text))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cells = expand_cells(
        &spec,
        &models,
        &prompts,
        &messages,
        &dataset,
        &opts.engine_version,
    );
    check_compare_ids(&spec, &cells)?;
    Ok(Plan {
        spec,
        dataset,
        prompts: Arc::new(prompts),
        models,
        engine_version: opts.engine_version.clone(),
        messages,
        cells,
    })
}

/// The spec's templates, with each prompt's fixed few-shot examples drawn.
fn compile_prompts(spec: &Spec) -> Result<Prompts, Diagnostic> {
    let mut shots = Vec::new();
    for p in &spec.prompts {
        shots.push(match &p.shots {
            Some(s) => Some(dataset::load_shots(
                s,
                &spec.dataset,
                &format!("shots/{}", p.id),
            )?),
            None => None,
        });
    }
    Prompts::compile(&spec.prompts, &spec.dataset.labels, shots)
}

/// Models × prompts × methods × grid points, each with the key components of every row.
fn expand_cells(
    spec: &Spec,
    models: &[KnownModel],
    prompts: &Prompts,
    messages: &[Vec<Messages>],
    dataset: &Dataset,
    engine_version: &str,
) -> Vec<Cell> {
    let label_names = dataset.label_names();
    let engine = EnginePart {
        version: engine_version,
    }
    .digest();
    let prompt_digests: Vec<Vec<Digest>> = messages
        .iter()
        .map(|rows| {
            rows.iter()
                .map(|m| {
                    PromptPart {
                        messages: m,
                        max_text_tokens: spec.dataset.max_text_tokens,
                    }
                    .digest()
                })
                .collect()
        })
        .collect();
    let points = spec.sampling.points();
    let mut cells = Vec::new();
    for (mi, model) in models.iter().enumerate() {
        let model_digest = model
            .sha256
            .as_deref()
            .map(|s| ModelPart { sha256: s }.digest());
        for (pi, row_prompts) in prompt_digests.iter().enumerate() {
            for (ki, method) in spec.methods.iter().enumerate() {
                let method_digest = MethodPart {
                    method,
                    labels: &label_names,
                }
                .digest();
                let cell_points: Vec<Option<SamplerPoint>> = match method.kind {
                    MethodKind::Generate => points.iter().copied().map(Some).collect(),
                    MethodKind::Loglik => vec![None],
                };
                for point in cell_points {
                    let sampler = SamplerPart {
                        point: point.as_ref(),
                    }
                    .digest();
                    let seed = SeedPart {
                        point: point.as_ref(),
                    }
                    .digest();
                    let rows = row_prompts
                        .iter()
                        .map(|&prompt| {
                            model_digest.map(|model| Components {
                                model,
                                prompt,
                                method: method_digest,
                                sampler,
                                seed,
                                engine,
                            })
                        })
                        .collect();
                    let mut id = format!("{}/{}/{}", model.id, prompts.id(pi), method.id);
                    if let Some(p) = &point {
                        id.push('@');
                        id.push_str(&spec.sampling.label(p));
                    }
                    cells.push(Cell {
                        id,
                        model: mi,
                        prompt: pi,
                        method: ki,
                        point,
                        rows,
                    });
                }
            }
        }
    }
    cells
}

/// Every cell named in `compare:` exists.
fn check_compare_ids(spec: &Spec, cells: &[Cell]) -> Result<(), Diagnostic> {
    let known = |id: &crate::spec::Located<String>| -> Result<(), Diagnostic> {
        if cells.iter().any(|c| c.id == id.value) {
            return Ok(());
        }
        let ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
        Err(id.error(format!("no cell `{}`; cells: {}", id.value, ids.join(", "))))
    };
    if let Some(b) = &spec.compare.baseline {
        known(b)?;
    }
    for (a, b) in &spec.compare.pairs {
        known(a)?;
        known(b)?;
    }
    Ok(())
}

impl Plan {
    pub fn status(&self, cache: &Cache) -> Vec<CellStatus> {
        self.cells
            .iter()
            .map(|c| {
                let keys = c.rows.iter().flatten().map(Components::row_key);
                let (mut cached, mut failed) = (0, 0);
                for k in keys {
                    if cache.get(&k).is_some() {
                        cached += 1;
                    } else if cache.failure(&k).is_some() {
                        failed += 1;
                    }
                }
                CellStatus {
                    rows: c.rows.len(),
                    cached,
                    failed,
                }
            })
            .collect()
    }

    /// Every row key of the plan (rows whose model digest is unknown have none).
    pub fn keys(&self) -> impl Iterator<Item = Digest> + '_ {
        self.cells
            .iter()
            .flat_map(|c| c.rows.iter().flatten().map(Components::row_key))
    }

    pub fn cell_by_id(&self, id: &str) -> Option<usize> {
        self.cells.iter().position(|c| c.id == id)
    }

    /// Cell parameters as JSON (sampler settings for generation).
    pub fn params(&self, cell: &Cell) -> serde_json::Value {
        let m = &self.spec.methods[cell.method];
        match (&cell.point, m.kind) {
            (Some(p), MethodKind::Generate) => serde_json::json!({
                "kind": "generate",
                "temperature": p.temperature,
                "top_p": p.top_p,
                "top_k": p.top_k,
                "min_p": p.min_p,
                "seed": p.seed,
                "repeat": p.repeat,
                "max_tokens": m.max_tokens,
                "stop": m.stop,
            }),
            _ => serde_json::json!({ "kind": "loglik", "labels": self.dataset.label_names() }),
        }
    }

    /// The plan as `plan --json` prints it.
    pub fn to_json(&self, cache: &Cache) -> serde_json::Value {
        let cells: Vec<serde_json::Value> = self
            .cells
            .iter()
            .zip(self.status(cache))
            .map(|(c, st)| {
                serde_json::json!({
                    "id": c.id,
                    "model": self.models[c.model].id,
                    "prompt": self.prompts.id(c.prompt),
                    "method": self.spec.methods[c.method].id,
                    "params": self.params(c),
                    "rows": st.rows,
                    "cached": st.cached,
                    "failed": st.failed,
                    "to_run": st.to_run(),
                })
            })
            .collect();
        serde_json::json!({
            "name": self.spec.name,
            "engine": self.engine_version,
            "dataset_rows": self.dataset.rows.len(),
            "cells": cells,
        })
    }

    /// Why a cell's rows miss the cache: for each missing row, the cached row of the same
    /// dataset row that is nearest (fewest differing key components), and what differs.
    pub fn explain(&self, cell: usize, cache: &Cache) -> Explanation {
        let c = &self.cells[cell];
        let mut by_row: HashMap<&str, Vec<Components>> = HashMap::new();
        for r in cache.rows() {
            by_row
                .entry(r.row_id.as_str())
                .or_default()
                .push(r.components);
        }
        let mut ex = Explanation {
            cell: c.id.clone(),
            rows: c.rows.len(),
            ..Default::default()
        };
        for (i, comps) in c.rows.iter().enumerate() {
            let Some(comps) = comps else {
                ex.model_unknown += 1;
                continue;
            };
            if cache.get(&comps.row_key()).is_some() {
                ex.cached += 1;
                continue;
            }
            if let Some(e) = cache
                .failure(&comps.row_key())
                .and_then(|r| r.error.as_ref())
            {
                match ex.failed.iter_mut().find(|(k, _)| *k == e.kind) {
                    Some((_, n)) => *n += 1,
                    None => ex.failed.push((e.kind.clone(), 1)),
                }
                continue;
            }
            let row_id = self.dataset.rows[i].id.as_str();
            let nearest = by_row.get(row_id).and_then(|cands| {
                cands
                    .iter()
                    .map(|k| comps.differing(k))
                    .min_by_key(Vec::len)
            });
            match nearest {
                Some(diff) => {
                    let key = diff.join("+");
                    match ex.differs.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, n)) => *n += 1,
                        None => ex.differs.push((key, 1)),
                    }
                }
                None => ex.never_computed += 1,
            }
        }
        ex
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Explanation {
    pub cell: String,
    pub rows: usize,
    pub cached: usize,
    /// Missing rows whose dataset row was never computed in any cell.
    pub never_computed: usize,
    /// Missing rows because the model file is not available to digest.
    pub model_unknown: usize,
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
        if self.model_unknown > 0 {
            writeln!(
                f,
                "  {} rows to run: the model file is not here yet and the spec gives no sha256",
                self.model_unknown
            )?;
        }
        Ok(())
    }
}
