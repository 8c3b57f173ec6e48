//! The row cache's segment files: their schema, how rows are encoded, and how they are read
//! back: whole (verifying every row's checksum), or only the columns a reader needs
//! (projection) for only the rows it needs (a row selection from the index), a batch at a
//! time, so that no reader holds a whole segment.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float16Builder, Float64Array, Float64Builder, Int64Array,
    ListBuilder, RecordBatch, StringArray, UInt32Array, UInt32Builder,
};
use arrow::datatypes::{DataType, Field, Float16Type, Float64Type, Int64Type, Schema, UInt32Type};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};

use super::CachedRow;
use crate::key::{Components, Digest};
use crate::row::{Finish, RowError};
use crate::segments::{added_later, check_fields, check_nulls, read_batches, read_file};
use crate::table::TableError;

/// Rows decoded per batch when reading by projection: a reader's memory stays bounded
/// whatever the size of a segment.
const BATCH_ROWS: usize = 8192;

/// The columns a reader needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Columns {
    /// What the index holds: the key, the prompt's length, when, and how the row ended.
    Index,
    /// What metrics read: the answer and what it cost.
    Content,
    /// Which computation made the row: its dataset row and key components.
    Identity,
    /// Every column, for rows copied or rewritten whole (their checksums verified).
    All,
}

impl Columns {
    /// The column names read; `None`: all of them.
    fn names(self) -> Option<Vec<&'static str>> {
        Some(match self {
            Columns::Index => vec![
                "key",
                "prompt_tokens",
                "created_unix_ms",
                "finish",
                "error_kind",
                "error",
            ],
            Columns::Content => vec![
                "key",
                "text",
                "logprobs",
                "hidden",
                "choice_tokens",
                "prompt_tokens",
                "evaluated_tokens",
                "prefix_tokens",
                "gen_tokens",
                "finish",
                "prefill_ms",
                "shared_by",
                "decode_ms",
                "host",
                "shard",
            ],
            Columns::Identity => {
                let mut v = vec!["key", "row_id", "finish"];
                v.extend(Components::NAMES);
                v
            }
            Columns::All => return None,
        })
    }
}

/// Read `columns` of a segment, batch by batch, for the rows at `rows` (sorted positions;
/// `None`: every row). The file's schema is checked before any value is read; `Err` when
/// the file cannot be read or trusted. Never panics, whatever the bytes.
pub(crate) fn read_columns(
    path: &Path,
    columns: Columns,
    rows: Option<&[u32]>,
    visit: &mut dyn FnMut(&RecordBatch) -> Result<(), TableError>,
) -> Result<(), TableError> {
    let file = File::open(path)?;
    let want = schema();
    crate::guard::catch(std::panic::AssertUnwindSafe(|| {
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
        check_fields(builder.schema(), &want)?;
        let total = builder.metadata().file_metadata().num_rows();
        let mask = match columns.names() {
            None => ProjectionMask::all(),
            Some(names) => {
                let file_schema = builder.schema();
                let roots: Vec<usize> = names
                    .iter()
                    .filter_map(|n| file_schema.index_of(n).ok())
                    .collect();
                ProjectionMask::roots(builder.parquet_schema(), roots)
            }
        };
        let mut builder = builder.with_projection(mask).with_batch_size(BATCH_ROWS);
        if let Some(rows) = rows {
            builder = builder.with_row_selection(selection(rows, total.max(0) as u64));
        }
        for batch in builder.build()? {
            let batch = batch?;
            check_nulls(&batch, &want)?;
            visit(&batch)?;
        }
        Ok(())
    }))
    .unwrap_or(Err(TableError::ReaderPanicked))
}

/// The rows a segment holds, by its footer alone.
pub(crate) fn row_count(path: &Path) -> Result<u64, TableError> {
    let file = File::open(path)?;
    crate::guard::catch(std::panic::AssertUnwindSafe(|| {
        let meta = parquet::file::metadata::ParquetMetaDataReader::new().parse_and_finish(&file)?;
        Ok(meta.file_metadata().num_rows().max(0) as u64)
    }))
    .unwrap_or(Err(TableError::ReaderPanicked))
}

