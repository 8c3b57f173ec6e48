//! `pipeline serve` end to end: the real binary on a free loopback port. Every endpoint and
//! error status, the bounded queue, SIGTERM, and answers identical to `pipeline run`'s, with
//! the fake backend (always) and with SmolLM2 and MiniLM (from `$PIPELINE_MODELS_DIR`;
//! listed as ignored without them, failing under `CI=true`).

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use common::http::{get, post_json, request};
use common::{Project, Server};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::json;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let mut trials = vec![
        Trial::test(
            "fake_every_endpoint_and_error_status",
            fake_every_endpoint_and_error_status,
        ),
        Trial::test(
            "fake_serve_and_run_give_identical_rows",
            fake_serve_and_run_give_identical_rows,
        ),
        Trial::test(
            "a_full_queue_answers_429_and_sigterm_drains_in_flight_requests",
            a_full_queue_answers_429_and_sigterm_drains_in_flight_requests,
        ),
        Trial::test(
            "health_is_503_until_the_model_is_loaded",
            health_is_503_until_the_model_is_loaded,
        ),
        Trial::test(
            "control_characters_in_a_review_are_422_naming_the_field",
            control_characters_in_a_review_are_422_naming_the_field,
        ),
        Trial::test(
            "a_request_whose_client_left_is_finished_and_cached",
            a_request_whose_client_left_is_finished_and_cached,
        ),
        Trial::test(
            "a_served_cascade_sends_only_unsure_reviews_to_its_second_model",
            a_served_cascade_sends_only_unsure_reviews_to_its_second_model,
        ),
    ];
    let missing = [
        "SmolLM2-135M-Instruct-Q4_1.gguf",
        "all-MiniLM-L6-v2-F16.gguf",
    ]
    .iter()
    .find_map(|f| model(f).err());
    trials.extend(common::trials_needing(
        "SmolLM2-135M and all-MiniLM-L6-v2",
        missing,
        vec![(
            "smollm2_serve_answers_every_endpoint_as_run_does",
            smollm2_serve_answers_every_endpoint_as_run_does,
        )],
    ));
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

fn fake(p: &Project, cell: &str, extra: &[&str], envs: &[(&str, &str)]) -> Server {
    let mut args = vec!["--cell", cell, "--backend", "fake"];
    args.extend_from_slice(extra);
    Server::start(p, &args, envs)
}

