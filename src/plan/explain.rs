//! What `pipeline plan --explain` shows: why a cell's rows miss the cache, and a
//! cascade's state in words.

use serde::Serialize;

use super::{Plan, Routing, Source};
use crate::cache::{Cache, Lookup};

pub(super) fn count(v: &mut Vec<(String, usize)>, key: &str) {
    match v.iter_mut().find(|(k, _)| k == key) {
        Some((_, n)) => *n += 1,
        None => v.push((key.to_string(), 1)),
    }
}

impl Plan {
    /// The calibration fit's key: its kind and the rows it is fitted on (`None` until
    /// every row's key is known).
    /// The rows whose last attempt failed (or that do not fit the cell's context) are left
    /// out of a fit, and so named in its key.
    pub fn calibration_key(&self, cell: &super::Cell, cache: &Cache) -> Option<crate::key::Digest> {
        use crate::key::{CacheKey, CalibrationPart};
        let cal = &self.calibrations[cell.calibration?];
        let support = &self.support[cal.support];
        let rows: Option<Vec<_>> = support
            .rows
            .iter()
            .zip(&self.sets[support.set].rows)
            .map(|(c, r)| {
                c.map(|c| {
                    let labelled = cal.kind == crate::spec::CalibrationKind::Fit;
                    (c.row_key(), labelled.then_some(r.label))
                })
            })
            .collect();
        let rows = rows?;
        let limit = self.prompt_limit(support);
        let left_out: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, (k, _))| {
                matches!(
                    cache.lookup(k, limit),
                    Lookup::Failed(_) | Lookup::TooLong { .. }
                )
            })
            .map(|(i, _)| i)
            .collect();
        // A probe's fit is also what its solver makes of the rows.
        let kind = match cal.kind {
            crate::spec::CalibrationKind::Probe => {
                format!("{}; {}", cal.kind.as_str(), crate::probe::solver())
            }
            k => k.as_str().to_string(),
        };
        let kind = kind.as_str();
        Some(
            CalibrationPart {
                kind,
                rows: &rows,
                left_out: &left_out,
            }
            .digest(),
        )
    }

    /// What a cascade's rows wait for, and how many go on at each step.
    pub fn cascade_note(&self, cascade: usize, routing: &Routing) -> String {
        let cp = &self.cascades[cascade];
        let spec = &self.spec.cascades[cp.spec];
        let Some(res) = routing.resolution(cascade) else {
            return format!("cascade {}: not resolved against the cache", spec.id);
        };
        let mut out = format!(
            "cascade {}: {} of {} rows answered",
            spec.id,
            res.answered(),
            self.dataset.rows.len()
        );
        for (k, e) in spec.escalate.iter().enumerate() {
            let to = &self.cell(cp.stages[k + 1]).id;
            let rule = match (e, res.thresholds[k]) {
                (crate::spec::Escalate::Margin(m), _) => format!("margin < {m}"),
                (crate::spec::Escalate::Fraction { fraction, .. }, Some(t)) => format!(
                    "margin < {t:.3}, fitted to send on {:.0}% of {} fit rows",
                    fraction * 100.0,
                    res.fit_rows[k].unwrap_or(0)
                ),
                (
                    crate::spec::Escalate::Fraction {
                        fraction, sample, ..
                    },
                    None,
                ) => format!(
                    "{:.0}% with the smallest margins; the threshold is fitted once the {} fit rows are computed",
                    fraction * 100.0,
                    sample.n
                ),
            };
            out.push_str(&format!(
                "; {} rows go on to {to} so far ({rule})",
                res.reached[k + 1]
            ));
        }
        if res.pending > 0 {
            out.push_str(&format!(
                "; {} stage rows to run before the rest is known",
                res.pending
            ));
        }
        if res.failed > 0 {
            out.push_str(&format!(
                "; {} rows wait on a stage row that failed",
                res.failed
            ));
        }
        out
    }

    /// Whether a cell's source is a model (not a vote).
    pub fn is_llm(&self, cell: usize) -> bool {
        matches!(self.cells[cell].source, Source::Llm { .. })
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Explanation {
    pub cell: String,
    pub rows: usize,
    pub cached: usize,
    /// Missing rows whose dataset row was never computed in any cell.
    pub never_computed: usize,
    /// Missing rows whose key is not known yet: the model file is not here (and the spec
    /// gives no sha256), or the row's retrieved examples need embeddings not computed yet.
    pub unknown: usize,
    /// For missing rows with a cached neighbour: the differing components and how many rows.
    pub differs: Vec<(String, usize)>,
    /// Rows whose last attempt failed, by error kind (they run again).
    pub failed: Vec<(String, usize)>,
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "cell {}: {} rows, {} cached",
            self.cell, self.rows, self.cached
        )?;
        for (what, n) in &self.differs {
            writeln!(
                f,
                "  {n} rows to run: {what} differs from the nearest cached row"
            )?;
        }
        for (kind, n) in &self.failed {
            writeln!(
                f,
                "  {n} rows to run: their last attempt failed ({kind}); the report lists the errors"
            )?;
        }
        if self.never_computed > 0 {
            writeln!(
                f,
                "  {} rows to run: never computed (no cached row for these dataset rows)",
                self.never_computed
            )?;
        }
        if self.unknown > 0 {
            writeln!(
                f,
                "  {} rows to run: their key is not known yet (a model file not here without a sha256 in the spec, or retrieved examples whose embeddings are not computed yet)",
                self.unknown
            )?;
        }
        Ok(())
    }
}
