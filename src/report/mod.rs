//! Report outputs under `reports/<name>/`: `predictions.parquet`, `metrics.parquet`,
//! `run.json` (provenance and run counts) and `index.html`.

pub mod charts;
pub mod findings;
pub mod html;
pub mod tables;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::cache::Cache;
use crate::exec::ExecStats;
use crate::fs::write_atomic;
use crate::key::Digest;
use crate::metrics::{self, CellMetrics, Comparison, Failure, Prediction, SettingGroup};
use crate::plan::Decided;
use crate::plan::Plan;
use arrow::array::RecordBatch;
use html::{Cell, Disagreement, KindCount, Page, Scripts, Table};

/// Where the report files went.
pub struct Written {
    pub dir: PathBuf,
    pub index: PathBuf,
    pub predictions: PathBuf,
    pub metrics: PathBuf,
    /// What the report shows, for a summary on the terminal.
    pub analysis: Analysis,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode {what}: {message}")]
    Encode { what: &'static str, message: String },
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

/// Facts about the run and the machine, shown in the report and saved in `run.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub spec: String,
    pub spec_blake3: String,
    pub engine: String,
    pub threads: usize,
    pub machine: String,
    pub date_utc: String,
    pub models: Vec<ModelInfo>,
    pub dataset: String,
    pub dataset_rows: usize,
    pub sampled_rows: usize,
    pub run: Option<ExecStats>,
    /// When this report was rebuilt without a run (`pipeline report`): the last run's
    /// record from the report it replaced, with its date, so a rebuild keeps what the run
    /// measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run: Option<serde_json::Value>,
    /// How many of the report's rows each host and shard computed (filled in by [`write`]).
    pub computed_by: Vec<ComputedBy>,
    /// `run --until-resolved`: why the run stopped, and at how many rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequential: Option<crate::sequential::Sequential>,
}

/// The rows of a report that one host (and shard, in a split run) computed; rows cached
/// before origins were recorded have neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComputedBy {
    pub host: Option<String>,
    pub shard: Option<String>,
    pub rows: usize,
}

fn computed_by(preds: &[Prediction]) -> Vec<ComputedBy> {
    let mut counts: std::collections::BTreeMap<(Option<&str>, Option<&str>), usize> =
        Default::default();
    for p in preds {
        *counts
            .entry((p.host.as_deref(), p.shard.as_deref()))
            .or_default() += 1;
    }
    counts
        .into_iter()
        .map(|((host, shard), rows)| ComputedBy {
            host: host.map(str::to_string),
            shard: shard.map(str::to_string),
            rows,
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub id: String,
    pub file: String,
    pub sha256: String,
    pub size_bytes: u64,
    /// Its parameter count (GGUF header or spec): what turns tokens into compute.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub parameters: Option<u64>,
    /// The engine's rate for it on this machine, measured on a quiet machine
    /// (`engine-bench --save`): what turns compute into the expected times shown.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rate: Option<crate::rate::EngineRate>,
    /// A model behind a server: where, what it said it is, and why its rows are not
    /// bit-exact.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server: Option<ServedInfo>,
}

/// A served model as run.json records it (never its API key: only the variable's name).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ServedInfo {
    pub url: String,
    pub api: String,
    pub kind: String,
    pub model: String,
    pub build: Option<String>,
    pub model_file: Option<String>,
    pub bit_exact: bool,
    /// Why it is (not) bit-exact.
    pub exactness: String,
}

impl Provenance {
    pub fn new(plan: &Plan, threads: usize, run: Option<ExecStats>) -> Self {
        let spec_text = std::fs::read(&plan.spec.path).unwrap_or_default();
        Self {
            spec: shown_path(&plan.spec.path),
            spec_blake3: blake3::hash(&spec_text).to_hex().to_string(),
            engine: plan.engine_version.clone(),
            threads,
            machine: machine_description(),
            date_utc: utc_now(),
            models: plan
                .models
                .iter()
                .chain(&plan.embedders)
                .map(|m| ModelInfo {
                    id: m.id.clone(),
                    file: m
                        .file
                        .as_ref()
                        .map(|r| match &r.server {
                            Some(s) => format!(
                                "{} at {} (api {}; {})",
                                s.identity.model,
                                s.spec.url,
                                s.spec.api.as_str(),
                                if s.identity.bit_exact() {
                                    "bit-exact"
                                } else {
                                    "not bit-exact"
                                }
                            ),
                            None => {
                                let name = r.path.file_name().unwrap_or_default().to_string_lossy();
                                format!("{name} (found via {})", r.found_via)
                            }
                        })
                        .unwrap_or_default(),
                    sha256: m.sha256.clone().unwrap_or_default(),
                    size_bytes: m.file.as_ref().map_or(0, |r| r.size),
                    parameters: m.parameters,
                    rate: m.rate.clone(),
                    server: m
                        .file
                        .as_ref()
                        .and_then(|r| r.server.as_ref())
                        .map(|s| ServedInfo {
                            url: s.spec.url.clone(),
                            api: s.spec.api.as_str().into(),
                            kind: s.identity.kind.as_str().into(),
                            model: s.identity.model.clone(),
                            build: s.identity.build.clone(),
                            model_file: s.identity.model_file.clone(),
                            bit_exact: s.identity.bit_exact(),
                            exactness: s.identity.exactness(),
                        }),
                })
                .collect(),
            dataset: shown_path(&plan.spec.dataset.path.value),
            dataset_rows: plan.dataset.source_rows,
            sampled_rows: plan.dataset.rows.len(),
            run,
            last_run: None,
            computed_by: Vec::new(),
            sequential: None,
        }
    }

    /// Keep the record of the last run from the `run.json` this report replaces (a rebuild
    /// of the same spec without a run of its own).
    pub fn keep_last_run(&mut self, previous: &Path) {
        let Ok(bytes) = std::fs::read(previous) else {
            return;
        };
        let Ok(old) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return;
        };
        if old["spec"].as_str() != Some(self.spec.as_str()) {
            return;
        }
        self.last_run = if old["run"].is_object() {
            Some(serde_json::json!({"date_utc": old["date_utc"], "run": old["run"]}))
        } else if old["last_run"].is_object() {
            Some(old["last_run"].clone())
        } else {
            None
        };
    }
}

