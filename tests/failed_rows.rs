//! One bad row never stops a study: it is recorded with its error, counted per cell, shown
//! in the report, never cached as a success, and tried again by the next run. Only a
//! failure of the machinery (here: a model that does not load) makes a run fail, and even
//! then the report of what finished is written.

mod common;

use common::Project;
use pipeline::backend::fake::{FAIL_MARKER, LOAD_FAIL_MARKER};

/// The test project with two bad reviews: one the fake backend cannot decode, one longer
/// than the model's context.
fn project_with_bad_rows() -> Project {
    let p = Project::new();
    let mut jsonl = String::new();
    for i in 0..12 {
        let label = i % 2;
        let text = match i {
            3 => format!("Review {i} {FAIL_MARKER} here."),
            8 => format!("Review {i} {}", "very ".repeat(600)),
            _ => format!("Review number {i}: a fine film."),
        };
        jsonl.push_str(
            &serde_json::json!({"id": format!("r{i}"), "text": text, "label": label}).to_string(),
        );
        jsonl.push('\n');
    }
    p.write("data/reviews.jsonl", &jsonl);
    p
}

#[test]
fn bad_rows_are_recorded_counted_shown_and_retried() {
    let p = project_with_bad_rows();
    let out = p.run_ok(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let run = p.run_json();
    // 2 bad reviews × 2 prompts × 3 cells.
    assert_eq!(run["failed_rows"], 12, "{run}");
    assert_eq!(run["computed_rows"], 60);
    assert_eq!(run["failed_by_kind"]["decode"], 6);
    assert_eq!(run["failed_by_kind"]["context_overflow"], 6);
    assert!(
        stdout.contains("12 rows failed (6 context_overflow, 6 decode)"),
        "{stdout}"
    );

    // Counted per cell, next to invalid, and listed with their messages.
    let plan = p.plan();
    for c in plan["cells"].as_array().unwrap() {
        assert_eq!(c["failed"], 2, "{c}");
        assert_eq!(c["to_run"], 2, "{c}");
    }
    let html = common::report_html(&p);
    let failed = html.split("<section id=\"failed\">").nth(1).unwrap();
    assert!(
        failed.contains("6 <code>decode</code>")
            && failed.contains("6 <code>context_overflow</code>")
    );
    assert!(failed.contains("<code>r3</code>") && failed.contains("simulated"));
    let f = common::failures(&p.path("reports/t/failures.parquet"));
    assert_eq!(f.len(), 12);
    assert!(
        f.iter()
            .all(|l| l.contains("| r3 | decode |") || l.contains("| r8 | context_overflow |"))
    );
    let explain = p.run_ok(&[
        "plan",
        "spec.yaml",
        "--backend",
        "fake",
        "--explain",
        "fake-a/p1/ll",
    ]);
    assert!(
        String::from_utf8_lossy(&explain.stdout)
            .contains("1 rows to run: their last attempt failed (decode)")
    );

    // Never a success in the cache: the next run tries exactly those rows again...
    let again = p.run();
    assert_eq!(again["cached_rows"], 60);
    assert_eq!(again["failed_rows"], 12);
    assert_eq!(
        again["prompts_evaluated"], 0,
        "only failed prompts ran, and failed again"
    );
    // ...and once the data is fixed, computes them.
    let fixed = p.read("data/reviews.jsonl").replace(FAIL_MARKER, "fine");
    p.write("data/reviews.jsonl", &fixed);
    let spec = p.read("spec.yaml").replace("n_ctx: 512", "n_ctx: 4096");
    p.write("spec.yaml", &spec);
    let last = p.run();
    assert_eq!(last["failed_rows"], 0, "{last}");
    assert!(!p.read("reports/t/index.html").contains("id=\"failed\""));
}

#[test]
fn fail_fast_stops_at_the_first_bad_row_and_still_writes_the_report() {
    let p = project_with_bad_rows();
    let out = p
        .cmd(&[
            "run",
            "spec.yaml",
            "--backend",
            "fake",
            "--quiet",
            "--fail-fast",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--fail-fast") && stderr.contains("row `r"),
        "{stderr}"
    );
    let run = p.run_json();
    let failed = run["failed_rows"].as_u64().unwrap();
    assert!((1..=3).contains(&failed), "one prompt's cells: {run}");
    assert!(run["computed_rows"].as_u64().unwrap() < 60, "{run}");
    assert!(p.path("reports/t/index.html").is_file());
}

#[test]
fn a_model_that_does_not_load_fails_the_run_but_not_the_other_models() {
    let p = Project::new();
    let mut payload = b"fake model b ".to_vec();
    payload.extend_from_slice(LOAD_FAIL_MARKER);
    pipeline::model::write_fake_gguf(&p.path("models/b.gguf"), &payload).unwrap();
    let spec = common::SPEC.replace(
        "models:\n",
        "models:\n  - id: fake-b\n    gguf: models/b.gguf\n    n_ctx: 512\n",
    );
    p.write("spec.yaml", &spec);
    let out = p
        .cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("model `fake-b`") && stderr.contains("simulated load failure"),
        "{stderr}"
    );
    let run = p.run_json();
    assert_eq!(
        run["computed_rows"], 72,
        "fake-a's rows are all done: {run}"
    );
    assert_eq!(
        run["failed_rows"], 0,
        "a broken model is not 72 failed rows"
    );
    let plan = p.plan();
    let todo: u64 = plan["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["model"] == "fake-b")
        .map(|c| c["to_run"].as_u64().unwrap())
        .sum();
    assert_eq!(todo, 72);
}
