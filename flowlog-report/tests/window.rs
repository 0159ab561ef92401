//! The reports on small hand-written Parquet files laid out as flowlog writes them
//! (`dt=…/hour=…/`, by each record's `end_ns`): the ends of a connection joined and its interim
//! records summed, duplicates dropped, only the window's partitions read, and the errors a user
//! meets first.
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

const HOUR: u64 = 3_600_000_000_000;
const SEC: u64 = 1_000_000_000;
/// 2026-12-07T10:00:00Z.
const T0: u64 = 1_796_637_600 * SEC;

/// One end's attribution: (status, namespace, name, zone).
type End = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);

const WEB: End = ("exact", Some("shop"), Some("web"), Some("zone-a"));
const DB: End = ("exact", Some("shop"), Some("db"), Some("zone-b"));
const UNKNOWN: End = ("unknown", None, None, None);

/// A record as the columns the reports read.
struct Rec {
    host: &'static str,
    flow_id: u64,
    seq: u32,
    direction: &'static str,
    start_ns: u64,
    end_ns: u64,
    local: (&'static str, u16, End),
    remote: (&'static str, u16, End),
    sent: u64,
    received: u64,
    outcome: &'static str,
}

fn end_fields() -> Fields {
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

fn ends(ends: Vec<End>) -> ArrayRef {
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
fn partition(dir: &Path, ns: u64) -> PathBuf {
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
fn write(dir: &Path, partition_ns: u64, name: &str, recs: &[Rec]) {
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
fn chrono_date(days: u64) -> String {
    flowlog_report::time::display_ns(days * 24 * HOUR)[..10].to_string()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flowlog-report-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn request(report: Report, dir: &Path, from_ns: u64, to_ns: u64) -> Request {
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

fn json(rows: &Rows) -> Vec<Value> {
    let mut out = Vec::new();
    output::write(rows, output::Format::Json, &mut out).unwrap();
    serde_json::from_slice::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn run(request: &Request) -> Result<Vec<Value>, ReportError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(flowlog_report::run(request))
        .map(|rows| json(&rows))
}

/// A connection web → db:5432 from 10:30 to 11:10: the client's interim record (10:59, in hour
/// 10) and last record (hour 11), the latter delivered twice; the server's one record.
fn connection(dir: &Path) {
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

#[test]
fn the_two_ends_join_and_interim_records_sum_once() {
    let dir = temp_dir("join");
    connection(&dir);
    let rows = run(&request(
        Report::Connections,
        &dir,
        T0 + HOUR,
        T0 + 2 * HOUR,
    ))
    .unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let r = &rows[0];
    // The client is named by its own record (the server's view of it is unknown).
    assert_eq!(
        (
            &r["client"],
            &r["client_zone"],
            &r["server"],
            &r["server_zone"]
        ),
        (
            &Value::from("shop/web"),
            &Value::from("zone-a"),
            &Value::from("shop/db"),
            &Value::from("zone-b")
        )
    );
    assert_eq!(
        (&r["bytes_up"], &r["bytes_down"]),
        (&Value::from(1500), &Value::from(30))
    );
    assert_eq!(
        (&r["bytes_agree"], &r["seen_from"]),
        (&Value::from(true), &Value::from("both"))
    );
    assert_eq!(r["outcome"], "closed");
    assert_eq!(r["start_ns"], T0 + HOUR / 2);

    let availability = run(&request(
        Report::Availability,
        &dir,
        T0 + HOUR,
        T0 + 2 * HOUR,
    ))
    .unwrap();
    assert_eq!(availability.len(), 1, "{availability:#?}");
    let a = &availability[0];
    assert_eq!(
        (&a["connections"], &a["failed"], &a["resets"]),
        (&Value::from(1), &Value::from(0), &Value::from(0))
    );
    assert_eq!(
        (&a["rtt_p50_us"], &a["rtt_p99_us"], &a["unhealthy"]),
        (&Value::from(100), &Value::from(100), &Value::from(0.0))
    );
    // No retransmits and nothing before the window (so no verdict on getting worse).
    assert_eq!(
        (&a["retransmit_rate"], &a["prev_connections"], &a["worse"]),
        (&Value::from(0.0), &Value::from(0), &Value::Null)
    );

    let capacity = run(&request(Report::Capacity, &dir, T0 + HOUR, T0 + 2 * HOUR)).unwrap();
    assert_eq!(capacity.len(), 1, "{capacity:#?}");
    assert_eq!(capacity[0]["hour"], "2026-12-07 10:00:00");
    assert_eq!(capacity[0]["bytes"], 1530);
    assert_eq!(capacity[0]["cross_zone"], true);
    let cost = capacity[0]["cross_zone_cost"].as_f64().unwrap();
    assert!(
        (cost - 1530.0 * 2.0 * 0.01 / 1073741824.0).abs() < 1e-18,
        "{cost}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn only_the_partitions_of_the_window_are_read() {
    let dir = temp_dir("prune");
    connection(&dir);
    // A record that would be a second connection in the window, filed under a day far from it:
    // read, it would change the answer.
    let stray = Rec {
        host: "h-web",
        flow_id: 99,
        seq: 0,
        direction: "outbound",
        start_ns: T0 + HOUR,
        end_ns: T0 + HOUR + SEC,
        local: ("10.0.0.1", 40001, WEB),
        remote: ("10.0.0.2", 5432, DB),
        sent: 1,
        received: 1,
        outcome: "closed",
    };
    write(&dir, T0 - 30 * 24 * HOUR, "stray", &[stray]);
    // And a file that is not Parquet at all, next to it.
    std::fs::write(
        partition(&dir, T0 - 30 * 24 * HOUR).join("garbage.parquet"),
        b"not parquet",
    )
    .unwrap();
    let window = request(Report::Connections, &dir, T0 + HOUR, T0 + 2 * HOUR);
    let rows = run(&window).unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    // Read with everything, the stray connection appears (and the garbage is an error): the
    // files above were really there to be read.
    let everything = request(Report::Connections, &dir, 0, u64::MAX / 2);
    let err = run(&everything).unwrap_err();
    assert!(
        matches!(&err, ReportError::File { path, .. } if path.ends_with("garbage.parquet")),
        "{err:?}"
    );

    // Without the margin, the interim record (hour 10) is outside: the connection is counted
    // from its records in hour 11 (and its bytes say so).
    let narrow = Request {
        margin: Duration::ZERO,
        skew: Duration::ZERO,
        ..window
    };
    let rows = run(&narrow).unwrap();
    assert_eq!(rows[0]["bytes_up"], 500, "{rows:#?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn filters_keep_the_connections_with_a_matching_end() {
    let dir = temp_dir("filters");
    connection(&dir);
    let window = request(Report::Audit, &dir, T0 + HOUR, T0 + 2 * HOUR);
    let count = |filters: Filters| {
        run(&Request {
            filters,
            ..window.clone()
        })
        .unwrap()
        .len()
    };
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        count(Filters {
            namespace: some("shop"),
            ..Filters::default()
        }),
        1
    );
    assert_eq!(
        count(Filters {
            namespace: some("other"),
            ..Filters::default()
        }),
        0
    );
    assert_eq!(
        count(Filters {
            workload: some("db"),
            ..Filters::default()
        }),
        1
    );
    assert_eq!(
        count(Filters {
            workload: some("shop/web"),
            ..Filters::default()
        }),
        1
    );
    assert_eq!(
        count(Filters {
            workload: some("we"),
            ..Filters::default()
        }),
        0
    );
    assert_eq!(
        count(Filters {
            host: some("h-db"),
            ..Filters::default()
        }),
        1
    );
    assert_eq!(
        count(Filters {
            host: some("h-x"),
            ..Filters::default()
        }),
        0
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn clear_errors_for_a_missing_directory_and_an_empty_window() {
    let dir = temp_dir("errors");
    let missing = dir.join("nope");
    let err = run(&request(Report::Audit, &missing, 0, 1)).unwrap_err();
    assert!(matches!(err, ReportError::Location { .. }), "{err:?}");
    assert!(err.to_string().contains("nope"), "{err}");

    connection(&dir);
    let err = run(&request(
        Report::Audit,
        &dir,
        T0 + 50 * HOUR,
        T0 + 51 * HOUR,
    ))
    .unwrap_err();
    assert!(matches!(err, ReportError::NoFiles { .. }), "{err:?}");
    assert!(err.to_string().contains("no Parquet files"), "{err}");

    let err = run(&request(Report::Audit, &dir, T0 + HOUR, T0 + HOUR)).unwrap_err();
    assert!(matches!(err, ReportError::EmptyWindow { .. }), "{err:?}");
    let _ = std::fs::remove_dir_all(dir);
}