/// Every endpoint, and every error status with its JSON error naming the field.
fn check_endpoints(s: &Server, cell: &str, review: &str, labels: &[&str]) {
    let a = &s.addr;
    let h = get(a, "/health");
    assert_eq!(h.status, 200, "{}", h.body);
    assert_eq!(h.json()["cell"], cell);

    let first = post_json(a, "/v1/sentiment", &json!({"review_text": review}));
    assert_eq!(first.status, 200, "{}", first.body);
    let r = first.json();
    assert!(labels.contains(&r["sentiment"].as_str().unwrap()), "{r}");
    let c = r["confidence"].as_f64().unwrap();
    let probs = r["label_probs"].as_object().unwrap();
    assert!((probs.values().map(|p| p.as_f64().unwrap()).sum::<f64>() - 1.0).abs() < 1e-9);
    assert_eq!(probs[r["sentiment"].as_str().unwrap()].as_f64().unwrap(), c);
    assert_eq!(
        r["similar_reviews"].as_array().unwrap().len(),
        3,
        "default k"
    );
    for sr in r["similar_reviews"].as_array().unwrap() {
        assert!(sr["id"].is_string() && sr["text"].is_string() && sr["similarity"].is_number());
        assert!(labels.contains(&sr["label"].as_str().unwrap()));
    }
    assert_eq!(r["cell"], cell);
    assert!(r["latency_ms"].as_f64().unwrap() >= 0.0);
    // The same review again: from the cache, the same answer.
    let again = post_json(a, "/v1/sentiment?k=5", &json!({"review_text": review})).json();
    assert_eq!(again["cached"], true);
    assert_eq!(again["label_probs"], r["label_probs"]);
    assert_eq!(again["similar_reviews"].as_array().unwrap().len(), 5);
    let none = post_json(a, "/v1/sentiment?k=0", &json!({"review_text": review})).json();
    assert_eq!(none["similar_reviews"].as_array().unwrap().len(), 0);

    let batch = post_json(
        a,
        "/v1/sentiment/batch",
        &json!({"reviews": [{"review_text": review}, {"review_text": "Another, quite different review."}]}),
    );
    assert_eq!(batch.status, 200, "{}", batch.body);
    assert_eq!(batch.json()["results"].as_array().unwrap().len(), 2);

    // The generic endpoint answers the same text with the same numbers, under its names.
    let c = post_json(a, "/v1/classify", &json!({"text": review}));
    assert_eq!(c.status, 200, "{}", c.body);
    let c = c.json();
    assert_eq!(c["label"], r["sentiment"]);
    assert_eq!(c["label_probs"], r["label_probs"]);
    assert_eq!(c["cached"], true);
    assert_eq!(c["similar"].as_array().unwrap().len(), 3);
    assert!(
        c.get("sentiment").is_none() && c.get("similar_reviews").is_none(),
        "{c}"
    );
    let cb = post_json(
        a,
        "/v1/classify/batch",
        &json!({"rows": [{"text": review}, {"text": ""}]}),
    );
    assert_eq!(cb.status, 422, "{}", cb.body);
    assert_eq!(cb.json()["field"], "rows[1].text");
    let cb = post_json(
        a,
        "/v1/classify/batch",
        &json!({"rows": [{"text": review}]}),
    );
    assert_eq!(cb.json()["results"][0]["label"], r["sentiment"]);
    let missing = post_json(a, "/v1/classify", &json!({"review_text": review}));
    assert_eq!(missing.status, 422, "{}", missing.body);
    assert_eq!(missing.json()["field"], "text");

    let metrics = get(a, "/metrics");
    assert_eq!(metrics.status, 200);
    for m in [
        "pipeline_requests_total{endpoint=\"sentiment\",status=\"200\"}",
        "pipeline_request_duration_seconds_bucket",
        "pipeline_queue_depth",
        "pipeline_cache_hits_total",
    ] {
        assert!(metrics.body.contains(m), "{m} in\n{}", metrics.body);
    }
    let doc = get(a, "/openapi.json").json();
    for path in [
        "/v1/classify",
        "/v1/classify/batch",
        "/v1/sentiment",
        "/v1/sentiment/batch",
        "/health",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path}");
    }
    assert!(
        doc["components"]["schemas"]["ClassifyResponse"]["properties"]["confidence"]["description"]
            .as_str()
            .unwrap()
            .contains("generate")
    );
    assert!(doc["components"]["schemas"]["SentimentResponse"]["properties"]["confidence"]["description"]
        .as_str()
        .unwrap()
        .contains("generate"));

    // Errors: JSON, naming the field.
    let error = |r: common::http::Response, status: u16, field: Option<&str>| {
        assert_eq!(r.status, status, "{}", r.body);
        let e = r.json();
        assert!(e["error"].is_string(), "{e}");
        assert_eq!(e["field"].as_str(), field, "{e}");
    };
    error(
        post_json(a, "/v1/sentiment", &json!({})),
        422,
        Some("review_text"),
    );
    error(
        post_json(a, "/v1/sentiment", &json!({"review_text": "  "})),
        422,
        Some("review_text"),
    );
    error(
        post_json(a, "/v1/sentiment", &json!({"review_text": 7})),
        422,
        Some("review_text"),
    );
    error(
        request(
            a,
            "POST",
            "/v1/sentiment",
            b"{\"review_text\": \"\xff\xfe\"}",
        ),
        422,
        Some("review_text"),
    );
    error(request(a, "POST", "/v1/sentiment", b"{not json"), 400, None);
    error(
        post_json(a, "/v1/sentiment?k=-1", &json!({"review_text": review})),
        422,
        Some("k"),
    );
    let big = format!("{{\"review_text\": \"{}\"}}", "a".repeat(2 << 20));
    error(
        request(a, "POST", "/v1/sentiment", big.as_bytes()),
        413,
        None,
    );
    let many: Vec<_> = (0..40)
        .map(|i| json!({"review_text": format!("review {i}")}))
        .collect();
    error(
        post_json(a, "/v1/sentiment/batch", &json!({"reviews": many})),
        413,
        Some("reviews"),
    );
    error(
        post_json(
            a,
            "/v1/sentiment/batch",
            &json!({"reviews": [{"review_text": "ok"}, {"review_text": ""}]}),
        ),
        422,
        Some("reviews[1].review_text"),
    );
    // A review far over the context is cut to the spec's budget, never a 500.
    let long = "This film is long. ".repeat(3000);
    let r = post_json(a, "/v1/sentiment?k=0", &json!({"review_text": long}));
    assert_eq!(r.status, 200, "{}", r.body);
}

