-- Security audit: one row per distinct edge (client → server:port), the same columns as
-- analysis/duckdb/audit.sql. Run views.sql first (it says which parameters to set).
SELECT
    client,
    any(client_status) AS client_status,
    server,
    server_port,
    any(server_status) AS server_status,
    min(start_ns) AS first_seen_ns,
    max(end_ns) AS last_seen_ns,
    count() AS connections,
    sum(bytes_up) AS bytes_up,
    sum(bytes_down) AS bytes_down,
    max(server_status = 'unknown') AS egress_to_unowned,
    max(client_status = 'unknown') AS inbound_from_unowned,
    max(client_status != 'exact' OR server_status != 'exact') AS not_exact
FROM flowlog.connections(data = {data:String}, skew_ns = {skew_ns:UInt64},
    from_ns = {from_ns:UInt64}, to_ns = {to_ns:UInt64})
GROUP BY client, server, server_port
ORDER BY egress_to_unowned DESC, inbound_from_unowned DESC, first_seen_ns, client, server,
    server_port
-- The output columns keep the input columns' names: aggregates read the input columns.
SETTINGS prefer_column_name_to_alias = 1;
