//! Tasks beyond two fixed labels on a real model (SmolLM2-135M-Instruct, found through
//! `$PIPELINE_MODELS_DIR`): four classes with names of several tokens. Without the model
//! these tests are listed as ignored, by name; under `CI=true` they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use libtest_mimic::{Arguments, Failed};

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let trials = common::trials_needing(
        "SmolLM2-135M",
        model().err(),
        vec![
            (
                "four_classes_with_names_of_several_tokens_have_per_class_metrics",
                four_classes_with_names_of_several_tokens_have_per_class_metrics,
            ),
            (
                "multiple_choice_predictions_are_always_one_of_the_rows_choices",
                multiple_choice_predictions_are_always_one_of_the_rows_choices,
            ),
            (
                "free_answers_scored_against_references_have_an_accuracy",
                free_answers_scored_against_references_have_an_accuracy,
            ),
        ],
    );
    libtest_mimic::run(&args, trials).exit_code()
}

fn model() -> Result<PathBuf, String> {
    common::smollm2()
}

/// Short texts of four topics, `n` of each, as JSONL rows with the topic as the label.
fn topics(n: usize, offset: usize) -> String {
    let about = [
        (
            "sport",
            "The striker scored twice and the home team won the match",
        ),
        (
            "weather",
            "Heavy rain and strong winds are expected over the coast tonight",
        ),
        (
            "food",
            "Simmer the onions in butter, then add the flour and the stock",
        ),
        (
            "money",
            "The bank raised its interest rate and the shares fell sharply",
        ),
    ];
    let mut out = String::new();
    for i in 0..n {
        for (topic, text) in about {
            let id = offset + i;
            out.push_str(&format!(
                "{{\"id\": \"{topic}{id}\", \"text\": \"{text} (item {id}).\", \"label\": \"{topic}\"}}\n"
            ));
        }
    }
    out
}

fn spec(model: &Path) -> String {
    format!(
        r#"name: t
dataset:
  path: data/topics.jsonl
  id: id
  text: text
  label: label
  labels: {{sport: sports news, weather: weather forecast, food: cooking recipe, money: finance}}
models:
  - id: smollm2
    gguf: {model}
    n_ctx: 512
prompts:
  - id: p
    user: "Text: {{{{ text }}}}\nWhich kind of text is it: {{{{ labels | join(', ') }}}}? Answer with one of them."
methods:
  - id: ll
    kind: loglik
  - id: ll-fit
    kind: loglik
    calibrate: {{fit: {{from: data/fit.jsonl, n: 16, seed: 1}}}}
  - id: probe
    kind: probe
    layer: [0.5]
    pool: [mean]
    fit: {{from: data/fit.jsonl, n: 16, seed: 1}}
"#,
        model = model.display()
    )
}

fn four_classes_with_names_of_several_tokens_have_per_class_metrics() -> Result<(), Failed> {
    let model = model()?;
    let p = common::Project::new();
    p.write("data/topics.jsonl", &topics(3, 0));
    p.write("data/fit.jsonl", &topics(4, 100));
    p.write("spec.yaml", &spec(&model));
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let metrics = common::read_parquet(&p.path("reports/t/metrics.parquet"));
    let labels = [
        "sports news",
        "weather forecast",
        "cooking recipe",
        "finance",
    ];
    for cell in ["smollm2/p/ll", "smollm2/p/ll-fit", "smollm2/p/probe"] {
        let m = metrics
            .iter()
            .find(|m| m["cell"] == cell)
            .ok_or(format!("no {cell}"))?;
        assert_eq!(m["n"], 12, "{cell}: {m:?}");
        for l in labels {
            let f1 = m[&format!("f1_{l}")].as_f64();
            assert!(
                f1.is_some_and(|f| (0.0..=1.0).contains(&f)),
                "{cell}: f1 of {l}: {m:?}"
            );
        }
    }
    // The raw cell reports its choices normalised by length: every row recorded how many
    // tokens each label has.
    let raw = metrics
        .iter()
        .find(|m| m["cell"] == "smollm2/p/ll")
        .unwrap();
    for col in ["accuracy_per_token", "accuracy_per_byte"] {
        assert!(raw[col].as_f64().is_some(), "{col}: {raw:?}");
    }
    let calibrated = metrics
        .iter()
        .find(|m| m["cell"] == "smollm2/p/ll-fit")
        .unwrap();
    assert!(calibrated["accuracy_per_token"].is_null(), "{calibrated:?}");
    // Every prediction is one of the four labels.
    let preds = common::read_parquet(&p.path("reports/t/predictions.parquet"));
    assert_eq!(preds.len(), 36);
    for r in &preds {
        let pred = r["prediction"].as_str().unwrap_or("");
        assert!(labels.contains(&pred), "{r:?}");
    }
    let html = common::report_html(&p);
    assert!(
        html.contains("Length-normalised choices"),
        "the report shows them"
    );
    assert!(
        html.contains("F1 cooking recipe"),
        "the metrics table has every class"
    );
    Ok(())
}

