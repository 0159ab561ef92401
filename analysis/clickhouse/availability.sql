-- Availability per service pair (client → server:port), worst first: the same columns as
-- analysis/duckdb/availability.sql. Run views.sql first (it says which parameters to set).
SELECT
    client,
    server,
    server_port,
    countIf(period = 'current') AS connections,
    countIf(period = 'current' AND outcome = 'failed') AS failed,
    countIf(period = 'current' AND outcome = 'reset') AS resets,
    sumIf(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0),
        period = 'current') AS retransmits,
    if(sumIf(segs_sent, period = 'current') = 0, NULL,
        sumIf(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0),
            period = 'current') / sumIf(segs_sent, period = 'current')) AS retransmit_rate,
    -- Nearest-rank percentiles (the value at rank ceil(p × n) of the sorted RTTs), spelled out
    -- so that every engine gives the same number.
    if(countIf(period = 'current' AND rtt_us > 0) = 0, NULL,
        arraySort(groupArrayIf(rtt_us, period = 'current' AND rtt_us > 0))[
            toUInt64(ceil(0.5 * countIf(period = 'current' AND rtt_us > 0)))]) AS rtt_p50_us,
    if(countIf(period = 'current' AND rtt_us > 0) = 0, NULL,
        arraySort(groupArrayIf(rtt_us, period = 'current' AND rtt_us > 0))[
            toUInt64(ceil(0.99 * countIf(period = 'current' AND rtt_us > 0)))]) AS rtt_p99_us,
    countIf(period = 'current' AND outcome IN ('failed', 'reset'))
        / countIf(period = 'current') AS unhealthy,
    countIf(period = 'previous') AS prev_connections,
    if(countIf(period = 'previous') = 0, NULL,
        countIf(period = 'previous' AND outcome IN ('failed', 'reset'))
            / countIf(period = 'previous')) AS prev_unhealthy,
    if(sumIf(segs_sent, period = 'previous') = 0, NULL,
        sumIf(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0),
            period = 'previous') / sumIf(segs_sent, period = 'previous')) AS prev_retransmit_rate,
    if(countIf(period = 'previous') = 0, NULL,
        unhealthy > prev_unhealthy OR coalesce(retransmit_rate > prev_retransmit_rate, false))
        AS worse
FROM flowlog.windowed_connections(data = {data:String}, skew_ns = {skew_ns:UInt64},
    from_ns = {from_ns:UInt64}, to_ns = {to_ns:UInt64})
WHERE period IS NOT NULL
GROUP BY client, server, server_port
HAVING countIf(period = 'current') > 0
ORDER BY unhealthy DESC, retransmit_rate DESC NULLS LAST, connections DESC, client, server,
    server_port;
