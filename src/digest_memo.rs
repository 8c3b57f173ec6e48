//! The sha256 memo of model files: a model is hashed once, not on every run. The memo is
//! bookkeeping that names which rows a model's file may reuse, so it is checked, never
//! trusted as written:
//!
//! - each entry is keyed by the file's absolute path and records the file's size,
//!   modification time, status-change time (ctime) and inode. Writing a file in place
//!   changes its ctime even when its size and mtime are put back (`touch -d` sets the
//!   mtime and moves the ctime to now), so a changed file is hashed again;
//! - an entry written within a second of the file's last change is not trusted (file
//!   times tick coarsely, so a change in the same tick would keep every stamp): the file
//!   is hashed again on its next use, as git does for a "racily clean" index entry;
//! - each entry carries a blake3 checksum over all of it: an entry edited by hand (another
//!   model's sha256 pasted in) or damaged fails it, is reported, and the file is hashed
//!   again. The checksum is not a signature: an editor who recomputes it is believed (see
//!   below). A file that is not an entry at all (the text format of earlier versions) is
//!   simply out of date: hashed again, without a warning;
//! - `pipeline cache verify` hashes every file the memo names and compares.
//!
//! What this does not stop: someone who can write the cache folder can also write rows
//! under any key; the cache folder is trusted as much as the account that owns it
//! (docs/book/threats.md).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the memo lives (inside the cache) and whether it may be written.
#[derive(Debug, Clone, Default)]
pub struct DigestMemo {
    pub dir: PathBuf,
    /// Read the memo but never write it (commands that must leave the cache untouched).
    pub read_only: bool,
}

/// What a file looks like on disk, as far as the memo checks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    path: String,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
}

/// One memo file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    stamp: Stamp,
    sha256: String,
    /// When the file was looked at for this entry, just before its stamp was taken and it
    /// was hashed (ns since the epoch).
    written_ns: i128,
    /// blake3 over the stamp and the sha256 (see [`Entry::checksum_of`]).
    checksum: String,
}

impl Entry {
    fn new(stamp: Stamp, sha256: String, written_ns: i128) -> Self {
        let checksum = Self::checksum_of(&stamp, &sha256, written_ns);
        Self {
            stamp,
            sha256,
            written_ns,
            checksum,
        }
    }

    fn checksum_of(stamp: &Stamp, sha256: &str, written_ns: i128) -> String {
        let body = serde_json::to_vec(&(stamp, sha256, written_ns)).expect("a stamp serializes");
        blake3::derive_key("pipeline digest memo v1", &body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn intact(&self) -> bool {
        self.sha256.len() == 64
            && self.sha256.chars().all(|c| c.is_ascii_hexdigit())
            && Self::checksum_of(&self.stamp, &self.sha256, self.written_ns) == self.checksum
    }

    /// Whether the file was looked at well after it last changed.
    fn settled(&self) -> bool {
        self.stamp.ctime_ns.max(self.stamp.mtime_ns) + RACY_NS < self.written_ns
    }
}

/// What `cache verify` found in the memo.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MemoReport {
    pub entries: usize,
    /// Entries whose file was hashed again and matched.
    pub verified: usize,
    /// Entries that failed their own checksum (edited or damaged): removed.
    pub damaged: Vec<PathBuf>,
    /// Entries whose file is gone or has changed since (they would be hashed again).
    pub stale: usize,
    /// Entries whose checksum held but whose file hashes to something else: removed.
    pub wrong: Vec<PathBuf>,
}

impl MemoReport {
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .damaged
            .iter()
            .map(|p| {
                format!(
                    "model digest memo {} failed its checksum (edited or damaged): removed; the model is hashed again",
                    p.display()
                )
            })
            .collect();
        out.extend(self.wrong.iter().map(|p| {
            format!(
                "model digest memo {} named a sha256 its file does not have: removed",
                p.display()
            )
        }));
        out
    }
}

impl DigestMemo {
    /// sha256 and size of `path`, from the memo when its entry is intact and the file is
    /// unchanged, else hashed now (and remembered unless read-only). A damaged entry is
    /// said on stderr once and replaced.
    pub fn sha256(&self, path: &Path) -> std::io::Result<(String, u64)> {
        let abs = std::path::absolute(path)?;
        let looked_at = now_ns();
        let stamp = stamp(&abs)?;
        let memo = self.entry_path(&abs);
        if let Some(Some(entry)) = read_entry(&memo) {
            if entry.intact() {
                if entry.stamp == stamp && entry.settled() {
                    return Ok((entry.sha256, stamp.size));
                }
            } else {
                eprintln!(
                    "warning: model digest memo {} failed its checksum (edited or damaged); hashing {} again",
                    memo.display(),
                    abs.display()
                );
            }
        }
        let sha = sha256_file(&abs)?;
        if !self.read_only {
            self.write(&memo, Entry::new(stamp.clone(), sha.clone(), looked_at))?;
        }
        Ok((sha, stamp.size))
    }

