//! The row cache: content-addressed rows in Parquet segment files.
//!
//! Layout (versioned; a new layout gets a new folder and never misreads an old one):
//!
//! ```text
//! cache/v1/rows/seg-<time>-<pid>-<n>.parquet   committed rows, immutable once renamed
//! cache/v1/quarantine/                         segments that failed to read or verify
//! cache/v1/digests/                            sha256 memo of model files
//! ```
//!
//! A segment is written to a hidden temporary file, synced, then renamed into place, so a
//! reader sees a whole segment or none. Every row carries a checksum over its content; a row
//! that fails it is never trusted. Concurrent runs write distinct segment names and need no
//! lock; a duplicate row (two runs computing the same key) is harmless.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Float64Builder, Int64Array, ListBuilder, RecordBatch,
    StringArray, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, UInt32Type};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::backend::Finish;
use crate::key::{Components, Digest, KeyEncoder};

pub const LAYOUT: &str = "v1";

/// Segments beyond this many are merged into one at the end of a run.
pub const COMPACT_AFTER_SEGMENTS: usize = 16;

/// One computed row: the raw output of one task on one prompt, with its key.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRow {
    pub key: Digest,
    pub components: Components,
    /// Dataset row id and the cell that first computed it (informational).
    pub row_id: String,
    pub cell_id: String,
    pub kind: String,
    pub text: Option<String>,
    pub logprobs: Option<Vec<f64>>,
    pub prompt_tokens: u32,
    pub evaluated_tokens: u32,
    pub gen_tokens: u32,
    pub finish: Finish,
    /// Prompt evaluation time, shared by `shared_by` tasks computed from that prompt.
    pub prefill_ms: f64,
    pub shared_by: u32,
    pub decode_ms: f64,
    pub created_unix_ms: i64,
}

impl CachedRow {
    /// Time attributed to this row: its share of the prompt plus its own decoding.
    pub fn latency_ms(&self) -> f64 {
        self.prefill_ms / f64::from(self.shared_by.max(1)) + self.decode_ms
    }

    /// Checksum over every stored field; a row whose checksum fails is discarded.
    pub fn checksum(&self) -> Digest {
        let mut e = KeyEncoder::new("cache-row");
        e.digest("key", &self.key);
        for (n, d) in Components::NAMES.iter().zip(self.components.parts()) {
            e.digest(n, &d);
        }
        e.str("row_id", &self.row_id)
            .str("cell_id", &self.cell_id)
            .str("kind", &self.kind)
            .opt_str("text", self.text.as_deref());
        match &self.logprobs {
            Some(lp) => {
                e.u64("logprobs", lp.len() as u64);
                for v in lp {
                    e.bytes("lp", &v.to_bits().to_le_bytes());
                }
            }
            None => {
                e.str("logprobs", "none");
            }
        }
        e.u64("prompt_tokens", self.prompt_tokens.into())
            .u64("evaluated_tokens", self.evaluated_tokens.into())
            .u64("gen_tokens", self.gen_tokens.into())
            .str("finish", self.finish.as_str())
            .bytes("prefill_ms", &self.prefill_ms.to_bits().to_le_bytes())
            .u64("shared_by", self.shared_by.into())
            .bytes("decode_ms", &self.decode_ms.to_bits().to_le_bytes())
            .i64("created", self.created_unix_ms);
        e.finish()
    }
}

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
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What opening the cache found, including anything it refused to trust.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub segments: usize,
    pub rows: usize,
    /// Segments moved to quarantine, with the reason.
    pub quarantined: Vec<(PathBuf, String)>,
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
        if self.corrupt_rows > 0 {
            out.push(format!(
                "{} cached rows failed their checksum and will be recomputed",
                self.corrupt_rows
            ));
        }
        out
    }
}

pub struct Cache {
    root: PathBuf,
    rows: HashMap<Digest, CachedRow>,
    pub report: LoadReport,
}

