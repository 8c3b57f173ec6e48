//! The row cache: content-addressed rows in Parquet segment files.
//!
//! Layout (versioned; a new layout gets a new folder and never misreads an old one):
//!
//! ```text
//! cache/v2/rows/seg-<time>-<pid>-<n>.parquet   committed rows, immutable once renamed
//! cache/v2/quarantine/                         segments that failed to read or verify
//! cache/v2/digests/                            sha256 memo of model files
//! ```
//!
//! A segment is written to a hidden temporary file, synced, then renamed into place, so a
//! reader sees a whole segment or none. Every row carries a checksum over its content; a row
//! that fails it is never trusted. Concurrent runs write distinct segment names and need no
//! lock; a duplicate row (two runs computing the same key) is harmless. A row that could not
//! be computed is stored with its error so that reports can show it, but it is never a hit:
//! the next run tries it again.
//!
//! [`Cache::open`] may repair (quarantine a damaged segment, rewrite its good rows);
//! [`Cache::open_read_only`] never writes anything, for `plan`, `report` and `export`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Float64Builder, Int64Array, ListBuilder, RecordBatch,
    StringArray, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, UInt32Type};

use crate::fs::tree_size;
use crate::key::{Components, Digest, KeyEncoder};
use crate::row::{Finish, RowError};
use crate::segments::{
    Access, SegmentDir, added_later, damage, intact, io_err, read_batches, read_file,
};
pub use crate::segments::{CacheError, LoadReport};
use crate::table::TableError;

pub const LAYOUT: &str = "v2";

/// Segments beyond this many are merged into one at the end of a run.
pub const COMPACT_AFTER_SEGMENTS: usize = 16;

/// One computed row: the raw output of one task on one prompt, with its key; or, when
/// `error` is set (and `finish` is `Failed`), why it could not be computed.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRow {
    pub key: Digest,
    pub components: Components,
    /// Dataset row id and the cell that first computed it (informational).
    pub row_id: String,
    pub cell_id: String,
    pub kind: crate::row::TaskKind,
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
    pub error: Option<RowError>,
    /// Where the row was computed: the host, and the shard as `I/N` when the run was split
    /// (informational; rows written before these were recorded have neither).
    pub host: Option<String>,
    pub shard: Option<String>,
}

impl CachedRow {
    /// Time attributed to this row: its share of the prompt plus its own decoding.
    pub fn latency_ms(&self) -> f64 {
        self.prefill_ms / f64::from(self.shared_by.max(1)) + self.decode_ms
    }

    pub fn failed(&self) -> bool {
        self.error.is_some()
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
            .str("kind", self.kind.as_str())
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
            .i64("created", self.created_unix_ms)
            .opt_str("error_kind", self.error.as_ref().map(|e| e.kind.as_str()))
            .opt_str("error", self.error.as_ref().map(|e| e.message.as_str()));
        // Fields added after the layout's first rows count only when set, so those rows
        // still verify.
        for (name, v) in [("host", &self.host), ("shard", &self.shard)] {
            if let Some(v) = v {
                e.str(name, v);
            }
        }
        e.finish()
    }
}

pub struct Cache {
    root: PathBuf,
    segments: SegmentDir,
    rows: HashMap<Digest, CachedRow>,
    /// The latest failure of each key that has no successful row.
    failures: HashMap<Digest, CachedRow>,
    pub report: LoadReport,
}