/// The selection of the rows at sorted, distinct `rows` of a file of `total` rows.
fn selection(rows: &[u32], total: u64) -> RowSelection {
    let mut selectors = Vec::new();
    let mut next = 0u64;
    let mut i = 0;
    while i < rows.len() {
        let start = u64::from(rows[i]);
        i += 1;
        if start < next || start >= total {
            continue;
        }
        let mut end = start + 1;
        while i < rows.len() && u64::from(rows[i]) == end && end < total {
            end += 1;
            i += 1;
        }
        if start > next {
            selectors.push(RowSelector::skip((start - next) as usize));
        }
        selectors.push(RowSelector::select((end - start) as usize));
        next = end;
    }
    if next < total {
        selectors.push(RowSelector::skip((total - next) as usize));
    }
    selectors.into()
}

/// A column of a batch read by projection (the schema was checked).
fn string(b: &RecordBatch, name: &str) -> Result<StringArray, TableError> {
    Ok(b.column_by_name(name)
        .ok_or_else(|| format!("column {name} was not read"))?
        .as_string::<i32>()
        .clone())
}

fn u32s(b: &RecordBatch, name: &str) -> Result<arrow::array::UInt32Array, TableError> {
    Ok(b.column_by_name(name)
        .ok_or_else(|| format!("column {name} was not read"))?
        .as_primitive::<UInt32Type>()
        .clone())
}

fn f64s(b: &RecordBatch, name: &str) -> Result<Float64Array, TableError> {
    Ok(b.column_by_name(name)
        .ok_or_else(|| format!("column {name} was not read"))?
        .as_primitive::<Float64Type>()
        .clone())
}

fn opt(a: &StringArray, i: usize) -> Option<String> {
    (!a.is_null(i)).then(|| a.value(i).to_string())
}

/// Row `i` of the `hidden` column, where the segment has one and the row a value.
fn hidden_at(a: Option<&arrow::array::ListArray>, i: usize) -> Option<Vec<f32>> {
    let a = a?;
    (!a.is_null(i)).then(|| {
        a.value(i)
            .as_primitive::<Float16Type>()
            .values()
            .iter()
            .map(|x| x.to_f32())
            .collect()
    })
}

/// Row `i` of the `choice_tokens` column, where the segment has one and the row a value.
fn counts_at(a: Option<&arrow::array::ListArray>, i: usize) -> Option<Vec<u32>> {
    let a = a?;
    (!a.is_null(i)).then(|| a.value(i).as_primitive::<UInt32Type>().values().to_vec())
}

/// Row `i` of a number column added later, where the segment has one and the row a value.
fn u32_at(a: Option<&arrow::array::UInt32Array>, i: usize) -> Option<u32> {
    let a = a?;
    (!a.is_null(i)).then(|| a.value(i))
}

/// A column added to the layout later: absent in older segments.
fn optional(b: &RecordBatch, name: &str) -> Option<StringArray> {
    b.column_by_name(name).map(|c| c.as_string::<i32>().clone())
}

fn digest(a: &StringArray, i: usize) -> Result<Digest, TableError> {
    Digest::from_hex(a.value(i)).ok_or_else(|| "bad digest".into())
}

fn error_of(kind: Option<String>, message: Option<String>) -> Result<Option<RowError>, TableError> {
    match (kind, message) {
        (Some(kind), Some(message)) => Ok(Some(RowError {
            kind: kind.parse().map_err(|_| "bad error kind")?,
            message,
        })),
        (None, None) => Ok(None),
        _ => Err("error kind without message".into()),
    }
}

/// What the index keeps of a row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IndexRow {
    pub key: Digest,
    pub prompt_tokens: u32,
    pub created_unix_ms: i64,
    pub error: Option<RowError>,
}

