//! The Arrow (and so Parquet) schema of an enriched flow, and the builder that turns
//! [`EnrichedFlow`]s into record batches of that schema.
//!
//! The columns are made for SQL over files: every [`FlowRecord`] field keeps its name and its
//! unsigned width, the enums and the addresses are strings (`WHERE remote_addr = '10.0.0.1'`
//! works in every engine without a UDF), and each end of the flow is one struct column whose
//! fields are null unless that end was attributed `exact`, so that no guess reads as fact.
//!
//! [`FlowRecord`]: flowlog_record::record::FlowRecord
use std::{
    collections::HashMap,
    fmt::Write as _,
    hash::{BuildHasherDefault, Hasher},
    net::IpAddr,
    sync::{Arc, LazyLock},
};

use arrow_array::{
    ArrayRef, DictionaryArray, MapArray, RecordBatch, StringArray, StructArray, UInt32Array,
    builder::{
        ArrayBuilder as _, BooleanBuilder, ListBuilder, StringBuilder, UInt16Builder,
        UInt32Builder, UInt64Builder,
    },
    new_null_array,
    types::UInt32Type,
};
use arrow_buffer::{NullBufferBuilder, OffsetBuffer, ScalarBuffer};
use arrow_schema::{ArrowError, DataType, Field, Fields, Schema, SchemaRef};
use flowlog_record::{
    enriched::{Attribution, Endpoint, EnrichedFlow, Identity},
    record::{Direction, Family},
};

/// Written into every file's key-value metadata under [`SCHEMA_KEY`], so a reader can tell
/// which layout a file has once the schema evolves.
pub const SCHEMA_VERSION: &str = "enriched_flow.v1";
/// The key-value metadata key that holds [`SCHEMA_VERSION`].
pub const SCHEMA_KEY: &str = "flowlog.schema";

/// The names of the map's inner fields: Parquet's canonical `key_value { key, value }` (what
/// the format spec and pyarrow write), rather than Arrow's `entries { keys, values }`.
const MAP_ENTRY: &str = "key_value";
const MAP_KEY: &str = "key";
const MAP_VALUE: &str = "value";

/// The type of an identity string column: plain in the files ([`enriched_flow_schema`]), an
/// Arrow dictionary over the batch's distinct identities in the batches handed to the writer
/// ([`batch_schema`]).
fn identity_string(dict: bool) -> DataType {
    if dict {
        DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8))
    } else {
        DataType::Utf8
    }
}

/// The `labels` map's entries field.
fn labels_entry(dict: bool) -> Arc<Field> {
    Arc::new(Field::new(
        MAP_ENTRY,
        DataType::Struct(Fields::from(vec![
            Field::new(MAP_KEY, identity_string(dict), false),
            Field::new(MAP_VALUE, identity_string(dict), false),
        ])),
        false,
    ))
}

/// The struct fields of one end of a flow (`local`, `remote`); `dict`: as in the batches.
fn endpoint_fields(dict: bool) -> Fields {
    let string = |name: &str| Field::new(name, identity_string(dict), true);
    let labels = Field::new("labels", DataType::Map(labels_entry(dict), false), true);
    Fields::from(vec![
        Field::new("status", DataType::Utf8, false),
        string("kind"),
        string("name"),
        string("namespace"),
        string("workload_kind"),
        string("workload_name"),
        labels,
        string("node"),
        string("zone"),
        string("region"),
        string("account"),
        string("vpc"),
        string("subnet"),
        string("instance_id"),
        string("container_id"),
        string("pod_uid"),
        string("source"),
        Field::new("candidates", candidates_type(), false),
    ])
}

/// The item field of `candidates`: names are never null.
fn candidate_item() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Utf8, false))
}

fn candidates_type() -> DataType {
    DataType::List(candidate_item())
}