impl Cache {
    /// Open (creating if needed) the cache under `dir` and load every committed row;
    /// damaged segments are quarantined and their verified rows rewritten.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let root = dir.join(LAYOUT);
        let digests = root.join("digests");
        fs::create_dir_all(&digests).map_err(io_err(&digests))?;
        Self::load_from(root, Access::ReadWrite)
    }

    /// Open the cache under `dir` without writing anything: a missing cache is empty, a
    /// damaged segment is reported and skipped but left in place.
    pub fn open_read_only(dir: &Path) -> Result<Self, CacheError> {
        Self::load_from(dir.join(LAYOUT), Access::ReadOnly)
    }

    fn load_from(root: PathBuf, access: Access) -> Result<Self, CacheError> {
        let mut cache = Self {
            segments: SegmentDir::new(&root, "rows", access)?,
            root,
            rows: HashMap::new(),
            failures: HashMap::new(),
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

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The successful row with this key.
    pub fn get(&self, key: &Digest) -> Option<&CachedRow> {
        self.rows.get(key)
    }

    /// The latest recorded failure of this key, when no run has computed it since.
    pub fn failure(&self, key: &Digest) -> Option<&CachedRow> {
        self.failures.get(key)
    }

    /// Every successful row.
    pub fn rows(&self) -> impl Iterator<Item = &CachedRow> {
        self.rows.values()
    }

    fn load(&mut self) -> Result<(), CacheError> {
        for path in self.segments.list()? {
            let bytes = match read_file(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // compacted meanwhile
                Err(e) => {
                    self.segments
                        .distrust(&path, &e.to_string(), &mut self.report)?;
                    continue;
                }
            };
            let sound = intact(&path, &bytes);
            let rows = match decode_segment(bytes) {
                Ok(rows) => rows,
                Err(e) => {
                    self.segments
                        .distrust(&path, &e.to_string(), &mut self.report)?;
                    continue;
                }
            };
            self.report.segments += 1;
            let total = rows.len();
            let good: Vec<CachedRow> = rows.into_iter().filter_map(Result::ok).collect();
            let bad = total - good.len();
            if let Some(why) = damage(sound, bad, total, "rows") {
                self.report.corrupt_rows += bad;
                self.segments.distrust(&path, &why, &mut self.report)?;
                if self.segments.access == Access::ReadWrite && !good.is_empty() {
                    // Keep what verifies, in a fresh segment.
                    self.write_segment(&good)?;
                }
            }
            for r in good {
                self.insert(r);
            }
        }
        self.report.rows = self.rows.len();
        self.report.failures = self.failures.len();
        Ok(())
    }

    fn insert(&mut self, r: CachedRow) {
        if r.failed() {
            if self.rows.contains_key(&r.key) {
                return;
            }
            match self.failures.get(&r.key) {
                Some(old) if old.created_unix_ms >= r.created_unix_ms => {}
                _ => {
                    self.failures.insert(r.key, r);
                }
            }
        } else {
            self.failures.remove(&r.key);
            self.rows.entry(r.key).or_insert(r);
        }
    }

    /// Durably add rows (successes and failures): one new segment, written then renamed.
    pub fn commit(&mut self, rows: Vec<CachedRow>) -> Result<(), CacheError> {
        self.segments.writable()?;
        if rows.is_empty() {
            return Ok(());
        }
        self.write_segment(&rows)?;
        for r in rows {
            self.insert(r);
        }
        Ok(())
    }

    fn write_segment(&self, rows: &[CachedRow]) -> Result<PathBuf, CacheError> {
        let batch = encode_segment(rows).map_err(|e| CacheError::Segment {
            path: self.segments.dir.clone(),
            message: e.to_string(),
        })?;
        self.segments.write(&batch)
    }

    /// Merge all segments into one when there are many. Another run compacting at the same
    /// time is kept out by a lock; a run merely reading sees either the old or new files.
    pub fn compact_if_needed(&mut self) -> Result<bool, CacheError> {
        self.segments.writable()?;
        if self.segments.list()?.len() <= COMPACT_AFTER_SEGMENTS {
            return Ok(false);
        }
        let Some(_lock) = self.segments.lock(false)? else {
            return Ok(false);
        };
        self.rewrite(&|_| true)?;
        Ok(true)
    }

    /// Replace every fully readable segment by one holding the rows `keep` accepts (the
    /// latest failure of a key without a success included). Damaged or vanished segments
    /// are left for `load` to deal with.
    fn rewrite(&self, keep: &dyn Fn(&Digest) -> bool) -> Result<(), CacheError> {
        let mut merged: HashMap<Digest, CachedRow> = HashMap::new();
        let mut failed: HashMap<Digest, CachedRow> = HashMap::new();
        let mut merged_paths = Vec::new();
        for p in &self.segments.list()? {
            if let Ok(bytes) = read_file(p)
                && intact(p, &bytes)
                && let Ok(rows) = decode_segment(bytes)
                && rows.iter().all(Result::is_ok)
            {
                for r in rows.into_iter().flatten() {
                    if r.failed() {
                        match failed.get(&r.key) {
                            Some(old) if old.created_unix_ms >= r.created_unix_ms => {}
                            _ => {
                                failed.insert(r.key, r);
                            }
                        }
                    } else {
                        merged.entry(r.key).or_insert(r);
                    }
                }
                merged_paths.push(p.clone());
            }
        }
        failed.retain(|k, _| !merged.contains_key(k));
        let mut rows: Vec<CachedRow> = merged
            .into_values()
            .chain(failed.into_values())
            .filter(|r| keep(&r.key))
            .collect();
        rows.sort_by_key(|r| r.key);
        if !rows.is_empty() {
            self.write_segment(&rows)?;
        }
        for p in &merged_paths {
            let _ = fs::remove_file(p);
        }
        Ok(())
    }

    /// What the cache folder holds.
    pub fn status(&self, cache_dir: &Path) -> CacheStatus {
        let siblings = Siblings::of(cache_dir);
        let (segment_bytes, _) = tree_size(&self.segments.dir);
        let (quarantine_bytes, quarantine_files) = tree_size(&self.segments.quarantine);
        CacheStatus {
            root: self.root.clone(),
            segments: self.report.segments,
            segment_bytes,
            rows: self.rows.len(),
            failures: self.failures.len(),
            quarantine_files,
            quarantine_bytes,
            temp_files: self.segments.temp_files(),
            other_layouts: siblings.older,
            unknown_folders: siblings.unknown,
        }
    }

    /// Keep only the rows whose key `needed` holds: one new segment replaces the old ones;
    /// quarantined segments, stale temporary files and folders of older layouts are removed.
    /// With `dry_run`, count what would go and change nothing.
    pub fn gc(
        &mut self,
        cache_dir: &Path,
        needed: &HashSet<Digest>,
        dry_run: bool,
    ) -> Result<GcReport, CacheError> {
        let before = self.status(cache_dir);
        let keep_rows = self.rows.keys().filter(|k| needed.contains(k)).count();
        let keep_failures = self.failures.keys().filter(|k| needed.contains(k)).count();
        let mut report = GcReport {
            dry_run,
            rows_kept: keep_rows,
            rows_removed: self.rows.len() - keep_rows,
            failures_kept: keep_failures,
            failures_removed: self.failures.len() - keep_failures,
            segments_before: before.segments,
            bytes_before: before.segment_bytes,
            bytes_after: before.segment_bytes,
            quarantine_files_removed: before.quarantine_files,
            layouts_removed: before
                .other_layouts
                .iter()
                .map(|(n, _)| n.clone())
                .collect(),
            folders_kept: before
                .unknown_folders
                .iter()
                .map(|(n, _)| n.clone())
                .collect(),
            artifacts_removed: 0,
        };
        if dry_run {
            return Ok(report);
        }
        self.segments.writable()?;
        let _lock = self.segments.lock(true)?;
        self.rewrite(&|k| needed.contains(k))?;
        let q = &self.segments.quarantine;
        if q.is_dir() {
            fs::remove_dir_all(q).map_err(io_err(q))?;
            fs::create_dir_all(q).map_err(io_err(q))?;
        }
        for (name, _) in &before.other_layouts {
            let p = cache_dir.join(name);
            fs::remove_dir_all(&p).map_err(io_err(&p))?;
        }
        self.rows.retain(|k, _| needed.contains(k));
        self.failures.retain(|k, _| needed.contains(k));
        report.bytes_after = tree_size(&self.segments.dir).0;
        Ok(report)
    }
}

/// What the cache holds for one row of a cell.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    /// A computed row that fits the cell's context.
    Hit(&'a CachedRow),
    /// A computed row whose prompt does not fit the cell's context (it was computed with a
    /// larger `n_ctx`): under this cell's context the row overflows.
    TooLong {
        prompt_tokens: u32,
        limit: u32,
    },
    /// The last attempt failed, and no success is recorded.
    Failed(&'a CachedRow),
    Miss,
}

impl Cache {
    /// The row `key` as a cell sees it whose prompts may have at most `prompt_limit` tokens
    /// (`None`: any). A row's numbers do not depend on `n_ctx` once it fits (measured:
    /// README, "What n_ctx changes"), so a row computed under one context serves every cell
    /// whose context it fits, and only those.
    pub fn lookup(&self, key: &Digest, prompt_limit: Option<u32>) -> Lookup<'_> {
        if let Some(r) = self.get(key) {
            return match prompt_limit {
                Some(limit) if r.prompt_tokens > limit => Lookup::TooLong {
                    prompt_tokens: r.prompt_tokens,
                    limit,
                },
                _ => Lookup::Hit(r),
            };
        }
        match self.failure(key) {
            Some(r) => Lookup::Failed(r),
            None => Lookup::Miss,
        }
    }
}

/// `pipeline cache status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheStatus {
    pub root: PathBuf,
    pub segments: usize,
    pub segment_bytes: u64,
    pub rows: usize,
    pub failures: usize,
    pub quarantine_files: usize,
    pub quarantine_bytes: u64,
    pub temp_files: usize,
    /// Folders of older cache layouts beside this one (no version of `pipeline` reads
    /// them once it moved on), with their size: `cache gc` removes them.
    pub other_layouts: Vec<(String, u64)>,
    /// Other folders beside this layout: newer layouts (a later version of `pipeline`
    /// wrote them) and anything this version does not know. Listed, never removed.
    pub unknown_folders: Vec<(String, u64)>,
}

