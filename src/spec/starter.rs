//! What `pipeline init` writes: a minimal spec that plans and runs as it is (one model,
//! one prompt, the label log-likelihood and a greedy answer), its prompt, a tiny example
//! dataset to replace, and the spec's JSON Schema for the editor.

use std::path::{Path, PathBuf};

/// The files of a new spec, relative to the folder they go in.
pub struct Starter {
    pub files: Vec<(PathBuf, String)>,
}

/// Why a starter cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum StarterError {
    #[error(
        "`{0}` is not a usable spec name: use letters, digits, `-` and `_` (it names files and the report folder)"
    )]
    BadName(String),
    #[error("{} exists already; nothing was written (pick another name or move it)", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const EXAMPLE_ROWS: [(&str, u8); 8] = [
    (
        "A warm, funny film with a cast that clearly enjoyed making it.",
        1,
    ),
    (
        "Two hours I will never get back. The plot makes no sense.",
        0,
    ),
    (
        "The photography is stunning and the ending stayed with me for days.",
        1,
    ),
    (
        "Wooden acting, a lazy script and jokes that land with a thud.",
        0,
    ),
    (
        "I laughed, I cried, and I would watch it again tomorrow.",
        1,
    ),
    (
        "Dull from start to finish; even the music is forgettable.",
        0,
    ),
    (
        "A clever little thriller that keeps every promise it makes.",
        1,
    ),
    (
        "It looks cheap, it sounds cheap, and it feels longer than it is.",
        0,
    ),
];

impl Starter {
    pub fn new(name: &str) -> Result<Self, StarterError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(StarterError::BadName(name.to_string()));
        }
        let spec = format!(
            r#"# yaml-language-server: $schema=spec.schema.json
# Written by `pipeline init`: one model, one prompt, scored two ways. Then:
#   pipeline validate experiments/{name}.yaml   # check the spec
#   pipeline plan experiments/{name}.yaml       # what would run, what is cached
#   pipeline run experiments/{name}.yaml        # run it; the report is reports/{name}/index.html
# Relative paths resolve against this file's folder. Replace the example data with your own
# file (Parquet, CSV or JSONL) and name its columns below.
name: "{name}"
dataset:
  path: data/{name}.jsonl
  id: id
  text: text
  label: label
  labels: {{0: negative, 1: positive}}
models:
  # Fetched from the Hugging Face hub on the first run, or found by name in the models
  # folder (~/.cache/pipeline-models, or --models-dir / PIPELINE_MODELS_DIR).
  - id: qwen2.5-coder-0.5b
    gguf: hf:bartowski/Qwen2.5-Coder-0.5B-Instruct-GGUF/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf
    sha256: 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    parameters: 357898112
    n_ctx: 2048
prompts:
  - id: zero-shot
    user: {{file: ../prompts/{name}.j2}}
methods:
  - id: loglik        # the label the model finds most likely
    kind: loglik
  - id: generate      # the label the model writes
    kind: generate
    max_tokens: 4
sampling:
  temperature: 0.0
"#
        );
        let prompt = "Review:\n{{ text }}\n\nIs the sentiment of this review {{ labels | join(\" or \") }}? Answer with exactly one word.\n".to_string();
        let data: String = EXAMPLE_ROWS
            .iter()
            .enumerate()
            .map(|(i, (text, label))| {
                format!(
                    "{}\n",
                    serde_json::json!({"id": format!("ex{i}"), "text": text, "label": label})
                )
            })
            .collect();
        let schema = serde_json::to_string_pretty(&super::json_schema())
            .expect("a schema serializes")
            + "\n";
        Ok(Self {
            files: vec![
                (PathBuf::from(format!("experiments/{name}.yaml")), spec),
                (PathBuf::from(format!("prompts/{name}.j2")), prompt),
                (
                    PathBuf::from(format!("experiments/data/{name}.jsonl")),
                    data,
                ),
                (PathBuf::from("experiments/spec.schema.json"), schema),
            ],
        })
    }

    /// Write every file under `dir`, refusing before writing anything if one exists (the
    /// schema, which `pipeline schema` regenerates, is left as it is when present).
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, StarterError> {
        let is_schema = |p: &Path| p.ends_with("spec.schema.json");
        for (rel, _) in &self.files {
            let path = dir.join(rel);
            if path.exists() && !is_schema(rel) {
                return Err(StarterError::Exists(path));
            }
        }
        let mut written = Vec::new();
        for (rel, text) in &self.files {
            let path = dir.join(rel);
            if path.exists() {
                continue;
            }
            let io = |source| StarterError::Io {
                path: path.clone(),
                source,
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            crate::fs::write_atomic(&path, text.as_bytes()).map_err(io)?;
            written.push(path);
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_starter_parses_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let s = Starter::new("first").unwrap();
        let written = s.write(dir.path()).unwrap();
        assert_eq!(written.len(), 4);
        let spec = super::super::load(&dir.path().join("experiments/first.yaml")).unwrap();
        assert_eq!((spec.name.as_str(), spec.methods.len()), ("first", 2));
        assert!(matches!(
            s.write(dir.path()),
            Err(StarterError::Exists(p)) if p.ends_with("experiments/first.yaml")
        ));
        // Another spec beside it keeps the schema already there.
        assert_eq!(
            Starter::new("second")
                .unwrap()
                .write(dir.path())
                .unwrap()
                .len(),
            3
        );
        for bad in ["", "../x", "a b", "x/y"] {
            assert!(
                matches!(Starter::new(bad), Err(StarterError::BadName(_))),
                "{bad}"
            );
        }
    }
}
