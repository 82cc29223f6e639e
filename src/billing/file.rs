//! Export files: invoice lines and usage events as flat records, written as
//! CSV (RFC 4180, with a header), JSON Lines or Parquet, chunk by chunk, to
//! `FILE.partial` that is renamed to `FILE` only when complete.
//!
//! Money columns are integer nanos plus a decimal string (`amount` "1.23"),
//! never floats. Knows records and file formats; nothing of the database or
//! gRPC (callers convert what they read into records).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use super::invoice::InvoiceLine;
use super::money::{Currency, format_decimal};
use crate::metering::UsageEvent;

/// A file format of `ascendctl billing export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Csv,
    Jsonl,
    Parquet,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot write Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("cannot build a record batch: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
}

/// One cell of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Text(&'a str),
    Int(i64),
}

/// A flat record with a fixed list of columns, text or 64-bit integers.
pub trait Record: Serialize {
    /// Column names, and whether each is text (else an integer), in the
    /// order of the struct's fields.
    const COLUMNS: &'static [(&'static str, bool)];
    fn value(&self, column: usize) -> Value<'_>;
}

/// RFC 3339 UTC with microseconds; times before 1970 are clamped to it.
pub fn rfc3339_us(us: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0));
    humantime::format_rfc3339_micros(at).to_string()
}

/// One invoice line as exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineRecord {
    pub invoice_id: String,
    pub tenant_id: String,
    pub tenant_slug: String,
    pub period: String,
    pub line_number: i64,
    pub model: String,
    pub device_class: String,
    pub kind: String,
    pub quantity: i64,
    pub currency_code: String,
    pub unit_price_nanos: i64,
    pub unit_price: String,
    pub amount_nanos: i64,
    pub amount: String,
    pub adjusts_period: String,
    pub price_effective_from: String,
}

impl From<&InvoiceLine> for LineRecord {
    fn from(l: &InvoiceLine) -> LineRecord {
        let decimals = Currency::find(&l.currency_code).map_or(2, |c| c.minor_units);
        LineRecord {
            invoice_id: l.invoice_id.clone(),
            tenant_id: l.tenant_id.clone(),
            tenant_slug: l.tenant_slug.clone(),
            period: l.period.clone(),
            line_number: i64::from(l.line_number),
            model: l.model.clone(),
            device_class: l.device_class.clone(),
            kind: l.kind.as_str().to_owned(),
            quantity: l.quantity,
            currency_code: l.currency_code.clone(),
            unit_price_nanos: l.unit_price_nanos,
            unit_price: format_decimal(l.unit_price_nanos, decimals),
            amount_nanos: l.amount_nanos,
            amount: format_decimal(l.amount_nanos, decimals),
            adjusts_period: l.adjusts_period.clone(),
            price_effective_from: rfc3339_us(l.price_effective_from_us),
        }
    }
}

impl Record for LineRecord {
    const COLUMNS: &'static [(&'static str, bool)] = &[
        ("invoice_id", true),
        ("tenant_id", true),
        ("tenant_slug", true),
        ("period", true),
        ("line_number", false),
        ("model", true),
        ("device_class", true),
        ("kind", true),
        ("quantity", false),
        ("currency_code", true),
        ("unit_price_nanos", false),
        ("unit_price", true),
        ("amount_nanos", false),
        ("amount", true),
        ("adjusts_period", true),
        ("price_effective_from", true),
    ];

    fn value(&self, column: usize) -> Value<'_> {
        match column {
            0 => Value::Text(&self.invoice_id),
            1 => Value::Text(&self.tenant_id),
            2 => Value::Text(&self.tenant_slug),
            3 => Value::Text(&self.period),
            4 => Value::Int(self.line_number),
            5 => Value::Text(&self.model),
            6 => Value::Text(&self.device_class),
            7 => Value::Text(&self.kind),
            8 => Value::Int(self.quantity),
            9 => Value::Text(&self.currency_code),
            10 => Value::Int(self.unit_price_nanos),
            11 => Value::Text(&self.unit_price),
            12 => Value::Int(self.amount_nanos),
            13 => Value::Text(&self.amount),
            14 => Value::Text(&self.adjusts_period),
            _ => Value::Text(&self.price_effective_from),
        }
    }
}

