//! `route:CASCADE/K` (which rows go on after stage K) and `cascade:CASCADE` (each row
//! answered by the stage it reached): read from the stages' cached rows.

use super::{Context, Kind, StageKind, StageStatus, add, route_id};

pub(super) struct Cascade;

impl Kind for Cascade {
    fn stages(&self, cx: &Context) -> Vec<StageStatus> {
        let plan = cx.plan;
        let mut out = Vec::new();
        for (ci, cp) in plan.cascades.iter().enumerate() {
            let res = cx.routing.resolution(ci);
            let name = &plan.spec.cascades[cp.spec].id;
            // What stage k reads: its cell's rows, its fit rows, its calibration.
            let stage_inputs = |k: usize| -> Vec<String> {
                let cell = plan.cell(cp.stages[k]);
                let fit = cp.fit_stages.get(k).copied().flatten();
                std::iter::once(cx.infer_id(cell))
                    .chain(fit.map(|i| cx.infer_id(&plan.support[i])))
                    .chain(cx.calibrate_id(cell))
                    .collect()
            };
            let steps = cp.stages.len().saturating_sub(1);
            for k in 0..steps {
                let mut inputs = stage_inputs(k);
                if k > 0 {
                    inputs.push(route_id(name, k - 1));
                }
                let (reached, answered) = res.map_or((0, 0), |r| {
                    (r.reached[k], r.reached[k].saturating_sub(r.reached[k + 1]))
                });
                out.push(
                    StageStatus::new(
                        route_id(name, k),
                        StageKind::Route,
                        reached,
                        answered,
                        "rows reaching this step (cached: answered here)",
                    )
                    .reading(inputs),
                );
            }
            let mut inputs = Vec::new();
            for id in (0..cp.stages.len())
                .flat_map(stage_inputs)
                .chain((0..steps).map(|k| route_id(name, k)))
            {
                add(&mut inputs, id);
            }
            out.push(
                StageStatus::new(
                    format!("cascade:{name}"),
                    StageKind::Cascade,
                    plan.dataset.rows.len(),
                    res.map_or(0, |r| r.answered()),
                    "rows answered (from the stages' cached rows)",
                )
                .reading(inputs),
            );
        }
        out
    }

    fn why(&self, cx: &Context, st: &StageStatus) -> Option<String> {
        let plan = cx.plan;
        let name = |ci: usize| &plan.spec.cascades[plan.cascades[ci].spec].id;
        let ci = (0..plan.cascades.len()).find(|&ci| {
            st.id == format!("cascade:{}", name(ci))
                || st.id.starts_with(&format!("route:{}/", name(ci)))
        })?;
        Some(plan.cascade_note(ci, cx.routing))
    }
}
