-- The views flowlog's reports are built on (DuckDB): `records`, `flows` (one row per flow),
-- `all_connections` (one row per TCP connection, its two ends joined), `connections` (those of
-- the window) and `windowed_connections` (each marked current, previous or neither). Read this file first, then
-- a report (connections.sql, availability.sql, audit.sql, capacity.sql).
--
-- Variables, set before reading this file:
--   data     a path or glob of the Parquet files, e.g. 'flowlogs/**/*.parquet' (local) or
--            's3://bucket/flows/**/*.parquet' (with DuckDB's httpfs and credentials)
--   skew_ns  how far two hosts' clocks may disagree, in ns: the two ends of a connection must
--            overlap in time within it (e.g. 1000000000)
--   from_ns, to_ns  the window, ns since the epoch: connections that overlap it
--            (e.g. 0 and 9223372036854775807 for everything)
--
--   duckdb -c "SET VARIABLE data = 'flowlogs/**/*.parquet'; SET VARIABLE skew_ns = 1000000000;
--              SET VARIABLE from_ns = 0; SET VARIABLE to_ns = 9223372036854775807;" \
--          -c ".read analysis/duckdb/views.sql" -c ".read analysis/duckdb/capacity.sql"

-- An end's owner as one string: the workload (or the name) with its namespace when the
-- enricher attributed it exactly, the candidates when ambiguous, else the address.
CREATE OR REPLACE TEMP MACRO owner(e, addr) AS
    CASE
        WHEN e.status = 'exact'
            THEN coalesce(e.namespace || '/', '') || coalesce(e.workload_name, e.name)
        WHEN e.status = 'ambiguous' THEN 'one of ' || array_to_string(e.candidates, ', ')
        ELSE addr
    END;

-- The attribution to name an end by: the other end's record of it (the inventory that owns its
-- address, as the peer saw it) when exact, else its own record's (e.g. a container found by its
-- cgroup on a one-host run), else whichever there is. Address-based first, so that both ends of
-- a connection are named the same way whichever host reported them.
CREATE OR REPLACE TEMP MACRO pick(peer_view, own_view) AS
    CASE WHEN peer_view.status = 'exact' THEN peer_view ELSE coalesce(own_view, peer_view) END;

-- An end's zone, when the enricher attributed it exactly and its owner has one.
CREATE OR REPLACE TEMP MACRO owner_zone(e) AS CASE WHEN e.status = 'exact' THEN e.zone END;

CREATE OR REPLACE TEMP VIEW records AS
    -- Delivery is at-least-once: (host, flow_id, seq) identifies a record.
    SELECT DISTINCT ON (host, flow_id, seq) *
    FROM read_parquet(getvariable('data'), hive_partitioning = true, union_by_name = true);

CREATE OR REPLACE TEMP VIEW flows AS
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
        sum(segs_sent)::UBIGINT AS segs_sent,
        (sum(resets_sent) + sum(resets_received))::UBIGINT AS resets,
        arg_max(outcome, seq) AS outcome,
        arg_max(srtt_us, seq) AS srtt_us,
        arg_max(local, seq) AS local_end,
        arg_max(remote, seq) AS remote_end,
        bool_or(coalesce(adopted, false)) AS adopted
    FROM records
    GROUP BY host, flow_id;

-- Every connection, whatever the window (the reports that compare windows read it).
CREATE OR REPLACE TEMP VIEW all_connections AS
WITH clients AS (SELECT * FROM flows WHERE direction = 'outbound'),
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
    owner(pick(s.remote_end, c.local_end), coalesce(c.local_addr, s.remote_addr)) AS client,
    pick(s.remote_end, c.local_end).status AS client_status,
    owner_zone(pick(s.remote_end, c.local_end)) AS client_zone,
    s.host AS server_host,
    coalesce(s.local_addr, c.remote_addr) AS server_addr,
    coalesce(s.local_port, c.remote_port) AS server_port,
    owner(pick(c.remote_end, s.local_end), coalesce(s.local_addr, c.remote_addr)) AS server,
    pick(c.remote_end, s.local_end).status AS server_status,
    owner_zone(pick(c.remote_end, s.local_end)) AS server_zone,
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
    coalesce(c.segs_sent, 0) + coalesce(s.segs_sent, 0) AS segs_sent,
    greatest(coalesce(c.resets, 0), coalesce(s.resets, 0)) AS resets,
    c.srtt_us AS rtt_us,
    CASE
        WHEN c.flow_id IS NOT NULL AND s.flow_id IS NOT NULL THEN 'both'
        WHEN c.flow_id IS NOT NULL THEN 'client'
        ELSE 'server'
    END AS seen_from,
    coalesce(c.adopted, false) OR coalesce(s.adopted, false) AS adopted
FROM joined;

-- The connections that overlap the window [from_ns, to_ns).
CREATE OR REPLACE TEMP VIEW connections AS
    SELECT * FROM all_connections
    WHERE start_ns < getvariable('to_ns') AND end_ns >= getvariable('from_ns');

-- Every connection with the window it belongs to: 'current' if it overlaps [from_ns, to_ns),
-- else 'previous' if it overlaps the window of the same length just before; else neither.
CREATE OR REPLACE TEMP VIEW windowed_connections AS
    SELECT
        *,
        CASE
            WHEN start_ns < getvariable('to_ns') AND end_ns >= getvariable('from_ns')
                THEN 'current'
            WHEN start_ns < getvariable('from_ns') AND end_ns::HUGEINT >=
                2 * getvariable('from_ns')::HUGEINT - getvariable('to_ns')::HUGEINT
                THEN 'previous'
        END AS period
    FROM all_connections;
