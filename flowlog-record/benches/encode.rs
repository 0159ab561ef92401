//! Encoding throughput of the Avro codec beside serde_json on the same records, in one run, so
//! the ratio holds whatever the machine is doing (`cargo bench -p flowlog-record`; a plain
//! harness, no criterion, to keep builds light). Prints records/s for each encoder on one core,
//! the ratio, and bytes per record. Issue 4's target: ≥ 1M records/s/core for encoding.
//! Also measured: apache-avro's generic path (a `Value` tree per record, written against the
//! parsed schema), the alternative to the codec's direct writer.
use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use apache_avro::{Schema, types::Value, writer::datum::GenericDatumWriter};
use flowlog_record::{Direction, Family, FlowRecord, Outcome, avro};

/// `r` as an apache-avro `Value` tree, the way a generic encoder would build it.
fn value(r: &FlowRecord) -> Value {
    let addr = |a: IpAddr| match a {
        IpAddr::V4(a) => Value::Bytes(a.octets().to_vec()),
        IpAddr::V6(a) => Value::Bytes(a.octets().to_vec()),
    };
    let symbol = |i: u32, s: &str| Value::Enum(i, s.to_owned());
    let nullable = |v: Option<Value>| match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(v)),
    };
    let fields = vec![
        ("flow_id", Value::Long(r.flow_id as i64)),
        ("host", Value::String(r.host.clone())),
        ("seq", Value::Int(r.seq as i32)),
        ("start_ns", Value::Long(r.start_ns as i64)),
        ("end_ns", Value::Long(r.end_ns as i64)),
        (
            "family",
            match r.family {
                Family::Ipv4 => symbol(0, "ipv4"),
                Family::Ipv6 => symbol(1, "ipv6"),
            },
        ),
        ("local_addr", addr(r.local_addr)),
        ("local_port", Value::Int(i32::from(r.local_port))),
        ("remote_addr", addr(r.remote_addr)),
        ("remote_port", Value::Int(i32::from(r.remote_port))),
        (
            "direction",
            match r.direction {
                Direction::Outbound => symbol(0, "outbound"),
                Direction::Inbound => symbol(1, "inbound"),
            },
        ),
        ("outcome", symbol(r.outcome as u32, r.outcome.as_str())),
        ("bytes_sent", Value::Long(r.bytes_sent as i64)),
        ("bytes_received", Value::Long(r.bytes_received as i64)),
        ("segs_sent", Value::Long(r.segs_sent as i64)),
        ("segs_received", Value::Long(r.segs_received as i64)),
        ("retransmits", Value::Long(r.retransmits as i64)),
        ("resets_sent", Value::Long(r.resets_sent as i64)),
        ("resets_received", Value::Long(r.resets_received as i64)),
        ("srtt_us", Value::Int(r.srtt_us as i32)),
        ("min_rtt_us", Value::Int(r.min_rtt_us as i32)),
        ("pid", nullable(r.pid.map(|p| Value::Int(p as i32)))),
        ("comm", nullable(r.comm.clone().map(Value::String))),
        (
            "cgroup_id",
            nullable(r.cgroup_id.map(|c| Value::Long(c as i64))),
        ),
        ("adopted", Value::Boolean(r.adopted)),
    ];
    Value::Record(fields.into_iter().map(|(n, v)| (n.to_owned(), v)).collect())
}

