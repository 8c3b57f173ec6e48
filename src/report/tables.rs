//! `predictions.parquet` and `metrics.parquet`.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Float64Builder, ListBuilder, RecordBatch, StringArray,
    StringBuilder, UInt32Array, UInt64Array,
};
use arrow::datatypes::{Field, Schema};
use parquet::arrow::ArrowWriter;

use crate::fs::AtomicFile;
use crate::metrics::{CellMetrics, Comparison, Failure, Prediction};
use crate::plan::Plan;
use crate::table::TableError;

/// How a table is written to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// zstd-compressed Parquet.
    Parquet,
    /// CSV; list columns are left out (their values also have columns of their own).
    Csv,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Csv => "csv",
        }
    }
}

/// Why a table could not be written: its batches could not be made (`Source`), encoded,
/// or stored.
#[derive(Debug)]
pub enum WriteError<E = TableError> {
    Source(E),
    Table(TableError),
    Io(std::io::Error),
}

impl<E> From<TableError> for WriteError<E> {
    fn from(e: TableError) -> Self {
        WriteError::Table(e)
    }
}

/// Rows per Parquet row group: the writer holds one group's pages at a time.
const ROW_GROUP_ROWS: usize = 65_536;

/// Write a table given as batches (at least one, for its columns) to `path`, a batch at a
/// time, atomically: readers see the old file or the whole new one.
pub fn write<E>(
    path: &Path,
    format: Format,
    batches: impl IntoIterator<Item = Result<RecordBatch, E>>,
) -> Result<(), WriteError<E>> {
    let mut file = AtomicFile::create(path).map_err(WriteError::Io)?;
    let mut batches = batches.into_iter();
    let Some(first) = batches.next() else {
        return Err(WriteError::Table(TableError::Invalid(
            "a table without columns".into(),
        )));
    };
    let first = first.map_err(WriteError::Source)?;
    match format {
        Format::Parquet => {
            let props = parquet::file::properties::WriterProperties::builder()
                .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
                .set_max_row_group_size(ROW_GROUP_ROWS)
                .build();
            let mut w = ArrowWriter::try_new(file.file(), first.schema(), Some(props))
                .map_err(TableError::from)?;
            w.write(&first).map_err(TableError::from)?;
            for b in batches {
                w.write(&b.map_err(WriteError::Source)?)
                    .map_err(TableError::from)?;
            }
            w.close().map_err(TableError::from)?;
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(std::io::BufWriter::new(file.file()));
            w.write(&flat(&first)?).map_err(TableError::from)?;
            for b in batches {
                w.write(&flat(&b.map_err(WriteError::Source)?)?)
                    .map_err(TableError::from)?;
            }
            let mut inner = w.into_inner();
            std::io::Write::flush(&mut inner).map_err(WriteError::Io)?;
        }
    }
    file.commit().map_err(WriteError::Io)
}

/// A batch without its list columns.
fn flat(batch: &RecordBatch) -> Result<RecordBatch, TableError> {
    let keep: Vec<usize> = (0..batch.num_columns())
        .filter(|&i| {
            !matches!(
                batch.schema().field(i).data_type(),
                arrow::datatypes::DataType::List(_)
            )
        })
        .collect();
    batch.project(&keep).map_err(TableError::from)
}

fn batch(cols: Vec<(&str, ArrayRef)>) -> Result<RecordBatch, TableError> {
    let fields: Vec<Field> = cols
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        cols.into_iter().map(|(_, a)| a).collect(),
    )
    .map_err(TableError::from)
}

fn strs<I: IntoIterator<Item = Option<String>>>(it: I) -> ArrayRef {
    Arc::new(StringArray::from_iter(it))
}

fn f64s<I: IntoIterator<Item = Option<f64>>>(it: I) -> ArrayRef {
    Arc::new(Float64Array::from_iter(it))
}

fn u64s<I: IntoIterator<Item = u64>>(it: I) -> ArrayRef {
    Arc::new(UInt64Array::from_iter_values(it))
}

