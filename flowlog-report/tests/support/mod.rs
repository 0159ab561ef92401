//! Hand-written Parquet laid out as flowlog writes it (`dt=…/hour=…/`, by each record's
//! `end_ns`), with the columns the reports read, and a runner that returns a report's rows as
//! JSON values.
#![allow(dead_code)] // each test binary uses a different part of it

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use datafusion::arrow::{
    array::{
        ArrayRef, BooleanArray, ListArray, RecordBatch, StringArray, StructArray, UInt16Array,
        UInt32Array, UInt64Array,
    },
    datatypes::{DataType, Field, Fields, Schema},
};
use flowlog_report::{Filters, Report, ReportError, Request, Rows, output};
use parquet::arrow::ArrowWriter;
use serde_json::Value;

pub const HOUR: u64 = 3_600_000_000_000;
pub const SEC: u64 = 1_000_000_000;
/// 2026-12-07T10:00:00Z.
pub const T0: u64 = 1_796_637_600 * SEC;

/// One end's attribution: (status, namespace, name, zone).
pub type End = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);

pub const WEB: End = ("exact", Some("shop"), Some("web"), Some("zone-a"));
pub const DB: End = ("exact", Some("shop"), Some("db"), Some("zone-b"));
pub const UNKNOWN: End = ("unknown", None, None, None);

/// A record as the columns the reports read.
pub struct Rec {
    pub host: &'static str,
    pub flow_id: u64,
    pub seq: u32,
    pub direction: &'static str,
    pub start_ns: u64,
    pub end_ns: u64,
    pub local: (&'static str, u16, End),
    pub remote: (&'static str, u16, End),
    pub sent: u64,
    pub received: u64,
    pub outcome: &'static str,
}

pub fn end_fields() -> Fields {
    Fields::from(vec![
        Field::new("status", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("namespace", DataType::Utf8, true),
        Field::new("workload_name", DataType::Utf8, true),
        Field::new("zone", DataType::Utf8, true),
        Field::new(
            "candidates",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, false))),
            false,
        ),
    ])
}

pub fn ends(ends: Vec<End>) -> ArrayRef {
    let candidates = ListArray::new(
        Arc::new(Field::new("item", DataType::Utf8, false)),
        datafusion::arrow::buffer::OffsetBuffer::new_zeroed(ends.len()),
        Arc::new(StringArray::from(Vec::<&str>::new())),
        None,
    );
    Arc::new(StructArray::new(
        end_fields(),
        vec![
            Arc::new(StringArray::from_iter_values(ends.iter().map(|e| e.0))),
            Arc::new(StringArray::from_iter(
                ends.iter().map(|e| e.2.map(|n| format!("{n}-1"))),
            )),
            Arc::new(StringArray::from_iter(ends.iter().map(|e| e.1))),
            Arc::new(StringArray::from_iter(ends.iter().map(|e| e.2))),
            Arc::new(StringArray::from_iter(ends.iter().map(|e| e.3))),
            Arc::new(candidates),
        ],
        None,
    ))
}

