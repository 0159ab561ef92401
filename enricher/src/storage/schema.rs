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
    fmt::Write as _,
    net::IpAddr,
    sync::{Arc, LazyLock},
};

use arrow_array::{
    ArrayRef, RecordBatch, StructArray,
    builder::{
        BooleanBuilder, ListBuilder, MapBuilder, MapFieldNames, StringBuilder, UInt16Builder,
        UInt32Builder, UInt64Builder,
    },
};
use arrow_schema::{ArrowError, DataType, Field, Fields, Schema, SchemaRef};
use flowlog_record::{
    enriched::{Endpoint, EnrichedFlow},
    record::{Direction, Family},
};

/// Written into every file's key-value metadata under [`SCHEMA_KEY`], so a reader can tell
/// which layout a file has once the schema evolves.
pub const SCHEMA_VERSION: &str = "enriched_flow.v1";
/// The key-value metadata key that holds [`SCHEMA_VERSION`].
pub const SCHEMA_KEY: &str = "flowlog.schema";

/// The names of the map's inner fields: Parquet's canonical `key_value { key, value }` (what
/// the format spec and pyarrow write), rather than Arrow's `entries { keys, values }`.
fn map_field_names() -> MapFieldNames {
    MapFieldNames {
        entry: "key_value".to_string(),
        key: "key".to_string(),
        value: "value".to_string(),
    }
}

/// The struct fields of one end of a flow (`local`, `remote`).
fn endpoint_fields() -> Fields {
    let string = |name: &str| Field::new(name, DataType::Utf8, true);
    let names = map_field_names();
    let labels = Field::new_map(
        "labels",
        names.entry,
        Field::new(names.key, DataType::Utf8, false),
        Field::new(names.value, DataType::Utf8, false),
        false,
        true,
    );
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

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let u64_ = |name: &str| Field::new(name, DataType::UInt64, false);
    let u32_ = |name: &str| Field::new(name, DataType::UInt32, false);
    let u16_ = |name: &str| Field::new(name, DataType::UInt16, false);
    let string = |name: &str| Field::new(name, DataType::Utf8, false);
    let endpoint = |name: &str| Field::new(name, DataType::Struct(endpoint_fields()), false);
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
});

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

/// Column builders for one end of the flow.
struct EndpointBuilder {
    status: StringBuilder,
    kind: StringBuilder,
    name: StringBuilder,
    namespace: StringBuilder,
    workload_kind: StringBuilder,
    workload_name: StringBuilder,
    labels: MapBuilder<StringBuilder, StringBuilder>,
    node: StringBuilder,
    zone: StringBuilder,
    region: StringBuilder,
    account: StringBuilder,
    vpc: StringBuilder,
    subnet: StringBuilder,
    instance_id: StringBuilder,
    container_id: StringBuilder,
    pod_uid: StringBuilder,
    source: StringBuilder,
    candidates: ListBuilder<StringBuilder>,
}

impl EndpointBuilder {
    fn new() -> Self {
        let names = map_field_names();
        let labels = MapBuilder::new(
            Some(names.clone()),
            StringBuilder::new(),
            StringBuilder::new(),
        )
        .with_keys_field(Field::new(names.key, DataType::Utf8, false))
        .with_values_field(Field::new(names.value, DataType::Utf8, false));
        Self {
            status: StringBuilder::new(),
            kind: StringBuilder::new(),
            name: StringBuilder::new(),
            namespace: StringBuilder::new(),
            workload_kind: StringBuilder::new(),
            workload_name: StringBuilder::new(),
            labels,
            node: StringBuilder::new(),
            zone: StringBuilder::new(),
            region: StringBuilder::new(),
            account: StringBuilder::new(),
            vpc: StringBuilder::new(),
            subnet: StringBuilder::new(),
            instance_id: StringBuilder::new(),
            container_id: StringBuilder::new(),
            pod_uid: StringBuilder::new(),
            source: StringBuilder::new(),
            candidates: ListBuilder::new(StringBuilder::new()).with_field(candidate_item()),
        }
    }

    fn append(&mut self, end: &Endpoint) -> Result<(), ArrowError> {
        self.status.append_value(end.status.as_str());
        // The identity is shown only for an exact end, whatever else the value carries.
        let id = end
            .identity
            .as_deref()
            .filter(|_| end.status == flowlog_record::enriched::Attribution::Exact);
        self.kind.append_option(id.map(|i| i.kind.as_str()));
        self.name.append_option(id.map(|i| i.name.as_str()));
        self.namespace
            .append_option(id.and_then(|i| i.namespace.as_deref()));
        let workload = id.and_then(|i| i.workload.as_ref());
        self.workload_kind
            .append_option(workload.map(|w| w.kind.as_str()));
        self.workload_name
            .append_option(workload.map(|w| w.name.as_str()));
        match id {
            Some(i) => {
                for (k, v) in &i.labels {
                    self.labels.keys().append_value(k);
                    self.labels.values().append_value(v);
                }
                self.labels.append(true)?;
            }
            None => self.labels.append(false)?,
        }
        self.node.append_option(id.and_then(|i| i.node.as_deref()));
        self.zone.append_option(id.and_then(|i| i.zone.as_deref()));
        self.region
            .append_option(id.and_then(|i| i.region.as_deref()));
        self.account
            .append_option(id.and_then(|i| i.account.as_deref()));
        self.vpc.append_option(id.and_then(|i| i.vpc.as_deref()));
        self.subnet
            .append_option(id.and_then(|i| i.subnet.as_deref()));
        self.instance_id
            .append_option(id.and_then(|i| i.instance_id.as_deref()));
        self.container_id
            .append_option(id.and_then(|i| i.container_id.as_deref()));
        self.pod_uid
            .append_option(id.and_then(|i| i.pod_uid.as_deref()));
        self.source.append_option(id.map(|i| i.source.as_str()));
        for c in &end.candidates {
            self.candidates.values().append_value(c);
        }
        self.candidates.append(true);
        Ok(())
    }

