use super::*;

const GOOD: &str = r#"
name: demo
dataset:
  path: data/rows.csv
  text: text
  label: label
  labels: {0: negative, 1: positive}
  sample: {n: 4, seed: 3}
models:
  - id: tiny
    gguf: models/tiny.gguf
prompts:
  - id: zero
    user: "Text: {{ text }}\nAnswer with one of {{ labels | join(', ') }}."
methods:
  - id: gen
    kind: generate
    max_tokens: 4
  - id: ll
    kind: loglik
sampling:
  temperature: [0.2, 0.8]
  seed: 1
"#;

fn parse_at(src: &str) -> Result<Spec, Diagnostic> {
    parse(Path::new("/work/exp/spec.yaml"), src)
}

#[test]
fn good_spec_parses_and_resolves_paths_against_its_folder() {
    let s = parse_at(GOOD).unwrap();
    assert_eq!(s.name, "demo");
    assert_eq!(
        s.dataset.path.value,
        PathBuf::from("/work/exp/data/rows.csv")
    );
    assert_eq!(
        s.models[0].gguf.value,
        ModelSource::Path(PathBuf::from("/work/exp/models/tiny.gguf"))
    );
    assert_eq!(
        s.dataset.labels[1],
        LabelSpec {
            name: "positive".into(),
            values: vec!["1".into()],
        }
    );
    assert_eq!(s.sampling.temperature, vec![0.2, 0.8]);
    assert_eq!(s.sampling.seed, vec![1]);
    assert_eq!(s.sampling.points().len(), 2);
    assert_eq!(s.methods[1].kind(), MethodKind::Loglik);
}

#[test]
fn unknown_key_names_line_and_column() {
    let src = GOOD.replace(
        "    max_tokens: 4\n",
        "    max_tokens: 4\n    temprature: 3\n",
    );
    let e = parse_at(&src).unwrap_err();
    let line = src.lines().position(|l| l.contains("temprature")).unwrap() as u64 + 1;
    assert_eq!(e.loc.line, line, "{e}");
    assert!(e.loc.column > 0, "{e}");
    assert!(e.to_string().contains("temprature"), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("/work/exp/spec.yaml:{line}:")),
        "{e}"
    );
}

#[test]
fn duplicate_key_is_an_error() {
    let src = GOOD.replace("name: demo\n", "name: demo\nname: again\n");
    let e = parse_at(&src).unwrap_err();
    assert!(e.to_string().to_lowercase().contains("duplicate"), "{e}");
    assert_eq!(e.loc.line, 3, "{e}");
}

#[test]
fn wrong_type_names_the_line() {
    let src = GOOD.replace("max_tokens: 4", "max_tokens: lots");
    let e = parse_at(&src).unwrap_err();
    let line = src.lines().position(|l| l.contains("lots")).unwrap() as u64 + 1;
    assert_eq!(e.loc.line, line, "{e}");
}

#[test]
fn out_of_range_value_names_field() {
    let src = GOOD.replace("temperature: [0.2, 0.8]", "temperature: [0.2, -1]");
    let e = parse_at(&src).unwrap_err();
    assert_eq!(e.field, "sampling.temperature");
    let line = src.lines().position(|l| l.contains("-1]")).unwrap() as u64 + 1;
    assert_eq!(e.loc.line, line, "{e}");
}

#[test]
fn missing_template_file_names_field_and_line() {
    let src = GOOD.replace(
        "    user: \"Text: {{ text }}\\nAnswer with one of {{ labels | join(', ') }}.\"",
        "    user: {file: ../prompts/nope.j2}",
    );
    let e = parse_at(&src).unwrap_err();
    assert_eq!(e.field, "prompts[0].user");
    let line = src.lines().position(|l| l.contains("nope.j2")).unwrap() as u64 + 1;
    assert_eq!(e.loc.line, line, "{e}");
    assert!(e.message.contains("nope.j2"), "{e}");
}

#[test]
fn generate_only_options_on_loglik_are_rejected() {
    let src = GOOD.replace(
        "    kind: loglik\n",
        "    kind: loglik\n    max_tokens: 3\n",
    );
    let e = parse_at(&src).unwrap_err();
    assert_eq!(e.field, "methods[1].max_tokens");
}

