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

use crate::fs::tree_size;
use crate::key::{Components, Digest, DigestMap, KeyEncoder};
use crate::row::{Finish, RowError};
use crate::segments::{Access, SegmentDir, damage, intact, io_err, read_file, sealed};
pub use crate::segments::{CacheError, LoadReport};
use crate::table::TableError;

mod index;
mod segment;

pub use index::KeySet;
use index::SortedIndex;

use segment::{Columns, IndexRow, encode_segment};
pub use segment::{RowContent, RowIdentity, decode_segment, read_segment};

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
    /// Pooled hidden states (hidden-state rows only).
    pub hidden: Option<Vec<f32>>,
    /// Each label's number of tokens (log-likelihood rows computed since it was recorded).
    pub choice_tokens: Option<Vec<u32>>,
    /// The prompt's leading tokens that every row of its template shares (rows computed
    /// since it was recorded): what a row's own compute leaves out (issue #31).
    pub prefix_tokens: Option<u32>,
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

/// Hidden states as the cache stores them (half precision): a row holds these values from
/// the moment it is computed, so it reads the same before and after it is committed.
pub fn stored_hidden(v: Vec<f32>) -> Vec<f32> {
    v.into_iter()
        .map(|x| half::f16::from_f32(x).to_f32())
        .collect()
}

impl CachedRow {
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// What metrics read of it.
    pub fn content(&self) -> RowContent {
        RowContent {
            text: self.text.as_deref().map(Into::into),
            logprobs: self.logprobs.clone(),
            hidden: self.hidden.as_deref().map(Into::into),
            choice_tokens: self.choice_tokens.clone(),
            prefix_tokens: self.prefix_tokens,
            prompt_tokens: self.prompt_tokens,
            evaluated_tokens: self.evaluated_tokens,
            gen_tokens: self.gen_tokens,
            finish: self.finish,
            prefill_ms: self.prefill_ms,
            shared_by: self.shared_by,
            decode_ms: self.decode_ms,
            host: self.host.as_deref().map(Into::into),
            shard: self.shard.as_deref().map(Into::into),
        }
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
        if let Some(h) = &self.hidden {
            e.u64("hidden", h.len() as u64);
            for v in h {
                e.bytes("h", &v.to_bits().to_le_bytes());
            }
        }
        if let Some(t) = &self.choice_tokens {
            e.u64("choice_tokens", t.len() as u64);
            for v in t {
                e.u64("t", u64::from(*v));
            }
        }
        if let Some(p) = self.prefix_tokens {
            e.u64("prefix_tokens", p.into());
        }
        e.finish()
    }
}

/// Where a row is: a position in an indexed segment, or (read-only, from a damaged segment
/// left in place) held in memory after it verified on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Segment { segment: u32, row: u32 },
    Held(u32),
}

/// What the index knows of a successful row without reading it.
#[derive(Debug, Clone, Copy)]
struct Hit {
    place: Place,
    prompt_tokens: u32,
}

/// The latest failure of a key that has no successful row.
#[derive(Debug, Clone)]
struct Failed {
    place: Place,
    created_unix_ms: i64,
    error: RowError,
}

/// The row cache. Opening it reads only the index columns of each segment (key, prompt
/// length, time, error) after checking the segment's bytes against the digest in its name,
/// so a plan over a million cached rows holds a few dozen bytes per row. What a row holds
/// is read when asked for, by projection and row selection ([`Cache::content`]).
pub struct Cache {
    root: PathBuf,
    segments: SegmentDir,
    /// The indexed segments; [`Place::Segment`] numbers them.
    files: Vec<PathBuf>,
    /// Verified rows of damaged segments that a read-only open leaves in place.
    held: Vec<CachedRow>,
    hits: HitIndex,
    /// Successful rows met while loading, in the order met (the first of a key wins).
    loading: Vec<(Digest, Hit)>,
    loading_now: bool,
    /// Read every segment whole and verify each row, not only the segment's digest.
    verify_every_row: bool,
    /// When set, only these keys are indexed (a read-only open for one plan).
    only: Option<KeySet>,
    failures: DigestMap<Failed>,
    pub report: LoadReport,
}

