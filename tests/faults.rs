//! Fault injection, with the deterministic fake backend: SIGKILL at random moments of a run,
//! a full disk, concurrent runs on one cache, and a catalogue of malformed inputs. Each test
//! prints its figures (run with `--nocapture` to see them; the README quotes them).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Project, predictions};
use pipeline::cache::Cache;
use pipeline::key::Digest;
use pipeline::rng::SplitMix64;

/// The fake backend's delay per prompt: long enough that a kill lands mid-run.
const DELAY_MS: &str = "15";

fn run_fake(p: &Project) -> Output {
    p.cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
        .env("PIPELINE_FAKE_DELAY_MS", DELAY_MS)
        .output()
        .unwrap()
}

/// Every trusted row of a cache, by key: (text, log-prob bits).
fn trusted_rows(cache_dir: &Path) -> (HashMap<Digest, String>, pipeline::cache::LoadReport) {
    let c = Cache::open_read_only(cache_dir).unwrap();
    let rows = c
        .rows(c.keys().copied().collect::<Vec<_>>())
        .unwrap()
        .iter()
        .map(|(k, r)| {
            let bits: Vec<u64> = r.logprobs.iter().flatten().map(|x| x.to_bits()).collect();
            (*k, format!("{:?} {bits:?}", r.text))
        })
        .collect();
    (rows, c.report.clone())
}

#[test]
fn sigkill_at_twenty_random_moments_then_resume_matches_an_uninterrupted_run() {
    let reference = Project::new();
    let start = Instant::now();
    assert!(run_fake(&reference).status.success());
    let full = start.elapsed();
    let want = predictions(&reference.path("reports/t/predictions.parquet"));
    let (want_rows, _) = trusted_rows(&reference.path("cache"));
    let mut rng = SplitMix64::for_stream(2026, "faults.sigkill");
    let mut survived: Vec<usize> = Vec::new();
    // Twenty kills, and more (up to forty) while fewer than five landed mid-inference: on a
    // loaded machine a run's pace differs from the reference run's.
    let mid_run = |s: &[usize]| s.iter().filter(|&&n| n > 0 && n < 72).count();
    for kill in 0..40 {
        if kill >= 20 && mid_run(&survived) >= 5 {
            break;
        }
        let p = Project::new();
        // A moment anywhere in the run's life: start-up, inference, commits, report.
        let at = Duration::from_secs_f64(full.as_secs_f64() * 1.1 * rng.unit_f64());
        let mut child = p
            .cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
            .env("PIPELINE_FAKE_DELAY_MS", DELAY_MS)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Whatever the cache trusts after the kill is exactly what an uninterrupted run
        // computed.
        let (rows, report) = trusted_rows(&p.path("cache"));
        assert_eq!(report.corrupt_rows, 0, "kill {kill} at {at:?}");
        assert!(
            report.untrusted.is_empty(),
            "kill {kill}: {:?}",
            report.untrusted
        );
        for (k, v) in &rows {
            assert_eq!(want_rows.get(k), Some(v), "kill {kill}: row {k:?}");
        }
        survived.push(rows.len());
        // Resume: only what is missing runs, and the result is the uninterrupted one.
        let out = run_fake(&p);
        assert!(out.status.success(), "resume after kill {kill}");
        let run = p.run_json();
        assert_eq!(run["cached_rows"].as_u64().unwrap() as usize, rows.len());
        assert_eq!(predictions(&p.path("reports/t/predictions.parquet")), want);
    }
    let mid = mid_run(&survived);
    println!(
        "sigkill: {} kills over a {:.2} s run; rows kept per kill {survived:?}; {mid} kills mid-inference; 0 corrupt rows trusted; every resume equal to the uninterrupted run",
        survived.len(),
        full.as_secs_f64()
    );
    assert!(mid >= 5, "most kills should land mid-run: {survived:?}");
}

/// `pipeline` with a file-size limit (RLIMIT_FSIZE, in 512-byte blocks): a write past it
/// fails with EFBIG ("File too large"), as a full disk fails with ENOSPC.
fn run_with_file_limit(p: &Project, blocks: u64) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {blocks}; exec \"$0\" run spec.yaml --backend fake --quiet"
        ))
        .arg(env!("CARGO_BIN_EXE_pipeline"))
        .current_dir(p.dir.path())
        .env("PIPELINE_CACHE_DIR", p.path("cache"))
        .env("PIPELINE_REPORTS_DIR", p.path("reports"))
        .env_remove("PIPELINE_MODELS_DIR")
        .env("PIPELINE_FAKE_DELAY_MS", "0")
        .output()
        .unwrap()
}

