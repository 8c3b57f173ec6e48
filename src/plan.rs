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
use crate::model::{ResolvedModel, Resolver};
use crate::prompt::{Messages, Prompts};
use crate::spec::{MethodKind, SamplerPoint, Spec};

/// A model as far as the plan knows it.
#[derive(Debug, Clone)]
pub struct PlannedModel {
    pub id: String,
    /// The file, when it is on this machine.
    pub resolved: Option<ResolvedModel>,
    /// sha256 of the file (from the file, or from the spec when the file is not here yet).
    pub sha256: Option<String>,
}

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
    pub models: Vec<PlannedModel>,
    pub engine_version: String,
    /// Rendered messages, `[prompt][row]`, with the full (untruncated) text.
    pub messages: Vec<Vec<Messages>>,
    pub cells: Vec<Cell>,
}

/// How to build a plan.
pub struct PlanOptions<'a> {
    pub resolver: &'a Resolver,
    pub engine_version: String,
    /// Download missing hub models (run) or leave them unresolved (plan).
    pub fetch_models: bool,
    /// Keep only the first N sampled rows.
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CellStatus {
    pub rows: usize,
    pub cached: usize,
}

impl CellStatus {
    pub fn to_run(&self) -> usize {
        self.rows - self.cached
    }
}

pub fn build(spec: Spec, opts: &PlanOptions) -> Result<Plan, Diagnostic> {
    let mut dataset = dataset::load(&spec.dataset)?;
    if let Some(n) = opts.limit {
        dataset.rows.truncate(n);
    }
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
    let prompts = Prompts::compile(&spec.prompts, &spec.dataset.labels, shots)?;
    let mut messages = Vec::with_capacity(prompts.len());
    for p in 0..prompts.len() {
        let rendered = dataset
            .rows
            .iter()
            .map(|r| prompts.render(p, &r.text))
            .collect::<Result<Vec<_>, _>>()?;
        messages.push(rendered);
    }
    let mut models = Vec::new();
    for m in &spec.models {
        // A local path must exist; a hub model may still be fetched later by `run`.
        let is_path = matches!(m.gguf.value, crate::spec::ModelSource::Path(_));
        let resolved = if opts.fetch_models || is_path || opts.resolver.locate(m)?.is_some() {
            Some(opts.resolver.resolve(m)?)
        } else {
            None
        };
        let sha256 = resolved
            .as_ref()
            .map(|r| r.sha256.clone())
            .or_else(|| m.sha256.as_ref().map(|s| s.value.clone()));
        models.push(PlannedModel {
            id: m.id.clone(),
            resolved,
            sha256,
        });
    }
    let label_names = dataset.label_names();
    let engine = EnginePart {
        version: &opts.engine_version,
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

impl Plan {
    pub fn status(&self, cache: &Cache) -> Vec<CellStatus> {
        self.cells
            .iter()
            .map(|c| CellStatus {
                rows: c.rows.len(),
                cached: c
                    .rows
                    .iter()
                    .filter(|r| r.is_some_and(|k| cache.get(&k.row_key()).is_some()))
                    .count(),
            })
            .collect()
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
