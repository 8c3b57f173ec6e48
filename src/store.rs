//! The artifact store: the cached outputs of the stages before and after inference
//! (embeddings, neighbour lists, calibration fits), content-addressed by their stage key,
//! in Parquet segments under `cache/v2/artifacts/` with the row cache's guarantees:
//! atomic segments, a checksum per artifact, quarantine, read-only opening.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

use crate::cache::LAYOUT;
use crate::fs::tree_size;
use crate::key::{Digest, KeyEncoder};
use crate::segments::{
    Access, CacheError, LoadReport, SegmentDir, damage, intact, read_batches, read_file,
};
use crate::table::TableError;

/// Segments beyond this many are merged into one at the end of a run.
const COMPACT_AFTER_SEGMENTS: usize = 16;

/// One stored output: its key, what kind of stage made it, and its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Artifact {
    pub key: Digest,
    pub kind: ArtifactKind,
    pub value: Vec<u8>,
}

named_enum! {
    /// The stage that made an artifact.
    pub enum ArtifactKind {
        Embedding,
        Neighbours,
        Calibration,
    }
}

impl Artifact {
    fn checksum(&self) -> Digest {
        KeyEncoder::new("artifact")
            .digest("key", &self.key)
            .str("kind", self.kind.as_str())
            .bytes("value", &self.value)
            .finish()
    }
}

pub struct Store {
    segments: SegmentDir,
    items: HashMap<Digest, Artifact>,
    pub report: LoadReport,
}

impl Store {
    /// Open (creating if needed) the artifact store of the cache under `dir`.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        Self::load_from(dir, Access::ReadWrite)
    }

    /// Open without writing anything; a missing store is empty.
    pub fn open_read_only(dir: &Path) -> Result<Self, CacheError> {
        Self::load_from(dir, Access::ReadOnly)
    }

    fn load_from(dir: &Path, access: Access) -> Result<Self, CacheError> {
        let mut store = Self {
            segments: SegmentDir::new(&dir.join(LAYOUT), "artifacts", access)?,
            items: HashMap::new(),
            report: LoadReport::default(),
        };
        for path in store.segments.list()? {
            let read = read_file(&path)
                .map_err(TableError::from)
                .and_then(|b| Ok((intact(&path, &b), decode(b)?)));
            let (sound, items) = match read {
                Ok(x) => x,
                Err(why) => {
                    store
                        .segments
                        .distrust(&path, &why.to_string(), &mut store.report)?;
                    continue;
                }
            };
            store.report.segments += 1;
            let total = items.len();
            let good: Vec<Artifact> = items.into_iter().flatten().collect();
            if let Some(why) = damage(sound, total - good.len(), total, "artifacts") {
                store.report.corrupt_rows += total - good.len();
                store
                    .segments
                    .distrust(&path, &why.to_string(), &mut store.report)?;
                if access == Access::ReadWrite && !good.is_empty() {
                    store.segments.write(&encode(&good)?)?;
                }
            }
            for a in good {
                store.items.entry(a.key).or_insert(a);
            }
        }
        store.report.rows = store.items.len();
        Ok(store)
    }

    pub fn get(&self, key: &Digest) -> Option<&Artifact> {
        self.items.get(key)
    }

    /// Every stored artifact.
    pub fn items(&self) -> impl Iterator<Item = &Artifact> {
        self.items.values()
    }

    pub fn contains(&self, key: &Digest) -> bool {
        self.items.contains_key(key)
    }

    /// Durably add artifacts: one new segment.
    pub fn commit(&mut self, items: Vec<Artifact>) -> Result<(), CacheError> {
        self.segments.writable()?;
        let items: Vec<Artifact> = items
            .into_iter()
            .filter(|a| !self.items.contains_key(&a.key))
            .collect();
        if items.is_empty() {
            return Ok(());
        }
        self.segments.write(&encode(&items)?)?;
        for a in items {
            self.items.entry(a.key).or_insert(a);
        }
        Ok(())
    }

    /// Artifacts by kind, and the bytes of their segments.
    pub fn status(&self) -> (BTreeMap<ArtifactKind, usize>, u64) {
        let mut by_kind = BTreeMap::new();
        for a in self.items.values() {
            *by_kind.entry(a.kind).or_default() += 1;
        }
        (by_kind, tree_size(&self.segments.dir).0)
    }

    /// Merge the segments into one when there are many (or keep only `needed`, for
    /// `cache gc`). Returns how many artifacts were dropped.
    pub fn compact(&mut self, needed: Option<&HashSet<Digest>>) -> Result<usize, CacheError> {
        self.segments.writable()?;
        let paths = self.segments.list()?;
        if needed.is_none() && paths.len() <= COMPACT_AFTER_SEGMENTS {
            return Ok(0);
        }
        let Some(_lock) = self.segments.lock(needed.is_some())? else {
            return Ok(0);
        };
        let mut merged: HashMap<Digest, Artifact> = HashMap::new();
        let mut read = Vec::new();
        for p in &paths {
            if let Ok(bytes) = read_file(p)
                && intact(p, &bytes)
                && let Ok(items) = decode(bytes)
                && items.iter().all(Option::is_some)
            {
                for a in items.into_iter().flatten() {
                    merged.entry(a.key).or_insert(a);
                }
                read.push(p.clone());
            }
        }
        let before = merged.len();
        let mut keep: Vec<Artifact> = merged
            .into_values()
            .filter(|a| needed.is_none_or(|n| n.contains(&a.key)))
            .collect();
        keep.sort_by_key(|a| a.key);
        let dropped = before - keep.len();
        if !keep.is_empty() {
            self.segments.write(&encode(&keep)?)?;
        }
        for p in read {
            let _ = fs::remove_file(p);
        }
        if let Some(n) = needed {
            self.items.retain(|k, _| n.contains(k));
        }
        Ok(dropped)
    }

    /// How many stored artifacts `needed` leaves out.
    pub fn unneeded(&self, needed: &HashSet<Digest>) -> usize {
        self.items.keys().filter(|k| !needed.contains(k)).count()
    }
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("value", DataType::Binary, false),
        Field::new("checksum", DataType::Utf8, false),
    ]))
}

