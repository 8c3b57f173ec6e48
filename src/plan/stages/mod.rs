//! The kinds of stage, one module each: what its stages are in a plan (ids, items, how
//! many are cached, the stages whose outputs they read) and why their items miss the
//! caches. `pipeline plan` lists them, `plan --dot` draws them, the `dag` module checks them,
//! and the scheduler runs the ones that compute. A new kind is a module here and one line
//! in [`KINDS`].

mod calibrate;
mod cascade;
mod embed;
mod ensemble;
mod infer;
mod load;
mod neighbours;
mod render;
mod summary;

use serde::Serialize;

use super::{Cell, Plan, Routing};
use crate::cache::Cache;
use crate::key::{Digest, KeyEncoder};
use crate::store::Store;

/// Every kind of stage, in the order their stages run.
const KINDS: &[&dyn Kind] = &[
    &load::Load,
    &embed::Embed,
    &neighbours::Neighbours,
    &render::Render,
    &infer::Infer,
    &calibrate::Calibrate,
    &cascade::Cascade,
    &ensemble::Ensemble,
    &summary::Summary,
];

/// A kind of stage.
trait Kind: Sync {
    /// Its stages in the plan, in the order they run.
    fn stages(&self, cx: &Context) -> Vec<StageStatus>;
    /// Why the items of `stage` (one of its stages) miss the caches, in words.
    fn why(&self, cx: &Context, stage: &StageStatus) -> Option<String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageKind {
    Load,
    Embed,
    Neighbours,
    Render,
    Infer,
    Calibrate,
    /// A cascade's routing step: which rows go on to its next stage.
    Route,
    /// A cascade: each row answered by the stage it reached.
    Cascade,
    /// An ensemble: each row's label probabilities averaged over its members.
    Ensemble,
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
    /// The content key of its output: a digest of its items' keys (every row, embedding,
    /// neighbour list or fit it stands for), so that equal keys mean equal outputs; `None`
    /// for a stage computed on every run, or while an item's key is not known yet.
    pub key: Option<String>,
}

impl StageStatus {
    fn new(id: String, kind: StageKind, items: usize, cached: usize, what: &'static str) -> Self {
        Self {
            id,
            kind,
            items,
            cached,
            what,
            inputs: Vec::new(),
            key: None,
        }
    }

    fn reading(self, inputs: Vec<String>) -> Self {
        Self { inputs, ..self }
    }

    /// Its content key: the digest of `items` (the keys of what it stands for, in a
    /// stable order), or none when one is not known.
    fn keyed(self, items: impl IntoIterator<Item = Option<Digest>>) -> Self {
        let mut e = KeyEncoder::new("stage");
        e.str("kind", &format!("{:?}", self.kind));
        for k in items {
            let Some(k) = k else {
                return Self { key: None, ..self };
            };
            e.digest("item", &k);
        }
        Self {
            key: Some(e.finish().hex()),
            ..self
        }
    }
}

/// The stage that reads, samples and cleans the dataset and the other row files.
pub const LOAD: &str = "load:rows";

/// What the kinds read: the plan, the caches, the routing known now.
struct Context<'a> {
    plan: &'a Plan,
    cache: &'a Cache,
    store: &'a Store,
    routing: &'a Routing,
    gates: Vec<Gate>,
}

/// A cascade stage cell that computes only the rows sent on to it, and the routing step
/// that sends them.
struct Gate {
    cell_id: String,
    route: String,
}

/// The routing step after stage `k` of cascade `name`.
fn route_id(name: &str, k: usize) -> String {
    format!("route:{name}/{k}")
}

impl<'a> Context<'a> {
    fn new(plan: &'a Plan, cache: &'a Cache, store: &'a Store, routing: &'a Routing) -> Self {
        let mut gates = Vec::new();
        for cp in &plan.cascades {
            let name = &plan.spec.cascades[cp.spec].id;
            // The evaluation rows' stages, then the fit rows' stages: stage k is sent its
            // rows by routing step k - 1.
            let stages = cp.stages.iter().map(|r| Some(plan.cell(*r)));
            let fits = cp.fit_stages.iter().map(|f| f.map(|i| &plan.support[i]));
            for (k, cell) in stages.enumerate().chain(fits.enumerate()) {
                if let Some(cell) = cell.filter(|c| c.gated && k > 0) {
                    gates.push(Gate {
                        cell_id: cell.id.clone(),
                        route: route_id(name, k - 1),
                    });
                }
            }
        }
        Self {
            plan,
            cache,
            store,
            routing,
            gates,
        }
    }

    /// The routing step a gated cell's rows come from.
    fn gate_of(&self, cell: &Cell) -> Option<&str> {
        self.gates
            .iter()
            .find(|g| g.cell_id == cell.id)
            .map(|g| g.route.as_str())
    }

    /// The infer stage that computes a model cell's rows: one per model, and one per model
    /// and routing step for a cascade stage that computes only the rows sent on to it.
    fn infer_id(&self, cell: &Cell) -> String {
        let model = &self.plan.models[cell.model().unwrap_or(0)].id;
        match self.gate_of(cell) {
            Some(route) => format!("infer:{model}@{route}"),
            None => format!("infer:{model}"),
        }
    }

    /// The calibrate stage of a reported calibrated cell.
    fn calibrate_id(&self, cell: &Cell) -> Option<String> {
        (cell.calibration.is_some() && self.plan.cells.iter().any(|r| r.id == cell.id))
            .then(|| format!("calibrate:{}", cell.id))
    }
}

/// Push `id` unless it is there already (inputs keep their first order).
fn add(inputs: &mut Vec<String>, id: String) {
    if !inputs.contains(&id) {
        inputs.push(id);
    }
}

impl Plan {
    /// The stages in the order they run, with their items, what is cached and their inputs.
    pub fn stages(&self, cache: &Cache, store: &Store, routing: &Routing) -> Vec<StageStatus> {
        let cx = Context::new(self, cache, store, routing);
        KINDS.iter().flat_map(|k| k.stages(&cx)).collect()
    }

    /// Why a stage's items miss the cache, in words.
    pub fn explain_stage(
        &self,
        id: &str,
        cache: &Cache,
        store: &Store,
        routing: &Routing,
    ) -> Option<String> {
        let cx = Context::new(self, cache, store, routing);
        let (kind, st) = KINDS.iter().find_map(|k| {
            k.stages(&cx)
                .into_iter()
                .find(|s| s.id == id)
                .map(|s| (k, s))
        })?;
        let why = kind.why(&cx, &st)?;
        Some(format!(
            "stage {id}: {} {}, {} cached\n  {why}\n",
            st.items, st.what, st.cached
        ))
    }
}
