//! Diagnostics that point into the spec file: `file:line:column`, the field path, and a
//! rustc-style snippet of the offending line.

use std::fmt;
use std::path::{Path, PathBuf};

/// A position in a source file (1-based line and column; 0 means unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLoc {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
}

impl SourceLoc {
    pub fn new(file: impl Into<PathBuf>, line: u64, column: u64) -> Self {
        Self {
            file: file.into(),
            line,
            column,
        }
    }

    pub fn file_only(file: impl Into<PathBuf>) -> Self {
        Self::new(file, 0, 0)
    }

    pub fn from_saphyr(file: &Path, loc: &serde_saphyr::Location) -> Self {
        Self::new(file, loc.line(), loc.column())
    }
}

impl fmt::Display for SourceLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
            if self.column > 0 {
                write!(f, ":{}", self.column)?;
            }
        }
        Ok(())
    }
}

/// An error about the user's input, located in a file and named by its field path.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Diagnostic {
    pub loc: SourceLoc,
    /// Dotted field path, e.g. `prompts[1].user`; empty when the whole file is meant.
    pub field: String,
    pub message: String,
    /// The offending line with a caret under the column, when the source is at hand.
    pub snippet: Option<String>,
}

impl Diagnostic {
    pub fn new(loc: SourceLoc, field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut d = Self {
            loc,
            field: field.into(),
            message: message.into(),
            snippet: None,
        };
        d.snippet = std::fs::read_to_string(&d.loc.file)
            .ok()
            .and_then(|src| snippet(&src, d.loc.line, d.loc.column));
        d
    }

    /// A diagnostic with a snippet taken from `source` rather than from the file on disk.
    pub fn with_source(mut self, source: &str) -> Self {
        self.snippet = snippet(source, self.loc.line, self.loc.column);
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.loc)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(s) = &self.snippet {
            write!(f, "\n{s}")?;
        }
        Ok(())
    }
}

/// Render `line` of `source` with a caret under `column`, or `None` if out of range.
pub fn snippet(source: &str, line: u64, column: u64) -> Option<String> {
    if line == 0 {
        return None;
    }
    let text = source.lines().nth(line as usize - 1)?;
    let gutter = line.to_string().len();
    let pad = " ".repeat(gutter);
    let caret_at = column.saturating_sub(1) as usize;
    let caret_pad: String = text
        .chars()
        .take(caret_at)
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    Some(format!("{pad} |\n{line} | {text}\n{pad} | {caret_pad}^"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippet_points_at_column() {
        let src = "a: 1\nbb: oops\n";
        let s = snippet(src, 2, 5).unwrap();
        assert!(s.contains("2 | bb: oops"), "{s}");
        assert!(s.ends_with("  |     ^"), "{s:?}");
    }

    #[test]
    fn display_has_location_and_field() {
        let d = Diagnostic {
            loc: SourceLoc::new("x.yaml", 3, 7),
            field: "models[0].gguf".into(),
            message: "file not found".into(),
            snippet: None,
        };
        assert_eq!(d.to_string(), "x.yaml:3:7: models[0].gguf: file not found");
    }
}