impl Cache {
    /// Open (creating if needed) the cache under `dir` and index every committed row;
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

    /// [`Cache::open`], reading every segment whole and checking every row's checksum
    /// (`cache verify`): damaged segments are quarantined and their verified rows rewritten.
    pub fn open_verifying(dir: &Path) -> Result<Self, CacheError> {
        let root = dir.join(LAYOUT);
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        let mut cache = Self::empty(root, Access::ReadWrite)?;
        cache.verify_every_row = true;
        cache.load()?;
        cache.verify_every_row = false;
        Ok(cache)
    }

    /// [`Cache::open_read_only`], indexing only the rows `keys` names (and their failures):
    /// what a plan or report over a cache shared by many studies holds is its own rows.
    pub fn open_read_only_for(dir: &Path, keys: KeySet) -> Result<Self, CacheError> {
        let mut cache = Self::empty(dir.join(LAYOUT), Access::ReadOnly)?;
        cache.only = Some(keys);
        cache.load()?;
        cache.only = None;
        Ok(cache)
    }

    /// How many rows the cache's segments hold, by their footers alone (duplicates and
    /// damaged segments included): what opening it would cost, known before it is opened.
    pub fn stored_rows(dir: &Path) -> Result<u64, CacheError> {
        let segments = SegmentDir::new(&dir.join(LAYOUT), "rows", Access::ReadOnly)?;
        Ok(segments
            .list()?
            .iter()
            .filter_map(|p| segment::row_count(p).ok())
            .sum())
    }

    fn load_from(root: PathBuf, access: Access) -> Result<Self, CacheError> {
        let mut cache = Self::empty(root, access)?;
        cache.load()?;
        Ok(cache)
    }

