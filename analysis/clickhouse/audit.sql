-- Security audit: one row per distinct edge (client → server:port), the same columns as
-- analysis/duckdb/audit.sql. Run views.sql first (it says which parameters to set).
SELECT
    client,
    any(client_status) AS client_status,
    server,
    server_port,
    any(server_status) AS server_status,
    minIf(start_ns, period = 'current') AS first_seen_ns,
    maxIf(end_ns, period = 'current') AS last_seen_ns,
    countIf(period = 'current') AS connections,
    sumIf(bytes_up, period = 'current') AS bytes_up,
    sumIf(bytes_down, period = 'current') AS bytes_down,
    maxIf(server_status = 'unknown', period = 'current') AS egress_to_unowned,
    maxIf(client_status = 'unknown', period = 'current') AS inbound_from_unowned,
    maxIf(client_status != 'exact' OR server_status != 'exact', period = 'current') AS not_exact,
    countIf(period = 'previous') = 0 AS new
FROM flowlog.windowed_connections(data = {data:String}, skew_ns = {skew_ns:UInt64},
    from_ns = {from_ns:UInt64}, to_ns = {to_ns:UInt64})
WHERE period IS NOT NULL
GROUP BY client, server, server_port
HAVING countIf(period = 'current') > 0
ORDER BY egress_to_unowned DESC, inbound_from_unowned DESC, first_seen_ns, client, server,
    server_port
-- The output columns keep the input columns' names: aggregates read the input columns.
SETTINGS prefer_column_name_to_alias = 1;
