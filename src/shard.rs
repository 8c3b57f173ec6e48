//! Splitting one run over N processes (Slurm job arrays, Kubernetes Indexed Jobs) that share
//! one cache folder.
//!
//! The work is the plan's pending prompt evaluations in executor order (model, prompt, row
//! set, row), cut into N contiguous blocks of about equal estimated tokens: a model is loaded
//! by the shards whose block reaches it, about M + N loads in all rather than M × N. Shards
//! start at different moments and see different cache states, so the first one to start
//! writes the cut points to a manifest (`cache/v2/shards/`, named by the plan and N) and every
//! other shard, and every rerun of a shard, uses those: each pending job falls in exactly one
//! block whatever the cache holds by then. The manifest names jobs by their place in the
//! plan, never by what is cached, so a job that is pending later (a failed row, a row removed
//! by `cache gc`) still has exactly one owner.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::key::{Digest, KeyEncoder};

/// One prompt evaluation, by its place in executor order (fields in this order: jobs sort
/// model by model, so a worker loads each model once). Stored in shard manifests as the
/// array `[model, prompt, set, row]`, as earlier versions wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(
    from = "(usize, usize, usize, usize)",
    into = "(usize, usize, usize, usize)"
)]
pub struct JobId {
    pub model: usize,
    pub prompt: usize,
    /// The row set (0: the evaluation rows).
    pub set: usize,
    pub row: usize,
}

impl From<(usize, usize, usize, usize)> for JobId {
    fn from((model, prompt, set, row): (usize, usize, usize, usize)) -> Self {
        JobId {
            model,
            prompt,
            set,
            row,
        }
    }
}

impl From<JobId> for (usize, usize, usize, usize) {
    fn from(j: JobId) -> Self {
        (j.model, j.prompt, j.set, j.row)
    }
}

/// Shard `index` of `count` (0-based, as Slurm array task ids and Kubernetes completion
/// indexes are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("--shard `{0}`: expected I/N with 0 <= I < N, e.g. 0/4")]
    Syntax(String),
    #[error("{var}=`{value}` is not a shard index below {count}")]
    Env {
        var: &'static str,
        value: String,
        count: usize,
    },
    #[error(
        "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but the shard count is not: pass --shards N"
    )]
    CountMissing,
    #[error(
        "--shards N without a shard index: pass --shard I/N, or run as a Slurm array task or a Kubernetes Indexed Job"
    )]
    IndexMissing,
    #[error("shard manifest {}: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
}

impl Shard {
    /// `I/N`.
    pub fn parse(s: &str) -> Result<Self, ShardError> {
        let bad = || ShardError::Syntax(s.to_string());
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// The shard the scheduler started this process as, if any: a Slurm job array
    /// (`SLURM_ARRAY_TASK_ID` from `SLURM_ARRAY_TASK_MIN`, of `SLURM_ARRAY_TASK_COUNT`; with
    /// `count` given, the task id itself of `count`, so that a task resubmitted alone,
    /// `sbatch --array=2`, is shard 2 again) or a Kubernetes Indexed Job
    /// (`JOB_COMPLETION_INDEX`, of `count`, which the Job's manifest knows as `completions`
    /// and passes as `--shards`).
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
        count: Option<usize>,
    ) -> Result<Option<Self>, ShardError> {
        let num = |var: &'static str, v: String, count: usize| {
            v.trim().parse::<usize>().map_err(|_| ShardError::Env {
                var,
                value: v.clone(),
                count,
            })
        };
        if let Some(id) = get("SLURM_ARRAY_TASK_ID") {
            let total = match (count, get("SLURM_ARRAY_TASK_COUNT")) {
                (Some(n), _) => n,
                (None, Some(c)) => num("SLURM_ARRAY_TASK_COUNT", c, 0)?,
                (None, None) => return Err(ShardError::CountMissing),
            };
            let min = match (count, get("SLURM_ARRAY_TASK_MIN")) {
                (None, Some(m)) => num("SLURM_ARRAY_TASK_MIN", m, total)?,
                _ => 0,
            };
            let index = num("SLURM_ARRAY_TASK_ID", id.clone(), total)?
                .checked_sub(min)
                .filter(|i| *i < total)
                .ok_or(ShardError::Env {
                    var: "SLURM_ARRAY_TASK_ID",
                    value: id,
                    count: total,
                })?;
            return Ok(Some(Self {
                index,
                count: total,
            }));
        }
        if let Some(v) = get("JOB_COMPLETION_INDEX") {
            let count = count.ok_or(ShardError::CountMissing)?;
            let index = num("JOB_COMPLETION_INDEX", v.clone(), count)?;
            if index >= count {
                return Err(ShardError::Env {
                    var: "JOB_COMPLETION_INDEX",
                    value: v,
                    count,
                });
            }
            return Ok(Some(Self { index, count }));
        }
        Ok(None)
    }
}

