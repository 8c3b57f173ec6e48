//! Refactors keep results: every published report that carries its rows
//! (`reports/NAME/rows/`, the quickstart and the cascade study among them) is rebuilt from
//! those rows alone by this build, and its tables must equal the published ones value for
//! value. No model is loaded: `report` reads the cache, and the rows are found under the
//! engine the report was made with (its `run.json`), through the fake backend's engine
//! override. `scripts/check-reports` does the same from the shell.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use arrow::array::RecordBatch;

/// Columns that say when and how a row was read, not what it is.
const VOLATILE: [&str; 3] = ["from_cache", "cached_rows", "computed_rows"];
/// Columns renamed since a report was published: (published name, name now).
const RENAMED: [(&str, &str); 2] = [
    ("reviews_per_s", "rows_per_s"),
    ("reviews_per_s_shared", "rows_per_s_shared"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pipeline(cache: &Path, reports: &Path, engine: Option<&str>, args: &[&str]) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    c.arg("--cache-dir")
        .arg(cache)
        .arg("--reports-dir")
        .arg(reports)
        .arg("-q")
        .args(args)
        .current_dir(root());
    if let Some(e) = engine {
        c.env("PIPELINE_FAKE_ENGINE", e);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "pipeline {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Differences between a published table and the rebuilt one, column by column.
fn differences(table: &str, published: &RecordBatch, rebuilt: &RecordBatch) -> Vec<String> {
    if published.num_rows() != rebuilt.num_rows() {
        return vec![format!(
            "{table}: {} rows published, {} rebuilt",
            published.num_rows(),
            rebuilt.num_rows()
        )];
    }
    let mut out = Vec::new();
    for field in published.schema().fields() {
        let name = field.name().as_str();
        if VOLATILE.contains(&name) {
            continue;
        }
        let now = RENAMED
            .iter()
            .find(|(old, _)| *old == name && rebuilt.column_by_name(name).is_none())
            .map_or(name, |(_, new)| new);
        match (published.column_by_name(name), rebuilt.column_by_name(now)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(_), Some(_)) => out.push(format!("{table}.{name} differs")),
            _ => out.push(format!("{table}.{name} is gone")),
        }
    }
    out
}

#[test]
fn every_published_report_rebuilds_from_its_rows_with_identical_tables() {
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(root().join("reports")).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("rows").is_dir() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let spec = root().join("experiments").join(format!("{name}.yaml"));
        assert!(spec.is_file(), "{name}: no {}", spec.display());
        let run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("run.json")).unwrap()).unwrap();
        let engine = run["engine"].as_str().expect("run.json names its engine");
        let work = tempfile::tempdir().unwrap();
        let (cache, reports) = (work.path().join("cache"), work.path().join("reports"));
        pipeline(
            &cache,
            &reports,
            None,
            &["cache", "import", dir.join("rows").to_str().unwrap()],
        );
        pipeline(
            &cache,
            &reports,
            Some(engine),
            &["report", spec.to_str().unwrap(), "--backend", "fake"],
        );
        let mut bad = Vec::new();
        for table in ["metrics", "predictions", "comparisons", "failures"] {
            let file = format!("{table}.parquet");
            bad.extend(differences(
                table,
                &common::read_parquet_batch(&dir.join(&file)),
                &common::read_parquet_batch(&reports.join(&name).join(&file)),
            ));
        }
        assert!(bad.is_empty(), "{name}: {}", bad.join("; "));
        checked.push(name);
    }
    checked.sort();
    for must in ["cascade", "quickstart"] {
        assert!(
            checked.iter().any(|c| c == must),
            "reports/{must} has no rows to check: {checked:?}"
        );
    }
}

#[test]
fn the_comparison_sees_a_changed_value() {
    let dir = root().join("reports/quickstart");
    let published = common::read_parquet_batch(&dir.join("metrics.parquet"));
    assert!(differences("metrics", &published, &published).is_empty());
    // The same table with one accuracy moved is reported as different.
    let i = published.schema().index_of("accuracy").unwrap();
    let mut columns = published.columns().to_vec();
    let acc = columns[i]
        .as_any()
        .downcast_ref::<arrow::array::Float64Array>()
        .unwrap();
    let moved: arrow::array::Float64Array = acc.iter().map(|v| v.map(|v| v + 0.01)).collect();
    columns[i] = std::sync::Arc::new(moved);
    let changed = RecordBatch::try_new(published.schema(), columns).unwrap();
    assert_eq!(
        differences("metrics", &published, &changed),
        vec!["metrics.accuracy differs".to_string()]
    );
}
