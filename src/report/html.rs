//! The report page: one HTML file rendered from a minijinja template with HTML
//! auto-escaping, the Vega libraries inlined so that it opens offline.

use minijinja::{Environment, Value};
use serde::Serialize;
use serde_json::Value as Json;

const TEMPLATE: &str = include_str!("templates/report.html");

const VEGA: &str = include_str!("../../vendor/vega/vega.min.js");
const VEGA_LITE: &str = include_str!("../../vendor/vega/vega-lite.min.js");
const VEGA_EMBED: &str = include_str!("../../vendor/vega/vega-embed.min.js");

const CDN: [&str; 3] = [
    "https://cdn.jsdelivr.net/npm/vega@5.33.1/build/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@4.17.0/build/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6.29.0/build/vega-embed.min.js",
];

/// How the page gets the Vega libraries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scripts {
    Inline,
    Cdn,
}

/// A table cell: plain text, unless it says otherwise. The template decides the markup.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum Cell {
    Text {
        v: String,
    },
    /// An identifier, shown as code.
    Code {
        v: String,
    },
    /// A cell's answer: right or wrong mark, the label (none: invalid), the raw text.
    Answer {
        mark: &'static str,
        label: Option<String>,
        raw: Option<String>,
    },
    /// A long text (a row's input), in a scrolling box.
    LongText {
        v: String,
    },
    /// The examples a row was shown, one line each.
    Shots {
        items: Vec<String>,
    },
}

impl Cell {
    pub fn text(v: impl Into<String>) -> Self {
        Cell::Text { v: v.into() }
    }

    pub fn code(v: impl Into<String>) -> Self {
        Cell::Code { v: v.into() }
    }
}

/// A table: header, rows of cells, and the columns aligned left. Every table on the page
/// sorts by any column; one whose rows name their cell's model, prompt and method
/// (`facets`) can also be filtered by them.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub head: Vec<String>,
    pub left: Vec<usize>,
    pub rows: Vec<Vec<Cell>>,
    /// Each row's model, prompt and method; empty: no filters.
    pub facets: Vec<Facets>,
}

/// What a row of a table of cells can be filtered by.
#[derive(Debug, Clone, Serialize)]
pub struct Facets {
    pub model: String,
    pub prompt: String,
    pub method: String,
}

impl Table {
    pub fn new(head: &[&str], left: &[usize], rows: Vec<Vec<Cell>>) -> Self {
        Self {
            head: head.iter().map(|h| h.to_string()).collect(),
            left: left.to_vec(),
            rows,
            facets: Vec::new(),
        }
    }
}

/// Everything the page shows, as plain data.
#[derive(Debug, Serialize)]
pub struct Page {
    pub title: String,
    pub subtitle: String,
    pub description: Option<String>,
    /// Sentences derived from the statistics by rules (`findings.rs`): the key ones shown
    /// first, the rest folded.
    pub key_findings: Vec<super::findings::Finding>,
    pub more_findings: Vec<super::findings::Finding>,
    /// Each model's best cell, with its honest estimate and cost.
    pub summary: Table,
    /// The heatmap of a large grid, by chart index.
    pub heatmap: Option<usize>,
    pub incomplete: usize,
    pub failed_total: usize,
    pub failed_kinds: Vec<KindCount>,
    pub failed: Table,
    /// Vega-Lite specs; sections refer to them by index.
    pub charts: Vec<Json>,
    pub charts_accuracy: Vec<usize>,
    pub charts_errors: Vec<usize>,
    pub metrics: Table,
    pub groups: Table,
    pub compare_from_spec: bool,
    pub resamples: usize,
    pub bootstrap_seed: u64,
    pub comparisons: Table,
    pub disagreements: Vec<Disagreement>,
    pub calibration: Table,
    /// Each probe's settings as cross-validated on its fit rows.
    pub probes: Table,
    /// Raw log-likelihood cells' length-normalised choices (labels of unequal length).
    pub normalised: Table,
    pub cascades: Table,
    /// One line per retrieval: what it searched, and what the leak guard left out.
    pub retrieval: Vec<String>,
    pub prov: Json,
    pub rows_total: usize,
    pub rows_from_cache: usize,
    pub run_wall: String,
    pub embed_rate: String,
    /// How the page's expected times were derived, and under what the wall-clock figures
    /// were measured.
    pub expected_note: String,
    pub wall_note: String,
}

#[derive(Debug, Serialize)]
pub struct KindCount {
    pub kind: crate::row::FailureKind,
    pub count: usize,
}

#[derive(Debug, Serialize)]
pub struct Disagreement {
    pub cell: String,
    pub reference: String,
    pub count: usize,
    pub table: Table,
}

/// The page as HTML.
pub fn render(page: &Page, scripts: Scripts) -> Result<String, minijinja::Error> {
    let mut env = Environment::new();
    // `.html` templates escape every value for HTML by default.
    env.add_template("report.html", TEMPLATE)?;
    // Vendored code and our own constant URLs: the only values marked safe.
    let safe = |items: &[&str]| -> Vec<Value> {
        items
            .iter()
            .map(|s| Value::from_safe_string(s.to_string()))
            .collect()
    };
    let (inline, cdn) = match scripts {
        Scripts::Inline => (safe(&[VEGA, VEGA_LITE, VEGA_EMBED]), Vec::new()),
        Scripts::Cdn => (Vec::new(), safe(&CDN)),
    };
    let ctx = minijinja::context! {
        inline_scripts => inline,
        cdn_scripts => cdn,
        ..Value::from(minijinja::value::Serde(page))
    };
    env.get_template("report.html")?.render(ctx)
}
