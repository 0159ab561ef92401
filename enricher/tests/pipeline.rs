//! The enricher binary against the real Kafka-protocol broker (tansu; `FLOWLOG_TEST_KAFKA`,
//! started by `scripts/kafka start`): dead letters, attribution over ownership intervals from a
//! static inventory file, and a consumer group of two enrichers, one killed with SIGKILL
//! mid-stream, losing nothing in Kafka or Parquet (read back with pyarrow, a reader nobody here
//! wrote); and every Kafka client of the enricher and `flowlog-inventory` over TLS and
//! SASL/SCRAM (`--kafka-config`) against a private broker behind TLS, and what a wrong CA, host
//! name or password does at their start.
//!
//! Each test makes its own topics (unique names) and deletes them.
use std::{
    collections::{BTreeSet, HashSet},
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, SystemTime},
};

use flowlog_record::{
    Attribution, EnrichedFlow, FlowRecord, IdentityKind, Outcome, avro, enriched_avro,
};
use flowlog_testkit::{
    ChildGuard, PATIENCE, Topic,
    broker::{PortBlock, PrivateBroker},
    cargo_bin, free_port, http_get, now_ns, pyarrow, spawn_ready, temp_dir,
    tls::{TlsBroker, with_option},
    unique_name, wait_for_http,
};
use rdkafka::{
    Message,
    message::{Headers, OwnedMessage},
};

const ENRICHER: &str = env!("CARGO_BIN_EXE_flowlog-enricher");

/// The tests run one at a time: tansu 0.6 (the test broker) loses a topic's partitions from its
/// metadata — and its consumer groups then assign nothing — when other topics are created and
/// deleted while a group rebalances. Real Kafka does not; the tests are about the enricher.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
/// The enriched schema id the tests give the enricher.
const OUT_ID: u32 = 7;

/// A flow record from `local_addr` to `remote`, started at `start_ns`.
fn record(flow_id: u64, remote: &str, start_ns: u64) -> FlowRecord {
    let remote_addr: IpAddr = remote.parse().unwrap();
    FlowRecord {
        flow_id,
        host: "host-a".to_owned(),
        start_ns,
        end_ns: start_ns + 1_000_000,
        local_addr: "192.0.2.10".parse().unwrap(),
        local_port: 40_000 + (flow_id % 20_000) as u16,
        remote_addr,
        remote_port: 443,
        bytes_sent: flow_id * 3,
        bytes_received: flow_id * 7,
        segs_sent: 4,
        segs_received: 5,
        srtt_us: 250,
        min_rtt_us: 200,
        pid: Some(4242),
        comm: Some("curl".to_owned()),
        cgroup_id: Some(1),
        ..FlowRecord::default()
    }
}

fn encoded(r: &FlowRecord) -> Vec<u8> {
    let mut out = Vec::new();
    avro::encode(r, avro::DEFAULT_SCHEMA_ID, &mut out);
    out
}

/// An enricher child process, killed on drop.
struct Enricher {
    child: ChildGuard,
    stderr: Arc<Mutex<String>>,
    /// Its /metrics, /healthz and /readyz listener.
    metrics: SocketAddr,
}

impl Enricher {
    /// Starts `flowlog-enricher` with the topics' names and `extra` flags, and waits until it
    /// says it is enriching.
    fn start(raw: &Topic, enriched: &Topic, dlq: &Topic, group: &str, extra: &[&str]) -> Self {
        let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut child = Command::new(ENRICHER)
            .args(["--brokers", &raw.brokers, "--input-topic", &raw.name])
            .args(["--output-topic", &enriched.name, "--dlq-topic", &dlq.name])
            .args(["--group", group, "--metrics-addr", &metrics.to_string()])
            .args(["--output-schema-id", &OUT_ID.to_string()])
            .args(extra)
            .env("FLOWLOG_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting flowlog-enricher");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let lines = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::clone(&stderr);
        let pid = child.id();
        thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                eprintln!("enricher {pid}: {line}");
                if line.contains("enriching") {
                    let _ = ready_tx.send(());
                }
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
            }
        });
        let mut enricher = Self {
            child: ChildGuard(child),
            stderr,
            metrics,
        };
        if ready_rx.recv_timeout(PATIENCE).is_err() {
            let status = enricher.child.0.try_wait();
            panic!(
                "the enricher did not start ({status:?}):\n{}",
                enricher.stderr.lock().unwrap()
            );
        }
        enricher
    }

    fn kill(mut self) {
        self.child.0.kill().unwrap();
        self.child.0.wait().unwrap();
    }

    fn stop(mut self) {
        assert!(
            self.child.terminate(PATIENCE),
            "the enricher did not exit cleanly on SIGTERM:\n{}",
            self.stderr.lock().unwrap()
        );
    }
}

/// Decodes enriched messages (checking each key is the flow's key).
fn enriched_flows(messages: &[OwnedMessage]) -> Vec<EnrichedFlow> {
    messages
        .iter()
        .map(|m| {
            let flow = enriched_avro::decode_expecting(m.payload().unwrap(), OUT_ID)
                .expect("an enriched flow");
            assert_eq!(m.key(), Some(&avro::key(&flow.flow)[..]), "message key");
            flow
        })
        .collect()
}

/// Writes a static inventory file.
fn static_file(dir: &Path, toml: &str) -> String {
    let path = dir.join("static.toml");
    std::fs::write(&path, toml).unwrap();
    path.display().to_string()
}

