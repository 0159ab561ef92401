-- flows.enriched straight into ClickHouse, for the reports of this directory without Parquet
-- files: a Kafka-engine table that reads the topic, a MergeTree table with the columns of
-- flowlog's Parquet files (enricher/src/storage/schema.rs), and a materialized view that moves
-- every message from the one into the other as it arrives. Run views.sql first, then this file
-- once: it also redefines flowlog.records to read the table, so that the reports run unchanged,
-- with the parameter data naming the table to read by a regular expression over the tables of
-- database flowlog (--param_data='^enriched$').
--
-- Edit the four quoted values of flowlog.enriched_queue's SETTINGS (marked "edit") first: the
-- brokers, the topic, the consumer group and the schema registry the enricher's ids are in
-- (schemas/README.md: "Registering in a Confluent Schema Registry"). The messages are Avro in
-- the Confluent framing (AvroConfluent): each one's schema comes from the registry by its id,
-- so records of schemas/enriched_flow.v1.avsc (no adopted: read as false) and .v2 both load.
--
-- Statements are separated by `;` at the end of a line.

CREATE DATABASE IF NOT EXISTS flowlog;

-- The topic's records as the Avro schema has them: signed longs and ints, enums as their
-- symbols, addresses as raw bytes, each end's identity null unless the end is exact (read as a
-- tuple of empty values, as ClickHouse does with an Avro union of null and a record). Fields a
-- later schema version adds are read once added here, to the table below and to the view.
CREATE TABLE IF NOT EXISTS flowlog.enriched_queue
(
    flow_id Int64,
    host String,
    seq Int32,
    start_ns Int64,
    end_ns Int64,
    family String,
    local_addr String,
    local_port Int32,
    remote_addr String,
    remote_port Int32,
    direction String,
    outcome String,
    bytes_sent Int64,
    bytes_received Int64,
    segs_sent Int64,
    segs_received Int64,
    retransmits Int64,
    resets_sent Int64,
    resets_received Int64,
    srtt_us Int32,
    min_rtt_us Int32,
    pid Nullable(Int32),
    comm Nullable(String),
    cgroup_id Nullable(Int64),
    local Tuple(
        status String,
        identity Tuple(
            kind String, name String, namespace Nullable(String),
            workload Tuple(kind String, name String), labels Map(String, String),
            node Nullable(String), zone Nullable(String), region Nullable(String),
            account Nullable(String), vpc Nullable(String), subnet Nullable(String),
            instance_id Nullable(String), container_id Nullable(String),
            pod_uid Nullable(String), source String),
        candidates Array(String)),
    remote Tuple(
        status String,
        identity Tuple(
            kind String, name String, namespace Nullable(String),
            workload Tuple(kind String, name String), labels Map(String, String),
            node Nullable(String), zone Nullable(String), region Nullable(String),
            account Nullable(String), vpc Nullable(String), subnet Nullable(String),
            instance_id Nullable(String), container_id Nullable(String),
            pod_uid Nullable(String), source String),
        candidates Array(String)),
    enriched_ns Int64,
    adopted Bool
)
ENGINE = Kafka
SETTINGS
    kafka_broker_list = 'kafka:9092',                                    -- edit
    kafka_topic_list = 'flows.enriched',                                 -- edit
    kafka_group_name = 'clickhouse-flowlog',                             -- edit
    format_avro_schema_registry_url = 'http://schema-registry:8081',     -- edit
    kafka_format = 'AvroConfluent',
    input_format_avro_allow_missing_fields = 1;

-- Every record, in the Parquet files' columns and types: flowlog.records reads it. Delivery is
-- at-least-once, so a record can be here twice, as in the files; the views deduplicate on
-- (host, flow_id, seq). Partitioned by the day of end_ns, like the files' dt=.
CREATE TABLE IF NOT EXISTS flowlog.enriched
(
    flow_id UInt64,
    host String,
    seq UInt32,
    start_ns UInt64,
    end_ns UInt64,
    family String,
    local_addr String,
    local_port UInt16,
    remote_addr String,
    remote_port UInt16,
    direction String,
    outcome String,
    bytes_sent UInt64,
    bytes_received UInt64,
    segs_sent UInt64,
    segs_received UInt64,
    retransmits UInt64,
    resets_sent UInt64,
    resets_received UInt64,
    srtt_us UInt32,
    min_rtt_us UInt32,
    pid Nullable(UInt32),
    comm Nullable(String),
    cgroup_id Nullable(UInt64),
    local Tuple(
        status String, kind Nullable(String), name Nullable(String),
        namespace Nullable(String), workload_kind Nullable(String),
        workload_name Nullable(String), labels Map(String, String), node Nullable(String),
        zone Nullable(String), region Nullable(String), account Nullable(String),
        vpc Nullable(String), subnet Nullable(String), instance_id Nullable(String),
        container_id Nullable(String), pod_uid Nullable(String), source Nullable(String),
        candidates Array(String)),
    remote Tuple(
        status String, kind Nullable(String), name Nullable(String),
        namespace Nullable(String), workload_kind Nullable(String),
        workload_name Nullable(String), labels Map(String, String), node Nullable(String),
        zone Nullable(String), region Nullable(String), account Nullable(String),
        vpc Nullable(String), subnet Nullable(String), instance_id Nullable(String),
        container_id Nullable(String), pod_uid Nullable(String), source Nullable(String),
        candidates Array(String)),
    enriched_ns UInt64,
    adopted Bool
)
ENGINE = MergeTree
PARTITION BY toDate(intDiv(end_ns, 1000000000))
ORDER BY (host, flow_id, seq);

