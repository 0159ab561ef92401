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
    count(*) AS connections,
    count(*) FILTER (WHERE outcome = 'failed') AS failed,
    count(*) FILTER (WHERE outcome = 'reset') AS resets,
    sum(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0))::UBIGINT AS retransmits,
    CASE WHEN sum(segs_sent) > 0
        THEN sum(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0)) / sum(segs_sent)
    END AS retransmit_rate,
    -- Nearest-rank percentiles (the value at rank ceil(p × n) of the sorted RTTs), spelled out
    -- so that every engine gives the same number.
    list_sort(list(rtt_us) FILTER (WHERE rtt_us > 0))[
        ceil(0.5 * count(*) FILTER (WHERE rtt_us > 0))::BIGINT] AS rtt_p50_us,
    list_sort(list(rtt_us) FILTER (WHERE rtt_us > 0))[
        ceil(0.99 * count(*) FILTER (WHERE rtt_us > 0))::BIGINT] AS rtt_p99_us,
    (count(*) FILTER (WHERE outcome IN ('failed', 'reset')))::DOUBLE / count(*) AS unhealthy
FROM connections
GROUP BY client, server, server_port
ORDER BY unhealthy DESC, retransmit_rate DESC NULLS LAST, connections DESC, client, server, server_port;
