//! The plan as a DAG of cached stages, with the fake backend: embeddings are computed once
//! per embedder and text, editing `k` re-ranks and re-renders but embeds nothing, changing
//! the embedder file re-embeds, a cached spec loads no model; the leak guard; neighbours
//! that are the same in every run and process; and bad input to the new stages.

mod common;

use std::sync::atomic::Ordering;

use common::{KNN_SPEC, Project, knn_project};
use pipeline::backend::fake::EMBEDDER_MARKER;

/// What one in-process run asked of the fake backend.
#[derive(Debug, PartialEq)]
struct Calls {
    embedders_loaded: usize,
    texts_embedded: usize,
    models_loaded: usize,
    prompts: usize,
}

fn run(p: &Project) -> Calls {
    let calls = common::fake_run(p);
    Calls {
        embedders_loaded: calls.embedders_loaded.load(Ordering::SeqCst),
        texts_embedded: calls.texts_embedded.load(Ordering::SeqCst),
        models_loaded: calls.models_loaded.load(Ordering::SeqCst),
        prompts: calls.prompts.load(Ordering::SeqCst),
    }
}

fn stage(plan: &serde_json::Value, id: &str) -> (u64, u64) {
    let s = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no stage {id} in {plan}"));
    (s["items"].as_u64().unwrap(), s["cached"].as_u64().unwrap())
}

