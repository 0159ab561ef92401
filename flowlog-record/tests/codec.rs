//! The Avro codec against the schema file and against apache-avro, a reader we did not write:
//! round trips over every kind of value, the datum as apache-avro reads and writes it with
//! `schemas/flow_record.v2.avsc` (so the hand-written codec and the schema cannot drift apart),
//! version 1 and version 2 data read by readers of the other version, the Kafka key, and the
//! errors malformed messages give; the same for the enriched flow and
//! `schemas/enriched_flow.v2.avsc`.
use std::{net::IpAddr, sync::Arc};

use apache_avro::{
    Schema, reader::datum::GenericDatumReader, types::Value, writer::datum::GenericDatumWriter,
};
use flowlog_record::{
    Attribution, Direction, Endpoint, EnrichedFlow, Family, FlowRecord, Identity, IdentityKind,
    Outcome, Workload,
    avro::{self, DecodeError},
    enriched_avro,
};

const SCHEMA_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../schemas/flow_record.v2.avsc"
);

const SCHEMA_V1_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../schemas/flow_record.v1.avsc"
);

fn schema_file() -> Schema {
    let text = std::fs::read_to_string(SCHEMA_FILE).expect("read schemas/flow_record.v2.avsc");
    Schema::parse_str(&text).expect("parse schemas/flow_record.v2.avsc")
}

fn schema_v1_file() -> Schema {
    let text = std::fs::read_to_string(SCHEMA_V1_FILE).expect("read schemas/flow_record.v1.avsc");
    Schema::parse_str(&text).expect("parse schemas/flow_record.v1.avsc")
}

fn ipv4_record() -> FlowRecord {
    FlowRecord {
        flow_id: 0x1234_5678_9abc_def0,
        host: "ip-10-0-1-23.ec2.internal".to_owned(),
        start_ns: 1_767_225_600_123_456_789,
        end_ns: 1_767_225_600_456_789_012,
        local_addr: "10.0.1.23".parse().unwrap(),
        local_port: 43_512,
        remote_addr: "10.0.7.200".parse().unwrap(),
        remote_port: 443,
        bytes_sent: 517,
        bytes_received: 4_321,
        segs_sent: 9,
        segs_received: 8,
        srtt_us: 312,
        min_rtt_us: 201,
        pid: Some(2_817),
        comm: Some("curl".to_owned()),
        cgroup_id: Some(8_714),
        ..FlowRecord::default()
    }
}

/// Records that between them use every enum symbol, both families, null and non-null process
/// fields, flow ids above `i64::MAX`, and the extremes of every integer field.
fn records() -> Vec<FlowRecord> {
    let v4 = ipv4_record();
    let v6 = FlowRecord {
        flow_id: u64::MAX,
        host: "node-β".to_owned(),
        seq: 3,
        family: Family::Ipv6,
        local_addr: "2001:db8::1".parse().unwrap(),
        remote_addr: "2001:db8:ffff::abcd:2".parse().unwrap(),
        local_port: 8080,
        remote_port: 50_123,
        direction: Direction::Inbound,
        outcome: Outcome::Open,
        pid: None,
        comm: None,
        cgroup_id: None,
        ..v4.clone()
    };
    let reset = FlowRecord {
        flow_id: (i64::MAX as u64) + 1,
        outcome: Outcome::Reset,
        resets_sent: 1,
        pid: Some(1),
        comm: None,
        cgroup_id: Some(u64::MAX),
        ..v4.clone()
    };
    let failed = FlowRecord {
        flow_id: 0,
        host: String::new(),
        outcome: Outcome::Failed,
        bytes_sent: 0,
        bytes_received: 0,
        segs_sent: 3,
        segs_received: 0,
        srtt_us: 0,
        min_rtt_us: 0,
        pid: None,
        comm: Some("a-fifteen-bytes".to_owned()),
        cgroup_id: None,
        ..v4.clone()
    };
    let extremes = FlowRecord {
        flow_id: 0xfedc_ba98_7654_3210,
        seq: u32::MAX,
        start_ns: u64::MAX,
        end_ns: i64::MAX as u64,
        local_addr: "0.0.0.0".parse().unwrap(),
        local_port: u16::MAX,
        remote_addr: "255.255.255.255".parse().unwrap(),
        remote_port: 0,
        bytes_sent: u64::MAX,
        bytes_received: 1 << 63,
        segs_sent: u64::from(u32::MAX),
        segs_received: 1 << 40,
        retransmits: 12_345,
        resets_sent: 2,
        resets_received: 3,
        srtt_us: u32::MAX,
        min_rtt_us: 1 << 31,
        pid: Some(u32::MAX),
        comm: Some(String::new()),
        cgroup_id: Some(0),
        ..v4.clone()
    };
    let adopted = FlowRecord {
        adopted: true,
        ..v4.clone()
    };
    vec![v4, v6, reset, failed, extremes, adopted]
}

