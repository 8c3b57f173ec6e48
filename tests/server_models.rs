//! Models behind an OpenAI-compatible server, against a stand-in llama-server on loopback
//! (deterministic answers, a fault injector in front of them): cells run and are cached as
//! for in-process models, faults are retried with backoff, a stopped server gives counted
//! failed rows that name its URL and a rerun completes them, and no API key reaches any
//! file a run writes.

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Project;
use serde_json::{Value, json};

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
/// Printable ASCII and the control characters: the stand-in's vocabulary (one token a
/// character).
const N_VOCAB: u32 = 128;
/// The stand-in's one control token, `<|im_end|>`, when control tokens are parsed.
const IM_END: i64 = 1000;

/// What the fault injector does to the next inference request.
#[derive(Debug, Clone, Copy)]
enum Fault {
    TooManyRequests {
        retry_after_s: u32,
    },
    Internal,
    /// Answer after this long (longer than the client's timeout).
    Slow(Duration),
    /// Close the connection without an answer.
    Drop,
}

#[derive(Default)]
struct State {
    faults: Mutex<VecDeque<Fault>>,
    /// Inference requests answered, and every request's arrival (path, time, status).
    answered: AtomicUsize,
    log: Mutex<Vec<(String, Instant, u16)>>,
    /// Drop every connection (a stopped server) once this many inference requests were
    /// answered.
    stop_after: Mutex<Option<usize>>,
    down: AtomicBool,
    key: Option<String>,
}

struct FakeServer {
    addr: String,
    state: Arc<State>,
}

impl FakeServer {
    fn start(key: Option<&str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(State {
            key: key.map(str::to_string),
            ..Default::default()
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || handle(stream, &s));
            }
        });
        Self { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn inject(&self, faults: &[Fault]) {
        self.state.faults.lock().unwrap().extend(faults);
    }

    fn answered(&self) -> usize {
        self.state.answered.load(Ordering::SeqCst)
    }

    fn statuses(&self) -> Vec<u16> {
        let log = self.state.log.lock().unwrap();
        log.iter()
            .filter(|(p, _, _)| p == "/completion")
            .map(|e| e.2)
            .collect()
    }
}