/// The index columns of a batch read with [`Columns::Index`]; `Err` for a value out of its
/// domain (the segment is then read whole and verified row by row).
pub(crate) fn index_rows(b: &RecordBatch) -> Result<Vec<IndexRow>, TableError> {
    let (key, finish) = (string(b, "key")?, string(b, "finish")?);
    let (error_kind, error) = (string(b, "error_kind")?, string(b, "error")?);
    let pt = u32s(b, "prompt_tokens")?;
    let created = b
        .column_by_name("created_unix_ms")
        .ok_or("column created_unix_ms was not read")?
        .as_primitive::<Int64Type>()
        .clone();
    (0..b.num_rows())
        .map(|i| {
            let error = error_of(opt(&error_kind, i), opt(&error, i))?;
            let finish: Finish = finish.value(i).parse().map_err(|_| "bad finish")?;
            if error.is_some() != (finish == Finish::Failed) {
                return Err("failed row without an error".into());
            }
            Ok(IndexRow {
                key: digest(&key, i)?,
                prompt_tokens: pt.value(i),
                created_unix_ms: created.value(i),
                error,
            })
        })
        .collect()
}

/// What a successful row holds for metrics and reports: the answer and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct RowContent {
    /// The generated text; short answers repeat, and are held once per read.
    pub text: Option<Arc<str>>,
    pub logprobs: Option<Vec<f64>>,
    /// Pooled hidden states (hidden-state rows only).
    pub hidden: Option<Arc<[f32]>>,
    /// Each label's number of tokens (log-likelihood rows, where recorded).
    pub choice_tokens: Option<Vec<u32>>,
    /// The prompt's leading tokens shared by its template's rows (where recorded).
    pub prefix_tokens: Option<u32>,
    pub prompt_tokens: u32,
    pub evaluated_tokens: u32,
    pub gen_tokens: u32,
    pub finish: Finish,
    /// Prompt evaluation time, shared by `shared_by` tasks computed from that prompt.
    pub prefill_ms: f64,
    pub shared_by: u32,
    pub decode_ms: f64,
    /// Where it was computed (informational), shared among the rows of one origin.
    pub host: Option<Arc<str>>,
    pub shard: Option<Arc<str>>,
}

impl RowContent {
    /// Time attributed to this row: its share of the prompt plus its own decoding.
    pub fn latency_ms(&self) -> f64 {
        self.prefill_ms / f64::from(self.shared_by.max(1)) + self.decode_ms
    }
}

/// Interns the few distinct host and shard names and short answers of a read, so that a
/// million rows from one host answering "positive" hold one string of each.
#[derive(Default)]
pub(crate) struct Names(std::collections::HashMap<String, Arc<str>>);

/// Longer strings are not interned: they seldom repeat.
const INTERNED_BYTES: usize = 64;

impl Names {
    pub fn get(&mut self, a: Option<&StringArray>, i: usize) -> Option<Arc<str>> {
        let a = a?;
        if a.is_null(i) {
            return None;
        }
        let v = a.value(i);
        if v.len() > INTERNED_BYTES {
            return Some(Arc::from(v));
        }
        if let Some(s) = self.0.get(v) {
            return Some(s.clone());
        }
        let s: Arc<str> = Arc::from(v);
        self.0.insert(v.to_string(), s.clone());
        Some(s)
    }
}

