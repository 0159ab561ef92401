//! The enricher's own CPU per flow on one core, stage by stage, beside a pass-through baseline in
//! the same run (`cargo bench -p flowlog-enricher --bench enrich`; a plain harness, no
//! criterion): what one replica can sustain when Kafka is not the limit. DESIGN.md's target is
//! ≥ 200k flows/s/core Kafka-to-Kafka, librdkafka's consume and produce included, so the
//! enricher's own work has to stay well under 5 µs a flow.
//!
//! Input: 1M Confluent-framed flow records (as `flows.raw` carries them) whose remote ends are
//! 100k pod addresses, each with a history of 4 owners (400k intervals), plus static CIDRs.
//! Stages, each timed over all records:
//! - baseline: decode the raw datum and encode it again (a pass-through consumer's work);
//! - attribute: decode, both lookups at the flow's start through [`Attributor`] (no hold: the
//!   index is caught up), encode `flows.enriched`;
//! - attribute + Parquet: the same plus `ParquetSink::write` and the final roll into a temp dir.
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use flowlog_enricher::{
    attribute::Attributor,
    storage::{ParquetSettings, ParquetSink},
};
use flowlog_identity::{IdentityIndex, OwnershipChange};
use flowlog_record::{FlowRecord, Identity, IdentityKind, avro, enriched_avro};
use rand::{Rng, SeedableRng, rngs::SmallRng};

const S: u64 = 1_000_000_000;
/// 2026-01-01T00:00:00Z: owners change every 1,000 s from here.
const BASE: u64 = 1_767_225_600 * S;
const PODS: u32 = 100_000;
const OWNERS: u64 = 4;

fn pod_addr(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from_bits(0x0a00_0000 + i))
}

/// 400k pod tenures over 100k addresses, a few static ranges, and a watermark past them all.
fn index() -> IdentityIndex {
    let mut index = IdentityIndex::new();
    index.register_source("bench");
    for i in 0..PODS {
        for k in 0..OWNERS {
            let prefix = pod_addr(i).into();
            let owner = format!("pod/{i}/{k}");
            index.apply(OwnershipChange::Open {
                source: "bench".into(),
                owner: owner.clone(),
                prefix,
                identity: Arc::new(Identity {
                    kind: IdentityKind::Pod,
                    name: format!("web-{i}-{k}"),
                    namespace: Some("shop".into()),
                    source: "kubernetes".into(),
                    ..Identity::default()
                }),
                at_ns: BASE + k * 1_000 * S,
            });
            if k + 1 < OWNERS {
                index.apply(OwnershipChange::Close {
                    source: "bench".into(),
                    owner,
                    prefix,
                    at_ns: BASE + (k * 1_000 + 900) * S,
                });
            }
        }
    }
    for (i, cidr) in ["172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"]
        .iter()
        .enumerate()
    {
        index.apply(OwnershipChange::Open {
            source: "bench".into(),
            owner: format!("static/{i}"),
            prefix: cidr.parse().unwrap(),
            identity: Arc::new(Identity {
                name: format!("range-{i}"),
                source: "static".into(),
                ..Identity::default()
            }),
            at_ns: 0,
        });
    }
    index.apply(OwnershipChange::Watermark {
        source: "bench".into(),
        at_ns: u64::MAX,
    });
    index
}

