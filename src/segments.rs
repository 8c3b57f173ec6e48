//! The storage both caches share: a folder of immutable Parquet segment files, each
//! written to a hidden temporary file, synced, then renamed, so a reader sees a whole
//! segment or none; a quarantine for segments that fail to read or verify; a lock that
//! keeps two compactions apart; and read-only access that never writes anything.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::fs::write_atomic;
use crate::table::TableError;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache segment {path}: {message}")]
    Segment { path: PathBuf, message: String },
    #[error(
        "cache segment {path} was removed while it was read (another run compacted the cache); run the command again"
    )]
    Vanished { path: PathBuf },
    #[error("cache {path} was opened read-only")]
    ReadOnly { path: PathBuf },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What opening a store found, including anything it refused to trust.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub segments: usize,
    /// Distinct successful rows (or artifacts), and rows recorded as failed with no
    /// success since.
    pub rows: usize,
    pub failures: usize,
    /// Segments moved to quarantine (read-write open), with the reason.
    pub quarantined: Vec<(PathBuf, String)>,
    /// Damaged segments left where they are (read-only open), with the reason.
    pub untrusted: Vec<(PathBuf, String)>,
    /// Rows dropped because their checksum failed.
    pub corrupt_rows: usize,
}

impl LoadReport {
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .quarantined
            .iter()
            .map(|(p, why)| {
                format!(
                    "corrupt cache segment {} moved to quarantine: {why}",
                    p.display()
                )
            })
            .collect();
        out.extend(self.untrusted.iter().map(|(p, why)| {
            format!(
                "corrupt cache segment {} is not trusted: {why} (`pipeline cache verify` quarantines it)",
                p.display()
            )
        }));
        if self.corrupt_rows > 0 {
            out.push(format!(
                "{} cached rows failed their checksum and will be recomputed",
                self.corrupt_rows
            ));
        }
        out
    }

    /// Add another store's findings.
    pub fn merge(&mut self, other: &LoadReport) {
        self.segments += other.segments;
        self.quarantined.extend(other.quarantined.iter().cloned());
        self.untrusted.extend(other.untrusted.iter().cloned());
        self.corrupt_rows += other.corrupt_rows;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    ReadWrite,
    ReadOnly,
}

/// One folder of segments (`dir`) with its quarantine and compaction lock.
pub(crate) struct SegmentDir {
    pub dir: PathBuf,
    pub quarantine: PathBuf,
    pub lock_path: PathBuf,
    pub access: Access,
}

impl SegmentDir {
    /// `root/name` with `root/quarantine` and `root/name.lock`; created when writable.
    pub fn new(root: &Path, name: &str, access: Access) -> Result<Self, CacheError> {
        let d = Self {
            dir: root.join(name),
            quarantine: root.join("quarantine"),
            lock_path: root.join(format!("{name}.lock")),
            access,
        };
        if access == Access::ReadWrite {
            for p in [&d.dir, &d.quarantine] {
                fs::create_dir_all(p).map_err(io_err(p))?;
            }
        }
        Ok(d)
    }

    pub fn writable(&self) -> Result<(), CacheError> {
        match self.access {
            Access::ReadWrite => Ok(()),
            Access::ReadOnly => Err(CacheError::ReadOnly {
                path: self.dir.clone(),
            }),
        }
    }