/// `dir/dt=…/hour=…` of the time `ns`, created.
pub fn partition(dir: &Path, ns: u64) -> PathBuf {
    let hour = ns / HOUR;
    let dir = dir.join(format!(
        "dt={}/hour={:02}",
        chrono_date(hour / 24),
        hour % 24
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `recs` as one Parquet file in the partition of `partition_ns`.
pub fn write(dir: &Path, partition_ns: u64, name: &str, recs: &[Rec]) {
    let dir = partition(dir, partition_ns);
    let u64s = |f: fn(&Rec) -> u64| Arc::new(UInt64Array::from_iter_values(recs.iter().map(f)));
    let strs = |f: fn(&Rec) -> &str| Arc::new(StringArray::from_iter_values(recs.iter().map(f)));
    let zeros = || Arc::new(UInt64Array::from(vec![0; recs.len()])) as ArrayRef;
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("flow_id", u64s(|r| r.flow_id)),
        ("host", strs(|r| r.host)),
        (
            "seq",
            Arc::new(UInt32Array::from_iter_values(recs.iter().map(|r| r.seq))),
        ),
        ("start_ns", u64s(|r| r.start_ns)),
        ("end_ns", u64s(|r| r.end_ns)),
        ("local_addr", strs(|r| r.local.0)),
        (
            "local_port",
            Arc::new(UInt16Array::from_iter_values(
                recs.iter().map(|r| r.local.1),
            )),
        ),
        ("remote_addr", strs(|r| r.remote.0)),
        (
            "remote_port",
            Arc::new(UInt16Array::from_iter_values(
                recs.iter().map(|r| r.remote.1),
            )),
        ),
        ("direction", strs(|r| r.direction)),
        ("outcome", strs(|r| r.outcome)),
        ("bytes_sent", u64s(|r| r.sent)),
        ("bytes_received", u64s(|r| r.received)),
        ("segs_sent", u64s(|r| 1 + r.sent / 1000)),
        ("retransmits", zeros()),
        ("resets_sent", zeros()),
        ("resets_received", zeros()),
        (
            "srtt_us",
            Arc::new(UInt32Array::from(vec![100; recs.len()])),
        ),
        ("local", ends(recs.iter().map(|r| r.local.2).collect())),
        ("remote", ends(recs.iter().map(|r| r.remote.2).collect())),
        (
            "adopted",
            Arc::new(BooleanArray::from(vec![false; recs.len()])),
        ),
    ];
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(n, c)| Field::new(*n, c.data_type().clone(), false))
            .collect::<Vec<_>>(),
    ));
    let batch =
        RecordBatch::try_new(schema.clone(), columns.into_iter().map(|c| c.1).collect()).unwrap();
    let file = std::fs::File::create(dir.join(format!("{name}.parquet"))).unwrap();
    let mut writer = ArrowWriter::try_new(file, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// `YYYY-MM-DD` of a day number since 1970-01-01.
pub fn chrono_date(days: u64) -> String {
    flowlog_report::time::display_ns(days * 24 * HOUR)[..10].to_string()
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flowlog-report-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn request(report: Report, dir: &Path, from_ns: u64, to_ns: u64) -> Request {
    Request {
        report,
        data: dir.display().to_string(),
        from_ns,
        to_ns,
        skew: Duration::from_secs(1),
        price_per_gb: 0.01,
        margin: Duration::from_secs(3600),
        filters: Filters::default(),
    }
}

pub fn json(rows: &Rows) -> Vec<Value> {
    let mut out = Vec::new();
    output::write(rows, output::Format::Json, &mut out).unwrap();
    serde_json::from_slice::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

pub fn run(request: &Request) -> Result<Vec<Value>, ReportError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(flowlog_report::run(request))
        .map(|rows| json(&rows))
}

/// A connection web → db:5432 from 10:30 to 11:10: the client's interim record (10:59, in hour
/// 10) and last record (hour 11), the latter delivered twice; the server's one record.
pub fn connection(dir: &Path) {
    let client = |seq, end_ns, sent, received, outcome| Rec {
        host: "h-web",
        flow_id: 7,
        seq,
        direction: "outbound",
        start_ns: T0 + HOUR / 2,
        end_ns,
        local: ("10.0.0.1", 40000, WEB),
        remote: ("10.0.0.2", 5432, DB),
        sent,
        received,
        outcome,
    };
    let interim = T0 + 59 * 60 * SEC;
    let last = T0 + HOUR + 10 * 60 * SEC;
    write(
        dir,
        interim,
        "web-a",
        &[client(0, interim, 1000, 20, "open")],
    );
    write(
        dir,
        last,
        "web-b",
        &[
            client(1, last, 500, 10, "closed"),
            client(1, last, 500, 10, "closed"),
        ],
    );
    let server = Rec {
        host: "h-db",
        flow_id: 9,
        seq: 0,
        direction: "inbound",
        start_ns: T0 + HOUR / 2 + SEC / 2,
        end_ns: last,
        local: ("10.0.0.2", 5432, DB),
        remote: ("10.0.0.1", 40000, UNKNOWN),
        sent: 30,
        received: 1500,
        outcome: "closed",
    };
    write(dir, last, "db", &[server]);
}
