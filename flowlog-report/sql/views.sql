-- The views flowlog's reports are built on, in DataFusion's dialect: the same questions and
-- the same answers as analysis/duckdb/views.sql (read it for the why of each step). `flowlog
-- report` registers the Parquet files of the window as the table `flow_files`, replaces each
-- ${name} below with a literal, and runs the statements (separated by `;` at the end of a
-- line) in order, then a report.
--   ${skew_ns}        how far two hosts' clocks may disagree, in ns
--   ${from_ns}, ${to_ns}  the window [from_ns, to_ns), ns since the epoch
--   ${prev_from_ns}   the start of the window of the same length just before (0 if before 1970)
--   ${filter}         a condition on all_connections' columns (`--namespace`, `--workload`,
--                     `--host`), TRUE for none
--
-- DuckDB's macros `owner`, `pick` and `owner_zone` work on whole structs; here each end of a
-- record is reduced to the three things the reports read (status, owner text, zone) once per
-- record, which is the same thing: `owner(e, addr)` only reads `e` and the address of the end
-- `e` describes, and a record carries that address.

-- Delivery is at-least-once: (host, flow_id, seq) identifies a record.
CREATE VIEW records AS
    SELECT DISTINCT ON (host, flow_id, seq)
        host, flow_id, seq, direction, start_ns, end_ns,
        local_addr, local_port, remote_addr, remote_port,
        bytes_sent, bytes_received, retransmits, segs_sent, resets_sent, resets_received,
        outcome, srtt_us, adopted,
        "local"['status'] AS local_status,
        CASE
            WHEN "local"['status'] = 'exact' THEN coalesce("local"['namespace'] || '/', '')
                || coalesce("local"['workload_name'], "local"['name'])
            WHEN "local"['status'] = 'ambiguous'
                THEN 'one of ' || array_to_string("local"['candidates'], ', ')
            ELSE local_addr
        END AS local_owner,
        CASE WHEN "local"['status'] = 'exact' THEN "local"['zone'] END AS local_zone,
        "remote"['status'] AS remote_status,
        CASE
            WHEN "remote"['status'] = 'exact' THEN coalesce("remote"['namespace'] || '/', '')
                || coalesce("remote"['workload_name'], "remote"['name'])
            WHEN "remote"['status'] = 'ambiguous'
                THEN 'one of ' || array_to_string("remote"['candidates'], ', ')
            ELSE remote_addr
        END AS remote_owner,
        CASE WHEN "remote"['status'] = 'exact' THEN "remote"['zone'] END AS remote_zone
    FROM flow_files;

-- One row per flow: its records' counters are deltas, so they add up; the last record (by seq)
-- has its outcome, RTT and attribution. The 4-tuple and direction are the same in every record
-- of a flow (min is any_value).
CREATE VIEW flows AS
    SELECT
        host,
        flow_id,
        min(direction) AS direction,
        min(start_ns) AS start_ns,
        max(end_ns) AS end_ns,
        min(local_addr) AS local_addr,
        min(local_port) AS local_port,
        min(remote_addr) AS remote_addr,
        min(remote_port) AS remote_port,
        sum(bytes_sent) AS bytes_sent,
        sum(bytes_received) AS bytes_received,
        sum(retransmits) AS retransmits,
        sum(segs_sent) AS segs_sent,
        sum(resets_sent) + sum(resets_received) AS resets,
        last_value(outcome ORDER BY seq) AS outcome,
        last_value(srtt_us ORDER BY seq) AS srtt_us,
        last_value(local_status ORDER BY seq) AS local_status,
        last_value(local_owner ORDER BY seq) AS local_owner,
        last_value(local_zone ORDER BY seq) AS local_zone,
        last_value(remote_status ORDER BY seq) AS remote_status,
        last_value(remote_owner ORDER BY seq) AS remote_owner,
        last_value(remote_zone ORDER BY seq) AS remote_zone,
        bool_or(coalesce(adopted, false)) AS adopted
    FROM records
    GROUP BY host, flow_id;

-- Every connection, whatever the window: the client's outbound flow and the server's inbound
-- flow with the mirrored 4-tuple, overlapping in time within skew_ns, joined; one-sided where
-- one is missing. An end is named by the other end's record of it when that is exact, else by
-- its own record when there is one, else by the other's (DuckDB's `pick`).
CREATE VIEW all_connections AS
WITH clients AS (SELECT * FROM flows WHERE direction = 'outbound'),
servers AS (SELECT * FROM flows WHERE direction = 'inbound'),
joined AS (
    SELECT
        c.host AS client_host,
        coalesce(c.local_addr, s.remote_addr) AS client_addr,
        coalesce(c.local_port, s.remote_port) AS client_port,
        CASE WHEN s.remote_status = 'exact' OR c.flow_id IS NULL
            THEN s.remote_owner ELSE c.local_owner END AS client,
        CASE WHEN s.remote_status = 'exact' OR c.flow_id IS NULL
            THEN s.remote_status ELSE c.local_status END AS client_status,
        CASE WHEN s.remote_status = 'exact' OR c.flow_id IS NULL
            THEN s.remote_zone ELSE c.local_zone END AS client_zone,
        s.host AS server_host,
        coalesce(s.local_addr, c.remote_addr) AS server_addr,
        coalesce(s.local_port, c.remote_port) AS server_port,
        CASE WHEN c.remote_status = 'exact' OR s.flow_id IS NULL
            THEN c.remote_owner ELSE s.local_owner END AS server,
        CASE WHEN c.remote_status = 'exact' OR s.flow_id IS NULL
            THEN c.remote_status ELSE s.local_status END AS server_status,
        CASE WHEN c.remote_status = 'exact' OR s.flow_id IS NULL
            THEN c.remote_zone ELSE s.local_zone END AS server_zone,
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
    FROM clients AS c
    FULL OUTER JOIN servers AS s
        ON c.local_addr = s.remote_addr
        AND c.local_port = s.remote_port
        AND c.remote_addr = s.local_addr
        AND c.remote_port = s.local_port
        -- The same 4-tuple is reused over time: the two ends must overlap.
        AND c.start_ns <= s.end_ns + CAST(${skew_ns} AS BIGINT UNSIGNED)
        AND s.start_ns <= c.end_ns + CAST(${skew_ns} AS BIGINT UNSIGNED)
)
SELECT * FROM joined WHERE ${filter};

-- The connections that overlap the window [from_ns, to_ns).
CREATE VIEW connections AS
    SELECT * FROM all_connections
    WHERE start_ns < CAST(${to_ns} AS BIGINT UNSIGNED)
        AND end_ns >= CAST(${from_ns} AS BIGINT UNSIGNED);

-- Every connection with the window it belongs to: 'current' if it overlaps [from_ns, to_ns),
-- else 'previous' if it overlaps the window of the same length just before; else neither.
CREATE VIEW windowed_connections AS
    SELECT
        *,
        CASE
            WHEN start_ns < CAST(${to_ns} AS BIGINT UNSIGNED)
                AND end_ns >= CAST(${from_ns} AS BIGINT UNSIGNED) THEN 'current'
            WHEN start_ns < CAST(${from_ns} AS BIGINT UNSIGNED)
                AND end_ns >= CAST(${prev_from_ns} AS BIGINT UNSIGNED) THEN 'previous'
        END AS period
    FROM all_connections;
