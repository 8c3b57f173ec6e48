//! Helpers for end-to-end tests: a throw-away project folder with a dataset, templates, a
//! stand-in model file and a spec, and a way to run the `pipeline` binary on it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A Parquet file's batches as one (a table without rows has none).
pub fn read_parquet_batch(path: &Path) -> arrow::array::RecordBatch {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let builder =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = builder.schema().clone();
    let batches: Vec<arrow::array::RecordBatch> =
        builder.build().unwrap().map(Result::unwrap).collect();
    arrow::compute::concat_batches(&schema, &batches).unwrap()
}

pub struct Project {
    pub dir: tempfile::TempDir,
}

pub const SPEC: &str = r#"# test spec
name: t
dataset:
  path: data/reviews.jsonl
  id: id
  text: text
  label: label
  labels: {0: negative, 1: positive}
  sample: {n: 12, stratify: true, seed: 5}
models:
  - id: fake-a
    gguf: models/a.gguf
    n_ctx: 512
prompts:
  - id: p1
    user: {file: prompts/p1.j2}
  - id: p2
    system: "You judge reviews."
    user: {file: prompts/p2.j2}
methods:
  - id: gen
    kind: generate
    max_tokens: 4
  - id: ll
    kind: loglik
sampling:
  temperature: [0.2, 0.8]
  seed: 3
"#;

impl Project {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = Self { dir };
        std::fs::create_dir_all(p.path("data")).unwrap();
        std::fs::create_dir_all(p.path("prompts")).unwrap();
        std::fs::create_dir_all(p.path("models")).unwrap();
        let mut jsonl = String::new();
        for i in 0..30 {
            let label = i % 2;
            let word = if label == 1 { "wonderful" } else { "dreadful" };
            jsonl.push_str(&format!(
                "{{\"id\": \"r{i}\", \"text\": \"Review number {i}: a {word} film, truly {word}.\", \"label\": {label}}}\n"
            ));
        }
        p.write("data/reviews.jsonl", &jsonl);
        p.write(
            "prompts/p1.j2",
            "Review: {{ text }}\nAnswer {{ labels | join(' or ') }}.\n",
        );
        p.write(
            "prompts/p2.j2",
            "Text: {{ text }}\nIs it {{ labels | join(' or ') }}?\n",
        );
        pipeline::model::write_fake_gguf(&p.path("models/a.gguf"), b"fake model a").unwrap();
        p.write("spec.yaml", SPEC);
        p
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.path(rel), text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline"));
        c.args(args)
            .current_dir(self.dir.path())
            .env("PIPELINE_CACHE_DIR", self.path("cache"))
            .env("PIPELINE_REPORTS_DIR", self.path("reports"))
            // A models folder of the project's own, so that models fetched for the
            // real-model tests (in the default folder) are not found by accident.
            .env("PIPELINE_MODELS_DIR", self.path("models"))
            .env_remove("PIPELINE_FAKE_DELAY_MS")
            .env_remove("PIPELINE_FAKE_ENGINE")
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX");
        c
    }

    pub fn run_ok(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "pipeline {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `plan --json`, parsed.
    pub fn plan(&self) -> serde_json::Value {
        self.plan_of("spec.yaml")
    }

    /// `plan --json` of another spec file of the project, parsed.
    pub fn plan_of(&self, spec: &str) -> serde_json::Value {
        let out = self.run_ok(&["plan", spec, "--json", "--backend", "fake"]);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `run --backend fake`, returning `run.json`'s run counts.
    pub fn run(&self) -> serde_json::Value {
        self.run_ok(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
        self.run_json()
    }

    pub fn run_json(&self) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&self.read("reports/t/run.json")).unwrap();
        v["run"].clone()
    }
}