fn fake_every_endpoint_and_error_status() -> Result<(), Failed> {
    let p = common::knn_project();
    p.write(
        "spec.yaml",
        &common::KNN_SPEC.replace(
            "  sample: {n: 12",
            "  max_text_tokens: 64\n  sample: {n: 12",
        ),
    );
    let mut s = fake(&p, "fake-a/knn/ll-fit", &[], &[]);
    s.wait_ready();
    check_endpoints(
        &s,
        "fake-a/knn/ll-fit",
        "A wonderful, lovely film.",
        &["negative", "positive"],
    );
    assert!(s.stop().success());
    Ok(())
}

/// The rows of two caches under the same keys: their outputs must be the same bits.
fn same_rows(a: &Path, b: &Path) -> usize {
    let a = pipeline::cache::Cache::open_read_only(a).unwrap();
    let b = pipeline::cache::Cache::open_read_only(b).unwrap();
    let mut shared = 0;
    let a = a.rows(a.keys().copied().collect::<Vec<_>>()).unwrap();
    let b = b.rows(b.keys().copied().collect::<Vec<_>>()).unwrap();
    for (key, r) in b.iter() {
        if let Some(x) = a.get(key) {
            let bits = |v: &Option<Vec<f64>>| {
                v.as_ref()
                    .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            };
            assert_eq!(bits(&x.logprobs), bits(&r.logprobs), "row {key}");
            assert_eq!(x.text, r.text);
            shared += 1;
        }
    }
    shared
}

/// The evaluation rows' texts of a spec, as the plan cleaned them.
fn texts(p: &Project) -> Vec<String> {
    let cfg = pipeline::config::Config {
        backend: pipeline::backend::BackendKind::Fake,
        ..pipeline::config::Config::new(p.path("cache"), p.path("reports"))
    };
    let plan = pipeline::app::plan(&cfg, &p.path("spec.yaml"), None).unwrap();
    plan.plan
        .dataset
        .rows
        .iter()
        .map(|r| r.text.clone())
        .collect()
}

fn fake_serve_and_run_give_identical_rows() -> Result<(), Failed> {
    let served = common::knn_project();
    let ran = common::knn_project();
    ran.run();
    let s = fake(&served, "fake-a/knn/ll-fit", &[], &[]);
    s.wait_ready();
    for t in texts(&served) {
        let r = post_json(&s.addr, "/v1/sentiment", &json!({"review_text": t}));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["cached"], false);
    }
    drop(s);
    // Written in batches, not one segment file per review.
    let segments = std::fs::read_dir(served.path("cache/v2/rows"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("seg-") && name.ends_with(".parquet")
        })
        .count();
    assert!(segments <= 3, "{segments} segments for 12 served reviews");
    // The served rows are the run's rows, bit for bit, and a run finds them cached.
    assert!(same_rows(&ran.path("cache"), &served.path("cache")) >= 12);
    served.run();
    let plan = served.plan();
    let cell = plan["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "fake-a/knn/ll")
        .unwrap()
        .clone();
    assert_eq!(cell["cached"], 12, "{cell}");
    Ok(())
}

/// Rows of a cache folder's segments computed for `cell`.
fn rows_of(cache: &Path, cell: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(cache.join("v2/rows")).unwrap().flatten() {
        if let Ok(rows) = pipeline::cache::read_segment(&e.path()) {
            n += rows.iter().flatten().filter(|r| r.cell_id == cell).count();
        }
    }
    n
}

fn a_served_cascade_sends_only_unsure_reviews_to_its_second_model() -> Result<(), Failed> {
    // The study's answers: a run of the cascade.
    let ran = common::cascade_project(&common::cascade_spec(common::CASCADE_MARGIN, false));
    ran.run();
    let study = common::predictions(&ran.path("reports/t/predictions.parquet"));
    // A server of the cascade cell on a fresh cache: both models load; every review gets
    // the run's answer, and only the reviews the first model is unsure of reach the second.
    let served = common::cascade_project(&common::cascade_spec(common::CASCADE_MARGIN, false));
    let s = fake(&served, "cascade/ab", &[], &[]);
    s.wait_ready();
    let texts = texts(&served);
    let mut went_on = 0;
    for t in &texts {
        let r = post_json(&s.addr, "/v1/sentiment?k=0", &json!({"review_text": t})).json();
        assert_eq!(r["cell"], "cascade/ab", "{r}");
        let stage = r["cascade_stage"].as_u64().unwrap();
        let stages = r["stages"].as_array().unwrap();
        assert_eq!(stages.len() as u64, stage + 1, "{r}");
        assert_eq!(stages[0], "a/p1/ll");
        went_on += stage as usize;
        assert_eq!(r["cached"], false);
        let again = post_json(&s.addr, "/v1/sentiment?k=0", &json!({"review_text": t})).json();
        assert_eq!(again["cached"], true);
        assert_eq!(again["sentiment"], r["sentiment"]);
    }
    drop(s);
    assert!(went_on > 0 && went_on < texts.len(), "{went_on}");
    assert_eq!(rows_of(&served.path("cache"), "a/p1/ll"), texts.len());
    assert_eq!(
        rows_of(&served.path("cache"), "b/p1/ll"),
        went_on,
        "the second model computed only the reviews sent on"
    );
    // The served rows are the study's: a run on the served cache computes no cascade row
    // and gives the same predictions.
    served.run();
    assert_eq!(
        common::predictions(&served.path("reports/t/predictions.parquet"))
            .into_iter()
            .filter(|l| l.starts_with("cascade/"))
            .collect::<Vec<_>>(),
        study
            .into_iter()
            .filter(|l| l.starts_with("cascade/"))
            .collect::<Vec<_>>()
    );
    Ok(())
}