    fn empty(root: PathBuf, access: Access) -> Result<Self, CacheError> {
        Ok(Self {
            segments: SegmentDir::new(&root, "rows", access)?,
            root,
            files: Vec::new(),
            held: Vec::new(),
            hits: HitIndex::default(),
            loading: Vec::new(),
            loading_now: false,
            verify_every_row: false,
            only: None,
            failures: DigestMap::default(),
            report: LoadReport::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn digest_dir(&self) -> PathBuf {
        self.root.join("digests")
    }

    /// Successful rows.
    pub fn len(&self) -> usize {
        self.hits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hits.is_empty()
    }

    /// Whether a successful row with this key is cached.
    pub fn contains(&self, key: &Digest) -> bool {
        self.hits.get(key).is_some()
    }

    /// The latest recorded failure of this key, when no run has computed it since.
    pub fn failure(&self, key: &Digest) -> Option<&RowError> {
        self.failures.get(key).map(|f| &f.error)
    }

    /// The keys of every successful row.
    pub fn keys(&self) -> impl Iterator<Item = &Digest> {
        self.hits.iter().map(|(k, _)| k)
    }

    fn load(&mut self) -> Result<(), CacheError> {
        self.loading_now = true;
        let loaded = self.load_segments();
        self.loading_now = false;
        self.hits = HitIndex::new(std::mem::take(&mut self.loading));
        // A success wins over any failure of its key, whichever came first.
        let hits = &self.hits;
        self.failures.retain(|k, _| hits.get(k).is_none());
        self.report.rows = self.hits.len();
        self.report.failures = self.failures.len();
        loaded
    }

    fn load_segments(&mut self) -> Result<(), CacheError> {
        for path in self.segments.list()? {
            if self.verify_every_row {
                self.verify_rows(&path)?;
                continue;
            }
            match self.index_segment(&path) {
                Ok(()) => {}
                Err(Unread::Vanished) => {} // compacted meanwhile by another run
                Err(Unread::Unreadable(why)) => {
                    self.segments.distrust(&path, &why, &mut self.report)?
                }
                Err(Unread::Unsealed) => self.verify_rows(&path)?,
            }
        }
        Ok(())
    }

    /// Index one segment whose bytes match its name's digest, by its index columns alone.
    fn index_segment(&mut self, path: &Path) -> Result<(), Unread> {
        match sealed(path) {
            Ok(Some(true)) => {}
            Ok(_) => return Err(Unread::Unsealed),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Unread::Vanished),
            Err(e) => return Err(Unread::Unreadable(e.to_string())),
        }
        // Rows a filtered open does not want are dropped batch by batch, so that reading a
        // large shared cache holds this plan's entries, not the cache's.
        let only = self.only.as_ref();
        let mut rows: Vec<(u32, IndexRow)> = Vec::new();
        let mut at = 0u32;
        let read = segment::read_columns(path, Columns::Index, None, &mut |b| {
            for r in segment::index_rows(b)? {
                if only.is_none_or(|keys| keys.contains(&r.key)) {
                    rows.push((at, r));
                }
                at += 1;
            }
            Ok(())
        });
        match read {
            Ok(()) => {}
            Err(TableError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Unread::Vanished);
            }
            // Values out of their domain in a file whose bytes are as written: verified
            // row by row, like any damaged file.
            Err(TableError::Invalid(_)) => return Err(Unread::Unsealed),
            Err(e) => return Err(Unread::Unreadable(e.to_string())),
        }
        let segment = self.files.len() as u32;
        self.files.push(path.to_path_buf());
        self.report.segments += 1;
        for (row, r) in rows {
            self.insert(r, Place::Segment { segment, row });
        }
        Ok(())
    }

    /// A segment whose name carries no digest (written before names did) or whose bytes do
    /// not match it: read whole, every row verified against its checksum. A sound one is
    /// indexed in place; a damaged one is distrusted and its verified rows rewritten
    /// (read-write) or held (read-only).
    fn verify_rows(&mut self, path: &Path) -> Result<(), CacheError> {
        let bytes = match read_file(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return self
                    .segments
                    .distrust(path, &e.to_string(), &mut self.report);
            }
        };
        let sound = intact(path, &bytes);
        let rows = match decode_segment(bytes) {
            Ok(rows) => rows,
            Err(e) => {
                return self
                    .segments
                    .distrust(path, &e.to_string(), &mut self.report);
            }
        };
        self.report.segments += 1;
        let total = rows.len();
        let bad = rows.iter().filter(|r| r.is_err()).count();
        let Some(why) = damage(sound, bad, total, "rows") else {
            let segment = self.files.len() as u32;
            self.files.push(path.to_path_buf());
            for (row, r) in rows.into_iter().flatten().enumerate() {
                let place = Place::Segment {
                    segment,
                    row: row as u32,
                };
                self.insert(IndexRow::of(&r), place);
            }
            return Ok(());
        };
        let good: Vec<CachedRow> = rows.into_iter().filter_map(Result::ok).collect();
        self.report.corrupt_rows += bad;
        self.segments.distrust(path, &why, &mut self.report)?;
        if good.is_empty() {
            return Ok(());
        }
        if self.segments.access == Access::ReadWrite {
            // Keep what verifies, in a fresh segment.
            self.commit(good)?;
        } else {
            for r in good {
                let place = Place::Held(self.held.len() as u32);
                self.insert(IndexRow::of(&r), place);
                self.held.push(r);
            }
        }
        Ok(())
    }