/// `pipeline cache gc`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub rows_kept: usize,
    pub rows_removed: usize,
    pub failures_kept: usize,
    pub failures_removed: usize,
    pub segments_before: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub quarantine_files_removed: usize,
    pub layouts_removed: Vec<String>,
    /// Folders beside the layout that gc leaves alone (newer layouts, unknown folders).
    pub folders_kept: Vec<String>,
    /// Stored stage outputs (embeddings, neighbours, fits) no listed spec needs.
    pub artifacts_removed: usize,
}

/// The folders beside this layout in a cache folder.
struct Siblings {
    /// Layouts older than this one (`v1` beside `v2`): nothing reads them any more.
    older: Vec<(String, u64)>,
    /// Newer layouts and folders this version does not know.
    unknown: Vec<(String, u64)>,
}

impl Siblings {
    fn of(cache_dir: &Path) -> Self {
        let mut s = Siblings {
            older: Vec::new(),
            unknown: Vec::new(),
        };
        let Ok(entries) = fs::read_dir(cache_dir) else {
            return s;
        };
        let current = layout_version(LAYOUT).expect("LAYOUT is `v<number>`");
        for e in entries.flatten() {
            // A link is never followed: gc removes only real folders it knows.
            let Ok(kind) = e.file_type() else { continue };
            if !kind.is_dir() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name == LAYOUT {
                continue;
            }
            let size = tree_size(&e.path()).0;
            match layout_version(&name) {
                Some(v) if v < current => s.older.push((name, size)),
                _ => s.unknown.push((name, size)),
            }
        }
        s.older.sort();
        s.unknown.sort();
        s
    }
}

