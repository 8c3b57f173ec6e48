//! The engine's speed on this machine, measured once in a quiet moment
//! (`pipeline engine-bench MODEL --save`): what turns a row's compute, counted in tokens,
//! into the time it is expected to take here (issue #31). A row's wall-clock time moves
//! with whatever else the machine is doing; this rate is measured when it is doing
//! nothing else, and says so (`cpu_share`).
//!
//! One small JSON file per model, engine and thread count under the cache folder's
//! `rates/`; a rate file is untrusted input like every cache file: one that does not parse,
//! names another model or engine, or holds a rate that is not a positive number is ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Prompt-processing and generation speed of one model through one engine build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineRate {
    /// Prompt tokens a second (llama-bench's pp512: one 512-token prompt at a time).
    pub prompt_tok_s: f64,
    /// Generated tokens a second (tg32: 32 tokens one at a time).
    pub gen_tok_s: f64,
    /// sha256 of the model file measured.
    pub model_sha256: String,
    pub engine: String,
    pub threads: usize,
    pub machine: String,
    pub date_utc: String,
    /// The share of its threads' time the process got while it measured (CPU time over
    /// wall time × threads): near 1 on a quiet machine, lower when others shared the cores.
    pub cpu_share: Option<f64>,
}

/// A rate below this share of the threads' time was measured on a busy machine.
pub const QUIET_CPU_SHARE: f64 = 0.8;

impl EngineRate {
    /// Seconds this engine is expected to take for `prompt` prompt tokens and `generated`
    /// generated tokens on the machine it was measured on.
    pub fn seconds(&self, prompt: f64, generated: f64) -> f64 {
        prompt / self.prompt_tok_s + generated / self.gen_tok_s
    }

    /// Whether this is the rate of that model, engine and thread count.
    pub fn is_for(&self, sha256: &str, engine: &str, threads: usize) -> bool {
        self.model_sha256 == sha256 && self.engine == engine && self.threads == threads
    }

    fn usable(&self) -> bool {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        positive(self.prompt_tok_s) && positive(self.gen_tok_s)
    }
}

/// Where the rate of a model (by sha256), engine and thread count is kept.
pub fn path(cache_dir: &Path, sha256: &str, engine: &str, threads: usize) -> PathBuf {
    let name = blake3::hash(format!("{sha256}\n{engine}\n{threads}").as_bytes()).to_hex();
    cache_dir
        .join("rates")
        .join(format!("{}.json", &name[..32]))
}

/// The rate measured for this model, engine and thread count, if one was saved.
pub fn load(cache_dir: &Path, sha256: &str, engine: &str, threads: usize) -> Option<EngineRate> {
    let bytes = std::fs::read(path(cache_dir, sha256, engine, threads)).ok()?;
    serde_json::from_slice::<EngineRate>(&bytes)
        .ok()
        .filter(|r| r.is_for(sha256, engine, threads))
        .filter(EngineRate::usable)
}

/// The usable rates a `run.json` recorded (a report rebuilt on a machine where they were
/// never measured keeps the ones it was made with); none when it is absent or damaged.
pub fn recorded(run_json: &Path) -> Vec<EngineRate> {
    let Some(run) = std::fs::read(run_json)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return Vec::new();
    };
    run["models"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| serde_json::from_value::<EngineRate>(m["rate"].clone()).ok())
        .filter(EngineRate::usable)
        .collect()
}

/// Keep a measured rate for later reports (written whole, then renamed into place).
pub fn save(cache_dir: &Path, rate: &EngineRate) -> std::io::Result<PathBuf> {
    let p = path(cache_dir, &rate.model_sha256, &rate.engine, rate.threads);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec_pretty(rate).map_err(std::io::Error::other)?;
    crate::fs::write_atomic(&p, &bytes)?;
    Ok(p)
}

/// A start of the process's CPU clock: read again after some work, it says how much CPU
/// time that work got (every thread, user and system), where the OS says.
pub struct CpuSince(Option<f64>);

impl CpuSince {
    pub fn now() -> Self {
        Self(process_cpu_seconds())
    }