-- An address as the Parquet files write it: 4 bytes as IPv4 text, 16 as IPv6 text
-- ('::ffff:10.0.0.1' for a mapped one).
CREATE OR REPLACE FUNCTION flowlog_address AS (a) -> if(length(a) = 4,
    IPv4NumToString(reinterpretAsUInt32(reverse(a))),
    IPv6NumToString(toFixedString(a, 16)));

-- A field of an end's identity, null unless the end is exact.
CREATE OR REPLACE FUNCTION flowlog_identity AS (e, field) -> if(tupleElement(e, 'status') = 'exact',
    tupleElement(tupleElement(e, 'identity'), field), NULL);

-- A field of an end's workload, null unless the end is exact and has one (none reads as empty).
CREATE OR REPLACE FUNCTION flowlog_workload AS (e, field) -> if(tupleElement(e, 'status') = 'exact'
    AND tupleElement(tupleElement(tupleElement(e, 'identity'), 'workload'), 'kind') != '',
    tupleElement(tupleElement(tupleElement(e, 'identity'), 'workload'), field), NULL);

-- An end as the Parquet files write it: the status, the identity's fields (null unless the end
-- is exact) and the candidates.
CREATE OR REPLACE FUNCTION flowlog_end AS (e) -> tuple(
    tupleElement(e, 'status'),
    flowlog_identity(e, 'kind'),
    flowlog_identity(e, 'name'),
    flowlog_identity(e, 'namespace'),
    flowlog_workload(e, 'kind'),
    flowlog_workload(e, 'name'),
    tupleElement(tupleElement(e, 'identity'), 'labels'),
    flowlog_identity(e, 'node'),
    flowlog_identity(e, 'zone'),
    flowlog_identity(e, 'region'),
    flowlog_identity(e, 'account'),
    flowlog_identity(e, 'vpc'),
    flowlog_identity(e, 'subnet'),
    flowlog_identity(e, 'instance_id'),
    flowlog_identity(e, 'container_id'),
    flowlog_identity(e, 'pod_uid'),
    flowlog_identity(e, 'source'),
    tupleElement(e, 'candidates'));

-- The move: unsigned values from the two's-complement bits Avro carries them in (a flow_id of
-- 2^63 or more is a negative long there), addresses as text.
CREATE MATERIALIZED VIEW IF NOT EXISTS flowlog.enriched_mv TO flowlog.enriched AS
    SELECT
        toUInt64(flow_id) AS flow_id,
        host,
        toUInt32(seq) AS seq,
        toUInt64(start_ns) AS start_ns,
        toUInt64(end_ns) AS end_ns,
        family,
        flowlog_address(local_addr) AS local_addr,
        toUInt16(local_port) AS local_port,
        flowlog_address(remote_addr) AS remote_addr,
        toUInt16(remote_port) AS remote_port,
        direction,
        outcome,
        toUInt64(bytes_sent) AS bytes_sent,
        toUInt64(bytes_received) AS bytes_received,
        toUInt64(segs_sent) AS segs_sent,
        toUInt64(segs_received) AS segs_received,
        toUInt64(retransmits) AS retransmits,
        toUInt64(resets_sent) AS resets_sent,
        toUInt64(resets_received) AS resets_received,
        toUInt32(srtt_us) AS srtt_us,
        toUInt32(min_rtt_us) AS min_rtt_us,
        toUInt32(pid) AS pid,
        comm,
        toUInt64(cgroup_id) AS cgroup_id,
        flowlog_end(local) AS local,
        flowlog_end(remote) AS remote,
        toUInt64(enriched_ns) AS enriched_ns,
        adopted
    FROM flowlog.enriched_queue;

-- views.sql's flowlog.records over the table instead of file(): the one line that differs.
CREATE OR REPLACE VIEW flowlog.records AS
    SELECT * FROM merge('flowlog', {data:String})
    LIMIT 1 BY host, flow_id, seq;
