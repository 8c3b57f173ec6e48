//! Cells made from other cells' scores, with no inference of their own: batch-calibrated
//! `loglik` cells and ensembles; and head-and-tail truncation, keyed apart from head-only.

mod common;

use std::collections::HashMap;

use common::{KNN_SPEC, Project, knn_project, read_parquet, read_parquet_lists};

/// `(cell, row) -> label log-probs` of the predictions table.
fn logprobs(p: &Project) -> HashMap<(String, String), Vec<f64>> {
    read_parquet_lists(&p.path("reports/t/predictions.parquet"), "label_logprobs")
        .into_iter()
        .map(|(row, cell, items)| {
            let lp = items.iter().map(|x| x.parse::<f64>().unwrap()).collect();
            ((cell, row), lp)
        })
        .collect()
}

fn normalise(lp: &[f64]) -> Vec<f64> {
    let z = lp.iter().map(|x| x.exp()).sum::<f64>().ln();
    lp.iter().map(|x| x - z).collect()
}

const WITH_BATCH_AND_ENSEMBLE: &str =
    "  - id: ll-batch\n    kind: loglik\n    calibrate: batch\n  - id: vote\n";
const ENSEMBLE: &str = "ensembles:\n  - {id: mix, cells: [fake-a/zero/ll-fit, fake-a/knn/ll-cf, emb/vote], weights: [2, 1, 1]}\n";

#[test]
fn batch_calibration_and_ensembles_add_cells_without_inference() {
    let p = knn_project();
    let first = p.run();
    assert!(first["computed_rows"].as_u64().unwrap() > 0, "{first}");

    let spec = KNN_SPEC.replace("  - id: vote\n", WITH_BATCH_AND_ENSEMBLE) + ENSEMBLE;
    p.write("spec.yaml", &spec);
    let plan = p.plan();
    let stage = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "ensemble:mix")
        .unwrap_or_else(|| panic!("{}", plan["stages"]))
        .clone();
    assert_eq!(stage["items"], 12, "{stage}");
    assert_eq!(
        stage["cached"], 12,
        "every member's rows are cached: {stage}"
    );
    for input in [
        "infer:fake-a",
        "calibrate:fake-a/zero/ll-fit",
        "neighbours:method:vote",
    ] {
        assert!(
            stage["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i == input),
            "{input} in {stage}"
        );
    }
    let again = p.run();
    assert_eq!(
        again["computed_rows"], 0,
        "batch calibration and ensembles reuse the rows: {again}"
    );

    let lp = logprobs(&p);
    let rows: Vec<String> = lp
        .keys()
        .filter(|(c, _)| c == "fake-a/zero/ll")
        .map(|(_, r)| r.clone())
        .collect();
    assert_eq!(rows.len(), 12);

    // Batch calibration: each label's mean normalised log-prob over the cell's own rows,
    // subtracted, then normalised again.
    let raw: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| normalise(&lp[&("fake-a/zero/ll".to_string(), r.clone())]))
        .collect();
    let mean: Vec<f64> = (0..2)
        .map(|k| raw.iter().map(|x| x[k]).sum::<f64>() / raw.len() as f64)
        .collect();
    for (r, x) in rows.iter().zip(&raw) {
        let expected = normalise(&[x[0] - mean[0], x[1] - mean[1]]);
        let got = &lp[&("fake-a/zero/ll-batch".to_string(), r.clone())];
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-9, "row {r}: {got:?} vs {expected:?}");
        }
    }

    // The ensemble: the weighted mean of the members' label probabilities.
    let members = [
        ("fake-a/zero/ll-fit", 0.5),
        ("fake-a/knn/ll-cf", 0.25),
        ("emb/vote", 0.25),
    ];
    let mut differs_from_every_member = false;
    for r in &rows {
        let mut p0 = 0.0;
        for (m, w) in members {
            p0 += w * normalise(&lp[&(m.to_string(), r.clone())])[0].exp();
        }
        let got = &lp[&("ensemble/mix".to_string(), r.clone())];
        assert!((got[0].exp() - p0).abs() < 1e-9, "row {r}: {got:?} vs {p0}");
        assert!((got[1].exp() - (1.0 - p0)).abs() < 1e-9, "row {r}: {got:?}");
        differs_from_every_member |= members
            .iter()
            .all(|(m, _)| (lp[&(m.to_string(), r.clone())][0] - got[0]).abs() > 1e-6);
    }
    assert!(differs_from_every_member);

    let metrics = read_parquet(&p.path("reports/t/metrics.parquet"));
    let cell = |id: &str| {
        metrics
            .iter()
            .find(|m| m["cell"] == id)
            .unwrap_or_else(|| panic!("no {id} in metrics"))
            .clone()
    };
    let e = cell("ensemble/mix");
    assert_eq!(e["kind"], "ensemble");
    assert_eq!(e["n"], 12);
    // Members share no model with the vote, so the model column names both.
    assert_eq!(e["model"], "fake-a+emb", "{e:?}");
    assert_eq!(cell("fake-a/zero/ll-batch")["n"], 12);
    let findings = p.read("reports/t/findings.md");
    assert!(
        findings.contains("The ensemble ensemble/mix averages 3 cells"),
        "{findings}"
    );
}

