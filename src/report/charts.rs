//! Vega-Lite v4 chart specs, built with `vega_lite_4`.

use serde_json::Value;
use vega_lite_4::{
    Aggregate, AnyMark, Aria, Axis, ColorClass, DomainElement, DomainUnion, EdEncoding,
    EncodingTooltip, FacetEncodingFieldDef, Field, HeightUnion, LayerElement, LayerEncoding,
    LegendText, Mark, MarkPropDefStringNullTypeForShape, NonArgAggregateOp, RemovableValue, Scale,
    ScaleType, Scheme, SizeClass, SortUnion, StandardType, StringFieldDef, TitleUnion, Type,
    UrlData, UrlDataInlineDataset, Vegalite, X2Class, XClass, YClass,
};

use crate::metrics::{CellKind, CellMetrics};

fn field(name: &str) -> Option<Field> {
    Some(Field::String(name.to_string()))
}

fn title(t: &str) -> RemovableValue<LegendText> {
    RemovableValue::Specified(LegendText::String(t.to_string()))
}

fn unit_scale() -> RemovableValue<vega_lite_4::Scale> {
    RemovableValue::Specified(Scale {
        domain: Some(DomainUnion::UnionArray(vec![
            Some(DomainElement::Double(0.0)),
            Some(DomainElement::Double(1.0)),
        ])),
        zero: Some(Aria::Bool(true)),
        ..Default::default()
    })
}

fn tooltip(fields: &[(&str, StandardType, &str)]) -> Option<EncodingTooltip> {
    Some(EncodingTooltip::StringFieldDefArray(
        fields
            .iter()
            .map(|(f, t, ti)| StringFieldDef {
                field: field(f),
                string_field_def_type: Some(t.clone()),
                title: title(ti),
                ..Default::default()
            })
            .collect(),
    ))
}

fn inline(values: Vec<Value>) -> RemovableValue<UrlData> {
    RemovableValue::Specified(UrlData {
        values: Some(UrlDataInlineDataset::UnionArray(values)),
        ..Default::default()
    })
}

