-- Availability, per service pair (client → server:port), worst first: the columns and order of
-- analysis/duckdb/availability.sql. Integer sums are cast to DOUBLE before dividing (DuckDB's
-- `/` divides as floating point, DataFusion's as integers). The percentiles are nearest-rank:
-- the value at rank ceil(p × n) of the sorted RTTs (arrays are 1-based).
WITH pairs AS (
    SELECT
        client,
        server,
        server_port,
        count(*) FILTER (WHERE period = 'current') AS connections,
        count(*) FILTER (WHERE period = 'current' AND outcome = 'failed') AS failed,
        count(*) FILTER (WHERE period = 'current' AND outcome = 'reset') AS resets,
        sum(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0))
            FILTER (WHERE period = 'current') AS retransmits,
        CAST(sum(segs_sent) FILTER (WHERE period = 'current') AS DOUBLE) AS segs,
        array_sort(array_agg(rtt_us) FILTER (WHERE period = 'current' AND rtt_us > 0)) AS rtts,
        count(*) FILTER (WHERE period = 'current' AND rtt_us > 0) AS rtt_count,
        count(*) FILTER (WHERE period = 'current' AND outcome IN ('failed', 'reset')) AS bad,
        count(*) FILTER (WHERE period = 'previous') AS prev_connections,
        count(*) FILTER (WHERE period = 'previous' AND outcome IN ('failed', 'reset'))
            AS prev_bad,
        CAST(sum(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0))
            FILTER (WHERE period = 'previous') AS DOUBLE) AS prev_retransmits,
        CAST(sum(segs_sent) FILTER (WHERE period = 'previous') AS DOUBLE) AS prev_segs
    FROM windowed_connections
    WHERE period IS NOT NULL
    GROUP BY client, server, server_port
    HAVING count(*) FILTER (WHERE period = 'current') > 0
),
rates AS (
    SELECT
        *,
        CAST(retransmits AS DOUBLE) / nullif(segs, 0) AS retransmit_rate,
        CAST(bad AS DOUBLE) / connections AS unhealthy,
        CAST(prev_bad AS DOUBLE) / nullif(prev_connections, 0) AS prev_unhealthy,
        prev_retransmits / nullif(prev_segs, 0) AS prev_retransmit_rate
    FROM pairs
)
SELECT
    client,
    server,
    server_port,
    connections,
    failed,
    resets,
    retransmits,
    retransmit_rate,
    rtts[CAST(ceil(0.5 * rtt_count) AS BIGINT)] AS rtt_p50_us,
    rtts[CAST(ceil(0.99 * rtt_count) AS BIGINT)] AS rtt_p99_us,
    unhealthy,
    prev_connections,
    prev_unhealthy,
    prev_retransmit_rate,
    CASE WHEN prev_connections > 0 THEN
        unhealthy > prev_unhealthy OR coalesce(retransmit_rate > prev_retransmit_rate, false)
    END AS worse
FROM rates
ORDER BY unhealthy DESC, retransmit_rate DESC NULLS LAST, connections DESC, client, server,
    server_port
