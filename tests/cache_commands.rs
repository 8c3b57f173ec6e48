//! A cache users can see and prune: `cache status`, `cache gc`, `cache verify`; and the
//! commands that only read (`plan`, `report`, `export`, `cache status`) never write to it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::Project;

/// Every file under `dir` with its size and modification time.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.insert(
                e.path().display().to_string(),
                (m.len(), m.modified().unwrap()),
            );
        }
    }
    out
}

/// Every file under `dir`, relative to it.
fn walk(dir: &Path) -> Vec<String> {
    snapshot(dir)
        .keys()
        .map(|k| {
            Path::new(k)
                .strip_prefix(dir)
                .unwrap()
                .display()
                .to_string()
        })
        .filter(|k| !dir.join(k).is_dir())
        .collect()
}

fn status_json(p: &Project, specs: &[&str]) -> serde_json::Value {
    let mut args = vec!["cache", "status", "--json", "--backend", "fake"];
    args.extend_from_slice(specs);
    serde_json::from_slice(&p.run_ok(&args).stdout).unwrap()
}

#[test]
fn reading_commands_never_write_to_the_cache() {
    let p = Project::new();
    // A missing cache stays missing.
    p.run_ok(&["plan", "spec.yaml", "--backend", "fake"]);
    p.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
    assert!(
        !p.path("cache").exists(),
        "plan and report created the cache"
    );
    p.run();
    // Damage one segment: reading commands report it but leave it where it is.
    let seg = common::segments(&p)[0].clone();
    // (Cut in half: flipped bytes may land in page statistics no reader checks.)
    let bytes = std::fs::read(&seg).unwrap();
    std::fs::write(&seg, &bytes[..bytes.len() / 2]).unwrap();
    // A stale temporary file of a killed writer is not removed either.
    let tmp = p.path("cache/v2/rows/.tmp-1-seg.parquet");
    std::fs::write(&tmp, b"partial").unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let before = snapshot(&p.path("cache"));
    for args in [
        vec!["plan", "spec.yaml", "--backend", "fake"],
        vec!["plan", "spec.yaml", "--backend", "fake", "--json"],
        vec![
            "plan",
            "spec.yaml",
            "--backend",
            "fake",
            "--explain",
            "fake-a/p1/ll",
        ],
        vec!["report", "spec.yaml", "--backend", "fake", "--quiet"],
        vec!["export", "spec.yaml", "--backend", "fake", "--out", "csv"],
        vec!["cache", "status", "spec.yaml", "--backend", "fake"],
    ] {
        let out = p.run_ok(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not trusted"), "{args:?}: {stderr}");
        assert_eq!(
            snapshot(&p.path("cache")),
            before,
            "{args:?} wrote to the cache"
        );
    }
    // `cache verify` is the command that repairs.
    let out = p.cmd(&["cache", "verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("moved to quarantine"));
    assert!(!seg.exists());
    let again = p.run_ok(&["cache", "verify"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("every row verifies"));
}

#[test]
fn status_counts_rows_per_spec_and_gc_keeps_only_what_specs_need() {
    let p = Project::new();
    p.run();
    // A second spec over other rows, and an edit that orphans one prompt's rows.
    let other = common::SPEC
        .replace("name: t\n", "name: u\n")
        .replace("seed: 5}", "seed: 6}");
    p.write("other.yaml", &other);
    p.run_ok(&["run", "other.yaml", "--backend", "fake", "--quiet"]);
    let all = status_json(&p, &["spec.yaml", "other.yaml"]);
    let rows = all["cache"]["rows"].as_u64().unwrap();
    assert!(rows > 72 && rows <= 144, "{all}");
    assert_eq!(all["specs"][0]["cached"], 72);
    assert_eq!(all["specs"][1]["cached"], 72);
    p.write(
        "prompts/p2.j2",
        "Text: {{ text }}\nIs it {{ labels | join(' or ') }}? Say it.\n",
    );
    let edited = status_json(&p, &["spec.yaml"]);
    assert_eq!(edited["specs"][0]["cached"], 36);
    // An older layout beside the current one.
    std::fs::create_dir_all(p.path("cache/v1/rows")).unwrap();
    std::fs::write(p.path("cache/v1/rows/seg-old.parquet"), b"old").unwrap();
    // Newer layouts (a later version wrote them) and folders gc does not know.
    for newer in ["v3", "v10", "v02", "notes"] {
        std::fs::create_dir_all(p.path(&format!("cache/{newer}/rows"))).unwrap();
        std::fs::write(p.path(&format!("cache/{newer}/rows/keep")), b"keep").unwrap();
    }
    let text = String::from_utf8_lossy(&p.run_ok(&["cache", "status"]).stdout).to_string();
    assert!(text.contains("older layout v1/"), "{text}");
    assert!(!text.contains("older layout v3/"), "{text}");
    assert!(
        text.contains("v10/") && text.contains("`cache gc` leaves it"),
        "{text}"
    );

    // Dry run: says what would go, changes nothing.
    let before = snapshot(&p.path("cache"));
    let out = p.run_ok(&[
        "cache",
        "gc",
        "--keep",
        "spec.yaml",
        "--dry-run",
        "--backend",
        "fake",
    ]);
    let dry = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        dry.starts_with(&format!("would remove {} rows", rows - 36)),
        "{dry}"
    );
    assert_eq!(snapshot(&p.path("cache")), before);

    p.run_ok(&["cache", "gc", "--keep", "spec.yaml", "--backend", "fake"]);
    let after = status_json(&p, &["spec.yaml", "other.yaml"]);
    assert_eq!(after["cache"]["rows"], 36, "{after}");
    assert_eq!(after["cache"]["segments"], 1);
    assert_eq!(after["specs"][0]["cached"], 36);
    assert!(!p.path("cache/v1").exists());
    for newer in ["v3", "v10", "v02", "notes"] {
        assert!(
            p.path(&format!("cache/{newer}/rows/keep")).is_file(),
            "gc removed {newer}/"
        );
    }
    // What was kept still serves the spec: only the edited prompt's rows run.
    let run = p.run();
    assert_eq!(run["cached_rows"], 36);
    assert_eq!(run["computed_rows"], 36);
}

#[test]
fn gc_refuses_a_spec_whose_model_digest_is_unknown() {
    let p = Project::new();
    p.run();
    let spec = common::SPEC.replace(
        "models:\n",
        "models:\n  - id: remote\n    gguf: hf:org/repo/model.gguf\n",
    );
    p.write("remote.yaml", &spec);
    let out = p
        .cmd(&["cache", "gc", "--keep", "remote.yaml", "--backend", "fake"])
        .env("HF_HUB_CACHE", p.path("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("model `remote`") && stderr.contains("no sha256"),
        "{stderr}"
    );
    assert_eq!(
        status_json(&p, &[])["cache"]["rows"],
        72,
        "nothing was removed"
    );
}

#[test]
fn a_segment_column_of_another_type_is_untrusted_not_a_panic() {
    use arrow::array::{ArrayRef, Int64Builder, ListBuilder, RecordBatch};
    let p = Project::new();
    p.run();
    // Rewrite a segment with `logprobs` as a list of integers instead of floats.
    let seg = common::segments(&p)[0].clone();
    let f = std::fs::File::open(&seg).unwrap();
    let batches: Vec<RecordBatch> =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let b = &batches[0];
    let mut lp = ListBuilder::new(Int64Builder::new());
    for _ in 0..b.num_rows() {
        lp.values().append_value(-1);
        lp.append(true);
    }
    let idx = b.schema().index_of("logprobs").unwrap();
    let mut cols: Vec<ArrayRef> = b.columns().to_vec();
    cols[idx] = std::sync::Arc::new(lp.finish());
    let mut fields: Vec<arrow::datatypes::Field> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields[idx] = arrow::datatypes::Field::new("logprobs", cols[idx].data_type().clone(), true);
    let bad = RecordBatch::try_new(
        std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
        cols,
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, bad.schema(), None).unwrap();
    w.write(&bad).unwrap();
    w.close().unwrap();
    std::fs::write(&seg, buf).unwrap();

    let out = p.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("column logprobs is List(Int64"), "{stderr}");
    let out = p.cmd(&["cache", "verify"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("moved to quarantine"));
    // The next run recomputes what that segment held.
    let run = p.run();
    assert_eq!(
        run["computed_rows"].as_u64().unwrap() + run["cached_rows"].as_u64().unwrap(),
        72
    );
    assert!(run["computed_rows"].as_u64().unwrap() > 0);
}

/// `cache export` writes what a spec needs as a cache folder of its own; `cache import` on a
/// fresh cache makes a run compute nothing, embed nothing; a damaged bundle row is reported
/// and not copied; a folder that is not a cache is a clear error.
#[test]
fn an_exported_bundle_imported_elsewhere_serves_the_whole_study() {
    let p = common::knn_project();
    p.run();
    let first = p.run_json();
    assert!(first["computed_rows"].as_u64().unwrap() > 0, "{first}");
    let out = p.run_ok(&[
        "cache",
        "export",
        "--spec",
        "spec.yaml",
        "--backend",
        "fake",
        "bundle",
    ]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let rows = first["computed_keys"].as_u64().unwrap();
    assert!(said.starts_with(&format!("exported {rows} rows")), "{said}");
    assert!(!said.contains(" 0 stage outputs"), "{said}");
    let bundle_rows: Vec<_> = std::fs::read_dir(p.path("bundle/v2/rows"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(bundle_rows.len(), 1, "one segment");
    let mut carried: Vec<String> = walk(&p.path("bundle"));
    carried.sort();
    assert_eq!(carried.len(), 2, "{carried:?}");
    assert!(carried[0].starts_with("v2/artifacts/seg-"), "{carried:?}");
    assert!(carried[1].starts_with("v2/rows/seg-"), "{carried:?}");

    // Another machine: an empty cache, the bundle imported.
    let fresh = |args: &[&str]| {
        let mut c = p.cmd(args);
        c.env("PIPELINE_CACHE_DIR", p.path("cache2"));
        c.output().unwrap()
    };
    let imported = fresh(&["cache", "import", "bundle"]);
    assert!(imported.status.success(), "{imported:?}");
    let said = String::from_utf8_lossy(&imported.stdout).to_string();
    assert!(said.starts_with(&format!("imported {rows} rows")), "{said}");
    let again = fresh(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
    assert!(again.status.success(), "{again:?}");
    let run = p.run_json();
    assert_eq!(run["computed_rows"], 0, "{run}");
    assert_eq!(run["embed"]["embedded"], 0, "{run}");
    // Importing twice adds nothing.
    let twice = fresh(&["cache", "import", "bundle"]);
    assert!(
        String::from_utf8_lossy(&twice.stdout).starts_with("imported 0 rows"),
        "{twice:?}"
    );

    // Without embeddings: the texts are embedded again, the neighbour lists and rows serve.
    p.run_ok(&[
        "cache",
        "export",
        "--spec",
        "spec.yaml",
        "--backend",
        "fake",
        "--without-embeddings",
        "slim",
    ]);
    let mut c = p.cmd(&["cache", "import", "slim"]);
    c.env("PIPELINE_CACHE_DIR", p.path("cache4"));
    assert!(c.output().unwrap().status.success());
    let mut c = p.cmd(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
    c.env("PIPELINE_CACHE_DIR", p.path("cache4"));
    assert!(c.output().unwrap().status.success());
    let run = p.run_json();
    assert_eq!(run["computed_rows"], 0, "{run}");
    assert!(run["embed"]["embedded"].as_u64().unwrap() > 0, "{run}");

    // A damaged bundle: its bad rows are reported, not copied; exit 1.
    let seg = bundle_rows[0].path();
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&seg, bytes).unwrap();
    let mut c = p.cmd(&["cache", "import", "bundle"]);
    c.env("PIPELINE_CACHE_DIR", p.path("cache3"));
    let damaged = c.output().unwrap();
    assert_eq!(damaged.status.code(), Some(1), "{damaged:?}");
    assert!(
        String::from_utf8_lossy(&damaged.stderr).contains("not trusted"),
        "{damaged:?}"
    );
    let status: serde_json::Value = {
        let mut c = p.cmd(&["cache", "status", "--json"]);
        c.env("PIPELINE_CACHE_DIR", p.path("cache3"));
        serde_json::from_slice(&c.output().unwrap().stdout).unwrap()
    };
    assert!(status["cache"]["rows"].as_u64().unwrap() < rows, "{status}");

    let not_cache = fresh(&["cache", "import", "data"]);
    assert_eq!(not_cache.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&not_cache.stderr).contains("not a pipeline cache folder"),
        "{not_cache:?}"
    );
    let into_itself = p
        .cmd(&[
            "cache",
            "export",
            "--spec",
            "spec.yaml",
            "--backend",
            "fake",
            "cache",
        ])
        .output()
        .unwrap();
    assert_eq!(into_itself.status.code(), Some(2), "{into_itself:?}");
}