fn schema(dict: bool) -> SchemaRef {
    let u64_ = |name: &str| Field::new(name, DataType::UInt64, false);
    let u32_ = |name: &str| Field::new(name, DataType::UInt32, false);
    let u16_ = |name: &str| Field::new(name, DataType::UInt16, false);
    let string = |name: &str| Field::new(name, DataType::Utf8, false);
    let endpoint = |name: &str| Field::new(name, DataType::Struct(endpoint_fields(dict)), false);
    Arc::new(Schema::new(vec![
        u64_("flow_id"),
        string("host"),
        u32_("seq"),
        u64_("start_ns"),
        u64_("end_ns"),
        string("family"),
        string("local_addr"),
        u16_("local_port"),
        string("remote_addr"),
        u16_("remote_port"),
        string("direction"),
        string("outcome"),
        u64_("bytes_sent"),
        u64_("bytes_received"),
        u64_("segs_sent"),
        u64_("segs_received"),
        u64_("retransmits"),
        u64_("resets_sent"),
        u64_("resets_received"),
        u32_("srtt_us"),
        u32_("min_rtt_us"),
        Field::new("pid", DataType::UInt32, true),
        Field::new("comm", DataType::Utf8, true),
        Field::new("cgroup_id", DataType::UInt64, true),
        endpoint("local"),
        endpoint("remote"),
        u64_("enriched_ns"),
        Field::new("adopted", DataType::Boolean, false),
    ]))
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| schema(false));
static BATCH_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| schema(true));

/// The schema of the batches [`FlowBatchBuilder`] makes and the writer encodes: that of
/// [`enriched_flow_schema`], but each end's identity strings (and its labels' keys and values)
/// are Arrow dictionaries whose values are the batch's distinct identities, so a row costs an
/// index rather than a copy of some 16 strings. Parquet stores a dictionary column exactly as
/// the plain column of the same values; the files are written without the Arrow schema
/// (`skip_arrow_metadata`), so every reader sees [`enriched_flow_schema`].
pub fn batch_schema() -> SchemaRef {
    BATCH_SCHEMA.clone()
}

/// The schema of an enriched flow in Parquet, one column per field, in this order:
///
/// - every [`FlowRecord`] field under its own name: `flow_id` u64, `host` string, `seq` u32,
///   `start_ns` u64, `end_ns` u64, `family` string (`ipv4`/`ipv6`), `local_addr` string,
///   `local_port` u16, `remote_addr` string, `remote_port` u16, `direction` string
///   (`outbound`/`inbound`), `outcome` string (`closed`/`reset`/`failed`/`open`), `bytes_sent`,
///   `bytes_received`, `segs_sent`, `segs_received`, `retransmits`, `resets_sent`,
///   `resets_received` u64, `srtt_us` u32, `min_rtt_us` u32, and the nullable `pid` u32,
///   `comm` string, `cgroup_id` u64;
/// - `local` and `remote`, structs of `status` (`exact`/`ambiguous`/`unknown`, never null),
///   `kind`, `name`, `namespace`, `workload_kind`, `workload_name`,
///   `labels` map<string, string>, `node`, `zone`, `region`, `account`, `vpc`, `subnet`,
///   `instance_id`, `container_id`, `pod_uid`, `source` (all null unless `status` is `exact`;
///   `labels` is then a map, possibly empty) and `candidates` list<string> (the owners'
///   `namespace/name` when `ambiguous`, empty otherwise);
/// - `enriched_ns` u64;
/// - `adopted` bool: the flow record's field of schema version 2, after the rest so that files
///   written before it keep their column order (schema v1 records are written false; an
///   engine reading older files with newer ones sees it null there, or fills a default).
///
/// Why these types:
/// - Addresses are strings in their canonical text form (`10.0.0.1`, `2001:db8::1`,
///   `::ffff:10.0.0.1` for a mapped address the agent reported as such), so equality filters
///   and joins work in any engine; Parquet's dictionary encoding and zstd make repeated
///   addresses cheap.
/// - Enums are plain strings rather than Arrow dictionaries: the Parquet writer
///   dictionary-encodes every column anyway, so on disk they cost the same, and engines never
///   have to reconcile dictionary types across files.
/// - Times stay `u64` nanoseconds since the epoch, as in Avro and JSON, so every output of
///   flowlog has the same numbers and sums/differences need no casts. A second pair of
///   `Timestamp(ns, UTC)` columns is not cheap: measured with pyarrow (zstd 3, 300k rows of
///   realistic start/end times) it added ~10 bytes per row after compression, some 10–15% of
///   a row here, for two names of one fact. Engines convert at query time
///   (`to_timestamp(end_ns / 1e9)`, `from_unixtime_nanos(end_ns)`), and the hive partitions
///   `dt=`/`hour=` (from `end_ns`, UTC)
///   already prune by time without reading a column.
///
/// [`FlowRecord`]: flowlog_record::record::FlowRecord
pub fn enriched_flow_schema() -> SchemaRef {
    SCHEMA.clone()
}