fn encode(items: &[Artifact]) -> Result<RecordBatch, CacheError> {
    let strs = |f: &dyn Fn(&Artifact) -> String| -> ArrayRef {
        Arc::new(StringArray::from(items.iter().map(f).collect::<Vec<_>>()))
    };
    let cols: Vec<ArrayRef> = vec![
        strs(&|a| a.key.hex()),
        strs(&|a| a.kind.as_str().to_string()),
        Arc::new(BinaryArray::from_iter_values(
            items.iter().map(|a| a.value.as_slice()),
        )),
        strs(&|a| a.checksum().hex()),
    ];
    RecordBatch::try_new(schema(), cols).map_err(|e| CacheError::Segment {
        path: Default::default(),
        message: e.to_string(),
    })
}

/// A segment's artifacts; `None` for one that fails verification.
fn decode(bytes: bytes::Bytes) -> Result<Vec<Option<Artifact>>, TableError> {
    let mut out = Vec::new();
    for b in read_batches(bytes, &schema())? {
        let col = |n: &str| b.column_by_name(n).expect("schema checked");
        let (key, kind, sum) = (
            col("key").as_string::<i32>(),
            col("kind").as_string::<i32>(),
            col("checksum").as_string::<i32>(),
        );
        let value = col("value").as_binary::<i32>();
        for i in 0..b.num_rows() {
            let a = Digest::from_hex(key.value(i))
                .zip(kind.value(i).parse().ok())
                .map(|(key, kind)| Artifact {
                    key,
                    kind,
                    value: value.value(i).to_vec(),
                });
            out.push(a.filter(|a| a.checksum().hex() == sum.value(i) && !value.is_null(i)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(n: u8) -> Artifact {
        Artifact {
            key: KeyEncoder::new("t").u64("n", n.into()).finish(),
            kind: ArtifactKind::Embedding,
            value: vec![n; 8],
        }
    }

    #[test]
    fn artifacts_round_trip_and_damage_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.commit((0..4).map(artifact).collect()).unwrap();
        let s2 = Store::open_read_only(dir.path()).unwrap();
        assert_eq!(s2.get(&artifact(2).key), Some(&artifact(2)));
        assert_eq!(s2.status().0[&ArtifactKind::Embedding], 4);
        let seg = s.segments.list().unwrap().pop().unwrap();
        fs::write(&seg, b"not parquet").unwrap();
        let s3 = Store::open_read_only(dir.path()).unwrap();
        assert_eq!(s3.report.untrusted.len(), 1);
        assert!(seg.exists(), "read-only leaves it");
        let s4 = Store::open(dir.path()).unwrap();
        assert_eq!(s4.report.quarantined.len(), 1);
        assert!(s4.get(&artifact(2).key).is_none());
    }

    #[test]
    fn compact_keeps_only_what_is_needed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        for n in 0..5 {
            s.commit(vec![artifact(n)]).unwrap();
        }
        let needed: HashSet<Digest> = [artifact(1).key, artifact(3).key].into();
        assert_eq!(s.unneeded(&needed), 3);
        assert_eq!(s.compact(Some(&needed)).unwrap(), 3);
        let s2 = Store::open(dir.path()).unwrap();
        assert_eq!(s2.report.segments, 1);
        assert_eq!(s2.items.len(), 2);
    }
}
