//! Datasets: read Parquet, CSV or JSONL with Arrow, map labels to names, clean the text,
//! and draw a seeded, stratified sample whose every prefix stays balanced.

use std::fs::File;
use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::DataType;

use crate::diag::Diagnostic;
use crate::rng::SplitMix64;
use crate::spec::{
    CleanSpec, DatasetSpec, LabelSpec, Located, SampleSpec, ShotStrategy, ShotsSpec,
};
use crate::table::TableError;

/// One dataset row after label mapping and clean-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Position in the source file.
    pub index: usize,
    pub id: String,
    pub text: String,
    /// Index into the spec's label list; with per-row choices, into `choices`.
    pub label: usize,
    /// This row's own choices (`dataset.choices`); empty for fixed labels.
    pub choices: Vec<String>,
    /// This row's reference answer (`dataset.reference`); its `label` is then 0 (`correct`).
    pub reference: Option<String>,
}

/// The most choices a row may have: the classes of a multiple-choice task are the choices'
/// places, named by letters.
pub const MAX_CHOICES: usize = 26;

/// Choices in a CSV file (a text column): one string, the choices separated by this.
pub const CHOICE_SEPARATOR: char = '|';

/// The name of the choice at place `i` (A, B, C, ...).
pub fn choice_letter(i: usize) -> String {
    char::from(b'A' + (i % MAX_CHOICES) as u8).to_string()
}

#[derive(Debug, Clone)]
pub struct Dataset {
    /// The sampled rows, in evaluation order.
    pub rows: Vec<Row>,
    /// Number of rows in the file before sampling.
    pub source_rows: usize,
    pub labels: Vec<LabelSpec>,
    /// What was accepted but should be said: rows left out, a sample larger than the file.
    pub warnings: Vec<String>,
}

impl Dataset {
    pub fn label_names(&self) -> Vec<String> {
        self.labels.iter().map(|l| l.name.clone()).collect()
    }

    /// Row `row`'s gold answer as a person reads it: its label's name, its correct choice, or
    /// its reference answer.
    pub fn gold(&self, row: usize) -> String {
        match self.rows.get(row) {
            Some(r) => match &r.reference {
                Some(reference) => reference.clone(),
                None => self.answer(row, r.label),
            },
            None => String::new(),
        }
    }

    /// What answer `class` of row `row` says: the label's name, or with per-row choices the
    /// row's choice at that place (with reference answers: `correct` or `incorrect`).
    pub fn answer(&self, row: usize, class: usize) -> String {
        let r = self.rows.get(row);
        match r.and_then(|r| r.choices.get(class)) {
            Some(c) => c.clone(),
            None if r.is_some_and(|r| !r.choices.is_empty()) => choice_letter(class),
            None => self
                .labels
                .get(class)
                .map(|l| l.name.clone())
                .unwrap_or_default(),
        }
    }
}

/// Load the evaluation rows named by the spec.
pub fn load(spec: &DatasetSpec) -> Result<Dataset, Diagnostic> {
    let mut warnings = Vec::new();
    let all = read_labeled(&spec.path, spec, &mut warnings)?;
    let source_rows = all.len();
    if let Some(s) = &spec.sample
        && s.n > source_rows
    {
        warnings.push(format!(
            "dataset.sample.n is {} but {} has {source_rows} rows with a text: all {source_rows} are used",
            s.n,
            spec.path.value.display()
        ));
    }
    let labels = classes(spec, &all);
    let mut rows = match &spec.sample {
        Some(s) => sample(all, s, labels.len()),
        None => all,
    };
    // Clean only what is used: a sample is usually a small part of the file.
    for r in &mut rows {
        r.text = clean(&r.text, &spec.clean);
    }
    Ok(Dataset {
        rows,
        source_rows,
        labels,
        warnings,
    })
}

/// The task's classes: the spec's labels, or with per-row choices the choices' places (A,
/// B, C, ... up to the most choices a row has).
pub fn classes(spec: &DatasetSpec, rows: &[Row]) -> Vec<LabelSpec> {
    if spec.choices.is_none() {
        return spec.labels.clone();
    }
    let most = rows.iter().map(|r| r.choices.len()).max().unwrap_or(0);
    (0..most)
        .map(|i| LabelSpec {
            name: choice_letter(i),
            values: vec![i.to_string()],
        })
        .collect()
}

