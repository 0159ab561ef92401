-- One row per TCP connection, from flowlog's Parquet files (DuckDB).
--
-- flowlog records a connection at each end it can see: the client's host reports it
-- `outbound`, the server's host `inbound`, with the 4-tuple mirrored. Summing bytes over records
-- counts such a connection twice; this query joins the two ends into one conversation:
-- who is the client and the server, bytes each way, the outcome, retransmits on each side and
-- the client's RTT. A connection seen from one end only (the peer is outside the fleet, or no
-- agent runs there) stays one row with `seen_from` = 'client' or 'server'.
--
-- Parameters (DuckDB variables, set before running this file):
--   data     a path or glob of the Parquet files, e.g. 'flowlogs/**/*.parquet' (local) or
--            's3://bucket/flows/**/*.parquet' (with DuckDB's httpfs and credentials)
--   skew_ns  how far the two hosts' clocks may disagree, in ns (the two ends' times must overlap
--            within it); e.g. 1000000000
--
--   duckdb -c "SET VARIABLE data = 'flowlogs/**/*.parquet'; SET VARIABLE skew_ns = 1000000000;" \
--          -c ".read analysis/duckdb/connections.sql"
--
-- Columns: client_host, client_addr, client_port, client (the client end's owner as the
-- enricher attributed it: kind/namespace/name or the address), server_host, server_addr,
-- server_port, server, start_ns, end_ns, bytes_up (client → server), bytes_down
-- (server → client), bytes_agree (both ends counted the same bytes each way; null when one end
-- is missing), outcome (the client's, else the server's: closed, reset, failed, open),
-- retransmits_client, retransmits_server, resets, rtt_us (the client's last smoothed RTT),
-- seen_from ('both', 'client', 'server'), adopted (either end was adopted at an agent's start:
-- its start is not the connection's).
-- An end's owner as one string: the workload (or the name) with its namespace when the
-- enricher attributed it exactly, the candidates when ambiguous, else the address.
CREATE OR REPLACE TEMP MACRO owner(e, addr) AS
    CASE
        WHEN e.status = 'exact'
            THEN coalesce(e.namespace || '/', '') || coalesce(e.workload_name, e.name)
        WHEN e.status = 'ambiguous' THEN 'one of ' || array_to_string(e.candidates, ', ')
        ELSE addr
    END;

WITH records AS (
    -- Delivery is at-least-once: (host, flow_id, seq) identifies a record.
    SELECT DISTINCT ON (host, flow_id, seq) *
    FROM read_parquet(getvariable('data'), hive_partitioning = true, union_by_name = true)
),
flows AS (
    -- One row per flow: its records' counters are deltas, so they add up; the last record has
    -- its outcome and RTT.
    SELECT
        host,
        flow_id,
        any_value(direction) AS direction,
        min(start_ns) AS start_ns,
        max(end_ns) AS end_ns,
        any_value(local_addr) AS local_addr,
        any_value(local_port) AS local_port,
        any_value(remote_addr) AS remote_addr,
        any_value(remote_port) AS remote_port,
        sum(bytes_sent)::UBIGINT AS bytes_sent,
        sum(bytes_received)::UBIGINT AS bytes_received,
        sum(retransmits)::UBIGINT AS retransmits,
        (sum(resets_sent) + sum(resets_received))::UBIGINT AS resets,
        arg_max(outcome, seq) AS outcome,
        arg_max(srtt_us, seq) AS srtt_us,
        arg_max(local, seq) AS local_end,
        arg_max(remote, seq) AS remote_end,
        bool_or(coalesce(adopted, false)) AS adopted
    FROM records
    GROUP BY host, flow_id
),
clients AS (SELECT * FROM flows WHERE direction = 'outbound'),
servers AS (SELECT * FROM flows WHERE direction = 'inbound'),
joined AS (
    -- Each side as a struct (all its fields null where that end is missing: test flow_id).
    SELECT c, s
    FROM clients AS c
    FULL OUTER JOIN servers AS s
        ON c.local_addr = s.remote_addr
        AND c.local_port = s.remote_port
        AND c.remote_addr = s.local_addr
        AND c.remote_port = s.local_port
        -- The same 4-tuple is reused over time: the two ends must overlap.
        AND c.start_ns <= s.end_ns + getvariable('skew_ns')
        AND s.start_ns <= c.end_ns + getvariable('skew_ns')
)
SELECT
    c.host AS client_host,
    coalesce(c.local_addr, s.remote_addr) AS client_addr,
    coalesce(c.local_port, s.remote_port) AS client_port,
    owner(coalesce(c.local_end, s.remote_end), coalesce(c.local_addr, s.remote_addr)) AS client,
    s.host AS server_host,
    coalesce(s.local_addr, c.remote_addr) AS server_addr,
    coalesce(s.local_port, c.remote_port) AS server_port,
    owner(coalesce(s.local_end, c.remote_end), coalesce(s.local_addr, c.remote_addr)) AS server,
    coalesce(c.start_ns, s.start_ns) AS start_ns,
    greatest(c.end_ns, s.end_ns) AS end_ns,
    coalesce(c.bytes_sent, s.bytes_received) AS bytes_up,
    coalesce(c.bytes_received, s.bytes_sent) AS bytes_down,
    CASE WHEN c.flow_id IS NOT NULL AND s.flow_id IS NOT NULL
        THEN c.bytes_sent = s.bytes_received AND c.bytes_received = s.bytes_sent
    END AS bytes_agree,
    coalesce(c.outcome, s.outcome) AS outcome,
    c.retransmits AS retransmits_client,
    s.retransmits AS retransmits_server,
    greatest(coalesce(c.resets, 0), coalesce(s.resets, 0)) AS resets,
    c.srtt_us AS rtt_us,
    CASE
        WHEN c.flow_id IS NOT NULL AND s.flow_id IS NOT NULL THEN 'both'
        WHEN c.flow_id IS NOT NULL THEN 'client'
        ELSE 'server'
    END AS seen_from,
    coalesce(c.adopted, false) OR coalesce(s.adopted, false) AS adopted
FROM joined
ORDER BY start_ns, client_addr, client_port;