/// Accuracy per cell, with its 95% Wilson interval as a rule.
pub fn accuracy(metrics: &[CellMetrics]) -> Vegalite {
    let values: Vec<Value> = metrics
        .iter()
        .filter(|m| m.n > 0)
        .map(|m| {
            serde_json::json!({
                "cell": m.cell, "model": m.model, "prompt": m.prompt, "method": m.method,
                "accuracy": m.accuracy, "lo": m.accuracy_lo, "hi": m.accuracy_hi, "n": m.n,
                "invalid": m.invalid,
            })
        })
        .collect();
    let y = || YClass {
        field: field("cell"),
        position_def_type: Some(Type::Nominal),
        title: RemovableValue::Remove,
        sort: RemovableValue::Specified(SortUnion::UnionArray(
            metrics
                .iter()
                .map(|m| vega_lite_4::SelectionInitInterval::String(m.cell.clone()))
                .collect(),
        )),
        axis: RemovableValue::Specified(Axis {
            label_limit: Some(vega_lite_4::CornerRadiusUnion::Double(420.0)),
            ..Default::default()
        }),
        ..Default::default()
    };
    Vegalite {
        title: Some(vega_lite_4::TitleUnion::String(
            "Accuracy per cell (95% Wilson interval)".into(),
        )),
        data: inline(values),
        width: Some(HeightUnion::Double(420.0)),
        layer: Some(vec![
            LayerElement {
                mark: Some(AnyMark::Enum(Mark::Bar)),
                encoding: Some(LayerEncoding {
                    y: Some(y()),
                    x: Some(XClass {
                        field: field("accuracy"),
                        position_def_type: Some(Type::Quantitative),
                        scale: unit_scale(),
                        title: title("accuracy"),
                        ..Default::default()
                    }),
                    color: Some(ColorClass {
                        field: field("model"),
                        mark_prop_def_gradient_string_null_type: Some(Type::Nominal),
                        ..Default::default()
                    }),
                    tooltip: tooltip(&[
                        ("cell", StandardType::Nominal, "cell"),
                        ("accuracy", StandardType::Quantitative, "accuracy"),
                        ("lo", StandardType::Quantitative, "95% low"),
                        ("hi", StandardType::Quantitative, "95% high"),
                        ("n", StandardType::Quantitative, "rows"),
                        ("invalid", StandardType::Quantitative, "invalid answers"),
                    ]),
                    ..Default::default()
                }),
                ..Default::default()
            },
            LayerElement {
                mark: Some(AnyMark::Enum(Mark::Rule)),
                encoding: Some(LayerEncoding {
                    y: Some(y()),
                    x: Some(XClass {
                        field: field("lo"),
                        position_def_type: Some(Type::Quantitative),
                        scale: unit_scale(),
                        ..Default::default()
                    }),
                    x2: Some(X2Class {
                        field: field("hi"),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

fn chart_title(t: &str) -> Option<TitleUnion> {
    Some(TitleUnion::String(t.to_string()))
}

fn color(f: &str, t: &str) -> Option<ColorClass> {
    Some(ColorClass {
        field: field(f),
        mark_prop_def_gradient_string_null_type: Some(Type::Nominal),
        title: title(t),
        ..Default::default()
    })
}

fn quant_x(f: &str, t: &str, scale: RemovableValue<Scale>) -> XClass {
    XClass {
        field: field(f),
        position_def_type: Some(Type::Quantitative),
        title: title(t),
        scale,
        ..Default::default()
    }
}

fn quant_y(f: &str, t: &str, scale: RemovableValue<Scale>) -> YClass {
    YClass {
        field: field(f),
        position_def_type: Some(Type::Quantitative),
        title: title(t),
        scale,
        ..Default::default()
    }
}

/// Accuracy against temperature, one line per model · prompt · method (mean over seeds).
pub fn accuracy_vs_temperature(metrics: &[CellMetrics]) -> Option<Vegalite> {
    let values: Vec<Value> = metrics
        .iter()
        .filter(|m| m.n > 0)
        .filter_map(|m| {
            m.temperature.map(|t| {
                serde_json::json!({
                    "series": format!("{} · {} · {}", m.model, m.prompt, m.method),
                    "temperature": t, "accuracy": m.accuracy, "cell": m.cell,
                })
            })
        })
        .collect();
    if values.is_empty() {
        return None;
    }
    let enc = |mark: Mark| LayerElement {
        mark: Some(AnyMark::Enum(mark)),
        encoding: Some(LayerEncoding {
            x: Some(quant_x(
                "temperature",
                "temperature",
                RemovableValue::Default,
            )),
            y: Some(YClass {
                aggregate: Some(Aggregate::Enum(NonArgAggregateOp::Mean)),
                ..quant_y("accuracy", "accuracy (mean over seeds)", unit_scale())
            }),
            color: color("series", "model · prompt · method"),
            tooltip: tooltip(&[
                ("series", StandardType::Nominal, "setting"),
                ("temperature", StandardType::Quantitative, "temperature"),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(Vegalite {
        title: chart_title("Accuracy vs temperature"),
        data: inline(values),
        width: Some(HeightUnion::Double(420.0)),
        layer: Some(vec![enc(Mark::Line), enc(Mark::Point)]),
        ..Default::default()
    })
}

/// What the cost axes plot: compute from the rows' tokens where every plotted cell's model
/// size is known (the same on any machine), else wall-clock time as it was measured.
#[derive(Clone, Copy, PartialEq)]
enum CostAxis {
    Compute,
    WallClock,
}

impl CostAxis {
    fn of(metrics: &[CellMetrics]) -> Self {
        let plotted: Vec<&CellMetrics> = metrics
            .iter()
            .filter(|m| m.n > 0 && m.work.is_some())
            .collect();
        if !plotted.is_empty()
            && plotted
                .iter()
                .all(|m| m.work.and_then(|w| w.flops).is_some())
        {
            Self::Compute
        } else {
            Self::WallClock
        }
    }

    /// A cell's cost per row on this axis, where it has one.
    fn per_row(self, m: &CellMetrics) -> Option<f64> {
        match self {
            Self::Compute => m.work.and_then(|w| w.gflop()).filter(|g| *g > 0.0),
            Self::WallClock => (m.n > 0 && m.compute_s > 0.0).then(|| m.compute_s / m.n as f64),
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Compute => "GFLOP per row (2 × parameters × tokens; log scale)",
            Self::WallClock => "seconds per row, wall-clock as measured (log scale)",
        }
    }
}

/// The cost/quality frontier: accuracy against each cell's cost per row on its own.
pub fn cost_quality(metrics: &[CellMetrics]) -> Vegalite {
    let axis = CostAxis::of(metrics);
    let values: Vec<Value> = metrics
        .iter()
        .filter(|m| m.n > 0)
        .filter_map(|m| {
            Some(serde_json::json!({
                "cell": m.cell, "model": m.model, "prompt": m.prompt, "method": m.method,
                "accuracy": m.accuracy, "cost": axis.per_row(m)?,
            }))
        })
        .collect();
    Vegalite {
        title: chart_title(match axis {
            CostAxis::Compute => "Accuracy vs compute (GFLOP a row, each cell on its own)",
            CostAxis::WallClock => {
                "Accuracy vs wall-clock time (each cell on its own, as measured)"
            }
        }),
        data: inline(values),
        width: Some(HeightUnion::Double(420.0)),
        mark: Some(AnyMark::Enum(Mark::Point)),
        encoding: Some(Box::new(EdEncoding {
            x: Some(quant_x(
                "cost",
                axis.title(),
                RemovableValue::Specified(Scale {
                    scale_type: Some(ScaleType::Log),
                    ..Default::default()
                }),
            )),
            y: Some(quant_y("accuracy", "accuracy", unit_scale())),
            color: color("model", "model"),
            shape: Some(MarkPropDefStringNullTypeForShape {
                field: field("prompt"),
                mark_prop_def_string_null_type_for_shape_type: Some(Type::Nominal),
                title: title("prompt"),
                ..Default::default()
            }),
            size: Some(SizeClass {
                value: Some(vega_lite_4::CornerRadiusUnion::Double(90.0)),
                ..Default::default()
            }),
            tooltip: tooltip(&[
                ("cell", StandardType::Nominal, "cell"),
                ("accuracy", StandardType::Quantitative, "accuracy"),
                ("cost", StandardType::Quantitative, "cost per row"),
            ]),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Confusion matrices, one panel per cell; the last predicted column counts invalid answers.
pub fn confusion(metrics: &[CellMetrics], labels: &[String]) -> Vegalite {
    let mut values = Vec::new();
    for m in metrics.iter().filter(|m| m.n > 0) {
        for (g, row) in m.confusion.iter().enumerate() {
            for (p, &count) in row.iter().enumerate() {
                let predicted = labels.get(p).cloned().unwrap_or_else(|| "(invalid)".into());
                values.push(serde_json::json!({
                    "cell": m.cell, "gold": labels[g], "predicted": predicted, "count": count,
                }));
            }
        }
    }
    let mut order: Vec<vega_lite_4::SelectionInitInterval> = labels
        .iter()
        .map(|l| vega_lite_4::SelectionInitInterval::String(l.clone()))
        .collect();
    order.push(vega_lite_4::SelectionInitInterval::String(
        "(invalid)".into(),
    ));
    Vegalite {
        title: chart_title("Confusion matrices (rows: gold, columns: predicted)"),
        data: inline(values),
        mark: Some(AnyMark::Enum(Mark::Rect)),
        encoding: Some(Box::new(EdEncoding {
            facet: Some(FacetEncodingFieldDef {
                field: field("cell"),
                facet_encoding_field_def_type: Some(StandardType::Nominal),
                columns: Some(3.0),
                title: RemovableValue::Remove,
                ..Default::default()
            }),
            x: Some(XClass {
                field: field("predicted"),
                position_def_type: Some(Type::Nominal),
                sort: RemovableValue::Specified(SortUnion::UnionArray(order.clone())),
                title: title("predicted"),
                ..Default::default()
            }),
            y: Some(YClass {
                field: field("gold"),
                position_def_type: Some(Type::Nominal),
                sort: RemovableValue::Specified(SortUnion::UnionArray(order)),
                title: title("gold"),
                ..Default::default()
            }),
            color: Some(ColorClass {
                field: field("count"),
                mark_prop_def_gradient_string_null_type: Some(Type::Quantitative),
                scale: RemovableValue::Specified(Scale {
                    scheme: Some(Scheme::String("blues".into())),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            tooltip: tooltip(&[
                ("cell", StandardType::Nominal, "cell"),
                ("gold", StandardType::Nominal, "gold"),
                ("predicted", StandardType::Nominal, "predicted"),
                ("count", StandardType::Quantitative, "rows"),
            ]),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Reliability diagram of the log-likelihood cells: accuracy against mean confidence per bin.
pub fn calibration(metrics: &[CellMetrics]) -> Option<Vegalite> {
    let mut values = Vec::new();
    for m in metrics.iter().filter(|m| !m.reliability.is_empty()) {
        for b in m.reliability.iter().filter(|b| b.count > 0) {
            values.push(serde_json::json!({
                "cell": m.cell, "confidence": b.mean_confidence, "accuracy": b.accuracy,
                "rows": b.count, "bin": format!("{:.1}–{:.1}", b.lo, b.hi),
            }));
        }
    }
    if values.is_empty() {
        return None;
    }
    let diagonal = LayerElement {
        data: inline(vec![
            serde_json::json!({"confidence": 0.0, "accuracy": 0.0}),
            serde_json::json!({"confidence": 1.0, "accuracy": 1.0}),
        ]),
        mark: Some(AnyMark::Enum(Mark::Line)),
        encoding: Some(LayerEncoding {
            x: Some(XClass {
                title: RemovableValue::Remove,
                ..quant_x("confidence", "", unit_scale())
            }),
            y: Some(YClass {
                title: RemovableValue::Remove,
                ..quant_y("accuracy", "", unit_scale())
            }),
            color: Some(ColorClass {
                value: Some(
                    vega_lite_4::ConditionalValueDefGradientStringNullExprRefValue::String(
                        "#bbbbbb".into(),
                    ),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bins = |mark: Mark, sized: bool| LayerElement {
        mark: Some(AnyMark::Enum(mark)),
        encoding: Some(LayerEncoding {
            x: Some(quant_x(
                "confidence",
                "mean confidence of the predicted label",
                unit_scale(),
            )),
            y: Some(quant_y("accuracy", "accuracy", unit_scale())),
            color: color("cell", "cell"),
            size: sized.then(|| SizeClass {
                field: field("rows"),
                mark_prop_def_number_type: Some(Type::Quantitative),
                ..Default::default()
            }),
            tooltip: tooltip(&[
                ("cell", StandardType::Nominal, "cell"),
                ("bin", StandardType::Nominal, "confidence bin"),
                ("rows", StandardType::Quantitative, "rows"),
                ("accuracy", StandardType::Quantitative, "accuracy"),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(Vegalite {
        title: chart_title("Calibration of log-likelihood cells (reliability diagram)"),
        data: inline(values),
        width: Some(HeightUnion::Double(360.0)),
        height: Some(HeightUnion::Double(360.0)),
        layer: Some(vec![
            diagonal,
            bins(Mark::Line, false),
            bins(Mark::Point, true),
        ]),
        ..Default::default()
    })
}

/// Per cell, the share of rows predicted as each label (and invalid) beside the gold
/// shares: a model that answers one label to most rows shows at a glance.
pub fn label_shares(metrics: &[CellMetrics], labels: &[String], gold: &[f64]) -> Value {
    let names: Vec<String> = labels
        .iter()
        .cloned()
        .chain(std::iter::once("(invalid)".to_string()))
        .collect();
    let mut values: Vec<Value> = gold
        .iter()
        .zip(&names)
        .map(
            |(s, l)| serde_json::json!({"cell": "gold labels", "label": l, "share": s, "order": 0}),
        )
        .collect();
    for m in metrics.iter().filter(|m| m.n > 0) {
        for (s, l) in m.predicted_share.iter().zip(&names) {
            values.push(serde_json::json!({"cell": m.cell, "label": l, "share": s, "order": 1}));
        }
    }
    let mut cells = vec!["gold labels".to_string()];
    cells.extend(metrics.iter().filter(|m| m.n > 0).map(|m| m.cell.clone()));
    serde_json::json!({
        "$schema": "https://vega.github.io/schema/vega-lite/v4.json",
        "title": "Predicted labels per cell, beside the gold labels",
        "data": {"values": values},
        "mark": "bar",
        "width": 420,
        "encoding": {
            "y": {"field": "cell", "type": "nominal", "sort": cells, "title": null,
                  "axis": {"labelLimit": 420}},
            "x": {"field": "share", "type": "quantitative", "stack": "normalize",
                  "title": "share of rows", "axis": {"format": "%"}},
            "color": {"field": "label", "type": "nominal", "sort": names, "title": "label"},
            "order": {"field": "label", "type": "nominal"},
            "tooltip": [
                {"field": "cell", "type": "nominal"},
                {"field": "label", "type": "nominal"},
                {"field": "share", "type": "quantitative", "format": ".1%"}
            ]
        }
    })
}

/// Reliability of calibrated cells before and after calibration.
pub fn calibration_shift(metrics: &[CellMetrics]) -> Option<Value> {
    let mut values = Vec::new();
    for m in metrics {
        let Some(u) = &m.uncalibrated else { continue };
        for (stage, bins) in [("before", &u.reliability), ("after", &m.reliability)] {
            for b in bins.iter().filter(|b| b.count > 0) {
                values.push(serde_json::json!({
                    "cell": m.cell, "stage": stage, "confidence": b.mean_confidence,
                    "accuracy": b.accuracy, "rows": b.count,
                }));
            }
        }
    }
    if values.is_empty() {
        return None;
    }
    Some(serde_json::json!({
        "$schema": "https://vega.github.io/schema/vega-lite/v4.json",
        "title": "Calibrated cells: reliability before and after calibration",
        "data": {"values": values},
        "facet": {"field": "cell", "type": "nominal", "title": null},
        "columns": 3,
        "spec": {
            "width": 220, "height": 220,
            "layer": [
                {"mark": {"type": "rule", "color": "#bbb"},
                 "encoding": {"x": {"datum": 0.5, "type": "quantitative"}, "y": {"datum": 0.5, "type": "quantitative"},
                              "x2": {"datum": 1}, "y2": {"datum": 1}}},
                {"mark": {"type": "line", "point": true},
                 "encoding": {
                    "x": {"field": "confidence", "type": "quantitative", "scale": {"domain": [0.5, 1]}, "title": "confidence"},
                    "y": {"field": "accuracy", "type": "quantitative", "scale": {"domain": [0, 1]}, "title": "accuracy"},
                    "color": {"field": "stage", "type": "nominal", "sort": ["before", "after"]},
                    "tooltip": [{"field": "stage"}, {"field": "confidence", "format": ".2f"},
                                {"field": "accuracy", "format": ".2f"}, {"field": "rows"}]
                 }}
            ]
        }
    }))
}

/// Accuracy against the seconds a row costs: each model cell a point, each cascade a
/// curve over the share its first step sends on, with the threshold it uses marked.
pub fn cascade_frontier(metrics: &[CellMetrics]) -> Option<Value> {
    let cascades: Vec<&CellMetrics> = metrics.iter().filter(|m| m.cascade.is_some()).collect();
    if cascades.is_empty() {
        return None;
    }
    let axis = CostAxis::of(metrics);
    let mut values: Vec<Value> = metrics
        .iter()
        .filter(|m| m.cascade.is_none() && m.n > 0)
        .filter_map(|m| {
            Some(serde_json::json!({
                "series": m.model, "kind": "cell", "cell": m.cell, "accuracy": m.accuracy,
                "cost": axis.per_row(m)?, "escalated": null,
            }))
        })
        .collect();
    for m in &cascades {
        let s = m.cascade.as_ref().expect("filtered");
        for p in &s.curve {
            let cost = match axis {
                CostAxis::Compute => p.gflop_per_row,
                CostAxis::WallClock => Some(p.seconds_per_row),
            };
            let Some(cost) = cost else { continue };
            values.push(serde_json::json!({
                "series": m.cell, "kind": "curve", "cell": m.cell, "accuracy": p.accuracy,
                "cost": cost, "escalated": p.escalated,
            }));
        }
        if let Some(cost) = axis.per_row(m) {
            values.push(serde_json::json!({
                "series": m.cell, "kind": "chosen", "cell": m.cell, "accuracy": m.accuracy,
                "cost": cost,
                "escalated": s.reached.get(1).map(|&r| r as f64 / s.rows.max(1) as f64),
            }));
        }
    }
    let x = serde_json::json!({"field": "cost", "type": "quantitative", "scale": {"type": "log"},
        "title": axis.title()});
    let y = serde_json::json!({"field": "accuracy", "type": "quantitative", "scale": {"zero": false},
        "title": "accuracy"});
    let tip = serde_json::json!([{"field": "cell"}, {"field": "accuracy", "format": ".3f"},
        {"field": "cost", "format": ".3~g", "title": match axis {
            CostAxis::Compute => "GFLOP/row",
            CostAxis::WallClock => "s/row",
        }},
        {"field": "escalated", "format": ".0%", "title": "sent on"}]);
    Some(serde_json::json!({
        "$schema": "https://vega.github.io/schema/vega-lite/v4.json",
        "title": "Accuracy vs cost: model cells and cascades over their threshold",
        "data": {"values": values},
        "width": 420,
        "layer": [
            {"transform": [{"filter": "datum.kind == 'cell'"}],
             "mark": {"type": "point", "filled": true, "opacity": 0.6},
             "encoding": {"x": x, "y": y, "color": {"field": "series", "type": "nominal", "title": "model / cascade"},
                          "tooltip": tip}},
            {"transform": [{"filter": "datum.kind == 'curve'"}],
             "mark": {"type": "line", "point": false},
             "encoding": {"x": x, "y": y, "order": {"field": "escalated", "type": "quantitative"},
                          "color": {"field": "series", "type": "nominal"}, "tooltip": tip}},
            {"transform": [{"filter": "datum.kind == 'chosen'"}],
             "mark": {"type": "point", "shape": "diamond", "size": 140, "filled": true},
             "encoding": {"x": x, "y": y, "color": {"field": "series", "type": "nominal"}, "tooltip": tip}}
        ]
    }))
}

/// A grid with more cells than this gets a heatmap.
pub const HEATMAP_ABOVE_CELLS: usize = 12;

/// A large grid at a glance: accuracy by prompt (rows) and method with its sampler setting
/// (columns), one panel per model; cascades, ensembles and votes are left to the tables.
pub fn heatmap(metrics: &[CellMetrics]) -> Option<Value> {
    let values: Vec<Value> = metrics
        .iter()
        .filter(|m| m.n > 0 && m.cascade.is_none() && !m.prompt.is_empty())
        .filter(|m| !matches!(m.kind, CellKind::Ensemble | CellKind::KnnVote))
        .map(|m| {
            // The method with its sampler point: `generate@t=0.2,seed=1`, `loglik-fit`.
            let column = m
                .cell
                .strip_prefix(&format!("{}/{}/", m.model, m.prompt))
                .unwrap_or(&m.method)
                .to_string();
            serde_json::json!({
                "model": m.model, "prompt": m.prompt, "method": column, "cell": m.cell,
                "accuracy": m.accuracy, "lo": m.accuracy_lo, "hi": m.accuracy_hi,
            })
        })
        .collect();
    if values.len() <= HEATMAP_ABOVE_CELLS {
        return None;
    }
    let tip = serde_json::json!([{"field": "cell"}, {"field": "accuracy", "format": ".1%"},
        {"field": "lo", "format": ".1%", "title": "95% low"}, {"field": "hi", "format": ".1%", "title": "95% high"}]);
    // Labels at full length come from `with_full_labels`, as on every chart.
    let x = serde_json::json!({"field": "method", "type": "nominal", "title": "method",
        "axis": {"labelAngle": -40}});
    let y = serde_json::json!({"field": "prompt", "type": "nominal", "title": "prompt"});
    Some(serde_json::json!({
        "$schema": "https://vega.github.io/schema/vega-lite/v4.json",
        "title": "Accuracy by prompt × method, per model",
        "data": {"values": values},
        "facet": {"column": {"field": "model", "type": "nominal", "title": null,
                             "header": {"labelFontSize": 13}}},
        "resolve": {"scale": {"x": "independent"}},
        "spec": {
            "width": {"step": 46},
            "height": {"step": 26},
            "layer": [
                {"mark": "rect",
                 "encoding": {"x": x, "y": y,
                              "color": {"field": "accuracy", "type": "quantitative", "title": "accuracy",
                                        "scale": {"scheme": "viridis"}, "legend": {"format": ".0%"}},
                              "tooltip": tip}},
                {"mark": {"type": "text", "fontSize": 10},
                 "encoding": {"x": x, "y": y,
                              "text": {"field": "accuracy", "type": "quantitative", "format": ".0%"},
                              "color": {"condition": {"test": "datum.accuracy > 0.8", "value": "black"}, "value": "white"},
                              "tooltip": tip}}
            ]
        }
    }))
}

/// What every chart is drawn with: labels and legends at their full length (never cut to
/// an ellipsis), and the drawing grown to hold them.
pub fn with_full_labels(mut chart: Value) -> Value {
    let config = chart
        .as_object_mut()
        .map(|c| c.entry("config").or_insert_with(|| serde_json::json!({})));
    if let Some(Value::Object(config)) = config {
        for (part, settings) in [
            (
                "legend",
                serde_json::json!({"labelLimit": 0, "symbolLimit": 0, "titleLimit": 0}),
            ),
            (
                "axis",
                serde_json::json!({"labelLimit": 0, "titleLimit": 0}),
            ),
            (
                "header",
                serde_json::json!({"labelLimit": 0, "titleLimit": 0}),
            ),
        ] {
            let entry = config.entry(part).or_insert_with(|| serde_json::json!({}));
            if let (Value::Object(e), Value::Object(s)) = (entry, settings) {
                for (k, v) in s {
                    e.entry(k).or_insert(v);
                }
            }
        }
    }
    if let Some(c) = chart.as_object_mut() {
        c.entry("autosize")
            .or_insert_with(|| serde_json::json!({"type": "pad"}));
    }
    chart
}
