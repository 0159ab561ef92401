//! Parquet output throughput and size on one core (`cargo bench -p flowlog-enricher --bench
//! parquet_write`; a plain harness, no criterion, to keep builds light): writes a minute of
//! synthetic but realistically repetitive enriched flows (200 hosts, 2,000 remote addresses,
//! one pod identity per local address, exact/ambiguous/unknown remote ends) through
//! `ParquetSink` into a temporary directory, and prints flows/s for `write()`, for the whole
//! path including encoding and the final roll, and the bytes per flow on disk.
//! The enricher's target is ≥ 200k flows/s/core Kafka-to-Kafka; this output must not be the
//! bottleneck. The measured figures and their runs are in `benches/RESULTS.md` (run under
//! `valgrind --tool=callgrind` for instruction counts that do not depend on the VM's noise).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use flowlog_enricher::storage::{ParquetSettings, ParquetSink};
use flowlog_record::{
    enriched::{Endpoint, EnrichedFlow, Identity, IdentityKind, Workload},
    record::{FlowRecord, Outcome},
};

/// Flows written by `cargo bench`; `cargo test --benches` runs the target without `--bench`,
/// and writes only [`SMOKE_FLOWS`] (a smoke run).
const FLOWS: u64 = 1_000_000;
const SMOKE_FLOWS: u64 = 10_000;

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pod(i: u64) -> Arc<Identity> {
    Arc::new(Identity {
        kind: IdentityKind::Pod,
        name: format!("svc{}-7d9f8-{i:05}", i % 40),
        namespace: Some(format!("ns{}", i % 8)),
        workload: Some(Workload {
            kind: "Deployment".into(),
            name: format!("svc{}", i % 40),
        }),
        labels: BTreeMap::from([
            ("app".to_string(), format!("svc{}", i % 40)),
            ("team".to_string(), format!("team{}", i % 5)),
        ]),
        node: Some(format!("node-{}", i % 200)),
        zone: Some(format!("eu-west-1{}", ["a", "b", "c"][(i % 3) as usize])),
        region: Some("eu-west-1".into()),
        account: Some("123456789012".into()),
        vpc: Some("vpc-0a1b".into()),
        subnet: Some(format!("subnet-0{}", i % 6)),
        instance_id: Some(format!("i-0123456789ab{:05}", i % 200)),
        container_id: Some(format!("containerd://{:016x}", i.wrapping_mul(0x9e37_79b9))),
        pod_uid: Some(format!("6f1c2d3e-0000-4000-8000-{i:012}")),
        source: "kubernetes".into(),
    })
}

fn main() {
    let n = if std::env::args().any(|a| a == "--bench") {
        FLOWS
    } else {
        SMOKE_FLOWS
    };
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let pods: Vec<Arc<Identity>> = (0..2_000).map(pod).collect();
    let t0: u64 = 1_795_647_600_000_000_000;
    let flows: Vec<EnrichedFlow> = (0..n)
        .map(|i| {
            let host = rng.below(200);
            let remote = rng.below(2_000);
            let end_ns = t0 + i * 60_000; // a minute in all, in order
            let status = rng.below(10);
            let remote_end = match status {
                0..=6 => Endpoint::exact(pods[remote as usize].clone()),
                7 => Endpoint::ambiguous(&[pods[0].clone(), pods[1].clone()]),
                _ => Endpoint::unknown(),
            };
            EnrichedFlow {
                flow: FlowRecord {
                    flow_id: rng.next(),
                    host: format!("ip-10-0-{}-{}", host / 250, host % 250),
                    start_ns: end_ns - rng.below(5_000_000_000),
                    end_ns,
                    local_addr: IpAddr::V4(Ipv4Addr::new(10, 0, (host / 250) as u8, host as u8)),
                    local_port: 32_768 + rng.below(28_000) as u16,
                    remote_addr: IpAddr::V4(Ipv4Addr::new(
                        10,
                        1,
                        (remote / 250) as u8,
                        (remote % 250) as u8,
                    )),
                    remote_port: [443, 80, 5432, 6379, 9092][rng.below(5) as usize],
                    outcome: Outcome::ALL[(rng.below(20) / 17) as usize],
                    bytes_sent: rng.below(100_000),
                    bytes_received: rng.below(1_000_000),
                    segs_sent: rng.below(200),
                    segs_received: rng.below(800),
                    retransmits: rng.below(20) / 18,
                    resets_received: rng.below(20) / 19,
                    srtt_us: 100 + rng.below(5_000) as u32,
                    min_rtt_us: 50 + rng.below(1_000) as u32,
                    pid: Some(1_000 + rng.below(30_000) as u32),
                    comm: Some(format!("svc{}", host % 40)),
                    cgroup_id: Some(10_000 + host),
                    ..FlowRecord::default()
                },
                local: Endpoint::exact(pods[host as usize].clone()),
                remote: remote_end,
                enriched_ns: end_ns + 300_000_000,
            }
        })
        .collect();

    let dir = std::env::temp_dir().join(format!("flowlog-bench-parquet-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (write_time, total_time) = rt.block_on(async {
        let mut sink = ParquetSink::open(ParquetSettings {
            roll_interval: Duration::from_secs(3600),
            ..ParquetSettings::new(dir.to_str().unwrap())
        })
        .await
        .unwrap();
        let start = Instant::now();
        let mut in_write = Duration::ZERO;
        for chunk in flows.chunks(1_000) {
            let t = Instant::now();
            for f in chunk {
                sink.write(f).unwrap();
            }
            in_write += t.elapsed();
            sink.maybe_roll(Instant::now()).await.unwrap();
        }
        sink.roll().await.unwrap();
        assert_eq!(sink.durable(), n);
        (in_write, start.elapsed())
    });
    let mut bytes = 0;
    let mut files = 0;
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                bytes += e.metadata().unwrap().len();
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "{n} flows: write() {:.0} flows/s; write + maybe_roll + roll (encode, zstd, fsync) {:.0} flows/s; \
         {files} files, {bytes} bytes, {:.1} bytes/flow",
        rate(write_time),
        rate(total_time),
        bytes as f64 / n as f64
    );
}