    /// Check every entry: its checksum, and its file hashed again. Damaged and wrong
    /// entries are removed (unless read-only); stale ones are left for the next use.
    pub fn verify(&self) -> std::io::Result<MemoReport> {
        let mut report = MemoReport::default();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(report);
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "sha256"))
            .collect();
        files.sort();
        for memo in files {
            report.entries += 1;
            let remove = |p: &Path| {
                if !self.read_only {
                    let _ = std::fs::remove_file(p);
                }
            };
            let entry = match read_entry(&memo) {
                Some(Some(entry)) if entry.intact() => entry,
                // An entry that fails its checksum: edited or damaged.
                Some(Some(_)) => {
                    remove(&memo);
                    report.damaged.push(memo);
                    continue;
                }
                // Not an entry (an earlier version's format): out of date, not damaged.
                _ => {
                    remove(&memo);
                    report.stale += 1;
                    continue;
                }
            };
            let file = PathBuf::from(&entry.stamp.path);
            match stamp(&file) {
                Ok(now) if now == entry.stamp => {
                    if sha256_file(&file)? == entry.sha256 {
                        report.verified += 1;
                    } else {
                        remove(&memo);
                        report.wrong.push(memo);
                    }
                }
                _ => report.stale += 1,
            }
        }
        Ok(report)
    }

    fn entry_path(&self, abs: &Path) -> PathBuf {
        self.dir.join(format!(
            "{}.sha256",
            &blake3::hash(abs.to_string_lossy().as_bytes()).to_hex()[..32]
        ))
    }

    fn write(&self, memo: &Path, entry: Entry) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = serde_json::to_vec_pretty(&entry).expect("an entry serializes");
        crate::fs::write_atomic(memo, &bytes)
    }
}

/// How long after a file's last change an entry must be written to be trusted.
const RACY_NS: i128 = 1_000_000_000;

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// The memo file's entry: `None` when there is no readable file, `Some(None)` when the file
/// is not an entry (another format, or too damaged to parse).
fn read_entry(memo: &Path) -> Option<Option<Entry>> {
    // A memo entry is a few hundred bytes; anything larger is not one.
    let meta = std::fs::metadata(memo).ok()?;
    if meta.len() > 64 * 1024 {
        return Some(None);
    }
    Some(serde_json::from_slice(&std::fs::read(memo).ok()?).ok())
}

fn stamp(abs: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(abs)?;
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    Ok(Stamp {
        path: abs.to_string_lossy().into_owned(),
        size: meta.len(),
        mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        inode: meta.ino(),
    })
}

/// The sha256 of a file's bytes, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut h, &buf[..n]);
    }
    Ok(hex::encode(sha2::Digest::finalize(h)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memo(dir: &Path) -> DigestMemo {
        DigestMemo {
            dir: dir.join("digests"),
            read_only: false,
        }
    }

    /// A model file digested once: (its folder, the file, the memo, its sha256, its entry).
    fn digested() -> (tempfile::TempDir, PathBuf, DigestMemo, String, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"GGUF one").unwrap();
        let m = memo(dir.path());
        let (sha, _) = m.sha256(&file).unwrap();
        let entry_file = m.entry_path(&std::path::absolute(&file).unwrap());
        (dir, file, m, sha, entry_file)
    }

    #[test]
    fn an_entry_edited_to_another_sha256_is_not_believed() {
        let (_dir, file, m, sha, entry_file) = digested();
        // Another model's sha256, written as if long after the file settled: only the
        // checksum tells it from a real entry.
        let mut entry = read_entry(&entry_file).unwrap().unwrap();
        entry.sha256 = "ab".repeat(32);
        entry.written_ns += 3_600 * 1_000_000_000;
        assert!(entry.settled() && !entry.intact());
        std::fs::write(&entry_file, serde_json::to_vec(&entry).unwrap()).unwrap();
        assert_eq!(m.sha256(&file).unwrap().0, sha);
        // verify: the rewritten entry holds.
        let r = m.verify().unwrap();
        assert_eq!((r.entries, r.verified), (1, 1), "{r:?}");
    }

    #[test]
    fn an_entry_of_the_old_text_format_is_out_of_date_not_damaged() {
        let (_dir, file, m, sha, entry_file) = digested();
        let abs = std::path::absolute(&file).unwrap();
        std::fs::write(&entry_file, format!("{}\n8\n1\n{sha}\n", abs.display())).unwrap();
        let r = m.verify().unwrap();
        assert_eq!((r.stale, r.damaged.len()), (1, 0), "{r:?}");
        assert!(r.problems().is_empty());
        assert_eq!(m.sha256(&file).unwrap().0, sha);
    }

    #[test]
    fn verify_removes_damaged_entries() {
        let (_dir, _file, m, sha, entry_file) = digested();
        let text = std::fs::read_to_string(&entry_file).unwrap();
        std::fs::write(&entry_file, text.replace(&sha, &"cd".repeat(32))).unwrap();
        let r = m.verify().unwrap();
        assert_eq!(r.damaged, vec![entry_file.clone()]);
        assert!(!entry_file.exists());
    }

    #[test]
    fn a_file_rewritten_with_its_size_and_mtime_kept_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"GGUF one").unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        let m = memo(dir.path());
        let (first, _) = m.sha256(&file).unwrap();
        // Same size, same mtime, other bytes.
        std::fs::write(&file, b"GGUF two").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), mtime);
        let (second, _) = m.sha256(&file).unwrap();
        assert_ne!(first, second);
        assert_eq!(second, sha256_file(&file).unwrap());
    }
}