/// The text of a [`Family`]: its serde name, as in the JSON lines and the Avro enum.
/// (`flowlog-record` gives [`Family`] no `as_str()`.)
pub fn family_str(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

/// The text of a [`Direction`]: its serde name, as in the JSON lines and the Avro enum.
/// (`flowlog-record` gives [`Direction`] no `as_str()`.)
pub fn direction_str(direction: Direction) -> &'static str {
    match direction {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
    }
}

/// Hashes a pointer by one multiplication (Fibonacci hashing): the identities of a batch are
/// found by the address of their `Arc`, which needs no stronger hash.
#[derive(Default)]
struct PtrHasher(u64);

impl Hasher for PtrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The distinct identities of a batch (both ends): the values of its identity dictionary
/// columns. An identity is found by its `Arc`'s address (equal identities in two `Arc`s are
/// two entries, which the Parquet dictionary merges again); the `Arc`s are kept until the batch
/// is finished, so an address is not reused meanwhile.
#[derive(Default)]
struct Identities {
    index: HashMap<usize, u32, BuildHasherDefault<PtrHasher>>,
    ids: Vec<Arc<Identity>>,
    /// Per identity, its range of entries in `label_keys`/`label_values`.
    labels: Vec<(u32, u32)>,
    label_keys: StringBuilder,
    label_values: StringBuilder,
    /// Per identity, the bytes of its strings, for the size estimate.
    bytes: Vec<usize>,
}

/// One batch's identity dictionaries: the values that both ends' keys point into.
struct IdentityColumns {
    /// In the order of [`endpoint_fields`]: kind, name, namespace, workload_kind,
    /// workload_name, then node … source; `None` where no identity of the batch has the field
    /// (the column is then all null, which the writer takes without reading each row's key).
    strings: [Option<ArrayRef>; 15],
    label_keys: ArrayRef,
    label_values: ArrayRef,
}

impl Identities {
    /// The index of `id` among the batch's identities, adding it if it is new.
    fn key(&mut self, id: &Arc<Identity>) -> u32 {
        let next = self.ids.len() as u32;
        let key = *self.index.entry(Arc::as_ptr(id).addr()).or_insert(next);
        if key == next {
            self.ids.push(id.clone());
            let start = self.label_keys.len() as u32;
            for (k, v) in &id.labels {
                self.label_keys.append_value(k);
                self.label_values.append_value(v);
            }
            self.labels.push((start, self.label_keys.len() as u32));
            self.bytes.push(identity_bytes(id));
        }
        key
    }

    /// The dictionaries' values; the table starts over empty.
    fn finish(&mut self) -> IdentityColumns {
        let ids = std::mem::take(&mut self.ids);
        self.index.clear();
        self.labels.clear();
        self.bytes.clear();
        let column = |f: fn(&Identity) -> Option<&str>| -> Option<ArrayRef> {
            if ids.iter().all(|i| f(i).is_none()) {
                return None;
            }
            Some(Arc::new(ids.iter().map(|i| f(i)).collect::<StringArray>()))
        };
        IdentityColumns {
            strings: [
                column(|i| Some(i.kind.as_str())),
                column(|i| Some(i.name.as_str())),
                column(|i| i.namespace.as_deref()),
                column(|i| i.workload.as_ref().map(|w| w.kind.as_str())),
                column(|i| i.workload.as_ref().map(|w| w.name.as_str())),
                column(|i| i.node.as_deref()),
                column(|i| i.zone.as_deref()),
                column(|i| i.region.as_deref()),
                column(|i| i.account.as_deref()),
                column(|i| i.vpc.as_deref()),
                column(|i| i.subnet.as_deref()),
                column(|i| i.instance_id.as_deref()),
                column(|i| i.container_id.as_deref()),
                column(|i| i.pod_uid.as_deref()),
                column(|i| Some(i.source.as_str())),
            ],
            label_keys: Arc::new(self.label_keys.finish()),
            label_values: Arc::new(self.label_values.finish()),
        }
    }
}

