//! Names that a spec gives and that end up in paths: the report folder's name and the parts
//! of a hub model's `hf:OWNER/REPO/FILE`. A spec is shared like code, so each name is checked
//! to stay one plain path component (or, for a hub file, plain components under its repo):
//! no `..`, no absolute part, no empty segment, no control character. Nothing a spec names
//! can then reach outside the reports folder, the cache or the models folder.

use std::path::{Component, Path};

/// Why a name is not a plain name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("`{0}` is not a name (it would leave its folder)")]
    Dots(String),
    #[error("starts with `.` (a hidden file name)")]
    Hidden,
    #[error("has a control character ({0:?})")]
    Control(char),
    #[error("has `{0}`; use letters, digits, `-`, `_` or `.`")]
    Char(char),
    #[error("has an empty segment (`//`, or a leading or trailing `/`)")]
    EmptySegment,
    #[error("segment `{0}` would leave the repository")]
    ParentSegment(String),
}

/// Longest name accepted (a file name on common file systems is at most 255 bytes).
pub const MAX_NAME_LEN: usize = 128;

/// A report folder name or a hub owner or repository: letters, digits, `-`, `_` and `.`,
/// not starting with `.` (so never `.` or `..`).
pub fn check_folder_name(name: &str) -> Result<(), NameError> {
    check_segment(name)?;
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(NameError::Char(c));
    }
    if name.starts_with('.') {
        return Err(NameError::Hidden);
    }
    Ok(())
}

/// A file inside a hub repository: `/`-separated segments, each a plain name (no `..`, `.`
/// or empty segment, no backslash or control character), so that the file stays inside
/// the repository's folder of the hub cache.
pub fn check_hub_file(file: &str) -> Result<(), NameError> {
    if file.len() > 4 * MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    for segment in file.split('/') {
        if segment.is_empty() {
            return Err(NameError::EmptySegment);
        }
        if segment == ".." || segment == "." {
            return Err(NameError::ParentSegment(segment.into()));
        }
        check_segment(segment)?;
    }
    Ok(())
}

/// A spec id (model, prompt, method, ...): not empty, not too long, not a dot name, no
/// control character, no backslash. Ids name cells, not files, so other characters are
/// the spec's own business (cell-id separators are checked where cell ids are built).
pub fn check_id(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if s.chars().all(|c| c == '.') {
        return Err(NameError::Dots(s.into()));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(NameError::Control(c));
    }
    if s.contains('\\') {
        return Err(NameError::Char('\\'));
    }
    Ok(())
}

/// The checks every path segment gets: those of an id, and no colon (a drive or a stream
/// on Windows).
fn check_segment(s: &str) -> Result<(), NameError> {
    check_id(s)?;
    if s.contains(':') {
        return Err(NameError::Char(':'));
    }
    Ok(())
}

/// Whether `path` (relative) stays inside the folder it is joined to: only plain components.
pub fn stays_inside(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_reject_dots_separators_and_hidden_names() {
        assert_eq!(check_folder_name("ablation-2.1_b"), Ok(()));
        assert_eq!(check_folder_name(".."), Err(NameError::Dots("..".into())));
        assert_eq!(check_folder_name("."), Err(NameError::Dots(".".into())));
        assert_eq!(check_folder_name(".hidden"), Err(NameError::Hidden));
        assert_eq!(check_folder_name("a/b"), Err(NameError::Char('/')));
        assert_eq!(check_folder_name(""), Err(NameError::Empty));
        assert_eq!(check_folder_name("a\nb"), Err(NameError::Control('\n')));
        assert_eq!(
            check_folder_name(&"x".repeat(MAX_NAME_LEN + 1)),
            Err(NameError::TooLong)
        );
    }

    #[test]
    fn hub_files_reject_parent_absolute_and_empty_segments() {
        assert_eq!(check_hub_file("sub/m-Q4_K_M.gguf"), Ok(()));
        assert_eq!(
            check_hub_file("../../etc/passwd"),
            Err(NameError::ParentSegment("..".into()))
        );
        assert_eq!(check_hub_file("/etc/passwd"), Err(NameError::EmptySegment));
        assert_eq!(check_hub_file("a//b.gguf"), Err(NameError::EmptySegment));
        assert_eq!(
            check_hub_file("a/./b.gguf"),
            Err(NameError::ParentSegment(".".into()))
        );
        assert_eq!(check_hub_file("a\\..\\b"), Err(NameError::Char('\\')));
        assert_eq!(check_hub_file("c:x.gguf"), Err(NameError::Char(':')));
    }
}
