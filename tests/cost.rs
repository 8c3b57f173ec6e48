//! Cost that load cannot move (issue #31). The same spec's rows are computed twice: once on
//! a quiet fake backend in one run, once on one that sleeps on every prompt (a busy
//! machine) in two runs (the rows in another order). The wall-clock figures differ; the
//! compute costs, the cascade's cost against each stage alone and every Finding are the
//! same, and the compute is what the rows' tokens and the models' sizes say.

mod common;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type};
use common::Project;
use std::collections::BTreeMap;

const SMALL: f64 = 1e8;
const LARGE: f64 = 4e8;

const SPEC: &str = r#"name: cost
dataset:
  path: data/reviews.jsonl
  id: id
  text: text
  label: label
  labels: {0: negative, 1: positive}
models:
  - id: small
    gguf: models/a.gguf
    n_ctx: 512
    parameters: 100000000
  - id: large
    gguf: models/b.gguf
    n_ctx: 512
    parameters: 400000000
prompts:
  - id: short
    user: {file: prompts/p1.j2}
  - id: long
    user: {file: prompts/long.j2}
methods:
  - id: ll
    kind: loglik
  - id: gen
    kind: generate
    max_tokens: 4
sampling:
  temperature: 0.0
cascades:
  - {id: ab, first: small/long/ll, then: large/long/ll, escalate: {margin: 2.0}}
"#;

fn project() -> Project {
    let p = Project::new();
    pipeline::model::write_fake_gguf(&p.path("models/b.gguf"), b"fake model b").unwrap();
    // A prompt with a long fixed instruction: most of each row's prompt is the shared
    // prefix, which a row does not pay for.
    p.write(
        "prompts/long.j2",
        "You grade film reviews for a study of how people write about films. Read the review, weigh what it says, and answer with one word only.\nReview: {{ text }}\nAnswer {{ labels | join(' or ') }}.\n",
    );
    p.write("spec.yaml", SPEC);
    p
}

fn numbers(b: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    let col = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"));
    let col = arrow::compute::cast(col, &DataType::Float64).unwrap();
    let a = col.as_primitive::<Float64Type>();
    (0..a.len())
        .map(|i| (!a.is_null(i)).then(|| a.value(i)))
        .collect()
}