/// One usage event as exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub tenant_id: String,
    pub request_id: String,
    pub key_id: String,
    pub model: String,
    pub device_profile: String,
    pub prompt_tokens: i64,
    /// Of `prompt_tokens`, those served from the prefix cache.
    pub cached_prompt_tokens: i64,
    pub completion_tokens: i64,
    pub queue_time_us: i64,
    pub ttft_us: i64,
    pub total_time_us: i64,
    pub device_time_us: i64,
    pub energy_mj: i64,
    pub mean_power_mw: i64,
    pub finish_reason: String,
    pub started_at_us: i64,
    pub finished_at_us: i64,
}

impl From<&UsageEvent> for EventRecord {
    fn from(e: &UsageEvent) -> EventRecord {
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        EventRecord {
            tenant_id: e.tenant_id.clone(),
            request_id: e.request_id.clone(),
            key_id: e.key_id.clone(),
            model: e.model.clone(),
            device_profile: e.device_profile.clone(),
            prompt_tokens: i64::from(e.prompt_tokens),
            cached_prompt_tokens: i64::from(e.cached_prompt_tokens),
            completion_tokens: i64::from(e.completion_tokens),
            queue_time_us: i(e.queue_time_us),
            ttft_us: i(e.ttft_us),
            total_time_us: i(e.total_time_us),
            device_time_us: i(e.device_time_us),
            energy_mj: i(e.energy_mj),
            mean_power_mw: i(e.mean_power_mw),
            finish_reason: e.finish_reason.as_str().to_owned(),
            started_at_us: e.started_at_us,
            finished_at_us: e.finished_at_us,
        }
    }
}

impl Record for EventRecord {
    const COLUMNS: &'static [(&'static str, bool)] = &[
        ("tenant_id", true),
        ("request_id", true),
        ("key_id", true),
        ("model", true),
        ("device_profile", true),
        ("prompt_tokens", false),
        ("cached_prompt_tokens", false),
        ("completion_tokens", false),
        ("queue_time_us", false),
        ("ttft_us", false),
        ("total_time_us", false),
        ("device_time_us", false),
        ("energy_mj", false),
        ("mean_power_mw", false),
        ("finish_reason", true),
        ("started_at_us", false),
        ("finished_at_us", false),
    ];

    fn value(&self, column: usize) -> Value<'_> {
        match column {
            0 => Value::Text(&self.tenant_id),
            1 => Value::Text(&self.request_id),
            2 => Value::Text(&self.key_id),
            3 => Value::Text(&self.model),
            4 => Value::Text(&self.device_profile),
            5 => Value::Int(self.prompt_tokens),
            6 => Value::Int(self.cached_prompt_tokens),
            7 => Value::Int(self.completion_tokens),
            8 => Value::Int(self.queue_time_us),
            9 => Value::Int(self.ttft_us),
            10 => Value::Int(self.total_time_us),
            11 => Value::Int(self.device_time_us),
            12 => Value::Int(self.energy_mj),
            13 => Value::Int(self.mean_power_mw),
            14 => Value::Text(&self.finish_reason),
            15 => Value::Int(self.started_at_us),
            _ => Value::Int(self.finished_at_us),
        }
    }
}

/// The Arrow schema of a record type: text as UTF-8, integers as Int64.
pub fn arrow_schema<R: Record>() -> Schema {
    Schema::new(
        R::COLUMNS
            .iter()
            .map(|(name, text)| {
                let kind = if *text {
                    DataType::Utf8
                } else {
                    DataType::Int64
                };
                Field::new(*name, kind, false)
            })
            .collect::<Vec<_>>(),
    )
}

enum Sink {
    Csv(Box<csv::Writer<BufWriter<File>>>),
    Jsonl(BufWriter<File>),
    Parquet(Box<ArrowWriter<File>>),
}

/// Writes records of type `R` to `FILE.partial`; [`ExportFile::finish`]
/// renames it to `FILE`. Dropped unfinished, it removes the partial file.
pub struct ExportFile<R: Record> {
    sink: Option<Sink>,
    schema: Arc<Schema>,
    partial: PathBuf,
    target: PathBuf,
    rows: u64,
    _record: std::marker::PhantomData<R>,
}

