-- Availability: is the network between my services healthy? One row per service pair (client
-- → server:port), worst first. Read views.sql first (it says which variables to set).
--
-- Columns: client, server, server_port, connections, failed (connects whose handshake never
-- completed: refused or timed out), resets (connections that ended with a reset), retransmits
-- (both ends), retransmit_rate (retransmitted segments over segments sent, both ends),
-- rtt_p50_us, rtt_p99_us (nearest-rank percentiles of the clients' smoothed RTTs at each
-- connection's last record, where a client end was seen and measured one), unhealthy (failed + resets, over connections).
SELECT
    client,
    server,
    server_port,
    count(*) FILTER (WHERE period = 'current') AS connections,
    count(*) FILTER (WHERE period = 'current' AND outcome = 'failed') AS failed,
    count(*) FILTER (WHERE period = 'current' AND outcome = 'reset') AS resets,
    sum(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0))
        FILTER (WHERE period = 'current')::UBIGINT AS retransmits,
    sum(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0))
        FILTER (WHERE period = 'current')
        / nullif(sum(segs_sent) FILTER (WHERE period = 'current'), 0) AS retransmit_rate,
    -- Nearest-rank percentiles (the value at rank ceil(p × n) of the sorted RTTs), spelled out
    -- so that every engine gives the same number.
    list_sort(list(rtt_us) FILTER (WHERE period = 'current' AND rtt_us > 0))[
        ceil(0.5 * count(*) FILTER (WHERE period = 'current' AND rtt_us > 0))::BIGINT]
        AS rtt_p50_us,
    list_sort(list(rtt_us) FILTER (WHERE period = 'current' AND rtt_us > 0))[
        ceil(0.99 * count(*) FILTER (WHERE period = 'current' AND rtt_us > 0))::BIGINT]
        AS rtt_p99_us,
    (count(*) FILTER (WHERE period = 'current' AND outcome IN ('failed', 'reset')))::DOUBLE
        / count(*) FILTER (WHERE period = 'current') AS unhealthy,
    count(*) FILTER (WHERE period = 'previous') AS prev_connections,
    (count(*) FILTER (WHERE period = 'previous' AND outcome IN ('failed', 'reset')))::DOUBLE
        / nullif(count(*) FILTER (WHERE period = 'previous'), 0) AS prev_unhealthy,
    sum(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0))
        FILTER (WHERE period = 'previous')
        / nullif(sum(segs_sent) FILTER (WHERE period = 'previous'), 0) AS prev_retransmit_rate,
    CASE WHEN count(*) FILTER (WHERE period = 'previous') > 0 THEN
        unhealthy > prev_unhealthy OR coalesce(retransmit_rate > prev_retransmit_rate, false)
    END AS worse
FROM windowed_connections
WHERE period IS NOT NULL
GROUP BY client, server, server_port
HAVING count(*) FILTER (WHERE period = 'current') > 0
ORDER BY unhealthy DESC, retransmit_rate DESC NULLS LAST, connections DESC, client, server,
    server_port;