#[test]
fn a_full_disk_is_a_clear_error_and_the_next_run_completes() {
    let reference = Project::new();
    reference.run();
    let want = predictions(&reference.path("reports/t/predictions.parquet"));
    let mut figures = Vec::new();
    // 1 KiB: no cache segment fits; 256 KiB: segments fit, the 1 MB report does not.
    for (blocks, what) in [(2, "cache segment"), (512, "report")] {
        let p = Project::new();
        let out = run_with_file_limit(&p, blocks);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains("File too large"), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        match what {
            "cache segment" => {
                assert!(stderr.contains("error: cache "), "{stderr}");
                // The batch that could not be committed is said to be lost, not kept.
                assert!(
                    stderr.contains("could not be stored and run again next time")
                        && !stderr.contains("finished rows are in the cache"),
                    "{stderr}"
                );
            }
            _ => assert!(stderr.contains("index.html"), "{stderr}"),
        }
        // No half-written file is left for a reader, nothing corrupt is trusted.
        let (rows, report) = trusted_rows(&p.path("cache"));
        assert_eq!(report.corrupt_rows, 0);
        assert!(report.untrusted.is_empty());
        let leftovers: Vec<_> = std::fs::read_dir(p.path("cache/v2/rows"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        // With room again, the next run completes and equals an undisturbed one.
        let again = run_fake(&p);
        assert!(again.status.success());
        assert_eq!(predictions(&p.path("reports/t/predictions.parquet")), want);
        figures.push(format!(
            "{what} over the limit: exit 1, \"{}\", {} rows kept",
            stderr
                .lines()
                .find(|l| l.starts_with("error:"))
                .unwrap_or("")
                .chars()
                .take(90)
                .collect::<String>(),
            rows.len()
        ));
    }
    println!("full disk: {}", figures.join("; "));
}

#[test]
fn four_concurrent_runs_on_one_cache_give_identical_outputs() {
    let reference = Project::new();
    reference.run();
    let want = predictions(&reference.path("reports/t/predictions.parquet"));
    let p = Project::new();
    let children: Vec<_> = (0..4)
        .map(|i| {
            p.cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
                .env("PIPELINE_FAKE_DELAY_MS", "5")
                .env("PIPELINE_REPORTS_DIR", p.path(&format!("reports-{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for i in 0..4 {
        assert_eq!(
            predictions(&p.path(&format!("reports-{i}/t/predictions.parquet"))),
            want,
            "run {i}"
        );
    }
    let verify = p.run_ok(&["cache", "verify"]);
    assert!(String::from_utf8_lossy(&verify.stdout).contains("every row verifies"));
    let run = p.run();
    assert_eq!(run["computed_rows"], 0);
    println!("concurrency: 4 runs on one cache, 4 identical prediction tables, cache verifies");
}

/// How a malformed input must be handled.
enum Expect {
    /// Exit 2 with an error naming this file (and line, when given) and mentioning `what`.
    Located {
        file: &'static str,
        line: bool,
        what: &'static str,
    },
    /// Exit 0 with this text on stderr or stdout (a counted, reported problem).
    Counted(&'static str),
}

type Setup = Box<dyn Fn(&Project)>;

fn spec_edit(from: &'static str, to: &'static str) -> Setup {
    Box::new(move |p: &Project| {
        assert!(common::SPEC.contains(from), "{from}");
        p.write("spec.yaml", &common::SPEC.replace(from, to));
    })
}

fn write(rel: &'static str, content: &'static str) -> Setup {
    Box::new(move |p: &Project| p.write(rel, content))
}

fn write_bytes(rel: &'static str, content: Vec<u8>) -> Setup {
    Box::new(move |p: &Project| std::fs::write(p.path(rel), &content).unwrap())
}

/// Use a dataset file of another format in place of the JSONL one.
fn dataset(name: &'static str, content: &'static [u8]) -> Setup {
    Box::new(move |p: &Project| {
        std::fs::write(p.path(&format!("data/{name}")), content).unwrap();
        p.write(
            "spec.yaml",
            &common::SPEC.replace("data/reviews.jsonl", &format!("data/{name}")),
        );
    })
}

/// Damage the cache after a complete run.
fn segment(damage: fn(&Path)) -> Setup {
    Box::new(move |p: &Project| {
        p.run();
        damage(&common::segments(p)[0]);
    })
}

fn loc(file: &'static str, what: &'static str) -> Expect {
    Expect::Located {
        file,
        line: true,
        what,
    }
}

fn file_only(file: &'static str, what: &'static str) -> Expect {
    Expect::Located {
        file,
        line: false,
        what,
    }
}

/// `spec` with a sampling grid of `temperatures` × `seeds` points.
fn wide_grid(spec: &str, temperatures: u32, seeds: u32) -> String {
    let temps: Vec<String> = (0..temperatures)
        .map(|i| format!("{}", f64::from(i) / 100.0))
        .collect();
    let seeds: Vec<String> = (0..seeds).map(|i| i.to_string()).collect();
    spec.replace(
        "temperature: [0.2, 0.8]",
        &format!("temperature: [{}]", temps.join(", ")),
    )
    .replace("  seed: 3\n", &format!("  seed: [{}]\n", seeds.join(", ")))
}

fn catalogue() -> Vec<(&'static str, Setup, Expect)> {
    let s = "spec.yaml";
    vec![
        // Spec YAML.
        ("empty spec", write("spec.yaml", ""), file_only(s, "")),
        (
            "spec is a list",
            write("spec.yaml", "- a\n- b\n"),
            file_only(s, ""),
        ),
        (
            "tab indentation",
            spec_edit("  id: id\n", "\tid: id\n"),
            loc(s, ""),
        ),
        (
            "unterminated quote",
            spec_edit("system: \"You judge reviews.\"", "system: \"You judge"),
            loc(s, ""),
        ),
        (
            "unknown top-level key",
            spec_edit("name: t\n", "name: t\nnmae: u\n"),
            loc(s, "nmae"),
        ),
        (
            "missing models",
            spec_edit(
                "models:\n  - id: fake-a\n    gguf: models/a.gguf\n    n_ctx: 512\n",
                "",
            ),
            loc(s, "models"),
        ),
        (
            "empty models",
            spec_edit(
                "models:\n  - id: fake-a\n    gguf: models/a.gguf\n    n_ctx: 512\n",
                "models: []\n",
            ),
            loc(s, "models"),
        ),
        (
            "wrong type",
            spec_edit("n_ctx: 512", "n_ctx: big"),
            loc(s, "n_ctx"),
        ),
        (
            "negative max_tokens",
            spec_edit("max_tokens: 4", "max_tokens: -4"),
            loc(s, "max_tokens"),
        ),
        (
            "zero max_tokens",
            spec_edit("max_tokens: 4", "max_tokens: 0"),
            loc(s, "max_tokens"),
        ),
        (
            "temperature out of range",
            spec_edit("[0.2, 0.8]", "[0.2, 9]"),
            loc(s, "temperature"),
        ),
        (
            "top_p zero",
            spec_edit("  seed: 3\n", "  seed: 3\n  top_p: 0\n"),
            loc(s, "top_p"),
        ),
        (
            "duplicate key",
            spec_edit("name: t\n", "name: t\nname: u\n"),
            loc(s, "duplicate"),
        ),
        (
            "duplicate model id",
            spec_edit(
                "    n_ctx: 512\n",
                "    n_ctx: 512\n  - id: fake-a\n    gguf: models/a.gguf\n",
            ),
            loc(s, "duplicate id"),
        ),
        (
            "id with @",
            spec_edit("- id: p1", "- id: p1@x"),
            loc(s, "must not contain"),
        ),
        (
            "id with =",
            spec_edit("- id: ll", "- id: l=l"),
            loc(s, "must not contain"),
        ),
        (
            "labels differing in case",
            spec_edit("{0: negative, 1: positive}", "{0: Good, 1: good}"),
            loc(s, "differ only in case"),
        ),
        (
            "one label",
            spec_edit("{0: negative, 1: positive}", "{0: negative}"),
            loc(s, "two labels"),
        ),
        (
            "sample of zero",
            spec_edit("n: 12", "n: 0"),
            loc(s, "at least 1"),
        ),
        (
            "unknown compare cell",
            spec_edit("name: t\n", "name: t\ncompare: {baseline: nope/p1/ll}\n"),
            loc(s, "no cell"),
        ),
        (
            "bad hub reference",
            spec_edit("gguf: models/a.gguf", "gguf: hf:only-owner"),
            loc(s, "hf:OWNER/REPO/FILE"),
        ),
        (
            "sha256 not hex",
            spec_edit("    n_ctx: 512\n", "    n_ctx: 512\n    sha256: xyz\n"),
            loc(s, "hexadecimal"),
        ),
        (
            "empty stop string",
            spec_edit(
                "    max_tokens: 4\n",
                "    max_tokens: 4\n    stop: [\"\"]\n",
            ),
            loc(s, "stop"),
        ),
        (
            "loglik with max_tokens",
            spec_edit(
                "    kind: loglik\n",
                "    kind: loglik\n    max_tokens: 3\n",
            ),
            loc(s, "applies to `kind: generate` only"),
        ),
        (
            "spec name with a space",
            spec_edit("name: t\n", "name: my study\n"),
            loc(s, "name"),
        ),
        // Templates.
        (
            "undefined variable",
            write("prompts/p1.j2", "Review: {{ review }}\n"),
            loc("p1.j2", "review"),
        ),
        (
            "template syntax error",
            write("prompts/p1.j2", "Review: {{ text \n"),
            loc("p1.j2", "template error"),
        ),
        (
            "unclosed block",
            write("prompts/p1.j2", "{% for x in labels %}{{ x }}\n"),
            loc("p1.j2", "template error"),
        ),
        (
            "unknown filter",
            write("prompts/p1.j2", "{{ text | shout }}\n"),
            loc("p1.j2", "shout"),
        ),
        (
            "examples without shots",
            write("prompts/p1.j2", "{{ examples }} {{ text }}\n"),
            loc("p1.j2", "shots"),
        ),
        (
            "template file missing",
            spec_edit("prompts/p1.j2", "prompts/none.j2"),
            loc(s, "none.j2"),
        ),
        // Datasets in three formats.
        (
            "jsonl invalid line",
            write(
                "data/reviews.jsonl",
                "{\"id\": 1, \"text\": \"a\", \"label\": 0}\n{\"id\": 2,\n",
            ),
            loc(s, "reviews.jsonl:2: invalid JSON"),
        ),
        (
            "jsonl not objects",
            write("data/reviews.jsonl", "[1, 2]\n"),
            loc(s, "expected a JSON object"),
        ),
        (
            "jsonl missing label column",
            write("data/reviews.jsonl", "{\"id\": 1, \"text\": \"a\"}\n"),
            loc(s, "`label` not found"),
        ),
        (
            "label value without a name",
            write(
                "data/reviews.jsonl",
                "{\"id\": 1, \"text\": \"a\", \"label\": 7}\n",
            ),
            loc(s, "label value `7`"),
        ),
        (
            "jsonl empty",
            write("data/reviews.jsonl", ""),
            loc(s, "holds no rows"),
        ),
        (
            "csv missing column",
            dataset("d.csv", b"id,body,label\n1,a,0\n"),
            loc(s, "`text` not found"),
        ),
        (
            "csv ragged row",
            dataset("d.csv", b"id,text,label\n1,a,0\n2,b\n"),
            loc(s, "d.csv"),
        ),
        ("csv empty", dataset("d.csv", b""), loc(s, "d.csv")),
        (
            "csv header only",
            dataset("d.csv", b"id,text,label\n"),
            loc(s, "holds no rows"),
        ),
        (
            "parquet garbage",
            dataset("d.parquet", b"PAR1 this is not parquet at all PAR1"),
            loc(s, "d.parquet"),
        ),
        (
            "parquet truncated",
            Box::new(|p: &Project| {
                let bytes = std::fs::read(
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("experiments/data/imdb/test.parquet"),
                )
                .unwrap();
                std::fs::write(p.path("data/d.parquet"), &bytes[..bytes.len() / 3]).unwrap();
                p.write(
                    "spec.yaml",
                    &common::SPEC.replace("data/reviews.jsonl", "data/d.parquet"),
                );
            }),
            loc(s, "d.parquet"),
        ),
        (
            "unknown table format",
            dataset("d.txt", b"id text label"),
            loc(s, "unknown table format"),
        ),
        (
            "dataset missing",
            spec_edit("data/reviews.jsonl", "data/none.jsonl"),
            loc(s, "none.jsonl"),
        ),
        (
            "shots pool missing",
            spec_edit(
                "  - id: p2\n",
                "  - id: p2\n    shots: {k: 2, from: data/none.jsonl}\n",
            ),
            loc(s, "none.jsonl"),
        ),
        (
            "more shots than rows",
            spec_edit(
                "  - id: p2\n",
                "  - id: p2\n    shots: {k: 500, from: data/reviews.jsonl}\n",
            ),
            loc(s, "asked for 500 examples"),
        ),
        // Model files.
        (
            "model not gguf",
            write("models/a.gguf", "<html>404</html>"),
            loc(s, "not a GGUF file"),
        ),
        ("model empty", write("models/a.gguf", ""), loc(s, "GGUF")),
        (
            "model missing",
            spec_edit("models/a.gguf", "models/none.gguf"),
            loc(s, "not found"),
        ),
        (
            "model wrong sha256",
            spec_edit(
                "    n_ctx: 512\n",
                "    n_ctx: 512\n    sha256: 0000000000000000000000000000000000000000000000000000000000000000\n",
            ),
            loc(s, "wrong sha256"),
        ),
        (
            "model is a folder",
            Box::new(|p: &Project| {
                std::fs::create_dir_all(p.path("models/dir.gguf")).unwrap();
                p.write(
                    "spec.yaml",
                    &common::SPEC.replace("models/a.gguf", "models/dir.gguf"),
                );
            }),
            loc(s, "is a folder"),
        ),
        // Cache segments: reported, quarantined, recomputed; the run succeeds.
        (
            "segment truncated",
            segment(|seg| {
                let b = std::fs::read(seg).unwrap();
                std::fs::write(seg, &b[..b.len() / 2]).unwrap();
            }),
            Expect::Counted("corrupt cache segment"),
        ),
        (
            "segment random bytes",
            segment(|seg| {
                let mut rng = SplitMix64::for_stream(7, "segment");
                let b: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
                std::fs::write(seg, b).unwrap();
            }),
            Expect::Counted("corrupt cache segment"),
        ),
        (
            "segment empty",
            segment(|seg| std::fs::write(seg, b"").unwrap()),
            Expect::Counted("corrupt cache segment"),
        ),
        (
            "segment bytes flipped",
            segment(|seg| {
                let mut b = std::fs::read(seg).unwrap();
                let n = b.len();
                for x in &mut b[n / 3..n / 3 + 200] {
                    *x = !*x;
                }
                std::fs::write(seg, b).unwrap();
            }),
            Expect::Counted("corrupt cache segment"),
        ),
        // Hostile or careless specs and rows (docs/book/threats.md).
        (
            "spec name climbs out of reports/",
            spec_edit("name: t\n", "name: \"..\"\n"),
            loc(s, "name"),
        ),
        (
            "hub file climbs out of the hub cache",
            spec_edit("gguf: models/a.gguf", "gguf: hf:a/b/../../../../etc/passwd"),
            loc(s, "models[0].gguf"),
        ),
        (
            "absolute hub file",
            spec_edit("gguf: models/a.gguf", "gguf: hf:a/b//etc/passwd"),
            loc(s, "models[0].gguf"),
        ),
        (
            "a million repeats",
            spec_edit("  seed: 3\n", "  seed: 3\n  repeats: 1000000\n"),
            loc(s, "sampling.repeats"),
        ),
        (
            "a sampling grid of 40,000 points",
            Box::new(|p: &Project| p.write("spec.yaml", &wide_grid(common::SPEC, 200, 200))),
            file_only(s, "more than"),
        ),
        (
            "a grid of half a billion rows",
            Box::new(|p: &Project| {
                let imdb = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("experiments/data/imdb/test.parquet");
                // 19,802 cells (under the cell limit) over all 25,000 IMDB test rows.
                let spec = common::SPEC
                    .replace("data/reviews.jsonl", &imdb.display().to_string())
                    .replace("  sample: {n: 12, stratify: true, seed: 5}\n", "");
                p.write("spec.yaml", &wide_grid(&spec, 100, 99));
            }),
            loc(s, "more than this tool plans"),
        ),
        (
            "template never uses the text",
            write("prompts/p1.j2", "Answer {{ labels | join(' or ') }}.\n"),
            file_only("prompts/p1.j2", "never uses `{{ text }}`"),
        ),
        (
            "empty key in clean.replace",
            spec_edit(
                "  sample: {n: 12",
                "  clean: {replace: {\"\": \"x\"}}\n  sample: {n: 12",
            ),
            loc(s, "dataset.clean.replace"),
        ),
        (
            "duplicate row ids",
            write(
                "data/reviews.jsonl",
                "{\"id\": \"a\", \"text\": \"good\", \"label\": 1}\n{\"id\": \"a\", \"text\": \"bad\", \"label\": 0}\n",
            ),
            loc(s, "same id `a`"),
        ),
        (
            "row id with a newline",
            write(
                "data/reviews.jsonl",
                "{\"id\": \"a\\nb\", \"text\": \"good\", \"label\": 1}\n{\"id\": \"c\", \"text\": \"bad\", \"label\": 0}\n",
            ),
            loc(s, "control character"),
        ),
        (
            "null texts",
            write_bytes("data/reviews.jsonl", {
                let mut s = String::new();
                for i in 0..12 {
                    let t = if i % 5 == 0 {
                        serde_json::Value::Null
                    } else {
                        serde_json::json!(format!("Review {i} fine"))
                    };
                    s.push_str(
                        &serde_json::json!({"id": i, "text": t, "label": i % 2}).to_string(),
                    );
                    s.push('\n');
                }
                s.into_bytes()
            }),
            Expect::Counted("3 rows have no text (null) and are left out"),
        ),
        (
            "sample larger than the dataset",
            spec_edit("sample: {n: 12,", "sample: {n: 500,"),
            Expect::Counted("all 30 are used"),
        ),
        (
            "segment of another table",
            segment(|seg| {
                let data = std::fs::read(
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("experiments/data/imdb/test.parquet"),
                )
                .unwrap();
                std::fs::write(seg, data).unwrap();
            }),
            Expect::Counted("corrupt cache segment"),
        ),
        (
            "stale temporary file",
            Box::new(|p: &Project| {
                p.run();
                std::fs::write(p.path("cache/v2/rows/.tmp-1-seg-x.parquet"), b"half").unwrap();
            }),
            Expect::Counted("72 rows from cache"),
        ),
        (
            "bad rows in the data",
            write_bytes("data/reviews.jsonl", {
                let mut s = String::new();
                for i in 0..12 {
                    let t = if i == 4 {
                        "FAKE-DECODE-ERROR".to_string()
                    } else {
                        format!("Review {i} fine")
                    };
                    s.push_str(
                        &serde_json::json!({"id": i, "text": t, "label": i % 2}).to_string(),
                    );
                    s.push('\n');
                }
                s.into_bytes()
            }),
            Expect::Counted("rows failed (6 decode)"),
        ),
    ]
}

#[test]
fn malformed_inputs_are_located_errors_or_counted_rows_never_panics() {
    let cases = catalogue();
    let mut located = 0;
    let mut counted = 0;
    for (name, setup, expect) in &cases {
        let p = Project::new();
        setup(&p);
        let out = p
            .cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        if std::env::var_os("PIPELINE_SHOW_CASES").is_some() {
            println!("{name}: {}", stderr.lines().next().unwrap_or(""));
        }
        match expect {
            Expect::Located { file, line, what } => {
                assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
                let first = stderr.lines().next().unwrap_or("");
                let at = first
                    .strip_prefix("error: ")
                    .and_then(|r| r.split(": ").next())
                    .unwrap_or("");
                assert!(at.contains(file), "{name}: no `{file}` in {first:?}");
                if *line {
                    let parts: Vec<&str> = at.rsplitn(3, ':').collect();
                    assert!(
                        parts.len() >= 2
                            && parts
                                .iter()
                                .take(2)
                                .any(|x| x.parse::<u64>().is_ok_and(|n| n > 0)),
                        "{name}: no line in {first:?}"
                    );
                }
                assert!(stderr.contains(what), "{name}: `{what}` not in {stderr}");
                located += 1;
            }
            Expect::Counted(what) => {
                assert_eq!(out.status.code(), Some(0), "{name}: {stderr}");
                assert!(
                    stderr.contains(what) || stdout.contains(what),
                    "{name}: `{what}` not in\n{stderr}\n{stdout}"
                );
                counted += 1;
            }
        }
    }
    assert!(cases.len() >= 40, "{} cases", cases.len());
    println!(
        "malformed inputs: {} cases, {located} located errors (exit 2, file:line), {counted} counted and reported (exit 0), 0 panics",
        cases.len()
    );
}
