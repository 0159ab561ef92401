//! The Avro codec for Kafka: a [`FlowRecord`] as an Avro binary datum of
//! `schemas/flow_record.v2.avsc` ([`SCHEMA_V2`], the version [`encode`] writes; [`decode_with`]
//! also reads version 1, [`SCHEMA_V1`]) in the Confluent wire format (magic byte 0,
//! 4-byte big-endian schema-registry id, datum), so that Schema-Registry-aware consumers (Kafka
//! Connect, ClickHouse `AvroConfluent`, Flink, fastavro) read it; and the message [`key`].
//!
//! The encoder writes the datum directly (zig-zag varints, length-prefixed bytes) instead of
//! building an `apache_avro::types::Value` tree per record: it runs on the agent's hot path, and
//! the tree costs allocations per field. What keeps this hand-written layout honest is the test
//! suite: every encoded datum is decoded by apache-avro's generic reader with the `.avsc` file and
//! compared with apache-avro's own encoding of the same values.
//!
//! Unsigned integers of the record travel as the two's-complement bits of the signed Avro type
//! (`flow_id` and `cgroup_id` as `long`; `seq`, `srtt_us`, `min_rtt_us`, `pid` as `int`), so
//! every value round-trips exactly; the schema's docs say so for other readers.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::record::{Direction, Family, FlowRecord, Outcome};

/// The text of schema version 1 (`schemas/flow_record.v1.avsc`), which agents before adoption
/// wrote; [`decode_with`] reads it.
pub const SCHEMA_V1: &str = include_str!("../../schemas/flow_record.v1.avsc");

/// The text of schema version 2 (`schemas/flow_record.v2.avsc`: version 1 and `adopted`), the
/// schema [`encode`] writes and [`decode`] reads; for registering it in a schema registry or
/// handing it to a reader.
pub const SCHEMA_V2: &str = include_str!("../../schemas/flow_record.v2.avsc");

/// The schema id the agent writes and the enricher reads as version 2 unless told otherwise
/// (`--schema-id`, `--input-schema-id`): the id a schema registry gives the subject's third
/// schema, after `flow_record.v1` (1) and `enriched_flow.v1` (2) registered in that order.
/// With a registry, use the ids it gave (schemas/README.md).
pub const DEFAULT_SCHEMA_ID: u32 = 3;

/// The schema id the enricher reads as version 1 unless told otherwise
/// (`--input-schema-id-v1`): what agents before version 2 wrote by default.
pub const DEFAULT_SCHEMA_ID_V1: u32 = 1;

/// A version of the flow record's schema, `schemas/flow_record.v<N>.avsc`. An Avro datum does
/// not say which version wrote it: the message's schema id does ([`SchemaIds`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    V1,
    V2,
}

/// The schema-registry ids a reader accepts, and the version each names (the registry gives
/// each version of a subject its own id). A reader that knows both reads the records of agents
/// of either version, e.g. during a rolling upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchemaIds {
    pub v1: u32,
    pub v2: u32,
}

impl SchemaIds {
    /// The version `id` names, if it is one of these.
    pub fn version(&self, id: u32) -> Option<Version> {
        if id == self.v2 {
            Some(Version::V2)
        } else if id == self.v1 {
            Some(Version::V1)
        } else {
            None
        }
    }
}

/// First byte of every Confluent-framed message.
pub const MAGIC_BYTE: u8 = 0;

/// Bytes before the datum: the magic byte and the 4-byte schema id.
pub const HEADER_LEN: usize = 5;

/// Why a message could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The message ended before the header or the datum was complete.
    #[error("message truncated: {0}")]
    Truncated(&'static str),
    /// The first byte is not the Confluent magic byte 0: not a Confluent-framed Avro message.
    #[error("wrong magic byte {0:#04x} (expected 0x00): not a Confluent-framed Avro message")]
    WrongMagicByte(u8),
    /// The schema id is not one this reader was told to accept ([`decode_expecting`]).
    #[error("unknown schema id {0}")]
    UnknownSchemaId(u32),
    /// The datum does not follow the schema (bad varint, out-of-range value, unknown enum index,
    /// bad address length, invalid UTF-8, trailing bytes).
    #[error("malformed Avro datum: {0}")]
    Malformed(String),
}

