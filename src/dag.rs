//! The plan's stages as one graph: each stage a node, an edge from every stage whose
//! output it reads. Built from the stage listing the plan gives (`Plan::stages`), checked
//! to be one acyclic, connected graph, and drawn for Graphviz (`plan --dot`, as
//! `dvc dag --dot`).

use petgraph::algo::{connected_components, toposort};
use petgraph::graph::{DiGraph, NodeIndex};

use crate::plan::StageStatus;

/// Why the stages do not form one DAG (a bug in the planner, never bad input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DagError {
    #[error("stage `{stage}` reads `{input}`, which is not a stage of the plan")]
    UnknownInput { stage: String, input: String },
    #[error("the stages form a cycle through `{0}`")]
    Cycle(String),
    #[error("the stages form {0} separate graphs, not one")]
    Disconnected(usize),
    #[error("two stages are named `{0}`")]
    Duplicate(String),
}

/// The stages of a plan and what each reads.
pub struct Dag {
    graph: DiGraph<StageStatus, ()>,
}

impl Dag {
    pub fn new(stages: Vec<StageStatus>) -> Result<Self, DagError> {
        let mut graph = DiGraph::new();
        let mut index: std::collections::HashMap<String, NodeIndex> = Default::default();
        for s in stages {
            let id = s.id.clone();
            let n = graph.add_node(s);
            if index.insert(id.clone(), n).is_some() {
                return Err(DagError::Duplicate(id));
            }
        }
        for n in graph.node_indices().collect::<Vec<_>>() {
            for input in graph[n].inputs.clone() {
                let Some(&from) = index.get(&input) else {
                    return Err(DagError::UnknownInput {
                        stage: graph[n].id.clone(),
                        input,
                    });
                };
                graph.add_edge(from, n, ());
            }
        }
        let dag = Dag { graph };
        dag.order()?;
        match connected_components(&dag.graph) {
            0 | 1 => Ok(dag),
            n => Err(DagError::Disconnected(n)),
        }
    }

    /// The stages in an order where every stage comes after the stages it reads.
    pub fn order(&self) -> Result<Vec<&StageStatus>, DagError> {
        toposort(&self.graph, None)
            .map(|o| o.into_iter().map(|n| &self.graph[n]).collect())
            .map_err(|c| DagError::Cycle(self.graph[c.node_id()].id.clone()))
    }

    pub fn stages(&self) -> impl Iterator<Item = &StageStatus> {
        self.graph.node_weights()
    }

    /// The graph in Graphviz's DOT language: one box per stage with its items and how many
    /// are cached, an arrow from each input.
    pub fn dot(&self) -> String {
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::from(
            "digraph pipeline {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
        );
        for s in self.graph.node_weights() {
            let label = format!("{}\n{} of {} cached", s.id, s.cached, s.items);
            out.push_str(&format!("  {} [label={}];\n", quote(&s.id), quote(&label)));
        }
        for e in self.graph.edge_indices() {
            let (a, b) = self.graph.edge_endpoints(e).expect("an edge of this graph");
            out.push_str(&format!(
                "  {} -> {};\n",
                quote(&self.graph[a].id),
                quote(&self.graph[b].id)
            ));
        }
        out.push_str("}\n");
        out
    }
}