fn strings(b: &RecordBatch, name: &str) -> Vec<String> {
    let col = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"));
    let a = col.as_string::<i32>();
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

/// A metrics column by cell id.
fn by_cell(metrics: &RecordBatch, name: &str) -> BTreeMap<String, Option<f64>> {
    strings(metrics, "cell")
        .into_iter()
        .zip(numbers(metrics, name))
        .collect()
}

#[test]
fn compute_costs_and_findings_do_not_move_with_the_load_that_wall_clock_does() {
    let quiet = project();
    quiet.run_ok(&["run", "spec.yaml", "--backend", "fake"]);
    let busy = project();
    // A busy machine: every prompt takes 15 ms longer, and the rows run in two parts.
    for args in [
        &["run", "spec.yaml", "--backend", "fake", "--limit", "7"][..],
        &["run", "spec.yaml", "--backend", "fake"][..],
    ] {
        let out = busy
            .cmd(args)
            .env("PIPELINE_FAKE_DELAY_MS", "15")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let report = |p: &Project, table: &str| {
        common::read_parquet_batch(&p.path(&format!("reports/cost/{table}.parquet")))
    };
    let (mq, mb) = (report(&quiet, "metrics"), report(&busy, "metrics"));
    // The wall-clock did move: the busy run's model cells are slower.
    let (speed_q, speed_b) = (by_cell(&mq, "rows_per_s"), by_cell(&mb, "rows_per_s"));
    for cell in ["small/short/ll", "large/long/gen@t=0"] {
        let (q, b) = (speed_q[cell].unwrap(), speed_b[cell].unwrap());
        assert!(b < q, "{cell}: {b} rows/s busy, {q} quiet");
    }
    // Compute did not.
    for col in [
        "work_prompt_tokens_per_row",
        "work_gen_tokens_per_row",
        "gflop_per_row",
        "cascade_compute_vs_first",
        "cascade_compute_vs_last",
    ] {
        assert_eq!(by_cell(&mq, col), by_cell(&mb, col), "{col}");
    }
    let findings = |p: &Project| p.read("reports/cost/findings.md");
    assert_eq!(findings(&quiet), findings(&busy));
    let text = findings(&quiet);
    let cost: Vec<&str> = text.lines().filter(|l| l.contains("**cost**")).collect();
    assert!(
        cost.iter()
            .any(|l| l.contains("large costs 4.") && l.contains("× the compute of small per row")),
        "{cost:?}"
    );
    let cascade: Vec<&str> = text.lines().filter(|l| l.contains("**cascade**")).collect();
    assert!(
        cascade
            .iter()
            .any(|l| l.contains("× the compute of small/long/ll alone")
                && l.contains("× the compute of large/long/ll alone")),
        "{cascade:?}"
    );
    assert!(
        !text.contains("rows/s") && !text.contains("the time of"),
        "{text}"
    );

    // The compute is 2 × parameters × the row's own tokens.
    let preds = report(&quiet, "predictions");
    let (cells, models) = (strings(&preds, "cell"), strings(&preds, "model"));
    let (prompt, work, generated, gflop) = (
        numbers(&preds, "prompt_tokens"),
        numbers(&preds, "work_prompt_tokens"),
        numbers(&preds, "work_gen_tokens"),
        numbers(&preds, "gflop"),
    );
    let mut prefix: BTreeMap<&str, f64> = BTreeMap::new();
    for i in 0..cells.len() {
        let (w, g) = (work[i].unwrap(), generated[i].unwrap());
        if cells[i].starts_with("cascade/") {
            continue;
        }
        let params = if models[i] == "small" { SMALL } else { LARGE };
        let expected = 2.0 * params * (w + g) / 1e9;
        assert!((gflop[i].unwrap() - expected).abs() < 1e-9, "row {i}");
        // Every row of a cell leaves out one and the same prefix (single-token labels add
        // nothing after the prompt).
        let left_out = prompt[i].unwrap() - w;
        let p = *prefix.entry(&cells[i]).or_insert(left_out);
        assert_eq!(p, left_out, "{}", cells[i]);
    }
    assert!(
        prefix["small/long/ll"] > 20.0 && prefix["small/long/ll"] > 5.0 * prefix["small/short/ll"],
        "{prefix:?}"
    );
    // A cascade row costs the first stage's row plus, where it went on, the last's.
    let m = by_cell(&mq, "gflop_per_row");
    let (first, cascade) = (m["small/long/ll"].unwrap(), m["cascade/ab"].unwrap());
    let last = m["large/long/ll"].unwrap();
    let escalated = by_cell(&mq, "cascade_escalated")["cascade/ab"].unwrap();
    assert!(escalated > 0.0 && escalated < 1.0, "{escalated}");
    assert!((cascade - (first + escalated * last)).abs() < 1e-9 * cascade.max(1.0));
    let vs_last = by_cell(&mq, "cascade_compute_vs_last")["cascade/ab"].unwrap();
    assert!((vs_last - cascade / last).abs() < 1e-9, "{vs_last}");

    // The page says what the wall-clock was measured under.
    let page = quiet.read("reports/cost/index.html");
    assert!(page.contains("Wall-clock figures"), "no wall-clock note");
    assert!(page.contains("of its threads&#x27; time") || page.contains("of its threads' time"));
}

#[test]
fn a_stated_parameter_count_is_checked_against_the_gguf_header() {
    // A fake model file has no readable header: the spec's count stands. A wrong count
    // against a real header is refused in tests/real_model.rs.
    let p = project();
    let out = p.run_ok(&["plan", "spec.yaml", "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(plan.is_object());
    p.write(
        "spec.yaml",
        &SPEC.replace("parameters: 100000000", "parameters: 0"),
    );
    let out = p.cmd(&["plan", "spec.yaml"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("spec.yaml:12") && err.contains("models[0].parameters"),
        "{err}"
    );
}
