//! What the metrics stage writes, checked end to end with the fake backend.

mod common;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, UInt64Type};
use common::Project;

fn read(path: &std::path::Path) -> arrow::array::RecordBatch {
    let f = std::fs::File::open(path).unwrap();
    let batches: Vec<_> = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

#[test]
fn comparisons_follow_the_compare_section() {
    let p = Project::new();
    let spec = format!(
        "{}compare:\n  baseline: fake-a/p1/ll\n  pairs:\n    - [fake-a/p2/gen@t=0.2, fake-a/p1/gen@t=0.2]\n  bootstrap: {{resamples: 500, seed: 9}}\n",
        common::SPEC
    );
    p.write("spec.yaml", &spec);
    p.run();
    let c = read(&p.path("reports/t/comparisons.parquet"));
    // 5 cells against the baseline, plus the explicit pair.
    assert_eq!(c.num_rows(), 6);
    let cell = c.column_by_name("cell").unwrap().as_string::<i32>().clone();
    let reference = c
        .column_by_name("reference")
        .unwrap()
        .as_string::<i32>()
        .clone();
    assert!((0..5).all(|i| reference.value(i) == "fake-a/p1/ll"));
    assert_eq!(cell.value(5), "fake-a/p2/gen@t=0.2");
    let f = |n: &str| {
        c.column_by_name(n)
            .unwrap()
            .as_primitive::<Float64Type>()
            .clone()
    };
    let u = |n: &str| {
        c.column_by_name(n)
            .unwrap()
            .as_primitive::<UInt64Type>()
            .clone()
    };
    let (diff, lo, hi, pv) = (
        f("difference"),
        f("difference_ci95_lo"),
        f("difference_ci95_hi"),
        f("mcnemar_exact_p"),
    );
    let (b, cc, n) = (u("cell_only_correct"), u("reference_only_correct"), u("n"));
    for i in 0..6 {
        assert_eq!(n.value(i), 12);
        // The difference is the discordant balance over the rows.
        let expect = (b.value(i) as f64 - cc.value(i) as f64) / 12.0;
        assert!((diff.value(i) - expect).abs() < 1e-12);
        assert!(lo.value(i) <= diff.value(i) + 1e-12 && diff.value(i) <= hi.value(i) + 1e-12);
        let p_expect = pipeline::metrics::stats::mcnemar_exact(b.value(i), cc.value(i));
        assert!((pv.value(i) - p_expect).abs() < 1e-12);
    }
    // CSV export of the same tables.
    let out = p.run_ok(&[
        "export",
        "spec.yaml",
        "--backend",
        "fake",
        "--format",
        "csv",
        "--out",
        "csv",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4);
    let csv = p.read("csv/comparisons.csv");
    assert_eq!(csv.lines().count(), 7);
    assert!(csv.starts_with("cell,reference,n,accuracy"));
    assert_eq!(p.read("csv/predictions.csv").lines().count(), 73);
}

#[test]
fn unknown_cell_in_compare_is_an_error_at_its_line() {
    let p = Project::new();
    let spec = format!("{}compare:\n  baseline: fake-a/p9/ll\n", common::SPEC);
    p.write("spec.yaml", &spec);
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    let line = spec.lines().position(|l| l.contains("p9")).unwrap() + 1;
    assert!(
        e.contains(&format!("spec.yaml:{line}:")) && e.contains("compare.baseline"),
        "{e}"
    );
    assert!(e.contains("no cell `fake-a/p9/ll`"), "{e}");
}

#[test]
fn report_rebuilds_from_the_cache_alone() {
    let p = Project::new();
    p.run();
    let before = common::predictions(&p.path("reports/t/predictions.parquet"));
    std::fs::remove_dir_all(p.path("reports")).unwrap();
    p.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
    assert_eq!(
        common::predictions(&p.path("reports/t/predictions.parquet")),
        before
    );
    let run: serde_json::Value = serde_json::from_str(&p.read("reports/t/run.json")).unwrap();
    assert!(run["run"].is_null(), "no run happened");
    let m = read(&p.path("reports/t/metrics.parquet"));
    let cached = m
        .column_by_name("cached_rows")
        .unwrap()
        .as_primitive::<UInt64Type>()
        .clone();
    assert!(
        (0..m.num_rows()).all(|i| cached.value(i) == 12),
        "every row came from the cache"
    );
    // Log-likelihood cells carry calibration metrics; generation cells do not.
    let cell = m.column_by_name("cell").unwrap().as_string::<i32>().clone();
    let brier = m
        .column_by_name("brier")
        .unwrap()
        .as_primitive::<Float64Type>()
        .clone();
    for i in 0..m.num_rows() {
        assert_eq!(
            cell.value(i).ends_with("/ll"),
            !brier.is_null(i),
            "{}",
            cell.value(i)
        );
    }
}

#[test]
fn seeds_are_summarised_with_mean_std_and_majority_vote() {
    let p = Project::new();
    p.write(
        "spec.yaml",
        &common::SPEC.replace("seed: 3", "seed: [1, 2, 3]"),
    );
    p.run();
    let html = common::report_html(&p);
    assert!(html.contains("Across seeds and repeats"));
    assert!(
        html.contains("fake-a/p1/gen@t=0.8,top_p=1,top_k=0,min_p=0"),
        "one setting, three seeds"
    );
}

#[test]
fn findings_open_the_page_and_match_findings_md() {
    let p = Project::new();
    p.run();
    let html = common::report_html(&p);
    let md = p.read("reports/t/findings.md");
    let at = html.find("<h2>Summary</h2>").expect("a Summary section");
    assert!(
        at < html.find("<h2>Accuracy and cost</h2>").unwrap(),
        "the summary and its findings come first"
    );
    // Every sentence of findings.md is on the page (HTML-escaped).
    let items: Vec<&str> = md.lines().filter(|l| l.starts_with("- **")).collect();
    for start in [
        "- **sample**: 12 rows",
        "- **prompts**: On fake-a",
        "- **temperature**: On fake-a, temperature 0.8 changes",
    ] {
        assert!(md.contains(start), "{start} in {md}");
    }
    for item in items {
        let text = item.split_once("**: ").unwrap().1;
        let escaped = text.replace('&', "&amp;").replace('\'', "&#x27;");
        assert!(html.contains(&escaped), "{text}");
    }
}

#[test]
fn a_rebuilt_report_keeps_the_last_runs_record() {
    let p = Project::new();
    p.run();
    let ran: serde_json::Value = serde_json::from_str(&p.read("reports/t/run.json")).unwrap();
    let computed = ran["run"]["computed_rows"].as_u64().unwrap();
    assert!(computed > 0);
    for _ in 0..2 {
        p.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
        let rebuilt: serde_json::Value =
            serde_json::from_str(&p.read("reports/t/run.json")).unwrap();
        assert!(rebuilt["run"].is_null());
        assert_eq!(rebuilt["last_run"]["run"]["computed_rows"], computed);
        assert_eq!(rebuilt["last_run"]["date_utc"], ran["date_utc"]);
    }
}

#[test]
fn plan_says_why_a_published_report_is_recomputed_on_a_fresh_cache() {
    let p = Project::new();
    p.run();
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .env("PIPELINE_CACHE_DIR", p.path("fresh-cache"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("was published on"), "{text}");
    assert!(text.contains("this cache holds 0 of its"), "{text}");
    // With the cache that made it, nothing to say.
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("was published on"));
    // With the report's rows published beside it, the note says how to use them.
    p.run_ok(&[
        "cache",
        "export",
        "--spec",
        "spec.yaml",
        "--backend",
        "fake",
        "reports/t/rows",
    ]);
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .env("PIPELINE_CACHE_DIR", p.path("fresh-cache"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cache import"), "{text}");
    // A node whose engine differs (another CPU type): the rows are there but not reused,
    // and the plan says so.
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .env("PIPELINE_FAKE_ENGINE", "fake-engine other-cpu")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("72 of the rows to run are cached under another engine key"),
        "{text}"
    );
}