/// Version 1 and version 2 data each read by a reader of the other version: apache-avro
/// resolving the writer's schema file against the reader's (a v1 reader skips `adopted`; a v2
/// reader fills its default, false), and the codec's own reader picking the version by the
/// message's schema id.
#[test]
fn each_version_reads_the_others_data() {
    let (v1, v2) = (schema_v1_file(), schema_file());
    let v1_reads_v2 = GenericDatumReader::builder(&v2)
        .reader_schema(&v1)
        .build()
        .unwrap();
    let v2_reads_v1 = GenericDatumReader::builder(&v1)
        .reader_schema(&v2)
        .build()
        .unwrap();
    let ids = avro::SchemaIds { v1: 1, v2: 3 };
    for (i, r) in records().iter().enumerate() {
        let Value::Record(mut fields) = expected_value(r) else {
            unreachable!()
        };
        assert_eq!(fields.pop().map(|f| f.0), Some("adopted".to_owned()));
        let as_v1 = Value::Record(fields.clone());

        let mut v2_datum = Vec::new();
        avro::encode_datum(r, &mut v2_datum);
        let mut datum = &v2_datum[..];
        assert_eq!(v1_reads_v2.read_value(&mut datum).unwrap(), as_v1, "{i}");
        assert!(datum.is_empty());

        let mut v1_datum = Vec::new();
        avro::encode_datum_v1(r, &mut v1_datum);
        let mut datum = &v1_datum[..];
        fields.push(("adopted".to_owned(), Value::Boolean(false)));
        assert_eq!(
            v2_reads_v1.read_value(&mut datum).unwrap(),
            Value::Record(fields),
            "{i}"
        );

        let not_adopted = FlowRecord {
            adopted: false,
            ..r.clone()
        };
        let mut message = vec![0, 0, 0, 0, 1];
        message.extend_from_slice(&v1_datum);
        assert_eq!(avro::decode_with(&message, &ids), Ok(not_adopted), "{i}");
        let mut message = Vec::new();
        avro::encode(r, 3, &mut message);
        assert_eq!(avro::decode_with(&message, &ids), Ok(r.clone()), "{i}");
        let mut message = Vec::new();
        avro::encode(r, 2, &mut message);
        assert_eq!(
            avro::decode_with(&message, &ids),
            Err(DecodeError::UnknownSchemaId(2))
        );
    }
}

