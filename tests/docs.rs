//! What a person reads first: the README fits on a few screens, keeps the two commands,
//! and every file it links to exists; the book's pages are all in its navigation. (The
//! book's own links are checked by `mkdocs build --strict` in the test command.)

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_readme_is_short_and_keeps_the_two_commands() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= 150,
        "README.md has {lines} lines (at most 150: the rest is in docs/)"
    );
    for command in ["bash scripts/quickstart", "bash scripts/test"] {
        assert!(readme.contains(command), "README.md lost `{command}`");
    }
}

#[test]
fn every_local_link_of_the_readme_exists() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut checked = 0;
    for part in readme.split("](").skip(1) {
        let target = part.split(')').next().unwrap_or_default();
        if target.starts_with("http") || target.starts_with('#') {
            continue;
        }
        let file = target.split('#').next().unwrap_or_default();
        assert!(
            root().join(file).exists(),
            "README.md links to {target}, which does not exist"
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} local links");
}

#[test]
fn every_page_of_the_book_is_in_its_navigation() {
    let nav = std::fs::read_to_string(root().join("docs/mkdocs.yml")).unwrap();
    for entry in std::fs::read_dir(root().join("docs/book")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            assert!(
                nav.contains(&format!(": {name}")),
                "docs/book/{name} is not in docs/mkdocs.yml's nav"
            );
        }
    }
}
