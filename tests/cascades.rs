//! Cascades with the fake backend: only the rows the first cell is unsure of reach the next
//! model (counted by the backend itself), a `fraction` threshold is fitted on rows of another
//! file and never on the rows it scores, a cached cascade computes nothing, chains, shards,
//! and located errors in the `cascades:` section.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Project, cascade_project as project, cascade_spec as spec};
use pipeline::app::{self, RunOptions, run_with_backend};
use pipeline::backend::fake::{FakeBackend, FakeCalls};
use pipeline::backend::{Backend, BackendKind};
use pipeline::config::Config;
use pipeline::metrics::{self, Prediction};

fn cfg(p: &Project) -> Config {
    Config {
        backend: BackendKind::Fake,
        ..Config::new(p.path("cache"), p.path("reports"))
    }
}

fn run(p: &Project, opts: &RunOptions) -> Arc<FakeCalls> {
    let calls = Arc::new(FakeCalls::default());
    let c = calls.clone();
    let make = Arc::new(move || Box::new(FakeBackend::new(c.clone())) as Box<dyn Backend>);
    let outcome = run_with_backend(
        &cfg(p),
        &p.path("spec.yaml"),
        opts,
        Arc::new(AtomicBool::new(false)),
        make,
    )
    .unwrap();
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    calls
}

/// The predictions of each reported cell, by cell id, as the cache holds them now.
fn predictions(p: &Project) -> (app::Planned, Vec<(String, Vec<Prediction>)>) {
    let planned = app::plan(&cfg(p), &p.path("spec.yaml"), None).unwrap();
    let stages = planned
        .cache
        .rows(pipeline::cascade::stage_keys(&planned.plan))
        .unwrap();
    let preds = metrics::collect(
        &planned.plan,
        &planned.decided,
        &planned.cache,
        &stages,
        &HashSet::new(),
    )
    .unwrap();
    let by_cell = planned
        .plan
        .cells
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut rows: Vec<Prediction> = preds.iter().filter(|p| p.cell == i).cloned().collect();
            rows.sort_by_key(|p| p.row);
            (c.id.clone(), rows)
        })
        .collect();
    (planned, by_cell)
}

fn cell<'a>(cells: &'a [(String, Vec<Prediction>)], id: &str) -> &'a [Prediction] {
    &cells
        .iter()
        .find(|(c, _)| c == id)
        .unwrap_or_else(|| panic!("no cell {id}"))
        .1
}

/// The gap between the two best label log-probs, computed here from the raw scores.
fn gap(p: &Prediction) -> f64 {
    let lp = p.logprobs.as_ref().unwrap();
    let (mut hi, mut second) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &x in lp {
        if x > hi {
            second = hi;
            hi = x;
        } else if x > second {
            second = x;
        }
    }
    hi - second
}

