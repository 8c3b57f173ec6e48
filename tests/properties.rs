//! Property tests: no input makes the spec parser or the cache segment reader panic.

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
                kind: "loglik".into(),
                text: None,
                logprobs: Some(vec![-0.5, -1.5]),
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

thread_local! {
    static SEGMENT: Vec<u8> = segment_bytes();
}