fn handle(mut stream: TcpStream, s: &State) {
    let arrived = Instant::now();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut len = 0;
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("authorization:") {
            auth = Some(h["authorization:".len()..].trim().to_string());
        }
    }
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    if s.down.load(Ordering::SeqCst) {
        return; // dropped
    }
    let inference = path == "/completion" || path.ends_with("/completions");
    let record = |status: u16| {
        s.log.lock().unwrap().push((path.clone(), arrived, status));
    };
    let reply = |stream: &mut TcpStream, status: u16, extra: &str, body: &Value| {
        let text = body.to_string();
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{text}",
            text.len()
        );
    };
    if let Some(k) = &s.key
        && auth.as_deref() != Some(&format!("Bearer {k}"))
    {
        record(401);
        return reply(&mut stream, 401, "", &json!({"error": "bad key"}));
    }
    if inference {
        let fault = s.faults.lock().unwrap().pop_front();
        match fault {
            Some(Fault::TooManyRequests { retry_after_s }) => {
                record(429);
                return reply(
                    &mut stream,
                    429,
                    &format!("Retry-After: {retry_after_s}\r\n"),
                    &json!({"error": "slow down"}),
                );
            }
            Some(Fault::Internal) => {
                record(500);
                return reply(&mut stream, 500, "", &json!({"error": "boom"}));
            }
            Some(Fault::Slow(d)) => {
                record(0);
                std::thread::sleep(d);
                return;
            }
            Some(Fault::Drop) => {
                record(0);
                return;
            }
            None => {}
        }
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let answer = match (method.as_str(), path.as_str()) {
        ("GET", "/v1/models") => {
            json!({"object": "list", "data": [{"id": "fake-llm", "meta": {"n_vocab": N_VOCAB}}]})
        }
        ("GET", "/props") => json!({
            "build_info": "b0-fake",
            "model_path": "/srv/fake-llm.gguf",
            "total_slots": 2,
            "chat_template": CHATML,
            "default_generation_settings": {"n_ctx": 4096},
        }),
        ("POST", "/tokenize") => {
            let text = req["content"].as_str().unwrap_or("");
            let special = req["parse_special"].as_bool().unwrap_or(true);
            json!({"tokens": tokenize(text, special)})
        }
        ("POST", "/detokenize") => {
            let text: String = req["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|t| char::from_u32(t.as_u64()? as u32))
                .collect();
            json!({"content": text})
        }
        ("POST", "/completion") => complete(&req),
        ("POST", "/v1/chat/completions") => {
            let text = req["messages"].to_string();
            json!({
                "choices": [{"message": {"role": "assistant", "content": verdict(&text)}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": text.len(), "completion_tokens": 1},
            })
        }
        _ => {
            record(404);
            return reply(&mut stream, 404, "", &json!({"error": "no such endpoint"}));
        }
    };
    if inference {
        let n = s.answered.fetch_add(1, Ordering::SeqCst) + 1;
        if s.stop_after.lock().unwrap().is_some_and(|k| n > k) {
            s.down.store(true, Ordering::SeqCst);
            return;
        }
    }
    record(200);
    reply(&mut stream, 200, "", &answer);
}

fn tokenize(text: &str, special: bool) -> Vec<i64> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        if special && rest.starts_with("<|im_end|>") {
            out.push(IM_END);
            rest = &rest["<|im_end|>".len()..];
            continue;
        }
        let c = rest.chars().next().unwrap();
        out.push(i64::from(u32::from(c).min(N_VOCAB - 1)));
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn verdict(text: &str) -> &'static str {
    if text.contains("wonderful") {
        "positive"
    } else {
        "negative"
    }
}

/// llama-server's `/completion`: a generation, or with `n_probs` the next-token
/// distribution (the right label's first letter likelier).
fn complete(req: &Value) -> Value {
    let text: String = match &req["prompt"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.clone(),
                v => char::from_u32(v.as_u64().unwrap_or(0) as u32)
                    .unwrap_or('?')
                    .to_string(),
            })
            .collect(),
        _ => String::new(),
    };
    let timings = json!({"prompt_n": text.len(), "prompt_ms": 1.0});
    let n_probs = req["n_probs"].as_u64().unwrap_or(0) as usize;
    let n_predict = req["n_predict"].as_i64().unwrap_or(-1);
    let first = if verdict(&text) == "positive" {
        'p'
    } else {
        'n'
    };
    // A one-token request (the label log-likelihood) answers the likeliest letter; a
    // generation the whole verdict.
    let (content, stop_type) = if n_predict == 1 {
        (first.to_string(), "limit")
    } else {
        (verdict(&text).to_string(), "eos")
    };
    let mut answer = json!({
        "content": content,
        "stop_type": stop_type,
        "tokens_predicted": 1,
        "tokens_evaluated": text.len(),
        "timings": timings,
    });
    if n_probs > 0 {
        let score = |t: u32| {
            if char::from_u32(t) == Some(first) {
                3.0
            } else {
                0.0
            }
        };
        let norm = (0..N_VOCAB).map(|t| f64::exp(score(t))).sum::<f64>().ln();
        let mut dist: Vec<(u32, f64)> = (0..N_VOCAB).map(|t| (t, score(t) - norm)).collect();
        dist.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        dist.truncate(n_probs);
        let top: Vec<Value> = dist
            .iter()
            .map(|(t, l)| json!({"id": t, "token": char::from_u32(*t).unwrap_or('?').to_string(), "logprob": l}))
            .collect();
        answer["completion_probabilities"] =
            json!([{"id": dist[0].0, "logprob": dist[0].1, "top_logprobs": top}]);
    }
    answer
}

/// The test project with its model behind `url`.
fn project(server: &str) -> Project {
    let p = Project::new();
    let spec = common::SPEC.replace(
        "  - id: fake-a\n    gguf: models/a.gguf\n    n_ctx: 512\n",
        &format!("  - id: served\n{server}"),
    );
    p.write("spec.yaml", &spec);
    p
}

fn served(url: &str, extra: &str) -> String {
    format!("    server: {{url: \"{url}\", concurrency: 2, timeout_s: 2, retries: 3{extra}}}\n")
}

#[test]
fn a_served_model_runs_every_cell_and_its_rows_are_cached() {
    let server = FakeServer::start(None);
    let p = project(&served(&server.url(), ""));
    let run = p.run();
    // 12 rows × 2 prompts × (2 temperatures + loglik).
    assert_eq!(run["computed_rows"], 72, "{run}");
    assert_eq!(run["failed_rows"], 0, "{run}");
    let cells = common::read_parquet(&p.path("reports/t/metrics.parquet"));
    assert_eq!(cells.len(), 6);
    for c in &cells {
        // The stand-in answers right: every cell is exact.
        assert_eq!(c["accuracy"], 1.0, "{c:?}");
    }
    // run.json says what the server is, and that its rows are not bit-exact.
    let run_json: Value = serde_json::from_str(&p.read("reports/t/run.json")).unwrap();
    let m = &run_json["models"][0]["server"];
    assert_eq!(m["build"], "b0-fake", "{run_json}");
    assert_eq!(m["bit_exact"], false);
    assert_eq!(m["model"], "fake-llm");
    assert!(
        common::report_html(&p).contains("not bit-exact"),
        "the report says which API was used and that rows are not bit-exact"
    );

    // A second run computes nothing: it asks the server only what it is (its three
    // 16-token probes of the RAM prompt cache), never a row.
    let before = server.answered();
    let again = p.run();
    assert_eq!(again["computed_rows"], 0, "{again}");
    assert_eq!(server.answered(), before + 3);
}

