-- Capacity and cross-zone cost by hour and workload pair, the same columns as
-- analysis/duckdb/capacity.sql (price_per_gb: the price of a GB, 2^30 bytes, crossing zones in
-- each direction). Run views.sql first (it says which parameters to set).
SELECT
    toStartOfHour(fromUnixTimestamp64Nano(toInt64(start_ns), 'UTC')) AS hour,
    client,
    client_zone,
    server,
    server_port,
    server_zone,
    count() AS connections,
    sum(bytes_up) AS bytes_up,
    sum(bytes_down) AS bytes_down,
    sum(bytes_up + bytes_down) AS bytes,
    client_zone != server_zone AS cross_zone,
    if(client_zone != server_zone,
        sum(bytes_up + bytes_down) * 2 * {price_per_gb:Float64} / 1073741824, 0) AS cross_zone_cost
FROM flowlog.connections(data = {data:String}, skew_ns = {skew_ns:UInt64},
    from_ns = {from_ns:UInt64}, to_ns = {to_ns:UInt64})
GROUP BY hour, client, client_zone, server, server_port, server_zone
ORDER BY hour, bytes DESC, client, server, server_port
-- The output columns keep the input columns' names: aggregates read the input columns.
SETTINGS prefer_column_name_to_alias = 1;
