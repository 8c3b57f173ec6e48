//! The `hf:` download path, against a local HTTP server that serves the hub's URL layout
//! (`HEAD`/`GET /{owner}/{repo}/resolve/{rev}/{file}` with `X-Repo-Commit` and `ETag`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use pipeline::model::{HubOptions, Resolver};
use pipeline::spec;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serve `body` for every resolve URL; returns the base URL and the request log.
fn serve(body: Vec<u8>) -> (String, Arc<Mutex<Vec<String>>>) {
    serve_with_get_status(body, 200)
}

/// As `serve`, but `GET` answers with `get_status` (HEAD still says 200).
fn serve_with_get_status(body: Vec<u8>, get_status: u16) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Drain the headers.
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
            }
            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let path = parts.next().unwrap_or("").to_string();
            log2.lock().unwrap().push(format!("{method} {path}"));
            let ok = path.contains("/resolve/");
            let etag = blake3::hash(&body).to_hex().to_string();
            let status = if method == "GET" { get_status } else { 200 };
            let head = if ok {
                format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = stream.write_all(head.as_bytes());
            if ok && method == "GET" {
                let _ = stream.write_all(&body);
            }
            let _ = stream.flush();
            let mut sink = [0u8; 64];
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(10)));
            let _ = stream.read(&mut sink);
        }
    });
    (base, log)
}

fn model_spec(dir: &Path, sha: Option<&str>) -> spec::ModelSpec {
    let sha_line = sha
        .map(|s| format!("    sha256: {s}\n"))
        .unwrap_or_default();
    let yaml = format!(
        "name: hub\ndataset:\n  path: d.csv\n  text: text\n  label: label\n  labels: {{0: no, 1: yes}}\nmodels:\n  - id: m\n    gguf: hf:TestOrg/Tiny-GGUF/tiny-Q4.gguf\n{sha_line}prompts:\n  - id: p\n    user: \"{{{{ text }}}}\"\nmethods:\n  - id: ll\n    kind: loglik\n"
    );
    let path = dir.join("spec.yaml");
    std::fs::write(&path, &yaml).unwrap();
    spec::load(&path).unwrap().models.remove(0)
}

fn resolver(dir: &Path, endpoint: &str) -> Resolver {
    Resolver {
        models_dir: None,
        hub: HubOptions {
            endpoint: Some(endpoint.to_string()),
            cache_dir: Some(dir.join("hf-cache")),
            retries: Some(0),
            show_progress: false,
        },
        digest_dir: dir.join("digests"),
        memo_read_only: false,
    }
}

fn gguf_bytes() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend((0..4096u32).flat_map(|i| i.to_le_bytes()));
    b
}

#[test]
fn downloads_into_the_hub_cache_then_finds_it_offline() {
    let dir = tempfile::tempdir().unwrap();
    let body = gguf_bytes();
    let sha = pipeline::model::sha256_file(&{
        let p = dir.path().join("expected.gguf");
        std::fs::write(&p, &body).unwrap();
        p
    })
    .unwrap();
    let (base, log) = serve(body.clone());
    let spec = model_spec(dir.path(), Some(&sha));
    let r = resolver(dir.path(), &base);
    assert!(
        r.locate(&spec).unwrap().is_none(),
        "not cached before the download"
    );
    let m = r.resolve(&spec).unwrap();
    assert_eq!(m.found_via, "download");
    assert_eq!(m.sha256, sha);
    assert_eq!(std::fs::read(&m.path).unwrap(), body);
    // Same layout as Python's huggingface_hub: models--OWNER--REPO/snapshots/COMMIT/FILE.
    let p = m.path.to_string_lossy().to_string();
    assert!(
        p.contains("models--TestOrg--Tiny-GGUF") && p.contains(COMMIT),
        "{p}"
    );
    let requests = log.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /TestOrg/Tiny-GGUF/resolve/main/tiny-Q4.gguf")),
        "{requests:?}"
    );

    // A second resolver with an unreachable endpoint finds the cached file.
    let offline = resolver(dir.path(), "http://127.0.0.1:9");
    let again = offline.resolve(&spec).unwrap();
    assert_eq!(again.found_via, "huggingface cache");
    assert_eq!(again.path, m.path);
}

#[test]
fn an_error_page_is_not_kept_as_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = serve(b"<html>rate limited</html>".to_vec());
    let spec = model_spec(dir.path(), None);
    let r = resolver(dir.path(), &base);
    let e = r.resolve(&spec).unwrap_err();
    assert!(e.to_string().contains("not a GGUF file"), "{e}");
    assert_eq!(e.field, "models[0].gguf");
    assert!(
        r.locate(&spec).unwrap().is_none(),
        "the bad download was removed from the cache"
    );
}

#[test]
fn a_failed_get_whose_error_body_lands_in_the_cache_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = serve_with_get_status(b"{\"error\": \"internal\"}".to_vec(), 500);
    let spec = model_spec(dir.path(), None);
    let r = resolver(dir.path(), &base);
    assert!(r.resolve(&spec).is_err());
    assert!(
        r.locate(&spec).unwrap().is_none(),
        "nothing that fails the checks stays cached"
    );
}

#[test]
fn a_download_with_the_wrong_sha256_is_rejected_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = serve(gguf_bytes());
    let spec = model_spec(dir.path(), Some(&"0".repeat(64)));
    let r = resolver(dir.path(), &base);
    let e = r.resolve(&spec).unwrap_err();
    assert!(e.to_string().contains("wrong sha256"), "{e}");
    assert_eq!(e.field, "models[0].sha256");
    assert!(r.locate(&spec).unwrap().is_none());
}

#[test]
fn models_dir_is_searched_by_file_name_before_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("models")).unwrap();
    std::fs::write(dir.path().join("models/tiny-Q4.gguf"), gguf_bytes()).unwrap();
    let spec = model_spec(dir.path(), None);
    let mut r = resolver(dir.path(), "http://127.0.0.1:9");
    r.models_dir = Some(dir.path().join("models"));
    let m = r.resolve(&spec).unwrap();
    assert_eq!(m.found_via, "the models folder");
}