/// The Avro value the schema file says `r` is, built from the record here, independently of
/// the codec (unsigned values as their two's-complement bits, as the schema's docs say).
fn expected_value(r: &FlowRecord) -> Value {
    let addr = |a: IpAddr| match a {
        IpAddr::V4(a) => Value::Bytes(a.octets().to_vec()),
        IpAddr::V6(a) => Value::Bytes(a.octets().to_vec()),
    };
    let (family_i, family) = match r.family {
        Family::Ipv4 => (0, "ipv4"),
        Family::Ipv6 => (1, "ipv6"),
    };
    let (direction_i, direction) = match r.direction {
        Direction::Outbound => (0, "outbound"),
        Direction::Inbound => (1, "inbound"),
    };
    let (outcome_i, outcome) = match r.outcome {
        Outcome::Closed => (0, "closed"),
        Outcome::Reset => (1, "reset"),
        Outcome::Failed => (2, "failed"),
        Outcome::Open => (3, "open"),
    };
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
        ("family", Value::Enum(family_i, family.to_owned())),
        ("local_addr", addr(r.local_addr)),
        ("local_port", Value::Int(i32::from(r.local_port))),
        ("remote_addr", addr(r.remote_addr)),
        ("remote_port", Value::Int(i32::from(r.remote_port))),
        ("direction", Value::Enum(direction_i, direction.to_owned())),
        ("outcome", Value::Enum(outcome_i, outcome.to_owned())),
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
    Value::Record(
        fields
            .into_iter()
            .map(|(name, v)| (name.to_owned(), v))
            .collect(),
    )
}

#[test]
fn round_trip() {
    for (i, r) in records().iter().enumerate() {
        let mut out = Vec::new();
        avro::encode(r, 42 + i as u32, &mut out);
        assert_eq!(
            avro::decode(&out),
            Ok((42 + i as u32, r.clone())),
            "record {i}"
        );
        assert_eq!(avro::decode_expecting(&out, 42 + i as u32), Ok(r.clone()));
    }
}

#[test]
fn encode_appends_to_the_buffer() {
    let rs = records();
    let mut out = Vec::new();
    let mut ends = Vec::new();
    for r in &rs {
        avro::encode(r, 7, &mut out);
        ends.push(out.len());
    }
    let mut start = 0;
    for (r, end) in rs.iter().zip(ends) {
        assert_eq!(avro::decode(&out[start..end]), Ok((7, r.clone())));
        start = end;
    }
}

#[test]
fn confluent_header() {
    let mut out = Vec::new();
    avro::encode(&ipv4_record(), 0x0102_0304, &mut out);
    assert_eq!(out[..5], [0, 1, 2, 3, 4]);
}

/// apache-avro's generic reader, given the schema file, reads what the codec wrote as exactly the
/// values the record holds.
#[test]
fn apache_avro_reads_the_datum_with_the_schema_file() {
    let schema = schema_file();
    let reader = GenericDatumReader::builder(&schema).build().unwrap();
    for (i, r) in records().iter().enumerate() {
        let mut out = Vec::new();
        avro::encode(r, 1, &mut out);
        let mut datum = &out[5..];
        let value = reader.read_value(&mut datum).unwrap();
        assert!(
            datum.is_empty(),
            "record {i}: apache-avro left bytes unread"
        );
        assert_eq!(value, expected_value(r), "record {i}");
        assert!(value.validate(&schema), "record {i}");
    }
}

/// apache-avro's writer, given the schema file and the record's values, writes exactly the bytes
/// the codec writes, and the codec decodes them.
#[test]
fn apache_avro_writes_the_same_bytes() {
    let schema = schema_file();
    let writer = GenericDatumWriter::builder(&schema).build().unwrap();
    for (i, r) in records().iter().enumerate() {
        let theirs = writer.write_value_to_vec(expected_value(r)).unwrap();
        let mut ours = Vec::new();
        avro::encode_datum(r, &mut ours);
        assert_eq!(ours, theirs, "record {i}");
        assert_eq!(avro::decode_datum(&theirs), Ok(r.clone()));
    }
}