impl Cache {
    /// Open (creating if needed) the cache under `dir` and load every committed row.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let root = dir.join(LAYOUT);
        for sub in ["rows", "quarantine", "digests"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let mut cache = Self {
            root,
            rows: HashMap::new(),
            report: LoadReport::default(),
        };
        cache.load()?;
        Ok(cache)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn digest_dir(&self) -> PathBuf {
        self.root.join("digests")
    }

    fn rows_dir(&self) -> PathBuf {
        self.root.join("rows")
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn get(&self, key: &Digest) -> Option<&CachedRow> {
        self.rows.get(key)
    }

    pub fn rows(&self) -> impl Iterator<Item = &CachedRow> {
        self.rows.values()
    }

    fn segment_paths(&self) -> Result<Vec<PathBuf>, CacheError> {
        let dir = self.rows_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') {
                // A temporary file left by a killed writer: never read, removed once stale.
                if is_stale(&path) {
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

    fn load(&mut self) -> Result<(), CacheError> {
        for path in self.segment_paths()? {
            let rows = match read_segment(&path) {
                Ok(rows) => rows,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // compacted meanwhile
                Err(e) => {
                    self.quarantine(&path, &e.to_string())?;
                    continue;
                }
            };
            self.report.segments += 1;
            let total = rows.len();
            let good: Vec<CachedRow> = rows.into_iter().filter_map(Result::ok).collect();
            let bad = total - good.len();
            if bad > 0 {
                // Keep what verifies, in a fresh segment; the damaged file goes to quarantine.
                self.report.corrupt_rows += bad;
                self.quarantine(
                    &path,
                    &format!("{bad} of {total} rows failed their checksum"),
                )?;
                if !good.is_empty() {
                    self.write_segment(&good)?;
                }
            }
            for r in good {
                self.rows.entry(r.key).or_insert(r);
            }
        }
        self.report.rows = self.rows.len();
        Ok(())
    }

    fn quarantine(&mut self, path: &Path, why: &str) -> Result<(), CacheError> {
        let dest = self
            .root
            .join("quarantine")
            .join(path.file_name().unwrap_or_default());
        match fs::rename(path, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(path)(e)),
        }
        self.report.quarantined.push((dest, why.to_string()));
        Ok(())
    }

    /// Durably add rows: one new segment, written then renamed.
    pub fn commit(&mut self, rows: Vec<CachedRow>) -> Result<(), CacheError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write_segment(&rows)?;
        for r in rows {
            self.rows.entry(r.key).or_insert(r);
        }
        Ok(())
    }

    fn write_segment(&self, rows: &[CachedRow]) -> Result<PathBuf, CacheError> {
        let path = self.rows_dir().join(new_segment_name());
        let bytes = encode_segment(rows).map_err(|message| CacheError::Segment {
            path: path.clone(),
            message,
        })?;
        write_atomic(&path, &bytes).map_err(io_err(&path))?;
        Ok(path)
    }

    /// Merge all segments into one when there are many. Another run compacting at the same
    /// time is kept out by a lock; a run merely reading sees either the old or new files.
    pub fn compact_if_needed(&mut self) -> Result<bool, CacheError> {
        let segments = self.segment_paths()?;
        if segments.len() <= COMPACT_AFTER_SEGMENTS {
            return Ok(false);
        }
        let lock_path = self.root.join("compact.lock");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        if lock.try_lock().is_err() {
            return Ok(false);
        }
        let mut merged: HashMap<Digest, CachedRow> = HashMap::new();
        let mut merged_paths = Vec::new();
        for p in &segments {
            match read_segment(p) {
                Ok(rows) if rows.iter().all(Result::is_ok) => {
                    for r in rows.into_iter().flatten() {
                        merged.entry(r.key).or_insert(r);
                    }
                    merged_paths.push(p.clone());
                }
                // Damaged or vanished segments are left for `load` to deal with.
                _ => {}
            }
        }
        let mut rows: Vec<CachedRow> = merged.into_values().collect();
        rows.sort_by_key(|r| r.key);
        self.write_segment(&rows)?;
        for p in merged_paths {
            let _ = fs::remove_file(p);
        }
        Ok(true)
    }
}

fn is_stale(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > Duration::from_secs(3600))
}

fn new_segment_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("seg-{now:017}-{}-{n:05}.parquet", std::process::id())
}

/// Write `bytes` to `path` so that readers see the old file or the whole new one: a hidden
/// temporary file in the same folder, synced, then renamed, then the folder synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn schema() -> Arc<Schema> {
    let mut fields = vec![Field::new("key", DataType::Utf8, false)];
    for n in Components::NAMES {
        fields.push(Field::new(n, DataType::Utf8, false));
    }
    fields.extend([
        Field::new("row_id", DataType::Utf8, false),
        Field::new("cell_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, true),
        Field::new(
            "logprobs",
            DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
            true,
        ),
        Field::new("prompt_tokens", DataType::UInt32, false),
        Field::new("evaluated_tokens", DataType::UInt32, false),
        Field::new("gen_tokens", DataType::UInt32, false),
        Field::new("finish", DataType::Utf8, false),
        Field::new("prefill_ms", DataType::Float64, false),
        Field::new("shared_by", DataType::UInt32, false),
        Field::new("decode_ms", DataType::Float64, false),
        Field::new("created_unix_ms", DataType::Int64, false),
        Field::new("checksum", DataType::Utf8, false),
    ]);
    Arc::new(Schema::new(fields))
}