/// The version of a layout folder name: `v2` is 2; anything else (`v02`, `v`, `rows`) none.
fn layout_version(name: &str) -> Option<u32> {
    let digits = name.strip_prefix('v')?;
    if digits.is_empty() || digits.starts_with('0') || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
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
        Field::new("error_kind", DataType::Utf8, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("checksum", DataType::Utf8, false),
        added_later(Field::new("host", DataType::Utf8, true)),
        added_later(Field::new("shard", DataType::Utf8, true)),
    ]);
    Arc::new(Schema::new(fields))
}

fn encode_segment(rows: &[CachedRow]) -> Result<RecordBatch, TableError> {
    let strs = |f: &dyn Fn(&CachedRow) -> String| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let opt_strs = |f: &dyn Fn(&CachedRow) -> Option<String>| -> ArrayRef {
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
        strs(&|r| r.kind.as_str().to_string()),
        opt_strs(&|r| r.text.clone()),
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
        opt_strs(&|r| r.error.as_ref().map(|e| e.kind.as_str().to_string())),
        opt_strs(&|r| r.error.as_ref().map(|e| e.message.clone())),
        strs(&|r| r.checksum().hex()),
        opt_strs(&|r| r.host.clone()),
        opt_strs(&|r| r.shard.clone()),
    ]);
    RecordBatch::try_new(schema(), cols).map_err(TableError::from)
}

