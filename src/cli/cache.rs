//! `pipeline cache`: status, gc, verify, export and import of the row cache.

use std::process::ExitCode;

use super::args::CacheCommand;
use super::output::*;
use crate::app::{self, AppError};
use crate::config::Config;

pub(super) fn command(cfg: &Config, c: &CacheCommand) -> Result<ExitCode, AppError> {
    match c {
        CacheCommand::Status { specs, json } => {
            let r = app::cache_status(cfg, specs)?;
            warn(&r.load.problems());
            let s = &r.status;
            if *json {
                let specs: Vec<serde_json::Value> = r
                    .specs
                    .iter()
                    .map(|(name, st)| {
                        serde_json::json!({"spec": name, "rows": st.rows, "cached": st.cached,
                            "failed": st.failed, "to_run": st.to_run()})
                    })
                    .collect();
                out!(
                    "{}",
                    to_json(
                        &serde_json::json!({"cache": s, "specs": specs, "artifacts": r.artifacts})
                    )
                );
                return Ok(ExitCode::SUCCESS);
            }
            out!("cache {}", s.root.display());
            out!(
                "  {} rows, {} failed rows, in {} segments ({})",
                s.rows,
                s.failures,
                s.segments,
                human_bytes(s.segment_bytes)
            );
            if s.quarantine_files > 0 {
                out!(
                    "  quarantine: {} files ({})",
                    s.quarantine_files,
                    human_bytes(s.quarantine_bytes)
                );
            }
            if s.temp_files > 0 {
                out!("  {} temporary files of unfinished writes", s.temp_files);
            }
            for (name, size) in &s.other_layouts {
                out!(
                    "  older layout {name}/ ({}) is no longer read; `pipeline cache gc` removes it",
                    human_bytes(*size)
                );
            }
            for (name, size) in &s.unknown_folders {
                out!(
                    "  {name}/ ({}) is not a layout this version reads (a newer layout, or not the cache's); `cache gc` leaves it",
                    human_bytes(*size)
                );
            }
            for (kind, n) in &r.artifacts {
                out!("  {n} stored {kind} artifacts");
            }
            if !r.artifacts.is_empty() {
                out!("  artifacts: {}", human_bytes(r.artifact_bytes));
            }
            for (name, st) in &r.specs {
                out!(
                    "  spec {name}: {} rows, {} cached, {} failed, {} to run",
                    st.rows,
                    st.cached,
                    st.failed,
                    st.to_run()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Gc { keep, dry_run } => {
            let r = app::cache_gc(cfg, keep, *dry_run)?;
            let verb = if r.dry_run { "would remove" } else { "removed" };
            out!(
                "{verb} {} rows and {} failed rows; kept {} rows and {} failed rows",
                r.rows_removed,
                r.failures_removed,
                r.rows_kept,
                r.failures_kept
            );
            if !r.dry_run {
                out!(
                    "segments: {} ({}) → {}",
                    r.segments_before,
                    human_bytes(r.bytes_before),
                    human_bytes(r.bytes_after)
                );
            }
            if r.artifacts_removed > 0 {
                out!(
                    "{verb} {} stored stage outputs (embeddings, neighbours, fits)",
                    r.artifacts_removed
                );
            }
            if r.quarantine_files_removed > 0 {
                out!("{verb} {} quarantined files", r.quarantine_files_removed);
            }
            for l in &r.layouts_removed {
                out!("{verb} the older layout {l}/");
            }
            for f in &r.folders_kept {
                out!("kept {f}/: not a layout this version knows to be older");
            }
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Export {
            spec,
            dir,
            without_embeddings,
        } => {
            let t = app::cache_export(cfg, spec, dir, *without_embeddings)?;
            warn(&t.problems);
            out!(
                "exported {} rows and {} stage outputs to {} ({} rows and {} outputs were there already)",
                t.rows,
                t.artifacts,
                dir.display(),
                t.rows_present,
                t.artifacts_present
            );
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Import { dirs } => {
            let t = app::cache_import(cfg, dirs)?;
            warn(&t.problems);
            out!(
                "imported {} rows and {} stage outputs ({} rows and {} outputs were cached already)",
                t.rows,
                t.artifacts,
                t.rows_present,
                t.artifacts_present
            );
            Ok(if t.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        CacheCommand::Verify => {
            let v = app::cache_verify(cfg)?;
            let r = &v.rows;
            out!(
                "{} segments, {} rows, {} failed rows checked",
                r.segments,
                r.rows,
                r.failures
            );
            out!(
                "{} model digests checked: {} hashed again and match, {} stale (their file changed or is gone; hashed again on next use)",
                v.memo.entries,
                v.memo.verified,
                v.memo.stale
            );
            let problems = v.problems();
            warn(&problems);
            Ok(if problems.is_empty() {
                out!("every row verifies");
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