/// `FILE.partial`, in the same directory so the rename is atomic.
pub fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    target.with_file_name(name)
}

impl<R: Record> ExportFile<R> {
    pub fn create(target: &Path, format: FileFormat) -> Result<ExportFile<R>, FileError> {
        let partial = partial_path(target);
        let io = |source| FileError::Io {
            path: partial.clone(),
            source,
        };
        let file = File::create(&partial).map_err(io)?;
        let schema = Arc::new(arrow_schema::<R>());
        let sink = match format {
            FileFormat::Csv => {
                let mut writer = csv::WriterBuilder::new()
                    .has_headers(false)
                    .from_writer(BufWriter::with_capacity(1 << 20, file));
                writer.write_record(R::COLUMNS.iter().map(|(name, _)| *name))?;
                Sink::Csv(Box::new(writer))
            }
            FileFormat::Jsonl => Sink::Jsonl(BufWriter::with_capacity(1 << 20, file)),
            FileFormat::Parquet => {
                let properties = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .build();
                Sink::Parquet(Box::new(ArrowWriter::try_new(
                    file,
                    schema.clone(),
                    Some(properties),
                )?))
            }
        };
        Ok(ExportFile {
            sink: Some(sink),
            schema,
            partial,
            target: target.to_owned(),
            rows: 0,
            _record: std::marker::PhantomData,
        })
    }

    /// Appends one chunk of records.
    pub fn write_chunk(&mut self, records: &[R]) -> Result<(), FileError> {
        let partial = &self.partial;
        let io = |source| FileError::Io {
            path: partial.clone(),
            source,
        };
        match self.sink.as_mut() {
            Some(Sink::Csv(writer)) => {
                let mut fields: Vec<String> = Vec::with_capacity(R::COLUMNS.len());
                for record in records {
                    fields.clear();
                    for column in 0..R::COLUMNS.len() {
                        fields.push(match record.value(column) {
                            Value::Text(text) => text.to_owned(),
                            Value::Int(n) => n.to_string(),
                        });
                    }
                    writer.write_record(&fields)?;
                }
            }
            Some(Sink::Jsonl(writer)) => {
                for record in records {
                    serde_json::to_writer(&mut *writer, record)?;
                    writer.write_all(b"\n").map_err(io)?;
                }
            }
            Some(Sink::Parquet(writer)) if !records.is_empty() => {
                writer.write(&record_batch(self.schema.clone(), records)?)?;
            }
            Some(Sink::Parquet(_)) => {}
            None => {}
        }
        self.rows += records.len() as u64;
        Ok(())
    }

    /// Flushes, syncs and renames `FILE.partial` to `FILE`; returns the rows
    /// written.
    pub fn finish(mut self) -> Result<u64, FileError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| FileError::Io { path, source }
        };
        let file = match self.sink.take() {
            Some(Sink::Csv(writer)) => (*writer)
                .into_inner()
                .map_err(|e| io(&self.partial)(e.into_error()))?
                .into_inner()
                .map_err(|e| io(&self.partial)(e.into_error()))?,
            Some(Sink::Jsonl(writer)) => writer
                .into_inner()
                .map_err(|e| io(&self.partial)(e.into_error()))?,
            Some(Sink::Parquet(writer)) => (*writer).into_inner()?,
            None => return Ok(self.rows),
        };
        file.sync_all().map_err(io(&self.partial))?;
        std::fs::rename(&self.partial, &self.target).map_err(io(&self.target))?;
        Ok(self.rows)
    }
}