/// Appends `record` to `out` in the Confluent wire format with `schema_id` (the id the schema
/// registry gave `schemas/flow_record.v2.avsc` under the topic's value subject). `out` is not
/// cleared, so one buffer can be reused across records.
pub fn encode(record: &FlowRecord, schema_id: u32, out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + 96 + record.host.len());
    out.push(MAGIC_BYTE);
    out.extend_from_slice(&schema_id.to_be_bytes());
    encode_datum(record, out);
}

/// Appends the bare Avro binary datum of `record` (schema v2), without the Confluent header.
pub fn encode_datum(r: &FlowRecord, out: &mut Vec<u8>) {
    encode_datum_v1(r, out);
    put_bool(out, r.adopted);
}

/// Appends the bare Avro binary datum of `record` as schema v1 wrote it (without `adopted`):
/// the fields every version starts with, which the enriched flow's datum starts with too.
pub fn encode_datum_v1(r: &FlowRecord, out: &mut Vec<u8>) {
    put_long(out, r.flow_id as i64);
    put_bytes(out, r.host.as_bytes());
    put_int(out, r.seq as i32);
    put_long(out, r.start_ns as i64);
    put_long(out, r.end_ns as i64);
    put_int(out, family_index(r.family));
    put_addr(out, r.local_addr);
    put_int(out, i32::from(r.local_port));
    put_addr(out, r.remote_addr);
    put_int(out, i32::from(r.remote_port));
    put_int(out, direction_index(r.direction));
    put_int(out, outcome_index(r.outcome));
    put_long(out, r.bytes_sent as i64);
    put_long(out, r.bytes_received as i64);
    put_long(out, r.segs_sent as i64);
    put_long(out, r.segs_received as i64);
    put_long(out, r.retransmits as i64);
    put_long(out, r.resets_sent as i64);
    put_long(out, r.resets_received as i64);
    put_int(out, r.srtt_us as i32);
    put_int(out, r.min_rtt_us as i32);
    // Unions are ["null", T]: branch 0 is null, branch 1 the value.
    match r.pid {
        None => put_long(out, 0),
        Some(pid) => {
            put_long(out, 1);
            put_int(out, pid as i32);
        }
    }
    match &r.comm {
        None => put_long(out, 0),
        Some(comm) => {
            put_long(out, 1);
            put_bytes(out, comm.as_bytes());
        }
    }
    match r.cgroup_id {
        None => put_long(out, 0),
        Some(id) => {
            put_long(out, 1);
            put_long(out, id as i64);
        }
    }
}

/// Decodes a Confluent-framed message: returns the schema id from the header and the record,
/// reading the datum as schema v2. Checking that the id is one whose schema is v2 is the
/// caller's job (or use [`decode_expecting`] or [`decode_with`]): the id alone does not say
/// which version it is.
pub fn decode(message: &[u8]) -> Result<(u32, FlowRecord), DecodeError> {
    let (id, datum) = split_header(message)?;
    Ok((id, decode_datum(datum)?))
}

/// Splits a Confluent-framed message into its schema id and its datum, checking the magic byte.
pub fn split_header(message: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    let (&magic, rest) = message
        .split_first()
        .ok_or(DecodeError::Truncated("empty message"))?;
    if magic != MAGIC_BYTE {
        return Err(DecodeError::WrongMagicByte(magic));
    }
    let (id, datum) = rest
        .split_first_chunk::<4>()
        .ok_or(DecodeError::Truncated("schema id"))?;
    Ok((u32::from_be_bytes(*id), datum))
}

/// [`decode`], refusing (before reading the datum) a schema id other than `schema_id`.
pub fn decode_expecting(message: &[u8], schema_id: u32) -> Result<FlowRecord, DecodeError> {
    if let Some(id) = message.get(1..HEADER_LEN)
        && message[0] == MAGIC_BYTE
    {
        let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        if id != schema_id {
            return Err(DecodeError::UnknownSchemaId(id));
        }
    }
    decode(message).map(|(_, record)| record)
}

