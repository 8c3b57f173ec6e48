//! The same spec run on SmolLM2 in-process and behind a real llama-server (built by
//! `bash scripts/llama-server` from the engine's llama.cpp) on loopback, one slot and no RAM
//! prompt cache: each row is evaluated in the in-process engine's layout, so greedy answers,
//! loglik predictions and label log-probs agree (measured: 16/16, 16/16, median 0.0001 nats,
//! the float32 the server prints).
//!
//! Needs SmolLM2-135M in `$PIPELINE_MODELS_DIR` and the llama-server binary
//! (`$PIPELINE_LLAMA_SERVER`, or where `scripts/llama-server` puts it); listed as ignored
//! by name when either is missing, a failure under `CI=true`.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed};

const SMOLLM2: &str = "SmolLM2-135M-Instruct-Q4_1.gguf";
const REVIEWS: usize = 16;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let missing = model().err().or_else(|| llama_server().err());
    let trials = common::trials_needing(
        "SmolLM2-135M and llama-server",
        missing,
        vec![(
            "llama_server_agrees_with_the_in_process_engine",
            llama_server_agrees_with_the_in_process_engine,
        )],
    );
    libtest_mimic::run(&args, trials).exit_code()
}

fn model() -> Result<PathBuf, String> {
    let dir = std::env::var_os("PIPELINE_MODELS_DIR").ok_or("PIPELINE_MODELS_DIR is not set")?;
    let p = PathBuf::from(dir).join(SMOLLM2);
    p.is_file()
        .then_some(p.clone())
        .ok_or_else(|| format!("{} does not exist", p.display()))
}

fn llama_server() -> Result<PathBuf, String> {
    let p = std::env::var_os("PIPELINE_LLAMA_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/llama-server/build/bin/llama-server")
        });
    p.is_file().then_some(p.clone()).ok_or_else(|| {
        format!(
            "{} does not exist (bash scripts/llama-server builds it)",
            p.display()
        )
    })
}

/// A llama-server on a free loopback port, stopped when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(bin: &Path, model: &Path, parallel: usize) -> Result<Server, Failed> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new(bin)
        .args(["-m", &model.display().to_string()])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-c", &(2048 * parallel).to_string()])
        .args([
            "--parallel",
            &parallel.to_string(),
            "-t",
            "2",
            "--cache-ram",
            "0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}/v1"),
    };
    // Wait for the event (the model loaded: /health answers 200), at most two minutes.
    let deadline = Instant::now() + Duration::from_secs(120);
    let health = format!("127.0.0.1:{port}");
    loop {
        if std::net::TcpStream::connect(&health).is_ok()
            && common::http::get(&health, "/health").status == 200
        {
            return Ok(server);
        }
        if Instant::now() > deadline {
            return Err("llama-server did not become healthy in two minutes".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_spec(p: &common::Project, model: &Path, url: &str) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/data/imdb/test.parquet");
    p.write(
        "prompts/p1.j2",
        "Review: {{ text }}\nIs this review positive or negative? Answer with one word.\n",
    );
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
  sample: {{n: {REVIEWS}, stratify: true, seed: 11}}
  clean: {{replace: {{"<br />": " "}}, collapse_whitespace: true}}
  max_text_tokens: 96
models:
  - id: local
    gguf: {model}
    n_ctx: 1024
  - id: served
    server: {{url: "{url}", concurrency: 1}}
    n_ctx: 1024
prompts:
  - id: p1
    system: "You classify movie reviews."
    user: {{file: prompts/p1.j2}}
methods:
  - id: gen
    kind: generate
    max_tokens: 8
  - id: ll
    kind: loglik
sampling:
  temperature: [0]
"#,
            data = data.display(),
            model = model.display(),
        ),
    );
}