/// Draw the fixed few-shot examples of a prompt from its `shots.from` file.
pub fn load_shots(
    shots: &ShotsSpec,
    spec: &DatasetSpec,
    stream: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<Row>, Diagnostic> {
    let mut all = read_labeled(&shots.from, spec, warnings)?;
    for r in &mut all {
        r.text = clean(&r.text, &spec.clean);
    }
    if let Some(max) = shots.max_chars {
        all.retain(|r| r.text.chars().count() <= max);
    }
    let mut rng = SplitMix64::for_stream(shots.seed, stream);
    let picked = match shots.strategy {
        // Retrieved examples are chosen per row from a pool (see `load_pool`).
        ShotStrategy::Random | ShotStrategy::Knn => rng.choose(&all, shots.k),
        ShotStrategy::Balanced => {
            let n_labels = classes(spec, &all).len();
            let mut by_label: Vec<Vec<Row>> = vec![Vec::new(); n_labels];
            for r in all {
                by_label[r.label].push(r);
            }
            // Round-robin over labels so that k examples alternate and stay balanced.
            let per_label: Vec<Vec<Row>> = by_label
                .iter()
                .map(|rows| rng.choose(rows, shots.k.div_ceil(n_labels)))
                .collect();
            let mut out = Vec::new();
            let mut i = 0;
            while out.len() < shots.k && per_label.iter().any(|v| v.len() > i) {
                for v in &per_label {
                    if out.len() < shots.k
                        && let Some(r) = v.get(i)
                    {
                        out.push(r.clone());
                    }
                }
                i += 1;
            }
            out
        }
    };
    if picked.len() < shots.k {
        return Err(shots.from.error(format!(
            "asked for {} examples but only {} rows qualify{}",
            shots.k,
            picked.len(),
            if shots.max_chars.is_some() {
                " (check shots.max_chars)"
            } else {
                ""
            }
        )));
    }
    Ok(picked)
}

/// Labelled rows of another file (a retrieval pool, calibration rows): read, cleaned like
/// the dataset, cut to `max_chars`, then sampled when `sample` is given.
pub fn load_pool(
    from: &Located<std::path::PathBuf>,
    sample_spec: Option<&SampleSpec>,
    max_chars: Option<usize>,
    spec: &DatasetSpec,
    warnings: &mut Vec<String>,
) -> Result<Vec<Row>, Diagnostic> {
    let mut all = read_labeled(from, spec, warnings)?;
    for r in &mut all {
        r.text = clean(&r.text, &spec.clean);
    }
    if let Some(max) = max_chars {
        all.retain(|r| r.text.chars().count() <= max);
    }
    Ok(match sample_spec {
        Some(s) => {
            let n_labels = classes(spec, &all).len();
            sample(all, s, n_labels)
        }
        None => all,
    })
}

/// Read a file's id, text and label columns and map labels (text is not cleaned yet).
/// A row without a text (null) is left out and counted in `warnings`; an id that is
/// repeated or holds a control character is an error naming the rows.
fn read_labeled(
    path: &Located<std::path::PathBuf>,
    spec: &DatasetSpec,
    warnings: &mut Vec<String>,
) -> Result<Vec<Row>, Diagnostic> {
    let batches = read_table(&path.value).map_err(|e| path.error(e.to_string()))?;
    if batches.iter().all(|b| b.num_rows() == 0) {
        return Err(path.error(format!("{} holds no rows", path.value.display())));
    }
    let schema_cols: Vec<String> = batches
        .first()
        .map(|b| {
            b.schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect()
        })
        .unwrap_or_default();
    let column = |name: &Located<String>| read_column(&batches, &schema_cols, path, name, strings);
    let texts = column(&spec.text)?;
    let labels = column(&spec.label)?;
    let choices = match &spec.choices {
        Some(c) => Some((c, read_column(&batches, &schema_cols, path, c, lists)?)),
        None => None,
    };
    let ids = match &spec.id {
        Some(id) => Some(column(id)?),
        None => None,
    };
    let mut rows = Vec::with_capacity(texts.len());
    let mut null_texts: Vec<usize> = Vec::new();
    let mut seen_ids: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, (text, label)) in texts.into_iter().zip(labels).enumerate() {
        let Some(text) = text else {
            null_texts.push(i);
            continue;
        };
        let label = label.ok_or_else(|| spec.label.error(format!("row {i} has no label")))?;
        let reference = spec.reference.is_some().then(|| label.clone());
        let (label_idx, row_choices) = match &choices {
            None if reference.is_some() => (0, Vec::new()),
            Some((at, all)) => {
                let row_choices = row_choices(at, all[i].clone(), i, &path.value)?;
                let gold = correct_choice(&label, &row_choices).ok_or_else(|| {
                    spec.label.error(format!(
                        "the label `{label}` of row {i} of {} is neither one of its choices ({}) nor a choice's index (0 to {})",
                        path.value.display(),
                        row_choices.join(" | "),
                        row_choices.len() - 1
                    ))
                })?;
                (gold, row_choices)
            }
            None => (fixed_label(spec, path, &label, i)?, Vec::new()),
        };
        let id = match &ids {
            Some(ids) => ids[i].clone().unwrap_or_else(|| i.to_string()),
            None => i.to_string(),
        };
        if let (Some(at), Some(c)) = (&spec.id, id.chars().find(|c| c.is_control())) {
            return Err(at.error(format!(
                "row {i} of {} has the id {:?}, with the control character {c:?}: ids must be printable",
                path.value.display(),
                id
            )));
        }
        if let Some(at) = &spec.id
            && let Some(first) = seen_ids.insert(id.clone(), i)
        {
            return Err(at.error(format!(
                "rows {first} and {i} of {} have the same id `{id}`: ids must be unique (they join predictions, comparisons and the cache's row ids)",
                path.value.display()
            )));
        }
        rows.push(Row {
            index: i,
            id,
            text,
            label: label_idx,
            choices: row_choices,
            reference,
        });
    }
    if !null_texts.is_empty() {
        let shown: Vec<String> = null_texts.iter().take(5).map(usize::to_string).collect();
        warnings.push(format!(
            "{}: {} rows have no text (null) and are left out (rows {}{})",
            path.value.display(),
            null_texts.len(),
            shown.join(", "),
            if null_texts.len() > 5 { ", ..." } else { "" }
        ));
    }
    Ok(rows)
}

