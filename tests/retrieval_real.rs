//! Embeddings and retrieval on real models: all-MiniLM-L6-v2 (the embedder) against
//! reference vectors computed without llama.cpp, and a retrieval spec end to end with
//! SmolLM2-135M. Both models come from `$PIPELINE_MODELS_DIR` (`bash scripts/test` fetches
//! them); without them these tests are listed as ignored, by name; under `CI=true` they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use libtest_mimic::{Arguments, Failed};
use pipeline::backend::llama::LlamaEngine;
use pipeline::backend::{Backend, EmbedderLoad};

const MINILM: &str = "all-MiniLM-L6-v2-F16.gguf";
const SMOLLM: &str = "SmolLM2-135M-Instruct-Q4_1.gguf";

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let missing = [MINILM, SMOLLM].iter().find_map(|f| model(f).err());
    let trials = common::trials_needing(
        "all-MiniLM-L6-v2 and SmolLM2-135M",
        missing,
        vec![
            (
                "minilm_matches_the_reference_vectors",
                minilm_matches_the_reference_vectors,
            ),
            (
                "knn_spec_end_to_end_on_smollm2_and_minilm",
                knn_spec_end_to_end_on_smollm2_and_minilm,
            ),
            (
                "a_fitted_calibration_moves_a_biased_cell_towards_the_other_label",
                a_fitted_calibration_moves_a_biased_cell_towards_the_other_label,
            ),
            (
                "a_chat_model_named_as_embedder_is_a_located_error",
                a_chat_model_named_as_embedder_is_a_located_error,
            ),
        ],
    );
    libtest_mimic::run(&args, trials).exit_code()
}

fn model(file: &str) -> Result<PathBuf, String> {
    let dir = std::env::var_os("PIPELINE_MODELS_DIR").ok_or(
        "PIPELINE_MODELS_DIR is not set (`bash scripts/test` sets it and fetches the models)",
    )?;
    let p = PathBuf::from(dir).join(file);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} does not exist; fetch it with `../shared/models/fetch \"$PIPELINE_MODELS_DIR\" all-minilm-l6-v2 smollm2-135m`",
            p.display()
        ))
    }
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Token ids equal and cosine ≥ 0.9999 for every reference text; each vector the same bits
/// whatever was embedded before it or beside it.
fn minilm_matches_the_reference_vectors() -> Result<(), Failed> {
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo_file(
        "tests/data/all-minilm-l6-v2.reference.json",
    ))?)?;
    let texts: Vec<(String, Vec<i32>, Vec<f64>)> = reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["text"].as_str().unwrap().to_string(),
                serde_json::from_value(t["token_ids"].clone()).unwrap(),
                serde_json::from_value(t["embedding"].clone()).unwrap(),
            )
        })
        .collect();
    let load = EmbedderLoad {
        id: "minilm".into(),
        path: model(MINILM)?,
        max_tokens: 256,
        threads: 2,
    };
    let mut engine = LlamaEngine::new();
    let refs: Vec<&str> = texts.iter().map(|t| t.0.as_str()).collect();
    let mut together = Vec::new();
    let mut one_by_one = Vec::new();
    let mut reversed = Vec::new();
    let mut worst = 1.0f64;
    engine.with_embedder(&load, &mut |s| {
        for (text, ids, want) in &texts {
            assert_eq!(&s.tokens(text), ids, "token ids of {text:?}");
            let v = s.embed(&[text])?.remove(0);
            let c = cosine(&v, want);
            worst = worst.min(c);
            assert!(c >= 0.9999, "{text:?}: cosine {c}");
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "L2-normalised: {norm}");
            one_by_one.push(v);
        }
        together = s.embed(&refs)?;
        let back: Vec<&str> = refs.iter().rev().copied().collect();
        reversed = s.embed(&back)?;
        reversed.reverse();
        Ok(())
    })?;
    assert_eq!(together, one_by_one, "same bits in one call as alone");
    assert_eq!(reversed, one_by_one, "same bits in another order");
    println!(
        "minilm: {} texts, token ids equal, worst cosine {worst:.7}",
        texts.len()
    );
    Ok(())
}

fn knn_spec(p: &common::Project, sample_n: usize) {
    p.write(
        "spec.yaml",
        &format!(
            r#"name: t
dataset:
  path: {test}
  id: id
  text: text
  label: label
  labels: {{0: negative, 1: positive}}
  sample: {{n: {sample_n}, stratify: true, seed: 3}}
  clean: {{replace: {{"<br />": " "}}, collapse_whitespace: true}}
  max_text_tokens: 96
models:
  - id: smollm2
    gguf: {smol}
    n_ctx: 2048
embedders:
  - id: minilm
    gguf: {minilm}
    max_tokens: 128
prompts:
  - id: knn
    user: "{{% for e in examples %}}Review: {{{{ e.text }}}}\nSentiment: {{{{ e.label }}}}\n\n{{% endfor %}}Review: {{{{ text }}}}\nSentiment (negative or positive):"
    shots: {{strategy: knn, k: 2, from: {train}, embedder: minilm, pool: {{n: 60, seed: 1}}, per_label: true, max_chars: 400}}
methods:
  - id: ll
    kind: loglik
  - id: ll-fit
    kind: loglik
    calibrate: {{fit: {{from: {train}, n: 12, seed: 2}}}}
  - id: vote
    kind: knn_vote
    k: 8
    embedder: minilm
    from: {train}
    pool: {{n: 60, seed: 1}}
"#,
            test = repo_file("experiments/data/imdb/test.parquet").display(),
            train = repo_file("experiments/data/imdb/train.parquet").display(),
            smol = model(SMOLLM).unwrap().display(),
            minilm = model(MINILM).unwrap().display(),
        ),
    );
}