impl<R: Record> Drop for ExportFile<R> {
    fn drop(&mut self) {
        if self.sink.is_some() {
            // Unfinished: leave nothing that looks like an export.
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// One Arrow batch of `records`, column by column.
pub fn record_batch<R: Record>(
    schema: Arc<Schema>,
    records: &[R],
) -> Result<RecordBatch, FileError> {
    let columns: Vec<ArrayRef> = R::COLUMNS
        .iter()
        .enumerate()
        .map(|(column, (_, text))| -> ArrayRef {
            if *text {
                Arc::new(StringArray::from_iter_values(records.iter().map(
                    |r| match r.value(column) {
                        Value::Text(text) => text.to_owned(),
                        Value::Int(n) => n.to_string(),
                    },
                )))
            } else {
                Arc::new(Int64Array::from_iter_values(records.iter().map(
                    |r| match r.value(column) {
                        Value::Int(n) => n,
                        Value::Text(_) => 0,
                    },
                )))
            }
        })
        .collect();
    Ok(RecordBatch::try_new(schema, columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: i64) -> EventRecord {
        EventRecord {
            tenant_id: "t".to_owned(),
            request_id: format!("r,\"{i}\"\n"),
            key_id: "k".to_owned(),
            model: "m".to_owned(),
            device_profile: "ascend-910b".to_owned(),
            prompt_tokens: i,
            cached_prompt_tokens: i / 2,
            completion_tokens: 2 * i,
            queue_time_us: 1,
            ttft_us: 2,
            total_time_us: 3,
            device_time_us: 4,
            energy_mj: 5,
            mean_power_mw: 6,
            finish_reason: "eos".to_owned(),
            started_at_us: 7,
            finished_at_us: 8,
        }
    }

    #[test]
    fn columns_match_the_serialized_fields() {
        let json = serde_json::to_value(event(1)).expect("json");
        let keys: Vec<&str> = json
            .as_object()
            .expect("object")
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut columns: Vec<&str> = EventRecord::COLUMNS.iter().map(|(n, _)| *n).collect();
        let mut sorted_keys = keys.clone();
        sorted_keys.sort_unstable();
        columns.sort_unstable();
        assert_eq!(sorted_keys, columns);
        let line = LineRecord::from(&InvoiceLine {
            invoice_id: "i".to_owned(),
            line_number: 1,
            model: "m".to_owned(),
            device_class: "d".to_owned(),
            kind: super::super::invoice::LineKind::Energy,
            quantity: 3,
            unit_price_nanos: 80_000_000,
            amount_nanos: 1_230_000_000,
            adjusts_period: String::new(),
            price_effective_from_us: 0,
            tenant_id: "t".to_owned(),
            tenant_slug: "s".to_owned(),
            period: "2026-11".to_owned(),
            currency_code: "USD".to_owned(),
        });
        assert_eq!(line.amount, "1.23");
        assert_eq!(line.unit_price, "0.08");
        assert_eq!(line.price_effective_from, "1970-01-01T00:00:00.000000Z");
        let json = serde_json::to_value(&line).expect("json");
        assert_eq!(
            json.as_object().expect("object").len(),
            LineRecord::COLUMNS.len()
        );
        for (column, (name, _)) in LineRecord::COLUMNS.iter().enumerate() {
            let expected = match line.value(column) {
                Value::Text(t) => serde_json::Value::from(t),
                Value::Int(n) => serde_json::Value::from(n),
            };
            assert_eq!(json[*name], expected, "{name}");
        }
    }

    #[test]
    fn csv_quotes_per_rfc_4180_and_partial_files_vanish() {
        let dir = tempfile::tempdir().expect("dir");
        let target = dir.path().join("events.csv");
        let mut file = ExportFile::<EventRecord>::create(&target, FileFormat::Csv).expect("create");
        file.write_chunk(&[event(1), event(2)]).expect("write");
        assert!(partial_path(&target).exists());
        assert!(
            !target.exists(),
            "nothing under the final name until finished"
        );
        assert_eq!(file.finish().expect("finish"), 2);
        assert!(!partial_path(&target).exists());
        let mut reader = csv::Reader::from_path(&target).expect("read");
        let rows: Vec<EventRecord> = reader
            .deserialize()
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(rows, vec![event(1), event(2)]);

        let abandoned = dir.path().join("abandoned.jsonl");
        let mut file =
            ExportFile::<EventRecord>::create(&abandoned, FileFormat::Jsonl).expect("create");
        file.write_chunk(&[event(1)]).expect("write");
        drop(file);
        assert!(!abandoned.exists() && !partial_path(&abandoned).exists());
    }
}