fn a_full_queue_answers_429_and_sigterm_drains_in_flight_requests() -> Result<(), Failed> {
    let p = common::knn_project();
    let mut s = fake(
        &p,
        "fake-a/zero/ll",
        &["--queue", "1"],
        &[("PIPELINE_FAKE_DELAY_MS", "300")],
    );
    s.wait_ready();
    let addr = s.addr.clone();
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let a = addr.clone();
            std::thread::spawn(move || {
                post_json(
                    &a,
                    "/v1/sentiment?k=0",
                    &json!({"review_text": format!("review number {i} here")}),
                )
            })
        })
        .collect();
    let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let busy: Vec<_> = answers.iter().filter(|r| r.status == 429).collect();
    let ok = answers.iter().filter(|r| r.status == 200).count();
    assert!(
        !busy.is_empty() && ok >= 1,
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(ok + busy.len(), 8, "only 200 and 429");
    for b in &busy {
        assert_eq!(b.header("retry-after"), Some("1"));
        assert!(
            b.json()["error"]
                .as_str()
                .unwrap()
                .contains("queue is full")
        );
    }
    // SIGTERM while a request is in flight: it is answered, then the server exits 0.
    let a = addr.clone();
    let in_flight = std::thread::spawn(move || {
        post_json(
            &a,
            "/v1/sentiment?k=0",
            &json!({"review_text": "one more review"}),
        )
    });
    std::thread::sleep(Duration::from_millis(100));
    let status = s.stop();
    assert_eq!(in_flight.join().unwrap().status, 200);
    assert!(status.success(), "{status:?}\n{}", s.log());
    Ok(())
}

fn health_is_503_until_the_model_is_loaded() -> Result<(), Failed> {
    let p = common::knn_project();
    let s = fake(
        &p,
        "fake-a/zero/ll",
        &[],
        &[("PIPELINE_FAKE_LOAD_MS", "1500")],
    );
    let h = get(&s.addr, "/health");
    assert_eq!(h.status, 503, "{}", h.body);
    assert_eq!(h.json()["status"], "loading");
    let r = post_json(
        &s.addr,
        "/v1/sentiment",
        &json!({"review_text": "too early"}),
    );
    assert_eq!(r.status, 503);
    s.wait_ready();
    assert_eq!(get(&s.addr, "/health").json()["status"], "ok");
    Ok(())
}

fn real_spec(p: &Project) {
    let repo = |rel: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(rel)
            .display()
            .to_string()
    };
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
  sample: {{n: 4, stratify: true, seed: 9}}
  clean: {{replace: {{"<br />": " "}}, collapse_whitespace: true}}
  max_text_tokens: 96
models:
  - id: smollm2
    gguf: {smol}
    n_ctx: 1024
embedders:
  - id: minilm
    gguf: {minilm}
    max_tokens: 128
prompts:
  - id: knn
    user: "{{% for e in examples %}}Review: {{{{ e.text }}}}\nSentiment: {{{{ e.label }}}}\n\n{{% endfor %}}Review: {{{{ text }}}}\nSentiment (negative or positive):"
    shots: {{strategy: knn, k: 2, from: {train}, embedder: minilm, pool: {{n: 40, seed: 1}}, per_label: true, max_chars: 300}}
methods:
  - id: ll
    kind: loglik
  - id: ll-fit
    kind: loglik
    calibrate: {{fit: {{from: {train}, n: 8, seed: 2}}}}
"#,
            test = repo("experiments/data/imdb/test.parquet"),
            train = repo("experiments/data/imdb/train.parquet"),
            smol = model("SmolLM2-135M-Instruct-Q4_1.gguf").unwrap().display(),
            minilm = model("all-MiniLM-L6-v2-F16.gguf").unwrap().display(),
        ),
    );
}