    /// Committed segments, oldest first. A temporary file left by a killed writer is never
    /// read, and removed once stale (when writable).
    pub fn list(&self) -> Result<Vec<PathBuf>, CacheError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && self.access == Access::ReadOnly =>
            {
                return Ok(Vec::new());
            }
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') {
                if self.access == Access::ReadWrite && is_stale(&path) {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            if name.ends_with(".parquet") {
                out.push(path);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Temporary files of unfinished writes.
    pub fn temp_files(&self) -> usize {
        fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    }

    /// A segment that cannot be trusted: quarantined when writing is allowed, else only
    /// reported.
    pub fn distrust(
        &self,
        path: &Path,
        why: &str,
        report: &mut LoadReport,
    ) -> Result<(), CacheError> {
        if self.access == Access::ReadOnly {
            report.untrusted.push((path.to_path_buf(), why.to_string()));
            return Ok(());
        }
        let dest = self.quarantine.join(path.file_name().unwrap_or_default());
        match fs::rename(path, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(path)(e)),
        }
        report.quarantined.push((dest, why.to_string()));
        Ok(())
    }

    /// Write a new segment from an encoded batch, named with a digest of its bytes.
    pub fn write(&self, batch: &RecordBatch) -> Result<PathBuf, CacheError> {
        self.writable()?;
        let bytes = encode(batch).map_err(|message| CacheError::Segment {
            path: self.dir.clone(),
            message: message.to_string(),
        })?;
        let path = self.dir.join(new_segment_name(&bytes));
        write_atomic(&path, &bytes).map_err(io_err(&path))?;
        Ok(path)
    }

    /// A segment written a batch at a time (see [`SegmentWriter`]).
    pub fn writer(&self, schema: arrow::datatypes::SchemaRef) -> Result<SegmentWriter, CacheError> {
        self.writable()?;
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".seg-tmp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let props = parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_size(ROW_GROUP_ROWS)
            .build();
        let writer = ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            CacheError::Segment {
                path: tmp.clone(),
                message: e.to_string(),
            }
        })?;
        Ok(SegmentWriter {
            dir: self.dir.clone(),
            tmp,
            writer: Some(writer),
            rows: 0,
        })
    }

    /// The compaction lock; `None` when another process holds it and `wait` is false.
    pub fn lock(&self, wait: bool) -> Result<Option<File>, CacheError> {
        let lock = File::create(&self.lock_path).map_err(io_err(&self.lock_path))?;
        if wait {
            lock.lock().map_err(io_err(&self.lock_path))?;
        } else if lock.try_lock().is_err() {
            return Ok(None);
        }
        Ok(Some(lock))
    }
}

fn is_stale(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > Duration::from_secs(3600))
}

/// `seg-TIME-PID-N-DIGEST.parquet`: oldest first when sorted, unique per process, and
/// carrying the first 16 hex digits of the blake3 of its bytes. Row checksums catch a damaged
/// value; the digest also catches damage to bytes no value is read from (page statistics,
/// padding), so that no damaged file passes for a sound one, and it lets a reader that reads
/// only some columns trust the others' neighbours without decoding them.
fn new_segment_name(bytes: &[u8]) -> String {
    segment_name(&blake3::hash(bytes))
}

fn segment_name(digest: &blake3::Hash) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "seg-{now:017}-{}-{n:05}-{}.parquet",
        std::process::id(),
        &digest.to_hex()[..16]
    )
}

/// The digest a segment's name carries; `None` for segments written before names did.
fn named_digest(path: &Path) -> Option<String> {
    let name = path.file_stem().unwrap_or_default().to_string_lossy();
    let parts: Vec<&str> = name.split('-').collect();
    match parts.as_slice() {
        [_, _, _, _, digest] if digest.len() == 16 => Some(digest.to_string()),
        _ => None,
    }
}

/// The blake3 of a file, read a block at a time (never held whole).
fn hash_file(path: &Path) -> std::io::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path)?)?;
    Ok(hasher.finalize())
}

/// Whether a segment file's bytes match the digest in its name, read a block at a time:
/// `None` when its name carries no digest (it can only be verified row by row).
pub(crate) fn sealed(path: &Path) -> std::io::Result<Option<bool>> {
    let Some(digest) = named_digest(path) else {
        return Ok(None);
    };
    Ok(Some(hash_file(path)?.to_hex().starts_with(&digest)))
}

/// A segment written a batch at a time to a hidden temporary file, then synced, named with
/// the digest of its bytes and renamed into place by [`SegmentWriter::finish`]; dropped
/// unfinished, it leaves nothing behind.
pub(crate) struct SegmentWriter {
    dir: PathBuf,
    tmp: PathBuf,
    writer: Option<ArrowWriter<File>>,
    rows: usize,
}

/// Rows per row group of a streamed segment: the writer holds at most one group's pages.
const ROW_GROUP_ROWS: usize = 65_536;

impl SegmentWriter {
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), CacheError> {
        let err = |e: parquet::errors::ParquetError| CacheError::Segment {
            path: self.tmp.clone(),
            message: e.to_string(),
        };
        if let Some(w) = self.writer.as_mut() {
            w.write(batch).map_err(err)?;
        }
        self.rows += batch.num_rows();
        Ok(())
    }

    /// The new segment's path; `None` (and no file) when no row was written.
    pub fn finish(mut self) -> Result<Option<PathBuf>, CacheError> {
        let Some(w) = self.writer.take() else {
            return Ok(None);
        };
        let file = w.into_inner().map_err(|e| CacheError::Segment {
            path: self.tmp.clone(),
            message: e.to_string(),
        })?;
        if self.rows == 0 {
            let _ = fs::remove_file(&self.tmp);
            return Ok(None);
        }
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        let path = self.dir.join(segment_name(
            &hash_file(&self.tmp).map_err(io_err(&self.tmp))?,
        ));
        fs::rename(&self.tmp, &path).map_err(io_err(&path))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(Some(path))
    }
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.writer = None;
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Whether a segment's bytes match the digest in its name; segments written before names
/// carried one have nothing to check.
pub(crate) fn intact(path: &Path, bytes: &[u8]) -> bool {
    named_digest(path).is_none_or(|digest| blake3::hash(bytes).to_hex().starts_with(&digest))
}