/// Cells of `plan --json` with rows still to run: (id, to_run).
pub fn misses(plan: &serde_json::Value) -> Vec<(String, u64)> {
    plan["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["to_run"].as_u64().unwrap() > 0)
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["to_run"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Every record batch of a Parquet file.
pub fn parquet_batches(path: &Path) -> Vec<arrow::record_batch::RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// The prediction table as sorted text lines (cell, row, raw answer, log-probs), to compare runs.
pub fn predictions(path: &Path) -> Vec<String> {
    use arrow::array::AsArray;
    let mut out = Vec::new();
    for b in parquet_batches(path) {
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let (cell, row, raw, pred) = (s("cell"), s("row_id"), s("raw_answer"), s("prediction"));
        let lp = b
            .column_by_name("label_logprobs")
            .unwrap()
            .as_list::<i32>()
            .clone();
        for i in 0..b.num_rows() {
            let lps = if lp.is_null(i) {
                String::new()
            } else {
                format!(
                    "{:?}",
                    lp.value(i)
                        .as_primitive::<arrow::datatypes::Float64Type>()
                        .values()
                )
            };
            use arrow::array::Array;
            out.push(format!(
                "{} | {} | {:?} | {:?} | {}",
                cell.value(i),
                row.value(i),
                (!raw.is_null(i)).then(|| raw.value(i)),
                (!pred.is_null(i)).then(|| pred.value(i)),
                lps
            ));
        }
    }
    out.sort();
    out
}

/// Whether this is a CI run, where a missing model or browser is a failure, never a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A test body for a `libtest-mimic` harness.
pub type TestFn = fn() -> Result<(), libtest_mimic::Failed>;

/// Tests that need something this machine may lack (a model file, a browser), for a
/// `libtest-mimic` harness: when it is missing they are listed as *ignored* by name, with
/// the reason printed once; under `CI=true` they run and fail with that reason.
pub fn trials_needing(
    what: &str,
    missing: Option<String>,
    tests: Vec<(&'static str, TestFn)>,
) -> Vec<libtest_mimic::Trial> {
    use libtest_mimic::Trial;
    match missing {
        None => tests
            .into_iter()
            .map(|(name, f)| Trial::test(name, f))
            .collect(),
        Some(why) if in_ci() => tests
            .into_iter()
            .map(|(name, _)| {
                let why = format!("{what} is missing under CI=true: {why}");
                Trial::test(name, move || Err(why.into()))
            })
            .collect(),
        Some(why) => {
            let names: Vec<&str> = tests.iter().map(|(n, _)| *n).collect();
            println!(
                "skipped (ignored): {} — {what} not found: {why}",
                names.join(", ")
            );
            tests
                .into_iter()
                .map(|(name, f)| Trial::test(name, f).with_ignored_flag(true))
                .collect()
        }
    }
}

/// `failures.parquet` as text lines `cell | row | kind | message`.
pub fn failures(path: &Path) -> Vec<String> {
    use arrow::array::AsArray;
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let (cell, row, kind, msg) = (s("cell"), s("row_id"), s("error_kind"), s("error"));
        for i in 0..b.num_rows() {
            out.push(format!(
                "{} | {} | {} | {}",
                cell.value(i),
                row.value(i),
                kind.value(i),
                msg.value(i)
            ));
        }
    }
    out.sort();
    out
}

/// The committed segment files of the project's cache.
pub fn segments(p: &Project) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(p.path("cache/v2/rows"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                // A hidden temporary file is a commit in progress, not a segment yet.
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Wait until the run in `p` has committed at least one segment (the event a test of an
/// interrupted run waits for, never a fixed sleep), for at most a minute.
pub fn wait_for_commit(p: &Project) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while segments(p).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no segment committed in time"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The report page with minijinja's escape of `/` (`&#x2f;`) undone, for text searches.
pub fn report_html(p: &Project) -> String {
    p.read("reports/t/index.html").replace("&#x2f;", "/")
}

/// A Parquet table as JSON rows (columns of text, numbers and booleans).
pub fn read_parquet(path: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    use arrow::array::Array;
    use arrow::datatypes::DataType;
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        for i in 0..b.num_rows() {
            let mut row = serde_json::Map::new();
            for (f, col) in b.schema().fields().iter().zip(b.columns()) {
                let v = if col.is_null(i) {
                    serde_json::Value::Null
                } else {
                    match f.data_type() {
                        DataType::Utf8
                        | DataType::Float64
                        | DataType::UInt64
                        | DataType::UInt32
                        | DataType::Boolean => {
                            let s = arrow::util::display::array_value_to_string(col, i).unwrap();
                            match f.data_type() {
                                DataType::Utf8 => serde_json::Value::String(s),
                                DataType::Boolean => serde_json::Value::Bool(s == "true"),
                                _ => {
                                    serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s))
                                }
                            }
                        }
                        _ => serde_json::Value::Null,
                    }
                };
                row.insert(f.name().clone(), v);
            }
            out.push(row);
        }
    }
    out
}

/// `(row_id, cell, items)` of a list column of the prediction table, items as text.
pub fn read_parquet_lists(path: &Path, column: &str) -> Vec<(String, String, Vec<String>)> {
    use arrow::array::{Array, AsArray};
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let row = b
            .column_by_name("row_id")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let cell = b.column_by_name("cell").unwrap().as_string::<i32>().clone();
        let list = b.column_by_name(column).unwrap().as_list::<i32>().clone();
        for i in 0..b.num_rows() {
            let items = if list.is_null(i) {
                Vec::new()
            } else {
                let v = list.value(i);
                (0..v.len())
                    .map(|j| arrow::util::display::array_value_to_string(&v, j).unwrap())
                    .collect()
            };
            out.push((row.value(i).to_string(), cell.value(i).to_string(), items));
        }
    }
    out
}

/// A spec with retrieved examples, calibrated cells and a `knn_vote` cell, over the test
/// project's rows and 40 training rows, with a fake embedder.
pub const KNN_SPEC: &str = r#"name: t
dataset:
  path: data/reviews.jsonl
  id: id
  text: text
  label: label
  labels: {0: negative, 1: positive}
  sample: {n: 12, stratify: true, seed: 5}
models:
  - id: fake-a
    gguf: models/a.gguf
    n_ctx: 512
embedders:
  - id: emb
    gguf: models/emb.gguf
prompts:
  - id: zero
    user: "Review: {{ text }}"
  - id: knn
    user: "{% for e in examples %}{{ e.text }} => {{ e.label }}\n{% endfor %}Review: {{ text }}"
    shots: {strategy: knn, k: 4, from: data/reviews.jsonl, embedder: emb, per_label: true}
methods:
  - id: ll
    kind: loglik
  - id: ll-fit
    kind: loglik
    calibrate: {fit: {from: data/train.jsonl, n: 10, seed: 1}}
  - id: ll-cf
    kind: loglik
    calibrate: content_free
  - id: vote
    kind: knn_vote
    k: 5
    embedder: emb
    from: data/train.jsonl
"#;

pub fn knn_project() -> Project {
    let p = Project::new();
    let mut train = String::new();
    for i in 0..40 {
        let word = if i % 2 == 1 {
            "wonderful lovely"
        } else {
            "dreadful boring"
        };
        train.push_str(
            &serde_json::json!({"id": format!("t{i}"), "text": format!("Train review {i}: a {word} film."), "label": i % 2})
                .to_string(),
        );
        train.push('\n');
    }
    p.write("data/train.jsonl", &train);
    let mut payload = pipeline::backend::fake::EMBEDDER_MARKER.to_vec();
    payload.extend_from_slice(b" v1");
    pipeline::model::write_fake_gguf(&p.path("models/emb.gguf"), &payload).unwrap();
    p.write("spec.yaml", KNN_SPEC);
    p
}

/// A minimal HTTP/1.1 client for loopback tests: any bytes as the body, the raw answer back.
/// A cascade spec: two fake models (`b` only where a cascade sends rows) and one loglik prompt.
pub fn cascade_spec(cascade: &str, b_grid: bool) -> String {
    format!(
        r#"name: t
dataset:
  path: data/reviews.jsonl
  id: id
  text: text
  label: label
  labels: {{0: negative, 1: positive}}
  sample: {{n: 12, stratify: true, seed: 5}}
models:
  - id: a
    gguf: models/a.gguf
    n_ctx: 512
  - id: b
    gguf: models/b.gguf
    n_ctx: 512
    grid: {b_grid}
  - id: c
    gguf: models/c.gguf
    n_ctx: 512
    grid: false
prompts:
  - id: p1
    user: {{file: prompts/p1.j2}}
methods:
  - id: ll
    kind: loglik
  - id: gen
    kind: generate
    max_tokens: 4
sampling:
  temperature: 0.0
cascades:
{cascade}"#
    )
}

pub const CASCADE_MARGIN: &str =
    "  - {id: ab, first: a/p1/ll, then: b/p1/ll, escalate: {margin: 2.0}}\n";

pub fn cascade_project(spec_text: &str) -> Project {
    let p = Project::new();
    pipeline::model::write_fake_gguf(&p.path("models/b.gguf"), b"fake model b").unwrap();
    pipeline::model::write_fake_gguf(&p.path("models/c.gguf"), b"fake model c").unwrap();
    let mut train = String::new();
    for i in 0..60 {
        let label = i % 2;
        let word = if label == 1 { "lovely" } else { "awful" };
        train.push_str(&format!(
            "{{\"id\": \"t{i}\", \"text\": \"Training review {i}, {word} and {word} again.\", \"label\": {label}}}\n"
        ));
    }
    p.write("data/train.jsonl", &train);
    p.write("spec.yaml", spec_text);
    p
}

pub mod http {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    pub struct Response {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: String,
    }

    impl Response {
        pub fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
        }

        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    pub fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> Response {
        let mut s = TcpStream::connect(addr).expect("connect to the server");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        // A body over the server's limit may be refused before it is all sent.
        let _ = s.write_all(body);
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect::<Vec<_>>();
        let chunked = headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_string()
        };
        Response {
            status,
            headers,
            body,
        }
    }

    fn dechunk(mut s: &str) -> String {
        let mut out = String::new();
        while let Some((size, rest)) = s.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&rest[..n.min(rest.len())]);
            s = rest.get(n + 2..).unwrap_or("");
        }
        out
    }

    pub fn post_json(addr: &str, path: &str, v: &serde_json::Value) -> Response {
        request(addr, "POST", path, v.to_string().as_bytes())
    }

    pub fn get(addr: &str, path: &str) -> Response {
        request(addr, "GET", path, b"")
    }
}