/// The keys and content of a batch read with [`Columns::Content`].
pub(crate) fn content_rows(
    b: &RecordBatch,
    names: &mut Names,
) -> Result<Vec<(Digest, RowContent)>, TableError> {
    let (key, text, finish) = (string(b, "key")?, string(b, "text")?, string(b, "finish")?);
    let (pt, et, gt, shared) = (
        u32s(b, "prompt_tokens")?,
        u32s(b, "evaluated_tokens")?,
        u32s(b, "gen_tokens")?,
        u32s(b, "shared_by")?,
    );
    let (prefill, decode) = (f64s(b, "prefill_ms")?, f64s(b, "decode_ms")?);
    let lp = b
        .column_by_name("logprobs")
        .ok_or("column logprobs was not read")?
        .as_list::<i32>()
        .clone();
    let (host, shard) = (optional(b, "host"), optional(b, "shard"));
    let hidden = b
        .column_by_name("hidden")
        .map(|c| c.as_list::<i32>().clone());
    let choice_tokens = b
        .column_by_name("choice_tokens")
        .map(|c| c.as_list::<i32>().clone());
    let prefix_tokens = b
        .column_by_name("prefix_tokens")
        .map(|c| c.as_primitive::<UInt32Type>().clone());
    (0..b.num_rows())
        .map(|i| {
            Ok((
                digest(&key, i)?,
                RowContent {
                    text: names.get(Some(&text), i),
                    logprobs: (!lp.is_null(i))
                        .then(|| lp.value(i).as_primitive::<Float64Type>().values().to_vec()),
                    hidden: hidden_at(hidden.as_ref(), i).map(Into::into),
                    choice_tokens: counts_at(choice_tokens.as_ref(), i),
                    prefix_tokens: u32_at(prefix_tokens.as_ref(), i),
                    prompt_tokens: pt.value(i),
                    evaluated_tokens: et.value(i),
                    gen_tokens: gt.value(i),
                    finish: finish.value(i).parse().map_err(|_| "bad finish")?,
                    prefill_ms: prefill.value(i),
                    shared_by: shared.value(i),
                    decode_ms: decode.value(i),
                    host: names.get(host.as_ref(), i),
                    shard: names.get(shard.as_ref(), i),
                },
            ))
        })
        .collect()
}

/// Which computation made a row: its dataset row and key components.
#[derive(Debug, Clone, PartialEq)]
pub struct RowIdentity {
    pub key: Digest,
    pub row_id: String,
    pub components: Components,
}

/// The identities of the successful rows of a batch read with [`Columns::Identity`].
pub(crate) fn identity_rows(b: &RecordBatch) -> Result<Vec<RowIdentity>, TableError> {
    let key = string(b, "key")?;
    let row_id = string(b, "row_id")?;
    let finish = string(b, "finish")?;
    let comps: Vec<StringArray> = Components::NAMES
        .iter()
        .map(|n| string(b, n))
        .collect::<Result<_, _>>()?;
    (0..b.num_rows())
        .filter(|&i| finish.value(i) != Finish::Failed.as_str())
        .map(|i| {
            let mut parts = [Digest([0; 32]); 6];
            for (p, a) in parts.iter_mut().zip(&comps) {
                *p = digest(a, i)?;
            }
            Ok(RowIdentity {
                key: digest(&key, i)?,
                row_id: row_id.value(i).to_string(),
                components: Components::from_parts(parts),
            })
        })
        .collect()
}

pub(crate) fn schema() -> Arc<Schema> {
    let mut fields = vec![Field::new("key", DataType::Utf8, false)];
    for n in Components::NAMES {
        fields.push(Field::new(n, DataType::Utf8, false));
    }
    fields.extend([
        Field::new("row_id", DataType::Utf8, false),
        Field::new("cell_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, true),
        Field::new(
            "logprobs",
            DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
            true,
        ),
        Field::new("prompt_tokens", DataType::UInt32, false),
        Field::new("evaluated_tokens", DataType::UInt32, false),
        Field::new("gen_tokens", DataType::UInt32, false),
        Field::new("finish", DataType::Utf8, false),
        Field::new("prefill_ms", DataType::Float64, false),
        Field::new("shared_by", DataType::UInt32, false),
        Field::new("decode_ms", DataType::Float64, false),
        Field::new("created_unix_ms", DataType::Int64, false),
        Field::new("error_kind", DataType::Utf8, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("checksum", DataType::Utf8, false),
        added_later(Field::new("host", DataType::Utf8, true)),
        added_later(Field::new("shard", DataType::Utf8, true)),
        // Half precision: a probe's features need three digits, and a study's hidden states
        // are published with its rows.
        added_later(Field::new(
            "hidden",
            DataType::List(Arc::new(Field::new("item", DataType::Float16, true))),
            true,
        )),
        added_later(Field::new(
            "choice_tokens",
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))),
            true,
        )),
        added_later(Field::new("prefix_tokens", DataType::UInt32, true)),
    ]);
    Arc::new(Schema::new(fields))
}

