-- Availability per service pair (client → server:port), worst first: the same columns as
-- analysis/duckdb/availability.sql. Run views.sql first (it says which parameters to set).
SELECT
    client,
    server,
    server_port,
    count() AS connections,
    countIf(outcome = 'failed') AS failed,
    countIf(outcome = 'reset') AS resets,
    sum(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0)) AS retransmits,
    if(sum(segs_sent) > 0,
        sum(coalesce(retransmits_client, 0) + coalesce(retransmits_server, 0)) / sum(segs_sent),
        NULL) AS retransmit_rate,
    -- Nearest-rank percentiles (the value at rank ceil(p × n) of the sorted RTTs), spelled out
    -- so that every engine gives the same number.
    if(countIf(rtt_us > 0) = 0, NULL, arraySort(groupArrayIf(rtt_us, rtt_us > 0))[
        toUInt64(ceil(0.5 * countIf(rtt_us > 0)))]) AS rtt_p50_us,
    if(countIf(rtt_us > 0) = 0, NULL, arraySort(groupArrayIf(rtt_us, rtt_us > 0))[
        toUInt64(ceil(0.99 * countIf(rtt_us > 0)))]) AS rtt_p99_us,
    countIf(outcome IN ('failed', 'reset')) / count() AS unhealthy
FROM flowlog.connections(data = {data:String}, skew_ns = {skew_ns:UInt64},
    from_ns = {from_ns:UInt64}, to_ns = {to_ns:UInt64})
GROUP BY client, server, server_port
ORDER BY unhealthy DESC, retransmit_rate DESC NULLS LAST, connections DESC, client, server,
    server_port
-- The output columns keep the input columns' names: aggregates read the input columns.
SETTINGS prefer_column_name_to_alias = 1;