fn header<'a>(m: &'a OwnedMessage, key: &str) -> &'a str {
    let headers = m.headers().expect("dead letters carry headers");
    let h = headers
        .iter()
        .find(|h| h.key == key)
        .unwrap_or_else(|| panic!("no header {key}"));
    std::str::from_utf8(h.value.unwrap()).unwrap()
}

/// Also: records of both schema versions are read, each by its id (a version 1 record, from an
/// agent before adoption, reads `adopted` false; version 2 keeps it), and enriched as version 2.
#[test]
fn undecodable_messages_go_to_the_dead_letter_topic_and_the_rest_is_enriched() {
    let _serial = serial();
    let (raw, enriched, dlq) = (
        Topic::create("dlq-raw", 1),
        Topic::create("dlq-enriched", 1),
        Topic::create("dlq-dlq", 1),
    );
    let dir = temp_dir("dlq");
    let inventory = static_file(
        &dir,
        "[[entry]]\ncidr = \"10.1.0.0/16\"\nname = \"corp\"\nlabels = { site = \"hq\" }\n",
    );
    let t = now_ns() - 60_000_000_000;
    let good1 = record(1, "10.1.2.3", t);
    let good2 = FlowRecord {
        adopted: true,
        ..record(2, "10.9.9.9", t + 1)
    };
    // An agent of schema version 1 wrote this one.
    let old = record(3, "10.1.2.4", t + 2);
    let mut v1 = vec![0];
    v1.extend_from_slice(&avro::DEFAULT_SCHEMA_ID_V1.to_be_bytes());
    avro::encode_datum_v1(&old, &mut v1);
    let truncated = encoded(&good1)[..20].to_vec();
    let mut wrong_magic = encoded(&good1);
    wrong_magic[0] = 1;
    let mut unknown_id = encoded(&good1);
    unknown_id[1..5].copy_from_slice(&77u32.to_be_bytes());
    let key = avro::key(&good1);
    raw.produce(&[
        (key.clone(), encoded(&good1)),
        (key.clone(), truncated.clone()),
        (key.clone(), wrong_magic.clone()),
        (key.clone(), unknown_id.clone()),
        (avro::key(&good2), encoded(&good2)),
        (avro::key(&old), v1),
    ]);
    let group = unique_name("dlq-group");
    // The static inventory comes through the configuration file (flags' defaults).
    let config = dir.join("enricher.toml");
    std::fs::write(
        &config,
        format!("static = [{inventory:?}]\nhold = \"2s\"\n"),
    )
    .unwrap();
    let config = config.display().to_string();
    let enricher = Enricher::start(&raw, &enriched, &dlq, &group, &["--config", &config]);

    let out = enriched_flows(&enriched.read_until(|m| m.len() >= 3));
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].flow, good1);
    assert_eq!(out[1].flow, good2);
    assert_eq!(out[2].flow, old);
    assert_eq!(
        out[2].remote.identity.as_ref().map(|i| i.name.as_str()),
        Some("corp")
    );
    assert_eq!(out[0].remote.status, Attribution::Exact);
    let corp = out[0].remote.identity.as_ref().unwrap();
    assert_eq!(
        (corp.kind, corp.name.as_str(), corp.source.as_str()),
        (IdentityKind::Static, "corp", "static")
    );
    assert_eq!(corp.labels.get("site").map(String::as_str), Some("hq"));
    assert_eq!(out[1].remote.status, Attribution::Unknown);
    assert_eq!(
        out[0].local.status,
        Attribution::Unknown,
        "192.0.2.10 is nobody's"
    );

    let letters = dlq.read_until(|m| m.len() >= 3);
    assert_eq!(letters.len(), 3);
    let expected = [
        (truncated, "1", "message truncated"),
        (wrong_magic, "2", "wrong magic byte 0x01"),
        (unknown_id, "3", "unknown schema id 77"),
    ];
    for (letter, (payload, offset, error)) in letters.iter().zip(expected) {
        assert_eq!(letter.payload(), Some(&payload[..]));
        assert_eq!(letter.key(), Some(&key[..]));
        assert!(
            header(letter, "flowlog.error").starts_with(error),
            "{}",
            header(letter, "flowlog.error")
        );
        assert_eq!(
            header(letter, "flowlog.source"),
            format!("{}/0/{offset}", raw.name)
        );
    }
    enricher.stop();
    assert_eq!(
        raw.committed(&group),
        vec![Some(6)],
        "every offset committed"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn flows_are_attributed_to_the_owner_at_their_start() {
    let _serial = serial();
    let (raw, enriched, dlq) = (
        Topic::create("attr-raw", 1),
        Topic::create("attr-enriched", 1),
        Topic::create("attr-dlq", 1),
    );
    let dir = temp_dir("attr");
    // Ownership history, one hour ago (times as RFC 3339 in the file).
    let base_s = now_ns() / 1_000_000_000 - 3600;
    let at = |s: u64| {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(base_s + s);
        humantime::format_rfc3339(t).to_string()
    };
    let inventory = static_file(
        &dir,
        &format!(
            r#"
[[entry]]
cidr = "10.2.0.5"
name = "old-owner"
from = "{t0}"
to = "{t100}"

[[entry]]
cidr = "10.2.0.5"
name = "new-owner"
from = "{t101}"

[[entry]]
cidr = "10.2.0.6"
name = "a"
from = "{t0}"

[[entry]]
cidr = "10.2.0.6"
name = "b"
namespace = "ns"
from = "{t50}"

[[entry]]
cidr = "10.3.0.0/16"
name = "vpc-c"

[[entry]]
cidr = "10.3.0.7/32"
name = "db-primary"
kind = "instance"
instance_id = "i-0abc"
"#,
            t0 = at(0),
            t50 = at(50),
            t100 = at(100),
            t101 = at(101),
        ),
    );
    let ns = |s: f64| base_s * 1_000_000_000 + (s * 1e9) as u64;
    // (flow id, remote, start (s after base), expected status, expected owner or candidates)
    let cases: [(u64, &str, f64, Attribution, &str); 8] = [
        (11, "10.2.0.5", 50.0, Attribution::Exact, "old-owner"),
        (12, "10.2.0.5", 99.999, Attribution::Exact, "old-owner"),
        (13, "10.2.0.5", 100.5, Attribution::Unknown, ""),
        (14, "10.2.0.5", 101.0, Attribution::Exact, "new-owner"),
        (15, "10.2.0.6", 10.0, Attribution::Exact, "a"),
        (16, "10.2.0.6", 60.0, Attribution::Ambiguous, "a,ns/b"),
        (17, "10.3.0.7", 60.0, Attribution::Exact, "db-primary"),
        (18, "10.3.9.9", 60.0, Attribution::Exact, "vpc-c"),
    ];
    let mut messages: Vec<(Vec<u8>, Vec<u8>)> = cases
        .iter()
        .map(|&(id, remote, s, _, _)| {
            let r = record(id, remote, ns(s));
            (avro::key(&r), encoded(&r))
        })
        .collect();
    let nobody = record(19, "198.51.100.1", ns(60.0));
    messages.push((avro::key(&nobody), encoded(&nobody)));
    raw.produce(&messages);
    let enricher = Enricher::start(
        &raw,
        &enriched,
        &dlq,
        &unique_name("attr-group"),
        &["--static", &inventory],
    );
    let out = enriched_flows(&enriched.read_until(|m| m.len() >= messages.len()));
    enricher.stop();
    assert_eq!(out.len(), messages.len());
    for (flow, (id, remote, _, status, owner)) in out.iter().zip(cases) {
        assert_eq!(flow.flow.flow_id, id);
        assert_eq!(flow.remote.status, status, "flow {id} to {remote}");
        match status {
            Attribution::Exact => {
                let identity = flow.remote.identity.as_ref().unwrap();
                assert_eq!(identity.name, owner, "flow {id} to {remote}");
            }
            Attribution::Ambiguous => {
                assert_eq!(flow.remote.candidates.join(","), owner, "flow {id}");
                assert!(flow.remote.identity.is_none());
            }
            Attribution::Unknown => assert!(flow.remote.identity.is_none()),
        }
    }
    let db = out[6].remote.identity.as_ref().unwrap();
    assert_eq!(db.kind, IdentityKind::Instance);
    assert_eq!(db.instance_id.as_deref(), Some("i-0abc"));
    assert_eq!(out[8].remote.status, Attribution::Unknown, "198.51.100.1");
    let _ = std::fs::remove_dir_all(dir);
}

/// `--clock-skew 2s` against a static inventory whose entries change owner at known times: a
/// flow whose start is within 2 s of a change of owner is `ambiguous` naming both owners, one
/// whose window reaches a time with no owner is `unknown`, and the others are `exact`; each
/// boundary to the millisecond, and the ends the skew changed are counted.
#[test]
fn flows_within_the_clock_skew_of_a_change_of_owner_name_both_owners() {
    let _serial = serial();
    let (raw, enriched, dlq) = (
        Topic::create("skew-raw", 1),
        Topic::create("skew-enriched", 1),
        Topic::create("skew-dlq", 1),
    );
    let dir = temp_dir("skew");
    let base_s = now_ns() / 1_000_000_000 - 3600;
    let at = |s: u64| {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(base_s + s);
        humantime::format_rfc3339(t).to_string()
    };
    // 10.4.0.5 changes hands at 100 s; 10.4.0.6 has nobody from 100 s to 101 s.
    let inventory = static_file(
        &dir,
        &format!(
            r#"
[[entry]]
cidr = "10.4.0.5"
name = "old-owner"
from = "{t0}"
to = "{t100}"

[[entry]]
cidr = "10.4.0.5"
name = "new-owner"
from = "{t100}"

[[entry]]
cidr = "10.4.0.6"
name = "a"
from = "{t0}"
to = "{t100}"

[[entry]]
cidr = "10.4.0.6"
name = "b"
from = "{t101}"
"#,
            t0 = at(0),
            t100 = at(100),
            t101 = at(101),
        ),
    );
    let ns = |s: f64| base_s * 1_000_000_000 + (s * 1e9).round() as u64;
    // Every flow's peer answered (its handshake completed) but 68 and 69: connects nobody
    // answered, which leave nobody possible.
    let failed = [68, 69];
    let cases: [(u64, &str, f64, Attribution, &str); 12] = [
        (61, "10.4.0.5", 50.0, Attribution::Exact, "old-owner"),
        // The window [start - 2 s, start + 2 s] ends 1 ms before the change.
        (62, "10.4.0.5", 97.999, Attribution::Exact, "old-owner"),
        (
            63,
            "10.4.0.5",
            98.0,
            Attribution::Ambiguous,
            "new-owner,old-owner",
        ),
        (
            64,
            "10.4.0.5",
            100.5,
            Attribution::Ambiguous,
            "new-owner,old-owner",
        ),
        (
            65,
            "10.4.0.5",
            101.999,
            Attribution::Ambiguous,
            "new-owner,old-owner",
        ),
        // The window starts at the change.
        (66, "10.4.0.5", 102.0, Attribution::Exact, "new-owner"),
        (67, "10.4.0.6", 97.999, Attribution::Exact, "a"),
        // The window reaches the second with no owner: for a connect nobody answered, nobody
        // is possible.
        (68, "10.4.0.6", 99.0, Attribution::Unknown, ""),
        (69, "10.4.0.6", 102.999, Attribution::Unknown, ""),
        (70, "10.4.0.6", 103.0, Attribution::Exact, "b"),
        // The same starts answered: nobody is ruled out, so the window's owners are the answer.
        (71, "10.4.0.6", 99.0, Attribution::Ambiguous, "a,b"),
        (72, "10.4.0.6", 102.999, Attribution::Exact, "b"),
    ];
    let messages: Vec<(Vec<u8>, Vec<u8>)> = cases
        .iter()
        .map(|&(id, remote, s, _, _)| {
            let mut r = record(id, remote, ns(s));
            if failed.contains(&id) {
                r.outcome = Outcome::Failed;
            }
            (avro::key(&r), encoded(&r))
        })
        .collect();
    raw.produce(&messages);
    let enricher = Enricher::start(
        &raw,
        &enriched,
        &dlq,
        &unique_name("skew-group"),
        &["--static", &inventory, "--clock-skew", "2s"],
    );
    let out = enriched_flows(&enriched.read_until(|m| m.len() >= messages.len()));
    assert_eq!(out.len(), messages.len());
    for (flow, (id, remote, _, status, owner)) in out.iter().zip(cases) {
        assert_eq!(flow.flow.flow_id, id);
        let who = match &flow.remote.identity {
            Some(i) => i.name.clone(),
            None => flow.remote.candidates.join(","),
        };
        assert_eq!(
            (flow.remote.status, who.as_str()),
            (status, owner),
            "flow {id} to {remote}"
        );
    }
    // Without the skew, 63–65, 68, 69 and 71 are exact: the window made 4 ambiguous (63–65,
    // 71) and 2 unknown (68 and 69; a start in the gap itself would be unknown anyway). 72 is
    // exact only because its peer answered.
    let (_, page) = http_get(enricher.metrics, "/metrics").unwrap();
    let value = |line: String| {
        page.lines()
            .find_map(|l| l.strip_prefix(&line)?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {line}in\n{page}"))
    };
    let widened = |status: &str| {
        value(format!(
            "flowlog_enricher_skew_widened_total{{end=\"remote\",status=\"{status}\"}} "
        ))
    };
    assert_eq!((widened("ambiguous"), widened("unknown")), (4, 2));
    assert_eq!(
        value("flowlog_enricher_presence_resolved_total{end=\"remote\"} ".to_owned()),
        1
    );
    enricher.stop();
    let _ = std::fs::remove_dir_all(dir);
}

/// Reads every Parquet file under `dir` with pyarrow and returns the `(host, flow_id, seq)` of
/// every row, duplicates included.
fn parquet_keys(dir: &Path) -> Vec<(String, u64, u32)> {
    let text = pyarrow(&["read", &dir.display().to_string(), "-", "host,flow_id,seq"]);
    let read: serde_json::Value = serde_json::from_str(&text).expect("the reader's JSON");
    read["files"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["rows"].as_array().unwrap())
        .map(|r| {
            (
                r["host"].as_str().unwrap().to_owned(),
                r["flow_id"].as_u64().unwrap(),
                r["seq"].as_u64().unwrap() as u32,
            )
        })
        .collect()
}

#[test]
fn a_consumer_group_member_killed_mid_stream_loses_nothing() {
    let _serial = serial();
    const N: u64 = 4000;
    let (raw, enriched, dlq) = (
        Topic::create("group-raw", 4),
        Topic::create("group-enriched", 4),
        Topic::create("group-dlq", 1),
    );
    let dir = temp_dir("group");
    let parquet = dir.join("parquet");
    let inventory = static_file(&dir, "[[entry]]\ncidr = \"10.0.0.0/8\"\nname = \"ten\"\n");
    let group = unique_name("group");
    let t = now_ns() - 60_000_000_000;
    let records: Vec<FlowRecord> = (0..N)
        .map(|i| {
            let mut r = record(
                1_000_000 + i,
                &format!("10.0.{}.{}", i / 250, i % 250),
                t + i,
            );
            r.host = format!("host-{}", i % 7);
            r
        })
        .collect();
    let messages: Vec<(Vec<u8>, Vec<u8>)> =
        records.iter().map(|r| (avro::key(r), encoded(r))).collect();
    let flags = [
        "--static",
        &inventory,
        "--parquet",
        &parquet.display().to_string(),
        "--parquet-roll-interval",
        "1s",
    ];
    let a = Enricher::start(&raw, &enriched, &dlq, &group, &flags);
    let b = Enricher::start(&raw, &enriched, &dlq, &group, &flags);
    let half = messages.len() / 2;
    raw.produce(&messages[..half]);
    // Some of it is through before the kill: the killed enricher had work in flight.
    enriched.read_until(|m| m.len() as u64 >= N / 4);
    a.kill();
    raw.produce(&messages[half..]);
    let a = Enricher::start(&raw, &enriched, &dlq, &group, &flags);

    let key = |f: &FlowRecord| (f.host.clone(), f.flow_id, f.seq);
    let expected: BTreeSet<_> = records.iter().map(key).collect();
    let out = enriched.read_until(|m| {
        let seen: HashSet<_> = enriched_flows(m).iter().map(|e| key(&e.flow)).collect();
        seen.len() as u64 >= N
    });
    let flows = enriched_flows(&out);
    let seen: BTreeSet<_> = flows.iter().map(|e| key(&e.flow)).collect();
    assert_eq!(seen, expected, "every input record is in flows.enriched");
    for e in &flows {
        let original = &records[(e.flow.flow_id - 1_000_000) as usize];
        assert_eq!(&e.flow, original);
        assert_eq!(e.remote.identity.as_ref().unwrap().name, "ten");
    }
    eprintln!(
        "flows.enriched: {} messages for {N} records ({} duplicates)",
        flows.len(),
        flows.len() as u64 - N
    );
    // Stopping flushes the Parquet files of both.
    a.stop();
    b.stop();
    let rows = parquet_keys(&parquet);
    let in_parquet: BTreeSet<_> = rows.iter().cloned().collect();
    assert_eq!(in_parquet, expected, "every input record is in Parquet");
    eprintln!(
        "Parquet: {} rows for {N} records ({} duplicates)",
        rows.len(),
        rows.len() as u64 - N
    );
    let committed: i64 = raw.committed(&group).iter().map(|o| o.unwrap_or(0)).sum();
    assert_eq!(
        committed, N as i64,
        "every offset committed after a clean stop"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `flowlog-inventory`, a binary of another package: cargo gives a test only its own package's
/// binaries, so the testkit builds it (once per test process, up to date, this test's profile).
fn inventory_bin() -> PathBuf {
    cargo_bin("flowlog-inventory")
}

/// `flowlog-inventory` as a child process with `extra` flags, killed on drop.
fn start_inventory(ownership: &Topic, inventory: &str, extra: &[&str]) -> ChildGuard {
    spawn_ready(
        Command::new(inventory_bin())
            .args(["--brokers", &ownership.brokers])
            .args(["--ownership-topic", &ownership.name])
            .args(["--static", inventory, "--static-interval", "200ms"])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .args(extra),
        "inventory",
        "publishing ownership",
    )
}

/// The `to_ns` of the closed tenure of static entry `name` in the ownership topic.
fn closed_at(ownership: &Topic, name: &str) -> u64 {
    let find = |messages: &[OwnedMessage]| {
        messages.iter().find_map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload()?).ok()?;
            (v["type"] == "tenure" && v["identity"]["name"] == name)
                .then(|| v["to_ns"].as_u64())
                .flatten()
        })
    };
    find(&ownership.read_until(|m| find(m).is_some())).unwrap()
}

#[test]
fn enrichers_follow_the_ownership_topic_of_one_inventory_process() {
    let _serial = serial();
    let (raw, enriched, dlq, ownership) = (
        Topic::create("own-raw", 1),
        Topic::create("own-enriched", 1),
        Topic::create("own-dlq", 1),
        Topic::create("own-ownership", 1),
    );
    let dir = temp_dir("own");
    let t0 = now_ns() - 600_000_000_000;
    let file = |with_gone: bool| {
        let mut toml =
            "[[entry]]\ncidr = \"10.5.0.1\"\nname = \"db\"\nkind = \"instance\"\n".to_string();
        if with_gone {
            toml.push_str("\n[[entry]]\ncidr = \"10.5.0.2\"\nname = \"gone\"\n");
        }
        static_file(&dir, &toml)
    };
    let inventory = file(true);
    let mut publisher = start_inventory(&ownership, &inventory, &[]);
    let f1 = record(31, "10.5.0.1", t0);
    let f2 = record(32, "10.5.0.2", t0);
    raw.produce(&[
        (avro::key(&f1), encoded(&f1)),
        (avro::key(&f2), encoded(&f2)),
    ]);
    let flags = ["--ownership-topic", ownership.name.as_str()];
    let first = Enricher::start(&raw, &enriched, &dlq, &unique_name("own-a"), &flags);
    let out = enriched_flows(&enriched.read_until(|m| m.len() >= 2));
    let names: Vec<_> = out
        .iter()
        .map(|e| {
            (
                e.remote.status,
                e.remote.identity.as_ref().map(|i| i.name.clone()),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            (Attribution::Exact, Some("db".to_string())),
            (Attribution::Exact, Some("gone".to_string()))
        ]
    );
    assert_eq!(
        out[0].remote.identity.as_ref().unwrap().kind,
        IdentityKind::Instance
    );

    // The publisher restarts with "gone" out of the file: replaying the topic, it finds the
    // tenure open, and closes it at the static source's first complete view.
    assert!(publisher.terminate(PATIENCE));
    let _ = file(false);
    let _publisher = start_inventory(&ownership, &inventory, &[]);
    let released = closed_at(&ownership, "gone");
    let f3 = record(33, "10.5.0.2", released + 1);
    raw.produce(&[(avro::key(&f3), encoded(&f3))]);
    let out = enriched_flows(&enriched.read_until(|m| m.len() >= 3));
    assert_eq!(out[2].flow, f3);
    assert_eq!(
        out[2].remote.status,
        Attribution::Unknown,
        "after its release"
    );
    first.stop();

    // A replica started now replays the whole history: the same answers.
    let second = Enricher::start(&raw, &enriched, &dlq, &unique_name("own-b"), &flags);
    let out = enriched_flows(&enriched.read_until(|m| m.len() >= 6));
    second.stop();
    let replayed: Vec<_> = out[3..]
        .iter()
        .map(|e| {
            (
                e.flow.flow_id,
                e.remote.status,
                e.remote.identity.as_ref().map(|i| i.name.clone()),
            )
        })
        .collect();
    assert_eq!(
        replayed,
        vec![
            (31, Attribution::Exact, Some("db".to_string())),
            (32, Attribution::Exact, Some("gone".to_string())),
            (33, Attribution::Unknown, None)
        ]
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs the enricher with a `--config` file holding `text`; its exit code, stderr and the file.
fn run_with_config(name: &str, text: &str) -> (Option<i32>, String, PathBuf) {
    let dir = temp_dir(name);
    let config = dir.join("enricher.toml");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(ENRICHER)
        .args(["--config", &config.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr, config)
}

#[test]
fn a_broken_configuration_file_is_a_usage_error_naming_it() {
    let (code, stderr, config) = run_with_config("config", "static = [\"unterminated\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "parsing the configuration file {}",
            config.display()
        )),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
}

/// A key no flag reads (a typo, here `hodl`) is a usage error naming it and the settings there
/// are, not a setting silently ignored.
#[test]
fn an_unknown_configuration_key_is_a_usage_error_naming_it() {
    let (code, stderr, config) =
        run_with_config("config-unknown", "hold = \"2s\"\nhodl = \"5s\"\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "parsing the configuration file {}: unknown setting `hodl` (no flag reads FLOWLOG_HODL)",
            config.display()
        )),
        "{stderr}"
    );
    // The message lists the real settings, the one meant among them.
    assert!(stderr.contains(", hold, "), "{stderr}");
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
}

/// Reading pauses at `--max-pending` records not yet durable; when the open Parquet files are
/// what holds them, they are closed early rather than at their (here: hour-long) roll interval.
#[test]
fn a_full_window_of_pending_records_rolls_parquet_early() {
    let _serial = serial();
    const N: u64 = 1_000;
    let (raw, enriched, dlq) = (
        Topic::create("window-raw", 1),
        Topic::create("window-enriched", 1),
        Topic::create("window-dlq", 1),
    );
    let dir = temp_dir("window");
    let parquet = dir.join("parquet");
    let t = now_ns() - 60_000_000_000;
    let records: Vec<FlowRecord> = (0..N)
        .map(|i| record(5_000 + i, "10.9.0.1", t + i))
        .collect();
    let messages: Vec<_> = records.iter().map(|r| (avro::key(r), encoded(r))).collect();
    raw.produce(&messages);
    let parquet_flag = parquet.display().to_string();
    let enricher = Enricher::start(
        &raw,
        &enriched,
        &dlq,
        &unique_name("window"),
        &[
            "--max-pending",
            "100",
            "--parquet",
            &parquet_flag,
            "--parquet-roll-interval",
            "1h",
        ],
    );
    let out = enriched.read_until(|m| m.len() as u64 >= N);
    assert_eq!(out.len() as u64, N);
    enricher.stop();
    let rows = parquet_keys(&parquet);
    assert_eq!(rows.len() as u64, N, "every record in Parquet, once");
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs `command` to its exit (killed after `within`): its status and stderr.
fn run_to_exit(command: &mut Command, within: Duration) -> (std::process::ExitStatus, String) {
    let mut child = ChildGuard(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the process"),
    );
    let mut pipe = child.0.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        text
    });
    let deadline = std::time::Instant::now() + within;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the process did not exit within {within:?}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

/// One file configures every Kafka client: the inventory's replay and publisher, the enricher's
/// consumer, producer (enriched and dead letters) and ownership follower — over TLS with
/// SCRAM-SHA-256 (the agent's test uses SCRAM-SHA-512).
#[test]
fn every_kafka_client_works_over_tls_and_scram() {
    let broker = TlsBroker::start("enricher", true);
    let (raw, enriched, dlq, ownership) = (
        broker.topic("tls-raw", 1),
        broker.topic("tls-enriched", 1),
        broker.topic("tls-dlq", 1),
        broker.topic("tls-ownership", 1),
    );
    let options = with_option(broker.client_options(), "sasl.mechanism", "SCRAM-SHA-256");
    let config = broker.properties("client.properties", &options);
    let config = config.to_str().unwrap();
    let dir = temp_dir("tls-enricher");
    let inventory = static_file(
        &dir,
        "[[entry]]\ncidr = \"10.7.0.1\"\nname = \"db\"\nkind = \"instance\"\n",
    );
    let _publisher = start_inventory(&ownership, &inventory, &["--kafka-config", config]);
    let flow = record(51, "10.7.0.1", now_ns() - 600_000_000_000);
    raw.produce(&[
        (avro::key(&flow), encoded(&flow)),
        (b"k".to_vec(), b"not avro".to_vec()),
    ]);
    let group = unique_name("tls-group");
    let enricher = Enricher::start(
        &raw,
        &enriched,
        &dlq,
        &group,
        &[
            "--kafka-config",
            config,
            "--ownership-topic",
            &ownership.name,
        ],
    );
    let out = enriched_flows(&enriched.read_until(|m| !m.is_empty()));
    let dead = dlq.read_until(|m| !m.is_empty());
    enricher.stop();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].flow, flow);
    assert_eq!(out[0].remote.status, Attribution::Exact);
    let identity = out[0].remote.identity.as_ref().unwrap();
    assert_eq!(
        (identity.name.as_str(), identity.kind),
        ("db", IdentityKind::Instance)
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload(), Some(&b"not avro"[..]));
    assert_eq!(
        raw.committed(&group),
        vec![Some(2)],
        "both offsets committed"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tls_and_sasl_refusals_stop_the_enricher_and_the_inventory_at_start() {
    let inventory_exe = inventory_bin();
    let broker = TlsBroker::start("enricher-refused", true);
    let (raw, enriched, dlq, ownership) = (
        broker.topic("refused-raw", 1),
        broker.topic("refused-enriched", 1),
        broker.topic("refused-dlq", 1),
        broker.topic("refused-ownership", 1),
    );
    let dir = temp_dir("refused");
    let inventory = static_file(&dir, "[[entry]]\ncidr = \"10.7.0.2\"\nname = \"x\"\n");
    let good = broker.client_options();
    let password = broker.scram.as_ref().unwrap().password.clone();
    let wrong_password = format!("not-{password}");
    let localhost = broker.brokers();
    let by_ip = format!("127.0.0.1:{}", broker.port);
    let wrong_ca = with_option(
        good.clone(),
        "ssl.ca.location",
        broker.other_ca.to_str().unwrap(),
    );
    let bad_password = with_option(good.clone(), "sasl.password", &wrong_password);
    let tls_failed = |b: &str| format!("TLS handshake with Kafka broker {b} failed");
    let sasl_failed = |b: &str| format!("SASL authentication with Kafka broker {b} failed");
    let enricher = |brokers: &str, config: &Path| {
        let mut command = Command::new(ENRICHER);
        command
            .args(["--brokers", brokers, "--input-topic", &raw.name])
            .args(["--output-topic", &enriched.name, "--dlq-topic", &dlq.name])
            .args(["--group", &unique_name("refused")])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .arg("--kafka-config")
            .arg(config);
        command
    };
    let inventory_process = |brokers: &str, config: &Path| {
        let mut command = Command::new(&inventory_exe);
        command
            .args(["--brokers", brokers, "--ownership-topic", &ownership.name])
            .args(["--static", &inventory])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .arg("--kafka-config")
            .arg(config);
        command
    };
    let cases = [
        (
            "enricher, wrong CA",
            enricher(&localhost, &broker.properties("a", &wrong_ca)),
            tls_failed(&localhost),
            "no CA of ssl.ca.location signed",
        ),
        (
            "enricher, host name mismatch",
            enricher(&by_ip, &broker.properties("b", &good)),
            tls_failed(&by_ip),
            "IP address mismatch",
        ),
        (
            "enricher, wrong password",
            enricher(&localhost, &broker.properties("c", &bad_password)),
            sasl_failed(&localhost),
            "SASL SCRAM authentication failed",
        ),
        (
            "inventory, wrong CA",
            inventory_process(&localhost, &broker.properties("d", &wrong_ca)),
            tls_failed(&localhost),
            "no CA of ssl.ca.location signed",
        ),
        (
            "inventory, host name mismatch",
            inventory_process(&by_ip, &broker.properties("f", &good)),
            tls_failed(&by_ip),
            "IP address mismatch",
        ),
        (
            "inventory, wrong password",
            inventory_process(&localhost, &broker.properties("e", &bad_password)),
            sasl_failed(&localhost),
            "SASL SCRAM authentication failed",
        ),
    ];
    for (case, mut command, names_broker, cause) in cases {
        let started = std::time::Instant::now();
        let (status, stderr) = run_to_exit(&mut command, Duration::from_secs(20));
        let took = started.elapsed();
        assert_eq!(status.code(), Some(1), "{case}: stderr:\n{stderr}");
        assert!(
            took < Duration::from_secs(8),
            "{case}: took {took:?}:\n{stderr}"
        );
        let error = stderr
            .lines()
            .find(|l| l.contains("ERROR"))
            .unwrap_or_else(|| panic!("{case}: no error line in\n{stderr}"));
        eprintln!("{case} ({took:?}): {error}");
        assert!(error.contains(&names_broker), "{case}: {error}");
        assert_eq!(
            error.matches("://").count(),
            0,
            "{case}: one broker name: {error}"
        );
        assert!(error.contains(cause), "{case}: {error}");
        assert!(
            !stderr.contains(&password) && !stderr.contains(&wrong_password),
            "{case}: a password was logged:\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_kafka_config_or_option_librdkafka_refuses_is_a_usage_error() {
    let dir = temp_dir("kafka-config");
    let file = dir.join("client.properties");
    std::fs::write(&file, "security.protocol=SSL\nssl.ca.locaton=/x.pem\n").unwrap();
    let expected = format!(
        "{} line 2: librdkafka option `ssl.ca.locaton`",
        file.display()
    );
    for program in [PathBuf::from(ENRICHER), inventory_bin()] {
        let out = Command::new(&program)
            .arg("--kafka-config")
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let program = program.display();
        assert_eq!(out.status.code(), Some(2), "{program}: {stderr}");
        assert!(stderr.contains("'--kafka-config'"), "{program}: {stderr}");
        assert!(stderr.contains(&expected), "{program}: {stderr}");
    }
    let out = Command::new(ENRICHER)
        .args(["--consumer-option", "fetch.wait.max.ms=soon"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'--consumer-option'"), "{stderr}");
    assert!(stderr.contains("fetch.wait.max.ms"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// How long the outage test cuts the broker off: long enough for every client to see its
/// connections reset and refused, and for the inventory to fall behind the hold.
const OUTAGE: Duration = Duration::from_secs(15);

#[test]
fn attribution_resumes_after_a_broker_outage() {
    // A broker of the test's own: the outage cuts off only this test's clients.
    let broker = PrivateBroker::start("enricher-outage");
    let topic = |what: &str| Topic::create_on(&broker.addr, &format!("outage-{what}"), 1);
    let (raw, enriched, dlq, ownership) = (
        topic("raw"),
        topic("enriched"),
        topic("dlq"),
        topic("ownership"),
    );
    let dir = temp_dir("outage");
    let inventory_file = static_file(&dir, "[[entry]]\ncidr = \"10.7.0.0/16\"\nname = \"svc\"\n");
    let mut inventory = start_inventory(&ownership, &inventory_file, &[]);
    let mut enricher = Enricher::start(
        &raw,
        &enriched,
        &dlq,
        &unique_name("outage"),
        &["--ownership-topic", &ownership.name, "--hold", "5s"],
    );
    let remote_of = |flows: &[EnrichedFlow], id: u64| {
        let e = flows.iter().find(|e| e.flow.flow_id == id).unwrap();
        (
            e.remote.status,
            e.remote.identity.as_ref().map(|i| i.name.clone()),
        )
    };
    let before = record(41, "10.7.0.1", now_ns());
    raw.produce(&[(avro::key(&before), encoded(&before))]);
    let out = enriched_flows(&enriched.read_until(|m| !m.is_empty()));
    assert_eq!(
        remote_of(&out, 41),
        (Attribution::Exact, Some("svc".to_string()))
    );

    // Every connection to the broker reset and refused for a while; the broker itself runs on.
    let block = PortBlock::start(broker.port());
    thread::sleep(OUTAGE);
    // Meanwhile the ownership stream stopped: the replica says it cannot attribute new flows.
    let (status, body) = http_get(enricher.metrics, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(
            "inventory_caught_up: the inventory source ownership/static is complete only up to "
        ),
        "{body}"
    );
    assert_eq!(
        http_get(enricher.metrics, "/healthz").unwrap(),
        (200, "ok\n".to_string()),
        "waiting for the broker is not a reason to be restarted"
    );
    drop(block);

    // The broker is reachable again: the follower, the inventory's publisher, the consumer and
    // the producer carry on by themselves.
    wait_for_http(enricher.metrics, "/readyz", |status, _| status == 200);
    let after = record(42, "10.7.0.2", now_ns());
    raw.produce(&[(avro::key(&after), encoded(&after))]);
    let out = enriched_flows(
        &enriched.read_until(|m| enriched_flows(m).iter().any(|e| e.flow.flow_id == 42)),
    );
    assert_eq!(
        remote_of(&out, 42),
        (Attribution::Exact, Some("svc".to_string())),
        "attributed again after the outage"
    );
    assert!(
        matches!(inventory.0.try_wait(), Ok(None)),
        "flowlog-inventory survived the outage"
    );
    assert!(
        matches!(enricher.child.0.try_wait(), Ok(None)),
        "flowlog-enricher survived the outage"
    );
    let (_, page) = http_get(enricher.metrics, "/metrics").unwrap();
    let errors: f64 = page
        .lines()
        .filter(|l| l.starts_with("flowlog_ownership_kafka_errors_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(errors > 0.0, "the outage was counted:\n{page}");
    enricher.stop();
    assert!(inventory.terminate(PATIENCE));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_malformed_ownership_record_is_skipped_and_counted() {
    let _serial = serial();
    let (raw, enriched, dlq, ownership) = (
        Topic::create("malformed-raw", 1),
        Topic::create("malformed-enriched", 1),
        Topic::create("malformed-dlq", 1),
        Topic::create("malformed-ownership", 1),
    );
    let dir = temp_dir("malformed");
    let inventory_file = static_file(&dir, "[[entry]]\ncidr = \"10.8.0.0/16\"\nname = \"svc\"\n");
    // Something that is not an ownership record lands in the topic before the publisher's.
    ownership.produce(&[(b"not-a-key".to_vec(), b"{\"type\": \"nonsense\"}".to_vec())]);
    let _inventory = start_inventory(&ownership, &inventory_file, &[]);
    let enricher = Enricher::start(
        &raw,
        &enriched,
        &dlq,
        &unique_name("malformed"),
        &["--ownership-topic", &ownership.name, "--hold", "30s"],
    );
    let flow = record(51, "10.8.0.1", now_ns());
    raw.produce(&[(avro::key(&flow), encoded(&flow))]);
    let out = enriched_flows(&enriched.read_until(|m| !m.is_empty()));
    assert_eq!(
        (
            out[0].remote.status,
            out[0].remote.identity.as_ref().map(|i| i.name.clone())
        ),
        (Attribution::Exact, Some("svc".to_string())),
        "the records after the malformed one are followed"
    );
    let (_, page) = http_get(enricher.metrics, "/metrics").unwrap();
    assert!(
        page.lines()
            .any(|l| l == "flowlog_ownership_malformed_total 1"),
        "{page}"
    );
    enricher.stop();
    let _ = std::fs::remove_dir_all(dir);
}
