-- The views flowlog's reports are built on, for ClickHouse (also chDB): the same questions as
-- analysis/duckdb/, in ClickHouse's dialect. Run this file once, then a report (connections,
-- availability, audit, capacity). Parameterized views: every report passes the parameters on,
-- so set them in the session first (clickhouse-client: --param_data=..., or SET param_data):
--   data     a path or glob of the Parquet files for the file() table function, e.g.
--            'flowlogs/**/*.parquet' (for S3, replace file(...) below with s3(...))
--   skew_ns  how far two hosts' clocks may disagree, in ns (e.g. 1000000000)
--   from_ns, to_ns  the window, ns since the epoch: connections that overlap it
-- and, for capacity.sql, price_per_gb (e.g. 0.01).
--
-- Statements are separated by `;` at the end of a line.

CREATE DATABASE IF NOT EXISTS flowlog;

-- An end's owner as one string: the workload (or the name) with its namespace when attributed
-- exactly, the candidates when ambiguous, else the address.
CREATE OR REPLACE FUNCTION flowlog_owner AS (e, addr) -> multiIf(
    tupleElement(e, 'status') = 'exact', concat(if(isNull(tupleElement(e, 'namespace')), '', concat(tupleElement(e, 'namespace'), '/')),
        coalesce(tupleElement(e, 'workload_name'), tupleElement(e, 'name'), addr)),
    tupleElement(e, 'status') = 'ambiguous', concat('one of ', arrayStringConcat(tupleElement(e, 'candidates'), ', ')),
    addr);

-- The attribution to name an end by: the other end's record of it when exact, else its own
-- record's, else the other's (see analysis/duckdb/views.sql). A missing end's tuple has an
-- empty status (tuples cannot be null).
CREATE OR REPLACE FUNCTION flowlog_pick AS (peer_view, own_view) ->
    multiIf(tupleElement(peer_view, 'status') = 'exact', peer_view, tupleElement(own_view, 'status') != '', own_view, peer_view);

-- Delivery is at-least-once: (host, flow_id, seq) identifies a record.
CREATE OR REPLACE VIEW flowlog.records AS
    SELECT * FROM file({data:String}, Parquet)
    LIMIT 1 BY host, flow_id, seq;

-- One row per flow: its records' counters are deltas, so they add up; the last record has its
-- outcome and RTT.
CREATE OR REPLACE VIEW flowlog.flows AS
    SELECT
        host,
        flow_id,
        any(direction) AS direction,
        min(start_ns) AS start_ns,
        max(end_ns) AS end_ns,
        any(local_addr) AS local_addr,
        any(local_port) AS local_port,
        any(remote_addr) AS remote_addr,
        any(remote_port) AS remote_port,
        sum(bytes_sent) AS bytes_sent,
        sum(bytes_received) AS bytes_received,
        sum(retransmits) AS retransmits,
        sum(segs_sent) AS segs_sent,
        sum(resets_sent) + sum(resets_received) AS resets,
        argMax(outcome, seq) AS outcome,
        argMax(srtt_us, seq) AS srtt_us,
        argMax(local, seq) AS local_end,
        argMax(remote, seq) AS remote_end,
        max(coalesce(adopted, false)) AS adopted
    FROM flowlog.records(data = {data:String})
    GROUP BY host, flow_id;

-- One row per TCP connection: the client's outbound flow and the server's inbound flow with the
-- mirrored 4-tuple, overlapping in time within skew_ns, joined; one-sided where one is missing.
-- Every connection, whatever the window (the reports that compare windows read it).
CREATE OR REPLACE VIEW flowlog.all_connections AS
    SELECT
        c.host AS client_host,
        if(c.flow_id IS NULL, s.remote_addr, c.local_addr) AS client_addr,
        if(c.flow_id IS NULL, s.remote_port, c.local_port) AS client_port,
        flowlog_owner(flowlog_pick(s.remote_end, c.local_end), client_addr) AS client,
        flowlog_pick(s.remote_end, c.local_end).status AS client_status,
        if(flowlog_pick(s.remote_end, c.local_end).status = 'exact',
            flowlog_pick(s.remote_end, c.local_end).zone, NULL) AS client_zone,
        s.host AS server_host,
        if(s.flow_id IS NULL, c.remote_addr, s.local_addr) AS server_addr,
        if(s.flow_id IS NULL, c.remote_port, s.local_port) AS server_port,
        flowlog_owner(flowlog_pick(c.remote_end, s.local_end), server_addr) AS server,
        flowlog_pick(c.remote_end, s.local_end).status AS server_status,
        if(flowlog_pick(c.remote_end, s.local_end).status = 'exact',
            flowlog_pick(c.remote_end, s.local_end).zone, NULL) AS server_zone,
        coalesce(c.start_ns, s.start_ns) AS start_ns,
        greatest(coalesce(c.end_ns, 0), coalesce(s.end_ns, 0)) AS end_ns,
        coalesce(c.bytes_sent, s.bytes_received) AS bytes_up,
        coalesce(c.bytes_received, s.bytes_sent) AS bytes_down,
        if(c.flow_id IS NULL OR s.flow_id IS NULL, NULL,
            c.bytes_sent = s.bytes_received AND c.bytes_received = s.bytes_sent) AS bytes_agree,
        coalesce(c.outcome, s.outcome) AS outcome,
        c.retransmits AS retransmits_client,
        s.retransmits AS retransmits_server,
        coalesce(c.segs_sent, 0) + coalesce(s.segs_sent, 0) AS segs_sent,
        greatest(coalesce(c.resets, 0), coalesce(s.resets, 0)) AS resets,
        c.srtt_us AS rtt_us,
        multiIf(c.flow_id IS NOT NULL AND s.flow_id IS NOT NULL, 'both',
            c.flow_id IS NOT NULL, 'client', 'server') AS seen_from,
        coalesce(c.adopted, false) OR coalesce(s.adopted, false) AS adopted
    FROM (SELECT * FROM flowlog.flows(data = {data:String}) WHERE direction = 'outbound') AS c
    FULL OUTER JOIN
        (SELECT * FROM flowlog.flows(data = {data:String}) WHERE direction = 'inbound') AS s
        ON c.local_addr = s.remote_addr
        AND c.local_port = s.remote_port
        AND c.remote_addr = s.local_addr
        AND c.remote_port = s.local_port
        AND c.start_ns <= s.end_ns + {skew_ns:UInt64}
        AND s.start_ns <= c.end_ns + {skew_ns:UInt64}
    SETTINGS join_use_nulls = 1, allow_experimental_join_condition = 1;

-- The connections that overlap the window [from_ns, to_ns).
CREATE OR REPLACE VIEW flowlog.connections AS
    SELECT * FROM flowlog.all_connections(data = {data:String}, skew_ns = {skew_ns:UInt64})
    WHERE start_ns < {to_ns:UInt64} AND end_ns >= {from_ns:UInt64};

-- Every connection with the window it belongs to: 'current' if it overlaps [from_ns, to_ns),
-- else 'previous' if it overlaps the window of the same length just before; else null.
CREATE OR REPLACE VIEW flowlog.windowed_connections AS
    SELECT
        *,
        multiIf(
            start_ns < {to_ns:UInt64} AND end_ns >= {from_ns:UInt64}, 'current',
            start_ns < {from_ns:UInt64} AND toInt128(end_ns) >=
                2 * toInt128({from_ns:UInt64}) - toInt128({to_ns:UInt64}), 'previous',
            NULL) AS period
    FROM flowlog.all_connections(data = {data:String}, skew_ns = {skew_ns:UInt64});
