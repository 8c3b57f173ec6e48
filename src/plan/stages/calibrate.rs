//! `calibrate:CELL`: a calibrated cell's fit, from its fit rows' cached scores; stored once
//! they are all computed, and read back by the stages after it.

use super::{Context, Kind, StageKind, StageStatus};

pub(super) struct Calibrate;

impl Kind for Calibrate {
    fn stages(&self, cx: &Context) -> Vec<StageStatus> {
        let plan = cx.plan;
        plan.cells
            .iter()
            .filter_map(|c| {
                let cal = &plan.calibrations[c.calibration?];
                let key = plan.calibration_key(c, cx.cache);
                let cached = key.is_some_and(|k| cx.store.contains(&k));
                Some(
                    StageStatus::new(
                        format!("calibrate:{}", c.id),
                        StageKind::Calibrate,
                        1,
                        usize::from(cached),
                        "fits",
                    )
                    .reading(vec![cx.infer_id(&plan.support[cal.support])])
                    .keyed([key]),
                )
            })
            .collect()
    }

    fn why(&self, _: &Context, _: &StageStatus) -> Option<String> {
        Some("the fit is computed from its rows' cached scores once they are all computed".into())
    }
}
