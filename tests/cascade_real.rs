//! A cascade on real models: SmolLM2-135M answers every review, Qwen2.5-Coder-0.5B (no cells
//! of its own) only the reviews SmolLM2 is unsure of. Both found through
//! `$PIPELINE_MODELS_DIR`; listed as ignored without them, failing under `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use arrow::array::{Array, AsArray};
use libtest_mimic::{Arguments, Failed};

const SMOLLM2: &str = "SmolLM2-135M-Instruct-Q4_1.gguf";
const QWEN: &str = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf";
/// Nats: SmolLM2's label margins on these reviews fall on both sides of it.
const MARGIN: f64 = 0.5;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let missing = [SMOLLM2, QWEN].iter().find_map(|f| model(f).err());
    let trials = common::trials_needing(
        "SmolLM2-135M and Qwen2.5-Coder-0.5B",
        missing,
        vec![(
            "smollm2_then_qwen_runs_the_large_model_on_unsure_reviews_only",
            smollm2_then_qwen_runs_the_large_model_on_unsure_reviews_only,
        )],
    );
    libtest_mimic::run(&args, trials).exit_code()
}

fn model(file: &str) -> Result<PathBuf, String> {
    let dir = std::env::var_os("PIPELINE_MODELS_DIR").ok_or("PIPELINE_MODELS_DIR is not set")?;
    let p = PathBuf::from(dir).join(file);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} does not exist", p.display()))
    }
}

fn write_spec(p: &common::Project, small: &Path, large: &Path) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/data/imdb/test.parquet");
    p.write(
        "spec.yaml",
        &format!(
            r#"name: t
dataset:
  path: {data}
  id: id
  text: text
  label: label
  labels: {{0: negative, 1: positive}}
  sample: {{n: 12, stratify: true, seed: 7}}
  clean: {{replace: {{"<br />": " "}}, collapse_whitespace: true}}
  max_text_tokens: 96
models:
  - id: smollm2
    gguf: {small}
    n_ctx: 1024
  - id: qwen
    gguf: {large}
    n_ctx: 1024
    grid: false
prompts:
  - id: p1
    system: "You classify movie reviews."
    user: {{file: prompts/p1.j2}}
methods:
  - id: ll
    kind: loglik
cascades:
  - {{id: small-first, first: smollm2/p1/ll, then: qwen/p1/ll, escalate: {{margin: {MARGIN}}}}}
"#,
            data = data.display(),
            small = small.display(),
            large = large.display(),
        ),
    );
}

/// (cell, row id, cascade stage, negative and positive log-probs) of each prediction.
type Row = (String, String, Option<u32>, f64, f64);

fn rows(path: &Path) -> Vec<Row> {
    let mut out = Vec::new();
    for b in common::parquet_batches(path) {
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let f = |n: &str| {
            b.column_by_name(n)
                .unwrap()
                .as_primitive::<arrow::datatypes::Float64Type>()
                .clone()
        };
        let stage = b
            .column_by_name("cascade_stage")
            .unwrap()
            .as_primitive::<arrow::datatypes::UInt32Type>()
            .clone();
        let (cell, id, neg, pos) = (
            s("cell"),
            s("row_id"),
            f("logprob_negative"),
            f("logprob_positive"),
        );
        for i in 0..b.num_rows() {
            out.push((
                cell.value(i).to_string(),
                id.value(i).to_string(),
                (!stage.is_null(i)).then(|| stage.value(i)),
                neg.value(i),
                pos.value(i),
            ));
        }
    }
    out
}

/// Rows a cache folder holds for a cell.
fn cached_rows(cache: &Path, cell: &str) -> usize {
    std::fs::read_dir(cache.join("v2/rows"))
        .unwrap()
        .flatten()
        .filter_map(|e| pipeline::cache::read_segment(&e.path()).ok())
        .flat_map(|rows| rows.into_iter().flatten())
        .filter(|r| r.cell_id == cell)
        .count()
}

fn smollm2_then_qwen_runs_the_large_model_on_unsure_reviews_only() -> Result<(), Failed> {
    let (small, large) = (model(SMOLLM2)?, model(QWEN)?);
    let p = common::Project::new();
    write_spec(&p, &small, &large);
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let got = rows(&p.path("reports/t/predictions.parquet"));
    let first: Vec<&Row> = got.iter().filter(|r| r.0 == "smollm2/p1/ll").collect();
    let cascade: Vec<&Row> = got
        .iter()
        .filter(|r| r.0 == "cascade/small-first")
        .collect();
    assert_eq!((first.len(), cascade.len()), (12, 12));
    let unsure: Vec<&str> = first
        .iter()
        .filter(|r| (r.3 - r.4).abs() < MARGIN)
        .map(|r| r.1.as_str())
        .collect();
    assert!(
        !unsure.is_empty() && unsure.len() < 12,
        "SmolLM2's margins should fall on both sides of {MARGIN}: {first:?}"
    );
    // Qwen computed exactly the unsure reviews, and answers them in the cascade.
    assert_eq!(cached_rows(&p.path("cache"), "qwen/p1/ll"), unsure.len());
    for c in &cascade {
        let f = first.iter().find(|r| r.1 == c.1).unwrap();
        if unsure.contains(&c.1.as_str()) {
            assert_eq!(c.2, Some(1), "{c:?}");
            assert_ne!((c.3, c.4), (f.3, f.4), "Qwen's scores, not SmolLM2's");
        } else {
            assert_eq!(c.2, Some(0), "{c:?}");
            assert_eq!((c.3, c.4), (f.3, f.4));
        }
    }
    // Cached: nothing runs again.
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let again = p.run_json();
    assert_eq!(again["computed_rows"], 0, "{again}");
    assert_eq!(again["models_loaded"], 0, "{again}");
    Ok(())
}