/// Cut `weights` (in order) into `n` contiguous blocks of about equal sums: block `i` starts
/// at the first item whose preceding sum reaches `i/n` of the total. Returns the `n` start
/// indexes (the first is 0; a block may be empty when there are fewer items than blocks).
pub fn cut_points(weights: &[u64], n: usize) -> Vec<usize> {
    let total: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    let mut starts = Vec::with_capacity(n);
    let (mut i, mut before) = (0, 0u128);
    for b in 0..n {
        let target = total * b as u128 / n as u128;
        while i < weights.len() && before < target {
            before += u128::from(weights[i]);
            i += 1;
        }
        starts.push(i);
    }
    starts
}

/// What the first shard decided, kept for the others: the first job of each block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The digest of the plan's jobs this split is for.
    pub plan: String,
    pub count: usize,
    /// The first job of shard 1..N (shard 0 starts at the beginning); `None` for a shard
    /// that got no pending job.
    pub starts: Vec<Option<JobId>>,
    /// Pending jobs and estimated tokens per shard when the split was made (for `plan`).
    pub jobs: Vec<usize>,
    pub tokens: Vec<u64>,
}

impl Manifest {
    /// Split `pending` (in executor order, with estimated tokens) into `count` blocks.
    pub fn split(plan: Digest, count: usize, pending: &[(JobId, u64)]) -> Self {
        let weights: Vec<u64> = pending.iter().map(|(_, w)| (*w).max(1)).collect();
        let cuts = cut_points(&weights, count);
        let mut jobs = Vec::with_capacity(count);
        let mut tokens = Vec::with_capacity(count);
        for (b, &s) in cuts.iter().enumerate() {
            let e = cuts.get(b + 1).copied().unwrap_or(pending.len()).max(s);
            jobs.push(e - s);
            tokens.push(weights[s.min(weights.len())..e].iter().sum());
        }
        Self {
            plan: plan.hex(),
            count,
            starts: cuts[1..]
                .iter()
                .map(|&s| pending.get(s).map(|(id, _)| *id))
                .collect(),
            jobs,
            tokens,
        }
    }

    /// The shard that owns `job`: the last block whose first job is not after it. Blocks
    /// that got no pending job own nothing.
    pub fn owner(&self, job: &JobId) -> usize {
        let mut owner = 0;
        for (b, s) in self.starts.iter().enumerate() {
            match s {
                Some(s) if s <= job => owner = b + 1,
                _ => {}
            }
        }
        owner
    }

    fn path(shards_dir: &Path, plan: &Digest, count: usize) -> PathBuf {
        shards_dir.join(format!("{}-of-{count}.json", &plan.hex()[..32]))
    }