/// Bytes of an identity's strings (for the size estimate).
fn identity_bytes(i: &Identity) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    i.name.len()
        + i.source.len()
        + opt(&i.namespace)
        + i.workload
            .as_ref()
            .map_or(0, |w| w.kind.len() + w.name.len())
        + i.labels
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + opt(&i.node)
        + opt(&i.zone)
        + opt(&i.region)
        + opt(&i.account)
        + opt(&i.vpc)
        + opt(&i.subnet)
        + opt(&i.instance_id)
        + opt(&i.container_id)
        + opt(&i.pod_uid)
}

/// Column builders for one end of the flow. Its identity is a key per row into the batch's
/// [`Identities`] (null unless the end is `exact`), its labels a range of their entries.
struct EndpointBuilder {
    status: StringBuilder,
    identity: UInt32Builder,
    label_offsets: Vec<i32>,
    /// Per label entry of every row, its index in the batch's label dictionaries.
    label_entries: Vec<u32>,
    label_nulls: NullBufferBuilder,
    candidates: ListBuilder<StringBuilder>,
}

impl EndpointBuilder {
    fn new() -> Self {
        Self {
            status: StringBuilder::new(),
            identity: UInt32Builder::new(),
            label_offsets: vec![0],
            label_entries: Vec::new(),
            label_nulls: NullBufferBuilder::new(0),
            candidates: ListBuilder::new(StringBuilder::new()).with_field(candidate_item()),
        }
    }

    /// Appends one end; returns the bytes of strings it adds (for the size estimate).
    fn append(&mut self, end: &Endpoint, ids: &mut Identities) -> usize {
        self.status.append_value(end.status.as_str());
        // The identity is shown only for an exact end, whatever else the value carries.
        let id = end
            .identity
            .as_ref()
            .filter(|_| end.status == Attribution::Exact);
        let mut bytes = 0;
        match id {
            Some(id) => {
                let key = ids.key(id);
                self.identity.append_value(key);
                let (start, stop) = ids.labels[key as usize];
                self.label_entries.extend(start..stop);
                self.label_nulls.append_non_null();
                bytes += ids.bytes[key as usize];
            }
            None => {
                self.identity.append_null();
                self.label_nulls.append_null();
            }
        }
        self.label_offsets.push(self.label_entries.len() as i32);
        for c in &end.candidates {
            self.candidates.values().append_value(c);
            bytes += c.len();
        }
        self.candidates.append(true);
        bytes
    }

    fn finish(&mut self, ids: &IdentityColumns) -> Result<ArrayRef, ArrowError> {
        let keys = self.identity.finish();
        let dict = |values: &Option<ArrayRef>| -> Result<ArrayRef, ArrowError> {
            Ok(match values {
                Some(values) => Arc::new(DictionaryArray::<UInt32Type>::try_new(
                    keys.clone(),
                    values.clone(),
                )?),
                None => new_null_array(&identity_string(true), keys.len()),
            })
        };
        let entries: UInt32Array = std::mem::take(&mut self.label_entries).into();
        let offsets = std::mem::replace(&mut self.label_offsets, vec![0]);
        let entry_fields = match labels_entry(true).data_type() {
            DataType::Struct(fields) => fields.clone(),
            _ => unreachable!("labels_entry is a struct"),
        };
        let labels = MapArray::try_new(
            labels_entry(true),
            OffsetBuffer::new(ScalarBuffer::from(offsets)),
            StructArray::try_new(
                entry_fields,
                vec![
                    Arc::new(DictionaryArray::<UInt32Type>::try_new(
                        entries.clone(),
                        ids.label_keys.clone(),
                    )?),
                    Arc::new(DictionaryArray::<UInt32Type>::try_new(
                        entries,
                        ids.label_values.clone(),
                    )?),
                ],
                None,
            )?,
            self.label_nulls.finish(),
            false,
        )?;
        let [
            kind,
            name,
            namespace,
            wk,
            wn,
            node,
            zone,
            region,
            account,
            vpc,
            subnet,
            iid,
            cid,
            uid,
            source,
        ] = &ids.strings;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.status.finish()),
            dict(kind)?,
            dict(name)?,
            dict(namespace)?,
            dict(wk)?,
            dict(wn)?,
            Arc::new(labels),
            dict(node)?,
            dict(zone)?,
            dict(region)?,
            dict(account)?,
            dict(vpc)?,
            dict(subnet)?,
            dict(iid)?,
            dict(cid)?,
            dict(uid)?,
            dict(source)?,
            Arc::new(self.candidates.finish()),
        ];
        Ok(Arc::new(StructArray::try_new(
            endpoint_fields(true),
            columns,
            None,
        )?))
    }
}