#[test]
fn an_ensemble_of_a_generation_or_an_unknown_cell_is_refused_where_it_is_written() {
    let p = knn_project();
    let spec = KNN_SPEC.to_string()
        + "ensembles:\n  - {id: mix, cells: [fake-a/zero/ll, fake-a/zero/nope]}\n";
    p.write("spec.yaml", &spec);
    let e = common::plan_error(&p);
    assert!(
        e.contains("ensembles[0].cells[1]") && e.contains("no cell `fake-a/zero/nope`"),
        "{e}"
    );
    let spec = common::SPEC.to_string()
        + "ensembles:\n  - {id: mix, cells: [fake-a/p1/ll, fake-a/p1/gen@t=0.2]}\n";
    p.write("spec.yaml", &spec);
    let e = common::plan_error(&p);
    assert!(e.contains("has no label probabilities to average"), "{e}");
}

#[test]
fn a_head_and_tail_budget_keys_its_rows_apart_from_a_head_only_one() {
    let p = Project::new();
    let spec = |truncate: &str| {
        common::SPEC.replace(
            "  sample: {n: 12, stratify: true, seed: 5}\n",
            &format!(
                "  sample: {{n: 12, stratify: true, seed: 5}}\n  max_text_tokens: 4\n{truncate}"
            ),
        )
    };
    p.write("spec.yaml", &spec(""));
    p.run();
    p.write("spec.yaml", &spec("  truncate: head_tail\n"));
    let head_tail = p.run();
    assert_eq!(
        head_tail["computed_rows"].as_u64(),
        Some(12 * 3 * 2),
        "every row is new: {head_tail}"
    );
    // Back to head-only: everything is cached.
    p.write("spec.yaml", &spec("  truncate: head\n"));
    assert_eq!(p.run()["computed_rows"], 0);
}

/// Prompt evaluations one in-process run asked of the fake backend.
fn prompts_evaluated(p: &Project) -> usize {
    common::fake_run(p)
        .prompts
        .load(std::sync::atomic::Ordering::SeqCst)
}

const PROBE: &str = "  - id: probe\n    kind: probe\n    layer: [0.5, 3, last]\n    pool: [last, mean]\n    fit: {from: data/train.jsonl, n: 20, seed: 1}\n  - id: vote\n";