pub(crate) fn encode_segment(rows: &[CachedRow]) -> Result<RecordBatch, TableError> {
    let strs = |f: &dyn Fn(&CachedRow) -> String| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let opt_strs = |f: &dyn Fn(&CachedRow) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let u32s = |f: &dyn Fn(&CachedRow) -> u32| -> ArrayRef {
        Arc::new(UInt32Array::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let f64s = |f: &dyn Fn(&CachedRow) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let mut cols: Vec<ArrayRef> = vec![strs(&|r| r.key.hex())];
    for i in 0..Components::NAMES.len() {
        cols.push(strs(&|r| r.components.parts()[i].hex()));
    }
    let mut lp = ListBuilder::new(Float64Builder::new());
    for r in rows {
        match &r.logprobs {
            Some(v) => {
                lp.values().append_slice(v);
                lp.append(true);
            }
            None => lp.append(false),
        }
    }
    cols.extend([
        strs(&|r| r.row_id.clone()),
        strs(&|r| r.cell_id.clone()),
        strs(&|r| r.kind.as_str().to_string()),
        opt_strs(&|r| r.text.clone()),
        Arc::new(lp.finish()) as ArrayRef,
        u32s(&|r| r.prompt_tokens),
        u32s(&|r| r.evaluated_tokens),
        u32s(&|r| r.gen_tokens),
        strs(&|r| r.finish.as_str().to_string()),
        f64s(&|r| r.prefill_ms),
        u32s(&|r| r.shared_by),
        f64s(&|r| r.decode_ms),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.created_unix_ms).collect::<Vec<_>>(),
        )) as ArrayRef,
        opt_strs(&|r| r.error.as_ref().map(|e| e.kind.as_str().to_string())),
        opt_strs(&|r| r.error.as_ref().map(|e| e.message.clone())),
        strs(&|r| r.checksum().hex()),
        opt_strs(&|r| r.host.clone()),
        opt_strs(&|r| r.shard.clone()),
    ]);
    let mut hidden = ListBuilder::new(Float16Builder::new());
    for r in rows {
        match &r.hidden {
            Some(v) => {
                for x in v {
                    hidden.values().append_value(half::f16::from_f32(*x));
                }
                hidden.append(true);
            }
            None => hidden.append(false),
        }
    }
    cols.push(Arc::new(hidden.finish()));
    let mut counts = ListBuilder::new(UInt32Builder::new());
    for r in rows {
        match &r.choice_tokens {
            Some(v) => {
                counts.values().append_slice(v);
                counts.append(true);
            }
            None => counts.append(false),
        }
    }
    cols.push(Arc::new(counts.finish()));
    cols.push(Arc::new(UInt32Array::from(
        rows.iter().map(|r| r.prefix_tokens).collect::<Vec<_>>(),
    )));
    RecordBatch::try_new(schema(), cols).map_err(TableError::from)
}