/// The schema embedded in the crate is the file, and its fields are the record's JSON fields in
/// the same order with the same names.
#[test]
fn schema_fields_are_the_record_fields() {
    assert_eq!(
        avro::SCHEMA_V2,
        std::fs::read_to_string(SCHEMA_FILE).unwrap()
    );
    assert_eq!(
        avro::SCHEMA_V1,
        std::fs::read_to_string(SCHEMA_V1_FILE).unwrap()
    );
    let Schema::Record(schema) = schema_file() else {
        panic!("the schema is not a record");
    };
    assert_eq!(schema.name.fullname(None), "flowlog.FlowRecord");
    assert!(schema.doc.as_deref().is_some_and(|d| !d.is_empty()));
    let json = serde_json::to_value(ipv4_record()).unwrap();
    let json_names: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let avro_names: Vec<&str> = schema.fields.iter().map(|f| f.name.as_str()).collect();
    let mut sorted = avro_names.clone();
    sorted.sort_unstable();
    // serde_json's map is sorted (no preserve_order feature): compare as sets, then the order
    // against the struct's declaration order, which `expected_value` spells out.
    assert_eq!(sorted, json_names);
    let Value::Record(expected) = expected_value(&ipv4_record()) else {
        unreachable!()
    };
    let expected_order: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(avro_names, expected_order);
    for f in &schema.fields {
        assert!(
            f.doc.as_deref().is_some_and(|d| d.len() > 20),
            "field {} has no doc",
            f.name
        );
    }
}

/// The size of a typical IPv4 record before compression, counted field by field from the Avro
/// encoding rules (varints of 7 bits a byte after zig-zag).
#[test]
fn typical_ipv4_record_size() {
    let mut out = Vec::new();
    avro::encode(&ipv4_record(), 1, &mut out);
    let expected = 5 // magic byte + schema id
        + 9 // flow_id 0x1234_5678_9abc_def0 (62 bits after zig-zag; a random id takes 9 or 10)
        + 1 + 25 // host: length + "ip-10-0-1-23.ec2.internal"
        + 1 // seq 0
        + 9 + 9 // start_ns, end_ns (~1.8e18 → 62 bits)
        + 1 // family
        + 1 + 4 + 3 // local_addr (length + 4), local_port 43512 (17 bits)
        + 1 + 4 + 2 // remote_addr, remote_port 443
        + 1 + 1 // direction, outcome
        + 2 + 2 + 1 + 1 + 1 + 1 + 1 // bytes 517, 4321; segs 9, 8; retransmits, resets 0
        + 2 + 2 // srtt_us 312, min_rtt_us 201
        + 1 + 2 // pid: branch + 2817
        + 1 + 1 + 4 // comm: branch + length + "curl"
        + 1 + 3 // cgroup_id: branch + 8714
        + 1; // adopted
    assert_eq!(out.len(), expected);
    assert_eq!(out.len(), 104);
}

#[test]
fn key_is_flow_id_then_host() {
    let r = ipv4_record();
    let k = avro::key(&r);
    assert_eq!(k[..8], 0x1234_5678_9abc_def0u64.to_be_bytes());
    assert_eq!(&k[8..], b"ip-10-0-1-23.ec2.internal");
    assert_eq!(avro::parse_key(&k), Some((r.flow_id, r.host.as_str())));
    // Every record of a flow has the same key; another flow or host has another.
    let later = FlowRecord {
        seq: 5,
        outcome: Outcome::Open,
        bytes_sent: 1,
        ..r.clone()
    };
    assert_eq!(avro::key(&later), k);
    assert_ne!(
        avro::key(&FlowRecord {
            flow_id: 1,
            ..r.clone()
        }),
        k
    );
    assert_ne!(
        avro::key(&FlowRecord {
            host: "other".into(),
            ..r
        }),
        k
    );
    assert_eq!(avro::parse_key(b"short"), None);
}

#[test]
fn empty_and_short_messages_are_truncated() {
    assert!(matches!(avro::decode(&[]), Err(DecodeError::Truncated(_))));
    assert!(matches!(
        avro::decode(&[0, 0, 0]),
        Err(DecodeError::Truncated(_))
    ));
    let mut out = Vec::new();
    avro::encode(&ipv4_record(), 9, &mut out);
    for len in 0..out.len() {
        assert!(
            matches!(avro::decode(&out[..len]), Err(DecodeError::Truncated(_))),
            "cut at {len}: {:?}",
            avro::decode(&out[..len])
        );
    }
}

