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
use crate::metrics::{self, CellMetrics};
use crate::plan::Plan;
use html::{Block, Scripts, Section, escape};

/// Where the report files went.
#[derive(Debug, Clone)]
pub struct Written {
    pub dir: PathBuf,
    pub index: PathBuf,
    pub predictions: PathBuf,
    pub metrics: PathBuf,
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
                        .map(|r| shown_path(&r.path))
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
    std::fs::create_dir_all(&dir).map_err(|source| ReportError::Io {
        path: dir.clone(),
        source,
    })?;
    let preds = metrics::collect(plan, cache, computed);
    let cell_metrics = metrics::compute(plan, &preds);
    let labels = plan.dataset.label_names();
    let enc = |what: &'static str| move |message: String| ReportError::Encode { what, message };
    let put = |name: &str, bytes: &[u8]| -> Result<PathBuf, ReportError> {
        let path = dir.join(name);
        write_atomic(&path, bytes).map_err(|source| ReportError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    };
    let predictions = put(
        "predictions.parquet",
        &tables::predictions(plan, &preds).map_err(enc("predictions"))?,
    )?;
    let metrics_path = put(
        "metrics.parquet",
        &tables::metrics(&cell_metrics, &labels).map_err(enc("metrics"))?,
    )?;
    let run_json = serde_json::to_vec_pretty(provenance).map_err(|e| ReportError::Encode {
        what: "run.json",
        message: e.to_string(),
    })?;
    put("run.json", &run_json)?;
    let page = render_page(plan, &cell_metrics, provenance, scripts);
    let index = put("index.html", page.as_bytes())?;
    Ok(Written {
        dir,
        index,
        predictions,
        metrics: metrics_path,
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn render_page(plan: &Plan, m: &[CellMetrics], prov: &Provenance, scripts: Scripts) -> String {
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
    let incomplete: Vec<&CellMetrics> = m.iter().filter(|c| c.n < c.planned).collect();
    let mut summary = String::new();
    if !incomplete.is_empty() {
        summary.push_str(&format!(
            "<p class=\"warn\">{} cells are incomplete (the run was stopped or limited); their metrics cover the rows computed so far.</p>",
            incomplete.len()
        ));
    }
    sections.push(Section {
        title: "Accuracy".into(),
        blocks: vec![
            Block::Html(summary),
            Block::Chart(serde_json::to_value(charts::accuracy(m)).expect("chart serializes")),
        ],
    });
    let labels = plan.dataset.label_names();
    let mut head: Vec<String> = vec![
        "cell".into(),
        "n".into(),
        "accuracy".into(),
        "95% CI".into(),
        "macro-F1".into(),
        "invalid".into(),
    ];
    for l in &labels {
        head.push(format!("P {l}"));
        head.push(format!("R {l}"));
    }
    head.extend([
        "reviews/s".into(),
        "p50 ms".into(),
        "cached".into(),
        "computed".into(),
    ]);
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
            }
            r.extend([
                format!("{:.3}", c.reviews_per_s),
                format!("{:.0}", c.latency_p50_ms),
                c.cached.to_string(),
                c.computed.to_string(),
            ]);
            r
        })
        .collect();
    let head_refs: Vec<&str> = head.iter().map(String::as_str).collect();
    sections.push(Section {
        title: "Metrics per cell".into(),
        blocks: vec![Block::Html(html::table(&head_refs, &rows, &[0]))],
    });
    sections.push(Section {
        title: "Provenance".into(),
        blocks: vec![Block::Html(provenance_table(prov))],
    });
    html::page(&title, &subtitle, &sections, scripts)
}

fn provenance_table(p: &Provenance) -> String {
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
