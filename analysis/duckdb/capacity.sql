-- Capacity and cost: bytes between workloads by hour, and what crossing zones costs. One row
-- per (hour, client, server, server_port). Read views.sql first (it says which variables to
-- set), and set one more:
--   price_per_gb  the price of a GB (2^30 bytes) crossing zones, charged in each direction
--                 (AWS's public inter-AZ rate is 0.01: 0.01 out of one zone and 0.01 into the
--                 other, so 0.02 per GB crossed)
--
-- Columns: hour (the connection's start, UTC), client, client_zone, server, server_port,
-- server_zone, connections, bytes_up, bytes_down, bytes (both ways), cross_zone (both zones are
-- known and differ; null when either is unknown), cross_zone_cost (bytes × 2 × price_per_gb /
-- 2^30 when cross_zone, else 0). Top talkers: sort by bytes; internet egress: rows whose server
-- has no owner (server_zone null and server an address).
SELECT
    date_trunc('hour', make_timestamp((start_ns // 1000)::BIGINT)) AS hour,
    client,
    client_zone,
    server,
    server_port,
    server_zone,
    count(*) AS connections,
    sum(bytes_up)::UBIGINT AS bytes_up,
    sum(bytes_down)::UBIGINT AS bytes_down,
    sum(bytes_up + bytes_down)::UBIGINT AS bytes,
    client_zone <> server_zone AS cross_zone,
    CASE WHEN client_zone <> server_zone
        THEN sum(bytes_up + bytes_down) * 2 * getvariable('price_per_gb') / 1073741824
        ELSE 0
    END AS cross_zone_cost
FROM connections
GROUP BY hour, client, client_zone, server, server_port, server_zone
ORDER BY hour, bytes DESC, client, server, server_port;