/// `n` encoded flow records from 20 hosts to the pods, starting at random times in the history.
fn raw_messages(n: usize, rng: &mut SmallRng) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let start = BASE + rng.random_range(0..OWNERS * 1_000 * S);
            let record = FlowRecord {
                flow_id: 0x5eed_0000_0000 + i as u64,
                host: format!("ip-10-1-0-{}.ec2.internal", i % 20),
                start_ns: start,
                end_ns: start + rng.random_range(1_000_000..5 * S),
                local_addr: IpAddr::V4(Ipv4Addr::new(10, 1, 0, (i % 20) as u8)),
                local_port: rng.random_range(32_768..61_000),
                remote_addr: pod_addr(rng.random_range(0..PODS)),
                remote_port: 8080,
                bytes_sent: rng.random_range(0..100_000),
                bytes_received: rng.random_range(0..1_000_000),
                segs_sent: rng.random_range(2..200),
                segs_received: rng.random_range(2..900),
                srtt_us: rng.random_range(50..5_000),
                min_rtt_us: 40,
                pid: Some(rng.random_range(1..60_000)),
                comm: Some("java".into()),
                cgroup_id: Some(rng.random_range(1..500)),
                ..FlowRecord::default()
            };
            let mut out = Vec::new();
            avro::encode(&record, avro::DEFAULT_SCHEMA_ID, &mut out);
            out
        })
        .collect()
}

/// Flows per second of `stage` over all `messages`.
fn rate(messages: &[Vec<u8>], mut stage: impl FnMut(&[u8])) -> f64 {
    let start = Instant::now();
    for m in messages {
        stage(m);
    }
    messages.len() as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo test --benches` runs this without `--bench`: a smoke run.
    let n = if std::env::args().any(|a| a == "--bench") {
        1_000_000
    } else {
        10_000
    };
    let mut rng = SmallRng::seed_from_u64(7);
    let t = Instant::now();
    let index = index().into_shared();
    let messages = raw_messages(n, &mut rng);
    println!(
        "setup: {} intervals, {n} records, {:.1} s",
        index.read().intervals(),
        t.elapsed().as_secs_f64()
    );
    let mut out = Vec::with_capacity(512);
    let baseline = rate(&messages, |m| {
        let r = avro::decode_expecting(m, avro::DEFAULT_SCHEMA_ID).unwrap();
        out.clear();
        avro::encode(&r, avro::DEFAULT_SCHEMA_ID, &mut out);
    });
    let mut attributor: Attributor<()> = Attributor::new(index.clone(), None, Duration::ZERO);
    let mut ready = Vec::with_capacity(1);
    let now = Instant::now();
    let mut exact = 0u64;
    let attribute = rate(&messages, |m| {
        let r = avro::decode_expecting(m, avro::DEFAULT_SCHEMA_ID).unwrap();
        attributor.push(r, (), now, &mut ready);
        for (flow, ()) in ready.drain(..) {
            exact += u64::from(flow.remote.identity.is_some());
            out.clear();
            enriched_avro::encode(&flow, enriched_avro::DEFAULT_SCHEMA_ID, &mut out);
        }
    });
    assert_eq!(attributor.held(), 0);
    let dir = std::env::temp_dir().join(format!("flowlog-bench-enrich-{}", std::process::id()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut sink = runtime
        .block_on(ParquetSink::open(ParquetSettings::new(
            dir.display().to_string(),
        )))
        .unwrap();
    let start = Instant::now();
    for m in &messages {
        let r = avro::decode_expecting(m, avro::DEFAULT_SCHEMA_ID).unwrap();
        attributor.push(r, (), now, &mut ready);
        for (flow, ()) in ready.drain(..) {
            out.clear();
            enriched_avro::encode(&flow, enriched_avro::DEFAULT_SCHEMA_ID, &mut out);
            sink.write(&flow).unwrap();
        }
    }
    runtime.block_on(sink.roll()).unwrap();
    let with_parquet = n as f64 / start.elapsed().as_secs_f64();
    assert_eq!(sink.durable(), n as u64);
    let _ = std::fs::remove_dir_all(&dir);
    println!("remote ends exact: {exact} of {n} (the rest started in a gap between two owners)");
    println!("flows/s on one core:");
    println!("  baseline (decode + re-encode raw)      {baseline:>12.0}");
    println!(
        "  attribute (decode, 2 lookups, encode)  {attribute:>12.0}  ({:.2}× the baseline's time)",
        baseline / attribute
    );
    println!(
        "  attribute + Parquet write and roll     {with_parquet:>12.0}  ({:.2}× the baseline's time)",
        baseline / with_parquet
    );
}
