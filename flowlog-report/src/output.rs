//! A report's rows as text: an aligned table for people, CSV for spreadsheets, JSON for
//! programs. CSV and JSON keep the values as the query gave them (times as ns since the
//! epoch, as in the Parquet files and the shipped SQL); the table shows every `*_ns` column as
//! an RFC 3339 time (UTC) instead.
use std::{fmt, io::Write, str::FromStr, sync::Arc};

use datafusion::arrow::{
    array::{ArrayRef, RecordBatch},
    compute::cast,
    datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit},
    error::ArrowError,
    util::pretty::pretty_format_batches,
};

use crate::ReportError;

/// How `flowlog report` writes its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Aligned columns with a header, times as RFC 3339.
    #[default]
    Table,
    /// RFC 4180 CSV with a header line.
    Csv,
    /// One JSON array of objects, one object per row keyed by column name, nulls included.
    Json,
    /// One self-contained page of the availability, audit and capacity reports with a service
    /// map and bytes by hour ([`crate::html`]): written by [`crate::html::page`], which runs
    /// the three reports, not from one report's rows.
    Html,
}

impl Format {
    pub const NAMES: [&'static str; 4] = ["table", "csv", "json", "html"];
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Table => "table",
            Format::Csv => "csv",
            Format::Json => "json",
            Format::Html => "html",
        })
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            "html" => Ok(Format::Html),
            other => Err(format!(
                "unknown format {other:?} (expected one of {})",
                Format::NAMES.join(", ")
            )),
        }
    }
}

/// A report's rows and their columns (known even when there is no row).
#[derive(Debug, Clone)]
pub struct Rows {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes `rows` to `out` in `format`.
pub fn write(rows: &Rows, format: Format, out: &mut dyn Write) -> Result<(), ReportError> {
    let error =
        |source: Box<dyn std::error::Error + Send + Sync>| ReportError::Write { format, source };
    let arrow = |e: ArrowError| error(Box::new(e));
    match format {
        Format::Table => {
            let batches = rows
                .batches
                .iter()
                .map(times_as_timestamps)
                .collect::<Result<Vec<_>, _>>()
                .map_err(arrow)?;
            let batches = if batches.is_empty() {
                vec![RecordBatch::new_empty(rows.schema.clone())]
            } else {
                batches
            };
            let table = pretty_format_batches(&batches).map_err(arrow)?;
            writeln!(out, "{table}").map_err(|e| error(Box::new(e)))?;
        }
        Format::Csv => {
            let mut writer = arrow_csv::WriterBuilder::new().with_header(true).build(out);
            if rows.batches.is_empty() {
                writer
                    .write(&RecordBatch::new_empty(rows.schema.clone()))
                    .map_err(arrow)?;
            }
            for batch in &rows.batches {
                writer.write(batch).map_err(arrow)?;
            }
        }
        Format::Json => {
            let mut writer = arrow_json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow_json::writer::JsonArray>(&mut *out);
            for batch in &rows.batches {
                writer.write(batch).map_err(arrow)?;
            }
            writer.finish().map_err(arrow)?;
            drop(writer);
            writeln!(out).map_err(|e| error(Box::new(e)))?;
        }
        Format::Html => {
            return Err(error(
                "a page holds three reports: write it with `html::page`, not from one report's rows"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// The batch with each unsigned `*_ns` column as a UTC timestamp, for people to read.
fn times_as_timestamps(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let timestamp = DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if field.name().ends_with("_ns") && field.data_type() == &DataType::UInt64 {
            let signed = cast(column, &DataType::Int64)?;
            columns.push(cast(&signed, &timestamp)?);
            fields.push(Field::new(field.name(), timestamp.clone(), true));
        } else {
            columns.push(column.clone());
            fields.push(field.as_ref().clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Float64Array, StringArray, UInt64Array};

    use super::*;

    fn rows() -> Rows {
        let schema = Arc::new(Schema::new(vec![
            Field::new("client", DataType::Utf8, true),
            Field::new("first_seen_ns", DataType::UInt64, true),
            Field::new("rate", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("shop/web"), None])),
                Arc::new(UInt64Array::from(vec![1_796_680_800_000_000_000, 0])),
                Arc::new(Float64Array::from(vec![Some(0.25), None])),
            ],
        )
        .unwrap();
        Rows {
            schema,
            batches: vec![batch],
        }
    }

    fn text(rows: &Rows, format: Format) -> String {
        let mut out = Vec::new();
        write(rows, format, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_is_an_array_of_objects_with_nulls() {
        assert_eq!(
            text(&rows(), Format::Json),
            "[{\"client\":\"shop/web\",\"first_seen_ns\":1796680800000000000,\"rate\":0.25},\
             {\"client\":null,\"first_seen_ns\":0,\"rate\":null}]\n"
        );
        let empty = Rows {
            schema: rows().schema,
            batches: vec![],
        };
        assert_eq!(text(&empty, Format::Json), "[]\n");
    }

    #[test]
    fn csv_has_a_header_even_without_rows() {
        assert_eq!(
            text(&rows(), Format::Csv),
            "client,first_seen_ns,rate\nshop/web,1796680800000000000,0.25\n,0,\n"
        );
        let empty = Rows {
            schema: rows().schema,
            batches: vec![],
        };
        assert_eq!(text(&empty, Format::Csv), "client,first_seen_ns,rate\n");
    }

    #[test]
    fn the_table_shows_times() {
        let table = text(&rows(), Format::Table);
        assert!(table.contains("2026-12-07T22:00:00Z"), "{table}");
        assert!(table.contains("1970-01-01T00:00:00Z"), "{table}");
        assert!(table.contains("| shop/web"), "{table}");
    }
}