/// Apply the spec's text clean-up.
pub fn clean(text: &str, c: &CleanSpec) -> String {
    let mut t = text.to_string();
    for (from, to) in &c.replace {
        if !from.is_empty() {
            t = t.replace(from.as_str(), to);
        }
    }
    if c.collapse_whitespace {
        t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    t.trim().to_string()
}

/// A column's values, read by `read` (as text, or as lists of choices), once it is known to
/// exist; an error names the column, the file and the columns it has.
fn read_column<T>(
    batches: &[RecordBatch],
    schema_cols: &[String],
    path: &Located<std::path::PathBuf>,
    name: &Located<String>,
    read: fn(&ArrayRef) -> Result<Vec<T>, TableError>,
) -> Result<Vec<T>, Diagnostic> {
    if !schema_cols.contains(&name.value) {
        return Err(name.error(format!(
            "column `{}` not found in {} (columns: {})",
            name.value,
            path.value.display(),
            schema_cols.join(", ")
        )));
    }
    let mut out = Vec::new();
    for b in batches {
        let col = b.column_by_name(&name.value).expect("checked above");
        out.extend(read(col).map_err(|e| name.error(e.to_string()))?);
    }
    Ok(out)
}

/// The class of a fixed-label row's label value.
fn fixed_label(
    spec: &DatasetSpec,
    path: &Located<std::path::PathBuf>,
    label: &str,
    i: usize,
) -> Result<usize, Diagnostic> {
    spec.labels
        .iter()
        .position(|l| l.values.iter().any(|v| v == label))
        .ok_or_else(|| {
            spec.labels_at.error(format!(
                "label value `{label}` (row {i} of {}) has no name here; known values: {}",
                path.value.display(),
                spec.labels
                    .iter()
                    .flat_map(|l| l.values.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// Read a whole table; the format follows the file extension.
pub fn read_table(path: &Path) -> Result<Vec<RecordBatch>, TableError> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let file = File::open(path)
        .map_err(|e| TableError::Invalid(format!("cannot open {}: {e}", path.display())))?;
    let bad = |e: &dyn std::fmt::Display| {
        TableError::Invalid(format!("cannot read {}: {e}", path.display()))
    };
    match ext.as_str() {
        "parquet" | "pq" => {
            // The Parquet decoder is not hardened against every damaged file: a panic in it
            // is an unreadable file, not a crash.
            crate::guard::catch(move || {
                let reader =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                        .map_err(|e| bad(&e))?
                        .build()
                        .map_err(|e| bad(&e))?;
                reader.collect::<Result<Vec<_>, _>>().map_err(|e| bad(&e))
            })
            .unwrap_or_else(|| Err(bad(&"the Parquet reader failed on this file")))
        }
        "csv" => read_csv(path),
        "jsonl" | "ndjson" | "json" => read_jsonl(path),
        other => Err(TableError::Invalid(format!(
            "{}: unknown table format `.{other}` (use .parquet, .csv or .jsonl)",
            path.display()
        ))),
    }
}

/// A CSV file with every column read as text, so that an id `007` stays `007` and a
/// column's type never depends on its first rows.
fn read_csv(path: &Path) -> Result<Vec<RecordBatch>, TableError> {
    use arrow::datatypes::{Field, Schema};
    let bad = |e: &dyn std::fmt::Display| {
        TableError::Invalid(format!("cannot read {}: {e}", path.display()))
    };
    let mut f = File::open(path).map_err(|e| bad(&e))?;
    let (header, _) = arrow::csv::reader::Format::default()
        .with_header(true)
        .infer_schema(&mut f, Some(0))
        .map_err(|e| bad(&e))?;
    let schema = Schema::new(
        header
            .fields()
            .iter()
            .map(|h| Field::new(h.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    );
    let f = File::open(path).map_err(|e| bad(&e))?;
    arrow::csv::ReaderBuilder::new(std::sync::Arc::new(schema))
        .with_header(true)
        .build(f)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))
}

/// A JSON-lines file, one object per line, every value read as text (numbers as written,
/// nested values as JSON). A line that is not a JSON object is an error naming the line.
fn read_jsonl(path: &Path) -> Result<Vec<RecordBatch>, TableError> {
    use arrow::array::{ArrayRef, StringBuilder};
    use arrow::datatypes::{Field, Schema};
    use std::io::BufRead;
    let bad = |e: &dyn std::fmt::Display| {
        TableError::Invalid(format!("cannot read {}: {e}", path.display()))
    };
    let file = File::open(path).map_err(|e| bad(&e))?;
    let mut names: Vec<String> = Vec::new();
    let mut rows: Vec<serde_json::Map<String, serde_json::Value>> = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| bad(&e))?;
        if line.trim().is_empty() {
            continue;
        }
        let at =
            |what: String| TableError::Invalid(format!("{}:{}: {what}", path.display(), i + 1));
        let obj = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(serde_json::Value::Object(o)) => o,
            Ok(_) => return Err(at("expected a JSON object on each line".into())),
            Err(e) => return Err(at(format!("invalid JSON: {e}"))),
        };
        for k in obj.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
        rows.push(obj);
    }
    let columns: Vec<ArrayRef> = names
        .iter()
        .map(|n| {
            let mut b = StringBuilder::new();
            for r in &rows {
                b.append_option(r.get(n).and_then(json_text));
            }
            std::sync::Arc::new(b.finish()) as ArrayRef
        })
        .collect();
    let schema = Schema::new(
        names
            .iter()
            .map(|n| Field::new(n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    );
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    RecordBatch::try_new(std::sync::Arc::new(schema), columns)
        .map(|b| vec![b])
        .map_err(|e| bad(&e))
}

/// A JSON value as dataset text: strings as they are, numbers as written (a float with no
/// fractional part as an integer, as for Parquet), `null` as missing.
fn json_text(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_f64() => n.as_f64().map(float_text),
        other => Some(other.to_string()),
    }
}

fn float_text(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        v.to_string()
    }
}

/// A column as optional strings; integers print without a fractional part.
fn strings(col: &ArrayRef) -> Result<Vec<Option<String>>, TableError> {
    let as_utf8 = match col.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => col.clone(),
        DataType::Float32 | DataType::Float64 => {
            let f = arrow::compute::cast(col, &DataType::Float64).map_err(TableError::from)?;
            let f = f.as_primitive::<arrow::datatypes::Float64Type>();
            return Ok((0..f.len())
                .map(|i| (!f.is_null(i)).then(|| float_text(f.value(i))))
                .collect());
        }
        _ => arrow::compute::cast(col, &DataType::Utf8)
            .map_err(|e| format!("cannot read as text: {e}"))?,
    };
    let a = arrow::compute::cast(&as_utf8, &DataType::Utf8).map_err(TableError::from)?;
    let a = a.as_string::<i32>();
    Ok((0..a.len())
        .map(|i| (!a.is_null(i)).then(|| a.value(i).to_string()))
        .collect())
}

/// Each row's choices: a list column (Parquet), a JSON array (JSONL), or one text with the
/// choices separated by [`CHOICE_SEPARATOR`] (CSV).
fn lists(col: &ArrayRef) -> Result<Vec<Option<Vec<String>>>, TableError> {
    let list = match col.data_type() {
        DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..) => {
            arrow::compute::cast(
                col,
                &DataType::List(std::sync::Arc::new(arrow::datatypes::Field::new(
                    "item",
                    DataType::Utf8,
                    true,
                ))),
            )
            .map_err(|e| format!("cannot read the choices as lists of text: {e}"))?
        }
        // JSONL holds nested values as JSON text: an array of strings (or numbers) is a
        // list; any other text is split at the separator.
        _ => {
            return Ok(strings(col)?
                .into_iter()
                .map(|s| s.map(|s| json_list(&s).unwrap_or_else(|| split_choices(&s))))
                .collect());
        }
    };
    let list = list.as_list::<i32>();
    Ok((0..list.len())
        .map(|i| {
            (!list.is_null(i)).then(|| {
                let v = list.value(i);
                let v = v.as_string::<i32>();
                (0..v.len())
                    .map(|j| {
                        if v.is_null(j) {
                            String::new()
                        } else {
                            v.value(j).to_string()
                        }
                    })
                    .collect()
            })
        })
        .collect())
}

fn json_list(s: &str) -> Option<Vec<String>> {
    if !s.trim_start().starts_with('[') {
        return None;
    }
    let v: Vec<serde_json::Value> = serde_json::from_str(s).ok()?;
    v.into_iter()
        .map(|x| match x {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .collect()
}

fn split_choices(s: &str) -> Vec<String> {
    s.split(CHOICE_SEPARATOR)
        .map(|c| c.trim().to_string())
        .collect()
}

/// Row `i`'s choices, checked: at least two, at most [`MAX_CHOICES`], none empty, none
/// repeated.
fn row_choices(
    at: &Located<String>,
    choices: Option<Vec<String>>,
    i: usize,
    path: &Path,
) -> Result<Vec<String>, Diagnostic> {
    let bad = |why: String| at.error(format!("row {i} of {}: {why}", path.display()));
    let choices = choices.ok_or_else(|| bad("it has no choices (null)".into()))?;
    if choices.len() < 2 || choices.len() > MAX_CHOICES {
        return Err(bad(format!(
            "it has {} choices; a row has 2 to {MAX_CHOICES}",
            choices.len()
        )));
    }
    for (j, c) in choices.iter().enumerate() {
        if c.trim().is_empty() {
            return Err(bad(format!("choice {j} is empty")));
        }
        if choices[..j]
            .iter()
            .any(|o| o.to_lowercase() == c.to_lowercase())
        {
            return Err(bad(format!(
                "the choice `{c}` is repeated (answers are matched without case)"
            )));
        }
    }
    Ok(choices)
}

/// The correct choice's place: the label is its text (exactly, then without case and
/// surrounding space) or its index.
fn correct_choice(label: &str, choices: &[String]) -> Option<usize> {
    choices
        .iter()
        .position(|c| c == label)
        .or_else(|| {
            let l = label.trim().to_lowercase();
            choices.iter().position(|c| c.trim().to_lowercase() == l)
        })
        .or_else(|| {
            label
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|i| *i < choices.len())
        })
}

/// A seeded sample. Stratified: each label keeps its share (largest remainder); the
/// order interleaves labels so that any prefix (`--limit`) stays balanced.
pub fn sample(rows: Vec<Row>, s: &SampleSpec, n_labels: usize) -> Vec<Row> {
    sample_excluding(rows, s, n_labels, &|_| false)
}

/// A seeded sample of the rows `exclude` rejects not. The draw runs over every row and
/// skips the excluded ones, so the rows chosen do not depend on what else is excluded:
/// a fit set drawn beside 200 evaluation rows is the one drawn beside 300 (bar the rows
/// those 100 more exclude), and its cached rows serve both.
pub fn sample_excluding(
    rows: Vec<Row>,
    s: &SampleSpec,
    n_labels: usize,
    exclude: &dyn Fn(&Row) -> bool,
) -> Vec<Row> {
    let keep = |r: &Row| !exclude(r);
    if !s.stratify {
        return SplitMix64::for_stream(s.seed, "dataset.sample").choose_where(&rows, s.n, &keep);
    }
    let mut by_label: Vec<Vec<Row>> = vec![Vec::new(); n_labels];
    for r in rows {
        by_label[r.label].push(r);
    }
    let total: usize = by_label
        .iter()
        .map(|v| v.iter().filter(|r| keep(r)).count())
        .sum();
    let n = s.n.min(total);
    // Largest-remainder quotas.
    let available: Vec<usize> = by_label
        .iter()
        .map(|v| v.iter().filter(|r| keep(r)).count())
        .collect();
    let exact: Vec<f64> = available
        .iter()
        .map(|&a| n as f64 * a as f64 / total.max(1) as f64)
        .collect();
    let mut quota: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut rest: Vec<usize> = (0..n_labels).collect();
    rest.sort_by(|&a, &b| {
        let ra = exact[a] - exact[a].floor();
        let rb = exact[b] - exact[b].floor();
        rb.partial_cmp(&ra)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let mut missing = n - quota.iter().sum::<usize>();
    for &c in &rest {
        if missing == 0 {
            break;
        }
        if quota[c] < available[c] {
            quota[c] += 1;
            missing -= 1;
        }
    }
    // One random stream per label, so a larger `n` (same seed) keeps every row of a smaller
    // one and reuses their cached results.
    let picked: Vec<Vec<Row>> = by_label
        .iter()
        .zip(&quota)
        .enumerate()
        .map(|(c, (rows, &q))| {
            SplitMix64::for_stream(s.seed, &format!("dataset.sample.label{c}"))
                .choose_where(rows, q, &keep)
        })
        .collect();
    interleave(picked)
}

/// Merge lists so that each list's share of every prefix is as close as possible to its
/// share of the whole (stride scheduling).
fn interleave(lists: Vec<Vec<Row>>) -> Vec<Row> {
    let total: usize = lists.iter().map(Vec::len).sum();
    let mut taken = vec![0usize; lists.len()];
    let mut out = Vec::with_capacity(total);
    for _ in 0..total {
        let next = (0..lists.len())
            .filter(|&c| taken[c] < lists[c].len())
            .min_by(|&a, &b| {
                let pa = (taken[a] as f64 + 0.5) / lists[a].len() as f64;
                let pb = (taken[b] as f64 + 0.5) / lists[b].len() as f64;
                pa.partial_cmp(&pb)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.cmp(&b))
            })
            .expect("rows left");
        out.push(lists[next][taken[next]].clone());
        taken[next] += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(labels: &[usize]) -> Vec<Row> {
        labels
            .iter()
            .enumerate()
            .map(|(i, &l)| Row {
                index: i,
                id: format!("r{i}"),
                text: format!("text {i}"),
                label: l,
                choices: Vec::new(),
                reference: None,
            })
            .collect()
    }

    #[test]
    fn stratified_sample_is_balanced_deterministic_and_prefix_balanced() {
        // Sorted by label, like IMDB: 60 negatives then 40 positives.
        let all = rows(&[vec![0; 60], vec![1; 40]].concat());
        let spec = SampleSpec {
            n: 20,
            stratify: true,
            seed: 7,
        };
        let a = sample(all.clone(), &spec, 2);
        let b = sample(all.clone(), &spec, 2);
        assert_eq!(a, b);
        assert_eq!(a.iter().filter(|r| r.label == 0).count(), 12);
        assert_eq!(a.iter().filter(|r| r.label == 1).count(), 8);
        // Every prefix of 5 holds both labels.
        assert!(a[..5].iter().any(|r| r.label == 0) && a[..5].iter().any(|r| r.label == 1));
        let mut ids: Vec<_> = a.iter().map(|r| r.index).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 20);
        let other = sample(
            all,
            &SampleSpec {
                n: 20,
                stratify: true,
                seed: 8,
            },
            2,
        );
        assert_ne!(a, other, "another seed gives another sample");
    }

    #[test]
    fn excluding_rows_changes_only_those_rows_of_a_sample() {
        let labels: Vec<usize> = (0..200).map(|i| i % 2).collect();
        let spec = SampleSpec {
            n: 20,
            stratify: true,
            seed: 3,
        };
        let ids = |exclude: &dyn Fn(&Row) -> bool| -> Vec<String> {
            let mut v: Vec<String> = sample_excluding(rows(&labels), &spec, 2, exclude)
                .into_iter()
                .map(|r| r.id)
                .collect();
            v.sort();
            v
        };
        let plain = ids(&|_| false);
        // Excluding a row the sample holds swaps that row alone for another.
        let gone = plain[0].clone();
        let without = ids(&|r| r.id == gone);
        assert_eq!(without.len(), 20);
        assert!(!without.contains(&gone));
        let kept = plain.iter().filter(|id| without.contains(id)).count();
        assert_eq!(kept, 19, "{plain:?} vs {without:?}");
        // Excluding rows it does not hold changes nothing.
        let outside: Vec<String> = (0..200)
            .map(|i| format!("r{i}"))
            .filter(|id| !plain.contains(id))
            .take(50)
            .collect();
        assert_eq!(ids(&|r| outside.contains(&r.id)), plain);
    }

    #[test]
    fn a_larger_sample_keeps_every_row_of_a_smaller_one() {
        let labels: Vec<usize> = (0..300).map(|i| usize::from(i % 3 == 0)).collect();
        for stratify in [true, false] {
            let ids = |n| -> std::collections::HashSet<String> {
                let spec = SampleSpec {
                    n,
                    stratify,
                    seed: 7,
                };
                sample(rows(&labels), &spec, 2)
                    .into_iter()
                    .map(|r| r.id)
                    .collect()
            };
            let (small, large) = (ids(40), ids(120));
            assert_eq!((small.len(), large.len()), (40, 120));
            assert!(small.is_subset(&large), "stratify: {stratify}");
        }
    }

    #[test]
    fn sample_larger_than_data_takes_everything() {
        let all = rows(&[0, 1, 0, 1]);
        let s = sample(
            all,
            &SampleSpec {
                n: 10,
                stratify: true,
                seed: 1,
            },
            2,
        );
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn clean_replaces_then_collapses() {
        let c = CleanSpec {
            replace: vec![("<br />".into(), " ".into())],
            collapse_whitespace: true,
        };
        assert_eq!(clean(" a<br /><br />b  c ", &c), "a b c");
    }

    fn column(batches: &[RecordBatch], name: &str) -> Vec<Option<String>> {
        batches
            .iter()
            .flat_map(|b| strings(b.column_by_name(name).unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn csv_columns_are_text_whatever_their_first_rows_look_like() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        let mut csv = String::from("id,text,label\n");
        // 1500 numeric-looking texts, then a real one; ids with leading zeros.
        for i in 0..1500 {
            csv.push_str(&format!("{i:04},{i},1\n"));
        }
        csv.push_str("007,\"a text, with a comma\",0\n");
        std::fs::write(&path, csv).unwrap();
        let batches = read_table(&path).unwrap();
        let ids = column(&batches, "id");
        let texts = column(&batches, "text");
        assert_eq!(ids[0].as_deref(), Some("0000"));
        assert_eq!(ids[1500].as_deref(), Some("007"));
        assert_eq!(texts[1500].as_deref(), Some("a text, with a comma"));
        assert_eq!(column(&batches, "label")[1500].as_deref(), Some("0"));
    }

    #[test]
    fn jsonl_values_are_text_and_a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            "{\"id\": \"007\", \"text\": 12, \"label\": 1}\n\n{\"id\": 8, \"text\": \"ok\", \"label\": 0.0, \"x\": [1]}\n",
        )
        .unwrap();
        let batches = read_table(&path).unwrap();
        assert_eq!(
            column(&batches, "id"),
            vec![Some("007".into()), Some("8".into())]
        );
        assert_eq!(column(&batches, "text")[0].as_deref(), Some("12"));
        assert_eq!(
            column(&batches, "label"),
            vec![Some("1".into()), Some("0".into())]
        );
        assert_eq!(column(&batches, "x"), vec![None, Some("[1]".into())]);
        std::fs::write(&path, "{\"id\": 1}\n{\"id\": 2,\n").unwrap();
        let e = read_table(&path).unwrap_err();
        assert!(e.to_string().contains("d.jsonl:2: invalid JSON"), "{e}");
        std::fs::write(&path, "[1, 2]\n").unwrap();
        let e = read_table(&path).unwrap_err();
        assert!(
            e.to_string().contains("d.jsonl:1: expected a JSON object"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod choice_tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn choices_come_from_json_arrays_or_separated_text_and_the_label_is_text_or_index() {
        let col: ArrayRef = Arc::new(arrow::array::StringArray::from(vec![
            Some(r#"["Paris", "Rome", 3]"#),
            Some("red | green|blue"),
            None,
        ]));
        let got = lists(&col).unwrap();
        assert_eq!(
            got[0].as_deref(),
            Some(&["Paris".to_string(), "Rome".into(), "3".into()][..])
        );
        assert_eq!(
            got[1].as_deref(),
            Some(&["red".to_string(), "green".into(), "blue".into()][..])
        );
        assert_eq!(got[2], None);
        let c = got[0].clone().unwrap();
        assert_eq!(correct_choice("Rome", &c), Some(1));
        assert_eq!(correct_choice(" paris ", &c), Some(0));
        // A choice's text wins over an index that happens to look the same.
        assert_eq!(correct_choice("3", &c), Some(2));
        assert_eq!(correct_choice("1", &c), Some(1));
        assert_eq!(correct_choice("Madrid", &c), None);
        assert_eq!(correct_choice("7", &c), None);
    }

    #[test]
    fn choices_come_from_a_list_column() {
        use arrow::array::{ListBuilder, StringBuilder};
        let mut b = ListBuilder::new(StringBuilder::new());
        b.values().append_value("yes");
        b.values().append_value("no");
        b.append(true);
        b.append(false);
        let col: ArrayRef = Arc::new(b.finish());
        let got = lists(&col).unwrap();
        assert_eq!(
            got[0].as_deref(),
            Some(&["yes".to_string(), "no".into()][..])
        );
        assert_eq!(got[1], None);
    }

    #[test]
    fn a_row_needs_two_distinct_non_empty_choices() {
        let at = Located {
            value: "options".to_string(),
            loc: crate::diag::SourceLoc::file_only(Path::new("spec.yaml")),
            field: "dataset.choices".into(),
        };
        let path = Path::new("d.jsonl");
        let ok = |v: &[&str]| {
            row_choices(
                &at,
                Some(v.iter().map(|s| s.to_string()).collect()),
                4,
                path,
            )
        };
        assert!(ok(&["a", "b"]).is_ok());
        let e = ok(&["a"]).unwrap_err();
        assert!(
            e.message.contains("row 4 of d.jsonl: it has 1 choices"),
            "{e}"
        );
        assert!(ok(&["a", "A"]).unwrap_err().message.contains("repeated"));
        assert!(
            ok(&["a", " "])
                .unwrap_err()
                .message
                .contains("choice 1 is empty")
        );
        assert!(row_choices(&at, None, 0, path).is_err());
    }
}