#[test]
fn a_stage_runs_only_for_its_missing_items() {
    let p = knn_project();
    let before = p.plan();
    let (texts, cached) = stage(&before, "embed:emb");
    // 30 pool rows + 40 vote pool rows + queries: 12 eval, 10 fit, 3 content-free (some
    // texts shared).
    assert!(texts >= 70, "{texts}");
    assert_eq!(cached, 0);
    let first = run(&p);
    assert_eq!(first.embedders_loaded, 1);
    assert_eq!(first.texts_embedded as u64, texts);
    assert_eq!(first.models_loaded, 1);
    // Every stage is cached now; a second run loads no model at all.
    let after = p.plan();
    for s in after["stages"].as_array().unwrap() {
        let kind = s["kind"].as_str().unwrap();
        if ["embed", "neighbours", "infer", "calibrate"].contains(&kind) {
            assert_eq!(s["items"], s["cached"], "{s}");
        }
    }
    assert_eq!(
        run(&p),
        Calls {
            embedders_loaded: 0,
            texts_embedded: 0,
            models_loaded: 0,
            prompts: 0
        }
    );

    // Editing k: neighbours and knn prompts change, no text is embedded again.
    p.write("spec.yaml", &KNN_SPEC.replace("k: 4, from", "k: 2, from"));
    let plan = p.plan();
    assert_eq!(stage(&plan, "embed:emb"), (texts, texts));
    let (queries, cached) = stage(&plan, "neighbours:prompt:knn");
    assert_eq!(cached, 0, "new k, new neighbour keys ({queries} queries)");
    let edited = run(&p);
    assert_eq!(edited.texts_embedded, 0);
    assert_eq!(edited.embedders_loaded, 0);
    // Only the knn prompt's rows run again: 12 evaluation + 10 fit + 3 content-free.
    assert_eq!(edited.prompts, 25, "{edited:?}");

    // Another embedder file: everything is embedded again.
    let mut payload = EMBEDDER_MARKER.to_vec();
    payload.extend_from_slice(b" v2, retrained");
    pipeline::model::write_fake_gguf(&p.path("models/emb.gguf"), &payload).unwrap();
    let plan = p.plan();
    assert_eq!(stage(&plan, "embed:emb"), (texts, 0));
    let reembedded = run(&p);
    assert_eq!(reembedded.texts_embedded as u64, texts);
    // `plan --explain` says why, per stage.
    p.write("spec.yaml", &KNN_SPEC.replace("k: 4, from", "k: 6, from"));
    let out = p.run_ok(&[
        "plan",
        "spec.yaml",
        "--backend",
        "fake",
        "--explain",
        "neighbours:prompt:knn",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("stage neighbours:prompt:knn: 25 queries, 0 cached"),
        "{text}"
    );
}

#[test]
fn the_leak_guard_never_retrieves_the_query_itself() {
    let p = knn_project();
    run(&p);
    let plan = p.plan();
    let guard = plan["leak_guard"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["retrieval"] == "prompt:knn")
        .unwrap()
        .clone();
    // The pool is the evaluation file itself: every evaluation row is in it.
    assert!(
        guard["queries_with_self_excluded"].as_u64().unwrap() >= 12,
        "{guard}"
    );
    let preds = common::read_parquet_lists(&p.path("reports/t/predictions.parquet"), "shot_ids");
    let mut checked = 0;
    for (row_id, cell, shots) in preds {
        if cell.starts_with("fake-a/knn/") {
            assert!(
                !shots.contains(&row_id),
                "{row_id} retrieved itself: {shots:?}"
            );
            assert_eq!(shots.len(), 4);
            checked += 1;
        }
    }
    assert_eq!(checked, 36);
}

#[test]
fn neighbours_are_the_same_in_every_run_and_process() {
    let a = knn_project();
    let b = knn_project();
    a.run_ok(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
    b.run_ok(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
    let shots = |p: &Project| {
        let mut v =
            common::read_parquet_lists(&p.path("reports/t/predictions.parquet"), "shot_ids");
        v.sort();
        let mut s = common::read_parquet_lists(
            &p.path("reports/t/predictions.parquet"),
            "shot_similarities",
        );
        s.sort();
        (v, s)
    };
    assert_eq!(shots(&a), shots(&b));
    // And the report reads the stored neighbours back without recomputing a thing.
    a.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
    assert_eq!(shots(&a), shots(&b));
}

fn input_error(p: &Project) -> String {
    let out = p
        .cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn bad_input_to_the_new_stages_is_a_located_error_and_loses_nothing() {
    let p = knn_project();
    // Rows already computed by a spec without retrieval...
    p.run_ok(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
    let done = p.run_json()["computed_rows"].as_u64().unwrap();
    assert!(done > 0);

    // An embedder that is not an embedding model.
    pipeline::model::write_fake_gguf(&p.path("models/emb.gguf"), b"a chat model").unwrap();
    let e = input_error(&p);
    assert!(
        e.contains(&format!(
            "spec.yaml:{}:",
            line_of(KNN_SPEC, "gguf: models/emb.gguf")
        )) && e.contains("embedders[0].gguf")
            && e.contains("not an embedding model"),
        "{e}"
    );
    let mut payload = EMBEDDER_MARKER.to_vec();
    payload.extend_from_slice(b" v1");
    pipeline::model::write_fake_gguf(&p.path("models/emb.gguf"), &payload).unwrap();

    // k larger than the pool (30 rows, 15 of each label).
    let spec = KNN_SPEC.replace("k: 4, from", "k: 40, from");
    p.write("spec.yaml", &spec);
    let e = input_error(&p);
    assert!(
        e.contains(&format!("spec.yaml:{}:", line_of(&spec, "k: 40"))),
        "{e}"
    );
    assert!(
        e.contains("prompts[1].shots.k") && e.contains("the pool has only"),
        "{e}"
    );

    // A pool without the label column.
    p.write("data/nolabel.jsonl", "{\"id\": \"x\", \"text\": \"t\"}\n");
    let spec = KNN_SPEC.replace(
        "k: 4, from: data/reviews.jsonl",
        "k: 4, from: data/nolabel.jsonl",
    );
    p.write("spec.yaml", &spec);
    let e = input_error(&p);
    assert!(
        e.contains("`label` not found") && e.contains("nolabel.jsonl"),
        "{e}"
    );

    // Calibration on a generate method.
    let spec = KNN_SPEC.replace(
        "  - id: ll\n    kind: loglik\n",
        "  - id: gen\n    kind: generate\n    calibrate: content_free\n",
    );
    p.write("spec.yaml", &spec);
    let e = input_error(&p);
    assert!(
        e.contains(&format!(
            "spec.yaml:{}:",
            line_of(&spec, "calibrate: content_free")
        )) && e.contains("`calibrate` applies to `kind: loglik` only"),
        "{e}"
    );

    // An unknown embedder, and knn options without `strategy: knn`.
    let spec = KNN_SPEC.replace("embedder: emb, per_label", "embedder: nope, per_label");
    p.write("spec.yaml", &spec);
    let e = input_error(&p);
    assert!(e.contains("no embedder `nope`"), "{e}");
    let spec = KNN_SPEC.replace("strategy: knn, ", "");
    p.write("spec.yaml", &spec);
    let e = input_error(&p);
    assert!(e.contains("applies to `strategy: knn` only"), "{e}");

    // Nothing computed was lost on the way.
    p.write("spec.yaml", KNN_SPEC);
    let again = p.run();
    assert_eq!(again["computed_rows"], 0, "{again}");
    assert_eq!(again["embed"]["embedded"], 0, "{again}");
}

/// A fit waits for all its rows: a calibrated cell has either no rows or exactly the rows of
/// a complete run, whatever a stop left in the cache (never a fit on the rows that happened
/// to be there).
#[test]
fn a_calibrated_cell_never_shows_a_fit_on_part_of_its_rows() {
    let full = knn_project();
    full.run();
    let cell_lines = |p: &Project| -> Vec<String> {
        common::predictions(&p.path("reports/t/predictions.parquet"))
            .into_iter()
            .filter(|l| l.starts_with("fake-a/knn/ll-fit"))
            .collect()
    };
    let expected = cell_lines(&full);
    assert_eq!(expected.len(), 12);
    let mut seen_partial = false;
    for stop_ms in [400u64, 1200, 1500, 1800, 2100, 2400, 2700, 3000] {
        let p = knn_project();
        let mut child = p
            .cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
            .env("PIPELINE_FAKE_DELAY_MS", "15")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(stop_ms));
        let _ = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        child.wait().unwrap();
        p.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
        let got = cell_lines(&p);
        assert!(
            got.is_empty() || got == expected,
            "stopped after {stop_ms} ms: {got:?}"
        );
        seen_partial |= got.is_empty();
    }
    assert!(
        seen_partial,
        "some stop came before the fit's rows were all computed"
    );
}

#[test]
fn plan_says_what_the_sample_can_resolve_before_anything_runs() {
    let p = Project::new();
    let plan = p.plan();
    // 12 rows, 10% discordant: no difference is detectable with 80% power.
    assert_eq!(plan["resolution"]["rows"], 12);
    assert!(
        plan["detectable_difference"].is_null(),
        "{}",
        plan["resolution"]
    );
    let half = plan["resolution"]["half_width_at_50"].as_f64().unwrap();
    assert!(half > 0.2 && half < 0.3, "{half}");
    // With most rows discordant, a large difference is.
    let out = p.run_ok(&[
        "plan",
        "spec.yaml",
        "--json",
        "--backend",
        "fake",
        "--discordant",
        "1",
        "--expect-accuracy",
        "0.9",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = v["detectable_difference"].as_f64().unwrap();
    assert!(d > 0.5 && d <= 1.0, "{d}");
    assert_eq!(v["resolution"]["expected_accuracy"], 0.9);
    // Out of range is refused by name.
    let bad = p
        .cmd(&["plan", "spec.yaml", "--discordant", "1.5"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a share"));
}