    fn insert(&mut self, r: IndexRow, place: Place) {
        if self
            .only
            .as_ref()
            .is_some_and(|only| !only.contains(&r.key))
        {
            return;
        }
        match r.error {
            Some(error) => {
                if self.hits.get(&r.key).is_some() {
                    return;
                }
                match self.failures.get(&r.key) {
                    Some(old) if old.created_unix_ms >= r.created_unix_ms => {}
                    _ => {
                        self.failures.insert(
                            r.key,
                            Failed {
                                place,
                                created_unix_ms: r.created_unix_ms,
                                error,
                            },
                        );
                    }
                }
            }
            None => {
                self.failures.remove(&r.key);
                let hit = Hit {
                    place,
                    prompt_tokens: r.prompt_tokens,
                };
                if self.loading_now {
                    self.loading.push((r.key, hit));
                } else {
                    self.hits.add(r.key, hit);
                }
            }
        }
    }

    /// Durably add rows (successes and failures): one new segment, written then renamed.
    pub fn commit(&mut self, rows: Vec<CachedRow>) -> Result<(), CacheError> {
        self.segments.writable()?;
        if rows.is_empty() {
            return Ok(());
        }
        let path = self.write_segment(&rows)?;
        let segment = self.files.len() as u32;
        self.files.push(path);
        self.report.segments += 1;
        for (row, r) in rows.iter().enumerate() {
            let place = Place::Segment {
                segment,
                row: row as u32,
            };
            self.insert(IndexRow::of(r), place);
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

    /// Replace the indexed segments by one holding the rows `keep` accepts (the latest
    /// failure of a key without a success included), streamed a batch at a time: each row
    /// read whole and verified, then written, so a rewrite holds one batch, never the cache.
    /// Segments that vanished meanwhile are left to the run that removed them; the cache is
    /// indexed again afterwards.
    fn rewrite(&mut self, keep: &dyn Fn(&Digest) -> bool) -> Result<(), CacheError> {
        let wanted = self.places(keep);
        let mut writer = self.segments.writer(segment::schema())?;
        let mut merged = Vec::new();
        for (s, path) in self.files.iter().enumerate() {
            let rows = wanted
                .get(&(s as u32))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let read = segment::read_columns(path, Columns::All, Some(rows), &mut |b| {
                let verified = segment::decode_batch(b)
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()?;
                let batch = encode_segment(&verified)?;
                writer
                    .write(&batch)
                    .map_err(|e| TableError::Invalid(e.to_string()))
            });
            match read {
                Ok(()) => {}
                Err(TableError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // The new segment is dropped unfinished: nothing changes.
                Err(e) => {
                    return Err(CacheError::Segment {
                        path: path.clone(),
                        message: e.to_string(),
                    });
                }
            }
            merged.push(path.clone());
        }
        let held: Vec<CachedRow> = self.held.iter().filter(|r| keep(&r.key)).cloned().collect();
        if !held.is_empty() {
            let batch = encode_segment(&held).map_err(|e| CacheError::Segment {
                path: self.segments.dir.clone(),
                message: e.to_string(),
            })?;
            writer.write(&batch)?;
        }
        writer.finish()?;
        for p in &merged {
            let _ = fs::remove_file(p);
        }
        self.reload()
    }

    /// The rows `keep` accepts, by segment: each key once, at the place the index chose
    /// (sorted positions).
    fn places(&self, keep: &dyn Fn(&Digest) -> bool) -> HashMap<u32, Vec<u32>> {
        let mut out: HashMap<u32, Vec<u32>> = HashMap::new();
        let placed = self
            .hits
            .iter()
            .map(|(k, h)| (k, h.place))
            .chain(self.failures.iter().map(|(k, f)| (k, f.place)));
        for (k, place) in placed {
            if let Place::Segment { segment, row } = place
                && keep(k)
            {
                out.entry(segment).or_default().push(row);
            }
        }
        for rows in out.values_mut() {
            rows.sort_unstable();
        }
        out
    }

    fn reload(&mut self) -> Result<(), CacheError> {
        self.files.clear();
        self.held.clear();
        self.hits = HitIndex::default();
        self.failures.clear();
        self.report = LoadReport::default();
        self.load()
    }

    /// What the successful rows of `items` hold (each item's key by `key_of`), read by
    /// projection and row selection a batch at a time, each row once however many items
    /// name it; `visit` is called for every item that is cached, with its position in
    /// `items`, in no particular order. Memory stays that of one batch and eight bytes an
    /// item, whatever the size of the segments.
    pub fn content<T>(
        &self,
        items: &[T],
        key_of: impl Fn(&T) -> Digest,
        visit: &mut dyn FnMut(usize, &RowContent),
    ) -> Result<(), CacheError> {
        // (row, position in `items`) by segment.
        let mut by_segment: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
        for (at, item) in items.iter().enumerate() {
            let k = &key_of(item);
            let Some(hit) = self.hits.get(k) else {
                continue;
            };
            match hit.place {
                Place::Held(i) => visit(at, &self.held[i as usize].content()),
                Place::Segment { segment, row } => by_segment
                    .entry(segment)
                    .or_default()
                    .push((row, at as u32)),
            }
        }
        let mut segments: Vec<_> = by_segment.into_iter().collect();
        segments.sort_unstable_by_key(|(s, _)| *s);
        let mut names = segment::Names::default();
        for (s, mut wanted) in segments {
            wanted.sort_unstable();
            let mut rows: Vec<u32> = wanted.iter().map(|(r, _)| *r).collect();
            rows.dedup();
            let path = &self.files[s as usize];
            let mut next = wanted.iter().peekable();
            let mut selected = rows.iter().copied();
            segment::read_columns(path, Columns::Content, Some(&rows), &mut |b| {
                let contents = segment::content_rows(b, &mut names)?;
                for ((key, content), row) in contents.iter().zip(selected.by_ref()) {
                    let mut named = false;
                    while let Some(&&(r, at)) = next.peek() {
                        if r != row {
                            break;
                        }
                        next.next();
                        if key_of(&items[at as usize]) != *key {
                            return Err("the segment does not hold the rows its index names".into());
                        }
                        visit(at as usize, content);
                        named = true;
                    }
                    if !named {
                        return Err("the segment gave more rows than were selected".into());
                    }
                }
                Ok(())
            })
            .map_err(|e| match e {
                TableError::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    CacheError::Vanished { path: path.clone() }
                }
                e => CacheError::Segment {
                    path: path.clone(),
                    message: e.to_string(),
                },
            })?;
        }
        Ok(())
    }

    /// The content of successful rows `keys`, held in memory: for the bounded sets of rows a
    /// fit, a cascade or a served answer reads.
    pub fn rows(&self, keys: impl IntoIterator<Item = Digest>) -> Result<Rows<'_>, CacheError> {
        let keys: Vec<Digest> = keys.into_iter().collect();
        let mut content = DigestMap::default();
        self.content(&keys, |k| *k, &mut |at, c| {
            content.entry(keys[at]).or_insert_with(|| c.clone());
        })?;
        Ok(Rows {
            cache: self,
            content,
        })
    }

    /// Which computation made each successful row of the cache, indexed or not (its dataset
    /// row and key components), read by projection a batch at a time; a row stored twice is
    /// given twice.
    pub fn identities(&self, visit: &mut dyn FnMut(RowIdentity)) -> Result<(), CacheError> {
        for r in self.held.iter().filter(|r| !r.failed()) {
            visit(RowIdentity {
                key: r.key,
                row_id: r.row_id.clone(),
                components: r.components,
            });
        }
        for path in &self.files {
            segment::read_columns(path, Columns::Identity, None, &mut |b| {
                for id in segment::identity_rows(b)? {
                    visit(id);
                }
                Ok(())
            })
            .map_err(|e| CacheError::Segment {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Every row `keep` accepts (successes, and the latest failure of keys without one),
    /// read whole and verified, given to `visit` a batch at a time: for copying rows into
    /// another cache.
    pub fn whole_rows(
        &self,
        keep: &dyn Fn(&Digest) -> bool,
        visit: &mut dyn FnMut(Vec<CachedRow>) -> Result<(), CacheError>,
    ) -> Result<(), CacheError> {
        let held: Vec<CachedRow> = self
            .held
            .iter()
            .enumerate()
            .filter(|(i, r)| keep(&r.key) && self.place(&r.key) == Some(Place::Held(*i as u32)))
            .map(|(_, r)| r.clone())
            .collect();
        if !held.is_empty() {
            visit(held)?;
        }
        let wanted = self.places(keep);
        for (s, path) in self.files.iter().enumerate() {
            let Some(rows) = wanted.get(&(s as u32)) else {
                continue;
            };
            let mut failed = None;
            segment::read_columns(path, Columns::All, Some(rows), &mut |b| {
                let verified = segment::decode_batch(b)
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()?;
                visit(verified).map_err(|e| {
                    let why = TableError::Invalid(e.to_string());
                    failed = Some(e);
                    why
                })
            })
            .map_err(|e| {
                failed.take().unwrap_or_else(|| CacheError::Segment {
                    path: path.clone(),
                    message: e.to_string(),
                })
            })?;
        }
        Ok(())
    }

    /// Where the row the index chose for `key` is (its success, else its latest failure).
    fn place(&self, key: &Digest) -> Option<Place> {
        self.hits
            .get(key)
            .map(|h| h.place)
            .or_else(|| self.failures.get(key).map(|f| f.place))
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
            rows: self.hits.len(),
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
        let keep_rows = self.keys().filter(|k| needed.contains(k)).count();
        let keep_failures = self.failures.keys().filter(|k| needed.contains(k)).count();
        let mut report = GcReport {
            dry_run,
            rows_kept: keep_rows,
            rows_removed: self.hits.len() - keep_rows,
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
        report.bytes_after = tree_size(&self.segments.dir).0;
        Ok(report)
    }
}

/// The successful rows' index.
type HitIndex = SortedIndex<Hit>;

/// Why a segment was not indexed from its index columns.
enum Unread {
    /// Removed between listing and reading (compacted by another run).
    Vanished,
    /// It cannot be read at all.
    Unreadable(String),
    /// Its bytes cannot be vouched for by its name: it is read whole, row by row.
    Unsealed,
}

impl IndexRow {
    fn of(r: &CachedRow) -> Self {
        IndexRow {
            key: r.key,
            prompt_tokens: r.prompt_tokens,
            created_unix_ms: r.created_unix_ms,
            error: r.error.clone(),
        }
    }
}

/// The content of a bounded set of rows read from a cache, with the cache's index for
/// lookups.
pub struct Rows<'a> {
    cache: &'a Cache,
    content: DigestMap<RowContent>,
}

impl<'a> Rows<'a> {
    /// The row `key` as a cell with prompts of at most `prompt_limit` tokens sees it.
    pub fn lookup(&self, key: &Digest, prompt_limit: Option<u32>) -> Lookup<'a> {
        self.cache.lookup(key, prompt_limit)
    }

    /// The content of `key`, if it was read.
    pub fn get(&self, key: &Digest) -> Option<&RowContent> {
        self.content.get(key)
    }

    /// Every row read, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Digest, &RowContent)> {
        self.content.iter()
    }

    /// The content of `key` when it is a hit for such a cell (and was read).
    pub fn hit(&self, key: &Digest, prompt_limit: Option<u32>) -> Option<&RowContent> {
        match self.lookup(key, prompt_limit) {
            Lookup::Hit => self.content.get(key),
            _ => None,
        }
    }
}

/// What the cache holds for one row of a cell.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    /// A computed row that fits the cell's context.
    Hit,
    /// A computed row whose prompt does not fit the cell's context (it was computed with a
    /// larger `n_ctx`): under this cell's context the row overflows.
    TooLong {
        prompt_tokens: u32,
        limit: u32,
    },
    /// The last attempt failed, and no success is recorded.
    Failed(&'a RowError),
    Miss,
}

impl Cache {
    /// The row `key` as a cell sees it whose prompts may have at most `prompt_limit` tokens
    /// (`None`: any). A row's numbers do not depend on `n_ctx` once it fits (measured:
    /// docs/book/caching.md, "What n_ctx changes"), so a row computed under one context serves every cell
    /// whose context it fits, and only those.
    pub fn lookup(&self, key: &Digest, prompt_limit: Option<u32>) -> Lookup<'_> {
        if let Some(h) = self.hits.get(key) {
            return match prompt_limit {
                Some(limit) if h.prompt_tokens > limit => Lookup::TooLong {
                    prompt_tokens: h.prompt_tokens,
                    limit,
                },
                _ => Lookup::Hit,
            };
        }
        match self.failures.get(key) {
            Some(f) => Lookup::Failed(&f.error),
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

    /// The content of one row, read back by projection.
    pub(crate) fn content(c: &Cache, key: &Digest) -> Option<RowContent> {
        c.rows([*key]).unwrap().get(key).cloned()
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
            hidden: n.is_multiple_of(3).then(|| vec![0.25, -1.0, f32::from(n)]),
            choice_tokens: n.is_multiple_of(2).then(|| vec![1, n.into()]),
            prefix_tokens: n.is_multiple_of(4).then_some(6),
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
            assert_eq!(content(&c2, &r.key), Some(r.content()));
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
        assert!(!c2.contains(&rows[1].key));
        rows.remove(1);
        for r in &rows {
            assert_eq!(content(&c2, &r.key), Some(r.content()));
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

    /// Row `n` of a larger set: `row(n % 256)` under a key of its own.
    fn numbered(n: u32) -> CachedRow {
        let mut r = row((n % 256) as u8);
        r.components.prompt = KeyEncoder::new("prompt").u64("n", n.into()).finish();
        r.key = r.components.row_key();
        r.text = Some(format!("answer {n}"));
        r
    }

    fn failed(n: u32) -> CachedRow {
        CachedRow {
            text: None,
            logprobs: None,
            hidden: None,
            choice_tokens: None,
            finish: Finish::Failed,
            error: Some(RowError {
                kind: crate::row::FailureKind::Decode,
                message: format!("no luck {n}"),
            }),
            ..numbered(n)
        }
    }

    /// Every row's content read back through `content` (each key once).
    fn streamed(c: &Cache, keys: &[Digest]) -> HashMap<Digest, RowContent> {
        let mut out = HashMap::new();
        c.content(keys, |k| *k, &mut |at, r| {
            assert!(
                out.insert(keys[at], r.clone()).is_none(),
                "{:?} visited twice",
                keys[at]
            );
        })
        .unwrap();
        out
    }

    #[test]
    fn lookups_projection_and_streaming_over_segments_one_of_them_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path()).unwrap();
        let parts: Vec<Vec<CachedRow>> = vec![
            (0..20_000).map(numbered).collect(), // several batches, several row groups
            (20_000..20_010)
                .map(numbered)
                .chain([failed(30_000)])
                .collect(),
            (20_010..20_020).map(numbered).collect(),
        ];
        for p in &parts {
            c.commit(p.clone()).unwrap();
        }
        // Damage one value of the second segment on disk (its size unchanged).
        let second = c.files[1].clone();
        let mut bytes = fs::read(&second).unwrap();
        let needle = b"answer 20005";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap();
        bytes[at] = b'A';
        fs::write(&second, &bytes).unwrap();
        let sound: Vec<&CachedRow> = parts.iter().flatten().filter(|r| !r.failed()).collect();
        let damaged = numbered(20_005);
        for access in [Access::ReadOnly, Access::ReadWrite] {
            let c = Cache::load_from(dir.path().join(LAYOUT), access).unwrap();
            // The damaged segment is distrusted (left in place read-only, quarantined
            // otherwise); its other rows verified one by one and are kept.
            let problems = c.report.untrusted.len() + c.report.quarantined.len();
            assert_eq!(problems, 1, "{access:?}");
            assert_eq!(c.report.corrupt_rows, 1);
            assert_eq!(c.len(), sound.len() - 1);
            assert!(matches!(c.lookup(&damaged.key, None), Lookup::Miss));
            assert!(
                matches!(c.lookup(&failed(30_000).key, None), Lookup::Failed(e) if e.message == "no luck 30000")
            );
            assert!(matches!(
                c.lookup(&sound[7].key, Some(9)),
                Lookup::TooLong {
                    prompt_tokens: 10,
                    limit: 9
                }
            ));
            // Streaming by projection and row selection: every other row, exactly.
            let keys: Vec<Digest> = sound.iter().step_by(3).map(|r| r.key).collect();
            let got = streamed(&c, &keys);
            for r in sound.iter().step_by(3) {
                if r.key == damaged.key {
                    assert!(!got.contains_key(&r.key));
                } else {
                    assert_eq!(got.get(&r.key), Some(&r.content()), "{access:?}");
                }
            }
            // Identities by projection: every trusted row once, with its components.
            let mut ids = HashMap::new();
            c.identities(&mut |id| {
                ids.insert(id.key, id);
            })
            .unwrap();
            assert_eq!(ids.len(), c.len());
            assert_eq!(ids[&sound[20_003].key].components, sound[20_003].components);
            assert_eq!(ids[&sound[20_003].key].row_id, sound[20_003].row_id);
        }
        // Read-write quarantined it: the other segments are untouched.
        assert!(!second.exists());
        assert!(c.files[0].exists() && c.files[2].exists());
    }

    #[test]
    fn a_rewrite_streams_rows_and_keeps_the_latest_failure() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path()).unwrap();
        c.commit((0..10_000).map(numbered).collect()).unwrap();
        let mut early = failed(50_000);
        early.created_unix_ms -= 1;
        c.commit(vec![early, failed(3)]).unwrap(); // a failure after a success: ignored
        c.commit(vec![failed(50_000)]).unwrap();
        c.rewrite(&|_| true).unwrap();
        assert_eq!(c.segments.list().unwrap().len(), 1);
        let c2 = Cache::open_read_only(dir.path()).unwrap();
        assert_eq!(c2.len(), 10_000);
        assert!(c2.report.problems().is_empty());
        assert!(matches!(c2.lookup(&numbered(3).key, None), Lookup::Hit));
        assert!(c2.failure(&failed(50_000).key).is_some());
        let keys: Vec<Digest> = (0..10_000).map(|n| numbered(n).key).collect();
        let got = streamed(&c2, &keys);
        assert_eq!(got.len(), 10_000);
        assert_eq!(got[&numbered(9_999).key], numbered(9_999).content());
    }

    #[test]
    fn a_cache_opened_for_some_keys_indexes_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path()).unwrap();
        c.commit((0..500).map(numbered).collect()).unwrap();
        c.commit((500..1000).map(numbered).chain([failed(5000)]).collect())
            .unwrap();
        assert_eq!(Cache::stored_rows(dir.path()).unwrap(), 1001);
        let keys = KeySet::new(
            (0..1000)
                .step_by(10)
                .map(|n| numbered(n).key)
                .chain([failed(5000).key]),
        );
        assert_eq!(keys.len(), 101);
        let c = Cache::open_read_only_for(dir.path(), keys).unwrap();
        assert_eq!(c.len(), 100);
        assert!(matches!(c.lookup(&numbered(11).key, None), Lookup::Miss));
        assert!(matches!(c.lookup(&numbered(990).key, None), Lookup::Hit));
        assert!(c.failure(&failed(5000).key).is_some());
        let got = streamed(&c, &[numbered(10).key, numbered(11).key, numbered(510).key]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[&numbered(510).key], numbered(510).content());
        // Identities are read from every stored row, indexed or not.
        let mut n = 0;
        c.identities(&mut |_| n += 1).unwrap();
        assert_eq!(n, 1000);
    }
}