#[test]
fn only_rows_the_first_cell_is_unsure_of_reach_the_second_model() {
    let p = project(&spec(common::CASCADE_MARGIN, false));
    let calls = run(&p, &RunOptions::default());
    let (planned, cells) = predictions(&p);
    let first = cell(&cells, "a/p1/ll");
    assert_eq!(first.len(), 12);
    let unsure: Vec<usize> = first
        .iter()
        .filter(|p| gap(p) < 2.0)
        .map(|p| p.row)
        .collect();
    assert!(
        !unsure.is_empty() && unsure.len() < 12,
        "the fake's scores should leave some rows on each side of 2 nats: {unsure:?}"
    );
    // The backend's own count: the second model saw exactly the unsure rows, once each.
    assert_eq!(
        calls.prompts_of("a"),
        12,
        "a: its loglik and generate cells share prompts"
    );
    assert_eq!(calls.prompts_of("b"), unsure.len());
    assert_eq!(calls.prompts_of("c"), 0, "c is in no cascade");
    // `b` has no cells of its own.
    assert!(planned.plan.cells.iter().all(|c| !c.id.starts_with("b/")));

    let cascade = cell(&cells, "cascade/ab");
    assert_eq!(cascade.len(), 12);
    for (c, f) in cascade.iter().zip(first) {
        if unsure.contains(&c.row) {
            assert_eq!(c.stage, Some(1), "row {}", c.row);
            assert_ne!(
                c.logprobs, f.logprobs,
                "the second model's scores answer it"
            );
            assert!(c.latency_ms > f.latency_ms, "both stages' time is counted");
            assert_eq!(
                c.prompt_tokens,
                2 * f.prompt_tokens,
                "same prompt, both models"
            );
        } else {
            assert_eq!(c.stage, Some(0));
            assert_eq!(c.predicted, f.predicted);
            assert_eq!(c.logprobs, f.logprobs);
        }
    }

    // Cached: the second run loads no model and computes nothing.
    let again = run(&p, &RunOptions::default());
    assert_eq!(again.models_loaded.load(Ordering::SeqCst), 0);
    assert_eq!(again.prompts.load(Ordering::SeqCst), 0);
    let plan = p.plan();
    let c = plan["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "cascade/ab")
        .unwrap();
    assert_eq!(
        (c["rows"].as_u64(), c["to_run"].as_u64()),
        (Some(12), Some(0))
    );
    let reached = &plan["cascades"][0]["reached"];
    assert_eq!(reached[1].as_u64(), Some(unsure.len() as u64), "{plan}");

    // The report: the cascade's table and chart, its stage per row, its findings.
    let html = p.read("reports/t/index.html");
    assert!(html.contains("<h3>Cascades</h3>"));
    assert!(html.contains("Accuracy vs cost: model cells and cascades"));
    let findings = p.read("reports/t/findings.md");
    assert!(
        findings.contains(&format!(
            "The cascade cascade/ab sends {:.1}% of rows on from a/p1/ll to b/p1/ll",
            100.0 * unsure.len() as f64 / 12.0
        )),
        "{findings}"
    );
    assert!(
        findings.contains("computed only the rows sent to it"),
        "{findings}"
    );
}

#[test]
fn a_cascade_of_two_grid_cells_computes_nothing_more_and_is_compared_with_both() {
    let p = project(&spec(common::CASCADE_MARGIN, true));
    let calls = run(&p, &RunOptions::default());
    // Both models computed every row as cells of their own; the cascade added nothing.
    assert_eq!(calls.prompts_of("a"), 12);
    assert_eq!(calls.prompts_of("b"), 12);
    let (_, cells) = predictions(&p);
    let (first, last) = (cell(&cells, "a/p1/ll"), cell(&cells, "b/p1/ll"));
    for c in cell(&cells, "cascade/ab") {
        let want = if gap(&first[c.row]) < 2.0 {
            &last[c.row]
        } else {
            &first[c.row]
        };
        assert_eq!(c.predicted, want.predicted, "row {}", c.row);
    }
    let findings = p.read("reports/t/findings.md");
    assert!(
        findings.contains("against its last cell alone it"),
        "{findings}"
    );
    assert!(
        findings.contains("against its first cell alone it"),
        "{findings}"
    );
    // Every threshold on the curve could be chosen: it reaches sending every row on.
    let m = metrics_row(&p, "cascade/ab");
    assert!(m.contains("cascade_time_vs_first"), "{m}");
}

/// The metrics table's columns and the cascade cell's values, as text.
fn metrics_row(p: &Project, cell: &str) -> String {
    p.run_ok(&[
        "export",
        "spec.yaml",
        "--format",
        "csv",
        "--backend",
        "fake",
    ]);
    let csv = p.read("reports/t/metrics.csv");
    let mut lines = csv.lines();
    let head = lines.next().unwrap().to_string();
    let row = lines
        .find(|l| l.starts_with(cell))
        .unwrap_or("")
        .to_string();
    format!("{head}\n{row}")
}

const FRACTION: &str = "  - id: ab\n    first: a/p1/ll\n    then: b/p1/ll\n    escalate: {fraction: 0.25, fit: {from: data/train.jsonl, n: 20, seed: 2}}\n";

#[test]
fn a_fraction_threshold_is_fitted_on_train_rows_never_on_the_rows_it_scores() {
    let p = project(&spec(FRACTION, false));
    let calls = run(&p, &RunOptions::default());
    let (planned, cells) = predictions(&p);
    let plan = &planned.plan;
    let res = planned.decided.resolution(0).cloned().unwrap();
    let t = res.thresholds[0].expect("fitted");
    assert_eq!(res.fit_rows[0], Some(20));
    // The fit rows are the train file's rows, scored by the first model.
    let fit = plan.cascades[0].fit_stages[0].expect("a fit stage");
    let fit_cell = &plan.support[fit];
    let set = &plan.sets[fit_cell.set];
    assert_eq!(set.rows.len(), 20);
    assert!(
        set.rows.iter().all(|r| r.id.starts_with('t')),
        "train rows only"
    );
    // A gated cell's plan holds every row's key; the routing says which it computes.
    let full = fit_cell.clone();
    let rows = planned
        .cache
        .rows(pipeline::cascade::stage_keys(plan))
        .unwrap();
    let margins: Vec<f64> = (0..20)
        .map(|r| gap(&metrics::predict(plan, &rows, 0, &full, r, None, &HashSet::new()).unwrap()))
        .collect();
    assert_eq!(
        margins.iter().filter(|m| **m < t).count(),
        5,
        "a quarter of the fit rows fall under the threshold ({t}): {margins:?}"
    );
    // a: 12 evaluation + 20 fit rows; b: the evaluation rows under the threshold only (no
    // fit row goes on: the last stage is never scored on fit rows).
    let under = cell(&cells, "a/p1/ll")
        .iter()
        .filter(|p| gap(p) < t)
        .count();
    assert_eq!(calls.prompts_of("a"), 32);
    assert_eq!(calls.prompts_of("b"), under);

    // More evaluation rows leave the threshold as it was: it never sees them.
    p.write(
        "spec.yaml",
        &spec(FRACTION, false).replace("n: 12, stratify", "n: 16, stratify"),
    );
    run(&p, &RunOptions::default());
    let (planned, _) = predictions(&p);
    let res16 = planned.decided.resolution(0).cloned().unwrap();
    assert_eq!(res16.thresholds[0], Some(t));
    assert_eq!(res16.answered_by.len(), 16);
    // Other fit rows give another threshold.
    p.write(
        "spec.yaml",
        &spec(&FRACTION.replace("seed: 2", "seed: 9"), false),
    );
    let before_fit = p.plan();
    assert_eq!(
        before_fit["cascades"][0]["thresholds"][0],
        serde_json::Value::Null,
        "not fitted until its rows are computed"
    );
    run(&p, &RunOptions::default());
    let (planned, _) = predictions(&p);
    let other = planned.decided.resolution(0).cloned().unwrap();
    assert_ne!(other.thresholds[0], Some(t));
}

#[test]
fn a_chain_sends_on_fewer_rows_at_each_step() {
    let chain = "  - {id: abc, first: a/p1/ll, then: [b/p1/ll, 'c/p1/gen@t=0'], escalate: [{margin: 4.0}, {margin: 3.0}]}\n";
    let p = project(&spec(chain, false));
    let calls = run(&p, &RunOptions::default());
    let (b, c) = (calls.prompts_of("b"), calls.prompts_of("c"));
    assert!(b > 0 && c > 0 && c <= b, "b {b}, c {c}");
    let (planned, cells) = predictions(&p);
    let res = planned.decided.resolution(0).cloned().unwrap();
    assert_eq!(res.reached, vec![12, b, c]);
    let stages: Vec<usize> = cell(&cells, "cascade/abc")
        .iter()
        .map(|p| p.stage.unwrap())
        .collect();
    assert_eq!(stages.iter().filter(|s| **s == 2).count(), c);
    // The last stage generates: its answers are parsed text, not scores.
    assert!(
        cell(&cells, "cascade/abc")
            .iter()
            .filter(|p| p.stage == Some(2))
            .all(|p| p.raw.is_some())
    );
}

#[test]
fn a_sharded_run_computes_the_first_stage_and_a_later_run_the_rest() {
    let p = project(&spec(common::CASCADE_MARGIN, false));
    for i in 0..2 {
        let calls = run(
            &p,
            &RunOptions {
                shard: Some(pipeline::shard::Shard { index: i, count: 2 }),
                ..RunOptions::default()
            },
        );
        assert_eq!(
            calls.prompts_of("b"),
            0,
            "the rows b needs are not known yet"
        );
    }
    let plan = p.plan();
    let note = plan["cascades"][0]["note"].as_str().unwrap().to_string();
    assert!(
        note.contains("stage rows to run before the rest is known"),
        "{note}"
    );
    let pending = plan["cascades"][0]["pending"].as_u64().unwrap();
    assert!(pending > 0);
    // A second round of shards computes what the first stage sends on, once.
    let mut b = 0;
    for i in 0..2 {
        b += run(
            &p,
            &RunOptions {
                shard: Some(pipeline::shard::Shard { index: i, count: 2 }),
                ..RunOptions::default()
            },
        )
        .prompts_of("b");
    }
    assert_eq!(b as u64, pending);
    assert_eq!(p.plan()["cascades"][0]["answered"].as_u64(), Some(12));
}

fn input_error(p: &Project) -> String {
    common::plan_error(p)
}

#[test]
fn bad_cascades_are_located_errors() {
    let cases: [(&str, &str, &str); 6] = [
        (
            "  - {id: x, first: a/p1/gen@t=0, then: b/p1/ll, escalate: {margin: 1}}\n",
            "cascades[0].first",
            "every stage but the last must be a `loglik` or `probe` cell",
        ),
        (
            "  - {id: x, first: a/p1/nope, then: b/p1/ll, escalate: {margin: 1}}\n",
            "cascades[0].first",
            "no model cell `a/p1/nope`",
        ),
        (
            "  - {id: x, first: a/p1/ll, then: b/p1/ll, escalate: {margin: 1, fraction: 0.2}}\n",
            "cascades[0].escalate",
            "not both",
        ),
        (
            "  - {id: x, first: a/p1/ll, then: b/p1/ll, escalate: {fraction: 0.2}}\n",
            "cascades[0].escalate.fit",
            "add `fit: {from: PATH, n: N, seed: S}`",
        ),
        (
            "  - {id: x, first: a/p1/ll, then: [b/p1/ll, c/p1/ll], escalate: [{margin: 1}, {margin: 1}, {margin: 1}]}\n",
            "cascades[0].escalate",
            "one per step (2), not 3",
        ),
        (
            "  - {id: x, first: a/p1/ll, then: a/p1/ll, escalate: {margin: 1}}\n",
            "cascades[0].then",
            "already a stage of this cascade",
        ),
    ];
    for (cascade, field, message) in cases {
        let p = project(&spec(cascade, false));
        let err = input_error(&p);
        assert!(err.contains("spec.yaml:"), "located: {err}");
        assert!(err.contains(field), "{field} in {err}");
        assert!(err.contains(message), "{message} in {err}");
    }
}

#[test]
fn a_model_with_a_prompt_list_has_cells_only_for_those_prompts() {
    let text = spec(
        "  - {id: ab2, first: a/p2/ll, then: b/p2/ll, escalate: {margin: 2.0}}\n",
        true,
    )
    .replace("    grid: true\n", "    prompts: [p1]\n")
    .replace(
        "prompts:\n  - id: p1\n",
        "prompts:\n  - id: p2\n    user: {file: prompts/p2.j2}\n  - id: p1\n",
    );
    let p = project(&text);
    let calls = run(&p, &RunOptions::default());
    let (_, cells) = predictions(&p);
    let ids: Vec<&str> = cells.iter().map(|(id, _)| id.as_str()).collect();
    for want in ["a/p2/ll", "a/p1/ll", "b/p1/ll", "b/p1/gen", "cascade/ab2"] {
        assert!(
            ids.iter().any(|id| id.starts_with(want)),
            "{want} in {ids:?}"
        );
    }
    assert!(!ids.iter().any(|id| id.starts_with("b/p2/")), "{ids:?}");
    // Model b computes its p1 cells for every row, and on p2 only the rows the cascade
    // sends it: its p2 cell is a cascade's support cell, not a cell of the grid.
    let first = cell(&cells, "a/p2/ll");
    let sent = first.iter().filter(|r| gap(r) < 2.0).count();
    assert!(sent > 0 && sent < 12, "{sent}");
    assert_eq!(calls.prompts_of("b"), 12 + sent);
    assert_eq!(cell(&cells, "cascade/ab2").len(), 12);

    // A comparison can only name cells of the grid.
    let p = project(&format!(
        "{text}compare:\n  pairs:\n    - [b/p2/ll, a/p2/ll]\n"
    ));
    let err = input_error(&p);
    assert!(err.contains("spec.yaml:"), "located: {err}");
    assert!(err.contains("compare.pairs[0][0]"), "{err}");
    assert!(err.contains("no cell `b/p2/ll`"), "{err}");
}
