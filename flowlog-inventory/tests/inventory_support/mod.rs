//! What the `flowlog-inventory` leader-election tests share: replicas started against the test
//! API server, their `/metrics`, `/readyz` and `/healthz` read over HTTP, the Lease as the server
//! holds it, and the ownership topic decoded.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use flowlog_testkit::{
    ChildGuard, PATIENCE, Topic, free_port,
    kubernetes::{ApiServer, Kind, PodSpec, node, pod},
    spawn_ready,
};
use rdkafka::Message;
use serde_json::Value;

pub const NAMESPACE: &str = "flowlog";
pub const LEASE: &str = "flowlog-inventory";
/// The shortest lease: renew every 1 s, renew deadline 2 s, standbys look every 0.4 s.
pub const DURATION: Duration = Duration::from_secs(3);
pub const RENEW_PERIOD: Duration = Duration::from_secs(1);
pub const RENEW_DEADLINE: Duration = Duration::from_secs(2);
pub const RETRY_PERIOD: Duration = Duration::from_millis(400);

/// One `flowlog-inventory --leader-election` process.
pub struct Replica {
    pub identity: String,
    pub metrics: String,
    pub child: ChildGuard,
}

/// Starts a replica named `identity` and waits for the log line `ready` ("publishing
/// ownership" for a leader, "standing by: the Lease is held" for a standby).
pub fn replica(server: &ApiServer, topic: &Topic, identity: &str, ready: &'static str) -> Replica {
    let metrics = format!("127.0.0.1:{}", free_port());
    let child = spawn_ready(
        Command::new(env!("CARGO_BIN_EXE_flowlog-inventory"))
            .args([
                "--brokers",
                &topic.brokers,
                "--ownership-topic",
                &topic.name,
                "--kubernetes-url",
                &server.url,
                "--leader-election",
                "--lease-namespace",
                NAMESPACE,
                "--lease-identity",
                identity,
                "--lease-duration",
                "3s",
                "--metrics-addr",
                &metrics,
            ])
            .env("FLOWLOG_LOG", "info"),
        identity,
        ready,
    );
    Replica {
        identity: identity.to_string(),
        metrics,
        child,
    }
}

/// One plain HTTP/1.1 GET: the status code and the body.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    let mut stream =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The value of the metric line `name` (no labels) in `/metrics`, if present.
pub fn metric(addr: &str, name: &str) -> Option<f64> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    body.lines().find_map(|line| {
        let (n, v) = line.split_once(' ')?;
        (n == name).then(|| v.parse().unwrap())
    })
}

/// Polls `what` every 20 ms until it holds; panics after `limit`, naming `why`.
pub fn wait_for(limit: Duration, why: &str, what: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !what() {
        assert!(start.elapsed() < limit, "{why}: not within {limit:?}");
        thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// The Lease's holder and transitions as the server has them.
pub fn lease(server: &ApiServer) -> (Option<String>, i64) {
    let lease = server.lease(NAMESPACE, LEASE).expect("the Lease exists");
    (
        lease["spec"]["holderIdentity"].as_str().map(String::from),
        lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0),
    )
}

pub fn holder_is(server: &ApiServer, identity: &str) -> bool {
    server
        .lease(NAMESPACE, LEASE)
        .is_some_and(|l| l["spec"]["holderIdentity"] == identity)
}

/// A running pod `name` with address `ip` on node-1.
pub fn add_pod(server: &ApiServer, name: &str, ip: &str) -> u64 {
    server.apply(
        Kind::Pod,
        pod(&PodSpec {
            namespace: "shop",
            name,
            uid: &format!("uid-{name}"),
            ip: Some(ip),
            phase: "Running",
            ..PodSpec::default()
        }),
    )
}

/// The cluster the tests start with: node-1 and three pods.
pub fn cluster(server: &ApiServer) {
    server.apply(
        Kind::Node,
        node("node-1", "node-uid", "192.0.2.1", None, "zone-a"),
    );
    for (name, ip) in [
        ("web-1", "10.1.0.1"),
        ("web-2", "10.1.0.2"),
        ("db-1", "10.1.0.3"),
    ] {
        add_pod(server, name, ip);
    }
}

/// The topic's tenures: owner → compaction key → latest `to_ns` (`None`: open).
pub type Tenures = BTreeMap<String, BTreeMap<String, Option<u64>>>;

/// Decodes the ownership topic's messages: the tenures by owner, and the sources that sent
/// watermarks.
pub fn decode(messages: &[rdkafka::message::OwnedMessage]) -> (Tenures, BTreeSet<String>) {
    let mut tenures = Tenures::new();
    let mut watermarks = BTreeSet::new();
    for m in messages {
        let key = String::from_utf8(m.key().expect("a key").to_vec()).unwrap();
        let Some(payload) = m.payload() else { continue };
        let record: Value = serde_json::from_slice(payload).unwrap();
        match record["type"].as_str() {
            Some("tenure") => {
                tenures
                    .entry(record["owner"].as_str().unwrap().to_string())
                    .or_default()
                    .insert(key, record["to_ns"].as_u64());
            }
            Some("watermark") => {
                watermarks.insert(record["source"].as_str().unwrap().to_string());
            }
            // A span in which an owner may have held an address: not a tenure.
            Some("uncertain") => {}
            other => panic!("unexpected record type {other:?}"),
        }
    }
    (tenures, watermarks)
}

/// The pod `name`'s owner key prefix in the topic (`pod/<uid>/<ip>`).
pub fn pod_owner(name: &str, ip: &str) -> String {
    format!("pod/uid-{name}/{ip}")
}

/// Reads the topic until `done` holds for its tenures.
pub fn read_tenures(topic: &Topic, done: impl Fn(&Tenures) -> bool) -> Tenures {
    let messages = topic.read_until(|m| done(&decode(m).0));
    decode(&messages).0
}

/// Every owner has exactly one tenure (one key): a second publisher would have opened each
/// owner again with its own start time.
pub fn assert_one_tenure_each(tenures: &Tenures) {
    for (owner, keys) in tenures {
        assert_eq!(keys.len(), 1, "{owner} has several tenures: {keys:?}");
    }
}

pub fn open(tenures: &Tenures, owner: &str) -> bool {
    tenures
        .get(owner)
        .is_some_and(|keys| keys.values().any(Option::is_none))
}

pub fn closed_at(tenures: &Tenures, owner: &str) -> Option<u64> {
    tenures.get(owner)?.values().find_map(|to| *to)
}

pub const PATIENT: Duration = PATIENCE;
