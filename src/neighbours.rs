//! Exact nearest neighbours by cosine similarity: brute force over L2-normalised vectors,
//! deterministic (ties broken by the pool row's id, then position), with a leak guard that
//! never returns the query itself (same id or same text). Queries run in parallel; each
//! query's result depends on that query alone.

use rayon::prelude::*;

/// One labelled pool row, with its embedding.
#[derive(Debug, Clone, Copy)]
pub struct PoolEntry<'a> {
    pub id: &'a str,
    pub text: &'a str,
    pub label: usize,
    pub vector: &'a [f32],
}

/// One query: its id and text (for the leak guard) and its embedding.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub id: &'a str,
    pub text: &'a str,
    pub vector: &'a [f32],
}

/// How many neighbours and how they are chosen and ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Search {
    pub k: usize,
    /// `k / labels` nearest of each label (`k` is a multiple of the label count).
    pub per_label: Option<usize>,
    /// Most similar last (`true`) or first.
    pub nearest_last: bool,
}

/// A query's neighbours: pool positions with their similarity, in prompt order, and how
/// many pool rows the leak guard left out.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Neighbours {
    pub pool: Vec<usize>,
    pub similarity: Vec<f32>,
    pub excluded: usize,
}

/// Cosine similarity of two L2-normalised vectors. A plain sequential sum: the same bits
/// on every run, thread and machine with the same float semantics.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// The neighbours of every query.
pub fn search(pool: &[PoolEntry], queries: &[Query], how: Search) -> Vec<Neighbours> {
    queries
        .par_iter()
        .map(|q| search_one(pool, q, how))
        .collect()
}

fn search_one(pool: &[PoolEntry], q: &Query, how: Search) -> Neighbours {
    let mut excluded = 0;
    let mut scored: Vec<(f32, usize)> = Vec::with_capacity(pool.len());
    for (i, p) in pool.iter().enumerate() {
        if p.id == q.id || p.text == q.text {
            excluded += 1;
            continue;
        }
        scored.push((cosine(p.vector, q.vector), i));
    }
    // Most similar first; ties by id, then position: never by thread or hash order.
    scored.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| pool[a.1].id.cmp(pool[b.1].id))
            .then(a.1.cmp(&b.1))
    });
    let mut chosen: Vec<(f32, usize)> = match how.per_label {
        None => scored.into_iter().take(how.k).collect(),
        Some(labels) => {
            let each = how.k / labels.max(1);
            let mut taken = vec![0usize; labels];
            scored
                .into_iter()
                .filter(|&(_, i)| {
                    let l = pool[i].label;
                    let ok = l < labels && taken[l] < each;
                    if ok {
                        taken[l] += 1;
                    }
                    ok
                })
                .collect()
        }
    };
    if how.nearest_last {
        chosen.reverse();
    }
    Neighbours {
        pool: chosen.iter().map(|&(_, i)| i).collect(),
        similarity: chosen.iter().map(|&(s, _)| s).collect(),
        excluded,
    }
}

/// Label shares of a similarity-weighted vote (negative similarities count as 0; no
/// positive weight at all gives equal shares).
pub fn vote(pool: &[PoolEntry], n: &Neighbours, labels: usize) -> Vec<f64> {
    let mut w = vec![0.0f64; labels];
    for (&i, &s) in n.pool.iter().zip(&n.similarity) {
        if let Some(x) = w.get_mut(pool[i].label) {
            *x += f64::from(s.max(0.0));
        }
    }
    let total: f64 = w.iter().sum();
    if total > 0.0 {
        w.iter().map(|x| x / total).collect()
    } else {
        vec![1.0 / labels as f64; labels]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn nearest_first_ties_by_id_and_the_query_is_never_its_own_neighbour() {
        let vs = [
            unit(&[1.0, 0.0]),
            unit(&[1.0, 0.1]),
            unit(&[0.0, 1.0]),
            unit(&[1.0, 0.1]),
        ];
        let ids = ["d", "c", "b", "a"];
        let texts = ["t0", "t1", "t2", "t3"];
        let pool: Vec<PoolEntry> = (0..4)
            .map(|i| PoolEntry {
                id: ids[i],
                text: texts[i],
                label: i % 2,
                vector: &vs[i],
            })
            .collect();
        let q = Query {
            id: "d",
            text: "other",
            vector: &vs[0],
        };
        let how = Search {
            k: 2,
            per_label: None,
            nearest_last: false,
        };
        let n = search(&pool, &[q], how).remove(0);
        // Row 0 is the query itself (same id); rows 1 and 3 tie: id "a" (row 3) first.
        assert_eq!(n.pool, vec![3, 1]);
        assert_eq!(n.excluded, 1);
        let same_text = Query {
            id: "z",
            text: "t3",
            vector: &vs[0],
        };
        assert_eq!(search(&pool, &[same_text], how)[0].pool, vec![0, 1]);
        let last = search(
            &pool,
            &[q],
            Search {
                nearest_last: true,
                ..how
            },
        );
        assert_eq!(last[0].pool, vec![1, 3]);
        let balanced = search(
            &pool,
            &[q],
            Search {
                per_label: Some(2),
                ..how
            },
        );
        let labels: Vec<usize> = balanced[0].pool.iter().map(|&i| pool[i].label).collect();
        assert_eq!(labels.iter().filter(|&&l| l == 0).count(), 1);
        let shares = vote(&pool, &n, 2);
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(shares[1], 1.0, "rows 1 and 3 both have label 1");
    }
}