#[test]
fn hub_model_ids_parse() {
    let src = GOOD.replace(
        "gguf: models/tiny.gguf",
        "gguf: hf:Org/Repo-GGUF/sub/m-Q4.gguf",
    );
    let s = parse_at(&src).unwrap();
    assert_eq!(
        s.models[0].gguf.value,
        ModelSource::Hub {
            owner: "Org".into(),
            repo: "Repo-GGUF".into(),
            file: "sub/m-Q4.gguf".into()
        }
    );
    assert_eq!(
        s.models[0].gguf.value.file_name().as_deref(),
        Some("m-Q4.gguf")
    );
}

#[test]
fn ids_with_cell_id_separators_are_rejected() {
    for (from, to) in [
        ("- id: tiny", "- id: tiny@2"),
        ("- id: zero", "- id: zero/b"),
        ("- id: gen", "- id: gen,x"),
        ("- id: ll", "- id: ll=1"),
    ] {
        let src = GOOD.replace(from, to);
        let e = parse_at(&src).unwrap_err();
        let line = src.lines().position(|l| l.contains(to)).unwrap() + 1;
        assert_eq!(e.loc.line, line as u64, "{to}: {e}");
        assert!(e.message.contains("must not contain"), "{to}: {e}");
    }
}

#[test]
fn label_names_that_differ_only_in_case_are_rejected() {
    let src = GOOD.replace("{0: negative, 1: positive}", "{0: positive, 1: Positive}");
    let e = parse_at(&src).unwrap_err();
    assert_eq!(e.field, "dataset.labels");
    assert!(e.message.contains("differ only in case"), "{e}");
}

#[test]
fn several_label_values_may_share_a_name() {
    let src = GOOD.replace(
        "{0: negative, 1: positive}",
        "{1: very negative, 2: very negative, 9: very positive, 10: very positive}",
    );
    let s = parse_at(&src).unwrap();
    assert_eq!(s.dataset.labels.len(), 2);
    assert_eq!(s.dataset.labels[0].name, "very negative");
    assert_eq!(s.dataset.labels[0].values, ["1", "2"]);
    assert_eq!(s.dataset.labels[1].values, ["9", "10"]);
    // One name for every value is one class, not a task.
    let e =
        parse_at(&GOOD.replace("{0: negative, 1: positive}", "{0: same, 1: same}")).unwrap_err();
    assert!(e.message.contains("at least two labels"), "{e}");
}

#[test]
fn a_model_lists_the_prompts_it_has_cells_for() {
    let two_prompts = GOOD.replace(
        "prompts:\n",
        "prompts:\n  - id: other\n    user: \"{{ text }} {{ labels | join(' or ') }}?\"\n",
    );
    let s = parse_at(&two_prompts.replace(
        "    gguf: models/tiny.gguf\n",
        "    gguf: models/tiny.gguf\n    prompts: [zero]\n",
    ))
    .unwrap();
    assert_eq!(
        s.models[0].prompts.as_deref(),
        Some(&["zero".to_string()][..])
    );
    assert!(s.models[0].has_cells("zero"));
    assert!(!s.models[0].has_cells("other"));
    // Without the list a model has cells for every prompt.
    let s = parse_at(&two_prompts).unwrap();
    assert!(s.models[0].has_cells("zero") && s.models[0].has_cells("other"));

    for (list, field, message) in [
        (
            "[zero, nope]",
            "models[0].prompts[1]",
            "no prompt `nope`; the prompts are other, zero",
        ),
        (
            "[zero, zero]",
            "models[0].prompts[1]",
            "`zero` is listed twice",
        ),
        ("[]", "models[0].prompts", "list at least one prompt id"),
    ] {
        let line = format!("    prompts: {list}\n");
        let src = two_prompts.replace(
            "    gguf: models/tiny.gguf\n",
            &format!("    gguf: models/tiny.gguf\n{line}"),
        );
        let e = parse_at(&src).unwrap_err();
        let at = src.lines().position(|l| l == line.trim_end()).unwrap() + 1;
        assert_eq!(e.loc.line, at as u64, "{list}: {e}");
        assert_eq!(e.field, field, "{list}: {e}");
        assert!(e.message.contains(message), "{list}: {e}");
    }
}