/// Read a segment. The outer error means the file is unreadable as a whole; each row is
/// `Err` when it fails verification.
pub fn read_segment(path: &Path) -> std::io::Result<Vec<Result<CachedRow, TableError>>> {
    decode_segment(read_file(path)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Decode a segment's bytes; `Err` when the file as a whole cannot be trusted. Never
/// panics, whatever the bytes.
pub fn decode_segment(
    bytes: bytes::Bytes,
) -> Result<Vec<Result<CachedRow, TableError>>, TableError> {
    Ok(read_batches(bytes, &schema())?
        .iter()
        .flat_map(decode_batch)
        .collect())
}

/// The rows of a batch whose schema [`read_batches`] checked.
fn decode_batch(b: &RecordBatch) -> Vec<Result<CachedRow, TableError>> {
    let col = |name: &str| b.column_by_name(name).expect("schema checked");
    let s = |name: &str| col(name).as_string::<i32>().clone();
    let u = |name: &str| col(name).as_primitive::<UInt32Type>().clone();
    let f = |name: &str| col(name).as_primitive::<Float64Type>().clone();
    let key = s("key");
    let comps: Vec<StringArray> = Components::NAMES.iter().map(|n| s(n)).collect();
    let (row_id, cell_id, kind, text, finish, checksum) = (
        s("row_id"),
        s("cell_id"),
        s("kind"),
        s("text"),
        s("finish"),
        s("checksum"),
    );
    let (error_kind, error) = (s("error_kind"), s("error"));
    // Absent in segments written before they were recorded.
    let optional = |name: &str| b.column_by_name(name).map(|c| c.as_string::<i32>().clone());
    let (host, shard) = (optional("host"), optional("shard"));
    let (pt, et, gt, shared) = (
        u("prompt_tokens"),
        u("evaluated_tokens"),
        u("gen_tokens"),
        u("shared_by"),
    );
    let (prefill, decode) = (f("prefill_ms"), f("decode_ms"));
    let created = col("created_unix_ms").as_primitive::<Int64Type>().clone();
    let lp = col("logprobs").as_list::<i32>().clone();
    let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
    (0..b.num_rows())
        .map(|i| {
            let d = |a: &StringArray| Digest::from_hex(a.value(i)).ok_or("bad digest");
            let mut parts = [Digest([0; 32]); 6];
            for (p, a) in parts.iter_mut().zip(&comps) {
                *p = d(a)?;
            }
            let error = match (opt(&error_kind, i), opt(&error, i)) {
                (Some(kind), Some(message)) => Some(RowError {
                    kind: kind.parse().map_err(|_| "bad error kind")?,
                    message,
                }),
                (None, None) => None,
                _ => return Err("error kind without message".into()),
            };
            let row = CachedRow {
                key: d(&key)?,
                components: Components::from_parts(parts),
                row_id: row_id.value(i).to_string(),
                cell_id: cell_id.value(i).to_string(),
                kind: kind.value(i).parse().map_err(|_| "bad task kind")?,
                text: opt(&text, i),
                logprobs: (!lp.is_null(i))
                    .then(|| lp.value(i).as_primitive::<Float64Type>().values().to_vec()),
                prompt_tokens: pt.value(i),
                evaluated_tokens: et.value(i),
                gen_tokens: gt.value(i),
                finish: finish.value(i).parse().map_err(|_| "bad finish")?,
                prefill_ms: prefill.value(i),
                shared_by: shared.value(i),
                decode_ms: decode.value(i),
                created_unix_ms: created.value(i),
                error,
                host: host.as_ref().and_then(|a| opt(a, i)),
                shard: shard.as_ref().and_then(|a| opt(a, i)),
            };
            if row.checksum().hex() != checksum.value(i) {
                return Err("checksum mismatch".into());
            }
            if row.components.row_key() != row.key {
                return Err("key does not match its components".into());
            }
            if row.failed() != (row.finish == Finish::Failed) {
                return Err("failed row without an error".into());
            }
            Ok(row)
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn only_a_plain_v_number_is_a_layout_version() {
        assert_eq!(layout_version("v1"), Some(1));
        assert_eq!(layout_version("v10"), Some(10));
        for other in ["v", "v02", "v1a", "rows", "V1", "v-1", "v99999999999"] {
            assert_eq!(layout_version(other), None, "{other}");
        }
    }

    pub(crate) fn row(n: u8) -> CachedRow {
        let d = |s: &str| KeyEncoder::new(s).u64("n", n.into()).finish();
        let components = Components::from_parts([d("m"), d("p"), d("me"), d("s"), d("se"), d("e")]);
        CachedRow {
            key: components.row_key(),
            components,
            row_id: format!("row{n}"),
            cell_id: "cell".into(),
            kind: crate::row::TaskKind::Generate,
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
            error: None,
            host: (!n.is_multiple_of(3)).then(|| "node-1".to_string()),
            shard: (n % 3 == 2).then(|| "1/4".to_string()),
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
        let seg = c.segments.list().unwrap().pop().unwrap();
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
        let batch = encode_segment(&rows).unwrap();
        let mut bad = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut bad, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let needle = b"positive 1";
        let at = bad.windows(needle.len()).position(|w| w == needle).unwrap();
        bad[at] = b'P';
        let path = c.segments.dir.join("seg-tampered.parquet");
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
    fn segments_written_before_host_and_shard_were_recorded_still_verify() {
        // An older writer: the same rows (without origin), the same columns less the two
        // added later, their checksums as that writer computed them.
        let rows: Vec<CachedRow> = (0..4)
            .map(|n| CachedRow {
                host: None,
                shard: None,
                ..row(n)
            })
            .collect();
        let batch = encode_segment(&rows).unwrap();
        let keep: Vec<usize> = (0..batch.num_columns())
            .filter(|&i| !["host", "shard"].contains(&batch.schema().field(i).name().as_str()))
            .collect();
        let old = batch.project(&keep).unwrap();
        let mut bytes = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut bytes, old.schema(), None).unwrap();
        w.write(&old).unwrap();
        w.close().unwrap();
        let read: Vec<CachedRow> = decode_segment(bytes.into())
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(read, rows);
        // And a row that records its origin covers it in its checksum.
        let mut moved = row(2);
        assert_eq!(moved.shard.as_deref(), Some("1/4"));
        let sum = moved.checksum();
        moved.shard = Some("2/4".into());
        assert_ne!(moved.checksum(), sum);
    }

    #[test]
    fn compaction_merges_segments_without_losing_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path()).unwrap();
        for n in 0..(COMPACT_AFTER_SEGMENTS as u8 + 3) {
            c.commit(vec![row(n)]).unwrap();
        }
        assert!(c.compact_if_needed().unwrap());
        assert_eq!(c.segments.list().unwrap().len(), 1);
        let c2 = Cache::open(dir.path()).unwrap();
        assert_eq!(c2.len(), COMPACT_AFTER_SEGMENTS + 3);
    }
}
