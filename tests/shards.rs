//! One run split into shards over one cache, with the fake backend: the split is the same
//! for every shard and every rerun, every pending row is in exactly one shard, models are
//! loaded about M + N times, a shard started after the others finished does nothing, and
//! the report after all shards equals a single-process run's.

mod common;

use std::collections::HashMap;
use std::process::{Output, Stdio};
use std::sync::atomic::Ordering;

use common::Project;
use pipeline::app::RunOptions;
use pipeline::shard::Shard;

/// Three models, two prompts, generate and loglik: 12 cells over 12 rows.
fn project() -> Project {
    let p = Project::new();
    for m in ["b", "c"] {
        pipeline::model::write_fake_gguf(
            &p.path(&format!("models/{m}.gguf")),
            format!("fake model {m}").as_bytes(),
        )
        .unwrap();
    }
    let spec = common::SPEC.replace(
        "    n_ctx: 512\n",
        "    n_ctx: 512\n  - id: fake-b\n    gguf: models/b.gguf\n    n_ctx: 512\n  - id: fake-c\n    gguf: models/c.gguf\n    n_ctx: 512\n",
    );
    p.write("spec.yaml", &spec);
    p
}

#[derive(Debug, Default, PartialEq)]
struct Calls {
    models_loaded: usize,
    prompts: usize,
    computed_keys: usize,
}

/// One in-process run (a shard when `shard` is set), counting the fake backend's calls.
fn run(p: &Project, shard: Option<Shard>) -> Calls {
    let sharded = shard.is_some();
    let opts = RunOptions {
        shard,
        ..RunOptions::default()
    };
    let (outcome, calls) = common::fake_run_with(p, opts);
    assert_eq!(outcome.written.is_none(), sharded, "shards write no report");
    Calls {
        models_loaded: calls.models_loaded.load(Ordering::SeqCst),
        prompts: calls.prompts.load(Ordering::SeqCst),
        computed_keys: outcome.stats.computed_keys,
    }
}

fn shard_plan(p: &Project, n: usize) -> serde_json::Value {
    let out = p.run_ok(&[
        "plan",
        "spec.yaml",
        "--backend",
        "fake",
        "--json",
        "--shards",
        &n.to_string(),
    ]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sum(split: &serde_json::Value, field: &str) -> u64 {
    split
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[field].as_u64().unwrap())
        .sum()
}

/// Every row entry in the cache's segments, by key: how many times each key was written.
fn written_keys(p: &Project) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for seg in common::segments(p) {
        for r in pipeline::cache::read_segment(&seg).unwrap() {
            *out.entry(r.unwrap().key.hex()).or_default() += 1;
        }
    }
    out
}

/// (host, shard) of each row of a report's predictions.
fn origins(p: &Project) -> Vec<(Option<String>, Option<String>)> {
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    common::read_parquet(&p.path("reports/t/predictions.parquet"))
        .iter()
        .map(|r| (text(&r["host"]), text(&r["shard"])))
        .collect()
}

#[test]
fn the_split_covers_every_pending_row_once_and_only_what_is_pending() {
    let p = project();
    let pending: u64 = common::misses(&p.plan()).iter().map(|(_, n)| n).sum();
    let split = shard_plan(&p, 4);
    assert_eq!(split, shard_plan(&p, 4), "the same split every time");
    assert_eq!(sum(&split, "rows"), pending);
    let prompts = sum(&split, "prompts");
    assert_eq!(prompts, 3 * 2 * 12, "models × prompts × rows");
    for s in split.as_array().unwrap() {
        assert!(s["prompts"].as_u64().unwrap() > 0, "{split}");
    }
    // Model-major blocks: each model appears in few shards (M + N - 1 loads at most).
    let loads: usize = split
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["models"].as_array().unwrap().len())
        .sum();
    // M + N - 1 loads at most.
    assert!(loads < 3 + 4, "{loads} loads: {split}");
    // After a partial run only the rest is split.
    p.run_ok(&[
        "run",
        "spec.yaml",
        "--backend",
        "fake",
        "--quiet",
        "--limit",
        "4",
    ]);
    let rest: u64 = common::misses(&p.plan()).iter().map(|(_, n)| n).sum();
    let split = shard_plan(&p, 3);
    assert_eq!(sum(&split, "rows"), rest);
    assert!(rest < pending);
}