#[test]
fn wrong_magic_byte() {
    let mut out = Vec::new();
    avro::encode(&ipv4_record(), 9, &mut out);
    out[0] = 1;
    assert_eq!(avro::decode(&out), Err(DecodeError::WrongMagicByte(1)));
    assert_eq!(
        avro::decode(b"{\"flow_id\":1}"),
        Err(DecodeError::WrongMagicByte(b'{'))
    );
}

#[test]
fn unexpected_schema_id() {
    let mut out = Vec::new();
    avro::encode(&ipv4_record(), 9, &mut out);
    assert_eq!(
        avro::decode_expecting(&out, 10),
        Err(DecodeError::UnknownSchemaId(9))
    );
}

#[test]
fn malformed_datums() {
    let mut good = Vec::new();
    avro::encode(&ipv4_record(), 9, &mut good);
    let malformed = |bytes: &[u8]| {
        let r = avro::decode(bytes);
        assert!(matches!(r, Err(DecodeError::Malformed(_))), "{r:?}");
    };
    // Trailing bytes after a complete record.
    let mut trailing = good.clone();
    trailing.push(0);
    malformed(&trailing);
    // flow_id as an endless varint.
    malformed(&[
        0, 0, 0, 0, 9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ]);
    // A negative host length (zig-zag 1 = -1).
    malformed(&[0, 0, 0, 0, 9, 0x02, 0x01]);
    // Invalid UTF-8 in the host.
    malformed(&[0, 0, 0, 0, 9, 0x02, 0x04, 0xff, 0xfe, 0x00]);
    // A family index beyond the symbols flowlog writes (2 = "unknown", then 3).
    let family_at = 5 + 8 + 1 + 1 + 25 + 1 + 9 + 9; // header, flow_id, host, seq, times
    assert_eq!(good[family_at], 0, "layout of the test record changed");
    for index in [4u8, 6] {
        let mut bad = good.clone();
        bad[family_at] = index;
        malformed(&bad);
    }
    // An address of 5 bytes.
    let mut bad = good.clone();
    bad[family_at + 1] = 10;
    bad.insert(family_at + 2, 0);
    malformed(&bad);
    // Random garbage after a valid header never panics and never decodes to a record it was not.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..2_000 {
        let mut msg = vec![0, 0, 0, 0, 1];
        for _ in 0..(state % 120) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            msg.push(state as u8);
        }
        if let Ok((_, r)) = avro::decode(&msg) {
            let mut again = Vec::new();
            avro::encode(&r, 1, &mut again);
            assert_eq!(
                again[5..],
                msg[5..],
                "garbage decoded to a different record"
            );
        }
    }
}

// ---- flows.enriched: the enriched flow's codec against schemas/enriched_flow.v2.avsc ----

const ENRICHED_SCHEMA_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../schemas/enriched_flow.v2.avsc"
);

fn enriched_schema_file() -> Schema {
    let text = std::fs::read_to_string(ENRICHED_SCHEMA_FILE).expect("read enriched_flow.v2.avsc");
    Schema::parse_str(&text).expect("parse schemas/enriched_flow.v2.avsc")
}