/// Accumulates enriched flows column by column and hands them out as [`RecordBatch`]es of
/// [`batch_schema`]. Appending copies a flow's own strings into Arrow buffers once, and an
/// identity's strings once per batch (rows hold keys); nothing is allocated per row except when
/// a buffer grows.
pub struct FlowBatchBuilder {
    rows: usize,
    /// Bytes of variable-length data appended since the last batch (strings, labels): with
    /// the fixed part per row, an estimate of the batch's size before encoding.
    var_bytes: usize,
    /// Reused for formatting addresses.
    scratch: String,
    flow_id: UInt64Builder,
    host: StringBuilder,
    seq: UInt32Builder,
    start_ns: UInt64Builder,
    end_ns: UInt64Builder,
    family: StringBuilder,
    local_addr: StringBuilder,
    local_port: UInt16Builder,
    remote_addr: StringBuilder,
    remote_port: UInt16Builder,
    direction: StringBuilder,
    outcome: StringBuilder,
    bytes_sent: UInt64Builder,
    bytes_received: UInt64Builder,
    segs_sent: UInt64Builder,
    segs_received: UInt64Builder,
    retransmits: UInt64Builder,
    resets_sent: UInt64Builder,
    resets_received: UInt64Builder,
    srtt_us: UInt32Builder,
    min_rtt_us: UInt32Builder,
    pid: UInt32Builder,
    comm: StringBuilder,
    cgroup_id: UInt64Builder,
    local: EndpointBuilder,
    remote: EndpointBuilder,
    /// Both ends' identities in this batch.
    identities: Identities,
    enriched_ns: UInt64Builder,
    adopted: BooleanBuilder,
}

impl Default for FlowBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Fixed-width bytes of one row before encoding (integers, offsets, validity), for
/// [`FlowBatchBuilder::estimated_bytes`].
const FIXED_ROW_BYTES: usize = 256;

impl FlowBatchBuilder {
    /// An empty builder; buffers grow with the first batch and are reused after each
    /// [`FlowBatchBuilder::finish`].
    pub fn new() -> Self {
        Self {
            rows: 0,
            var_bytes: 0,
            scratch: String::with_capacity(48),
            flow_id: UInt64Builder::new(),
            host: StringBuilder::new(),
            seq: UInt32Builder::new(),
            start_ns: UInt64Builder::new(),
            end_ns: UInt64Builder::new(),
            family: StringBuilder::new(),
            local_addr: StringBuilder::new(),
            local_port: UInt16Builder::new(),
            remote_addr: StringBuilder::new(),
            remote_port: UInt16Builder::new(),
            direction: StringBuilder::new(),
            outcome: StringBuilder::new(),
            bytes_sent: UInt64Builder::new(),
            bytes_received: UInt64Builder::new(),
            segs_sent: UInt64Builder::new(),
            segs_received: UInt64Builder::new(),
            retransmits: UInt64Builder::new(),
            resets_sent: UInt64Builder::new(),
            resets_received: UInt64Builder::new(),
            srtt_us: UInt32Builder::new(),
            min_rtt_us: UInt32Builder::new(),
            pid: UInt32Builder::new(),
            comm: StringBuilder::new(),
            cgroup_id: UInt64Builder::new(),
            local: EndpointBuilder::new(),
            remote: EndpointBuilder::new(),
            identities: Identities::default(),
            enriched_ns: UInt64Builder::new(),
            adopted: BooleanBuilder::new(),
        }
    }

    /// Rows appended since the last [`FlowBatchBuilder::finish`].
    pub fn len(&self) -> usize {
        self.rows
    }

    /// True when no row was appended since the last [`FlowBatchBuilder::finish`].
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// A rough size of the rows not yet finished, before encoding: what they add to a file
    /// until they are encoded (an over-estimate, since encoding compresses).
    pub fn estimated_bytes(&self) -> usize {
        self.rows * FIXED_ROW_BYTES + self.var_bytes
    }

