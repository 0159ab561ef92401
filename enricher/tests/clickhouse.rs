//! ClickHouse fed from `flows.enriched` (`analysis/clickhouse/kafka.sql`: a Kafka-engine table,
//! a MergeTree table and a materialized view between them) answers the shipped reports with the
//! same rows as the Parquet files the same enricher wrote. The enricher binary enriches flow
//! records of two hosts against a static inventory into a topic on the real broker (tansu;
//! `FLOWLOG_TEST_KAFKA`) and into Parquet; chDB, an embedded ClickHouse, reads the topic through
//! its Kafka engine, with the Avro schemas from a schema registry of the test's own
//! (`flowlog-testkit/clickhouse_kafka.py`), and runs every report on both.
use std::{net::IpAddr, process::Command};

use flowlog_record::{Direction, Family, FlowRecord, Outcome, avro, enriched_avro};
use flowlog_testkit::{
    PATIENCE, Topic, clickhouse_kafka, free_port, now_ns, spawn_ready, temp_dir, unique_name,
};
use rdkafka::Message;
use serde_json::{Value, json};

const ENRICHER: &str = env!("CARGO_BIN_EXE_flowlog-enricher");
const SCHEMAS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas");
const SECOND: u64 = 1_000_000_000;

/// The client host (`shop/web`, zone-a) and the server host (`shop/db`, zone-b).
const WEB: &str = "10.9.0.1";
const DB: &str = "10.9.0.2";

/// One record of a flow: `host`'s end `local` ↔ `remote`, from `start` to `end` (ns).
#[allow(clippy::too_many_arguments)]
fn flow(
    flow_id: u64,
    host: &str,
    direction: Direction,
    local: (&str, u16),
    remote: (&str, u16),
    (start_ns, end_ns): (u64, u64),
    outcome: Outcome,
    (bytes_sent, bytes_received): (u64, u64),
) -> FlowRecord {
    let local_addr: IpAddr = local.0.parse().unwrap();
    FlowRecord {
        flow_id,
        host: host.to_owned(),
        start_ns,
        end_ns,
        family: if local_addr.to_canonical().is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        },
        local_addr,
        local_port: local.1,
        remote_addr: remote.0.parse().unwrap(),
        remote_port: remote.1,
        direction,
        outcome,
        bytes_sent,
        bytes_received,
        segs_sent: 2 + bytes_sent / 1000,
        segs_received: 2 + bytes_received / 1000,
        srtt_us: if outcome == Outcome::Failed { 0 } else { 180 },
        min_rtt_us: if outcome == Outcome::Failed { 0 } else { 150 },
        pid: Some(4242),
        comm: Some("app".to_owned()),
        cgroup_id: Some(7),
        ..FlowRecord::default()
    }
}

/// Two windows of a minute: one closed connection web → db in the first; in the second, one
/// whose client reported it twice (an interim record, then the end), one the server reset, one
/// refused (only the client saw it), one over IPv6 to an address nobody owns, one from an
/// IPv4-mapped socket, one to addresses two owners claim, one adopted at the agent's start,
/// and a flow id of 2^63 or more (a negative long in Avro).
fn records(t: u64) -> Vec<FlowRecord> {
    use Direction::{Inbound, Outbound};
    use Outcome::{Closed, Failed, Open, Reset};
    let w = |s: u64| t + s * SECOND;
    let mut interim = flow(
        3,
        "web",
        Outbound,
        (WEB, 40_003),
        (DB, 5432),
        (w(60), w(61)),
        Open,
        (300, 4_000),
    );
    interim.segs_sent = 5;
    let mut end = flow(
        3,
        "web",
        Outbound,
        (WEB, 40_003),
        (DB, 5432),
        (w(60), w(63)),
        Closed,
        (700, 16_000),
    );
    end.seq = 1;
    end.retransmits = 2;
    let mut reset_client = flow(
        5,
        "web",
        Outbound,
        (WEB, 40_005),
        (DB, 5432),
        (w(70), w(71)),
        Reset,
        (10, 0),
    );
    reset_client.resets_received = 1;
    let mut reset_server = flow(
        6,
        "db",
        Inbound,
        (DB, 5432),
        (WEB, 40_005),
        (w(70), w(71)),
        Reset,
        (0, 10),
    );
    reset_server.resets_sent = 1;
    let mut adopted = flow(
        12,
        "db",
        Inbound,
        (DB, 5432),
        ("10.9.0.3", 40_012),
        (w(90), w(95)),
        Closed,
        (64, 128),
    );
    adopted.adopted = true;
    adopted.retransmits = 1;
    vec![
        flow(
            1,
            "web",
            Outbound,
            (WEB, 40_001),
            (DB, 5432),
            (w(0), w(1)),
            Closed,
            (1_000, 20_000),
        ),
        flow(
            u64::MAX - 1,
            "db",
            Inbound,
            (DB, 5432),
            (WEB, 40_001),
            (w(0), w(1)),
            Closed,
            (20_000, 1_000),
        ),
        interim,
        end,
        flow(
            4,
            "db",
            Inbound,
            (DB, 5432),
            (WEB, 40_003),
            (w(60), w(63)),
            Closed,
            (20_000, 1_000),
        ),
        reset_client,
        reset_server,
        flow(
            7,
            "web",
            Outbound,
            (WEB, 40_007),
            (DB, 5433),
            (w(80), w(80)),
            Failed,
            (0, 0),
        ),
        flow(
            8,
            "web",
            Outbound,
            ("2001:db8::1", 40_008),
            ("2001:db8::99", 443),
            (w(85), w(86)),
            Closed,
            (500, 5_000),
        ),
        flow(
            9,
            "web",
            Outbound,
            ("::ffff:10.9.0.1", 40_009),
            ("::ffff:10.9.0.2", 8080),
            (w(87), w(88)),
            Closed,
            (42, 84),
        ),
        flow(
            10,
            "web",
            Outbound,
            (WEB, 40_010),
            ("10.9.1.7", 443),
            (w(89), w(90)),
            Closed,
            (1, 2),
        ),
        adopted,
    ]
}