/// Questions whose choices differ per row (3 or 4 of them), the label as the correct
/// choice's text on even rows and as its index on odd ones.
fn questions() -> String {
    let items: [(&str, &[&str], usize); 8] = [
        (
            "Which of these is a fruit?",
            &["a car", "an apple", "a chair"],
            1,
        ),
        (
            "Which animal barks?",
            &["a dog", "a fish", "a snail", "a cow"],
            0,
        ),
        (
            "What colour is the sky on a clear day?",
            &["green", "red", "blue"],
            2,
        ),
        (
            "Which of these is a drink?",
            &["water", "stone", "paper"],
            0,
        ),
        (
            "How many legs does a spider have?",
            &["two", "four", "six", "eight"],
            3,
        ),
        (
            "Which planet do we live on?",
            &["Mars", "Earth", "Venus"],
            1,
        ),
        ("What do bees make?", &["milk", "silk", "honey", "wool"], 2),
        (
            "Which season is the coldest?",
            &["winter", "summer", "spring"],
            0,
        ),
    ];
    let mut out = String::new();
    for (i, (q, choices, gold)) in items.iter().enumerate() {
        let label = if i % 2 == 0 {
            format!("\"{}\"", choices[*gold])
        } else {
            gold.to_string()
        };
        let list: Vec<String> = choices.iter().map(|c| format!("\"{c}\"")).collect();
        out.push_str(&format!(
            "{{\"id\": \"q{i}\", \"question\": \"{q}\", \"options\": [{}], \"answer\": {label}}}\n",
            list.join(", ")
        ));
    }
    out
}