#[test]
fn a_probe_reads_hidden_states_from_the_loglik_evaluation_and_is_fitted_on_other_rows() {
    let p = knn_project();
    // Only the zero-shot prompt, so that counts are simple: loglik on 12 rows.
    let base = KNN_SPEC.replace(
        "  - id: knn\n    user: \"{% for e in examples %}{{ e.text }} => {{ e.label }}\\n{% endfor %}Review: {{ text }}\"\n    shots: {strategy: knn, k: 4, from: data/reviews.jsonl, embedder: emb, per_label: true}\n",
        "",
    );
    assert_ne!(base, KNN_SPEC, "the knn prompt was taken out");
    p.write("spec.yaml", &base);
    let without = prompts_evaluated(&p);

    // With a probe: its evaluation rows share the loglik rows' prompt evaluations; only its
    // 20 fit rows are evaluated anew (the loglik fit rows are another sample).
    let fresh = knn_project();
    let spec = base.replace("  - id: vote\n", PROBE);
    fresh.write("spec.yaml", &spec);
    let with = prompts_evaluated(&fresh);
    assert_eq!(with, without + 20, "without {without}, with {with}");

    let metrics = read_parquet(&fresh.path("reports/t/metrics.parquet"));
    let probe = metrics
        .iter()
        .find(|m| m["cell"] == "fake-a/zero/probe")
        .unwrap_or_else(|| panic!("{metrics:?}"));
    assert_eq!(probe["kind"], "probe");
    assert_eq!(probe["n"], 12);
    // The fake mean-pooled states are bags of the prompt's words, which carry the label:
    // the probe is right on every row; and the pooling chosen on the fit rows is `mean`.
    assert_eq!(probe["accuracy"], 1.0, "{probe:?}");
    let html = common::report_html(&fresh);
    assert!(html.contains("mean at C ="), "the fit is shown");
    // 2 layers × 2 poolings and the last layer's last position, each at 5 strengths.
    assert!(
        html.contains("among 25 settings"),
        "every setting was tried"
    );
    // Each of the five settings is listed with its cross-validated accuracy, one chosen.
    assert!(
        html.contains("Probe settings"),
        "the settings table is shown"
    );
    assert_eq!(
        html.matches("layer last, last").count(),
        1,
        "each setting once"
    );
    assert!(html.contains(">chosen<"), "the chosen setting is marked");
    // The hidden states are cached: a second run computes nothing.
    assert_eq!(fresh.run()["computed_rows"], 0);
    assert_eq!(prompts_evaluated(&fresh), 0);

    // Never fitted on the evaluated rows: a fit file that is the evaluation file leaves
    // the evaluation rows out (18 of its 30 rows remain for 12 evaluated).
    let leak = spec.replace(
        "fit: {from: data/train.jsonl, n: 20, seed: 1}",
        "fit: {from: data/reviews.jsonl, n: 30, seed: 1}",
    );
    fresh.write("spec.yaml", &leak);
    let plan = fresh.plan();
    let fit = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "calibrate:fake-a/zero/probe")
        .unwrap()
        .clone();
    assert_eq!(fit["items"], 1, "{fit}");
    let run = fresh.run_ok(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
    assert!(run.status.success());
    let ids = read_parquet_lists(
        &fresh.path("reports/t/predictions.parquet"),
        "label_logprobs",
    )
    .into_iter()
    .filter(|(_, c, _)| c == "fake-a/zero/probe")
    .count();
    assert_eq!(ids, 12);

    // A probe as a cascade's first stage: its log-odds are the margin; a threshold fitted
    // on other train rows sends the least sure on.
    let cascade = spec
        + "cascades:\n  - {id: pc, first: fake-a/zero/probe, then: fake-a/zero/ll, escalate: {fraction: 0.3, fit: {from: data/train.jsonl, n: 10, seed: 9}}}\n";
    fresh.write("spec.yaml", &cascade);
    fresh.run();
    let metrics = read_parquet(&fresh.path("reports/t/metrics.parquet"));
    let c = metrics
        .iter()
        .find(|m| m["cell"] == "cascade/pc")
        .unwrap_or_else(|| panic!("{metrics:?}"));
    assert_eq!(c["n"], 12, "{c:?}");
}

#[test]
fn a_probe_of_the_last_layer_pooled_by_mean_is_refused_where_it_is_written() {
    let p = knn_project();
    let spec = KNN_SPEC.replace(
        "  - id: vote\n",
        "  - id: probe\n    kind: probe\n    layer: last\n    pool: mean\n    fit: {from: data/train.jsonl, n: 20}\n  - id: vote\n",
    );
    p.write("spec.yaml", &spec);
    let e = common::plan_error(&p);
    assert!(
        e.contains("methods[3].pool") && e.contains("only where logits are read"),
        "{e}"
    );
}

#[test]
fn a_probe_on_an_embedders_vectors_is_a_cell_without_a_model() {
    let p = knn_project();
    let spec = KNN_SPEC.replace(
        "  - id: vote\n",
        "  - id: emb-probe\n    kind: probe\n    embedder: emb\n    fit: {from: data/train.jsonl, n: 20, seed: 1}\n  - id: vote\n",
    );
    p.write("spec.yaml", &spec);
    p.run();
    let metrics = read_parquet(&p.path("reports/t/metrics.parquet"));
    let m = metrics
        .iter()
        .find(|m| m["cell"] == "emb/emb-probe")
        .unwrap_or_else(|| panic!("{metrics:?}"));
    assert_eq!(m["kind"], "probe");
    assert_eq!(m["model"], "emb");
    assert_eq!(m["n"], 12);
    // The fake embedder's vectors are bags of words, and the label words are shared.
    assert_eq!(m["accuracy"], 1.0, "{m:?}");
    // Its fit rows and the evaluation rows were embedded by the embed stage; nothing
    // else is computed for it, and a second run computes nothing at all.
    let again = p.run();
    assert_eq!(again["computed_rows"], 0);
    assert_eq!(again["embed"]["embedded"], 0, "{again}");
    // `layer` and `pool` are a model's; an embedder's probe reads its one vector.
    p.write(
        "spec.yaml",
        &spec.replace("    embedder: emb\n", "    embedder: emb\n    layer: 0.5\n"),
    );
    let e = common::plan_error(&p);
    assert!(
        e.contains("methods[3].layer") && e.contains("an embedder's probe"),
        "{e}"
    );
}