/// Decodes a Confluent-framed message of either version, by the version its schema id names in
/// `ids`; any other id is refused before the datum is read. A version 1 record reads with
/// `adopted` false, the field's default.
pub fn decode_with(message: &[u8], ids: &SchemaIds) -> Result<FlowRecord, DecodeError> {
    let (id, datum) = split_header(message)?;
    let version = ids.version(id).ok_or(DecodeError::UnknownSchemaId(id))?;
    decode_datum_as(datum, version)
}

/// Decodes a bare schema-v2 datum, which must fill `datum` exactly.
pub fn decode_datum(datum: &[u8]) -> Result<FlowRecord, DecodeError> {
    decode_datum_as(datum, Version::V2)
}

/// Decodes a bare datum of schema `version`, which must fill `datum` exactly.
pub fn decode_datum_as(datum: &[u8], version: Version) -> Result<FlowRecord, DecodeError> {
    let mut r = Reader { buf: datum };
    let mut record = read_record(&mut r)?;
    if version == Version::V2 {
        record.adopted = r.boolean("adopted")?;
    }
    r.finish()?;
    Ok(record)
}

/// Reads the fields of a schema-v1 record from `r` (also the first fields of an enriched flow);
/// `adopted` is left false.
pub(crate) fn read_record(r: &mut Reader<'_>) -> Result<FlowRecord, DecodeError> {
    let flow_id = r.long("flow_id")? as u64;
    let host = r.string("host")?;
    let seq = r.int("seq")? as u32;
    let start_ns = r.long("start_ns")? as u64;
    let end_ns = r.long("end_ns")? as u64;
    let family = match r.int("family")? {
        0 => Family::Ipv4,
        1 => Family::Ipv6,
        i => return Err(bad_symbol("family", i)),
    };
    let local_addr = r.addr("local_addr")?;
    let local_port = r.port("local_port")?;
    let remote_addr = r.addr("remote_addr")?;
    let remote_port = r.port("remote_port")?;
    let direction = match r.int("direction")? {
        0 => Direction::Outbound,
        1 => Direction::Inbound,
        i => return Err(bad_symbol("direction", i)),
    };
    let outcome = match r.int("outcome")? {
        i @ 0..=3 => Outcome::ALL[i as usize],
        i => return Err(bad_symbol("outcome", i)),
    };
    let record = FlowRecord {
        flow_id,
        host,
        seq,
        start_ns,
        end_ns,
        family,
        local_addr,
        local_port,
        remote_addr,
        remote_port,
        direction,
        outcome,
        bytes_sent: r.long("bytes_sent")? as u64,
        bytes_received: r.long("bytes_received")? as u64,
        segs_sent: r.long("segs_sent")? as u64,
        segs_received: r.long("segs_received")? as u64,
        retransmits: r.long("retransmits")? as u64,
        resets_sent: r.long("resets_sent")? as u64,
        resets_received: r.long("resets_received")? as u64,
        srtt_us: r.int("srtt_us")? as u32,
        min_rtt_us: r.int("min_rtt_us")? as u32,
        pid: match r.union_branch("pid")? {
            false => None,
            true => Some(r.int("pid")? as u32),
        },
        comm: match r.union_branch("comm")? {
            false => None,
            true => Some(r.string("comm")?),
        },
        cgroup_id: match r.union_branch("cgroup_id")? {
            false => None,
            true => Some(r.long("cgroup_id")? as u64),
        },
        adopted: false,
    };
    Ok(record)
}

/// The Kafka message key of `record`: the 8-byte big-endian `flow_id`, then the host name's UTF-8
/// bytes (no length, no terminator: the host is the rest of the key). Every record of a flow has
/// the same key, so the partitioner puts them in one partition, in order; the fixed-width prefix
/// makes the key parseable without a separator ([`parse_key`]).
pub fn key(record: &FlowRecord) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + record.host.len());
    key_into(record, &mut key);
    key
}

