//! Acceptance for the row cache, with the deterministic fake backend: what reruns after an
//! edit, what does not, resuming after SIGKILL, and corrupt cache files.

mod common;

use std::time::Duration;

use common::{Project, misses, predictions};

#[test]
fn rerun_computes_nothing() {
    let p = Project::new();
    let first = p.run();
    // 2 models? no: 1 model × 2 prompts × (2 temperatures + loglik) = 6 cells × 12 rows.
    assert_eq!(first["computed_rows"], 72);
    assert_eq!(first["cached_rows"], 0);
    // One prompt evaluation per (prompt, row) serves all three cells that share it.
    assert_eq!(first["prompts_evaluated"], 24);
    let second = p.run();
    assert_eq!(second["computed_rows"], 0);
    assert_eq!(second["cached_rows"], 72);
    assert_eq!(second["prompts_evaluated"], 0);
    for f in ["index.html", "predictions.parquet", "metrics.parquet"] {
        assert!(p.path("reports/t").join(f).is_file(), "{f}");
    }
}

#[test]
fn editing_one_template_reruns_only_that_prompts_cells() {
    let p = Project::new();
    p.run();
    let before = predictions(&p.path("reports/t/predictions.parquet"));
    p.write(
        "prompts/p2.j2",
        "Text: {{ text }}\nIs it {{ labels | join(' or ') }}?!\n",
    );
    let m = misses(&p.plan());
    assert_eq!(m.len(), 3, "{m:?}");
    assert!(
        m.iter()
            .all(|(id, n)| id.starts_with("fake-a/p2/") && *n == 12),
        "{m:?}"
    );
    // --explain names the component that changed.
    let out = p.run_ok(&[
        "plan",
        "spec.yaml",
        "--backend",
        "fake",
        "--explain",
        "fake-a/p2/ll",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("12 rows to run: prompt differs"), "{text}");
    let run = p.run();
    assert_eq!(run["computed_rows"], 36);
    assert_eq!(run["cached_rows"], 36);
    assert_eq!(run["prompts_evaluated"], 12);
    let after = predictions(&p.path("reports/t/predictions.parquet"));
    let unchanged = |v: &Vec<String>| {
        v.iter()
            .filter(|l| l.contains("/p1/"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(unchanged(&before), unchanged(&after));
}

#[test]
fn reordering_keys_and_comments_change_nothing() {
    let p = Project::new();
    p.run();
    let reordered = r#"# the same spec, written differently
methods:
  - kind: loglik      # scored, not generated
    id: ll
  - max_tokens: 4
    kind: generate
    id: gen
sampling: {seed: [3], temperature: [0.2, 0.8]}
name: t
prompts:
  - user: {file: prompts/p1.j2}
    id: p1
  - user: {file: prompts/p2.j2}
    system: "You judge reviews."
    id: p2
models:
  - n_ctx: 512
    gguf: models/a.gguf
    id: fake-a
dataset:
  labels: {0: negative, 1: positive}
  sample: {seed: 5, n: 12, stratify: true}
  label: label
  text: text
  id: id
  path: data/reviews.jsonl
"#;
    p.write("spec.yaml", reordered);
    assert_eq!(misses(&p.plan()), vec![]);
}

#[test]
fn changing_a_temperature_misses_only_its_cells() {
    let p = Project::new();
    p.run();
    p.write(
        "spec.yaml",
        &common::SPEC.replace("temperature: [0.2, 0.8]", "temperature: [0.2, 0.7]"),
    );
    let m = misses(&p.plan());
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(
        m.iter().all(|(id, n)| id.ends_with("@t=0.7") && *n == 12),
        "{m:?}"
    );
    let out = p.run_ok(&[
        "plan",
        "spec.yaml",
        "--backend",
        "fake",
        "--explain",
        "fake-a/p1/gen@t=0.7",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("sampler differs"));
    let run = p.run();
    assert_eq!(run["computed_rows"], 24);
}

#[test]
fn changing_the_model_file_misses_everything() {
    let p = Project::new();
    p.run();
    pipeline::model::write_fake_gguf(&p.path("models/a.gguf"), b"fake model a, retrained").unwrap();
    let m = misses(&p.plan());
    assert_eq!(m.len(), 6);
    let out = p.run_ok(&[
        "plan",
        "spec.yaml",
        "--backend",
        "fake",
        "--explain",
        "fake-a/p1/ll",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("model differs"));
}

#[test]
fn sigkill_mid_run_then_resume_matches_an_uninterrupted_run() {
    // Reference: an uninterrupted run in another folder.
    let reference = Project::new();
    reference.run();
    let want = predictions(&reference.path("reports/t/predictions.parquet"));

    let p = Project::new();
    let mut child = p
        .cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
        .env("PIPELINE_FAKE_DELAY_MS", "150")
        .spawn()
        .unwrap();
    // Wait until at least one batch is committed, then kill without warning.
    common::wait_for_commit(&p);
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !p.path("reports/t/run.json").exists(),
        "the run was killed before the end"
    );

    let plan = p.plan();
    let done: u64 = plan["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cached"].as_u64().unwrap())
        .sum();
    assert!(done > 0 && done < 72, "{done} rows survived the kill");
    let run = p.run();
    assert_eq!(run["cached_rows"].as_u64().unwrap(), done);
    assert_eq!(
        run["computed_rows"].as_u64().unwrap(),
        72 - done,
        "finished rows are not recomputed"
    );
    assert_eq!(predictions(&p.path("reports/t/predictions.parquet")), want);
}

#[test]
fn corrupt_cache_file_is_reported_and_recomputed() {
    let p = Project::new();
    p.run();
    let want = predictions(&p.path("reports/t/predictions.parquet"));
    // The largest segment: the middle of its bytes is row data (in a segment of a few
    // rows it may be the footer, and then the whole segment is unreadable, another case).
    let seg = std::fs::read_dir(p.path("cache/v2/rows"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&seg, bytes).unwrap();
    let out = p.run_ok(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("corrupt"), "{stderr}");
    // Always reported (the segment's name carries a digest of its bytes, so damage to
    // bytes no value is read from shows too); exactly the rows that fail their checksum
    // are computed again, the others are kept.
    let bad: u64 = stderr
        .split(" of ")
        .next()
        .and_then(|s| s.rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of damaged rows in {stderr}"));
    let run = p.run_json();
    assert_eq!(run["computed_rows"].as_u64().unwrap(), bad, "{stderr}");
    assert_eq!(predictions(&p.path("reports/t/predictions.parquet")), want);
    assert!(
        std::fs::read_dir(p.path("cache/v2/quarantine"))
            .unwrap()
            .count()
            >= 1
    );
}

#[test]
fn limit_runs_a_prefix_whose_rows_count_later() {
    let p = Project::new();
    p.run_ok(&[
        "run",
        "spec.yaml",
        "--backend",
        "fake",
        "--quiet",
        "--limit",
        "4",
    ]);
    assert_eq!(p.run_json()["computed_rows"], 24);
    let run = p.run();
    assert_eq!(run["cached_rows"], 24);
    assert_eq!(run["computed_rows"], 48);
}

/// `plan` and `report` over a cache of several segments, one of them damaged: the damaged
/// one is reported and left in place (they open the cache read-only); what the other
/// segments hold is read unchanged, by key lookups and projection.
#[test]
fn plan_and_report_read_the_sound_segments_when_one_is_damaged() {
    let p = Project::new();
    // Two runs, two segments at least: the first rows of each cell, then the rest.
    p.run_ok(&[
        "run",
        "spec.yaml",
        "--backend",
        "fake",
        "--quiet",
        "--limit",
        "4",
    ]);
    let first = common::segments(&p);
    p.run();
    let want = predictions(&p.path("reports/t/predictions.parquet"));
    let all = common::segments(&p);
    assert!(all.len() >= 2, "{all:?}");
    // Damage the first run's segment (24 of the 72 rows).
    let seg = &first[0];
    let mut bytes = std::fs::read(seg).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(seg, bytes).unwrap();
    let out = p.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not trusted"), "{stderr}");
    assert!(seg.exists(), "a read-only open moves nothing");
    let got = predictions(&p.path("reports/t/predictions.parquet"));
    // Rows whose checksum still verifies are kept (the damage may touch no value at all).
    assert!(got.len() >= want.len() - 24, "{}", got.len());
    for line in &got {
        assert!(want.contains(line), "{line} was not in the sound report");
    }
    let plan = p.plan();
    let cached: u64 = plan["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cached"].as_u64().unwrap())
        .sum();
    assert_eq!(cached as usize, got.len());
    // A run quarantines it and computes exactly what it lost.
    let run = p.run();
    assert_eq!(
        run["computed_rows"].as_u64().unwrap() as usize,
        want.len() - got.len()
    );
    assert_eq!(predictions(&p.path("reports/t/predictions.parquet")), want);
}

/// The same acceptance in-process, counting what the fake backend itself was asked to do.
#[test]
fn backend_calls_after_a_template_edit_are_exactly_the_changed_rows() {
    use std::sync::atomic::Ordering;

    let p = Project::new();
    let run_once = || -> (usize, usize, usize) {
        let calls = common::fake_run(&p);
        (
            calls.prompts.load(Ordering::SeqCst),
            calls.tasks.load(Ordering::SeqCst),
            calls.models_loaded.load(Ordering::SeqCst),
        )
    };
    assert_eq!(run_once(), (24, 72, 1));
    assert_eq!(
        run_once(),
        (0, 0, 0),
        "nothing to do: the model is not even loaded"
    );
    p.write(
        "prompts/p1.j2",
        "Review: {{ text }}\nAnswer {{ labels | join(' or ') }}!\n",
    );
    assert_eq!(run_once(), (12, 36, 1));
}

#[test]
fn ctrl_c_stops_cleanly_and_keeps_finished_rows() {
    let p = Project::new();
    let child = p
        .cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
        .env("PIPELINE_FAKE_DELAY_MS", "100")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The handler is installed before any row runs: once a segment is committed, a signal
    // reaches it (a fixed sleep could signal before it exists).
    common::wait_for_commit(&p);
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopped = p.run_json();
    assert_eq!(stopped["interrupted"], true);
    let done = stopped["computed_rows"].as_u64().unwrap();
    assert!(done > 0 && done < 72, "{done}");
    // The partial report exists and the next run continues where this one stopped.
    assert!(p.path("reports/t/index.html").is_file());
    let rest = p.run();
    assert_eq!(rest["cached_rows"].as_u64().unwrap(), done);
    assert_eq!(rest["computed_rows"].as_u64().unwrap(), 72 - done);
}

#[test]
fn two_concurrent_runs_share_one_cache_safely() {
    let p = Project::new();
    let spawn = || {
        p.cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
            .env("PIPELINE_FAKE_DELAY_MS", "10")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn(), spawn());
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let out = p.run_ok(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("corrupt"));
    let run = p.run_json();
    assert_eq!(run["computed_rows"], 0);
    assert_eq!(run["cached_rows"], 72);
}

#[test]
fn progress_is_plain_lines_when_stderr_is_not_a_terminal() {
    let p = Project::new();
    let out = p
        .cmd(&[
            "run",
            "spec.yaml",
            "--backend",
            "fake",
            "--progress-interval",
            "0.05",
        ])
        .env("PIPELINE_FAKE_DELAY_MS", "20")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("run: 72 rows to compute in 6 cells"),
        "{stderr}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("progress: "))
        .collect();
    assert!(lines.len() >= 3, "{stderr}");
    for l in &lines {
        assert!(l.contains(" rows (") && l.contains("rows/s, eta "), "{l}");
    }
    assert!(
        lines.iter().any(|l| l.contains("; cell fake-a/")),
        "{stderr}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("progress: 72/72 rows (100%)")
    );
    // No terminal control sequences in a log.
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    // --quiet prints none.
    let quiet = p
        .cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("progress:"));
}

/// Ctrl-C in-process: the library entry point stops after the current part of a prompt's
/// tasks when its cancel flag is set, keeps every finished row and still writes the report.
#[test]
fn cancelling_app_run_keeps_finished_rows_and_writes_the_report() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use pipeline::app::{RunOptions, run_with_backend};
    use pipeline::backend::Backend;
    use pipeline::backend::fake::{FakeBackend, FakeCalls};
    use pipeline::config::Config;

    let p = Project::new();
    let cfg = Config {
        backend: pipeline::backend::BackendKind::Fake,
        ..Config::new(p.path("cache"), p.path("reports"))
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(FakeCalls::default());
    let (c, stop) = (calls.clone(), cancel.clone());
    // Cancel from another thread once a few prompts are done, as the Ctrl-C handler does.
    let watcher = std::thread::spawn(move || {
        while c.prompts.load(Ordering::SeqCst) < 5 {
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::SeqCst);
    });
    let make = {
        let calls = calls.clone();
        Arc::new(move || {
            let mut b = FakeBackend::new(calls.clone());
            b.delay = Duration::from_millis(10);
            Box::new(b) as Box<dyn Backend>
        })
    };
    let outcome = run_with_backend(
        &cfg,
        &p.path("spec.yaml"),
        &RunOptions::default(),
        cancel,
        make,
    )
    .unwrap();
    watcher.join().unwrap();
    assert!(outcome.error.is_none());
    assert!(outcome.stats.interrupted);
    let done = outcome.stats.computed_rows;
    // Four prompts done (3 rows each) and at least the first part of the fifth.
    assert!((13..72).contains(&done), "{done}");
    assert!(outcome.written.is_some() && p.path("reports/t/index.html").is_file());
    let rest = p.run();
    assert_eq!(rest["cached_rows"].as_u64().unwrap() as usize, done);
}