/// One row per dataset row × cell.
pub fn predictions(plan: &Plan, preds: &[Prediction]) -> Result<RecordBatch, TableError> {
    let labels = plan.dataset.label_names();
    let cell = |p: &Prediction| &plan.cells[p.cell];
    // Each cell's names, made once rather than once per row.
    let names: Vec<(String, String, String)> =
        plan.cells.iter().map(|c| plan.cell_names(c)).collect();
    let mut cols: Vec<(&str, ArrayRef)> = vec![
        ("cell", strs(preds.iter().map(|p| Some(cell(p).id.clone())))),
        (
            "model",
            strs(preds.iter().map(|p| Some(names[p.cell].0.clone()))),
        ),
        (
            "prompt",
            strs(preds.iter().map(|p| Some(names[p.cell].1.clone()))),
        ),
        (
            "method",
            strs(preds.iter().map(|p| Some(names[p.cell].2.clone()))),
        ),
        (
            "temperature",
            f64s(preds.iter().map(|p| cell(p).point.map(|x| x.temperature))),
        ),
        (
            "seed",
            Arc::new(UInt64Array::from_iter(
                preds.iter().map(|p| cell(p).point.map(|x| x.seed)),
            )),
        ),
        (
            "row_id",
            strs(
                preds
                    .iter()
                    .map(|p| Some(plan.dataset.rows[p.row].id.clone())),
            ),
        ),
        (
            "row_index",
            u64s(preds.iter().map(|p| plan.dataset.rows[p.row].index as u64)),
        ),
        (
            "gold",
            strs(preds.iter().map(|p| Some(plan.dataset.gold(p.row)))),
        ),
        (
            "prediction",
            strs(
                preds
                    .iter()
                    .map(|p| p.predicted.map(|i| plan.dataset.answer(p.row, i))),
            ),
        ),
        (
            "valid",
            Arc::new(BooleanArray::from_iter(
                preds.iter().map(|p| Some(p.predicted.is_some())),
            )),
        ),
        (
            "correct",
            Arc::new(BooleanArray::from_iter(
                preds.iter().map(|p| Some(p.correct())),
            )),
        ),
        (
            "raw_answer",
            strs(preds.iter().map(|p| p.raw.as_deref().map(str::to_string))),
        ),
    ];
    let f64_lists = |f: &dyn Fn(&Prediction) -> Option<Vec<f64>>| -> ArrayRef {
        let mut b = ListBuilder::new(Float64Builder::new());
        for p in preds {
            match f(p) {
                Some(v) => {
                    b.values().append_slice(&v);
                    b.append(true);
                }
                None => b.append(false),
            }
        }
        Arc::new(b.finish())
    };
    cols.push(("label_logprobs", f64_lists(&|p| p.logprobs.clone())));
    cols.push((
        "uncalibrated_label_logprobs",
        f64_lists(&|p| p.uncalibrated.clone()),
    ));
    // The retrieved examples each row was shown.
    let shown = |p: &Prediction| {
        let c = cell(p);
        plan.sets[c.set].shots.get(c.prompt()?)?[p.row].as_ref()
    };
    let mut ids = ListBuilder::new(StringBuilder::new());
    for p in preds {
        match shown(p) {
            Some(s) => {
                for id in &s.ids {
                    ids.values().append_value(id);
                }
                ids.append(true);
            }
            None => ids.append(false),
        }
    }
    cols.push(("shot_ids", Arc::new(ids.finish())));
    cols.push((
        "shot_similarities",
        f64_lists(&|p| shown(p).map(|s| s.similarity.iter().map(|&x| f64::from(x)).collect())),
    ));
    let logprob_cols: Vec<(String, ArrayRef)> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            (
                format!("logprob_{l}"),
                f64s(
                    preds
                        .iter()
                        .map(|p| p.logprobs.as_ref().and_then(|v| v.get(i).copied())),
                ),
            )
        })
        .collect();
    for (name, arr) in &logprob_cols {
        cols.push((name.as_str(), arr.clone()));
    }
    let u32s = |f: &dyn Fn(&Prediction) -> u32| -> ArrayRef {
        Arc::new(UInt32Array::from_iter_values(preds.iter().map(f)))
    };
    let mut finish = StringBuilder::new();
    for p in preds {
        finish.append_value(p.finish.as_str());
    }
    cols.extend([
        ("prompt_tokens", u32s(&|p| p.prompt_tokens)),
        ("evaluated_tokens", u32s(&|p| p.evaluated_tokens)),
        ("generated_tokens", u32s(&|p| p.gen_tokens)),
        // The row's cost from its tokens (issue #31): the same whatever ran before it.
        (
            "work_prompt_tokens",
            f64s(preds.iter().map(|p| Some(p.work.prompt_tokens))),
        ),
        (
            "work_gen_tokens",
            f64s(preds.iter().map(|p| Some(p.work.generated_tokens))),
        ),
        ("gflop", f64s(preds.iter().map(|p| p.work.gflop()))),
        ("finish", Arc::new(finish.finish()) as ArrayRef),
        ("latency_ms", f64s(preds.iter().map(|p| Some(p.latency_ms)))),
        (
            "shared_latency_ms",
            f64s(preds.iter().map(|p| Some(p.shared_latency_ms))),
        ),
        ("prefill_ms", f64s(preds.iter().map(|p| Some(p.prefill_ms)))),
        ("decode_ms", f64s(preds.iter().map(|p| Some(p.decode_ms)))),
        ("prefill_shared_by", u32s(&|p| p.shared_by)),
        (
            "from_cache",
            Arc::new(BooleanArray::from_iter(
                preds.iter().map(|p| Some(p.from_cache)),
            )),
        ),
        (
            "host",
            strs(preds.iter().map(|p| p.host.as_deref().map(str::to_string))),
        ),
        (
            "shard",
            strs(preds.iter().map(|p| p.shard.as_deref().map(str::to_string))),
        ),
        (
            "cascade_stage",
            Arc::new(UInt32Array::from_iter(
                preds.iter().map(|p| p.stage.map(|k| k as u32)),
            )),
        ),
    ]);
    batch(cols)
}

