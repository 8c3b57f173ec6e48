//! Bad input gets a clear error naming the file, line and column, or the field path.

mod common;

use common::Project;

/// Run `plan` and return its stderr, which must report an error (exit code 2).
fn plan_error(p: &Project) -> String {
    let out = p
        .cmd(&["plan", "spec.yaml", "--backend", "fake"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected an input error, got:\n{stderr}"
    );
    stderr
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .expect("needle in spec")
        + 1
}

#[test]
fn unknown_key() {
    let p = Project::new();
    let spec = common::SPEC.replace(
        "    max_tokens: 4\n",
        "    max_tokens: 4\n    max_token: 5\n",
    );
    p.write("spec.yaml", &spec);
    let e = plan_error(&p);
    let at = format!("spec.yaml:{}:", line_of(&spec, "max_token: 5"));
    assert!(e.contains(&at) && e.contains("max_token"), "{e}");
    assert!(e.contains("methods[0].max_token:"), "{e}");
}

#[test]
fn wrong_type() {
    let p = Project::new();
    let spec = common::SPEC.replace("n_ctx: 512", "n_ctx: large");
    p.write("spec.yaml", &spec);
    let e = plan_error(&p);
    assert!(
        e.contains(&format!("spec.yaml:{}:", line_of(&spec, "n_ctx: large"))),
        "{e}"
    );
    assert!(e.contains("models[0].n_ctx"), "{e}");
}

#[test]
fn missing_template_file() {
    let p = Project::new();
    let spec = common::SPEC.replace("prompts/p2.j2", "prompts/gone.j2");
    p.write("spec.yaml", &spec);
    let e = plan_error(&p);
    assert!(
        e.contains(&format!("spec.yaml:{}:", line_of(&spec, "gone.j2"))),
        "{e}"
    );
    assert!(
        e.contains("prompts[1].user") && e.contains("gone.j2"),
        "{e}"
    );
}

#[test]
fn undefined_template_variable() {
    let p = Project::new();
    p.write(
        "prompts/p1.j2",
        "Review:\n  {{ review_text }}\nAnswer {{ labels | join(' or ') }}.\n",
    );
    let e = plan_error(&p);
    assert!(e.contains("p1.j2:2:6"), "{e}");
    assert!(
        e.contains("`review_text`") && e.contains("prompts[0].user"),
        "{e}"
    );
}

#[test]
fn missing_model_file() {
    let p = Project::new();
    let spec = common::SPEC.replace("models/a.gguf", "models/missing.gguf");
    p.write("spec.yaml", &spec);
    let e = plan_error(&p);
    assert!(
        e.contains(&format!("spec.yaml:{}:", line_of(&spec, "missing.gguf"))),
        "{e}"
    );
    assert!(
        e.contains("models[0].gguf") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn model_file_that_is_not_gguf() {
    let p = Project::new();
    p.write("models/a.gguf", "<html>404 Not Found</html>");
    let e = plan_error(&p);
    assert!(
        e.contains(&format!(
            "spec.yaml:{}:",
            line_of(common::SPEC, "models/a.gguf")
        )),
        "{e}"
    );
    assert!(e.contains("not a GGUF file"), "{e}");
}

#[test]
fn wrong_sha256() {
    let p = Project::new();
    let spec = common::SPEC.replace(
        "    n_ctx: 512\n",
        &format!("    n_ctx: 512\n    sha256: {}\n", "ab".repeat(32)),
    );
    p.write("spec.yaml", &spec);
    let e = plan_error(&p);
    assert!(
        e.contains(&format!("spec.yaml:{}:", line_of(&spec, "sha256:"))),
        "{e}"
    );
    assert!(
        e.contains("models[0].sha256") && e.contains("wrong sha256"),
        "{e}"
    );
}

#[test]
fn dataset_column_not_found() {
    let p = Project::new();
    let spec = common::SPEC.replace("  text: text\n", "  text: review\n");
    p.write("spec.yaml", &spec);
    let e = plan_error(&p);
    assert!(
        e.contains(&format!("spec.yaml:{}:", line_of(&spec, "text: review"))),
        "{e}"
    );
    assert!(
        e.contains("dataset.text")
            && e.contains("`review` not found")
            && e.contains("columns: id, label, text"),
        "{e}"
    );
}

#[test]
fn duplicate_key() {
    let p = Project::new();
    let spec = common::SPEC.replace("name: t\n", "name: t\nname: u\n");
    p.write("spec.yaml", &spec);
    let e = plan_error(&p);
    assert!(
        e.contains("spec.yaml:3:") && e.to_lowercase().contains("duplicate"),
        "{e}"
    );
}

#[test]
fn unparseable_answers_are_counted_not_dropped() {
    let p = Project::new();
    p.run();
    // The fake backend answers "It is hard to say" for some prompts: those rows are invalid,
    // kept in predictions and counted in the metrics.
    let preds = common::predictions(&p.path("reports/t/predictions.parquet"));
    assert_eq!(preds.len(), 72);
    let invalid = preds
        .iter()
        .filter(|l| l.split(" | ").nth(3) == Some("None"))
        .count();
    assert!(
        invalid > 0,
        "the fake backend gives some unparseable answers"
    );
    // Each cell's invalid answers are counted in metrics.parquet and shown on the page.
    let html = common::report_html(&p);
    let metrics_section = html
        .split("<h2>Metrics per cell</h2>")
        .nth(1)
        .and_then(|s| s.split("</table>").next())
        .unwrap();
    let mut shown = 0;
    for cell in [
        "fake-a/p1/gen@t=0.2",
        "fake-a/p1/gen@t=0.8",
        "fake-a/p2/gen@t=0.2",
        "fake-a/p2/gen@t=0.8",
    ] {
        let expected = preds
            .iter()
            .filter(|l| {
                l.starts_with(&format!("{cell} |")) && l.split(" | ").nth(3) == Some("None")
            })
            .count();
        // Rows carry their cell's model, prompt and method (`<tr data-model=...>`).
        let row = metrics_section
            .split("<tr")
            .find(|r| r.contains(&format!("<code>{cell}</code>")))
            .unwrap();
        // Columns: cell, n, accuracy, CI, macro-F1, invalid, ...
        let invalid_cell = row.split("<td").nth(6).unwrap();
        let value = invalid_cell
            .split('>')
            .nth(1)
            .unwrap()
            .split('<')
            .next()
            .unwrap();
        assert_eq!(value, expected.to_string(), "{cell}: {row}");
        shown += expected;
    }
    assert_eq!(shown, invalid);
}