fn pod() -> Arc<Identity> {
    Arc::new(Identity {
        kind: IdentityKind::Pod,
        name: "checkout-7d9f8b6c5-x2x4q".to_owned(),
        namespace: Some("shop".to_owned()),
        workload: Some(Workload {
            kind: "Deployment".to_owned(),
            name: "checkout".to_owned(),
        }),
        labels: [("app", "checkout"), ("team", "payments")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        node: Some("node-a".to_owned()),
        zone: Some("eu-west-1a".to_owned()),
        region: Some("eu-west-1".to_owned()),
        account: None,
        vpc: None,
        subnet: None,
        instance_id: None,
        container_id: None,
        pod_uid: Some("5f1c7c4e-1b6a-4c1e-9d55-0c4f4e9b2a11".to_owned()),
        source: "kubernetes".to_owned(),
    })
}

/// Enriched flows that between them use every attribution status and every identity kind,
/// empty and non-empty labels and candidates, and every flow record of [`records`].
fn enriched_flows() -> Vec<EnrichedFlow> {
    let kinds = IdentityKind::ALL.iter().map(|&kind| {
        Arc::new(Identity {
            kind,
            name: format!("{}-1", kind.as_str()),
            labels: [("env".to_owned(), "prod".to_owned())].into(),
            source: "static".to_owned(),
            ..Identity::default()
        })
    });
    let mut ends: Vec<Endpoint> = vec![
        Endpoint::exact(pod()),
        Endpoint::unknown(),
        Endpoint::ambiguous(&[pod(), Arc::new(Identity::default())]),
    ];
    ends.extend(kinds.map(Endpoint::exact));
    let mut out = Vec::new();
    for (i, flow) in records().into_iter().cycle().take(ends.len()).enumerate() {
        out.push(EnrichedFlow {
            flow,
            local: ends[(i + 1) % ends.len()].clone(),
            remote: ends[i].clone(),
            enriched_ns: 1_767_225_601_000_000_000 + i as u64,
        });
    }
    out
}

/// The Avro value the enriched schema file says `e` is, built here independently of the codec.
fn expected_enriched_value(e: &EnrichedFlow) -> Value {
    let Value::Record(mut fields) = expected_value(&e.flow) else {
        unreachable!()
    };
    // The flow record's version 1 fields, the enriched ones, then what version 2 added.
    let adopted = fields.pop().expect("the flow record's last field");
    assert_eq!(adopted.0, "adopted");
    let nullable = |v: Option<Value>| match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(v)),
    };
    let opt = |s: &Option<String>| nullable(s.clone().map(Value::String));
    let identity = |i: &Identity| {
        Value::Record(
            [
                (
                    "kind",
                    Value::Enum(
                        IdentityKind::ALL.iter().position(|k| *k == i.kind).unwrap() as u32,
                        i.kind.as_str().to_owned(),
                    ),
                ),
                ("name", Value::String(i.name.clone())),
                ("namespace", opt(&i.namespace)),
                (
                    "workload",
                    nullable(i.workload.as_ref().map(|w| {
                        Value::Record(vec![
                            ("kind".to_owned(), Value::String(w.kind.clone())),
                            ("name".to_owned(), Value::String(w.name.clone())),
                        ])
                    })),
                ),
                (
                    "labels",
                    Value::Map(
                        i.labels
                            .iter()
                            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                            .collect(),
                    ),
                ),
                ("node", opt(&i.node)),
                ("zone", opt(&i.zone)),
                ("region", opt(&i.region)),
                ("account", opt(&i.account)),
                ("vpc", opt(&i.vpc)),
                ("subnet", opt(&i.subnet)),
                ("instance_id", opt(&i.instance_id)),
                ("container_id", opt(&i.container_id)),
                ("pod_uid", opt(&i.pod_uid)),
                ("source", Value::String(i.source.clone())),
            ]
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect(),
        )
    };
    let endpoint = |end: &Endpoint| {
        let (index, symbol) = match end.status {
            Attribution::Exact => (0, "exact"),
            Attribution::Ambiguous => (1, "ambiguous"),
            Attribution::Unknown => (2, "unknown"),
        };
        Value::Record(vec![
            ("status".to_owned(), Value::Enum(index, symbol.to_owned())),
            (
                "identity".to_owned(),
                nullable(end.identity.as_deref().map(identity)),
            ),
            (
                "candidates".to_owned(),
                Value::Array(
                    end.candidates
                        .iter()
                        .map(|c| Value::String(c.clone()))
                        .collect(),
                ),
            ),
        ])
    };
    fields.push(("local".to_owned(), endpoint(&e.local)));
    fields.push(("remote".to_owned(), endpoint(&e.remote)));
    fields.push(("enriched_ns".to_owned(), Value::Long(e.enriched_ns as i64)));
    fields.push(adopted);
    Value::Record(fields)
}