fn encode_segment(rows: &[CachedRow]) -> Result<Vec<u8>, String> {
    let strs = |f: &dyn Fn(&CachedRow) -> String| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let u32s = |f: &dyn Fn(&CachedRow) -> u32| -> ArrayRef {
        Arc::new(UInt32Array::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let f64s = |f: &dyn Fn(&CachedRow) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let mut cols: Vec<ArrayRef> = vec![strs(&|r| r.key.hex())];
    for i in 0..Components::NAMES.len() {
        cols.push(strs(&|r| r.components.parts()[i].hex()));
    }
    let mut lp = ListBuilder::new(Float64Builder::new());
    for r in rows {
        match &r.logprobs {
            Some(v) => {
                lp.values().append_slice(v);
                lp.append(true);
            }
            None => lp.append(false),
        }
    }
    cols.extend([
        strs(&|r| r.row_id.clone()),
        strs(&|r| r.cell_id.clone()),
        strs(&|r| r.kind.clone()),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.text.clone()).collect::<Vec<_>>(),
        )) as ArrayRef,
        Arc::new(lp.finish()) as ArrayRef,
        u32s(&|r| r.prompt_tokens),
        u32s(&|r| r.evaluated_tokens),
        u32s(&|r| r.gen_tokens),
        strs(&|r| r.finish.as_str().to_string()),
        f64s(&|r| r.prefill_ms),
        u32s(&|r| r.shared_by),
        f64s(&|r| r.decode_ms),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.created_unix_ms).collect::<Vec<_>>(),
        )) as ArrayRef,
        strs(&|r| r.checksum().hex()),
    ]);
    let batch = RecordBatch::try_new(schema(), cols).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), None).map_err(|e| e.to_string())?;
    w.write(&batch).map_err(|e| e.to_string())?;
    w.close().map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Read a segment. The outer error means the file is unreadable as a whole; each row is
/// `Err` when it fails verification.
fn read_segment(path: &Path) -> std::io::Result<Vec<Result<CachedRow, String>>> {
    let file = File::open(path)?;
    let invalid = |e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| invalid(&e))?
        .build()
        .map_err(|e| invalid(&e))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| invalid(&e))?;
        if batch.schema().fields().len() != schema().fields().len() {
            return Err(invalid(&"unexpected columns"));
        }
        out.extend(decode_batch(&batch).map_err(|e| invalid(&e))?);
    }
    Ok(out)
}