    /// Appends one flow as one row.
    pub fn append(&mut self, e: &EnrichedFlow) -> Result<(), ArrowError> {
        let f = &e.flow;
        self.flow_id.append_value(f.flow_id);
        self.host.append_value(&f.host);
        self.seq.append_value(f.seq);
        self.start_ns.append_value(f.start_ns);
        self.end_ns.append_value(f.end_ns);
        self.family.append_value(family_str(f.family));
        append_addr(&mut self.local_addr, &mut self.scratch, f.local_addr);
        self.local_port.append_value(f.local_port);
        append_addr(&mut self.remote_addr, &mut self.scratch, f.remote_addr);
        self.remote_port.append_value(f.remote_port);
        self.direction.append_value(direction_str(f.direction));
        self.outcome.append_value(f.outcome.as_str());
        self.bytes_sent.append_value(f.bytes_sent);
        self.bytes_received.append_value(f.bytes_received);
        self.segs_sent.append_value(f.segs_sent);
        self.segs_received.append_value(f.segs_received);
        self.retransmits.append_value(f.retransmits);
        self.resets_sent.append_value(f.resets_sent);
        self.resets_received.append_value(f.resets_received);
        self.srtt_us.append_value(f.srtt_us);
        self.min_rtt_us.append_value(f.min_rtt_us);
        self.pid.append_option(f.pid);
        self.comm.append_option(f.comm.as_deref());
        self.cgroup_id.append_option(f.cgroup_id);
        let local = self.local.append(&e.local, &mut self.identities);
        let remote = self.remote.append(&e.remote, &mut self.identities);
        self.enriched_ns.append_value(e.enriched_ns);
        self.adopted.append_value(f.adopted);
        self.rows += 1;
        self.var_bytes +=
            f.host.len() + f.comm.as_ref().map_or(0, String::len) + 2 * 16 + local + remote;
        Ok(())
    }

    /// The rows appended so far as one batch; the builder starts over empty.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let identities = self.identities.finish();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.flow_id.finish()),
            Arc::new(self.host.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.start_ns.finish()),
            Arc::new(self.end_ns.finish()),
            Arc::new(self.family.finish()),
            Arc::new(self.local_addr.finish()),
            Arc::new(self.local_port.finish()),
            Arc::new(self.remote_addr.finish()),
            Arc::new(self.remote_port.finish()),
            Arc::new(self.direction.finish()),
            Arc::new(self.outcome.finish()),
            Arc::new(self.bytes_sent.finish()),
            Arc::new(self.bytes_received.finish()),
            Arc::new(self.segs_sent.finish()),
            Arc::new(self.segs_received.finish()),
            Arc::new(self.retransmits.finish()),
            Arc::new(self.resets_sent.finish()),
            Arc::new(self.resets_received.finish()),
            Arc::new(self.srtt_us.finish()),
            Arc::new(self.min_rtt_us.finish()),
            Arc::new(self.pid.finish()),
            Arc::new(self.comm.finish()),
            Arc::new(self.cgroup_id.finish()),
            self.local.finish(&identities)?,
            self.remote.finish(&identities)?,
            Arc::new(self.enriched_ns.finish()),
            Arc::new(self.adopted.finish()),
        ];
        self.rows = 0;
        self.var_bytes = 0;
        RecordBatch::try_new(batch_schema(), columns)
    }
}

/// Appends an address in its canonical text form. IPv4, nearly every address, is written
/// digit by digit: `std`'s `Display` (through `fmt::write`, with padding support) cost about
/// 1,000 instructions an address, half the cost of building a row. IPv6 keeps `Display` (its
/// canonical form, RFC 5952, with `::` and mapped IPv4), formatted into a reused buffer.
fn append_addr(builder: &mut StringBuilder, scratch: &mut String, addr: IpAddr) {
    match addr {
        IpAddr::V4(v4) => {
            let mut text = [0u8; 15];
            let len = ipv4_text(v4.octets(), &mut text);
            // Only ASCII digits and dots were written.
            builder.append_value(std::str::from_utf8(&text[..len]).unwrap_or_default());
        }
        IpAddr::V6(_) => {
            scratch.clear();
            // Writing into a String cannot fail.
            let _ = write!(scratch, "{addr}");
            builder.append_value(scratch.as_str());
        }
    }
}