/// Records shaped like the capture's: mostly IPv4, short flows, random 64-bit ids, a mix of
/// outcomes, some without process context. Deterministic (xorshift) so runs compare.
fn records(n: usize) -> Vec<FlowRecord> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..n)
        .map(|i| {
            let r = next();
            let v6 = r % 5 == 0;
            let (family, local, remote) = if v6 {
                (
                    Family::Ipv6,
                    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, (r >> 8) as u16, 2)),
                )
            } else {
                (
                    Family::Ipv4,
                    IpAddr::V4(Ipv4Addr::new(10, 0, 1, 23)),
                    IpAddr::V4(Ipv4Addr::new(10, 0, (r >> 16) as u8, (r >> 24) as u8)),
                )
            };
            let start = 1_767_225_600_000_000_000 + (i as u64) * 1_000_003;
            let with_process = r % 7 != 0;
            FlowRecord {
                flow_id: next(),
                host: "ip-10-0-1-23.ec2.internal".to_owned(),
                seq: (r % 3) as u32,
                start_ns: start,
                end_ns: start + (r >> 40) % 5_000_000_000,
                family,
                local_addr: local,
                local_port: 32_768 + (r % 28_000) as u16,
                remote_addr: remote,
                remote_port: [443, 80, 5432, 6379, 9092][(r % 5) as usize],
                direction: if r % 4 == 0 {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                },
                outcome: Outcome::ALL[((r >> 4) % 4) as usize],
                bytes_sent: (r >> 20) % 20_000,
                bytes_received: (r >> 30) % 200_000,
                segs_sent: (r >> 12) % 40,
                segs_received: (r >> 18) % 60,
                retransmits: u64::from(r % 50 == 0),
                resets_sent: u64::from(r % 97 == 0),
                resets_received: u64::from(r % 89 == 0),
                srtt_us: (r % 20_000) as u32,
                min_rtt_us: (r % 10_000) as u32,
                pid: with_process.then_some((r % 4_000_000) as u32),
                comm: with_process
                    .then(|| ["curl", "postgres", "envoy", "java"][(r % 4) as usize].to_owned()),
                cgroup_id: with_process.then_some(4_000 + r % 10_000),
                ..FlowRecord::default()
            }
        })
        .collect()
}

/// Encodes all of `records` into a reused buffer, over and over for about `time`; returns
/// records/s and the bytes of one pass.
fn measure(
    records: &[FlowRecord],
    time: Duration,
    mut encode: impl FnMut(&FlowRecord, &mut Vec<u8>),
) -> (f64, usize) {
    let mut buf = Vec::with_capacity(512);
    let mut bytes = 0;
    for r in records {
        buf.clear();
        encode(r, &mut buf);
        bytes += buf.len();
    }
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < time {
        for r in records {
            buf.clear();
            encode(black_box(r), &mut buf);
            black_box(&buf);
        }
        done += records.len() as u64;
    }
    (done as f64 / start.elapsed().as_secs_f64(), bytes)
}

fn main() {
    // `cargo test --benches` runs bench targets with no `--bench` flag: keep that a smoke run.
    let quick = !std::env::args().any(|a| a == "--bench");
    let time = Duration::from_millis(if quick { 50 } else { 2_000 });
    let records = records(10_000);
    let n = records.len() as f64;
    let schema = Schema::parse_str(avro::SCHEMA_V2).expect("schemas/flow_record.v2.avsc parses");
    let generic = GenericDatumWriter::builder(&schema)
        .build()
        .expect("a writer for the schema");
    // Both Avro encoders write the same bytes.
    for r in &records[..100] {
        let mut ours = Vec::new();
        avro::encode_datum(r, &mut ours);
        let theirs = generic
            .write_value_to_vec(value(r))
            .expect("the record fits the schema");
        assert_eq!(ours, theirs);
    }
    let mut rounds = Vec::new();
    for _ in 0..if quick { 1 } else { 3 } {
        let (avro_rate, avro_bytes) = measure(&records, time, |r, out| {
            avro::encode(r, avro::DEFAULT_SCHEMA_ID, out)
        });
        let (json_rate, json_bytes) = measure(&records, time, |r, out| {
            serde_json::to_writer(&mut *out, r).expect("a FlowRecord always serializes");
        });
        let (generic_rate, _) = measure(&records, time, |r, out| {
            out.push(avro::MAGIC_BYTE);
            out.extend_from_slice(&1u32.to_be_bytes());
            generic
                .write_value(out, value(r))
                .expect("the record fits the schema");
        });
        rounds.push((avro_rate, json_rate));
        println!(
            "apache-avro generic Value path: {generic_rate:>12.0} records/s (direct writer {:.1}x faster)",
            avro_rate / generic_rate
        );
        println!(
            "avro (Confluent-framed): {:>12.0} records/s, {:>6.1} bytes/record | serde_json: {:>12.0} records/s, {:>6.1} bytes/record | ratio {:.1}x",
            avro_rate,
            avro_bytes as f64 / n,
            json_rate,
            json_bytes as f64 / n,
            avro_rate / json_rate
        );
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let avro = median(rounds.iter().map(|r| r.0).collect());
    let json = median(rounds.iter().map(|r| r.1).collect());
    println!(
        "median of {} rounds: avro {avro:.0} records/s, serde_json {json:.0} records/s, ratio {:.1}x",
        rounds.len(),
        avro / json
    );
}
