//! Where the compressed bytes go: the captured records are laid out as Kafka v2 RecordBatches
//! of `n` messages (per message: length, attributes, timestamp and offset deltas, key, value, no
//! headers — the layout librdkafka compresses), each batch compressed with the `zstd` crate at
//! librdkafka's default level for zstd (3), plus the 61-byte batch header; then again with one
//! field replaced by a constant on every record. The difference is what that field costs per
//! record once compressed. Offline and deterministic: it explains the broker figure, it does not
//! replace it (the measured batches are checked against the "as captured" row).
use flowlog_record::{avro, record::FlowRecord};

/// librdkafka's zstd level when `compression.level` is left at -1 (rdkafka_topic.c).
pub const LIBRDKAFKA_ZSTD_LEVEL: i32 = 3;
/// A v2 RecordBatch's header: base offset, length, leader epoch, magic, CRC, attributes, last
/// offset delta, first/max timestamps, producer id/epoch, base sequence, record count.
pub const BATCH_HEADER: usize = 61;

/// One variant of the records: a name and what it does to each record (`i` is its index).
pub type Transform = (&'static str, fn(&mut FlowRecord, usize));

/// Fields replaced by a constant, one at a time.
pub const FIELDS: &[Transform] = &[
    ("flow_id (key and value)", |r, _| r.flow_id = 0),
    ("start_ns", |r, _| r.start_ns = 0),
    ("end_ns", |r, _| r.end_ns = 0),
    ("local_port, remote_port", |r, _| {
        r.local_port = 0;
        r.remote_port = 0;
    }),
    ("local_addr, remote_addr", |r, _| {
        r.local_addr = std::net::Ipv4Addr::UNSPECIFIED.into();
        r.remote_addr = std::net::Ipv4Addr::UNSPECIFIED.into();
    }),
    ("bytes, segments, retransmits, resets", |r, _| {
        r.bytes_sent = 0;
        r.bytes_received = 0;
        r.segs_sent = 0;
        r.segs_received = 0;
        r.retransmits = 0;
        r.resets_sent = 0;
        r.resets_received = 0;
    }),
    ("srtt_us, min_rtt_us", |r, _| {
        r.srtt_us = 0;
        r.min_rtt_us = 0;
    }),
    ("pid, comm, cgroup_id", |r, _| {
        r.pid = None;
        r.comm = None;
        r.cgroup_id = None;
    }),
];

/// Bytes per record of `records` in batches of `n` (header included), compressed at `level`.
pub fn bytes_per_record(records: &[FlowRecord], n: usize, level: i32) -> f64 {
    let mut total = 0usize;
    let mut plain = Vec::with_capacity(n * 160);
    let mut body = Vec::with_capacity(256);
    let mut kv = Vec::with_capacity(256);
    for batch in records.chunks(n) {
        plain.clear();
        for (i, r) in batch.iter().enumerate() {
            body.clear();
            body.push(0); // attributes
            put_varint(&mut body, 0); // timestamp delta: produce times within a linger
            put_varint(&mut body, i as i64); // offset delta
            kv.clear();
            avro::key_into(r, &mut kv);
            put_varint(&mut body, kv.len() as i64);
            body.extend_from_slice(&kv);
            kv.clear();
            avro::encode(r, avro::DEFAULT_SCHEMA_ID, &mut kv);
            put_varint(&mut body, kv.len() as i64);
            body.extend_from_slice(&kv);
            put_varint(&mut body, 0); // headers
            put_varint(&mut plain, body.len() as i64);
            plain.extend_from_slice(&body);
        }
        let compressed = zstd::bulk::compress(&plain, level).expect("zstd compresses a buffer");
        total += BATCH_HEADER + compressed.len();
    }
    total as f64 / records.len() as f64
}

/// `records` with `transform` applied to each.
pub fn transformed(
    records: &[FlowRecord],
    transform: fn(&mut FlowRecord, usize),
) -> Vec<FlowRecord> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            transform(&mut r, i);
            r
        })
        .collect()
}

/// Kafka's zig-zag varint (as Avro's).
fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}