fn decode_batch(b: &RecordBatch) -> Result<Vec<Result<CachedRow, String>>, String> {
    let col = |name: &str| {
        b.column_by_name(name)
            .ok_or_else(|| format!("missing column {name}"))
    };
    let s = |name: &str| -> Result<StringArray, String> {
        col(name)?
            .as_string_opt::<i32>()
            .cloned()
            .ok_or_else(|| format!("column {name} is not text"))
    };
    let u = |name: &str| -> Result<UInt32Array, String> {
        col(name)?
            .as_primitive_opt::<UInt32Type>()
            .cloned()
            .ok_or_else(|| format!("column {name} is not u32"))
    };
    let f = |name: &str| -> Result<Float64Array, String> {
        col(name)?
            .as_primitive_opt::<Float64Type>()
            .cloned()
            .ok_or_else(|| format!("column {name} is not f64"))
    };
    let key = s("key")?;
    let comps: Vec<StringArray> = Components::NAMES
        .iter()
        .map(|n| s(n))
        .collect::<Result<_, _>>()?;
    let (row_id, cell_id, kind, text, finish, checksum) = (
        s("row_id")?,
        s("cell_id")?,
        s("kind")?,
        s("text")?,
        s("finish")?,
        s("checksum")?,
    );
    let (pt, et, gt, shared) = (
        u("prompt_tokens")?,
        u("evaluated_tokens")?,
        u("gen_tokens")?,
        u("shared_by")?,
    );
    let (prefill, decode) = (f("prefill_ms")?, f("decode_ms")?);
    let created = col("created_unix_ms")?
        .as_primitive_opt::<Int64Type>()
        .cloned()
        .ok_or("created_unix_ms is not i64")?;
    let lp = col("logprobs")?
        .as_list_opt::<i32>()
        .cloned()
        .ok_or("logprobs is not a list")?;
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let row = (|| -> Result<CachedRow, String> {
            let d = |a: &StringArray| Digest::from_hex(a.value(i)).ok_or("bad digest");
            let mut parts = [Digest([0; 32]); 6];
            for (p, a) in parts.iter_mut().zip(&comps) {
                *p = d(a)?;
            }
            let row = CachedRow {
                key: d(&key)?,
                components: Components::from_parts(parts),
                row_id: row_id.value(i).to_string(),
                cell_id: cell_id.value(i).to_string(),
                kind: kind.value(i).to_string(),
                text: (!text.is_null(i)).then(|| text.value(i).to_string()),
                logprobs: (!lp.is_null(i))
                    .then(|| lp.value(i).as_primitive::<Float64Type>().values().to_vec()),
                prompt_tokens: pt.value(i),
                evaluated_tokens: et.value(i),
                gen_tokens: gt.value(i),
                finish: Finish::parse(finish.value(i)).ok_or("bad finish")?,
                prefill_ms: prefill.value(i),
                shared_by: shared.value(i),
                decode_ms: decode.value(i),
                created_unix_ms: created.value(i),
            };
            if row.checksum().hex() != checksum.value(i) {
                return Err("checksum mismatch".into());
            }
            if row.components.row_key() != row.key {
                return Err("key does not match its components".into());
            }
            Ok(row)
        })();
        out.push(row);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn row(n: u8) -> CachedRow {
        let d = |s: &str| KeyEncoder::new(s).u64("n", n.into()).finish();
        let components = Components::from_parts([d("m"), d("p"), d("me"), d("s"), d("se"), d("e")]);
        CachedRow {
            key: components.row_key(),
            components,
            row_id: format!("row{n}"),
            cell_id: "cell".into(),
            kind: "generate".into(),
            text: Some(format!("positive {n}")),
            logprobs: if n.is_multiple_of(2) {
                Some(vec![-0.5, -1.5])
            } else {
                None
            },
            prompt_tokens: 10,
            evaluated_tokens: 4,
            gen_tokens: 2,
            finish: Finish::Eog,
            prefill_ms: 12.5,
            shared_by: 3,
            decode_ms: 1.25,
            created_unix_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn commit_then_reopen_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path()).unwrap();
        let rows: Vec<_> = (0..5).map(row).collect();
        c.commit(rows.clone()).unwrap();
        let c2 = Cache::open(dir.path()).unwrap();
        assert_eq!(c2.len(), 5);
        for r in rows {
            assert_eq!(c2.get(&r.key), Some(&r));
        }
        assert!(c2.report.problems().is_empty());
    }

    #[test]
    fn truncated_segment_is_quarantined_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path()).unwrap();
        c.commit((0..3).map(row).collect()).unwrap();
        let seg = c.segment_paths().unwrap().pop().unwrap();
        let bytes = fs::read(&seg).unwrap();
        fs::write(&seg, &bytes[..bytes.len() / 2]).unwrap();
        let c2 = Cache::open(dir.path()).unwrap();
        assert_eq!(c2.len(), 0);
        assert_eq!(c2.report.quarantined.len(), 1);
        assert!(!seg.exists());
    }

    #[test]
    fn tampered_row_fails_checksum_and_good_rows_survive() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        let mut rows: Vec<_> = (0..3).map(row).collect();
        // Write a segment whose second row claims another text than its checksum covers.
        let mut bad = encode_segment(&rows).unwrap();
        let needle = b"positive 1";
        let at = bad.windows(needle.len()).position(|w| w == needle).unwrap();
        bad[at] = b'P';
        let path = c.rows_dir().join("seg-tampered.parquet");
        fs::write(&path, bad).unwrap();
        let c2 = Cache::open(dir.path()).unwrap();
        assert_eq!(c2.report.corrupt_rows, 1);
        assert_eq!(c2.len(), 2);
        assert!(c2.get(&rows[1].key).is_none());
        rows.remove(1);
        for r in &rows {
            assert_eq!(c2.get(&r.key), Some(r));
        }
        // The damaged file is gone from rows/, the good rows were rewritten.
        let c3 = Cache::open(dir.path()).unwrap();
        assert_eq!(c3.len(), 2);
        assert!(c3.report.problems().is_empty());
        drop(c);
    }

    #[test]
    fn compaction_merges_segments_without_losing_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path()).unwrap();
        for n in 0..(COMPACT_AFTER_SEGMENTS as u8 + 3) {
            c.commit(vec![row(n)]).unwrap();
        }
        assert!(c.compact_if_needed().unwrap());
        assert_eq!(c.segment_paths().unwrap().len(), 1);
        let c2 = Cache::open(dir.path()).unwrap();
        assert_eq!(c2.len(), COMPACT_AFTER_SEGMENTS + 3);
    }
}
