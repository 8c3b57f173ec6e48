//! Report outputs under `reports/<name>/`: `predictions.parquet`, `metrics.parquet`,
//! `run.json` (provenance and run counts) and `index.html`.

pub mod charts;
pub mod html;
pub mod tables;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::cache::{Cache, write_atomic};
use crate::exec::ExecStats;
use crate::key::Digest;
use crate::metrics::{self, CellMetrics, Comparison, Prediction, SettingGroup};
use crate::plan::Plan;
use arrow::array::RecordBatch;
use html::{Block, Scripts, Section, escape};

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
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub id: String,
    pub file: String,
    pub sha256: String,
    pub size_bytes: u64,
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
                .map(|m| ModelInfo {
                    id: m.id.clone(),
                    file: m
                        .resolved
                        .as_ref()
                        .map(|r| {
                            let name = r.path.file_name().unwrap_or_default().to_string_lossy();
                            format!("{name} (found via {})", r.found_via)
                        })
                        .unwrap_or_default(),
                    sha256: m.sha256.clone().unwrap_or_default(),
                    size_bytes: m.resolved.as_ref().map_or(0, |r| r.size),
                })
                .collect(),
            dataset: shown_path(&plan.spec.dataset.path.value),
            dataset_rows: plan.dataset.source_rows,
            sampled_rows: plan.dataset.rows.len(),
            run,
        }
    }
}

/// Everything the report shows, computed from the plan and the cache alone.
pub struct Analysis {
    pub predictions: Vec<Prediction>,
    pub metrics: Vec<CellMetrics>,
    pub groups: Vec<SettingGroup>,
    pub comparisons: Vec<Comparison>,
}