/// Writes `a.b.c.d` (decimal octets, no leading zeros) into `out`; returns its length.
fn ipv4_text(octets: [u8; 4], out: &mut [u8; 15]) -> usize {
    let mut len = 0;
    for (i, o) in octets.into_iter().enumerate() {
        if i > 0 {
            out[len] = b'.';
            len += 1;
        }
        if o >= 100 {
            out[len] = b'0' + o / 100;
            len += 1;
        }
        if o >= 10 {
            out[len] = b'0' + o / 10 % 10;
            len += 1;
        }
        out[len] = b'0' + o % 10;
        len += 1;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array, cast::AsArray};

    /// The strings written for `family` and `direction` are the enums' serde names (those of
    /// the JSON lines and the Avro schema), not names of our own.
    #[test]
    fn enum_strings_are_the_serde_names() {
        for f in [Family::Ipv4, Family::Ipv6] {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", family_str(f)));
        }
        for d in [Direction::Outbound, Direction::Inbound] {
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", direction_str(d)));
        }
    }

    fn flow(local: Endpoint, remote: Endpoint) -> EnrichedFlow {
        EnrichedFlow {
            flow: flowlog_record::record::FlowRecord {
                flow_id: 1,
                host: "h".into(),
                start_ns: 1,
                end_ns: 2,
                local_addr: "192.0.2.1".parse().unwrap(),
                local_port: 40_000,
                remote_addr: "10.0.0.1".parse().unwrap(),
                remote_port: 443,
                ..flowlog_record::record::FlowRecord::default()
            },
            local,
            remote,
            enriched_ns: 3,
        }
    }

    fn identity(name: &str, labels: &[(&str, &str)]) -> Arc<Identity> {
        Arc::new(Identity {
            name: name.into(),
            namespace: Some("shop".into()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            source: "kubernetes".into(),
            ..Identity::default()
        })
    }

    /// A string column's values, whether plain or a dictionary (as identity columns are).
    fn strings(array: &dyn Array) -> Vec<Option<String>> {
        match array.data_type() {
            DataType::Dictionary(_, _) => {
                let dict = array.as_dictionary::<UInt32Type>();
                let values = dict.values().as_string::<i32>();
                dict.keys()
                    .iter()
                    .map(|k| {
                        let k = k? as usize;
                        values.is_valid(k).then(|| values.value(k).to_string())
                    })
                    .collect()
            }
            _ => array
                .as_string::<i32>()
                .iter()
                .map(|v| v.map(str::to_string))
                .collect(),
        }
    }

    /// `(name, labels as "k=v,…")` of one end per row; `None` where the identity is null.
    fn end_columns(batch: &RecordBatch, end: &str) -> Vec<Option<(String, String)>> {
        let end = batch.column_by_name(end).unwrap().as_struct();
        let names = strings(end.column_by_name("name").unwrap());
        let labels = end.column_by_name("labels").unwrap().as_map();
        (0..end.len())
            .map(|row| {
                assert_eq!(names[row].is_none(), labels.is_null(row), "row {row}");
                names[row].clone().map(|name| {
                    let entries = labels.value(row);
                    let keys = strings(entries.column(0));
                    let values = strings(entries.column(1));
                    let text: Vec<String> = keys
                        .iter()
                        .zip(&values)
                        .map(|(k, v)| format!("{}={}", k.as_ref().unwrap(), v.as_ref().unwrap()))
                        .collect();
                    (name, text.join(","))
                })
            })
            .collect()
    }

    /// Rows that share an identity, equal identities in different `Arc`s, ends that are not
    /// exact (even one that carries an identity) and a second batch after the first: each row
    /// gets exactly its own end's identity (null unless exact), and nothing of a previous batch.
    #[test]
    fn each_row_gets_its_own_identity_once_per_batch() {
        let a = identity("a", &[("app", "a")]);
        let b = identity("b", &[]);
        let b_again = identity("b", &[]);
        let not_exact = Endpoint {
            identity: Some(a.clone()),
            ..Endpoint::ambiguous(&[a.clone(), b.clone()])
        };
        let mut builder = FlowBatchBuilder::new();
        builder
            .append(&flow(
                Endpoint::exact(a.clone()),
                Endpoint::exact(b.clone()),
            ))
            .unwrap();
        builder
            .append(&flow(Endpoint::exact(b_again.clone()), Endpoint::unknown()))
            .unwrap();
        builder
            .append(&flow(Endpoint::exact(a.clone()), not_exact))
            .unwrap();
        builder
            .append(&flow(Endpoint::unknown(), Endpoint::exact(a.clone())))
            .unwrap();
        let first = builder.finish().unwrap();
        let some = |name: &str, labels: &str| Some((name.to_string(), labels.to_string()));
        assert_eq!(
            end_columns(&first, "local"),
            [some("a", "app=a"), some("b", ""), some("a", "app=a"), None]
        );
        assert_eq!(
            end_columns(&first, "remote"),
            [some("b", ""), None, None, some("a", "app=a")]
        );
        let remote = first.column_by_name("remote").unwrap().as_struct();
        let status = remote.column_by_name("status").unwrap().as_string::<i32>();
        assert_eq!(status.value(2), "ambiguous");
        let candidates = remote
            .column_by_name("candidates")
            .unwrap()
            .as_list::<i32>();
        assert_eq!(candidates.value(2).as_string::<i32>().value(1), "shop/b");

        builder
            .append(&flow(Endpoint::unknown(), Endpoint::exact(b.clone())))
            .unwrap();
        let second = builder.finish().unwrap();
        assert_eq!(end_columns(&second, "local"), [None]);
        assert_eq!(end_columns(&second, "remote"), [some("b", "")]);
        let remote = second.column_by_name("remote").unwrap().as_struct();
        let source = strings(remote.column_by_name("source").unwrap());
        assert_eq!(source, [Some("kubernetes".to_string())]);
        // An identity without a field (no workload here) is null in that field only.
        let workload = strings(remote.column_by_name("workload_name").unwrap());
        assert_eq!(workload, [None]);
    }

    /// IPv4 addresses are written as `std` writes them, for every octet value in every
    /// position; IPv6 (and IPv4-mapped IPv6) through `std` itself.
    #[test]
    fn addresses_are_written_in_their_canonical_text() {
        let mut builder = StringBuilder::new();
        let mut scratch = String::new();
        let mut expected = Vec::new();
        for o in 0..=255u8 {
            for addr in [
                [o, 0, 0, 0],
                [0, o, 0, 0],
                [0, 0, o, 0],
                [10, 1, 255, o],
                [o, o, o, o],
            ] {
                let addr = IpAddr::from(addr);
                append_addr(&mut builder, &mut scratch, addr);
                expected.push(addr.to_string());
            }
        }
        for text in ["2001:db8::1", "::ffff:10.0.0.1", "::", "fe80::1:2:3:4"] {
            let addr: IpAddr = text.parse().unwrap();
            append_addr(&mut builder, &mut scratch, addr);
            expected.push(text.to_string());
        }
        let written = builder.finish();
        let written: Vec<&str> = written.iter().map(Option::unwrap).collect();
        assert_eq!(written, expected);
        assert_eq!(written[5 * 192 + 4], "192.192.192.192");
    }

    #[test]
    fn an_empty_batch_has_the_schema() {
        let batch = FlowBatchBuilder::new().finish().unwrap();
        assert_eq!(batch.num_rows(), 0);
        assert_eq!(batch.schema(), batch_schema());
        let names: Vec<&str> = batch
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names.len(), 28);
        assert_eq!(names[0], "flow_id");
        assert_eq!(names[24..], ["local", "remote", "enriched_ns", "adopted"]);
    }

    /// The batch schema is the file schema but for the identity strings, which are
    /// dictionaries of strings: the same columns, names, nullability and value types.
    #[test]
    fn the_batch_schema_is_the_file_schema_with_identity_dictionaries() {
        fn plain(t: &DataType) -> DataType {
            match t {
                DataType::Dictionary(_, v) => (**v).clone(),
                DataType::Struct(fields) => DataType::Struct(
                    fields
                        .iter()
                        .map(|f| f.as_ref().clone().with_data_type(plain(f.data_type())))
                        .collect(),
                ),
                DataType::Map(entry, sorted) => DataType::Map(
                    Arc::new(
                        entry
                            .as_ref()
                            .clone()
                            .with_data_type(plain(entry.data_type())),
                    ),
                    *sorted,
                ),
                t => t.clone(),
            }
        }
        let batch = batch_schema();
        let file = enriched_flow_schema();
        let dictionaries = |schema: &Schema| format!("{schema:?}").matches("Dictionary").count();
        // 15 identity strings and the labels' keys and values, in each end.
        assert_eq!(dictionaries(&batch), 2 * 17);
        assert_eq!(dictionaries(&file), 0);
        let as_plain: Vec<Field> = batch
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_data_type(plain(f.data_type())))
            .collect();
        assert_eq!(Schema::new(as_plain), *file);
    }
}