/// Stages cached: a second run embeds nothing and evaluates no prompt; every row of the
/// knn cell shows the ids and similarities of its examples.
fn knn_spec_end_to_end_on_smollm2_and_minilm() -> Result<(), Failed> {
    let p = common::Project::new();
    knn_spec(&p, 6);
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let first = p.run_json();
    assert!(first["embed"]["embedded"].as_u64().unwrap() > 60, "{first}");
    assert_eq!(first["failed_rows"], 0, "{first}");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            r#"
import sys, pyarrow.parquet as pq
p = pq.read_table(sys.argv[1]).to_pylist()
knn = [r for r in p if r["cell"] == "smollm2/knn/ll"]
assert len(knn) == 6, len(knn)
assert all(len(r["shot_ids"]) == 2 and len(r["shot_similarities"]) == 2 for r in knn)
assert all(r["shot_similarities"][0] <= r["shot_similarities"][1] for r in knn), "nearest last"
vote = [r for r in p if r["cell"] == "minilm/vote"]
assert len(vote) == 6 and all(r["prediction"] in ("negative", "positive") for r in vote)
fit = [r for r in p if r["cell"] == "smollm2/knn/ll-fit"]
assert len(fit) == 6 and all(r["uncalibrated_label_logprobs"] is not None for r in fit)
print("ok")
"#,
        ])
        .arg(p.path("reports/t/predictions.parquet"))
        .output()?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let second = p.run_json();
    assert_eq!(second["embed"]["embedded"], 0, "{second}");
    assert_eq!(second["prompts_evaluated"], 0, "{second}");
    assert_eq!(second["models_loaded"], 0, "a cached spec loads no model");
    Ok(())
}

/// SmolLM2 leans to one label on this prompt; the bias fitted on train rows lowers the
/// share of rows it predicts as that label on the test rows.
fn a_fitted_calibration_moves_a_biased_cell_towards_the_other_label() -> Result<(), Failed> {
    let p = common::Project::new();
    p.write(
        "spec.yaml",
        &format!(
            r#"name: t
dataset:
  path: {test}
  id: id
  text: text
  label: label
  labels: {{0: negative, 1: positive}}
  sample: {{n: 16, stratify: true, seed: 4}}
  clean: {{replace: {{"<br />": " "}}, collapse_whitespace: true}}
  max_text_tokens: 64
models:
  - id: smollm2
    gguf: {smol}
    n_ctx: 1024
prompts:
  - id: biased
    user: "Most reviews are negative.\nReview: {{{{ text }}}}\nIs this review negative or positive?"
methods:
  - id: ll
    kind: loglik
  - id: ll-fit
    kind: loglik
    calibrate: {{fit: {{from: {train}, n: 40, seed: 5}}}}
"#,
            test = repo_file("experiments/data/imdb/test.parquet").display(),
            train = repo_file("experiments/data/imdb/train.parquet").display(),
            smol = model(SMOLLM).unwrap().display(),
        ),
    );
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let metrics = common::read_parquet(&p.path("reports/t/metrics.parquet"));
    let share = |cell: &str, label: &str| -> f64 {
        metrics
            .iter()
            .find(|m| m["cell"] == cell)
            .and_then(|m| m[&format!("predicted_share_{label}")].as_f64())
            .unwrap()
    };
    let (neg, pos) = (
        share("smollm2/biased/ll", "negative"),
        share("smollm2/biased/ll", "positive"),
    );
    let (lean, other) = if neg >= pos {
        ("negative", "positive")
    } else {
        ("positive", "negative")
    };
    let raw = share("smollm2/biased/ll", lean);
    let calibrated = share("smollm2/biased/ll-fit", lean);
    println!(
        "calibration: raw cell predicts {lean} for {raw:.2} of rows, calibrated {calibrated:.2}"
    );
    assert!(raw >= 0.75, "the constructed prompt leans to {lean}: {raw}");
    assert!(
        calibrated < raw,
        "calibration moves rows to {other}: {raw} -> {calibrated}"
    );
    Ok(())
}

/// A chat model named as embedder is an input error at its `gguf:` line, before anything
/// is computed.
fn a_chat_model_named_as_embedder_is_a_located_error() -> Result<(), Failed> {
    let p = common::Project::new();
    knn_spec(&p, 4);
    let spec = p.read("spec.yaml").replace(
        &model(MINILM)?.display().to_string(),
        &model(SMOLLM)?.display().to_string(),
    );
    p.write("spec.yaml", &spec);
    let out = p.cmd(&["run", "spec.yaml", "--quiet"]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let line = spec.lines().position(|l| l.contains(SMOLLM)).unwrap() + 1;
    let lines: Vec<usize> = spec
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(SMOLLM))
        .map(|(i, _)| i + 1)
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| stderr.contains(&format!("spec.yaml:{l}:"))),
        "located at one of lines {lines:?} (first {line}): {stderr}"
    );
    assert!(
        stderr.contains("embedders[0].gguf") && stderr.contains("not an embedding model"),
        "{stderr}"
    );
    assert!(
        !p.path("cache/v2/rows").exists() || common::segments(&p).is_empty(),
        "nothing ran"
    );
    Ok(())
}
