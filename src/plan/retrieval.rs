//! The stages before the prompts: the texts each embedder must embed, the retrieval pools,
//! and each query's nearest pool rows. Everything is keyed by content, so editing `k`
//! re-ranks and re-renders but embeds nothing, and changing the embedder file re-embeds.

use crate::dataset::Row;
use crate::key::{CacheKey, Digest, EmbeddingPart, NeighboursPart, PoolPart};
use crate::model::KnownModel;
use crate::neighbours::{self, Neighbours, PoolEntry, Search};
use crate::spec::Spec;
use crate::store::{Artifact, Store};

/// A text an embedder must embed.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    pub embedder: usize,
    pub text: String,
    pub key: Digest,
}

/// Labelled rows that examples and votes are drawn from, with their embedding keys.
#[derive(Debug, Clone)]
pub struct Pool {
    pub embedder: usize,
    pub rows: Vec<Row>,
    /// Embedding key of each row (`None` when the embedder's digest is unknown).
    pub keys: Vec<Option<Digest>>,
    /// Digest of the pool's ids, labels and embedding keys.
    pub digest: Option<Digest>,
}

/// One retrieval: a knn prompt's examples or a `knn_vote` method's neighbours.
#[derive(Debug, Clone)]
pub struct Retrieval {
    /// `prompt:ID` or `method:ID`, as stage ids and the report name it.
    pub id: String,
    /// What it retrieves for.
    pub serves: Serves,
    pub pool: usize,
    pub search: Search,
    /// `[set][row]`: the neighbours' artifact key (`None` when an input digest is unknown),
    /// empty for the sets it does not serve.
    pub keys: Vec<Vec<Option<Digest>>>,
    /// `[set][row]`: the neighbours, when the embeddings they need exist.
    pub results: Vec<Vec<Option<Neighbours>>>,
}

/// What a retrieval finds neighbours for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serves {
    /// The examples of a knn prompt (index into the spec's prompts), in every row set.
    Prompt(usize),
    /// The vote of a `knn_vote` method (index into the spec's methods), on the evaluation rows.
    Vote(usize),
}

impl Retrieval {
    /// Queries served and how many of them had a pool row left out by the leak guard, and
    /// how many pool rows were left out in all.
    pub fn leaks(&self) -> (usize, usize, usize) {
        let found: Vec<&Neighbours> = self.results.iter().flatten().flatten().collect();
        let queries = self.keys.iter().map(Vec::len).sum();
        (
            queries,
            found.iter().filter(|n| n.excluded > 0).count(),
            found.iter().map(|n| n.excluded).sum(),
        )
    }
}

/// The embedding key of `text` for an embedder.
pub fn embedding_key(
    spec: &Spec,
    embedders: &[KnownModel],
    embedder: usize,
    text: &str,
    engine: &str,
) -> Option<Digest> {
    let sha = embedders[embedder].sha256.as_deref()?;
    Some(
        EmbeddingPart {
            sha256: sha,
            max_tokens: spec.embedders[embedder].max_tokens,
            text,
            engine,
        }
        .digest(),
    )
}

pub fn pool(
    spec: &Spec,
    embedders: &[KnownModel],
    embedder: usize,
    rows: Vec<Row>,
    engine: &str,
) -> Pool {
    let keys: Vec<Option<Digest>> = rows
        .iter()
        .map(|r| embedding_key(spec, embedders, embedder, &r.text, engine))
        .collect();
    let digest = keys
        .iter()
        .zip(&rows)
        .map(|(k, r)| k.map(|k| (r.id.as_str(), r.label, k)))
        .collect::<Option<Vec<_>>>()
        .map(|entries| PoolPart { rows: &entries }.digest());
    Pool {
        embedder,
        rows,
        keys,
        digest,
    }
}

/// An embedding read back from the store.
pub fn vector(store: &Store, key: &Option<Digest>) -> Option<Vec<f32>> {
    let a = store.get(key.as_ref()?)?;
    Some(
        a.value
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

/// An embedding as stored.
pub fn vector_artifact(key: Digest, v: &[f32]) -> Artifact {
    Artifact {
        key,
        kind: crate::store::ArtifactKind::Embedding,
        value: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// The queries of each row set a retrieval serves (`None`: a set it does not serve): each
/// row with its embedding key.
pub type Queries<'a> = [Option<Vec<Query<'a>>>];

/// A query row and its embedding key.
pub type Query<'a> = (&'a Row, Option<Digest>);

/// What resolving a retrieval found: per set and row, the neighbours' key and the
/// neighbours, and the neighbour lists computed now (to store).
pub type Resolved = (
    Vec<Vec<Option<Digest>>>,
    Vec<Vec<Option<Neighbours>>>,
    Vec<Artifact>,
);

/// Each query's neighbours: from the store, else computed when every embedding is there
/// (then also returned as new artifacts to store). `queries[set]` are the rows of the sets
/// served, with their embedding keys.
pub fn resolve(pool: &Pool, search: Search, queries: &Queries, store: &Store) -> Resolved {
    let keys: Vec<Vec<Option<Digest>>> = queries
        .iter()
        .map(|set| match set {
            None => Vec::new(),
            Some(rows) => rows
                .iter()
                .map(|(row, q)| {
                    Some(
                        NeighboursPart {
                            pool: pool.digest.as_ref()?,
                            query_id: &row.id,
                            query: q.as_ref()?,
                            k: search.k,
                            per_label: search.per_label.is_some(),
                            nearest_last: search.nearest_last,
                        }
                        .digest(),
                    )
                })
                .collect(),
        })
        .collect();
    let stored = |k: &Option<Digest>| -> Option<Neighbours> {
        serde_json::from_slice(&store.get(k.as_ref()?)?.value).ok()
    };
    let mut results: Vec<Vec<Option<Neighbours>>> = keys
        .iter()
        .map(|set| set.iter().map(stored).collect())
        .collect();
    let missing = results.iter().flatten().any(Option::is_none);
    let mut new = Vec::new();
    if !missing {
        return (keys, results, new);
    }
    let pool_vectors: Option<Vec<Vec<f32>>> = pool.keys.iter().map(|k| vector(store, k)).collect();
    let Some(pool_vectors) = pool_vectors else {
        return (keys, results, new);
    };
    let entries: Vec<PoolEntry> = pool
        .rows
        .iter()
        .zip(&pool_vectors)
        .map(|(r, v)| PoolEntry {
            id: &r.id,
            text: &r.text,
            label: r.label,
            vector: v,
        })
        .collect();
    for (s, set) in queries.iter().enumerate() {
        let Some(rows) = set else { continue };
        let todo: Vec<(usize, &Row, Vec<f32>)> = rows
            .iter()
            .enumerate()
            .filter(|(i, _)| results[s][*i].is_none() && keys[s][*i].is_some())
            .filter_map(|(i, (row, q))| Some((i, *row, vector(store, q)?)))
            .collect();
        let qs: Vec<neighbours::Query> = todo
            .iter()
            .map(|(_, row, v)| neighbours::Query {
                id: &row.id,
                text: &row.text,
                vector: v,
            })
            .collect();
        for ((i, _, _), n) in todo.iter().zip(neighbours::search(&entries, &qs, search)) {
            let key = keys[s][*i].expect("filtered on a key");
            new.push(Artifact {
                key,
                kind: crate::store::ArtifactKind::Neighbours,
                value: serde_json::to_vec(&n).expect("neighbours serialize"),
            });
            results[s][*i] = Some(n);
        }
    }
    (keys, results, new)
}