/// A `pipeline serve` process on a free loopback port, stopped (SIGTERM) when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub addr: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Start `pipeline serve` in `p` with these arguments and wait until it listens.
    pub fn start(p: &Project, args: &[&str], envs: &[(&str, &str)]) -> Server {
        use std::io::BufRead;
        let mut all = vec!["serve", "spec.yaml", "--addr", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let mut cmd = p.cmd(&all);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(a) = line.split("http://").nth(1) {
                    let _ = tx.send(a.trim().to_string());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx
            .recv_timeout(std::time::Duration::from_secs(600))
            .unwrap_or_else(|_| panic!("the server did not start:\n{}", log.lock().unwrap()));
        Server {
            child,
            addr,
            stderr: log,
        }
    }

    /// Wait until `/health` says 200.
    pub fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        loop {
            if http::get(&self.addr, "/health").status == 200 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not ready:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.stop();
        }
    }
}

/// `plan` of the project's spec with the fake backend, which must refuse it as bad input
/// (exit status 2): its error message.
pub fn plan_error(p: &Project) -> String {
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `run` of the project's spec in this process, on a fake backend whose calls are counted.
pub fn fake_run(p: &Project) -> std::sync::Arc<pipeline::backend::fake::FakeCalls> {
    fake_run_with(p, pipeline::app::RunOptions::default()).1
}

/// `run` of the project's spec in this process with `opts`, on a fake backend whose calls
/// are counted; it must end without an error.
pub fn fake_run_with(
    p: &Project,
    opts: pipeline::app::RunOptions,
) -> (
    pipeline::app::RunOutcome,
    std::sync::Arc<pipeline::backend::fake::FakeCalls>,
) {
    use pipeline::app::run_with_backend;
    use pipeline::backend::fake::{FakeBackend, FakeCalls};
    use pipeline::backend::{Backend, BackendKind};
    use pipeline::config::Config;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let cfg = Config {
        backend: BackendKind::Fake,
        ..Config::new(p.path("cache"), p.path("reports"))
    };
    let calls = Arc::new(FakeCalls::default());
    let c = calls.clone();
    let make = Arc::new(move || Box::new(FakeBackend::new(c.clone())) as Box<dyn Backend>);
    let outcome = run_with_backend(
        &cfg,
        &p.path("spec.yaml"),
        &opts,
        Arc::new(AtomicBool::new(false)),
        make,
    )
    .unwrap();
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    (outcome, calls)
}

/// The small real model the real-model tests use, found through `$PIPELINE_MODELS_DIR`; why
/// not, when it is not there.
pub fn smollm2() -> Result<PathBuf, String> {
    let dir = std::env::var_os("PIPELINE_MODELS_DIR").ok_or(
        "PIPELINE_MODELS_DIR is not set (`bash scripts/test` sets it and fetches the model)",
    )?;
    let p = PathBuf::from(dir).join("SmolLM2-135M-Instruct-Q4_1.gguf");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} does not exist; fetch it with `../shared/models/fetch \"$PIPELINE_MODELS_DIR\" smollm2-135m`",
            p.display()
        ))
    }
}
