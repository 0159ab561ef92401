//! The Parquet output end to end: fabricated enriched flows → `ParquetSink` → files in a local
//! directory or a bucket of a real S3-compatible server (moto, started by `scripts/moto start`;
//! endpoint from `FLOWLOG_TEST_S3`) → read back by pyarrow (`flowlog-testkit/parquet_reader.py`, a reader
//! we did not write) and compared value by value with what was written.
//!
//! Expected values are written out here from the fixtures (strings, partition paths), not
//! computed with the code under test. Each test uses its own directory or bucket and removes it.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use flowlog_enricher::{
    metrics::{PARQUET_FILES, PARQUET_ROWS, PARQUET_UPLOAD_ERRORS},
    storage::{ParquetSettings, ParquetSink, S3Options},
};
use flowlog_record::{
    enriched::{Endpoint, EnrichedFlow, Identity, IdentityKind, Workload},
    record::{Direction, Family, FlowRecord, Outcome},
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde_json::{Value, json};

use flowlog_testkit::{LogCapture, PARQUET_READER as READER, pyarrow as python};

/// 2026-11-25T23:00:00Z in ns; the fixtures' flows end in three hours from here, across
/// midnight: 2026-11-25 hour 23, 2026-11-26 hours 00 and 01.
const T0: u64 = 1_795_647_600_000_000_000;
const HOUR: u64 = 3_600_000_000_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn unique(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("flowlog-test-{test}-{}-{nanos}", std::process::id())
}

/// A directory of its own for one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(test));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The moto endpoint. Unset is a failure with directions, not a skip.
fn s3_endpoint() -> String {
    std::env::var("FLOWLOG_TEST_S3").unwrap_or_else(|_| {
        panic!(
            "FLOWLOG_TEST_S3 is not set: run `scripts/moto start` and export \
             FLOWLOG_TEST_S3=http://127.0.0.1:5000 (scripts/test does both)"
        )
    })
}

/// A bucket of its own on moto for one test, deleted (with its objects) on drop.
struct Bucket {
    endpoint: String,
    name: String,
}

impl Bucket {
    fn create(test: &str) -> Self {
        let endpoint = s3_endpoint();
        let name = unique(test);
        python(&["mkbucket", &endpoint, &name]);
        Self { endpoint, name }
    }
}

impl Drop for Bucket {
    fn drop(&mut self) {
        let _ = Command::new("python3")
            .args([READER, "rmbucket", &self.endpoint, &self.name])
            .status();
    }
}

fn s3_options(endpoint: &str) -> S3Options {
    S3Options {
        endpoint: Some(endpoint.to_string()),
        region: Some("us-east-1".into()),
        allow_http: true,
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        session_token: None,
        virtual_hosted_style: false,
    }
}

/// What pyarrow saw under a root.
struct ReadBack {
    objects: Vec<String>,
    files: Vec<Value>,
    partitions: BTreeMap<String, u64>,
}

fn read_back(root: &str, endpoint: Option<&str>) -> ReadBack {
    read_columns(root, endpoint, None)
}

/// [`read_back`] with only some columns' values (large outputs).
fn read_columns(root: &str, endpoint: Option<&str>, columns: Option<&str>) -> ReadBack {
    let mut args = vec!["read", root, endpoint.unwrap_or("-")];
    args.extend(columns);
    let v: Value = serde_json::from_str(&python(&args)).expect("reader output is JSON");
    ReadBack {
        objects: v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap().to_string())
            .collect(),
        files: v["files"].as_array().unwrap().clone(),
        partitions: v["partitions"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
            .collect(),
    }
}

impl ReadBack {
    /// Rows of every file whose path starts with `dir`, in file order.
    fn rows_under(&self, dir: &str) -> Vec<Value> {
        self.files
            .iter()
            .filter(|f| f["path"].as_str().unwrap().starts_with(dir))
            .flat_map(|f| f["rows"].as_array().unwrap().clone())
            .collect()
    }

    fn all_rows(&self) -> Vec<Value> {
        self.rows_under("")
    }
}

fn pod() -> Arc<Identity> {
    Arc::new(Identity {
        kind: IdentityKind::Pod,
        name: "api-7d9f8-x2k4q".into(),
        namespace: Some("shop".into()),
        workload: Some(Workload {
            kind: "Deployment".into(),
            name: "api".into(),
        }),
        labels: BTreeMap::from([
            ("app".to_string(), "api".to_string()),
            ("team".to_string(), "payments".to_string()),
        ]),
        node: Some("node-a".into()),
        zone: Some("eu-west-1a".into()),
        region: Some("eu-west-1".into()),
        account: Some("123456789012".into()),
        vpc: Some("vpc-0a1b".into()),
        subnet: Some("subnet-0c2d".into()),
        instance_id: Some("i-0123456789abcdef0".into()),
        container_id: Some("containerd://4f2a".into()),
        pod_uid: Some("6f1c2d3e-0000-4000-8000-000000000001".into()),
        source: "kubernetes".into(),
    })
}

fn static_entry() -> Arc<Identity> {
    Arc::new(Identity {
        kind: IdentityKind::Static,
        name: "corp-dns".into(),
        source: "static".into(),
        ..Identity::default()
    })
}

fn ambiguous() -> Endpoint {
    Endpoint::ambiguous(&[
        Arc::new(Identity {
            name: "web-2".into(),
            namespace: Some("shop".into()),
            ..Identity::default()
        }),
        Arc::new(Identity {
            name: "web-1".into(),
            namespace: Some("shop".into()),
            ..Identity::default()
        }),
    ])
}

/// Flow `i`: ends in hour `i % 3` after [`T0`] (so partitions interleave in write order);
/// IPv4 on even `i`, IPv6 on odd; no process on every third; ends exact, ambiguous, unknown
/// in turn (local and remote out of step); extreme values on flow 0.
fn flow(i: u64) -> EnrichedFlow {
    let v6 = i % 2 == 1;
    let (local_addr, remote_addr): (IpAddr, IpAddr) = if v6 {
        (
            format!("2001:db8::{:x}", i + 1).parse().unwrap(),
            format!("2001:db8:0:1::{:x}", 0xa00 + i).parse().unwrap(),
        )
    } else {
        (
            format!("10.0.0.{}", i % 250 + 1).parse().unwrap(),
            format!("198.51.100.{}", i % 250 + 1).parse().unwrap(),
        )
    };
    let end_ns = T0 + (i % 3) * HOUR + i * 1_000;
    let end = |k: u64| match k % 3 {
        0 => Endpoint::exact(pod()),
        1 => ambiguous(),
        _ => Endpoint::unknown(),
    };
    let remote = match i % 3 {
        0 => Endpoint::unknown(),
        1 => Endpoint::exact(static_entry()),
        _ => ambiguous(),
    };
    EnrichedFlow {
        flow: FlowRecord {
            flow_id: u64::MAX - i,
            host: format!("host-{}", i % 2),
            seq: i as u32,
            start_ns: end_ns - 5_000_000,
            end_ns,
            family: if v6 { Family::Ipv6 } else { Family::Ipv4 },
            local_addr,
            local_port: 40_000 + (i % 20_000) as u16,
            remote_addr,
            remote_port: if i == 0 { u16::MAX } else { 443 },
            direction: if i.is_multiple_of(2) {
                Direction::Outbound
            } else {
                Direction::Inbound
            },
            outcome: Outcome::ALL[(i % 4) as usize],
            bytes_sent: if i == 0 { u64::MAX } else { i * 1_000 },
            bytes_received: i * 2_000,
            segs_sent: i + 3,
            segs_received: i + 4,
            retransmits: i % 5,
            resets_sent: i % 2,
            resets_received: (i + 1) % 2,
            srtt_us: if i == 0 { u32::MAX } else { 100 + i as u32 },
            min_rtt_us: 50 + i as u32,
            pid: (!i.is_multiple_of(3)).then_some(1_000 + i as u32),
            comm: (!i.is_multiple_of(3)).then(|| format!("proc{i}")),
            cgroup_id: (!i.is_multiple_of(4)).then_some(7_000 + i),
            adopted: i.is_multiple_of(5),
        },
        local: end(i),
        remote,
        enriched_ns: end_ns + 2_000_000,
    }
}

/// The row pyarrow should return for a flow, written out independently of the sink.
fn expected_row(e: &EnrichedFlow) -> Value {
    let f = &e.flow;
    let end = |end: &Endpoint| {
        let status = match end.status {
            flowlog_record::enriched::Attribution::Exact => "exact",
            flowlog_record::enriched::Attribution::Ambiguous => "ambiguous",
            flowlog_record::enriched::Attribution::Unknown => "unknown",
        };
        match end.identity.as_deref() {
            Some(id) if id.name == "api-7d9f8-x2k4q" => json!({
                "status": status, "kind": "pod", "name": "api-7d9f8-x2k4q", "namespace": "shop",
                "workload_kind": "Deployment", "workload_name": "api",
                "labels": [["app", "api"], ["team", "payments"]],
                "node": "node-a", "zone": "eu-west-1a", "region": "eu-west-1",
                "account": "123456789012", "vpc": "vpc-0a1b", "subnet": "subnet-0c2d",
                "instance_id": "i-0123456789abcdef0", "container_id": "containerd://4f2a",
                "pod_uid": "6f1c2d3e-0000-4000-8000-000000000001", "source": "kubernetes",
                "candidates": [],
            }),
            Some(id) if id.name == "corp-dns" => json!({
                "status": status, "kind": "static", "name": "corp-dns", "namespace": null,
                "workload_kind": null, "workload_name": null, "labels": [],
                "node": null, "zone": null, "region": null, "account": null, "vpc": null,
                "subnet": null, "instance_id": null, "container_id": null, "pod_uid": null,
                "source": "static", "candidates": [],
            }),
            Some(other) => panic!("fixture identity {other:?} has no expected row"),
            None => json!({
                "status": status, "kind": null, "name": null, "namespace": null,
                "workload_kind": null, "workload_name": null, "labels": null,
                "node": null, "zone": null, "region": null, "account": null, "vpc": null,
                "subnet": null, "instance_id": null, "container_id": null, "pod_uid": null,
                "source": null,
                "candidates": if status == "ambiguous" { json!(["shop/web-1", "shop/web-2"]) } else { json!([]) },
            }),
        }
    };
    json!({
        "flow_id": f.flow_id,
        "host": f.host,
        "seq": f.seq,
        "start_ns": f.start_ns,
        "end_ns": f.end_ns,
        "family": match f.family { Family::Ipv4 => "ipv4", Family::Ipv6 => "ipv6" },
        "local_addr": f.local_addr.to_string(),
        "local_port": f.local_port,
        "remote_addr": f.remote_addr.to_string(),
        "remote_port": f.remote_port,
        "direction": match f.direction { Direction::Outbound => "outbound", Direction::Inbound => "inbound" },
        "outcome": match f.outcome {
            Outcome::Closed => "closed", Outcome::Reset => "reset",
            Outcome::Failed => "failed", Outcome::Open => "open",
        },
        "bytes_sent": f.bytes_sent,
        "bytes_received": f.bytes_received,
        "segs_sent": f.segs_sent,
        "segs_received": f.segs_received,
        "retransmits": f.retransmits,
        "resets_sent": f.resets_sent,
        "resets_received": f.resets_received,
        "srtt_us": f.srtt_us,
        "min_rtt_us": f.min_rtt_us,
        "pid": f.pid,
        "comm": f.comm,
        "cgroup_id": f.cgroup_id,
        "local": end(&e.local),
        "remote": end(&e.remote),
        "enriched_ns": e.enriched_ns,
        "adopted": f.adopted,
    })
}

/// Compares rows (in any order) with the flows they came from, field by field.
fn assert_rows(actual: &[Value], flows: &[EnrichedFlow]) {
    assert_eq!(actual.len(), flows.len(), "row count");
    let by_id: HashMap<u64, &Value> = actual
        .iter()
        .map(|r| (r["flow_id"].as_u64().unwrap(), r))
        .collect();
    assert_eq!(by_id.len(), actual.len(), "a flow_id appears twice");
    for f in flows {
        let expected = expected_row(f);
        let row = by_id
            .get(&f.flow.flow_id)
            .unwrap_or_else(|| panic!("flow {} missing", f.flow.flow_id));
        let (exp, act) = (expected.as_object().unwrap(), row.as_object().unwrap());
        assert_eq!(
            act.keys().collect::<Vec<_>>(),
            exp.keys().collect::<Vec<_>>(),
            "columns"
        );
        for (k, v) in exp {
            assert_eq!(&act[k], v, "flow {} column {k}", f.flow.flow_id);
        }
    }
}

/// The columns as pyarrow types them, written out from the schema's specification.
fn expected_columns() -> Value {
    let end = "struct<status: string not null, kind: string, name: string, namespace: string, \
workload_kind: string, workload_name: string, labels: map<key: string not null, value: string not null>, node: string, \
zone: string, region: string, account: string, vpc: string, subnet: string, instance_id: string, \
container_id: string, pod_uid: string, source: string, candidates: list<item: string not null> not null>";
    json!([
        ["flow_id", "uint64", false],
        ["host", "string", false],
        ["seq", "uint32", false],
        ["start_ns", "uint64", false],
        ["end_ns", "uint64", false],
        ["family", "string", false],
        ["local_addr", "string", false],
        ["local_port", "uint16", false],
        ["remote_addr", "string", false],
        ["remote_port", "uint16", false],
        ["direction", "string", false],
        ["outcome", "string", false],
        ["bytes_sent", "uint64", false],
        ["bytes_received", "uint64", false],
        ["segs_sent", "uint64", false],
        ["segs_received", "uint64", false],
        ["retransmits", "uint64", false],
        ["resets_sent", "uint64", false],
        ["resets_received", "uint64", false],
        ["srtt_us", "uint32", false],
        ["min_rtt_us", "uint32", false],
        ["pid", "uint32", true],
        ["comm", "string", true],
        ["cgroup_id", "uint64", true],
        ["local", end, false],
        ["remote", end, false],
        ["enriched_ns", "uint64", false],
        ["adopted", "bool", false],
    ])
}

/// File name pattern: `<run_id>-<6-digit sequence>.parquet`.
fn assert_file_name(path: &str, run_id: &str) {
    let name = path.rsplit('/').next().unwrap();
    let seq = name
        .strip_prefix(&format!("{run_id}-"))
        .and_then(|s| s.strip_suffix(".parquet"))
        .unwrap_or_else(|| panic!("{path} is not named {run_id}-<seq>.parquet"));
    assert!(
        seq.len() == 6 && seq.bytes().all(|b| b.is_ascii_digit()),
        "{path}: sequence {seq}"
    );
}

const PARTITIONS: [&str; 3] = [
    "dt=2026-11-25/hour=23",
    "dt=2026-11-26/hour=00",
    "dt=2026-11-26/hour=01",
];

/// Writes 40 flows over three hours and two days, rolls once, and checks everything pyarrow
/// reads back: objects, partitions, row counts, schema, metadata, every value.
fn round_trip(settings: ParquetSettings, root: &str, endpoint: Option<&str>) {
    let rt = runtime();
    let flows: Vec<EnrichedFlow> = (0..40).map(flow).collect();
    let run_id = rt.block_on(async {
        let mut sink = ParquetSink::open(settings).await.expect("opening the sink");
        for f in &flows {
            sink.write(f).unwrap();
        }
        assert_eq!((sink.written(), sink.durable()), (40, 0));
        assert_eq!(sink.open_files(), 3);
        sink.roll().await.unwrap();
        assert_eq!((sink.written(), sink.durable()), (40, 40));
        assert_eq!(sink.open_files(), 0);
        // Nothing open: a second roll writes no (empty) file.
        sink.roll().await.unwrap();
        sink.run_id().to_string()
    });
    let back = read_back(root, endpoint);
    // Only the three files: no staging file, no write-check object left behind.
    assert_eq!(back.objects.len(), 3, "{:?}", back.objects);
    for (object, dir) in back.objects.iter().zip(PARTITIONS) {
        assert!(
            object.starts_with(&format!("{dir}/")),
            "{object} under {dir}"
        );
        assert_file_name(object, &run_id);
    }
    // Flow i is in hour i % 3: 14, 13 and 13 rows.
    let expected_counts = BTreeMap::from([
        ("dt=2026-11-25/hour=23".to_string(), 14),
        ("dt=2026-11-26/hour=0".to_string(), 13),
        ("dt=2026-11-26/hour=1".to_string(), 13),
    ]);
    assert_eq!(
        back.partitions, expected_counts,
        "hive partitions (pyarrow.dataset)"
    );
    for (h, dir) in PARTITIONS.iter().enumerate() {
        let in_hour: Vec<EnrichedFlow> = flows
            .iter()
            .filter(|f| {
                f.flow.end_ns >= T0 + h as u64 * HOUR && f.flow.end_ns < T0 + (h as u64 + 1) * HOUR
            })
            .cloned()
            .collect();
        assert_rows(&back.rows_under(dir), &in_hour);
    }
    for file in &back.files {
        assert_eq!(file["codecs"], json!(["ZSTD"]), "{}", file["path"]);
        assert_eq!(file["num_row_groups"], 1);
        assert_eq!(
            file["key_value"],
            json!({"flowlog.schema": "enriched_flow.v1"})
        );
        assert_eq!(file["columns"], expected_columns());
    }
}

/// (a) A local directory: exact partitions, counts, values.
#[test]
fn local_directory_round_trip() {
    let dir = TempDir::new("local");
    let root = dir.0.join("out");
    round_trip(
        ParquetSettings::new(root.to_str().unwrap()),
        root.to_str().unwrap(),
        None,
    );
    // The same through a file:// URL and into an existing directory.
    let url_dir = TempDir::new("local-url");
    round_trip(
        ParquetSettings::new(format!("file://{}", url_dir.0.display())),
        url_dir.0.to_str().unwrap(),
        None,
    );
}

/// (c) An S3 bucket on moto, under a key prefix.
#[test]
fn s3_round_trip() {
    let bucket = Bucket::create("s3");
    let url = format!("s3://{}/flows/enriched", bucket.name);
    let settings = ParquetSettings {
        s3: s3_options(&bucket.endpoint),
        ..ParquetSettings::new(&url)
    };
    round_trip(settings, &url, Some(&bucket.endpoint));
}

/// Flow ids of rows, sorted.
fn ids(rows: &[Value]) -> Vec<u64> {
    let mut v: Vec<u64> = rows
        .iter()
        .map(|r| r["flow_id"].as_u64().unwrap())
        .collect();
    v.sort_unstable();
    v
}

/// (b) Rolling by size: every open file is rolled together when one reaches `roll_bytes`
/// (encoded); `durable()` jumps to `written()` exactly at rolls; no row lost or duplicated.
#[test]
fn rolls_by_size_all_files_together() {
    const ROLL_BYTES: u64 = 64 << 10;
    const ROWS: u64 = 40_000;
    let dir = TempDir::new("roll-size");
    let root = dir.0.to_str().unwrap().to_string();
    let settings = ParquetSettings {
        roll_bytes: ROLL_BYTES,
        roll_interval: Duration::from_secs(3600),
        ..ParquetSettings::new(&root)
    };
    let rt = runtime();
    // Rows per generation, as seen through durable().
    let mut generations = Vec::new();
    rt.block_on(async {
        let mut sink = ParquetSink::open(settings).await.unwrap();
        let now = Instant::now();
        let mut last_durable = 0;
        for i in 0..ROWS {
            // Flow i goes to hour i % 3: three files open at once, all filling.
            sink.write(&flow(i)).unwrap();
            sink.maybe_roll(now).await.unwrap();
            let durable = sink.durable();
            if durable != last_durable {
                assert_eq!(durable, sink.written(), "a roll makes everything durable");
                assert_eq!(sink.open_files(), 0, "a roll closes every file");
                generations.push(durable - last_durable);
                last_durable = durable;
            } else {
                assert!(
                    sink.largest_open_bytes() < ROLL_BYTES,
                    "not rolled at {} bytes",
                    sink.largest_open_bytes()
                );
            }
        }
        sink.roll().await.unwrap();
        generations.push(sink.durable() - last_durable);
        assert_eq!(sink.durable(), ROWS);
    });
    assert!(
        generations.len() >= 3,
        "{ROWS} rows rolled at {ROLL_BYTES} bytes make several generations: {generations:?}"
    );
    let back = read_columns(&root, None, Some("flow_id"));
    // One file per partition per generation, each generation's rows split over its three files.
    assert_eq!(back.files.len(), 3 * generations.len());
    let mut by_seq: Vec<&Value> = back.files.iter().collect();
    by_seq.sort_by_key(|f| {
        f["path"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string()
    });
    for (g, chunk) in by_seq.chunks(3).enumerate() {
        let rows: u64 = chunk.iter().map(|f| f["num_rows"].as_u64().unwrap()).sum();
        assert_eq!(rows, generations[g], "generation {g}");
    }
    // The largest file of each full generation is about `roll_bytes` (encoded): at least half
    // of it, at most twice.
    for chunk in by_seq.chunks(3).take(generations.len() - 1) {
        let largest = chunk
            .iter()
            .map(|f| f["size"].as_u64().unwrap())
            .max()
            .unwrap();
        assert!(
            (ROLL_BYTES / 2..=ROLL_BYTES * 2).contains(&largest),
            "largest file of a generation: {largest} bytes"
        );
    }
    let expected: Vec<u64> = {
        let mut v: Vec<u64> = (0..ROWS).map(|i| u64::MAX - i).collect();
        v.sort_unstable();
        v
    };
    assert_eq!(ids(&back.all_rows()), expected, "every row exactly once");
}

/// (b) Rolling by time: `roll_interval` after the generation's first row, not before; the
/// next generation's clock starts at its own first row.
#[test]
fn rolls_by_time() {
    let dir = TempDir::new("roll-time");
    let root = dir.0.to_str().unwrap().to_string();
    let interval = Duration::from_secs(60);
    let settings = ParquetSettings {
        roll_interval: interval,
        ..ParquetSettings::new(&root)
    };
    let rt = runtime();
    rt.block_on(async {
        let mut sink = ParquetSink::open(settings).await.unwrap();
        // Nothing written: never due.
        sink.maybe_roll(Instant::now() + 10 * interval)
            .await
            .unwrap();
        assert_eq!(sink.open_files(), 0);
        let before = Instant::now();
        for i in 0..10 {
            sink.write(&flow(i)).unwrap();
        }
        let after = Instant::now();
        // The generation started between `before` and `after`.
        sink.maybe_roll(before + interval - Duration::from_nanos(1))
            .await
            .unwrap();
        assert_eq!((sink.written(), sink.durable()), (10, 0));
        sink.maybe_roll(after + interval).await.unwrap();
        assert_eq!((sink.written(), sink.durable()), (10, 10));
        assert_eq!(sink.open_files(), 0);
        // A new generation starts at its first row, after `after`.
        let before2 = Instant::now();
        for i in 10..16 {
            sink.write(&flow(i)).unwrap();
        }
        sink.maybe_roll(before2 + interval - Duration::from_nanos(1))
            .await
            .unwrap();
        assert_eq!((sink.written(), sink.durable()), (16, 10));
        sink.roll().await.unwrap();
        assert_eq!((sink.written(), sink.durable()), (16, 16));
    });
    let back = read_back(&root, None);
    let counts: Vec<(String, u64)> = back
        .files
        .iter()
        .map(|f| {
            let path = f["path"].as_str().unwrap();
            (
                path[..path.rfind('/').unwrap()].to_string(),
                f["num_rows"].as_u64().unwrap(),
            )
        })
        .collect();
    // Sorted by path: per partition, the first generation's file (lower sequence) first.
    // Flows 0..10 → 4, 3, 3 per hour; flows 10..16 → 2, 2, 2.
    let mut sorted = counts.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![
            (PARTITIONS[0].to_string(), 2),
            (PARTITIONS[0].to_string(), 4),
            (PARTITIONS[1].to_string(), 2),
            (PARTITIONS[1].to_string(), 3),
            (PARTITIONS[2].to_string(), 2),
            (PARTITIONS[2].to_string(), 3),
        ]
    );
    let flows: Vec<EnrichedFlow> = (0..16).map(flow).collect();
    assert_rows(&back.all_rows(), &flows);
}

/// Counter totals across snapshots (a debugging snapshot resets counters).
#[derive(Default)]
struct Counters(HashMap<String, u64>);

impl Counters {
    fn add(&mut self, snapshotter: &Snapshotter) {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            if let DebugValue::Counter(n) = value {
                *self.0.entry(key.key().name().to_string()).or_default() += n;
            }
        }
    }

    fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }
}

