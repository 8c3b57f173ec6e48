//! The threat model of the README, case by case, with the deterministic fake backend: what a
//! hostile or careless spec, dataset row, HTTP client or cache folder can and cannot do.
//! Each test names the case it shows; every one of them failed before it was handled.

mod common;

use std::path::Path;
use std::process::Output;

use common::Project;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run a command that must fail with an input error (exit 2); its stderr.
fn input_error(p: &Project, args: &[&str]) -> String {
    let out = p.cmd(args).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    stderr(&out)
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn a_spec_named_dot_dot_is_a_located_error_and_writes_nothing_outside_reports() {
    let p = Project::new();
    for name in ["..", ".", ".hidden", "a/b"] {
        let spec = common::SPEC.replace("name: t\n", &format!("name: \"{name}\"\n"));
        p.write("spec.yaml", &spec);
        let before = files_under(p.dir.path());
        for cmd in ["plan", "run", "report"] {
            let e = input_error(&p, &[cmd, "spec.yaml", "--backend", "fake"]);
            assert!(
                e.contains("spec.yaml:2:") && e.contains("name"),
                "{name}: {e}"
            );
        }
        assert_eq!(files_under(p.dir.path()), before, "{name}");
    }
}

#[test]
fn a_hub_file_that_climbs_out_is_a_located_error_at_plan() {
    let p = Project::new();
    let victim = p.path("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    for gguf in [
        "hf:a/b/../../../../victim.txt",
        "hf:a/b//etc/passwd",
        "hf:../b/m.gguf",
        "hf:a/../m.gguf",
        "hf:a/b/sub/./m.gguf",
        "hf:a/b/m.gguf/",
    ] {
        let spec = common::SPEC.replace("gguf: models/a.gguf", &format!("gguf: \"{gguf}\""));
        p.write("spec.yaml", &spec);
        for cmd in ["plan", "run"] {
            let out = p
                .cmd(&[cmd, "spec.yaml", "--backend", "fake"])
                .env("HF_HUB_CACHE", p.path("hf"))
                .env("HF_ENDPOINT", "http://127.0.0.1:9")
                .output()
                .unwrap();
            let e = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{gguf}: {e}");
            let line = spec.lines().position(|l| l.contains("gguf:")).unwrap() + 1;
            assert!(
                e.contains(&format!("spec.yaml:{line}:")) && e.contains("models[0].gguf"),
                "{gguf}: {e}"
            );
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        assert!(!p.path("hf").exists(), "{gguf}: the hub cache was touched");
    }
}

/// A spec whose only prompt is `p1`, on `--limit 1` row: one prompt evaluation a model.
fn one_prompt_spec(extra_sampling: &str) -> String {
    common::SPEC
        .replace(
            "  - id: p2\n    system: \"You judge reviews.\"\n    user: {file: prompts/p2.j2}\n",
            "",
        )
        .replace("  seed: 3\n", extra_sampling)
}

#[test]
fn a_closed_stdout_is_a_quiet_exit_not_a_panic() {
    let p = Project::new();
    p.run();
    for args in [
        &["cache", "status"][..],
        &["plan", "spec.yaml", "--backend", "fake"],
        &["run", "spec.yaml", "--backend", "fake", "--quiet"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // every write to stdout now fails with EPIPE
        let out = p.cmd(args).stdout(writer).output().unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

#[test]
fn sigterm_commits_finished_rows_writes_the_report_and_exits_143() {
    let p = Project::new();
    let mut child = p
        .cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"])
        .env("PIPELINE_FAKE_DELAY_MS", "150")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The event: the first commit (after 32 rows or 3 s).
    common::wait_for_commit(&p);
    assert!(child.try_wait().unwrap().is_none(), "the run ended early");
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("SIGTERM: stopping"), "{err}");
    // The report of what finished, marked as interrupted.
    let run = p.run_json();
    assert_eq!(run["interrupted"], true, "{run}");
    let computed = run["computed_rows"].as_u64().unwrap();
    assert!(computed > 0 && computed < 72, "{run}");
    assert!(p.path("reports/t/index.html").is_file());
    // Every row the report counts is in the cache: the next run computes only the rest.
    let again = p.run();
    assert_eq!(again["cached_rows"].as_u64().unwrap(), computed, "{again}");
    assert_eq!(again["computed_rows"].as_u64().unwrap(), 72 - computed);
}

#[test]
fn a_prompt_with_hundreds_of_sampled_cells_is_committed_as_it_goes() {
    let p = Project::new();
    let seeds: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    p.write(
        "spec.yaml",
        &one_prompt_spec(&format!("  seed: [{}]\n", seeds.join(", "))),
    );
    // 400 sampled cells and one log-likelihood cell on a single prompt evaluation.
    let mut child = p
        .cmd(&[
            "run",
            "spec.yaml",
            "--backend",
            "fake",
            "--quiet",
            "--limit",
            "1",
        ])
        .env("PIPELINE_FAKE_DELAY_MS", "20")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_commit(&p);
    child.kill().unwrap(); // SIGKILL: what was committed is all that is kept
    child.wait().unwrap();
    let kept = pipeline::cache::Cache::open_read_only(&p.path("cache"))
        .unwrap()
        .len();
    assert!(
        kept > 0 && kept < 401,
        "{kept} rows committed: the prompt's rows came in one piece"
    );
}

/// Templates of some 80 words, so that a context of 64 (the smallest allowed) holds no row.
fn long_templates(p: &Project) {
    let preamble = "Read the review below with care and decide. ".repeat(10);
    p.write(
        "prompts/p1.j2",
        &format!("{preamble}Review: {{{{ text }}}}\nAnswer {{{{ labels | join(' or ') }}}}.\n"),
    );
    p.write(
        "prompts/p2.j2",
        &format!("{preamble}Text: {{{{ text }}}}\nIs it {{{{ labels | join(' or ') }}}}?\n"),
    );
}

#[test]
fn a_cell_with_no_rows_has_null_metrics_not_zero() {
    let p = Project::new();
    long_templates(&p);
    // Every prompt overflows a context of 64 tokens: no cell answers a row.
    p.write(
        "spec.yaml",
        &common::SPEC.replace("n_ctx: 512", "n_ctx: 64"),
    );
    p.run_ok(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
    use arrow::array::Array;
    let batches = common::parquet_batches(&p.path("reports/t/metrics.parquet"));
    let mut cells = 0;
    for b in &batches {
        let n = b.column_by_name("n").unwrap();
        let acc = b.column_by_name("accuracy").unwrap();
        let f1 = b.column_by_name("macro_f1").unwrap();
        assert_eq!(n.null_count(), 0);
        assert_eq!(acc.null_count(), b.num_rows(), "accuracy of a 0-row cell");
        assert_eq!(f1.null_count(), b.num_rows());
        cells += b.num_rows();
    }
    assert_eq!(cells, 6);
}

#[test]
fn rows_computed_with_a_larger_context_are_not_reported_for_a_smaller_one() {
    let p = Project::new();
    long_templates(&p);
    p.run();
    // The same rows, keys unchanged, under a context their prompts do not fit.
    p.write(
        "spec.yaml",
        &common::SPEC.replace("n_ctx: 512", "n_ctx: 64"),
    );
    let plan = p.plan();
    for c in plan["cells"].as_array().unwrap() {
        assert_eq!(c["cached"], 0, "{c}");
        assert_eq!(c["too_long"], c["rows"], "{c}");
        assert_eq!(c["to_run"], 0, "{c}");
    }
    p.run_ok(&["report", "spec.yaml", "--backend", "fake"]);
    use arrow::array::Array;
    for b in common::parquet_batches(&p.path("reports/t/metrics.parquet")) {
        let n = b.column_by_name("n").unwrap();
        let n = n
            .as_any()
            .downcast_ref::<arrow::array::UInt64Array>()
            .unwrap();
        assert!(n.iter().all(|x| x == Some(0)), "{n:?}");
    }
    let failures = common::parquet_batches(&p.path("reports/t/failures.parquet"));
    let kinds: usize = failures.iter().map(|b| b.num_rows()).sum();
    assert_eq!(kinds, 72);
    // Back to the context they were computed with: every row is valid again.
    p.write("spec.yaml", common::SPEC);
    assert!(common::misses(&p.plan()).is_empty());
}

#[test]
fn a_forged_model_digest_memo_is_not_believed() {
    let p = Project::new();
    pipeline::model::write_fake_gguf(&p.path("models/b.gguf"), b"fake model b").unwrap();
    let spec_b = common::SPEC
        .replace("gguf: models/a.gguf", "gguf: models/b.gguf")
        .replace("name: t\n", "name: b\n");
    p.write("b.yaml", &spec_b);
    p.run_ok(&[
        "run",
        "b.yaml",
        "--backend",
        "fake",
        "--quiet",
        "--limit",
        "1",
    ]);
    p.run();
    let before = common::misses(&p.plan_of("b.yaml"));
    assert!(!before.is_empty());
    // Edit b's memo entry to claim a's sha256, as if written long after b settled.
    let sha_a = pipeline::model::sha256_file(&p.path("models/a.gguf")).unwrap();
    let digests = p.path("cache/v2/digests");
    let mut forged = 0;
    for e in std::fs::read_dir(&digests).unwrap().flatten() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        if v["stamp"]["path"].as_str().unwrap().ends_with("b.gguf") {
            v["sha256"] = sha_a.clone().into();
            v["written_ns"] = (v["written_ns"].as_i64().unwrap() + 3_600_000_000_000).into();
            std::fs::write(e.path(), v.to_string()).unwrap();
            forged += 1;
        }
    }
    assert_eq!(forged, 1);
    // b's rows are still b's: nothing of a's is planned as b's.
    assert_eq!(common::misses(&p.plan_of("b.yaml")), before);
    // And `cache verify` says so (after the plan, which never writes the memo).
    let out = p.cmd(&["cache", "verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("failed its checksum"),
        "{}",
        stderr(&out)
    );
}