/// Per row: (raw answer, prediction, negative and positive log-probs) of a cell.
fn outputs(path: &Path, cell: &str) -> Vec<(String, String, String, f64, f64)> {
    use arrow::array::{Array, AsArray};
    let mut out = Vec::new();
    for b in common::parquet_batches(path) {
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let f = |n: &str| {
            b.column_by_name(n)
                .unwrap()
                .as_primitive::<arrow::datatypes::Float64Type>()
                .clone()
        };
        let (cells, ids, raw, pred) = (s("cell"), s("row_id"), s("raw_answer"), s("prediction"));
        let (neg, pos) = (f("logprob_negative"), f("logprob_positive"));
        for i in 0..b.num_rows() {
            if cells.value(i) != cell {
                continue;
            }
            let text = |a: &arrow::array::StringArray| {
                if a.is_null(i) {
                    String::new()
                } else {
                    a.value(i).to_string()
                }
            };
            let num = |a: &arrow::array::Float64Array| {
                if a.is_null(i) { f64::NAN } else { a.value(i) }
            };
            out.push((
                ids.value(i).to_string(),
                text(&raw),
                text(&pred),
                num(&neg),
                num(&pos),
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn llama_server_agrees_with_the_in_process_engine() -> Result<(), Failed> {
    let (model, bin) = (model()?, llama_server()?);
    let server = start_server(&bin, &model, 1)?;
    let p = common::Project::new();
    write_spec(&p, &model, &server.url);
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let run = p.run_json();
    if run["failed_rows"] != 0 {
        return Err(format!("failed rows: {run}").into());
    }
    let preds = p.path("reports/t/predictions.parquet");
    let cells: Vec<String> = common::read_parquet(&p.path("reports/t/metrics.parquet"))
        .iter()
        .filter_map(|m| m["cell"].as_str().map(str::to_string))
        .collect();
    let find = |model: &str, method: &str| {
        cells
            .iter()
            .find(|c| c.starts_with(&format!("{model}/p1/{method}")))
            .cloned()
            .ok_or_else(|| format!("no cell {model}/p1/{method} among {cells:?}"))
    };
    let (lg, sg) = (find("local", "gen")?, find("served", "gen")?);
    let (ll, sl) = (find("local", "ll")?, find("served", "ll")?);
    let (local_gen, served_gen) = (outputs(&preds, &lg), outputs(&preds, &sg));
    let (local_ll, served_ll) = (outputs(&preds, &ll), outputs(&preds, &sl));
    if local_gen.len() != REVIEWS || served_gen.len() != REVIEWS || served_ll.len() != REVIEWS {
        return Err(format!(
            "expected {REVIEWS} rows a cell, got {} {} {}",
            local_gen.len(),
            served_gen.len(),
            served_ll.len()
        )
        .into());
    }
    let same_answers = local_gen
        .iter()
        .zip(&served_gen)
        .filter(|(a, b)| a.0 == b.0 && a.1 == b.1)
        .count();
    let same_predictions = local_ll
        .iter()
        .zip(&served_ll)
        .filter(|(a, b)| a.0 == b.0 && a.2 == b.2)
        .count();
    let mut diffs: Vec<f64> = local_ll
        .iter()
        .zip(&served_ll)
        .flat_map(|(a, b)| [(a.3 - b.3).abs(), (a.4 - b.4).abs()])
        .collect();
    diffs.sort_by(f64::total_cmp);
    let median = (diffs[diffs.len() / 2 - 1] + diffs[diffs.len() / 2]) / 2.0;
    let max = diffs.last().copied().unwrap_or(f64::NAN);
    println!(
        "llama-server vs in-process on {REVIEWS} reviews: greedy answers equal {same_answers}/{REVIEWS}, loglik predictions equal {same_predictions}/{REVIEWS}, label log-probs |diff| median {median:.4} max {max:.4} nats"
    );
    if same_answers < 14 || same_predictions < 15 || median.is_nan() || median > 0.05 {
        return Err(format!(
            "too far apart: answers {same_answers}/{REVIEWS} (≥14), predictions {same_predictions}/{REVIEWS} (≥15), median {median} (≤0.05)\nlocal {local_gen:?}\nserved {served_gen:?}\nlocal {local_ll:?}\nserved {served_ll:?}"
        )
        .into());
    }
    // A one-slot server without its RAM prompt cache evaluates each row alone: bit-exact.
    let run_json: serde_json::Value = serde_json::from_str(&p.read("reports/t/run.json"))?;
    let served = &run_json["models"][1]["server"];
    if served["bit_exact"] != true {
        return Err(
            format!("the one-slot server's rows are not marked bit-exact: {served}").into(),
        );
    }
    // The served rows are cached as the local ones are: a rerun computes nothing.
    p.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let again = p.run_json();
    if again["computed_rows"] != 0 {
        return Err(format!("the rerun computed rows: {again}").into());
    }
    drop(server);
    Ok(())
}