/// Why a segment whose rows were read is distrusted: rows that failed their checksum, or
/// bytes that do not match its name's digest (`None`: it is sound).
pub(crate) fn damage(intact: bool, bad: usize, total: usize, what: &str) -> Option<String> {
    match (intact, bad) {
        (true, 0) => None,
        (true, _) => Some(format!("{bad} of {total} {what} failed their checksum")),
        (false, _) => Some(format!(
            "its bytes do not match the digest in its name (damaged on disk); {bad} of {total} {what} failed their checksum, the others verified and are kept"
        )),
    }
}

fn encode(batch: &RecordBatch) -> Result<Vec<u8>, TableError> {
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), None).map_err(TableError::from)?;
    w.write(batch).map_err(TableError::from)?;
    w.close().map_err(TableError::from)?;
    Ok(buf)
}

/// A segment file's record batches, each checked against `schema` before any value is
/// read. `Err` when the file as a whole cannot be trusted; never panics (a Parquet decoder
/// panic on a damaged file is an unreadable file).
pub(crate) fn read_batches(
    bytes: bytes::Bytes,
    schema: &Schema,
) -> Result<Vec<RecordBatch>, TableError> {
    crate::guard::catch(move || {
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .map_err(TableError::from)?
            .build()
            .map_err(TableError::from)?;
        let mut out = Vec::new();
        for batch in reader {
            let batch = batch.map_err(TableError::from)?;
            check_schema(&batch, schema)?;
            out.push(batch);
        }
        Ok(out)
    })
    .unwrap_or_else(|| Err(TableError::ReaderPanicked))
}

/// The whole file, for [`read_batches`].
pub(crate) fn read_file(path: &Path) -> std::io::Result<bytes::Bytes> {
    fs::read(path).map(bytes::Bytes::from)
}

/// Field metadata marking a column added to a layout after its first segments were
/// written: those segments lack it and read as if every value were missing.
const ADDED_LATER: &str = "pipeline.added_later";

/// `field`, marked as [`ADDED_LATER`] (it must be nullable).
pub(crate) fn added_later(field: Field) -> Field {
    debug_assert!(field.is_nullable());
    field.with_metadata([(ADDED_LATER.to_string(), "true".to_string())].into())
}

/// Every expected column, with exactly the expected type (list columns by their element
/// type), and no missing values where none are allowed; no unknown column.
fn check_schema(b: &RecordBatch, want: &Schema) -> Result<(), TableError> {
    check_fields(&b.schema(), want)?;
    check_nulls(b, want)
}

/// The columns of a file: every expected one (but those added later) with exactly the
/// expected type (list columns by their element type), and no unknown column.
pub(crate) fn check_fields(got: &Schema, want: &Schema) -> Result<(), TableError> {
    if let Some(f) = got
        .fields()
        .iter()
        .find(|f| want.field_with_name(f.name()).is_err())
    {
        return Err(TableError::Invalid(format!(
            "unexpected column {}",
            f.name()
        )));
    }
    for f in want.fields() {
        let Ok(col) = got.field_with_name(f.name()) else {
            if f.metadata().contains_key(ADDED_LATER) {
                continue;
            }
            return Err(TableError::Invalid(format!("missing column {}", f.name())));
        };
        let ok = match (f.data_type(), col.data_type()) {
            (DataType::List(want), DataType::List(got)) => got.data_type() == want.data_type(),
            (a, b) => a == b,
        };
        if !ok {
            return Err(TableError::Invalid(format!(
                "column {} is {}, expected {}",
                f.name(),
                col.data_type(),
                f.data_type()
            )));
        }
    }
    Ok(())
}

/// No missing values in the columns of `b` that allow none.
pub(crate) fn check_nulls(b: &RecordBatch, want: &Schema) -> Result<(), TableError> {
    for (f, col) in b.schema().fields().iter().zip(b.columns()) {
        let nullable = want
            .field_with_name(f.name())
            .map_or(true, |w| w.is_nullable());
        if !nullable && col.null_count() > 0 {
            return Err(TableError::Invalid(format!(
                "column {} has missing values",
                f.name()
            )));
        }
    }
    Ok(())
}