/// A failing upload is retried until it succeeds, counted, logged once, and `durable()`
/// advances only then: the directory is replaced by a file, the roll keeps retrying (and is
/// cancelled, which loses nothing), the directory comes back, and the next `maybe_roll`
/// finishes the upload.
#[test]
fn failed_uploads_are_retried_until_durable() {
    let dir = TempDir::new("retry");
    let root = dir.0.join("out");
    let away = dir.0.join("away");
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let mut counters = Counters::default();
    let logs = LogCapture::default();
    let subscriber = logs.subscriber();
    let rt = runtime();
    let _log = tracing::subscriber::set_default(subscriber);
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let mut sink = ParquetSink::open(ParquetSettings::new(root.to_str().unwrap()))
                .await
                .unwrap();
            for i in 0..6 {
                sink.write(&flow(i)).unwrap();
            }
            std::fs::rename(&root, &away).unwrap();
            std::fs::write(&root, b"not a directory").unwrap();
            let failures_seen = async {
                let deadline = Instant::now() + Duration::from_secs(60);
                while counters.get(PARQUET_UPLOAD_ERRORS) < 2 {
                    assert!(Instant::now() < deadline, "no upload failure seen");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    counters.add(&snapshotter);
                }
            };
            tokio::select! {
                r = sink.roll() => panic!("roll returned {r:?} while the target is broken"),
                () = failures_seen => {}
            }
            // Nothing durable or counted as written while every attempt fails.
            assert_eq!((sink.written(), sink.durable()), (6, 0));
            assert_eq!(counters.get(PARQUET_FILES), 0);
            assert_eq!(counters.get(PARQUET_ROWS), 0);
            std::fs::remove_file(&root).unwrap();
            std::fs::rename(&away, &root).unwrap();
            // Not due by size or time: it only finishes what the cancelled roll left.
            sink.maybe_roll(Instant::now()).await.unwrap();
            assert_eq!((sink.written(), sink.durable()), (6, 6));
        })
    });
    counters.add(&snapshotter);
    assert!(counters.get(PARQUET_UPLOAD_ERRORS) >= 2);
    // However many attempts failed, across the cancelled roll and the resumed one: one warning,
    // and one line when it recovered.
    assert_eq!(logs.lines_containing("parquet upload failed"), 1);
    assert_eq!(
        logs.lines_containing("parquet upload succeeded after failed attempts"),
        1
    );
    assert_eq!(counters.get(PARQUET_FILES), 3);
    assert_eq!(counters.get(PARQUET_ROWS), 6);
    let back = read_back(root.to_str().unwrap(), None);
    assert_eq!(back.objects.len(), 3, "{:?}", back.objects);
    let flows: Vec<EnrichedFlow> = (0..6).map(flow).collect();
    assert_rows(&back.all_rows(), &flows);
}