#[test]
fn enriched_round_trip() {
    for (i, e) in enriched_flows().iter().enumerate() {
        let mut out = Vec::new();
        enriched_avro::encode(e, 9, &mut out);
        assert_eq!(out[..5], [0, 0, 0, 0, 9]);
        assert_eq!(
            enriched_avro::decode_expecting(&out, 9),
            Ok(e.clone()),
            "flow {i}"
        );
        assert_eq!(
            enriched_avro::decode_expecting(&out, 10),
            Err(DecodeError::UnknownSchemaId(9))
        );
        assert!(enriched_avro::decode_expecting(&out[..out.len() - 1], 9).is_err());
    }
}

/// apache-avro reads what the enriched codec wrote, with the schema file, as exactly the values
/// of the flow; and writes exactly the same bytes from those values.
#[test]
fn apache_avro_agrees_with_the_enriched_codec() {
    let schema = enriched_schema_file();
    let reader = GenericDatumReader::builder(&schema).build().unwrap();
    let writer = GenericDatumWriter::builder(&schema).build().unwrap();
    for (i, e) in enriched_flows().iter().enumerate() {
        let mut ours = Vec::new();
        enriched_avro::encode_datum(e, &mut ours);
        let mut datum = &ours[..];
        let value = reader.read_value(&mut datum).unwrap();
        assert!(datum.is_empty(), "flow {i}: apache-avro left bytes unread");
        assert_eq!(value, expected_enriched_value(e), "flow {i}");
        let theirs = writer
            .write_value_to_vec(expected_enriched_value(e))
            .unwrap();
        // apache-avro keeps a map in a HashMap, so it writes labels in any order: the bytes
        // are comparable only where no map has two entries.
        let many_labels = [&e.local, &e.remote]
            .iter()
            .any(|end| end.identity.as_ref().is_some_and(|i| i.labels.len() > 1));
        if !many_labels {
            assert_eq!(ours, theirs, "flow {i}");
        }
        assert_eq!(enriched_avro::decode_datum(&theirs), Ok(e.clone()));
    }
}

/// The enriched schema embeds the flow record's version 1 fields unchanged (same names, types
/// and docs, in the same order), then its own, then the fields later flow record versions added,
/// unchanged; and documents every field it adds.
#[test]
fn enriched_schema_starts_with_the_flow_record() {
    assert_eq!(
        enriched_avro::ENRICHED_SCHEMA_V2,
        std::fs::read_to_string(ENRICHED_SCHEMA_FILE).unwrap()
    );
    let v1: serde_json::Value = serde_json::from_str(avro::SCHEMA_V1).unwrap();
    let v2: serde_json::Value = serde_json::from_str(avro::SCHEMA_V2).unwrap();
    let enriched: serde_json::Value =
        serde_json::from_str(enriched_avro::ENRICHED_SCHEMA_V2).unwrap();
    let raw_fields = v1["fields"].as_array().unwrap();
    let later_fields = &v2["fields"].as_array().unwrap()[raw_fields.len()..];
    let enriched_fields = enriched["fields"].as_array().unwrap();
    assert_eq!(enriched["name"], "EnrichedFlow");
    assert_eq!(enriched["namespace"], "flowlog");
    assert_eq!(&enriched_fields[..raw_fields.len()], &raw_fields[..]);
    let added: Vec<&str> = enriched_fields[raw_fields.len()..]
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(added, ["local", "remote", "enriched_ns", "adopted"]);
    assert_eq!(
        &enriched_fields[enriched_fields.len() - later_fields.len()..],
        later_fields
    );
    let Schema::Record(schema) = enriched_schema_file() else {
        panic!("not a record");
    };
    for f in &schema.fields {
        assert!(f.doc.as_deref().is_some_and(|d| d.len() > 10), "{}", f.name);
    }
}