/// One row per cell.
pub fn metrics(m: &[CellMetrics], labels: &[String]) -> Result<RecordBatch, TableError> {
    let s = |f: &dyn Fn(&CellMetrics) -> String| strs(m.iter().map(|x| Some(f(x))));
    // A rate of a cell with no answered row is unknown, not 0: null.
    let f = |g: &dyn Fn(&CellMetrics) -> f64| f64s(m.iter().map(|x| (x.n > 0).then(|| g(x))));
    let u = |g: &dyn Fn(&CellMetrics) -> u64| u64s(m.iter().map(g));
    let mut cols: Vec<(String, ArrayRef)> = vec![
        ("cell".into(), s(&|x| x.cell.clone())),
        ("model".into(), s(&|x| x.model.clone())),
        ("prompt".into(), s(&|x| x.prompt.clone())),
        ("method".into(), s(&|x| x.method.clone())),
        ("kind".into(), s(&|x| x.kind.to_string())),
        ("temperature".into(), f64s(m.iter().map(|x| x.temperature))),
        (
            "seed".into(),
            Arc::new(UInt64Array::from_iter(m.iter().map(|x| x.seed))),
        ),
        ("planned_rows".into(), u(&|x| x.planned)),
        ("n".into(), u(&|x| x.n)),
        ("correct".into(), u(&|x| x.correct)),
        ("accuracy".into(), f(&|x| x.accuracy)),
        ("accuracy_ci95_lo".into(), f(&|x| x.accuracy_lo)),
        ("accuracy_ci95_hi".into(), f(&|x| x.accuracy_hi)),
        ("macro_f1".into(), f(&|x| x.macro_f1)),
        ("invalid".into(), u(&|x| x.invalid)),
        ("failed".into(), u(&|x| x.failed)),
        (
            "calibration".into(),
            strs(
                m.iter()
                    .map(|x| x.calibration.as_ref().map(|c| c.kind.to_string())),
            ),
        ),
        (
            "uncalibrated_accuracy".into(),
            f64s(
                m.iter()
                    .map(|x| x.uncalibrated.as_ref().map(|u| u.accuracy)),
            ),
        ),
        (
            "uncalibrated_ece".into(),
            f64s(
                m.iter()
                    .map(|x| x.uncalibrated.as_ref().and_then(|u| u.ece)),
            ),
        ),
    ];
    for (i, l) in labels
        .iter()
        .chain(std::iter::once(&"invalid".to_string()))
        .enumerate()
    {
        cols.push((format!("predicted_share_{l}"), f(&|x| x.predicted_share[i])));
    }
    for (i, l) in labels.iter().enumerate() {
        cols.push((format!("precision_{l}"), f(&|x| x.classes[i].precision)));
        cols.push((format!("recall_{l}"), f(&|x| x.classes[i].recall)));
        cols.push((format!("f1_{l}"), f(&|x| x.classes[i].f1)));
    }
    cols.extend([
        ("latency_p50_ms".into(), f(&|x| x.latency_p50_ms)),
        ("latency_p95_ms".into(), f(&|x| x.latency_p95_ms)),
        ("compute_s".into(), f(&|x| x.compute_s)),
        ("rows_per_s".into(), f(&|x| x.rows_per_s)),
        ("words_per_s".into(), f(&|x| x.words_per_s)),
        ("rows_per_s_shared".into(), f(&|x| x.rows_per_s_shared)),
        ("prompt_tokens_per_s".into(), f(&|x| x.prompt_tokens_per_s)),
        ("generated_tokens_per_s".into(), f(&|x| x.gen_tokens_per_s)),
        ("cached_rows".into(), u(&|x| x.cached)),
        ("computed_rows".into(), u(&|x| x.computed)),
        ("roc_auc".into(), f64s(m.iter().map(|x| x.roc_auc))),
        ("brier".into(), f64s(m.iter().map(|x| x.brier))),
        ("ece".into(), f64s(m.iter().map(|x| x.ece))),
        (
            "accuracy_per_token".into(),
            f64s(
                m.iter()
                    .map(|x| x.length_normalised.and_then(|n| n.per_token)),
            ),
        ),
        (
            "accuracy_per_byte".into(),
            f64s(
                m.iter()
                    .map(|x| x.length_normalised.and_then(|n| n.per_byte)),
            ),
        ),
        // Cost from the rows' tokens (issue #31): the same on any machine, under any load.
        // The time expected from it depends on the machine and is in run.json and the
        // page, not here.
        (
            "work_prompt_tokens_per_row".into(),
            f64s(m.iter().map(|x| x.work.map(|w| w.prompt_tokens))),
        ),
        (
            "work_gen_tokens_per_row".into(),
            f64s(m.iter().map(|x| x.work.map(|w| w.generated_tokens))),
        ),
        (
            "gflop_per_row".into(),
            f64s(m.iter().map(|x| x.work.and_then(|w| w.gflop()))),
        ),
    ]);
    // Cascade cells: the share the first step sends on, and the cost against the first and
    // the last stage alone.
    let cascade = |g: &dyn Fn(&crate::cascade::Summary) -> Option<f64>| {
        f64s(m.iter().map(|x| x.cascade.as_ref().and_then(g)))
    };
    cols.extend([
        (
            "cascade_escalated".into(),
            cascade(&|c| {
                Some(c.reached.get(1).copied().unwrap_or(0) as f64 / c.rows.max(1) as f64)
            }),
        ),
        (
            "cascade_compute_vs_first".into(),
            cascade(&|c| c.compute_vs_first),
        ),
        (
            "cascade_compute_vs_last".into(),
            cascade(&|c| c.compute_vs_last),
        ),
        (
            "cascade_time_vs_first".into(),
            cascade(&|c| c.time_vs_first),
        ),
        ("cascade_time_vs_last".into(), cascade(&|c| c.time_vs_last)),
        (
            "cascade_tokens_vs_first".into(),
            cascade(&|c| c.tokens_vs_first),
        ),
        (
            "cascade_tokens_vs_last".into(),
            cascade(&|c| c.tokens_vs_last),
        ),
    ]);
    let refs: Vec<(&str, ArrayRef)> = cols.iter().map(|(n, a)| (n.as_str(), a.clone())).collect();
    batch(refs)
}

