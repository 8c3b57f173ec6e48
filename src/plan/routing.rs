//! What the deciding stages decided: the `calibrate` stages' fits and the `route` stages'
//! routing (which rows a cascade sends on), read by the stages after them (the gated infer
//! stages, routing itself, metrics, serve). The plan is never changed by them: the
//! scheduler computes a [`Decided`] from the plan, the cache and the stored fits.

use std::collections::HashMap;

use super::{Cell, Plan};
use crate::calibrate::{CalibrationError, Params};
use crate::key::{Components, Digest};

/// What the cache says about a cascade's rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolution {
    /// The margin threshold of each step (`None` while its fit rows are not all computed).
    pub thresholds: Vec<Option<f64>>,
    /// How many fit rows each fitted step was fitted on.
    pub fit_rows: Vec<Option<usize>>,
    /// For each evaluation row, the stage that answers it (`None` while a row of a stage
    /// it reaches is not computed).
    pub answered_by: Vec<Option<usize>>,
    /// Evaluation rows that reach each stage, as far as known now.
    pub reached: Vec<usize>,
    /// Rows of a stage that the cascade needs and that are not cached yet.
    pub pending: usize,
    /// Rows waiting for a stage row whose last attempt failed.
    pub failed: usize,
}

impl Resolution {
    pub fn answered(&self) -> usize {
        self.answered_by.iter().flatten().count()
    }
}

/// The outputs of the deciding stages.
#[derive(Debug, Clone, Default)]
pub struct Decided {
    /// Each calibration's parameters (index into [`Plan::calibrations`]), or why it is not
    /// fitted yet.
    pub fits: Vec<Result<Params, CalibrationError>>,
    pub routing: Routing,
}

impl Decided {
    /// Calibration `calibration`'s fit, as the calibrate stage left it.
    pub fn fit(&self, calibration: usize) -> Result<Params, CalibrationError> {
        self.fits
            .get(calibration)
            .cloned()
            .unwrap_or(Err(CalibrationError::NotDecided))
    }

    pub fn resolution(&self, cascade: usize) -> Option<&Resolution> {
        self.routing.resolution(cascade)
    }
}

/// Which rows each gated cell is sent, and what is known of each cascade.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    /// One per cascade of the plan (empty before routing was computed).
    pub resolutions: Vec<Resolution>,
    /// Gated cell id → for each of its rows, whether routing sends it there.
    pub sent: HashMap<String, Vec<bool>>,
}

impl Routing {
    pub fn resolution(&self, cascade: usize) -> Option<&Resolution> {
        self.resolutions.get(cascade)
    }

    /// Whether row `row` of `cell` is needed: every row of a cell that is not gated; the
    /// rows routing sends to a gated one.
    pub fn needs(&self, cell: &Cell, row: usize) -> bool {
        !cell.gated
            || self
                .sent
                .get(&cell.id)
                .is_some_and(|s| s.get(row) == Some(&true))
    }
}

impl Plan {
    /// The keys of the rows of `cell` that are needed now (`None`: not needed, or an
    /// input is not known yet), by row.
    pub fn needed_rows<'a>(
        &'a self,
        cell: &'a Cell,
        routing: &'a Routing,
    ) -> impl Iterator<Item = (usize, Option<Components>)> + 'a {
        cell.rows
            .iter()
            .enumerate()
            .map(move |(i, c)| (i, c.filter(|_| routing.needs(cell, i))))
    }

    /// [`Plan::needed_rows`]' keys.
    pub fn needed_keys<'a>(
        &'a self,
        cell: &'a Cell,
        routing: &'a Routing,
    ) -> impl Iterator<Item = (usize, Option<Digest>)> + 'a {
        cell.rows
            .keys()
            .enumerate()
            .map(move |(i, k)| (i, k.filter(|_| routing.needs(cell, i))))
    }
}