/// Appends the [`key`] of `record` to `out` (no allocation when `out` is reused, as on the
/// agent's per-record path).
pub fn key_into(record: &FlowRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(&record.flow_id.to_be_bytes());
    out.extend_from_slice(record.host.as_bytes());
}

/// The partition of a key made by [`key`] when records are partitioned by host: the one Kafka's
/// default partitioner (Java's `Utils.toPositive(Utils.murmur2(bytes)) % partitions`) gives the
/// key's host name, so any Kafka client can compute it. Every record of one host then lands in
/// one partition: a producer's batches hold all of its host's records (more records per batch,
/// fewer bytes per record after compression), and a flow's records stay in one partition, in
/// order. `None` if `key` is not one of [`key`] or `partitions` is not positive.
pub fn host_partition(key: &[u8], partitions: i32) -> Option<i32> {
    let host = key.get(8..)?;
    if partitions <= 0 {
        return None;
    }
    let hash = murmur2::murmur2(host, murmur2::KAFKA_SEED) & 0x7fff_ffff;
    Some((hash % partitions as u32) as i32)
}

/// Splits a key made by [`key`] into `(flow_id, host)`; `None` if it is not one.
pub fn parse_key(key: &[u8]) -> Option<(u64, &str)> {
    let (id, host) = key.split_at_checked(8)?;
    let id = u64::from_be_bytes(id.try_into().ok()?);
    Some((id, std::str::from_utf8(host).ok()?))
}

fn family_index(f: Family) -> i32 {
    match f {
        Family::Ipv4 => 0,
        Family::Ipv6 => 1,
    }
}

fn direction_index(d: Direction) -> i32 {
    match d {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    }
}

fn outcome_index(o: Outcome) -> i32 {
    match o {
        Outcome::Closed => 0,
        Outcome::Reset => 1,
        Outcome::Failed => 2,
        Outcome::Open => 3,
    }
}

fn bad_symbol(field: &str, index: i32) -> DecodeError {
    DecodeError::Malformed(format!(
        "{field}: enum index {index} is not a symbol flowlog writes"
    ))
}

/// Zig-zag varint of a 64-bit value (Avro `long`; `int` is the same encoding of a smaller range).
#[inline]
pub(crate) fn put_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[inline]
pub(crate) fn put_int(out: &mut Vec<u8>, v: i32) {
    put_long(out, i64::from(v));
}

#[inline]
pub(crate) fn put_bool(out: &mut Vec<u8>, b: bool) {
    out.push(u8::from(b));
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_long(out, b.len() as i64);
    out.extend_from_slice(b);
}

#[inline]
fn put_addr(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => put_bytes(out, &a.octets()),
        IpAddr::V6(a) => put_bytes(out, &a.octets()),
    }
}

