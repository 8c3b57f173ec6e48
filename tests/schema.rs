//! The spec's JSON Schema (`pipeline schema`): every shipped spec validates against it, a
//! spec with an unknown or mistyped field does not, the schema files shipped for editors
//! are the current one, and `pipeline init` writes a spec that validates and plans.

mod common;

use std::path::{Path, PathBuf};

use common::Project;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn schema() -> serde_json::Value {
    pipeline::spec::json_schema()
}

/// A YAML spec as JSON, as an editor's schema check sees it (keys become strings).
fn as_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_str::<serde_json::Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn errors(schema: &serde_json::Value, spec: &serde_json::Value) -> Vec<String> {
    let v = jsonschema::validator_for(schema).expect("the schema is a valid JSON Schema");
    v.iter_errors(spec)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn every_shipped_spec_validates_against_the_schema() {
    let schema = schema();
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("experiments")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let bad = errors(&schema, &as_json(&path));
            assert!(bad.is_empty(), "{}: {bad:?}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} specs found");
}

#[test]
fn an_unknown_or_mistyped_field_fails_the_schema() {
    let schema = schema();
    let good = as_json(&root().join("experiments/quickstart.yaml"));
    assert!(errors(&schema, &good).is_empty());
    let mut unknown = good.clone();
    unknown["models"][0]["temprature"] = 0.2.into();
    assert!(!errors(&schema, &unknown).is_empty());
    let mut mistyped = good.clone();
    mistyped["methods"][0]["kind"] = "generation".into();
    assert!(!errors(&schema, &mistyped).is_empty());
    let mut missing = good;
    missing.as_object_mut().unwrap().remove("dataset");
    assert!(!errors(&schema, &missing).is_empty());
}

#[test]
fn the_schema_files_shipped_for_editors_are_current() {
    let now = serde_json::to_string_pretty(&schema()).unwrap() + "\n";
    let shipped = root().join("experiments/spec.schema.json");
    assert_eq!(
        std::fs::read_to_string(&shipped).unwrap_or_default(),
        now,
        "{} is stale: `pipeline schema > experiments/spec.schema.json`",
        shipped.display()
    );
    // Every shipped spec points its editor at it.
    for entry in std::fs::read_dir(root().join("experiments")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("# yaml-language-server: $schema=spec.schema.json\n"),
                "{} lacks the schema comment",
                path.display()
            );
        }
    }
}

#[test]
fn init_writes_a_spec_that_validates_and_plans() {
    let p = Project::new();
    p.run_ok(&["init", "starter"]);
    let spec = p.path("experiments/starter.yaml");
    assert!(errors(&schema(), &as_json(&spec)).is_empty());
    let out = p.run_ok(&["validate", "experiments/starter.yaml"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 models"));
    let out = p.run_ok(&["plan", "experiments/starter.yaml", "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cells = plan["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), 2, "{plan}");
    // A second init of the same name writes nothing and says why.
    let again = p.cmd(&["init", "starter"]).output().unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    // validate points at the line of a bad field.
    p.write(
        "bad.yaml",
        &std::fs::read_to_string(&spec)
            .unwrap()
            .replace("kind: loglik", "kind: logits"),
    );
    std::fs::copy(&spec, p.path("experiments/bad.yaml")).unwrap();
    let out = p.cmd(&["validate", "bad.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:") && err.contains("logits"), "{err}");
}