#[test]
fn a_compare_pair_is_two_quoted_ids_located_at_its_own_line() {
    let with_pairs = |pairs: &str| format!("{GOOD}compare:\n  pairs:\n{pairs}");
    let src = with_pairs(
        "    - [tiny/zero/ll, tiny/zero/ll]\n    - [tiny/zero/gen@t=0.2,seed=1, tiny/zero/ll]\n",
    );
    let e = parse_at(&src).unwrap_err();
    let at = src
        .lines()
        .position(|l| l.contains("seed=1, tiny"))
        .unwrap()
        + 1;
    assert_eq!(e.loc.line, at as u64, "{e}");
    assert_eq!(e.field, "compare.pairs[1]", "{e}");
    assert!(e.message.contains("two cell ids, not 3"), "{e}");
    assert!(e.message.contains("quote a cell id"), "{e}");

    let src = with_pairs("    - [a/b/c]\n");
    let e = parse_at(&src).unwrap_err();
    assert!(e.message.contains("two cell ids, not 1"), "{e}");
    assert!(!e.message.contains("quote"), "{e}");

    let s = parse_at(&with_pairs(
        "    - [tiny/zero/ll, tiny/zero/ll]\n    - [\"tiny/zero/gen@t=0.2,seed=1\", tiny/zero/ll]\n",
    ))
    .unwrap();
    assert_eq!(s.compare.pairs[1].0.value, "tiny/zero/gen@t=0.2,seed=1");
    // Each id is located at its pair's line, not at the start of the list.
    let line = |l: &Located<String>| l.loc.line;
    assert_eq!(line(&s.compare.pairs[1].0), line(&s.compare.pairs[0].0) + 1);
}

#[test]
fn ids_are_plain_names() {
    for (from, to) in [
        ("- id: tiny", "- id: \"..\""),
        ("- id: zero", "- id: \"a\\\\b\""),
        ("- id: gen", "- id: \"tab\\there\""),
    ] {
        let src = GOOD.replace(from, to);
        let e = parse_at(&src).unwrap_err();
        let line = src.lines().position(|l| l.contains(to)).unwrap() + 1;
        assert_eq!(e.loc.line, line as u64, "{to}: {e}");
        assert!(e.message.contains("plain names"), "{to}: {e}");
    }
}

#[test]
fn truncation_budgets_parse_and_bad_ones_name_their_line() {
    let with = |dataset_extra: &str| {
        parse_at(&GOOD.replace(
            "  sample: {n: 4, seed: 3}\n",
            &format!("  sample: {{n: 4, seed: 3}}\n{dataset_extra}"),
        ))
    };
    let budget = |extra: &str| with(extra).unwrap().dataset.budget;
    assert_eq!(budget(""), None);
    assert_eq!(
        budget("  max_text_tokens: 384\n"),
        Some(TextBudget::head(384))
    );
    assert_eq!(
        budget("  max_text_tokens: 384\n  truncate: head_tail\n"),
        Some(TextBudget {
            head: 128,
            tail: 256
        })
    );
    assert_eq!(
        budget("  truncate: {head: 100, tail: 284}\n"),
        Some(TextBudget {
            head: 100,
            tail: 284
        })
    );
    let e = with("  truncate: head_tail\n").unwrap_err().to_string();
    assert!(
        e.contains("spec.yaml:9:") && e.contains("give `dataset.max_text_tokens` too"),
        "{e}"
    );
    let e = with("  max_text_tokens: 300\n  truncate: {head: 100, tail: 284}\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("384 tokens, but `max_text_tokens` is 300"),
        "{e}"
    );
    let e = with("  truncate: middle\n").unwrap_err().to_string();
    assert!(e.contains("spec.yaml:9:") && e.contains("middle"), "{e}");
}

#[test]
fn ensembles_are_checked_where_they_are_written() {
    let with = |ensembles: &str| parse_at(&format!("{GOOD}ensembles:\n{ensembles}"));
    let s = with("  - {id: both, cells: [tiny/zero/ll, tiny/zero/gen@t=0.2], weights: [3, 1]}\n")
        .unwrap();
    assert_eq!(s.ensembles[0].weights, vec![0.75, 0.25]);
    assert_eq!(s.ensembles[0].cells[1].value, "tiny/zero/gen@t=0.2");
    let e = with("  - {id: one, cells: [tiny/zero/ll]}\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ensembles[0].cells") && e.contains("at least two"),
        "{e}"
    );
    let e = with("  - {id: w, cells: [a, b], weights: [1]}\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("one weight per cell (2), not 1"), "{e}");
    let e = with("  - {id: w, cells: [a, b], weights: [0, 0]}\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not all 0"), "{e}");
}

