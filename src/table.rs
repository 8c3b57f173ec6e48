//! Why a table (a Parquet segment, a dataset file, a report table) could not be written
//! or read.

/// An Arrow table that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The bytes decode, but what they hold is not what the table must hold (a column
    /// missing or of another type, a value out of its domain).
    #[error("{0}")]
    Invalid(String),
    /// The Parquet decoder panicked on the file (a damaged file is an unreadable one).
    #[error("the Parquet reader failed on this file")]
    ReaderPanicked,
}

impl From<&str> for TableError {
    fn from(why: &str) -> Self {
        TableError::Invalid(why.to_string())
    }
}

impl From<String> for TableError {
    fn from(why: String) -> Self {
        TableError::Invalid(why)
    }
}
