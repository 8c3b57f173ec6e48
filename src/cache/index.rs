//! The cache's index: values by row key in a sorted array with a prefix table, and the set
//! of keys a plan needs.

use crate::key::{Digest, DigestMap};

/// Values by key: sorted (a million keys take half the memory of a hash map) with a table
/// of where each key prefix starts, so that a lookup reads two or three cache lines; keys
/// added after it was built wait in a small map.
#[derive(Debug, Clone)]
pub(super) struct SortedIndex<V> {
    sorted: Vec<(Digest, V)>,
    /// `starts[p]..starts[p + 1]`: the entries whose key begins with the `bits`-bit prefix `p`.
    starts: Vec<u32>,
    bits: u32,
    recent: DigestMap<V>,
}

impl<V> Default for SortedIndex<V> {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl<V> SortedIndex<V> {
    /// The index of `rows` in the order met: the first value of a key wins.
    pub(super) fn new(mut rows: Vec<(Digest, V)>) -> Self {
        rows.sort_by_key(|r| r.0); // stable: the first met stays first
        rows.dedup_by_key(|r| r.0);
        rows.shrink_to_fit();
        // About two entries per prefix.
        let bits = (usize::BITS - (rows.len() / 2).leading_zeros()).min(24);
        let mut starts = vec![0u32; (1usize << bits) + 1];
        for (k, _) in &rows {
            starts[Self::prefix_of(k, bits) + 1] += 1;
        }
        for p in 1..starts.len() {
            starts[p] += starts[p - 1];
        }
        Self {
            sorted: rows,
            starts,
            bits,
            recent: DigestMap::default(),
        }
    }

    fn prefix_of(k: &Digest, bits: u32) -> usize {
        if bits == 0 {
            return 0;
        }
        let mut first = [0u8; 8];
        first.copy_from_slice(&k.0[..8]);
        (u64::from_be_bytes(first) >> (64 - bits)) as usize
    }

    pub(super) fn get(&self, k: &Digest) -> Option<&V> {
        if let Some(h) = self.recent.get(k) {
            return Some(h);
        }
        let p = Self::prefix_of(k, self.bits);
        let (from, to) = (*self.starts.get(p)? as usize, self.starts[p + 1] as usize);
        let run = &self.sorted[from..to];
        run.binary_search_by(|e| e.0.cmp(k)).ok().map(|i| &run[i].1)
    }

    /// Add a key after the index was built (the first value of a key wins).
    pub(super) fn add(&mut self, k: Digest, v: V) {
        if self.get(&k).is_none() {
            self.recent.insert(k, v);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&Digest, &V)> {
        self.sorted
            .iter()
            .map(|(k, v)| (k, v))
            .chain(self.recent.iter())
    }
}

/// The row keys a command needs: a cache opened for them indexes only those, so that a plan
/// or report over a cache that many studies share holds only its own rows.
#[derive(Debug, Clone, Default)]
pub struct KeySet(SortedIndex<()>);

impl KeySet {
    pub fn new(keys: impl IntoIterator<Item = Digest>) -> Self {
        Self(SortedIndex::new(
            keys.into_iter().map(|k| (k, ())).collect(),
        ))
    }

    pub fn contains(&self, k: &Digest) -> bool {
        self.0.get(k).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