const INVENTORY: &str = r#"
[[entry]]
cidr = "10.9.0.1"
name = "web-1"
namespace = "shop"
zone = "zone-a"
labels = { app = "web" }
workload = { kind = "Deployment", name = "web" }

[[entry]]
cidr = "2001:db8::1"
name = "web-1"
namespace = "shop"
zone = "zone-a"
workload = { kind = "Deployment", name = "web" }

[[entry]]
cidr = "10.9.0.2"
name = "db-1"
namespace = "shop"
zone = "zone-b"
workload = { kind = "StatefulSet", name = "db" }

[[entry]]
cidr = "10.9.0.3"
name = "batch"
kind = "instance"
instance_id = "i-0batch"

[[entry]]
cidr = "10.9.1.0/24"
name = "lb-a"

[[entry]]
cidr = "10.9.1.0/24"
name = "lb-b"
"#;

#[test]
fn clickhouse_fed_from_flows_enriched_gives_the_rows_of_the_parquet_files() {
    let (raw, enriched, dlq) = (
        Topic::create("ch-raw", 1),
        Topic::create("ch-enriched", 1),
        Topic::create("ch-dlq", 1),
    );
    let dir = temp_dir("clickhouse-kafka");
    let parquet = dir.join("parquet");
    let inventory = dir.join("static.toml");
    std::fs::write(&inventory, INVENTORY).unwrap();
    // An hour ago, on a whole minute: the windows are [t, t + 60 s) and [t + 60 s, t + 120 s).
    let t = (now_ns() - 3600 * SECOND) / (60 * SECOND) * (60 * SECOND);
    let records = records(t);
    let messages: Vec<(Vec<u8>, Vec<u8>)> = records
        .iter()
        .map(|r| {
            let mut payload = Vec::new();
            avro::encode(r, avro::DEFAULT_SCHEMA_ID, &mut payload);
            (avro::key(r), payload)
        })
        .collect();
    raw.produce(&messages);

    let mut enricher = spawn_ready(
        Command::new(ENRICHER)
            .args(["--brokers", &raw.brokers, "--input-topic", &raw.name])
            .args(["--output-topic", &enriched.name, "--dlq-topic", &dlq.name])
            .args(["--group", &unique_name("ch-group")])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--static", &inventory.display().to_string()])
            .args(["--parquet", &parquet.display().to_string()])
            .env("FLOWLOG_LOG", "info"),
        "enricher",
        "enriching",
    );
    let out = enriched.read_until(|m| m.len() >= records.len());
    // Stopping closes the Parquet files.
    assert!(
        enricher.terminate(PATIENCE),
        "the enricher did not exit cleanly"
    );
    assert_eq!(out.len(), records.len(), "one enriched message per record");

    // At-least-once delivery, and a writer of schema version 1 (no `adopted`): one record again,
    // as enriched_flow.v1 under its id. Version 2's datum is version 1's and `adopted` (one
    // byte) after it.
    let again = &out[0];
    let (id, datum) = avro::split_header(again.payload().unwrap()).unwrap();
    assert_eq!(id, enriched_avro::DEFAULT_SCHEMA_ID);
    let first = enriched_avro::decode_datum(datum).unwrap();
    assert!(!first.flow.adopted && datum.last() == Some(&0));
    let mut v1 = vec![avro::MAGIC_BYTE];
    v1.extend_from_slice(&2u32.to_be_bytes());
    v1.extend_from_slice(&datum[..datum.len() - 1]);
    enriched.produce(&[(again.key().unwrap().to_vec(), v1)]);

    let from = (t + 60 * SECOND).to_string();
    let to = (t + 120 * SECOND).to_string();
    let second = [("from_ns", from.as_str()), ("to_ns", to.as_str())];
    let vars = |window: &[(&str, &str)]| {
        let mut v = json!({"skew_ns": "1000000000", "price_per_gb": "0.01"});
        for (name, value) in window {
            v[*name] = json!(value);
        }
        v
    };
    let everything = [("from_ns", "0"), ("to_ns", "9223372036854775807")];
    let mut runs = Vec::new();
    for report in ["connections", "availability", "audit", "capacity"] {
        runs.push(json!({"report": report, "vars": vars(&everything)}));
    }
    for report in ["availability", "audit"] {
        runs.push(json!({"report": report, "vars": vars(&second)}));
    }
    let result = clickhouse_kafka(&json!({
        "brokers": enriched.brokers,
        "topic": enriched.name,
        "group": unique_name("ch-clickhouse"),
        "schemas": {
            "2": format!("{SCHEMAS}/enriched_flow.v1.avsc"),
            "4": format!("{SCHEMAS}/enriched_flow.v2.avsc"),
        },
        "messages": records.len() + 1,
        "parquet": format!("{}/**/*.parquet", parquet.display()),
        "runs": runs,
    }));
    assert_eq!(
        result["rows"],
        records.len() + 1,
        "every message is a row of flowlog.enriched, the duplicate too; the Kafka engine's \
         errors: {}",
        result["consumer_errors"]
    );
    assert_eq!(result["consumer_errors"], json!([]));
    assert_eq!(
        result["adopted_rows"], 1,
        "the adopted flow's record; the version 1 one reads adopted false"
    );
    // Every record once (the duplicate dropped), every column as in the Parquet files (whose
    // reader adds the hive partitions' dt and hour).
    let mut from_parquet = result["records"]["parquet"].as_array().unwrap().clone();
    for row in &mut from_parquet {
        let row = row.as_object_mut().unwrap();
        assert!(row.remove("dt").is_some() && row.remove("hour").is_some());
    }
    assert_eq!(from_parquet.len(), records.len());
    assert_eq!(
        result["records"]["kafka"],
        Value::Array(from_parquet),
        "flowlog.records: Kafka and Parquet differ"
    );
    for (run, got) in runs.iter().zip(result["runs"].as_array().unwrap()) {
        let rows = got["parquet"].as_array().unwrap();
        assert!(!rows.is_empty(), "{run}: no rows");
        assert_eq!(
            got["kafka"], got["parquet"],
            "{run}: Kafka and Parquet differ"
        );
    }

    // The rows are the traffic's: a connection per pair of ends, named by the inventory.
    let connections = result["runs"][0]["kafka"].as_array().unwrap();
    let summary: Vec<(String, String, String, String)> = connections
        .iter()
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap_or("null").to_owned();
            (
                text("client"),
                text("server"),
                text("outcome"),
                text("seen_from"),
            )
        })
        .collect();
    let expected = [
        ("shop/web", "shop/db", "closed", "both"),
        ("shop/web", "shop/db", "closed", "both"),
        ("shop/web", "shop/db", "reset", "both"),
        ("shop/web", "shop/db", "failed", "client"),
        ("shop/web", "2001:db8::99", "closed", "client"),
        ("shop/web", "shop/db", "closed", "client"),
        ("shop/web", "one of lb-a, lb-b", "closed", "client"),
        ("batch", "shop/db", "closed", "server"),
    ];
    let expected: Vec<(String, String, String, String)> = expected
        .iter()
        .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
        .collect();
    assert_eq!(summary, expected, "{connections:#?}");
    let first = &connections[0];
    assert_eq!(
        (
            &first["bytes_up"],
            &first["bytes_down"],
            &first["bytes_agree"]
        ),
        (&json!(1_000), &json!(20_000), &json!(1)),
        "{first}"
    );
    let interim = &connections[1];
    assert_eq!(
        (&interim["bytes_up"], &interim["bytes_down"]),
        (&json!(1_000), &json!(20_000)),
        "the interim record and the end add up: {interim}"
    );
    // Addresses in their text: IPv6, and an IPv4-mapped one as such (its owner is the IPv4
    // address's).
    assert_eq!(connections[4]["server_addr"], "2001:db8::99");
    assert_eq!(
        (
            &connections[5]["client_addr"],
            &connections[5]["server_addr"]
        ),
        (&json!("::ffff:10.9.0.1"), &json!("::ffff:10.9.0.2"))
    );
    assert_eq!(connections[7]["adopted"], json!(true));
    let windowed: &Value = &result["runs"][4]["kafka"];
    let pair = windowed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["server"] == "shop/db" && r["server_port"] == 5432 && r["client"] == "shop/web")
        .unwrap_or_else(|| panic!("web → db in the second window: {windowed:#}"));
    assert_eq!(
        (
            &pair["connections"],
            &pair["resets"],
            &pair["prev_connections"]
        ),
        (&json!(2), &json!(1), &json!(1)),
        "{pair}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
