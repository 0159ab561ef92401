-- Capacity and cross-zone cost by hour and workload pair: the columns and order of
-- analysis/duckdb/capacity.sql. `hour` is text in DuckDB's rendering of a timestamp
-- ('2026-12-07 22:00:00', UTC). ${price_per_gb}: the price of a GB (2^30 bytes) crossing
-- zones, charged in each direction.
SELECT
    to_char(date_trunc('hour', to_timestamp_micros(CAST(start_ns / 1000 AS BIGINT))),
        '%Y-%m-%d %H:%M:%S') AS hour,
    client,
    client_zone,
    server,
    server_port,
    server_zone,
    count(*) AS connections,
    sum(bytes_up) AS bytes_up,
    sum(bytes_down) AS bytes_down,
    sum(bytes_up + bytes_down) AS bytes,
    client_zone <> server_zone AS cross_zone,
    CASE WHEN client_zone <> server_zone
        THEN CAST(sum(bytes_up + bytes_down) AS DOUBLE) * 2 * ${price_per_gb} / 1073741824
        ELSE 0
    END AS cross_zone_cost
FROM connections
GROUP BY 1, client, client_zone, server, server_port, server_zone
ORDER BY hour, bytes DESC, client, server, server_port