    /// CPU seconds since [`CpuSince::now`].
    pub fn seconds(&self) -> Option<f64> {
        self.0.zip(process_cpu_seconds()).map(|(a, b)| b - a)
    }
}

/// CPU time this process has used so far (user and system, every thread), where the OS
/// says.
fn process_cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a whole `rusage` into the pointer it is given, which
        // points at one, and reports failure by its return value.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
        if rc != 0 {
            return None;
        }
        // SAFETY: getrusage returned 0, so it filled the struct (and it started zeroed).
        let u = unsafe { usage.assume_init() };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Some(secs(u.ru_utime) + secs(u.ru_stime))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The share of `threads` threads' time over `wall_s` seconds that `cpu_s` CPU seconds
/// are: how much of the machine the process got while it worked.
pub fn cpu_share(cpu_s: f64, wall_s: f64, threads: usize) -> Option<f64> {
    (wall_s > 0.0 && threads > 0 && cpu_s.is_finite())
        .then(|| (cpu_s / (wall_s * threads as f64)).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate() -> EngineRate {
        EngineRate {
            prompt_tok_s: 200.0,
            gen_tok_s: 20.0,
            model_sha256: "ab".repeat(32),
            engine: "engine 1".into(),
            threads: 2,
            machine: "test".into(),
            date_utc: "2026-12-06 00:00:00".into(),
            cpu_share: Some(0.97),
        }
    }

    #[test]
    fn a_saved_rate_is_found_only_for_its_model_engine_and_threads() {
        let dir = tempfile::tempdir().unwrap();
        let r = rate();
        save(dir.path(), &r).unwrap();
        assert_eq!(
            load(dir.path(), &r.model_sha256, "engine 1", 2),
            Some(r.clone())
        );
        assert_eq!(load(dir.path(), &r.model_sha256, "engine 2", 2), None);
        assert_eq!(load(dir.path(), &r.model_sha256, "engine 1", 4), None);
        assert_eq!(load(dir.path(), &"cd".repeat(32), "engine 1", 2), None);
        assert!((r.seconds(400.0, 10.0) - 2.5).abs() < 1e-12);
    }

    #[test]
    fn a_damaged_or_absurd_rate_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let r = rate();
        let p = path(dir.path(), &r.model_sha256, &r.engine, r.threads);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"{not json").unwrap();
        assert_eq!(load(dir.path(), &r.model_sha256, &r.engine, 2), None);
        for bad in [0.0, -1.0, f64::INFINITY] {
            let mut b = r.clone();
            b.prompt_tok_s = bad;
            // serde_json writes infinity as null, which does not parse back either.
            std::fs::write(&p, serde_json::to_vec(&b).unwrap()).unwrap();
            assert_eq!(load(dir.path(), &r.model_sha256, &r.engine, 2), None);
        }
        // A file holding another model's rate, copied under this one's name.
        let mut other = r.clone();
        other.model_sha256 = "cd".repeat(32);
        std::fs::write(&p, serde_json::to_vec(&other).unwrap()).unwrap();
        assert_eq!(load(dir.path(), &r.model_sha256, &r.engine, 2), None);
    }

    #[test]
    fn a_run_json_gives_back_the_rate_it_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.json");
        let r = rate();
        let run = serde_json::json!({"models": [{"id": "m", "rate": r}, {"id": "x"}]});
        std::fs::write(&p, serde_json::to_vec(&run).unwrap()).unwrap();
        let rates = recorded(&p);
        assert_eq!(rates, vec![r.clone()]);
        assert!(rates[0].is_for(&r.model_sha256, "engine 1", 2));
        assert!(!rates[0].is_for(&r.model_sha256, "engine 1", 3));
        assert!(recorded(&dir.path().join("absent.json")).is_empty());
    }

    #[test]
    fn the_cpu_share_is_bounded_and_this_process_has_used_some_time() {
        assert_eq!(cpu_share(1.0, 1.0, 2), Some(0.5));
        assert_eq!(cpu_share(5.0, 1.0, 2), Some(1.0));
        assert_eq!(cpu_share(1.0, 0.0, 2), None);
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(process_cpu_seconds().is_some_and(|s| s > 0.0));
    }
}