#[test]
fn shards_in_turn_compute_each_row_once_and_report_as_one_run() {
    let reference = project();
    let single = run(&reference, None);
    reference.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
    let want = common::predictions(&reference.path("reports/t/predictions.parquet"));

    let p = project();
    let mut total = Calls::default();
    for index in 0..4 {
        let c = run(&p, Some(Shard { index, count: 4 }));
        total.models_loaded += c.models_loaded;
        total.prompts += c.prompts;
        total.computed_keys += c.computed_keys;
    }
    assert_eq!(total.prompts, single.prompts, "every prompt evaluated once");
    assert_eq!(total.computed_keys, single.computed_keys);
    assert!(
        total.models_loaded < 3 + 4,
        "{} model loads for 3 models and 4 shards",
        total.models_loaded
    );
    assert!(!p.path("reports/t/predictions.parquet").exists());
    p.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
    assert_eq!(
        common::predictions(&p.path("reports/t/predictions.parquet")),
        want
    );
    // Each row says which host and shard computed it, in the predictions and the provenance.
    let computed = origins(&p);
    let host = pipeline::row::this_host();
    let shards: std::collections::BTreeSet<String> = computed
        .iter()
        .map(|(h, s)| {
            assert_eq!(h.as_deref(), Some(host.as_str()));
            s.clone().expect("a shard row without its shard")
        })
        .collect();
    assert_eq!(
        shards,
        ["0/4", "1/4", "2/4", "3/4"].map(String::from).into()
    );
    let record: serde_json::Value = serde_json::from_str(&p.read("reports/t/run.json")).unwrap();
    let by = record["computed_by"].as_array().unwrap();
    assert_eq!(by.len(), 4, "{by:?}");
    let counted: u64 = by.iter().map(|o| o["rows"].as_u64().unwrap()).sum();
    assert_eq!(counted as usize, computed.len());
    // The single process records its host and no shard.
    assert!(
        origins(&reference)
            .iter()
            .all(|(h, s)| h.as_deref() == Some(host.as_str()) && s.is_none())
    );
    // A shard started again after all finished loads nothing and computes nothing.
    assert_eq!(
        run(&p, Some(Shard { index: 2, count: 4 })),
        Calls::default()
    );
    assert!(
        written_keys(&p).values().all(|n| *n == 1),
        "a row written twice"
    );
}

#[test]
fn concurrent_shard_processes_share_one_cache_and_lose_nothing() {
    let reference = project();
    run(&reference, None);
    reference.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
    let want = common::predictions(&reference.path("reports/t/predictions.parquet"));

    let p = project();
    // Four shards at once, as a job array starts them; the first one's split stands.
    let children: Vec<_> = (0..4)
        .map(|i| {
            p.cmd(&[
                "run",
                "spec.yaml",
                "--backend",
                "fake",
                "--quiet",
                "--shard",
                &format!("{i}/4"),
            ])
            .env("PIPELINE_FAKE_DELAY_MS", "3")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert!(o.status.success(), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("`pipeline report` once every shard is"),
            "{o:?}"
        );
    }
    let manifests: Vec<_> = std::fs::read_dir(p.path("cache/v2/shards"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    p.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
    assert_eq!(
        common::predictions(&p.path("reports/t/predictions.parquet")),
        want
    );
    let keys = written_keys(&p);
    assert!(keys.values().all(|n| *n == 1), "a row written twice");
    assert_eq!(
        keys.len(),
        written_keys(&reference).len(),
        "every row written"
    );
}

#[test]
fn the_scheduler_says_which_shard_this_is() {
    let p = project();
    let shard_of = |envs: &[(&str, &str)], extra: &[&str]| -> Output {
        let mut args = vec!["run", "spec.yaml", "--backend", "fake", "--quiet"];
        args.extend_from_slice(extra);
        let mut c = p.cmd(&args);
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    // A Slurm job array --array=4-6: task 5 is shard 1 of 3.
    let slurm = shard_of(
        &[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ],
        &[],
    );
    assert!(slurm.status.success(), "{slurm:?}");
    assert!(String::from_utf8_lossy(&slurm.stderr).contains("shard 1/3"));
    // A Kubernetes Indexed Job gives only the index.
    let k8s = shard_of(&[("JOB_COMPLETION_INDEX", "0")], &["--shards", "3"]);
    assert!(k8s.status.success(), "{k8s:?}");
    assert!(String::from_utf8_lossy(&k8s.stderr).contains("shard 0/3"));
    let no_count = shard_of(&[("JOB_COMPLETION_INDEX", "0")], &[]);
    assert_eq!(no_count.status.code(), Some(2), "{no_count:?}");
    assert!(String::from_utf8_lossy(&no_count.stderr).contains("--shards N"));
    let no_index = shard_of(&[], &["--shards", "3"]);
    assert_eq!(no_index.status.code(), Some(2), "{no_index:?}");
    let bad = shard_of(&[], &["--shard", "3/3"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}
