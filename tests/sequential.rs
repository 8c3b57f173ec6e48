//! `run --until-resolved A B` on the fake backend: it stops early when the two cells
//! differ a lot, and runs to its cap when they do not differ.

mod common;

use common::Project;

/// 400 reviews whose words give their label away (to the fake embedder's bag of words),
/// and a spec with a kNN vote (nearly always right) and two loglik cells on different
/// prompts (the fake backend's log-probs are hashes: right half the time, independently).
fn project() -> Project {
    let p = common::knn_project();
    let mut rows = String::new();
    for i in 0..400 {
        let label = i % 2;
        let word = if label == 1 {
            "wonderful lovely"
        } else {
            "dreadful boring"
        };
        rows.push_str(&format!(
            "{{\"id\": \"r{i}\", \"text\": \"Review number {i}: a {word} film.\", \"label\": {label}}}\n"
        ));
    }
    p.write("data/reviews.jsonl", &rows);
    p.write(
        "spec.yaml",
        &common::KNN_SPEC
            .replace("sample: {n: 12, stratify: true, seed: 5}", "sample: {n: 400, stratify: true, seed: 5}")
            .replace(
                "  - id: knn\n    user: \"{% for e in examples %}{{ e.text }} => {{ e.label }}\\n{% endfor %}Review: {{ text }}\"\n    shots: {strategy: knn, k: 4, from: data/reviews.jsonl, embedder: emb, per_label: true}\n",
                "  - id: other\n    user: \"Text: {{ text }} Answer.\"\n",
            ),
    );
    p
}

fn until(p: &Project, a: &str, b: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "run",
        "spec.yaml",
        "--backend",
        "fake",
        "--quiet",
        "--until-resolved",
        a,
        b,
        "--batch",
        "20",
    ];
    args.extend_from_slice(extra);
    p.run_ok(&args);
    let run: serde_json::Value = serde_json::from_str(&p.read("reports/t/run.json")).unwrap();
    run["sequential"].clone()
}

#[test]
fn a_large_difference_stops_early_and_none_runs_to_the_cap() {
    let p = project();
    let seq = until(&p, "emb/vote", "fake-a/zero/ll", &[]);
    assert_eq!(seq["stopped"], "resolved", "{seq}");
    let rows = seq["rows"].as_u64().unwrap();
    assert!(rows < 100, "stopped at {rows} of 400: {seq}");
    assert!(seq["e_value"].as_f64().unwrap() >= 20.0, "{seq}");
    // The report says it too.
    assert!(common::report_html(&p).contains("sequential run"));
    assert!(
        seq["why"]
            .as_str()
            .unwrap()
            .contains(&format!("Stopped at {rows} of at most 400 rows"))
    );

    // Two cells that answer at random: no difference, so it runs to the cap.
    let seq = until(
        &p,
        "fake-a/zero/ll",
        "fake-a/other/ll",
        &["--max-rows", "200"],
    );
    assert_eq!(seq["stopped"], "cap", "{seq}");
    assert_eq!(seq["rows"], 200, "{seq}");
    assert_eq!(seq["looks"], 10, "{seq}");
    assert!(seq["e_value"].as_f64().unwrap() < 20.0, "{seq}");
}

#[test]
fn unknown_cells_are_named() {
    let p = project();
    let out = p
        .cmd(&[
            "run",
            "spec.yaml",
            "--backend",
            "fake",
            "--until-resolved",
            "nope",
            "emb/vote",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no cell `nope`"), "{err}");
}
