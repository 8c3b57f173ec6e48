//! Property tests: no input makes the spec parser or the cache segment reader panic, and no
//! accepted spec names a path outside its folder.

use std::path::Path;

use proptest::prelude::*;

const GOOD: &str = r#"name: t
dataset:
  path: data/reviews.jsonl
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
    user: "Review: {{ text }}"
methods:
  - id: gen
    kind: generate
    max_tokens: 4
sampling:
  temperature: [0.2, 0.8]
"#;

/// A valid segment, to mutate.
fn segment_bytes() -> Vec<u8> {
    use pipeline::cache::{Cache, CachedRow};
    use pipeline::key::{Components, KeyEncoder};
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cache::open(dir.path()).unwrap();
    let rows = (0..5u64)
        .map(|n| {
            let d = |s: &str| KeyEncoder::new(s).u64("n", n).finish();
            let components =
                Components::from_parts([d("m"), d("p"), d("me"), d("s"), d("se"), d("e")]);
            CachedRow {
                key: components.row_key(),
                components,
                row_id: format!("r{n}"),
                cell_id: "c".into(),
                kind: pipeline::row::TaskKind::Loglik,
                text: None,
                logprobs: Some(vec![-0.5, -1.5]),
                hidden: None,
                choice_tokens: Some(vec![1, 2]),
                prefix_tokens: Some(4),
                prompt_tokens: 10,
                evaluated_tokens: 10,
                gen_tokens: 0,
                finish: pipeline::row::Finish::Scored,
                prefill_ms: 1.0,
                shared_by: 1,
                decode_ms: 0.5,
                created_unix_ms: 0,
                error: None,
                host: Some("node-1".into()),
                shard: n.is_multiple_of(2).then(|| format!("{n}/5")),
            }
        })
        .collect();
    c.commit(rows).unwrap();
    let seg = std::fs::read_dir(dir.path().join("v2/rows"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    std::fs::read(seg).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_text_as_a_spec_is_a_result_never_a_panic(src in ".{0,400}") {
        let _ = pipeline::spec::parse(Path::new("/nowhere/spec.yaml"), &src);
    }

    #[test]
    fn a_mutated_spec_is_a_result_never_a_panic(
        edits in proptest::collection::vec((0usize..GOOD.len(), any::<char>()), 1..8)
    ) {
        let mut chars: Vec<char> = GOOD.chars().collect();
        for (at, c) in edits {
            let at = at % chars.len();
            chars[at] = c;
        }
        let src: String = chars.into_iter().collect();
        let _ = pipeline::spec::parse(Path::new("/nowhere/spec.yaml"), &src);
    }

    #[test]
    fn any_bytes_as_a_segment_are_a_result_never_a_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048)
    ) {
        let _ = pipeline::cache::decode_segment(bytes::Bytes::from(bytes));
    }

    #[test]
    fn a_damaged_segment_is_a_result_never_a_panic(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..16),
        cut in any::<Option<usize>>()
    ) {
        let mut b = SEGMENT.with(|s| s.clone());
        for (at, x) in flips {
            let n = b.len();
            b[at % n] ^= x.max(1);
        }
        if let Some(c) = cut {
            let n = b.len();
            b.truncate(c % n);
        }
        // Whatever decodes must still verify: no row with a failing checksum is returned.
        if let Ok(rows) = pipeline::cache::decode_segment(bytes::Bytes::from(b)) {
            for r in rows.into_iter().flatten() {
                prop_assert_eq!(r.components.row_key(), r.key);
            }
        }
    }
}

/// Path parts: names, dots, separators and the odd characters a hostile spec would use.
fn path_part() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("..".to_string()),
            Just(".".to_string()),
            Just("/".to_string()),
            Just("\\".to_string()),
            Just("".to_string()),
            Just("~".to_string()),
            Just("%2e%2e".to_string()),
            Just("\u{0}".to_string()),
            Just(":".to_string()),
            "[a-zA-Z0-9_.-]{1,6}",
            ".{1,3}",
        ],
        1..6,
    )
    .prop_map(|v| v.concat())
}

/// The spec `GOOD` with another name and hub model, when YAML can carry them.
fn spec_with(name: &str, owner: &str, repo: &str, file: &str) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    GOOD.replace("name: t\n", &format!("name: {}\n", q(name)))
        .replace(
            "gguf: models/a.gguf",
            &format!("gguf: {}", q(&format!("hf:{owner}/{repo}/{file}"))),
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    /// Whatever a spec names, an accepted spec's report folder is one plain folder inside
    /// the reports folder, and its hub file stays inside its repository's folder.
    #[test]
    fn an_accepted_spec_names_only_paths_inside_their_folders(
        name in path_part(),
        owner in path_part(),
        repo in path_part(),
        file in path_part(),
    ) {
        use std::path::Component;
        let src = spec_with(&name, &owner, &repo, &file);
        let Ok(spec) = pipeline::spec::parse(Path::new("/nowhere/spec.yaml"), &src) else {
            return Ok(());
        };
        let report = Path::new(&spec.name);
        prop_assert_eq!(report.components().count(), 1, "{:?}", spec.name);
        prop_assert!(matches!(report.components().next(), Some(Component::Normal(_))));
        prop_assert!(!spec.name.starts_with('.'));
        if let pipeline::spec::ModelSource::Hub { owner, repo, file } = &spec.models[0].gguf.value {
            for part in [owner, repo] {
                let p = Path::new(part);
                prop_assert_eq!(p.components().count(), 1, "{:?}", part);
                prop_assert!(matches!(p.components().next(), Some(Component::Normal(_))));
            }
            prop_assert!(pipeline::names::stays_inside(Path::new(file)), "{:?}", file);
            prop_assert!(!file.contains('\\') && !file.chars().any(char::is_control));
        }
    }
}

thread_local! {
    static SEGMENT: Vec<u8> = segment_bytes();
}