fn smollm2_serve_answers_every_endpoint_as_run_does() -> Result<(), Failed> {
    let ran = Project::new();
    real_spec(&ran);
    ran.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let served = Project::new();
    real_spec(&served);
    let mut s = Server::start(
        &served,
        &["--cell", "smollm2/knn/ll-fit", "--threads", "2"],
        &[],
    );
    s.wait_ready();
    let texts = texts(&ran);
    for t in &texts {
        let r = post_json(&s.addr, "/v1/sentiment", &json!({"review_text": t}));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    check_endpoints(
        &s,
        "smollm2/knn/ll-fit",
        &texts[0],
        &["negative", "positive"],
    );
    assert!(s.stop().success());
    // Bit for bit the run's rows (the calibration rows too), and the run finds them cached.
    assert!(same_rows(&ran.path("cache"), &served.path("cache")) >= 4 + 8);
    served.run_ok(&["run", "spec.yaml", "--quiet", "--threads", "2"]);
    let run = served.run_json();
    assert_eq!(run["embed"]["embedded"], 0, "{run}");
    let preds_ran = common::predictions(&ran.path("reports/t/predictions.parquet"));
    let preds_served = common::predictions(&served.path("reports/t/predictions.parquet"));
    assert_eq!(preds_ran, preds_served);
    Ok(())
}

/// A NUL or other control character in a text is the client's error (422 naming the
/// field), never a 500; tabs and line breaks are text.
fn control_characters_in_a_review_are_422_naming_the_field() -> Result<(), Failed> {
    let p = common::knn_project();
    let mut s = fake(&p, "fake-a/zero/ll", &[], &[]);
    s.wait_ready();
    let a = &s.addr;
    for bad in [
        "a\u{0}b",
        "nul at the end \u{0}",
        "bell \u{7}",
        "escape \u{1b}[2J",
    ] {
        let r = post_json(a, "/v1/sentiment?k=0", &json!({ "review_text": bad }));
        assert_eq!(r.status, 422, "{bad:?}: {}", r.body);
        assert_eq!(r.json()["field"], "review_text", "{}", r.body);
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap()
                .contains("control character")
        );
    }
    let r = post_json(
        a,
        "/v1/sentiment/batch?k=0",
        &json!({"reviews": [{"review_text": "fine"}, {"review_text": "not\u{0}fine"}]}),
    );
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["field"], "reviews[1].review_text");
    let r = post_json(
        a,
        "/v1/sentiment?k=0",
        &json!({"review_text": "tabs\tand\nline breaks are text"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(s.stop().success());
    Ok(())
}

/// The value of a counter in `/metrics`.
fn counter(addr: &str, name: &str) -> u64 {
    get(addr, "/metrics")
        .body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A client that gives up (closes its connection) does not waste the work it queued: the
/// row is finished and stored, and the client's retry is answered from the cache.
fn a_request_whose_client_left_is_finished_and_cached() -> Result<(), Failed> {
    use std::io::Write;
    let p = common::knn_project();
    let mut s = fake(
        &p,
        "fake-a/zero/ll",
        &[],
        &[("PIPELINE_FAKE_DELAY_MS", "400")],
    );
    s.wait_ready();
    let a = s.addr.clone();
    let body = json!({"review_text": "a review whose client leaves"}).to_string();
    {
        let mut c = std::net::TcpStream::connect(&a).unwrap();
        write!(
            c,
            "POST /v1/sentiment?k=0 HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        c.flush().unwrap();
        // The event: the request reached the model worker (a cache miss is counted).
        let mut waited = 0;
        while counter(&a, "pipeline_cache_misses_total") == 0 {
            assert!(waited < 300, "the request never reached the worker");
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
        // Gone before the answer (the fake takes 400 ms).
        c.shutdown(std::net::Shutdown::Both).unwrap();
    }
    // The event: the row is stored (bounded wait: the fake takes 400 ms a prompt).
    let mut waited = 0;
    while counter(&a, "pipeline_rows_stored_total") == 0 {
        assert!(waited < 300, "the abandoned request's row was never stored");
        std::thread::sleep(Duration::from_millis(50));
        waited += 1;
    }
    let r = post_json(
        &a,
        "/v1/sentiment?k=0",
        &serde_json::from_str(&body).unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["cached"], true, "{}", r.body);
    assert_eq!(counter(&a, "pipeline_rows_stored_total"), 1);
    assert!(s.stop().success());
    Ok(())
}