    fn finish(&mut self) -> Result<ArrayRef, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.status.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.namespace.finish()),
            Arc::new(self.workload_kind.finish()),
            Arc::new(self.workload_name.finish()),
            Arc::new(self.labels.finish()),
            Arc::new(self.node.finish()),
            Arc::new(self.zone.finish()),
            Arc::new(self.region.finish()),
            Arc::new(self.account.finish()),
            Arc::new(self.vpc.finish()),
            Arc::new(self.subnet.finish()),
            Arc::new(self.instance_id.finish()),
            Arc::new(self.container_id.finish()),
            Arc::new(self.pod_uid.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.candidates.finish()),
        ];
        Ok(Arc::new(StructArray::try_new(
            endpoint_fields(),
            columns,
            None,
        )?))
    }
}

/// Accumulates enriched flows column by column and hands them out as [`RecordBatch`]es of
/// [`enriched_flow_schema`]. Appending copies the strings into Arrow buffers once; nothing is
/// allocated per row except when a buffer grows.
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
        self.local.append(&e.local)?;
        self.remote.append(&e.remote)?;
        self.enriched_ns.append_value(e.enriched_ns);
        self.adopted.append_value(f.adopted);
        self.rows += 1;
        self.var_bytes += f.host.len()
            + f.comm.as_ref().map_or(0, String::len)
            + 2 * 16
            + endpoint_var_bytes(&e.local)
            + endpoint_var_bytes(&e.remote);
        Ok(())
    }

    /// The rows appended so far as one batch; the builder starts over empty.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
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
            self.local.finish()?,
            self.remote.finish()?,
            Arc::new(self.enriched_ns.finish()),
            Arc::new(self.adopted.finish()),
        ];
        self.rows = 0;
        self.var_bytes = 0;
        RecordBatch::try_new(enriched_flow_schema(), columns)
    }
}

/// Bytes of strings one end adds to a batch (for the size estimate).
fn endpoint_var_bytes(end: &Endpoint) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let id = end.identity.as_deref().map_or(0, |i| {
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
    });
    id + end.candidates.iter().map(String::len).sum::<usize>()
}

/// Appends an address in its canonical text form, formatted into a reused buffer.
fn append_addr(builder: &mut StringBuilder, scratch: &mut String, addr: IpAddr) {
    scratch.clear();
    // Writing into a String cannot fail.
    let _ = write!(scratch, "{addr}");
    builder.append_value(scratch.as_str());
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array as _, cast::AsArray};
    use flowlog_record::enriched::Identity;

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
                seq: 0,
                start_ns: 1,
                end_ns: 2,
                family: Family::Ipv4,
                local_addr: "192.0.2.1".parse().unwrap(),
                local_port: 40_000,
                remote_addr: "10.0.0.1".parse().unwrap(),
                remote_port: 443,
                direction: Direction::Outbound,
                outcome: flowlog_record::record::Outcome::Closed,
                bytes_sent: 0,
                bytes_received: 0,
                segs_sent: 0,
                segs_received: 0,
                retransmits: 0,
                resets_sent: 0,
                resets_received: 0,
                srtt_us: 0,
                min_rtt_us: 0,
                pid: None,
                comm: None,
                cgroup_id: None,
                adopted: false,
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

    /// `(name, labels as "k=v,…")` of one end per row; `None` where the identity is null.
    fn end_columns(batch: &RecordBatch, end: &str) -> Vec<Option<(String, String)>> {
        let end = batch.column_by_name(end).unwrap().as_struct();
        let names = end.column_by_name("name").unwrap().as_string::<i32>();
        let labels = end.column_by_name("labels").unwrap().as_map();
        (0..end.len())
            .map(|row| {
                assert_eq!(names.is_null(row), labels.is_null(row), "row {row}");
                (!names.is_null(row)).then(|| {
                    let entries = labels.value(row);
                    let keys = entries.column(0).as_string::<i32>();
                    let values = entries.column(1).as_string::<i32>();
                    let text: Vec<String> = (0..entries.len())
                        .map(|i| format!("{}={}", keys.value(i), values.value(i)))
                        .collect();
                    (names.value(row).to_string(), text.join(","))
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
        let source = remote.column_by_name("source").unwrap().as_string::<i32>();
        assert_eq!(source.value(0), "kubernetes");
    }

    #[test]
    fn an_empty_batch_has_the_schema() {
        let batch = FlowBatchBuilder::new().finish().unwrap();
        assert_eq!(batch.num_rows(), 0);
        assert_eq!(batch.schema(), enriched_flow_schema());
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
}
