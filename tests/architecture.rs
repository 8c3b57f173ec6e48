//! The shape of the code: the import graph of the crate's top-level modules has no cycle,
//! main.rs stays thin, no function returns `Result<_, String>`, and the generic core does
//! not speak of one dataset's domain.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use petgraph::algo::tarjan_scc;
use petgraph::graphmap::DiGraphMap;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with its path relative to `src/`.
fn rust_files(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path
                .strip_prefix(src())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((rel, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

/// The top-level module a file belongs to: `plan/explain.rs` → `plan`, `cache.rs` → `cache`.
fn top_module(rel: &str) -> String {
    let first = rel.split('/').next().unwrap();
    first.trim_end_matches(".rs").to_string()
}

/// Top-level modules each module names through `crate::NAME` (in `use` lines and paths).
fn import_graph() -> BTreeMap<String, Vec<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (rel, text) in files {
        let from = top_module(&rel);
        if from == "main" || from == "lib" {
            continue;
        }
        let targets = edges.entry(from.clone()).or_default();
        // Code only: a comment that names a module does not import it.
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let text = code;
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::{a, b}` lists.
            let names: Vec<String> = if name.is_empty() && rest.starts_with('{') {
                let end = rest.find('}').unwrap_or(rest.len());
                rest[1..end]
                    .split(',')
                    .map(|s| s.trim().split("::").next().unwrap_or("").trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            } else {
                vec![name]
            };
            for n in names {
                if n != from && !targets.contains(&n) {
                    targets.push(n);
                }
            }
        }
    }
    edges
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let edges = import_graph();
    assert!(
        edges.len() > 20,
        "the crate's modules were not found: {edges:?}"
    );
    let mut g: DiGraphMap<&str, ()> = DiGraphMap::new();
    for (from, tos) in &edges {
        g.add_node(from);
        for to in tos {
            g.add_edge(from, to, ());
        }
    }
    let cycles: Vec<Vec<&str>> = tarjan_scc(&g).into_iter().filter(|c| c.len() > 1).collect();
    assert!(
        cycles.is_empty(),
        "top-level modules import each other in a cycle: {cycles:?}"
    );
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    // The graph the check reads must hold edges we know of, or an empty graph would pass.
    let edges = import_graph();
    assert!(edges["exec"].contains(&"cache".to_string()), "{edges:?}");
    assert!(edges["app"].contains(&"plan".to_string()), "{edges:?}");
    let mut g: DiGraphMap<&str, ()> = DiGraphMap::new();
    g.add_edge("a", "b", ());
    g.add_edge("b", "a", ());
    assert_eq!(tarjan_scc(&g).iter().filter(|c| c.len() > 1).count(), 1);
}

#[test]
fn main_rs_stays_thin() {
    let main = std::fs::read_to_string(src().join("main.rs")).unwrap();
    let lines = main.lines().count();
    assert!(lines <= 250, "src/main.rs has {lines} lines (at most 250)");
}

/// Every line of `src/` that `matches`, as `file:line: text`.
fn lines_where(matches: impl Fn(&str) -> bool) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
        .iter()
        .flat_map(|(rel, text)| {
            text.lines()
                .enumerate()
                .filter(|(_, l)| matches(l))
                .map(move |(i, l)| format!("{rel}:{}: {}", i + 1, l.trim()))
        })
        .collect()
}

#[test]
fn no_function_returns_a_string_error() {
    let found = lines_where(|l| {
        let l = l.replace(' ', "");
        l.contains(",String>") && l.contains("Result<")
    });
    assert!(
        found.is_empty(),
        "Result<_, String> in src/:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_core_speaks_of_rows_not_reviews() {
    let found = lines_where(|l| l.to_lowercase().contains("review"));
    assert!(
        found.len() <= 20,
        "{} lines of src/ say \"review\" (at most 20):\n{}",
        found.len(),
        found.join("\n")
    );
}