fn open_error(settings: ParquetSettings) -> String {
    let err = runtime()
        .block_on(ParquetSink::open(settings))
        .expect_err("opening an unwritable target must fail");
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(" | ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// (d) Unwritable targets fail at open, naming the URL.
#[test]
fn unwritable_local_target_is_a_clear_error() {
    let dir = TempDir::new("unwritable");
    let file = dir.0.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let url = file.join("flows");
    let text = open_error(ParquetSettings::new(url.to_str().unwrap()));
    assert_eq!(
        text,
        format!(
            "parquet output `{0}`: cannot create directory {0} | Not a directory (os error 20)",
            url.display()
        )
    );
    let text = open_error(ParquetSettings::new("gs://bucket/flows"));
    assert_eq!(
        text,
        "parquet output `gs://bucket/flows`: unsupported scheme (use s3://bucket/prefix, \
         file:///dir or a directory path)"
    );
}

/// (d) A bucket that does not exist fails at open, naming the URL and the S3 error.
#[test]
fn missing_bucket_is_a_clear_error() {
    let endpoint = s3_endpoint();
    let url = format!("s3://{}/flows", unique("missing"));
    let settings = ParquetSettings {
        s3: s3_options(&endpoint),
        ..ParquetSettings::new(&url)
    };
    let text = open_error(settings);
    let head =
        format!("parquet output `{url}` is not writable (a test object could not be written) | ");
    assert!(text.starts_with(&head), "{text}");
    assert!(text.contains("NoSuchBucket"), "{text}");
}

/// (d) An S3 endpoint where nothing listens fails at open within seconds, naming the URL.
#[test]
fn unreachable_s3_endpoint_is_a_clear_error() {
    // A port that was free a moment ago: connections to it are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = "s3://flowlog-test-unreachable/flows";
    let settings = ParquetSettings {
        s3: s3_options(&format!("http://127.0.0.1:{port}")),
        ..ParquetSettings::new(url)
    };
    let text = open_error(settings);
    let head =
        format!("parquet output `{url}` is not writable (a test object could not be written) | ");
    assert!(text.starts_with(&head), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
}

/// Two sinks on one directory (two enrichers) never pick the same file name.
#[test]
fn file_names_are_unique_across_sinks() {
    let dir = TempDir::new("two-sinks");
    let root = dir.0.to_str().unwrap().to_string();
    let rt = runtime();
    let run_ids = rt.block_on(async {
        // Two enrichers writing the same partition of the same directory at the same time.
        let mut a = ParquetSink::open(ParquetSettings::new(&root))
            .await
            .unwrap();
        let mut b = ParquetSink::open(ParquetSettings::new(&root))
            .await
            .unwrap();
        for i in 0..6 {
            a.write(&flow(i * 3)).unwrap();
            b.write(&flow(99 + i * 3)).unwrap();
        }
        a.roll().await.unwrap();
        b.roll().await.unwrap();
        for i in 6..9 {
            a.write(&flow(i * 3)).unwrap();
        }
        a.roll().await.unwrap();
        [a.run_id().to_string(), b.run_id().to_string()]
    });
    assert_ne!(run_ids[0], run_ids[1]);
    let back = read_back(&root, None);
    let mut names: Vec<&str> = back.objects.iter().map(String::as_str).collect();
    names.sort_unstable();
    let expected = {
        let mut v = vec![
            format!("{}/{}-000000.parquet", PARTITIONS[0], run_ids[0]),
            format!("{}/{}-000001.parquet", PARTITIONS[0], run_ids[0]),
            format!("{}/{}-000000.parquet", PARTITIONS[0], run_ids[1]),
        ];
        v.sort();
        v
    };
    assert_eq!(names, expected);
    let flows: Vec<EnrichedFlow> = (0..9)
        .map(|i| flow(i * 3))
        .chain((0..6).map(|i| flow(99 + i * 3)))
        .collect();
    assert_rows(&back.all_rows(), &flows);
}

/// The sink and its futures are `Send`: a pipeline task on a multi-threaded runtime owns it.
#[test]
fn runs_in_a_spawned_task_on_a_multi_threaded_runtime() {
    let dir = TempDir::new("spawned");
    let root = dir.0.to_str().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let task = rt.spawn(async move {
        let mut sink = ParquetSink::open(ParquetSettings::new(&root))
            .await
            .unwrap();
        for i in 0..5 {
            sink.write(&flow(i)).unwrap();
        }
        sink.maybe_roll(Instant::now()).await.unwrap();
        sink.roll().await.unwrap();
        sink.durable()
    });
    let durable = rt.block_on(task).unwrap();
    assert_eq!(durable, 5);
    let back = read_back(dir.0.to_str().unwrap(), None);
    let flows: Vec<EnrichedFlow> = (0..5).map(flow).collect();
    assert_rows(&back.all_rows(), &flows);
}
