//! Vega-Lite v4 chart specs, built with `vega_lite_4`.

use serde_json::Value;
use vega_lite_4::{
    AnyMark, Aria, Axis, ColorClass, DomainElement, DomainUnion, EncodingTooltip, Field,
    HeightUnion, LayerElement, LayerEncoding, LegendText, Mark, RemovableValue, Scale, SortUnion,
    StandardType, StringFieldDef, Type, UrlData, UrlDataInlineDataset, Vegalite, X2Class, XClass,
    YClass,
};

use crate::metrics::CellMetrics;

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
