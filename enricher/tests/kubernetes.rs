//! Pod IP reuse through the whole pipeline, with real processes: a Kubernetes list/watch server
//! (`flowlog_testkit::kubernetes`: real object JSON, watches, bookmarks) →
//! `flowlog-inventory --kubernetes-url` → the `flows.ownership` topic on the real broker →
//! `flowlog-enricher --ownership-topic`. Every address is handed from one pod to another with a
//! gap between them; flows started during the first tenure, in the gap and during the second
//! must come out attributed to the first pod, to nobody, and to the second pod — never to the
//! wrong one.
use std::{process::Command, thread, time::Duration};

use flowlog_record::{Attribution, Direction, Family, FlowRecord, Outcome, avro, enriched_avro};
use flowlog_testkit::{
    PATIENCE, Topic, free_port,
    kubernetes::{ApiServer, Kind, PodSpec, node, pod},
    spawn_ready, unique_name,
};
use rdkafka::{
    ClientConfig, Message,
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

const ADDRESSES: u8 = 8;
const MS: u64 = 1_000_000;
/// How long an address stays free between its two owners.
const GAP_MS: u64 = 400;

/// A running pod named (and with the UID) `name`, holding `ip`.
fn running<'a>(name: &'a str, ip: &'a str) -> PodSpec<'a> {
    PodSpec {
        name,
        uid: name,
        ip: Some(ip),
        phase: "Running",
        ..PodSpec::default()
    }
}

fn record(flow_id: u64, remote: u8, start_ns: u64) -> FlowRecord {
    FlowRecord {
        flow_id,
        host: "node-1".into(),
        seq: 0,
        start_ns,
        end_ns: start_ns + MS,
        family: Family::Ipv4,
        local_addr: "192.0.2.7".parse().unwrap(),
        local_port: 40_000,
        remote_addr: [10, 246, 0, remote].into(),
        remote_port: 8080,
        direction: Direction::Outbound,
        outcome: Outcome::Closed,
        bytes_sent: 1,
        bytes_received: 2,
        segs_sent: 3,
        segs_received: 4,
        retransmits: 0,
        resets_sent: 0,
        resets_received: 0,
        srtt_us: 100,
        min_rtt_us: 90,
        pid: None,
        comm: None,
        cgroup_id: None,
    }
}

#[test]
fn reused_pod_addresses_are_attributed_to_their_owner_at_the_flow_start() {
    let (raw, enriched, dlq, ownership) = (
        Topic::create("k8s-raw", 1),
        Topic::create("k8s-enriched", 1),
        Topic::create("k8s-dlq", 1),
        Topic::create("k8s-ownership", 1),
    );
    // The list/watch server runs on a runtime of its own (the test's topics and processes are
    // driven synchronously).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(ApiServer::start());
    server.apply(
        Kind::Node,
        node("node-1", "node-uid", "192.0.2.1", None, "zone-a"),
    );
    let inventory = spawn_ready(
        Command::new(env!("CARGO_BIN_EXE_flowlog-inventory")).args([
            "--brokers",
            &ownership.brokers,
            "--ownership-topic",
            &ownership.name,
            "--kubernetes-url",
            &server.url,
            "--metrics-addr",
            &format!("127.0.0.1:{}", free_port()),
        ]),
        "flowlog-inventory",
        "publishing ownership",
    );
    // (address, first owner's tenure [open, close), second owner's open), ground truth as the
    // server applied it.
    let names: Vec<(String, String, String)> = (1..=ADDRESSES)
        .map(|i| {
            (
                format!("old-{i}"),
                format!("new-{i}"),
                format!("10.246.0.{i}"),
            )
        })
        .collect();
    let mut opened = Vec::new();
    for (old, _, ip) in &names {
        opened.push(server.apply(Kind::Pod, pod(&running(old, ip))));
    }
    thread::sleep(Duration::from_secs(1));
    let mut tenures = Vec::new();
    for (i, (old, new, ip)) in names.iter().enumerate() {
        let closed = server.delete(Kind::Pod, "default", old);
        thread::sleep(Duration::from_millis(GAP_MS));
        let reopened = server.apply(Kind::Pod, pod(&running(new, ip)));
        tenures.push((opened[i], closed, reopened));
    }
    // Flows: mid first tenure, mid gap, 200 ms into the second tenure.
    let mut flows = Vec::new();
    for (i, &(open, close, reopen)) in tenures.iter().enumerate() {
        let addr = u8::try_from(i + 1).unwrap();
        let (old, new, _) = &names[i];
        flows.push((
            record(100 + i as u64, addr, open + (close - open) / 2),
            Some(old.clone()),
        ));
        flows.push((record(200 + i as u64, addr, close + GAP_MS * MS / 2), None));
        flows.push((
            record(300 + i as u64, addr, reopen + 200 * MS),
            Some(new.clone()),
        ));
    }
    thread::sleep(Duration::from_millis(500));
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &raw.brokers)
        .create()
        .unwrap();
    for (r, _) in &flows {
        let mut value = Vec::new();
        avro::encode(r, 1, &mut value);
        producer
            .send(BaseRecord::to(&raw.name).key(&avro::key(r)).payload(&value))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(PATIENCE).unwrap();

    let enricher = spawn_ready(
        Command::new(env!("CARGO_BIN_EXE_flowlog-enricher")).args([
            "--brokers",
            &raw.brokers,
            "--input-topic",
            &raw.name,
            "--output-topic",
            &enriched.name,
            "--dlq-topic",
            &dlq.name,
            "--group",
            &unique_name("k8s"),
            "--ownership-topic",
            &ownership.name,
            "--output-schema-id",
            "2",
            "--metrics-addr",
            &format!("127.0.0.1:{}", free_port()),
        ]),
        "flowlog-enricher",
        "enriching",
    );
    let expected = flows.len();
    let out = enriched.read_until(|m| m.len() >= expected);
    drop(enricher);
    drop(inventory);
    let mut misattributed = 0;
    for m in &out {
        let e = enriched_avro::decode_expecting(m.payload().unwrap(), 2).unwrap();
        let truth = match e.flow.flow_id / 100 {
            1 | 3 => {
                let (old, new, _) = &names[(e.flow.flow_id % 100) as usize];
                Some(if e.flow.flow_id < 300 {
                    old.clone()
                } else {
                    new.clone()
                })
            }
            _ => None,
        };
        let got = e.remote.identity.as_ref().map(|i| i.name.clone());
        match (&truth, e.remote.status) {
            (Some(t), Attribution::Exact) if got.as_ref() == Some(t) => {}
            (None, Attribution::Unknown) => {}
            (_, Attribution::Exact) => misattributed += 1,
            _ => panic!(
                "flow {} to {}: expected {truth:?}, got {:?} {got:?}",
                e.flow.flow_id, e.flow.remote_addr, e.remote.status
            ),
        }
    }
    assert_eq!(misattributed, 0);
    assert_eq!(out.len(), expected);
}
