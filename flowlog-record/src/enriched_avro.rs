//! The Avro codec of `flows.enriched`: an [`EnrichedFlow`] as a datum of
//! `schemas/enriched_flow.v2.avsc` ([`ENRICHED_SCHEMA_V2`]) in the Confluent wire format.
//!
//! The enriched schema starts with every field of the flow record's version 1, in the same
//! order, so the datum is the flow record's version 1 datum ([`crate::avro::encode_datum_v1`])
//! followed by the two endpoints and `enriched_ns`, then what later flow record versions added
//! (`adopted`, version 2): fields are only ever added at the end. As with the flow record, the tests decode every datum with
//! apache-avro's generic reader and the `.avsc` file, so the hand-written layout cannot drift.
use std::{collections::BTreeMap, sync::Arc};

use crate::{
    avro::{self, DecodeError, HEADER_LEN, MAGIC_BYTE, Reader, put_bool, put_bytes, put_long},
    enriched::{Attribution, Endpoint, EnrichedFlow, Identity, IdentityKind, Workload},
};

/// The text of `schemas/enriched_flow.v1.avsc`, which enrichers before adoption wrote.
pub const ENRICHED_SCHEMA_V1: &str = include_str!("../../schemas/enriched_flow.v1.avsc");

/// The text of `schemas/enriched_flow.v2.avsc` (version 1 and `adopted`), the schema [`encode`]
/// writes and [`decode_expecting`] reads.
pub const ENRICHED_SCHEMA_V2: &str = include_str!("../../schemas/enriched_flow.v2.avsc");

/// The schema id the enricher writes unless told otherwise (`--output-schema-id`): see
/// [`crate::avro::DEFAULT_SCHEMA_ID`]; `enriched_flow.v1` was 2.
pub const DEFAULT_SCHEMA_ID: u32 = 4;

/// Appends `flow` to `out` in the Confluent wire format with `schema_id` (the registry id of
/// `schemas/enriched_flow.v2.avsc`). `out` is not cleared, so one buffer can be reused.
pub fn encode(flow: &EnrichedFlow, schema_id: u32, out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + 256);
    out.push(MAGIC_BYTE);
    out.extend_from_slice(&schema_id.to_be_bytes());
    encode_datum(flow, out);
}

/// Appends the bare Avro datum of `flow` (enriched schema v2).
pub fn encode_datum(flow: &EnrichedFlow, out: &mut Vec<u8>) {
    avro::encode_datum_v1(&flow.flow, out);
    put_endpoint(out, &flow.local);
    put_endpoint(out, &flow.remote);
    put_long(out, flow.enriched_ns as i64);
    put_bool(out, flow.flow.adopted);
}

/// Decodes a Confluent-framed enriched flow, refusing a schema id other than `schema_id`.
pub fn decode_expecting(message: &[u8], schema_id: u32) -> Result<EnrichedFlow, DecodeError> {
    let (id, datum) = avro::split_header(message)?;
    if id != schema_id {
        return Err(DecodeError::UnknownSchemaId(id));
    }
    decode_datum(datum)
}

/// Decodes a bare enriched-schema-v2 datum, which must fill `datum` exactly.
pub fn decode_datum(datum: &[u8]) -> Result<EnrichedFlow, DecodeError> {
    let mut r = Reader { buf: datum };
    let mut flow = avro::read_record(&mut r)?;
    let local = read_endpoint(&mut r, "local")?;
    let remote = read_endpoint(&mut r, "remote")?;
    let enriched_ns = r.long("enriched_ns")? as u64;
    flow.adopted = r.boolean("adopted")?;
    r.finish()?;
    Ok(EnrichedFlow {
        flow,
        local,
        remote,
        enriched_ns,
    })
}

fn attribution_index(a: Attribution) -> i64 {
    match a {
        Attribution::Exact => 0,
        Attribution::Ambiguous => 1,
        Attribution::Unknown => 2,
    }
}

/// The schema's symbol index of `kind` (declaration order; `unknown` is the last symbol and is
/// never written).
fn kind_index(kind: IdentityKind) -> i64 {
    IdentityKind::ALL
        .iter()
        .position(|k| *k == kind)
        .expect("every kind is in IdentityKind::ALL") as i64
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_opt_str(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        None => put_long(out, 0),
        Some(s) => {
            put_long(out, 1);
            put_str(out, s);
        }
    }
}