#[test]
fn a_method_may_name_the_models_and_prompts_it_has_cells_for() {
    let src = GOOD.replace(
        "  - id: ll\n    kind: loglik\n",
        "  - id: ll\n    kind: loglik\n    prompts: [zero]\n    models: [tiny]\n",
    );
    let s = parse_at(&src).unwrap();
    assert!(s.methods[1].has_cells("tiny", "zero"));
    assert!(!s.methods[1].has_cells("tiny", "other"));
    assert!(s.methods[0].has_cells("any", "other"));
    let e = parse_at(&src.replace("models: [tiny]", "models: [huge]"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("methods[1].models[0]") && e.contains("no model `huge`; the models are tiny"),
        "{e}"
    );
    let with_prompt_budget = GOOD
        .replace(
            "  sample: {n: 4, seed: 3}\n",
            "  sample: {n: 4, seed: 3}\n  max_text_tokens: 300\n",
        )
        .replace("  - id: zero\n", "  - id: zero\n    truncate: head_tail\n");
    let s = parse_at(&with_prompt_budget).unwrap();
    assert_eq!(s.dataset.budget, Some(TextBudget::head(300)));
    assert_eq!(s.prompts[0].budget, Some(TextBudget::head_tail(300)));
}

#[test]
fn tasks_are_labels_choices_or_reference_answers_and_their_methods_fit_them() {
    let choices = GOOD.replace(
        "  labels: {0: negative, 1: positive}\n",
        "  choices: options\n",
    );
    let s = parse_at(&choices).unwrap();
    assert_eq!(s.dataset.shape(), TaskShape::Choices);
    assert!(s.dataset.labels.is_empty());
    // Both: the label is the correct choice, so fixed labels make no sense.
    let both = GOOD.replace("  labels:", "  choices: options\n  labels:");
    let e = parse_at(&both).unwrap_err();
    assert_eq!(e.field, "dataset.labels");
    // Calibration has no fixed label to calibrate with per-row choices.
    let e = parse_at(&choices.replace(
        "  - id: ll\n    kind: loglik\n",
        "  - id: ll\n    kind: loglik\n    calibrate: content_free\n",
    ))
    .unwrap_err();
    assert_eq!(e.field, "methods[1].calibrate");

    let reference = GOOD
        .replace(
            "  label: label\n  labels: {0: negative, 1: positive}\n",
            "  reference: answer\n",
        )
        .replace(
            "    max_tokens: 4\n",
            "    max_tokens: 4\n    score: {numeric: {tolerance: 0.5}}\n",
        )
        .replace("  - id: ll\n    kind: loglik\n", "");
    let s = parse_at(&reference).unwrap();
    assert_eq!(s.dataset.shape(), TaskShape::Reference);
    assert_eq!(s.dataset.label.value, "answer");
    assert_eq!(
        s.methods[0].generate().unwrap().score,
        Some(crate::score::Score::Numeric { tolerance: 0.5 })
    );
    // A generate method without a score, or a loglik method, has nothing to compare.
    let e =
        parse_at(&reference.replace("    score: {numeric: {tolerance: 0.5}}\n", "")).unwrap_err();
    assert_eq!(e.field, "methods[0].score");
    let e = parse_at(
        &format!("{reference}\n").replace("methods:\n", "methods:\n  - id: ll\n    kind: loglik\n"),
    )
    .unwrap_err();
    assert_eq!(e.field, "methods[0].kind", "{e}");
    // A score without reference answers, and a pattern that does not compile.
    let e = parse_at(&GOOD.replace(
        "    max_tokens: 4\n",
        "    max_tokens: 4\n    score: exact_match\n",
    ))
    .unwrap_err();
    assert_eq!(e.field, "methods[0].score");
    let e =
        parse_at(&reference.replace("{numeric: {tolerance: 0.5}}", "{regex: '('}")).unwrap_err();
    assert!(e.message.contains("does not compile"), "{e}");
}
