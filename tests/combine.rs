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
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("ensembles[0].cells[1]") && e.contains("no cell `fake-a/zero/nope`"),
        "{e}"
    );
    let spec = common::SPEC.to_string()
        + "ensembles:\n  - {id: mix, cells: [fake-a/p1/ll, fake-a/p1/gen@t=0.2]}\n";
    p.write("spec.yaml", &spec);
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
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