    /// The split for this plan and count: the one a shard wrote before, or `make()`'s,
    /// written so that of two shards starting together exactly one wins and both use it.
    pub fn load_or_create(
        shards_dir: &Path,
        plan: &Digest,
        count: usize,
        make: impl FnOnce() -> Self,
    ) -> Result<Self, ShardError> {
        let path = Self::path(shards_dir, plan, count);
        let err = |message: String| ShardError::Manifest {
            path: path.clone(),
            message,
        };
        if let Some(m) = Self::read(&path).map_err(|e| err(e.to_string()))? {
            return Ok(m);
        }
        std::fs::create_dir_all(shards_dir).map_err(|e| err(e.to_string()))?;
        let made = make();
        let bytes = serde_json::to_vec_pretty(&made).expect("plain data serializes");
        let tmp = shards_dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        std::fs::write(&tmp, &bytes).map_err(|e| err(e.to_string()))?;
        // A hard link never replaces: the first shard's split stands.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(made),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::read(&path)
                .map_err(|e| err(e.to_string()))?
                .ok_or_else(|| ShardError::Manifest {
                    path: path.clone(),
                    message: "vanished after another shard wrote it".into(),
                }),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// The manifest already written for this plan and count, if any.
    pub fn existing(
        shards_dir: &Path,
        plan: &Digest,
        count: usize,
    ) -> Result<Option<Self>, ShardError> {
        let path = Self::path(shards_dir, plan, count);
        Self::read(&path).map_err(|e| ShardError::Manifest {
            path,
            message: e.to_string(),
        })
    }

    fn read(path: &Path) -> Result<Option<Self>, ManifestReadError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(Into::into),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Why a manifest file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// A digest of the jobs of a plan (every row key in executor order): equal plans, equal
/// manifests; any change to what the plan computes, a new split.
pub fn plan_digest(keys: impl IntoIterator<Item = Digest>) -> Digest {
    let mut e = KeyEncoder::new("shard-plan");
    for k in keys {
        e.digest("row", &k);
    }
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn shard_syntax_and_scheduler_variables() {
        assert_eq!(Shard::parse("2/4"), Ok(Shard { index: 2, count: 4 }));
        for bad in ["4/4", "1", "a/2", "0/0", "-1/3"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert_eq!(
            Shard::from_env(env(&slurm), None),
            Ok(Some(Shard { index: 1, count: 3 }))
        );
        // Task 2 resubmitted alone (`--array=2`) with the count given: shard 2 again.
        let rerun = [
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_MIN", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
        ];
        assert_eq!(
            Shard::from_env(env(&rerun), Some(4)),
            Ok(Some(Shard { index: 2, count: 4 }))
        );
        assert_eq!(
            Shard::from_env(env(&rerun), None),
            Ok(Some(Shard { index: 0, count: 1 })),
            "without the count, a lone task is the whole run"
        );
        let k8s = [("JOB_COMPLETION_INDEX", "3")];
        assert_eq!(
            Shard::from_env(env(&k8s), Some(4)),
            Ok(Some(Shard { index: 3, count: 4 }))
        );
        assert_eq!(
            Shard::from_env(env(&k8s), None),
            Err(ShardError::CountMissing)
        );
        assert!(Shard::from_env(env(&k8s), Some(3)).is_err());
        assert_eq!(Shard::from_env(env(&[]), Some(3)), Ok(None));
    }

    #[test]
    fn cuts_are_contiguous_balanced_and_cover_everything() {
        let w = [10, 10, 10, 10, 10, 10, 10, 10];
        assert_eq!(cut_points(&w, 4), vec![0, 2, 4, 6]);
        // One heavy item: the blocks after it start after it.
        let w = [100, 1, 1, 1];
        assert_eq!(cut_points(&w, 2), vec![0, 1]);
        // Fewer items than blocks: some blocks are empty, none holds two items.
        let w = [5, 5];
        assert_eq!(cut_points(&w, 4), vec![0, 1, 1, 2]);
        assert_eq!(cut_points(&[], 3), vec![0, 0, 0]);
    }

    #[test]
    fn every_pending_job_has_exactly_one_owner() {
        let pending: Vec<(JobId, u64)> = (0..50)
            .map(|i| {
                (
                    (i / 25, (i % 25) / 5, 0, i).into(),
                    100 + (i as u64 * 37) % 300,
                )
            })
            .collect();
        let m = Manifest::split(Digest([1; 32]), 4, &pending);
        assert_eq!(m.jobs.iter().sum::<usize>(), 50);
        let owners: Vec<usize> = pending.iter().map(|(j, _)| m.owner(j)).collect();
        // Contiguous: owners never go down in executor order.
        assert!(owners.windows(2).all(|w| w[0] <= w[1]), "{owners:?}");
        for b in 0..4 {
            assert_eq!(owners.iter().filter(|o| **o == b).count(), m.jobs[b]);
        }
        // Balanced by tokens: no block more than one item's weight from the mean.
        let mean = m.tokens.iter().sum::<u64>() / 4;
        assert!(m.tokens.iter().all(|t| t.abs_diff(mean) <= 400), "{m:?}");
        // A job that was not pending at split time still has one owner.
        assert!(m.owner(&(0, 3, 1, 7).into()) < 4);
    }

    #[test]
    fn the_first_manifest_written_stands() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Digest([7; 32]);
        let a = Manifest::split(
            plan,
            2,
            &[((0, 0, 0, 0).into(), 1), ((0, 0, 0, 1).into(), 1)],
        );
        let b = Manifest::split(
            plan,
            2,
            &[((0, 0, 0, 1).into(), 1), ((0, 0, 0, 2).into(), 1)],
        );
        let got = Manifest::load_or_create(dir.path(), &plan, 2, || a.clone()).unwrap();
        assert_eq!(got, a);
        let again = Manifest::load_or_create(dir.path(), &plan, 2, || b.clone()).unwrap();
        assert_eq!(again, a);
        assert_eq!(Manifest::existing(dir.path(), &plan, 3).unwrap(), None);
    }
}