/// One row per paired comparison.
pub fn comparisons(c: &[Comparison]) -> Result<RecordBatch, TableError> {
    let s = |f: &dyn Fn(&Comparison) -> String| strs(c.iter().map(|x| Some(f(x))));
    let f = |g: &dyn Fn(&Comparison) -> f64| f64s(c.iter().map(|x| Some(g(x))));
    let u = |g: &dyn Fn(&Comparison) -> u64| u64s(c.iter().map(g));
    batch(vec![
        ("cell", s(&|x| x.cell.clone())),
        ("reference", s(&|x| x.reference.clone())),
        ("n", u(&|x| x.n)),
        ("accuracy", f(&|x| x.accuracy)),
        ("reference_accuracy", f(&|x| x.reference_accuracy)),
        ("difference", f(&|x| x.difference)),
        ("difference_ci95_lo", f(&|x| x.ci_lo)),
        ("difference_ci95_hi", f(&|x| x.ci_hi)),
        ("cell_only_correct", u(&|x| x.cell_only)),
        ("reference_only_correct", u(&|x| x.reference_only)),
        ("mcnemar_exact_p", f(&|x| x.p_value)),
        ("mcnemar_holm_p", f(&|x| x.holm_p)),
    ])
}

/// One row per cell row whose last attempt failed.
pub fn failures(plan: &Plan, f: &[Failure]) -> Result<RecordBatch, TableError> {
    let s = |g: &dyn Fn(&Failure) -> String| strs(f.iter().map(|x| Some(g(x))));
    let cell = |x: &Failure| &plan.cells[x.cell];
    batch(vec![
        ("cell", s(&|x| cell(x).id.clone())),
        ("model", s(&|x| plan.cell_names(cell(x)).0)),
        ("prompt", s(&|x| plan.cell_names(cell(x)).1)),
        ("method", s(&|x| plan.cell_names(cell(x)).2)),
        ("row_id", s(&|x| plan.dataset.rows[x.row].id.clone())),
        ("error_kind", s(&|x| x.kind.as_str().to_string())),
        ("error", s(&|x| x.message.clone())),
    ])
}