#[test]
fn faults_are_retried_with_backoff_honouring_retry_after() {
    let server = FakeServer::start(None);
    let p = project(&format!(
        "    server: {{url: \"{}\", concurrency: 1, timeout_s: 1, retries: 4}}\n",
        server.url()
    ));
    server.inject(&[
        Fault::TooManyRequests { retry_after_s: 1 },
        Fault::Internal,
        Fault::Slow(Duration::from_secs(3)),
        Fault::Drop,
    ]);
    let run = p.run();
    assert_eq!(run["failed_rows"], 0, "{run}");
    assert_eq!(run["computed_rows"], 72, "{run}");
    let statuses = server.statuses();
    assert_eq!(&statuses[..5], &[429, 500, 0, 0, 200], "{statuses:?}");
    // The retry after the 429 waited at least its Retry-After.
    let log = server.state.log.lock().unwrap();
    let completions: Vec<&Instant> = log
        .iter()
        .filter(|(p, _, _)| p == "/completion")
        .map(|e| &e.1)
        .collect();
    assert!(
        completions[1].duration_since(*completions[0]) >= Duration::from_millis(950),
        "Retry-After: 1 honoured"
    );
}

#[test]
fn a_stopped_server_gives_failed_rows_naming_its_url_and_a_rerun_completes_them() {
    let server = FakeServer::start(None);
    *server.state.stop_after.lock().unwrap() = Some(20);
    let p = project(&format!(
        "    server: {{url: \"{}\", concurrency: 2, timeout_s: 2, retries: 1}}\n",
        server.url()
    ));
    let run = p.run();
    let failed = run["failed_rows"].as_u64().unwrap();
    assert!(failed > 0, "{run}");
    assert_eq!(run["failed_by_kind"]["server"], failed, "{run}");
    let failures = common::failures(&p.path("reports/t/failures.parquet"));
    assert!(
        failures.iter().all(|f| f.contains(&server.addr)),
        "every failed row names the URL: {failures:?}"
    );
    assert!(p.path("reports/t/index.html").is_file(), "a report");

    // The server is back: the rerun computes just the failed rows.
    *server.state.stop_after.lock().unwrap() = None;
    server.state.down.store(false, Ordering::SeqCst);
    let again = p.run();
    assert_eq!(again["failed_rows"], 0, "{again}");
    assert_eq!(again["computed_rows"], failed, "{again}");
}

#[test]
fn no_api_key_reaches_any_file_a_run_writes() {
    let key = "sk-test-0123456789abcdef-secret";
    let server = FakeServer::start(Some(key));
    let p = project(&served(
        &server.url(),
        ", api_key_env: PIPELINE_TEST_API_KEY",
    ));
    let out = p
        .cmd(&["run", "spec.yaml", "--backend", "fake"])
        .env("PIPELINE_TEST_API_KEY", key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.run_json()["failed_rows"], 0);
    let logs = [out.stdout, out.stderr].concat();
    assert!(!String::from_utf8_lossy(&logs).contains(key));
    let mut files = 0;
    for entry in walk(p.dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        files += 1;
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "{} holds the API key",
            entry.display()
        );
    }
    assert!(files > 10, "the run wrote its cache and report");

    // Without the variable, the run stops before any request, naming it.
    let out = p
        .cmd(&["run", "spec.yaml", "--backend", "fake"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned();
    assert!(text.contains("PIPELINE_TEST_API_KEY"), "{text}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn the_chat_endpoint_generates_and_a_spec_asking_what_a_server_cannot_give_is_refused() {
    let server = FakeServer::start(None);
    // Generation through the chat endpoint.
    let p = project(&served(&server.url(), ", api: chat"));
    let spec = p
        .read("spec.yaml")
        .replace("  - id: ll\n    kind: loglik\n", "");
    p.write("spec.yaml", &spec);
    let run = p.run();
    assert_eq!(run["computed_rows"], 48, "{run}");
    assert_eq!(run["failed_rows"], 0, "{run}");

    // Log-likelihood through a chat endpoint: a located error at plan.
    let p = project(&served(&server.url(), ", api: chat"));
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("spec.yaml:")
            && err.contains("models[0].server")
            && err.contains("api: completions"),
        "{err}"
    );

    // A model that is both a file and a server.
    let p = project(&format!(
        "    gguf: models/a.gguf\n{}",
        served(&server.url(), "")
    ));
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("models[0].gguf") && err.contains("not both"),
        "{err}"
    );

    // Credentials in the URL.
    let p = project("    server: {url: \"http://user:pw@127.0.0.1:1/v1\"}\n");
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("models[0].server.url") && err.contains("api_key_env"),
        "{err}"
    );
}