/// A cursor over a datum; each read names the field for the error message.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks that the datum has been read to its end.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(format!(
                "{} trailing bytes after the record",
                self.buf.len()
            )))
        }
    }

    pub(crate) fn long(&mut self, field: &str) -> Result<i64, DecodeError> {
        let mut z: u64 = 0;
        for i in 0..10 {
            let (&b, rest) = self
                .buf
                .split_first()
                .ok_or(DecodeError::Truncated("datum ends inside a number"))?;
            self.buf = rest;
            // The 10th byte may only carry the top bit of 64.
            if i == 9 && b > 1 {
                break;
            }
            z |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
        }
        Err(DecodeError::Malformed(format!(
            "{field}: varint longer than 64 bits"
        )))
    }

    pub(crate) fn int(&mut self, field: &str) -> Result<i32, DecodeError> {
        let v = self.long(field)?;
        i32::try_from(v)
            .map_err(|_| DecodeError::Malformed(format!("{field}: {v} is out of range for an int")))
    }

    pub(crate) fn bytes(&mut self, field: &str) -> Result<&'a [u8], DecodeError> {
        let len = self.long(field)?;
        let len = usize::try_from(len)
            .map_err(|_| DecodeError::Malformed(format!("{field}: negative length {len}")))?;
        let (b, rest) = self
            .buf
            .split_at_checked(len)
            .ok_or(DecodeError::Truncated(
                "datum ends inside a string or bytes",
            ))?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn string(&mut self, field: &str) -> Result<String, DecodeError> {
        let b = self.bytes(field)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|e| DecodeError::Malformed(format!("{field}: invalid UTF-8: {e}")))
    }

    fn addr(&mut self, field: &str) -> Result<IpAddr, DecodeError> {
        let b = self.bytes(field)?;
        if let Ok(a) = <[u8; 4]>::try_from(b) {
            Ok(IpAddr::V4(Ipv4Addr::from(a)))
        } else if let Ok(a) = <[u8; 16]>::try_from(b) {
            Ok(IpAddr::V6(Ipv6Addr::from(a)))
        } else {
            Err(DecodeError::Malformed(format!(
                "{field}: {} address bytes (expected 4 or 16)",
                b.len()
            )))
        }
    }

    fn port(&mut self, field: &str) -> Result<u16, DecodeError> {
        let v = self.int(field)?;
        u16::try_from(v)
            .map_err(|_| DecodeError::Malformed(format!("{field}: port {v} out of range")))
    }

    /// Branch of a `["null", T]` union: `false` for null, `true` for the value.
    /// An Avro boolean: one byte, 0 or 1.
    pub(crate) fn boolean(&mut self, field: &str) -> Result<bool, DecodeError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or(DecodeError::Truncated("datum ends before a boolean"))?;
        self.buf = rest;
        match b {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(DecodeError::Malformed(format!("{field}: boolean byte {b}"))),
        }
    }

    pub(crate) fn union_branch(&mut self, field: &str) -> Result<bool, DecodeError> {
        match self.long(field)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(DecodeError::Malformed(format!(
                "{field}: union branch {b} (expected 0 or 1)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partitions by host match Kafka's default partitioner on the host name: the hashes of
    /// Kafka's own `UtilsTest.testMurmur2` cases (signed there; `toPositive` clears the sign bit),
    /// whatever the flow id in front of the host.
    #[test]
    fn host_partition_is_kafkas_partition_of_the_host_name() {
        let key = |id: u64, host: &[u8]| [&id.to_be_bytes()[..], host].concat();
        for (host, java_murmur2) in [
            (&b"21"[..], -973_932_308_i32),
            (b"foobar", -790_332_482),
            (b"abc", 479_470_107),
        ] {
            let positive = (java_murmur2 as u32 & 0x7fff_ffff) as i32;
            for id in [0, 7, u64::MAX] {
                assert_eq!(host_partition(&key(id, host), i32::MAX), Some(positive));
                assert_eq!(host_partition(&key(id, host), 12), Some(positive % 12));
            }
        }
        assert_eq!(host_partition(b"short", 3), None, "not a flowlog key");
        assert_eq!(host_partition(&key(1, b"h"), 0), None);
    }

    /// Zig-zag varints against the Avro specification's examples and the extremes.
    #[test]
    fn varints_follow_the_spec() {
        let cases: &[(i64, &[u8])] = &[
            (0, &[0x00]),
            (-1, &[0x01]),
            (1, &[0x02]),
            (-2, &[0x03]),
            (2, &[0x04]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
            (
                i64::MAX,
                &[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
            (
                i64::MIN,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for &(v, bytes) in cases {
            let mut out = Vec::new();
            put_long(&mut out, v);
            assert_eq!(out, bytes, "encoding {v}");
            let mut r = Reader { buf: bytes };
            assert_eq!(r.long("x"), Ok(v), "decoding {bytes:?}");
            assert!(r.buf.is_empty());
        }
    }

    #[test]
    fn overlong_varint_is_malformed() {
        let bytes = [0xff; 11];
        let mut r = Reader { buf: &bytes };
        assert!(matches!(r.long("x"), Err(DecodeError::Malformed(_))));
        let bytes = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        let mut r = Reader { buf: &bytes };
        assert!(matches!(r.long("x"), Err(DecodeError::Malformed(_))));
    }
}