fn multiple_choice_predictions_are_always_one_of_the_rows_choices() -> Result<(), Failed> {
    let model = model()?;
    let p = common::Project::new();
    p.write("data/questions.jsonl", &questions());
    p.write(
        "spec.yaml",
        &format!(
            r#"name: t
dataset:
  path: data/questions.jsonl
  id: id
  text: question
  label: answer
  choices: options
models:
  - id: smollm2
    gguf: {model}
    n_ctx: 512
prompts:
  - id: p
    user: "{{{{ text }}}}\n{{% for c in choices %}}{{{{ 'ABCD'[loop.index0] }}}}. {{{{ c }}}}\n{{% endfor %}}Answer with the right option."
methods:
  - id: ll
    kind: loglik
  - id: gen
    kind: generate
    max_tokens: 8
"#,
            model = model.display()
        ),
    );
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let data: Vec<serde_json::Value> = questions()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let choices_of = |id: &str| -> Vec<String> {
        let row = data.iter().find(|r| r["id"] == id).unwrap();
        row["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect()
    };
    let preds = common::read_parquet(&p.path("reports/t/predictions.parquet"));
    assert_eq!(preds.len(), 16);
    let mut generated_valid = 0;
    for r in &preds {
        let id = r["row_id"].as_str().unwrap();
        let choices = choices_of(id);
        let gold = r["gold"].as_str().unwrap();
        assert!(choices.iter().any(|c| c == gold), "gold {gold} of {id}");
        match r["prediction"].as_str() {
            Some(pred) => {
                assert!(
                    choices.iter().any(|c| c == pred),
                    "{id}: {pred} is not one of {choices:?}"
                );
                if r["cell"].as_str().unwrap().contains("/gen") {
                    generated_valid += 1;
                }
            }
            None => assert!(
                r["cell"].as_str().unwrap().contains("/gen"),
                "a log-likelihood row always chooses: {r:?}"
            ),
        }
        if r["cell"] == "smollm2/p/ll" {
            // One log-prob per choice of its own, by place (A, B, ...).
            let scored = ["A", "B", "C", "D"]
                .iter()
                .filter(|l| r[&format!("logprob_{l}")].as_f64().is_some())
                .count();
            assert_eq!(scored, choices.len(), "{id}: {r:?}");
        }
    }
    println!("{generated_valid} of 8 generated answers name a choice");
    let metrics = common::read_parquet(&p.path("reports/t/metrics.parquet"));
    let ll = metrics
        .iter()
        .find(|m| m["cell"] == "smollm2/p/ll")
        .unwrap();
    assert_eq!(ll["n"], 8);
    assert_eq!(ll["invalid"], 0);
    // A second run asks nothing: each row's choices are part of its key.
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let again = p.run_json();
    assert_eq!(again["computed_rows"], 0, "{again}");
    Ok(())
}

fn free_answers_scored_against_references_have_an_accuracy() -> Result<(), Failed> {
    let model = model()?;
    let p = common::Project::new();
    let items = [
        ("What is 2 + 3?", "5"),
        ("What is 10 - 4?", "6"),
        ("What is 3 times 3?", "9"),
        ("What is 7 + 1?", "8"),
        ("What is 20 divided by 4?", "5"),
        ("What is 1 + 1?", "2"),
    ];
    let mut jsonl = String::new();
    for (i, (q, a)) in items.iter().enumerate() {
        jsonl.push_str(&format!(
            "{{\"id\": \"m{i}\", \"question\": \"{q}\", \"answer\": \"{a}\"}}\n"
        ));
    }
    p.write("data/sums.jsonl", &jsonl);
    p.write(
        "spec.yaml",
        &format!(
            r#"name: t
dataset:
  path: data/sums.jsonl
  id: id
  text: question
  reference: answer
models:
  - id: smollm2
    gguf: {model}
    n_ctx: 512
prompts:
  - id: p
    user: "{{{{ text }}}} Answer with the number only."
methods:
  - id: number
    kind: generate
    max_tokens: 12
    score: {{numeric: {{tolerance: 0}}}}
  - id: exact
    kind: generate
    max_tokens: 12
    score: exact_match
  - id: contains
    kind: generate
    max_tokens: 12
    score: contains
  - id: regex
    kind: generate
    max_tokens: 12
    score: {{regex: '(\d+)'}}
"#,
            model = model.display()
        ),
    );
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let metrics = common::read_parquet(&p.path("reports/t/metrics.parquet"));
    assert_eq!(metrics.len(), 4);
    for m in &metrics {
        let acc = m["accuracy"].as_f64().ok_or("no accuracy")?;
        let (lo, hi) = (
            m["accuracy_ci95_lo"].as_f64().unwrap(),
            m["accuracy_ci95_hi"].as_f64().unwrap(),
        );
        assert!(lo <= acc + 1e-9 && acc <= hi + 1e-9, "{m:?}");
        assert_eq!(m["n"], 6, "{m:?}");
    }
    // One generation serves the four scores (greedy, the same key): the rows are equal
    // and only their scoring differs.
    let run = p.run_json();
    assert_eq!(run["prompts_evaluated"], 6, "{run}");
    let preds = common::read_parquet(&p.path("reports/t/predictions.parquet"));
    for r in &preds {
        let id = r["row_id"].as_str().unwrap();
        let i: usize = id[1..].parse().unwrap();
        assert_eq!(
            r["gold"], items[i].1,
            "the gold column holds the reference: {r:?}"
        );
        let raw = r["raw_answer"].as_str().unwrap_or("");
        if r["cell"] == "smollm2/p/number" {
            // Scored independently here: the answer's last number equals the reference.
            let last = raw
                .split(|c: char| !c.is_ascii_digit())
                .rfind(|w| !w.is_empty());
            assert_eq!(r["correct"], last == Some(items[i].1), "{r:?}");
        }
    }
    let html = common::report_html(&p);
    assert!(
        html.contains("reference answer"),
        "the disagreement tables name the reference"
    );
    Ok(())
}
