//! The llama.cpp backend on a real model: SmolLM2-135M-Instruct (98 MB), found through
//! `$PIPELINE_MODELS_DIR` (`../shared/models/fetch` puts it there). Under `CI=true` a missing
//! model fails these tests; elsewhere they are skipped with a message.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use pipeline::backend::llama::LlamaEngine;
use pipeline::backend::{Backend, ModelLoad, Sampler, Task};
use pipeline::prompt::Messages;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct-Q4_1.gguf";

fn model() -> Option<PathBuf> {
    let found = std::env::var_os("PIPELINE_MODELS_DIR")
        .map(|d| PathBuf::from(d).join(MODEL_FILE))
        .filter(|p| p.is_file());
    if found.is_none() {
        let msg = format!(
            "{MODEL_FILE} not found in $PIPELINE_MODELS_DIR; fetch it with `../shared/models/fetch smollm2-135m`"
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("skipping: {msg}");
    }
    found
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn write_spec(p: &common::Project, model: &Path) {
    let spec = format!(
        r#"name: t
dataset:
  path: {data}
  id: id
  text: text
  label: label
  labels: {{0: negative, 1: positive}}
  sample: {{n: 8, stratify: true, seed: 7}}
  clean: {{replace: {{"<br />": " "}}, collapse_whitespace: true}}
  max_text_tokens: 96
models:
  - id: smollm2
    gguf: {model}
    sha256: b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    n_ctx: 1024
prompts:
  - id: p1
    system: "You classify movie reviews."
    user: {{file: prompts/p1.j2}}
  - id: p2
    user: {{file: prompts/p2.j2}}
methods:
  - id: gen
    kind: generate
    max_tokens: 4
  - id: ll
    kind: loglik
sampling:
  temperature: [0, 0.8]
  seed: 3
"#,
        data = repo_file("experiments/data/imdb/test.parquet").display(),
        model = model.display()
    );
    p.write("spec.yaml", &spec);
}

fn run_llama(p: &common::Project) -> serde_json::Value {
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    p.run_json()
}

#[test]
fn smollm2_end_to_end_generate_and_loglik() {
    let Some(model) = model() else { return };
    let p = common::Project::new();
    write_spec(&p, &model);
    let first = run_llama(&p);
    // 2 prompts × (2 temperatures + loglik) × 8 rows.
    assert_eq!(first["computed_rows"], 48);
    assert_eq!(
        first["prompts_evaluated"], 16,
        "one prompt evaluation serves the three cells"
    );

    // Outputs are readable by pyarrow, with the expected shape and content.
    let check = r#"
import sys, pyarrow.parquet as pq
p = pq.read_table(sys.argv[1]).to_pylist()
m = pq.read_table(sys.argv[2]).to_pylist()
assert len(p) == 48, len(p)
assert len(m) == 6, len(m)
gen = [r for r in p if "/gen@" in r["cell"]]
ll = [r for r in p if r["cell"].endswith("/ll")]
assert all(r["raw_answer"] is not None for r in gen)
assert all(r["label_logprobs"] is not None and len(r["label_logprobs"]) == 2 for r in ll)
assert all(r["logprob_negative"] < 0 and r["logprob_positive"] < 0 for r in ll)
assert all(r["prediction"] in ("negative", "positive") for r in ll)
assert all(r["prompt_tokens"] > 20 for r in p)
assert all(0 <= x["accuracy"] <= 1 and x["n"] == 8 for x in m)
print("ok", len(p), len(m))
"#;
    let out = Command::new("python3")
        .args(["-c", check])
        .arg(p.path("reports/t/predictions.parquet"))
        .arg(p.path("reports/t/metrics.parquet"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "pyarrow check failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Editing one template reruns exactly that prompt's rows, and nothing else.
    p.write(
        "prompts/p2.j2",
        "Text: {{ text }}\nIs it {{ labels | join(' or ') }}? One word.\n",
    );
    let second = run_llama(&p);
    assert_eq!(second["computed_rows"], 24);
    assert_eq!(second["cached_rows"], 24);
    assert_eq!(second["prompts_evaluated"], 8);
}

fn messages(i: usize) -> Messages {
    let reviews = [
        "A warm, funny and beautifully acted film. I loved every minute.",
        "Dull, overlong and badly written. I want my two hours back.",
        "The plot made no sense but the music was great.",
    ];
    Messages {
        system: Some("You classify movie reviews as positive or negative.".into()),
        user: format!(
            "Review: {}\nAnswer with one word: positive or negative.",
            reviews[i % 3]
        ),
    }
}

fn tasks() -> Vec<Task> {
    let generate = |t: f64, seed: u64| Task::Generate {
        max_tokens: 6,
        stop: vec![],
        sampler: Sampler {
            temperature: t,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.0,
            seed,
        },
    };
    vec![
        generate(0.0, 0),
        generate(0.8, 1),
        generate(0.8, 2),
        Task::Loglik {
            continuations: vec!["negative".into(), "positive".into()],
        },
    ]
}

#[test]
fn answers_do_not_depend_on_grouping_order_or_prefix_reuse() {
    let Some(model) = model() else { return };
    let load = ModelLoad {
        id: "smollm2".into(),
        path: model,
        n_ctx: 1024,
        threads: 2,
        batch_seqs: 1,
    };
    let mut engine = LlamaEngine::new();
    let all = tasks();
    let mut together = Vec::new();
    let mut alone = Vec::new();
    let mut reversed = Vec::new();
    let mut fresh = Vec::new();
    engine
        .with_model(&load, &mut |s| {
            for i in 0..3 {
                let prompt = s.format_chat(&messages(i))?;
                // Every task from one evaluation of the prompt (after the previous prompt,
                // so its shared prefix is reused).
                together.push(s.run(&prompt, &all)?);
                // Each task on its own.
                alone.push(
                    all.iter()
                        .map(|t| s.run(&prompt, std::slice::from_ref(t)))
                        .collect::<Result<Vec<_>, _>>()?,
                );
                // Tasks in the opposite order.
                let rev: Vec<Task> = all.iter().rev().cloned().collect();
                reversed.push(s.run(&prompt, &rev)?);
            }
            Ok(())
        })
        .unwrap();
    // A fresh model instance, prompts in another order: no prefix from earlier prompts.
    engine
        .with_model(&load, &mut |s| {
            for i in [2, 0, 1] {
                let prompt = s.format_chat(&messages(i))?;
                fresh.push((i, s.run(&prompt, &all)?));
            }
            Ok(())
        })
        .unwrap();
    fresh.sort_by_key(|(i, _)| *i);
    // Generations decoded side by side, three sequences per batch.
    let mut batched = Vec::new();
    let side_by_side = ModelLoad {
        batch_seqs: 3,
        ..load.clone()
    };
    engine
        .with_model(&side_by_side, &mut |s| {
            for i in 0..3 {
                let prompt = s.format_chat(&messages(i))?;
                batched.push(s.run(&prompt, &all)?);
            }
            Ok(())
        })
        .unwrap();
    assert!(
        together[1].evaluated_tokens < together[1].prompt_tokens,
        "the shared prefix was reused"
    );
    for i in 0..3 {
        for (j, t) in together[i].tasks.iter().enumerate() {
            let a = &alone[i][j].tasks[0];
            let r = &reversed[i].tasks[all.len() - 1 - j];
            let f = &fresh[i].1.tasks[j];
            let b = &batched[i].tasks[j];
            for other in [a, r, f, b] {
                assert_eq!(t.text, other.text, "prompt {i} task {j}");
                match (&t.logprobs, &other.logprobs) {
                    (Some(x), Some(y)) => {
                        for (u, v) in x.iter().zip(y) {
                            assert!((u - v).abs() < 1e-3, "prompt {i}: {x:?} vs {y:?}");
                        }
                    }
                    (None, None) => {}
                    _ => panic!("task kinds differ"),
                }
            }
        }
        // Two seeds at the same temperature are separate draws; loglik gives two finite values.
        let lp = together[i].tasks[3].logprobs.as_ref().unwrap();
        assert!(lp.iter().all(|x| x.is_finite() && *x < 0.0), "{lp:?}");
    }
}