/// Writes an Avro array or map header: one block of `len` items (then the caller's items and
/// [`put_end`]); nothing but the terminator for an empty one.
fn put_block(out: &mut Vec<u8>, len: usize) {
    if len > 0 {
        put_long(out, len as i64);
    }
}

fn put_end(out: &mut Vec<u8>) {
    put_long(out, 0);
}

fn put_endpoint(out: &mut Vec<u8>, e: &Endpoint) {
    put_long(out, attribution_index(e.status));
    match &e.identity {
        None => put_long(out, 0),
        Some(identity) => {
            put_long(out, 1);
            put_identity(out, identity);
        }
    }
    put_block(out, e.candidates.len());
    for c in &e.candidates {
        put_str(out, c);
    }
    put_end(out);
}

fn put_identity(out: &mut Vec<u8>, i: &Identity) {
    put_long(out, kind_index(i.kind));
    put_str(out, &i.name);
    put_opt_str(out, &i.namespace);
    match &i.workload {
        None => put_long(out, 0),
        Some(w) => {
            put_long(out, 1);
            put_str(out, &w.kind);
            put_str(out, &w.name);
        }
    }
    put_block(out, i.labels.len());
    for (k, v) in &i.labels {
        put_str(out, k);
        put_str(out, v);
    }
    put_end(out);
    for field in [
        &i.node,
        &i.zone,
        &i.region,
        &i.account,
        &i.vpc,
        &i.subnet,
        &i.instance_id,
        &i.container_id,
        &i.pod_uid,
    ] {
        put_opt_str(out, field);
    }
    put_str(out, &i.source);
}

fn read_opt_str(r: &mut Reader<'_>, field: &str) -> Result<Option<String>, DecodeError> {
    Ok(match r.union_branch(field)? {
        false => None,
        true => Some(r.string(field)?),
    })
}

/// Reads the items of an Avro array or map: blocks of `count` items until a zero count. A
/// negative count is followed by the block's size in bytes (the spec allows writers to say it).
fn read_blocks<'a>(
    r: &mut Reader<'a>,
    field: &str,
    mut item: impl FnMut(&mut Reader<'a>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    loop {
        let count = r.long(field)?;
        if count == 0 {
            return Ok(());
        }
        if count < 0 {
            r.long(field)?;
        }
        for _ in 0..count.unsigned_abs() {
            item(r)?;
        }
    }
}

fn read_endpoint(r: &mut Reader<'_>, field: &str) -> Result<Endpoint, DecodeError> {
    let status = match r.long(field)? {
        i @ 0..=2 => Attribution::ALL[i as usize],
        i => {
            return Err(DecodeError::Malformed(format!(
                "{field}.status: enum index {i} is not a symbol flowlog writes"
            )));
        }
    };
    let identity = match r.union_branch(field)? {
        false => None,
        true => Some(Arc::new(read_identity(r, field)?)),
    };
    let mut candidates = Vec::new();
    read_blocks(r, field, |r| {
        candidates.push(r.string(field)?);
        Ok(())
    })?;
    Ok(Endpoint {
        status,
        identity,
        candidates,
    })
}

fn read_identity(r: &mut Reader<'_>, field: &str) -> Result<Identity, DecodeError> {
    let kind = r.long(field)?;
    let kind = usize::try_from(kind)
        .ok()
        .and_then(|i| IdentityKind::ALL.get(i).copied())
        .ok_or_else(|| {
            DecodeError::Malformed(format!(
                "{field}.identity.kind: enum index {kind} is not a symbol flowlog writes"
            ))
        })?;
    let name = r.string(field)?;
    let namespace = read_opt_str(r, field)?;
    let workload = match r.union_branch(field)? {
        false => None,
        true => Some(Workload {
            kind: r.string(field)?,
            name: r.string(field)?,
        }),
    };
    let mut labels = BTreeMap::new();
    read_blocks(r, field, |r| {
        let k = r.string(field)?;
        let v = r.string(field)?;
        labels.insert(k, v);
        Ok(())
    })?;
    Ok(Identity {
        kind,
        name,
        namespace,
        workload,
        labels,
        node: read_opt_str(r, field)?,
        zone: read_opt_str(r, field)?,
        region: read_opt_str(r, field)?,
        account: read_opt_str(r, field)?,
        vpc: read_opt_str(r, field)?,
        subnet: read_opt_str(r, field)?,
        instance_id: read_opt_str(r, field)?,
        container_id: read_opt_str(r, field)?,
        pod_uid: read_opt_str(r, field)?,
        source: r.string(field)?,
    })
}
