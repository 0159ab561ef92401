//! The reports on small hand-written Parquet files laid out as flowlog writes them
//! (`dt=…/hour=…/`, by each record's `end_ns`): the ends of a connection joined and its interim
//! records summed, duplicates dropped, only the window's partitions read, and the errors a user
//! meets first.
mod support;

use std::time::Duration;

use flowlog_report::{Filters, Report, ReportError, Request};
use serde_json::Value;
use support::*;

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