/// Read a segment. The outer error means the file is unreadable as a whole; each row is
/// `Err` when it fails verification.
pub fn read_segment(path: &Path) -> std::io::Result<Vec<Result<CachedRow, TableError>>> {
    decode_segment(read_file(path)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Decode a segment's bytes; `Err` when the file as a whole cannot be trusted. Never
/// panics, whatever the bytes.
pub fn decode_segment(
    bytes: bytes::Bytes,
) -> Result<Vec<Result<CachedRow, TableError>>, TableError> {
    Ok(read_batches(bytes, &schema())?
        .iter()
        .flat_map(decode_batch)
        .collect())
}

/// The rows of a batch whose schema [`read_batches`] checked.
pub(crate) fn decode_batch(b: &RecordBatch) -> Vec<Result<CachedRow, TableError>> {
    let col = |name: &str| b.column_by_name(name).expect("schema checked");
    let s = |name: &str| col(name).as_string::<i32>().clone();
    let u = |name: &str| col(name).as_primitive::<UInt32Type>().clone();
    let f = |name: &str| col(name).as_primitive::<Float64Type>().clone();
    let key = s("key");
    let comps: Vec<StringArray> = Components::NAMES.iter().map(|n| s(n)).collect();
    let (row_id, cell_id, kind, text, finish, checksum) = (
        s("row_id"),
        s("cell_id"),
        s("kind"),
        s("text"),
        s("finish"),
        s("checksum"),
    );
    let (error_kind, error) = (s("error_kind"), s("error"));
    // Absent in segments written before they were recorded.
    let optional = |name: &str| b.column_by_name(name).map(|c| c.as_string::<i32>().clone());
    let (host, shard) = (optional("host"), optional("shard"));
    let hidden = b
        .column_by_name("hidden")
        .map(|c| c.as_list::<i32>().clone());
    let choice_tokens = b
        .column_by_name("choice_tokens")
        .map(|c| c.as_list::<i32>().clone());
    let prefix_tokens = b
        .column_by_name("prefix_tokens")
        .map(|c| c.as_primitive::<UInt32Type>().clone());
    let (pt, et, gt, shared) = (
        u("prompt_tokens"),
        u("evaluated_tokens"),
        u("gen_tokens"),
        u("shared_by"),
    );
    let (prefill, decode) = (f("prefill_ms"), f("decode_ms"));
    let created = col("created_unix_ms").as_primitive::<Int64Type>().clone();
    let lp = col("logprobs").as_list::<i32>().clone();
    let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
    (0..b.num_rows())
        .map(|i| {
            let d = |a: &StringArray| Digest::from_hex(a.value(i)).ok_or("bad digest");
            let mut parts = [Digest([0; 32]); 6];
            for (p, a) in parts.iter_mut().zip(&comps) {
                *p = d(a)?;
            }
            let error = match (opt(&error_kind, i), opt(&error, i)) {
                (Some(kind), Some(message)) => Some(RowError {
                    kind: kind.parse().map_err(|_| "bad error kind")?,
                    message,
                }),
                (None, None) => None,
                _ => return Err("error kind without message".into()),
            };
            let row = CachedRow {
                key: d(&key)?,
                components: Components::from_parts(parts),
                row_id: row_id.value(i).to_string(),
                cell_id: cell_id.value(i).to_string(),
                kind: kind.value(i).parse().map_err(|_| "bad task kind")?,
                text: opt(&text, i),
                logprobs: (!lp.is_null(i))
                    .then(|| lp.value(i).as_primitive::<Float64Type>().values().to_vec()),
                hidden: hidden_at(hidden.as_ref(), i),
                choice_tokens: counts_at(choice_tokens.as_ref(), i),
                prefix_tokens: u32_at(prefix_tokens.as_ref(), i),
                prompt_tokens: pt.value(i),
                evaluated_tokens: et.value(i),
                gen_tokens: gt.value(i),
                finish: finish.value(i).parse().map_err(|_| "bad finish")?,
                prefill_ms: prefill.value(i),
                shared_by: shared.value(i),
                decode_ms: decode.value(i),
                created_unix_ms: created.value(i),
                error,
                host: host.as_ref().and_then(|a| opt(a, i)),
                shard: shard.as_ref().and_then(|a| opt(a, i)),
            };
            if row.checksum().hex() != checksum.value(i) {
                return Err("checksum mismatch".into());
            }
            if row.components.row_key() != row.key {
                return Err("key does not match its components".into());
            }
            if row.failed() != (row.finish == Finish::Failed) {
                return Err("failed row without an error".into());
            }
            Ok(row)
        })
        .collect()
}