/// Everything the report shows, computed from the plan and the cache alone.
pub struct Analysis {
    /// What the statistics say, in sentences (rules in `findings.rs`).
    pub findings: Vec<findings::Finding>,
    /// Each model's best cell, with its honest estimate.
    pub best: Vec<findings::BestCell>,
    pub predictions: Vec<Prediction>,
    /// Rows whose last attempt failed.
    pub failures: Vec<Failure>,
    pub metrics: Vec<CellMetrics>,
    pub groups: Vec<SettingGroup>,
    pub comparisons: Vec<Comparison>,
}

pub fn analyse(
    plan: &Plan,
    decided: &Decided,
    cache: &Cache,
    computed: &HashSet<Digest>,
) -> Result<Analysis, crate::cache::CacheError> {
    analyse_while(plan, decided, cache, computed, |_| ()).map(|(a, ())| a)
}

/// [`analyse`], running `beside` on the predictions while the comparisons (paired
/// bootstraps, the longest part of a large study's analysis) are computed.
fn analyse_while<T: Send>(
    plan: &Plan,
    decided: &Decided,
    cache: &Cache,
    computed: &HashSet<Digest>,
    beside: impl FnOnce(&[Prediction]) -> T + Send,
) -> Result<(Analysis, T), crate::cache::CacheError> {
    let stages = cache.rows(crate::cascade::stage_keys(plan))?;
    let predictions = metrics::collect(plan, decided, cache, &stages, computed)?;
    let failures = metrics::collect_failures(plan, cache);
    let cell_metrics = metrics::compute(plan, decided, &stages, &predictions, &failures);
    let groups = metrics::setting_groups(plan, &predictions, &cell_metrics);
    let pairs = metrics::comparison_pairs(plan, &cell_metrics);
    let (comparisons, out) = std::thread::scope(|s| {
        let comparisons = s.spawn(|| metrics::compare(plan, &predictions, &pairs));
        let out = beside(&predictions);
        let comparisons = comparisons
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (comparisons, out)
    });
    let mut a = Analysis {
        findings: Vec::new(),
        best: Vec::new(),
        predictions,
        failures,
        metrics: cell_metrics,
        groups,
        comparisons,
    };
    let input = findings::Input::new(plan, &a);
    a.findings = findings::derive(&input);
    a.best = findings::best_cells(&input);
    Ok((a, out))
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, ReportError> {
    let path = dir.join(name);
    write_atomic(&path, bytes).map_err(|source| ReportError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

fn create_dir(dir: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Rows per batch of a table written to a file: a table is encoded a batch at a time,
/// never whole.
const TABLE_CHUNK_ROWS: usize = 65_536;

/// Write a table of `len` rows to `dir` as `NAME.EXT`, a chunk of rows at a time (an empty
/// table keeps its columns).
fn write_table(
    dir: &Path,
    format: tables::Format,
    name: &'static str,
    len: usize,
    chunk: &dyn Fn(std::ops::Range<usize>) -> Result<RecordBatch, crate::table::TableError>,
) -> Result<PathBuf, ReportError> {
    let starts: Vec<usize> = if len == 0 {
        vec![0]
    } else {
        (0..len).step_by(TABLE_CHUNK_ROWS).collect()
    };
    let batches = starts
        .into_iter()
        .map(|s| chunk(s..(s + TABLE_CHUNK_ROWS).min(len)));
    let path = dir.join(format!("{name}.{}", format.extension()));
    tables::write(&path, format, batches).map_err(|e| match e {
        tables::WriteError::Io(source) => ReportError::Io {
            path: path.clone(),
            source,
        },
        tables::WriteError::Source(e) | tables::WriteError::Table(e) => ReportError::Encode {
            what: name,
            message: e.to_string(),
        },
    })?;
    Ok(path)
}

fn write_predictions(
    plan: &Plan,
    preds: &[Prediction],
    dir: &Path,
    format: tables::Format,
) -> Result<PathBuf, ReportError> {
    write_table(dir, format, "predictions", preds.len(), &|r| {
        tables::predictions(plan, &preds[r])
    })
}

/// The tables but the predictions: metrics, comparisons, failures.
fn write_summary_tables(
    plan: &Plan,
    a: &Analysis,
    dir: &Path,
    format: tables::Format,
) -> Result<Vec<PathBuf>, ReportError> {
    let labels = plan.dataset.label_names();
    Ok(vec![
        write_table(dir, format, "metrics", a.metrics.len(), &|r| {
            tables::metrics(&a.metrics[r], &labels)
        })?,
        write_table(dir, format, "comparisons", a.comparisons.len(), &|r| {
            tables::comparisons(&a.comparisons[r])
        })?,
        write_table(dir, format, "failures", a.failures.len(), &|r| {
            tables::failures(plan, &a.failures[r])
        })?,
    ])
}

/// Build every report file from the plan and the cache alone.
pub fn write(
    plan: &Plan,
    decided: &Decided,
    cache: &Cache,
    computed: &HashSet<Digest>,
    provenance: &Provenance,
    reports_dir: &Path,
    scripts: Scripts,
) -> Result<Written, ReportError> {
    let dir = reports_dir.join(&plan.spec.name);
    create_dir(&dir)?;
    // The predictions table is written while the comparisons are computed.
    let (a, predictions) = analyse_while(plan, decided, cache, computed, |preds| {
        write_predictions(plan, preds, &dir, tables::Format::Parquet)
    })?;
    let mut paths = vec![predictions?];
    paths.extend(write_summary_tables(
        plan,
        &a,
        &dir,
        tables::Format::Parquet,
    )?);
    let provenance = &Provenance {
        computed_by: computed_by(&a.predictions),
        ..provenance.clone()
    };
    let run_json = serde_json::to_vec_pretty(provenance).map_err(|e| ReportError::Encode {
        what: "run.json",
        message: e.to_string(),
    })?;
    put(&dir, "run.json", &run_json)?;
    put(
        &dir,
        "findings.md",
        findings::markdown(&a.findings).as_bytes(),
    )?;
    let page = render_page(plan, &a, provenance, scripts)?;
    let index = put(&dir, "index.html", page.as_bytes())?;
    Ok(Written {
        dir,
        index,
        predictions: paths[0].clone(),
        metrics: paths[1].clone(),
        analysis: a,
    })
}

/// `predictions.csv`, `metrics.csv` and `comparisons.csv` into `dir`.
pub fn export_csv(
    plan: &Plan,
    decided: &Decided,
    cache: &Cache,
    dir: &Path,
) -> Result<Vec<PathBuf>, ReportError> {
    create_dir(dir)?;
    let a = analyse(plan, decided, cache, &HashSet::new())?;
    let mut paths = vec![write_predictions(
        plan,
        &a.predictions,
        dir,
        tables::Format::Csv,
    )?];
    paths.extend(write_summary_tables(plan, &a, dir, tables::Format::Csv)?);
    Ok(paths)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn opt3(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into())
}

fn chart(charts: &mut Vec<serde_json::Value>, v: vega_lite_4::Vegalite) -> usize {
    chart_json(charts, serde_json::to_value(v).expect("charts serialize"))
}

/// Add a chart, its labels never cut short; its index on the page.
fn chart_json(charts: &mut Vec<serde_json::Value>, v: serde_json::Value) -> usize {
    charts.push(charts::with_full_labels(v));
    charts.len() - 1
}

fn p_value(p: f64) -> String {
    if p < 0.001 {
        "<0.001".into()
    } else {
        format!("{p:.3}")
    }
}

/// Failed rows shown on the page; `failures.parquet` has them all.
const FAILURES_SHOWN: usize = 50;

/// Disagreeing rows shown per comparison.
const DISAGREEMENTS_SHOWN: usize = 25;

fn render_page(
    plan: &Plan,
    a: &Analysis,
    prov: &Provenance,
    scripts: Scripts,
) -> Result<String, ReportError> {
    let m = &a.metrics;
    let labels = plan.dataset.label_names();
    let title = plan
        .spec
        .report
        .title
        .clone()
        .unwrap_or_else(|| format!("pipeline report: {}", plan.spec.name));
    let subtitle = format!(
        "{} rows of {} · {} cells · {} · generated {}",
        prov.sampled_rows,
        prov.dataset,
        plan.cells.len(),
        prov.engine,
        prov.date_utc
    );
    let mut charts = Vec::new();
    let mut charts_accuracy = vec![chart(&mut charts, charts::accuracy(m))];
    if let Some(c) = charts::accuracy_vs_temperature(m) {
        charts_accuracy.push(chart(&mut charts, c));
    }
    charts_accuracy.push(chart(&mut charts, charts::cost_quality(m)));
    if let Some(c) = charts::cascade_frontier(m) {
        charts_accuracy.push(chart_json(&mut charts, c));
    }
    let heatmap = charts::heatmap(m).map(|c| chart_json(&mut charts, c));
    let gold = gold_shares(plan);
    let mut charts_errors = vec![chart_json(
        &mut charts,
        charts::label_shares(m, &labels, &gold),
    )];
    charts_errors.push(chart(&mut charts, charts::confusion(m, &labels)));
    if let Some(c) = charts::calibration(m) {
        charts_errors.push(chart(&mut charts, c));
    }
    if let Some(c) = charts::calibration_shift(m) {
        charts_errors.push(chart_json(&mut charts, c));
    }
    let mut kinds: Vec<KindCount> = Vec::new();
    for f in &a.failures {
        match kinds.iter_mut().find(|k| k.kind == f.kind) {
            Some(k) => k.count += 1,
            None => kinds.push(KindCount {
                kind: f.kind,
                count: 1,
            }),
        }
    }
    let from_cache = a.predictions.iter().filter(|x| x.from_cache).count();
    let key = findings::key(&a.findings);
    let (key_findings, more_findings): (Vec<_>, Vec<_>) = a
        .findings
        .iter()
        .enumerate()
        .partition(|(i, _)| key.contains(i));
    let unindexed = |v: Vec<(usize, &findings::Finding)>| -> Vec<findings::Finding> {
        v.into_iter().map(|(_, f)| f.clone()).collect()
    };
    let page = Page {
        title,
        subtitle,
        description: plan.spec.description.clone(),
        key_findings: unindexed(key_findings),
        more_findings: unindexed(more_findings),
        summary: summary_table(&a.best),
        heatmap,
        incomplete: m.iter().filter(|c| c.n < c.planned).count(),
        failed_total: a.failures.len(),
        failed_kinds: kinds,
        failed: failures_table(plan, a),
        charts,
        charts_accuracy,
        charts_errors,
        // Reference answers have one gold class (`correct`): per-class figures say nothing
        // that accuracy does not.
        metrics: metrics_table(
            m,
            if plan.spec.dataset.shape() == crate::spec::TaskShape::Reference {
                &[]
            } else {
                &labels
            },
        ),
        groups: groups_table(a),
        compare_from_spec: plan.spec.compare.baseline.is_some()
            || !plan.spec.compare.pairs.is_empty(),
        resamples: plan.spec.compare.resamples,
        bootstrap_seed: plan.spec.compare.seed,
        comparisons: comparisons_table(a),
        disagreements: disagreements(plan, a),
        calibration: calibration_table(plan, m),
        probes: probes_table(m),
        normalised: normalised_table(m, &labels),
        cascades: cascades_table(m),
        retrieval: retrieval_notes(plan),
        prov: provenance_json(prov),
        rows_total: a.predictions.len(),
        rows_from_cache: from_cache,
        run_wall: prov
            .run
            .as_ref()
            .map(|r| format!("{:.1}", r.wall_s))
            .unwrap_or_default(),
        embed_rate: prov
            .run
            .as_ref()
            .map(|r| format!("{:.1}", r.embed.texts_per_s))
            .unwrap_or_default(),
        expected_note: expected_note(prov),
        wall_note: wall_note(prov, a.predictions.len() - from_cache, from_cache),
    };
    html::render(&page, scripts).map_err(|e| ReportError::Encode {
        what: "index.html",
        message: format!("{e:#}"),
    })
}

fn metrics_table(m: &[CellMetrics], labels: &[String]) -> Table {
    let mut head: Vec<String> = [
        "cell", "n", "accuracy", "95% CI", "macro-F1", "invalid", "failed",
    ]
    .map(String::from)
    .to_vec();
    for l in labels {
        head.push(format!("P {l}"));
        head.push(format!("R {l}"));
        head.push(format!("F1 {l}"));
    }
    head.extend(
        [
            "AUC",
            "Brier",
            "ECE",
            "GFLOP/row",
            "tokens/row",
            "expected s/row",
            "rows/s (wall)",
            "p50 ms",
            "p95 ms",
            "prompt tok/s",
            "gen tok/s",
            "cached",
            "computed",
        ]
        .map(String::from),
    );
    let rows = m
        .iter()
        .map(|c| {
            let mut r = vec![
                Cell::code(&c.cell),
                Cell::text(format!("{}/{}", c.n, c.planned)),
                Cell::text(pct(c.accuracy)),
                Cell::text(format!("{}–{}", pct(c.accuracy_lo), pct(c.accuracy_hi))),
                Cell::text(format!("{:.3}", c.macro_f1)),
                Cell::text(c.invalid.to_string()),
                Cell::text(c.failed.to_string()),
            ];
            for cl in c.classes.iter().take(labels.len()) {
                r.push(Cell::text(format!("{:.3}", cl.precision)));
                r.push(Cell::text(format!("{:.3}", cl.recall)));
                r.push(Cell::text(format!("{:.3}", cl.f1)));
            }
            r.extend(
                [
                    opt3(c.roc_auc),
                    opt3(c.brier),
                    opt3(c.ece),
                    c.work
                        .and_then(|w| w.gflop())
                        .map_or("–".into(), crate::cost::significant),
                    c.work.map_or("–".into(), |w| format!("{:.0}", w.tokens())),
                    c.work
                        .and_then(|w| w.expected_s)
                        .map_or("–".into(), |s| format!("{s:.3}")),
                    c.rows_per_s_text(3),
                    format!("{:.0}", c.latency_p50_ms),
                    format!("{:.0}", c.latency_p95_ms),
                    format!("{:.1}", c.prompt_tokens_per_s),
                    format!("{:.1}", c.gen_tokens_per_s),
                    c.cached.to_string(),
                    c.computed.to_string(),
                ]
                .map(Cell::text),
            );
            r
        })
        .collect();
    Table {
        head,
        left: vec![0],
        rows,
        facets: m
            .iter()
            .map(|c| html::Facets {
                model: c.model.clone(),
                prompt: c.prompt.clone(),
                method: c.method.clone(),
            })
            .collect(),
    }
}

/// Each model's best cell: picked after the run, so beside it the honest estimate.
fn summary_table(best: &[findings::BestCell]) -> Table {
    let rows = best
        .iter()
        .map(|b| {
            vec![
                Cell::code(&b.model),
                Cell::code(&b.cell),
                Cell::text(format!("{} (best of {})", pct(b.accuracy), b.of)),
                Cell::text(b.honest.map_or("–".into(), pct)),
                Cell::text(b.work.map_or("–".into(), |w| crate::cost::describe(&w))),
            ]
        })
        .collect();
    Table::new(
        &["model", "best cell", "accuracy", "honest estimate", "cost"],
        &[0, 1],
        rows,
    )
}

fn groups_table(a: &Analysis) -> Table {
    let rows = a
        .groups
        .iter()
        .map(|g| {
            vec![
                Cell::code(&g.setting),
                Cell::text(g.runs.to_string()),
                Cell::text(pct(g.mean_accuracy)),
                Cell::text(format!("{:.1} pt", 100.0 * g.std_accuracy)),
                Cell::text(format!(
                    "{} ({} rows)",
                    pct(g.majority_accuracy),
                    g.majority_rows
                )),
            ]
        })
        .collect();
    Table::new(
        &[
            "setting",
            "runs",
            "mean accuracy",
            "std (n-1)",
            "majority-vote accuracy",
        ],
        &[0],
        rows,
    )
}

fn comparisons_table(a: &Analysis) -> Table {
    let rows = a
        .comparisons
        .iter()
        .map(|c| {
            vec![
                Cell::code(&c.cell),
                Cell::code(&c.reference),
                Cell::text(c.n.to_string()),
                Cell::text(format!("{:+.1} pt", 100.0 * c.difference)),
                Cell::text(format!(
                    "{:+.1} to {:+.1} pt",
                    100.0 * c.ci_lo,
                    100.0 * c.ci_hi
                )),
                Cell::text(format!("{} / {}", c.cell_only, c.reference_only)),
                Cell::text(p_value(c.p_value)),
                Cell::text(p_value(c.holm_p)),
            ]
        })
        .collect();
    Table::new(
        &[
            "cell",
            "reference",
            "rows",
            "difference",
            "95% CI",
            "discordant",
            "McNemar p",
            "Holm p",
        ],
        &[0, 1],
        rows,
    )
}

fn failures_table(plan: &Plan, a: &Analysis) -> Table {
    let rows = a
        .failures
        .iter()
        .take(FAILURES_SHOWN)
        .map(|f| {
            vec![
                Cell::code(&plan.cells[f.cell].id),
                Cell::code(&plan.dataset.rows[f.row].id),
                Cell::code(f.kind.as_str()),
                Cell::text(&f.message),
            ]
        })
        .collect();
    Table::new(&["cell", "row", "kind", "error"], &[0, 1, 2, 3], rows)
}

/// Share of the evaluation rows of each gold label (and 0 invalid).
fn gold_shares(plan: &Plan) -> Vec<f64> {
    let k = plan.dataset.labels.len();
    let n = plan.dataset.rows.len().max(1) as f64;
    let mut out = vec![0.0; k + 1];
    for r in &plan.dataset.rows {
        out[r.label] += 1.0 / n;
    }
    out
}

/// Log-probs as probabilities to two places, space-separated.
fn probabilities(log_p: &[f64]) -> String {
    log_p
        .iter()
        .map(|l| format!("{:.2}", l.exp()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Calibrated cells: what they were fitted on, and accuracy and ECE before and after.
fn calibration_table(plan: &Plan, m: &[CellMetrics]) -> Table {
    let rows = m
        .iter()
        .zip(&plan.cells)
        .filter_map(|(c, cell)| {
            let info = c.calibration.as_ref()?;
            let set = &plan.sets[plan.support[plan.calibrations[cell.calibration?].support].set];
            let params = match &info.params {
                Some(crate::calibrate::Params::Fit {
                    bias, temperature, ..
                }) => format!(
                    "bias {}; temperature {temperature:.2}",
                    bias.iter()
                        .map(|b| format!("{b:+.2}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                Some(crate::calibrate::Params::ContentFree { log_p }) => {
                    format!("content-free label probabilities {}", probabilities(log_p))
                }
                Some(crate::calibrate::Params::Probe(p)) => format!(
                    "{} at C = {} (cross-validated accuracy {} on the fit rows, among {} settings)",
                    p.chosen.name,
                    p.c,
                    pct(p.cv_accuracy),
                    p.trials.len()
                ),
                Some(crate::calibrate::Params::Batch { mean_log_p, .. }) => format!(
                    "mean label probabilities (geometric) over its own rows {}",
                    probabilities(mean_log_p)
                ),
                None => format!(
                    "not fitted yet: {}",
                    info.pending.clone().unwrap_or_default()
                ),
            };
            let before = c.uncalibrated.as_ref();
            Some(vec![
                Cell::code(&c.cell),
                Cell::text(info.kind.to_string()),
                Cell::text(format!("{} ({} rows)", set.name, set.rows.len())),
                Cell::text(
                    before
                        .map(|u| pct(u.accuracy))
                        .unwrap_or_else(|| "–".into()),
                ),
                Cell::text(pct(c.accuracy)),
                Cell::text(opt3(before.and_then(|u| u.ece))),
                Cell::text(opt3(c.ece)),
                Cell::text(params),
            ])
        })
        .collect();
    Table::new(
        &[
            "cell",
            "calibration",
            "fitted on",
            "accuracy before",
            "after",
            "ECE before",
            "after",
            "parameters",
        ],
        &[0, 1, 2, 7],
        rows,
    )
}

/// Each probe's candidate settings (layer and pooling), each at its best `C`, by their
/// cross-validated accuracy on the fit rows; the chosen one marked.
fn probes_table(m: &[CellMetrics]) -> Table {
    let mut rows = Vec::new();
    for c in m {
        let Some(crate::calibrate::Params::Probe(p)) =
            c.calibration.as_ref().and_then(|i| i.params.as_ref())
        else {
            continue;
        };
        let mut names: Vec<&str> = Vec::new();
        for t in &p.trials {
            if !names.contains(&t.candidate.as_str()) {
                names.push(&t.candidate);
            }
        }
        for name in names {
            let Some(best) = p
                .trials
                .iter()
                .filter(|t| t.candidate == name)
                .max_by(|a, b| {
                    a.accuracy
                        .total_cmp(&b.accuracy)
                        .then(b.log_loss.total_cmp(&a.log_loss))
                })
            else {
                continue;
            };
            rows.push(vec![
                Cell::code(&c.cell),
                Cell::text(name),
                Cell::text(best.c.to_string()),
                Cell::text(pct(best.accuracy)),
                Cell::text(format!("{:.3}", best.log_loss)),
                Cell::text(if name == p.chosen.name { "chosen" } else { "" }),
            ]);
        }
    }
    Table::new(
        &[
            "cell",
            "setting",
            "best C",
            "CV accuracy (fit rows)",
            "CV log-loss",
            "",
        ],
        &[0, 1],
        rows,
    )
}

/// Raw log-likelihood cells' length-normalised accuracies, where the labels differ in
/// length (in bytes, or in tokens for some cell).
fn normalised_table(m: &[CellMetrics], labels: &[String]) -> Table {
    let unequal_bytes = labels
        .first()
        .is_some_and(|first| labels.iter().any(|l| l.len() != first.len()));
    let moved = |c: &CellMetrics| {
        c.length_normalised
            .is_some_and(|n| n.per_token.is_some_and(|t| t != c.accuracy))
    };
    if !unequal_bytes && !m.iter().any(moved) {
        return Table::new(&[], &[], Vec::new());
    }
    let rows = m
        .iter()
        .filter_map(|c| {
            let n = c.length_normalised?;
            Some(vec![
                Cell::code(&c.cell),
                Cell::text(pct(c.accuracy)),
                Cell::text(n.per_token.map_or("–".into(), pct)),
                Cell::text(n.per_byte.map_or("–".into(), pct)),
            ])
        })
        .collect();
    Table::new(
        &["cell", "accuracy", "per token", "per byte (acc_norm)"],
        &[0],
        rows,
    )
}

/// Each cascade beside its first and last stage alone, on the rows it answered.
fn cascades_table(m: &[CellMetrics]) -> Table {
    let ratio = |r: Option<f64>| r.map_or("–".into(), |r| format!("{r:.2}×"));
    let rows = m
        .iter()
        .filter_map(|c| {
            let s = c.cascade.as_ref()?;
            let steps: Vec<String> = s
                .thresholds
                .iter()
                .enumerate()
                .map(|(k, t)| {
                    let went = s.reached.get(k + 1).copied().unwrap_or(0);
                    let rule = match (t, s.fit_rows[k]) {
                        (Some(t), Some(n)) => format!("margin < {t:.3} (fitted on {n} rows)"),
                        (Some(t), None) => format!("margin < {t:.3}"),
                        (None, _) => "not fitted yet".into(),
                    };
                    format!(
                        "{rule}: {went} of {} rows ({}) on to {}",
                        s.reached[k],
                        pct(went as f64 / s.reached[k].max(1) as f64),
                        s.stages[k + 1]
                    )
                })
                .collect();
            let alone = |a: &crate::cascade::Alone| {
                let acc = a.accuracy.map_or("–".into(), pct);
                let est = if a.estimated { ", estimated" } else { "" };
                format!(
                    "{acc}, {} ({:.2} s wall-clock){est}",
                    crate::cost::describe(&a.work),
                    a.seconds_per_row
                )
            };
            Some(vec![
                Cell::code(&c.cell),
                Cell::text(steps.join("; ")),
                Cell::text(format!("{} ({} rows)", pct(c.accuracy), c.n)),
                Cell::text(format!(
                    "{} ({:.2} s wall-clock)",
                    crate::cost::describe(&s.work),
                    c.compute_s / c.n.max(1) as f64
                )),
                Cell::text(alone(&s.first)),
                Cell::text(alone(&s.last)),
                Cell::text(ratio(s.compute_vs_first)),
                Cell::text(ratio(s.compute_vs_last)),
                Cell::text(ratio(s.time_vs_first)),
                Cell::text(ratio(s.time_vs_last)),
                Cell::text(ratio(s.tokens_vs_first)),
                Cell::text(ratio(s.tokens_vs_last)),
            ])
        })
        .collect();
    Table::new(
        &[
            "cascade",
            "steps",
            "accuracy",
            "cost",
            "first alone",
            "last alone",
            "compute vs first",
            "vs last",
            "wall-clock vs first",
            "vs last",
            "prompt tokens vs first",
            "vs last",
        ],
        &[0, 1],
        rows,
    )
}

/// What each retrieval searched and what its leak guard left out.
fn retrieval_notes(plan: &Plan) -> Vec<String> {
    plan.retrievals
        .iter()
        .map(|r| {
            let (queries, with, excluded) = r.leaks();
            let pool = &plan.pools[r.pool];
            format!(
                "{}: the {}{} nearest of {} pool rows by {} embeddings, exact cosine search; {queries} queries, the leak guard left out {excluded} pool rows (same id or text as the query) for {with} of them.",
                r.id,
                r.search.k,
                if r.search.per_label.is_some() { " (per label)" } else { "" },
                pool.rows.len(),
                plan.embedders[pool.embedder].id
            )
        })
        .collect()
}

/// The examples a row was shown in a cell, if the cell's prompt retrieves them.
fn shown(plan: &Plan, cell: usize, row: usize) -> Option<Cell> {
    let c = &plan.cells[cell];
    let s = plan.sets[0].shots.get(c.prompt()?)?[row].as_ref()?;
    Some(Cell::Shots {
        items: s
            .ids
            .iter()
            .zip(&s.similarity)
            .zip(&s.examples)
            .map(|((id, sim), ex)| format!("{id} ({sim:.2}, {}): {}", ex.label, snippet(&ex.text)))
            .collect(),
    })
}

fn snippet(t: &str) -> String {
    let s: String = t.chars().take(90).collect();
    if s.len() < t.len() {
        format!("{s}…")
    } else {
        s
    }
}

/// Rows on which the compared cells give different answers, with the text and both answers.
fn disagreements(plan: &Plan, a: &Analysis) -> Vec<Disagreement> {
    // Each cell's prediction of each row: a pointer a row, not a hash map entry.
    let n = plan.dataset.rows.len();
    let mut by_cell: Vec<Vec<Option<&Prediction>>> = vec![Vec::new(); plan.cells.len()];
    for p in &a.predictions {
        let rows = &mut by_cell[p.cell];
        if rows.is_empty() {
            rows.resize(n, None);
        }
        if let Some(slot) = rows.get_mut(p.row) {
            *slot = Some(p);
        }
    }
    let get = |c: usize, r: usize| by_cell[c].get(r).copied().flatten();
    let answer = |p: &Prediction| Cell::Answer {
        mark: if p.correct() { "✓" } else { "✗" },
        label: p.predicted.map(|i| plan.dataset.answer(p.row, i)),
        raw: p.raw.as_ref().map(|r| r.trim().to_string()),
    };
    let mut out = Vec::new();
    for c in &a.comparisons {
        let (Some(ci), Some(ri)) = (plan.cell_by_id(&c.cell), plan.cell_by_id(&c.reference)) else {
            continue;
        };
        let rows: Vec<(usize, &Prediction, &Prediction)> = (0..plan.dataset.rows.len())
            .filter_map(|r| {
                let x = get(ci, r)?;
                let y = get(ri, r)?;
                (x.predicted != y.predicted).then_some((r, x, y))
            })
            .collect();
        let with_shots = [ci, ri].iter().any(|&c| {
            plan.cells[c]
                .prompt()
                .is_some_and(|p| plan.prompts.per_row(p).is_some())
        });
        let table_rows = rows
            .iter()
            .take(DISAGREEMENTS_SHOWN)
            .map(|(r, x, y)| {
                let row = &plan.dataset.rows[*r];
                let mut cells = vec![
                    Cell::code(&row.id),
                    Cell::text(plan.dataset.gold(*r)),
                    answer(x),
                    answer(y),
                    Cell::LongText {
                        v: row.text.clone(),
                    },
                ];
                if with_shots {
                    for c in [ci, ri] {
                        cells.push(shown(plan, c, *r).unwrap_or_else(|| Cell::text("–")));
                    }
                }
                cells
            })
            .collect();
        let gold = match plan.spec.dataset.shape() {
            crate::spec::TaskShape::Reference => "reference answer",
            _ => "gold",
        };
        let mut head = vec!["row", gold, "cell", "reference", "text"];
        if with_shots {
            head.extend(["examples shown (cell)", "examples shown (reference)"]);
        }
        out.push(Disagreement {
            cell: c.cell.clone(),
            reference: c.reference.clone(),
            count: rows.len(),
            table: Table::new(&head, &[0, 1, 2, 3, 4, 5, 6], table_rows),
        });
    }
    out
}

/// Where the expected times come from: each model's engine rate, as measured.
fn expected_note(p: &Provenance) -> String {
    let rated: Vec<String> = p
        .models
        .iter()
        .filter_map(|m| {
            let r = m.rate.as_ref()?;
            Some(format!(
                "{} {:.0} prompt / {:.1} generated tokens a second ({} threads, {}, {}{})",
                m.id,
                r.prompt_tok_s,
                r.gen_tok_s,
                r.threads,
                r.machine,
                r.date_utc,
                r.cpu_share
                    .map(|s| format!(", {:.0}% CPU share", 100.0 * s))
                    .unwrap_or_default()
            ))
        })
        .collect();
    if rated.is_empty() {
        "No engine rate has been measured for these models here (`pipeline engine-bench MODEL --save` on a quiet machine), so no expected time is shown.".into()
    } else {
        format!(
            "Expected times are that work at the engine's rates measured on a quiet machine: {}.",
            rated.join("; ")
        )
    }
}

/// What the wall-clock figures were measured under: which hosts computed the rows, how
/// much of its threads' time the run that computed them got, and whether they mix runs.
fn wall_note(p: &Provenance, computed_now: usize, from_cache: usize) -> String {
    let hosts: Vec<String> = p
        .computed_by
        .iter()
        .map(|c| {
            let who = match (&c.host, &c.shard) {
                (Some(h), Some(s)) => format!("{h} (shard {s})"),
                (Some(h), None) => h.clone(),
                _ => "an unrecorded host".into(),
            };
            format!("{who}: {} rows", c.rows)
        })
        .collect();
    let share = |run: &serde_json::Value| run["cpu_share"].as_f64();
    let load = match (&p.run, &p.last_run) {
        (Some(r), _) if r.computed_rows > 0 => r.cpu_share.map(|s| {
            format!(
                "the run that wrote this report got {:.0}% of its {} threads' time while it computed",
                100.0 * s,
                p.threads
            )
        }),
        (_, Some(last)) => share(&last["run"]).map(|s| {
            format!(
                "the last run got {:.0}% of its threads' time while it computed",
                100.0 * s
            )
        }),
        _ => None,
    };
    let mixed = if computed_now > 0 && from_cache > 0 {
        format!(
            " They mix runs: {computed_now} rows were timed by the run that wrote this report, {from_cache} by earlier runs, whose loads may differ."
        )
    } else {
        String::new()
    };
    format!(
        "Wall-clock figures (rows/s, p50/p95 ms, \"wall-clock\") are the times the rows took when they were computed, on {} ({}); {}.{mixed} They move with the machine and its load; the compute figures do not.",
        p.machine,
        if hosts.is_empty() {
            "no rows yet".into()
        } else {
            hosts.join(", ")
        },
        load.unwrap_or_else(|| "the load they were measured under was not recorded".into())
    )
}

/// Provenance as the page shows it (sizes in MB).
fn provenance_json(p: &Provenance) -> serde_json::Value {
    let mut v = serde_json::to_value(p).expect("provenance serializes");
    if let Some(models) = v["models"].as_array_mut() {
        for (m, info) in models.iter_mut().zip(&p.models) {
            m["size_mb"] = format!("{:.1}", info.size_bytes as f64 / 1e6).into();
        }
    }
    v
}

/// A path relative to the current folder when it lies inside it, so that published reports
/// do not carry one machine's absolute paths.
fn shown_path(p: &Path) -> String {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    std::env::current_dir()
        .ok()
        .and_then(|cwd| abs.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or(abs)
        .display()
        .to_string()
}

pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!(
        "{} · {} logical / {} physical cores · {}",
        cpu,
        num_cpus::get(),
        num_cpus::get_physical(),
        std::env::consts::OS
    )
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_utc(secs)
}

fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formatting_matches_known_dates() {
        assert_eq!(super::format_utc(0), "1970-01-01 00:00:00");
        // `date -u -d @1795526233` = 2026-11-24 13:17:13
        assert_eq!(super::format_utc(1_795_526_233), "2026-11-24 13:17:13");
        assert_eq!(super::format_utc(951_782_400), "2000-02-29 00:00:00");
    }
}