pub fn analyse(plan: &Plan, cache: &Cache, computed: &HashSet<Digest>) -> Analysis {
    let predictions = metrics::collect(plan, cache, computed);
    let cell_metrics = metrics::compute(plan, &predictions);
    let groups = metrics::setting_groups(plan, &predictions, &cell_metrics);
    let pairs = metrics::comparison_pairs(plan, &cell_metrics);
    let comparisons = metrics::compare(plan, &predictions, &pairs);
    Analysis {
        predictions,
        metrics: cell_metrics,
        groups,
        comparisons,
    }
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

/// The three tables, by name.
fn table_batches(
    plan: &Plan,
    a: &Analysis,
) -> Result<Vec<(&'static str, RecordBatch)>, ReportError> {
    let enc = |what: &'static str| move |message: String| ReportError::Encode { what, message };
    Ok(vec![
        (
            "predictions",
            tables::predictions(plan, &a.predictions).map_err(enc("predictions"))?,
        ),
        (
            "metrics",
            tables::metrics(&a.metrics, &plan.dataset.label_names()).map_err(enc("metrics"))?,
        ),
        (
            "comparisons",
            tables::comparisons(&a.comparisons).map_err(enc("comparisons"))?,
        ),
    ])
}

/// Build every report file from the plan and the cache alone.
pub fn write(
    plan: &Plan,
    cache: &Cache,
    computed: &HashSet<Digest>,
    provenance: &Provenance,
    reports_dir: &Path,
    scripts: Scripts,
) -> Result<Written, ReportError> {
    let dir = reports_dir.join(&plan.spec.name);
    create_dir(&dir)?;
    let a = analyse(plan, cache, computed);
    let mut paths = Vec::new();
    for (name, batch) in table_batches(plan, &a)? {
        let bytes = tables::to_parquet(&batch).map_err(|message| ReportError::Encode {
            what: name,
            message,
        })?;
        paths.push(put(&dir, &format!("{name}.parquet"), &bytes)?);
    }
    let run_json = serde_json::to_vec_pretty(provenance).map_err(|e| ReportError::Encode {
        what: "run.json",
        message: e.to_string(),
    })?;
    put(&dir, "run.json", &run_json)?;
    let page = render_page(plan, &a, provenance, scripts);
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
pub fn export_csv(plan: &Plan, cache: &Cache, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    create_dir(dir)?;
    let a = analyse(plan, cache, &HashSet::new());
    let mut out = Vec::new();
    for (name, batch) in table_batches(plan, &a)? {
        let bytes = tables::to_csv(&batch).map_err(|message| ReportError::Encode {
            what: name,
            message,
        })?;
        out.push(put(dir, &format!("{name}.csv"), &bytes)?);
    }
    Ok(out)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn opt3(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into())
}

fn chart(v: vega_lite_4::Vegalite) -> Block {
    Block::Chart(serde_json::to_value(v).expect("charts serialize"))
}

fn p_value(p: f64) -> String {
    if p < 0.001 {
        "&lt;0.001".into()
    } else {
        format!("{p:.3}")
    }
}

fn render_page(plan: &Plan, a: &Analysis, prov: &Provenance, scripts: Scripts) -> String {
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
    let mut sections = Vec::new();

    let mut intro = String::new();
    if let Some(d) = &plan.spec.description {
        intro.push_str(&format!("<p>{}</p>", escape(d)));
    }
    let incomplete = m.iter().filter(|c| c.n < c.planned).count();
    if incomplete > 0 {
        intro.push_str(&format!(
            "<p class=\"warn\">{incomplete} cells are incomplete (the run was stopped or limited); their metrics cover the rows computed so far.</p>"
        ));
    }
    intro.push_str(
        "<p class=\"note\">Invalid answers (a generation that names no label) count as wrong. \
         Intervals are 95% Wilson intervals. Speeds are each cell computed on its own; \
         a run shares one prompt evaluation among the cells that use the same prompt.</p>",
    );
    let mut blocks = vec![Block::Html(intro), chart(charts::accuracy(m))];
    if let Some(c) = charts::accuracy_vs_temperature(m) {
        blocks.push(chart(c));
    }
    blocks.push(chart(charts::cost_quality(m)));
    sections.push(Section {
        title: "Accuracy and cost".into(),
        blocks,
    });

    // Metrics per cell.
    let mut head: Vec<String> = ["cell", "n", "accuracy", "95% CI", "macro-F1", "invalid"]
        .map(String::from)
        .to_vec();
    for l in &labels {
        head.push(format!("P {l}"));
        head.push(format!("R {l}"));
        head.push(format!("F1 {l}"));
    }
    head.extend(
        [
            "AUC",
            "Brier",
            "ECE",
            "reviews/s",
            "p50 ms",
            "p95 ms",
            "prompt tok/s",
            "gen tok/s",
            "cached",
            "computed",
        ]
        .map(String::from),
    );
    let rows: Vec<Vec<String>> = m
        .iter()
        .map(|c| {
            let mut r = vec![
                format!("<code>{}</code>", escape(&c.cell)),
                format!("{}/{}", c.n, c.planned),
                pct(c.accuracy),
                format!("{}–{}", pct(c.accuracy_lo), pct(c.accuracy_hi)),
                format!("{:.3}", c.macro_f1),
                c.invalid.to_string(),
            ];
            for cl in &c.classes {
                r.push(format!("{:.3}", cl.precision));
                r.push(format!("{:.3}", cl.recall));
                r.push(format!("{:.3}", cl.f1));
            }
            r.extend([
                opt3(c.roc_auc),
                opt3(c.brier),
                opt3(c.ece),
                format!("{:.3}", c.reviews_per_s),
                format!("{:.0}", c.latency_p50_ms),
                format!("{:.0}", c.latency_p95_ms),
                format!("{:.1}", c.prompt_tokens_per_s),
                format!("{:.1}", c.gen_tokens_per_s),
                c.cached.to_string(),
                c.computed.to_string(),
            ]);
            r
        })
        .collect();
    let head_refs: Vec<&str> = head.iter().map(String::as_str).collect();
    let mut blocks = vec![Block::Html(html::table(&head_refs, &rows, &[0]))];
    if !a.groups.is_empty() {
        let rows: Vec<Vec<String>> = a
            .groups
            .iter()
            .map(|g| {
                vec![
                    format!("<code>{}</code>", escape(&g.setting)),
                    g.runs.to_string(),
                    pct(g.mean_accuracy),
                    format!("{:.1} pt", 100.0 * g.std_accuracy),
                    format!("{} ({} rows)", pct(g.majority_accuracy), g.majority_rows),
                ]
            })
            .collect();
        blocks.push(Block::Html(format!(
            "<h3>Across seeds and repeats</h3>{}",
            html::table(
                &[
                    "setting",
                    "runs",
                    "mean accuracy",
                    "std (n-1)",
                    "majority-vote accuracy"
                ],
                &rows,
                &[0]
            )
        )));
    }
    sections.push(Section {
        title: "Metrics per cell".into(),
        blocks,
    });

    // Paired comparisons.
    let rows: Vec<Vec<String>> = a
        .comparisons
        .iter()
        .map(|c| {
            vec![
                format!("<code>{}</code>", escape(&c.cell)),
                format!("<code>{}</code>", escape(&c.reference)),
                c.n.to_string(),
                format!("{:+.1} pt", 100.0 * c.difference),
                format!("{:+.1} to {:+.1} pt", 100.0 * c.ci_lo, 100.0 * c.ci_hi),
                format!("{} / {}", c.cell_only, c.reference_only),
                p_value(c.p_value),
            ]
        })
        .collect();
    let how = if plan.spec.compare.baseline.is_some() || !plan.spec.compare.pairs.is_empty() {
        "Pairs named in the spec's <code>compare:</code> section."
    } else {
        "No <code>compare:</code> section: every cell against the most accurate one."
    };
    sections.push(Section {
        title: "Paired comparisons".into(),
        blocks: vec![Block::Html(format!(
            "<p class=\"note\">{how} Same rows in both cells. Difference = cell − reference accuracy, \
             with a seeded paired-bootstrap 95% interval ({} resamples, seed {}); p from the exact McNemar test \
             on the discordant rows (only the cell right / only the reference right).</p>{}",
            plan.spec.compare.resamples,
            plan.spec.compare.seed,
            html::table(
                &["cell", "reference", "rows", "difference", "95% CI", "discordant", "McNemar p"],
                &rows,
                &[0, 1]
            )
        ))],
    });

    let mut blocks = vec![chart(charts::confusion(m, &labels))];
    if let Some(c) = charts::calibration(m) {
        blocks.push(chart(c));
    }
    sections.push(Section {
        title: "Errors and calibration".into(),
        blocks,
    });
    sections.push(Section {
        title: "Disagreements".into(),
        blocks: vec![Block::Html(disagreements(plan, a))],
    });
    sections.push(Section {
        title: "Provenance".into(),
        blocks: vec![Block::Html(provenance_table(prov, a))],
    });
    html::page(&title, &subtitle, &sections, scripts)
}

/// Rows on which the compared cells give different answers, with the text and both answers.
fn disagreements(plan: &Plan, a: &Analysis) -> String {
    const SHOWN: usize = 25;
    let labels = plan.dataset.label_names();
    let mut by_key: std::collections::HashMap<(usize, usize), &Prediction> = Default::default();
    for p in &a.predictions {
        by_key.insert((p.cell, p.row), p);
    }
    let answer = |p: &Prediction| -> String {
        let label = p
            .predicted
            .map(|i| escape(&labels[i]))
            .unwrap_or_else(|| "<em>invalid</em>".into());
        let mark = if p.correct() { "✓" } else { "✗" };
        match &p.raw {
            Some(raw) => format!("{mark} {label}<br><small>“{}”</small>", escape(raw.trim())),
            None => format!("{mark} {label}"),
        }
    };
    let mut out = String::from(
        "<p class=\"note\">For each comparison, the rows where the two cells predict differently. All text is shown as text.</p>",
    );
    if a.comparisons.is_empty() {
        out.push_str("<p>No comparisons.</p>");
    }
    for c in &a.comparisons {
        let (Some(ci), Some(ri)) = (plan.cell_by_id(&c.cell), plan.cell_by_id(&c.reference)) else {
            continue;
        };
        let rows: Vec<(usize, &Prediction, &Prediction)> = (0..plan.dataset.rows.len())
            .filter_map(|r| {
                let x = by_key.get(&(ci, r))?;
                let y = by_key.get(&(ri, r))?;
                (x.predicted != y.predicted).then_some((r, *x, *y))
            })
            .collect();
        let table_rows: Vec<Vec<String>> = rows
            .iter()
            .take(SHOWN)
            .map(|(r, x, y)| {
                let row = &plan.dataset.rows[*r];
                vec![
                    format!("<code>{}</code>", escape(&row.id)),
                    escape(&labels[row.label]),
                    answer(x),
                    answer(y),
                    format!("<div class=\"text\">{}</div>", escape(&row.text)),
                ]
            })
            .collect();
        out.push_str(&format!(
            "<details><summary><code>{}</code> vs <code>{}</code>: {} rows disagree{}</summary>{}</details>",
            escape(&c.cell),
            escape(&c.reference),
            rows.len(),
            if rows.len() > SHOWN { format!(" (first {SHOWN} shown)") } else { String::new() },
            html::table(&["row", "gold", "cell", "reference", "text"], &table_rows, &[0, 1, 2, 3, 4])
        ));
    }
    out
}

fn provenance_table(p: &Provenance, a: &Analysis) -> String {
    let mut rows = vec![
        vec!["spec".into(), format!("<code>{}</code>", escape(&p.spec))],
        vec![
            "spec blake3".into(),
            format!("<code>{}</code>", escape(&p.spec_blake3)),
        ],
        vec!["engine".into(), escape(&p.engine)],
        vec!["threads".into(), p.threads.to_string()],
        vec!["machine".into(), escape(&p.machine)],
        vec!["date (UTC)".into(), escape(&p.date_utc)],
        vec![
            "dataset".into(),
            format!(
                "<code>{}</code> ({} rows, {} sampled)",
                escape(&p.dataset),
                p.dataset_rows,
                p.sampled_rows
            ),
        ],
    ];
    for m in &p.models {
        rows.push(vec![
            format!("model <code>{}</code>", escape(&m.id)),
            format!(
                "<code>{}</code><br>sha256 <code>{}</code>, {:.1} MB",
                escape(&m.file),
                escape(&m.sha256),
                m.size_bytes as f64 / 1e6
            ),
        ]);
    }
    let from_cache = a.predictions.iter().filter(|x| x.from_cache).count();
    rows.push(vec![
        "rows in this report".into(),
        format!(
            "{} ({} from the cache, {} computed by the run that wrote it)",
            a.predictions.len(),
            from_cache,
            a.predictions.len() - from_cache
        ),
    ]);
    if let Some(r) = &p.run {
        rows.push(vec![
            "this run".into(),
            format!(
                "{} rows from cache, {} computed, {} prompts evaluated ({} of {} prompt tokens evaluated), {:.1} s{}",
                r.cached_rows,
                r.computed_rows,
                r.prompts_evaluated,
                r.evaluated_tokens,
                r.prompt_tokens,
                r.wall_s,
                if r.interrupted { ", interrupted" } else { "" }
            ),
        ]);
    }
    html::table(&["what", "value"], &rows, &[0, 1])
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

fn machine_description() -> String {
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
