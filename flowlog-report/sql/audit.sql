-- Security audit, one row per distinct edge (client → server:port): the columns and order of
-- analysis/duckdb/audit.sql.
SELECT
    client,
    max(client_status) AS client_status,
    server,
    server_port,
    max(server_status) AS server_status,
    min(start_ns) FILTER (WHERE period = 'current') AS first_seen_ns,
    max(end_ns) FILTER (WHERE period = 'current') AS last_seen_ns,
    count(*) FILTER (WHERE period = 'current') AS connections,
    sum(bytes_up) FILTER (WHERE period = 'current') AS bytes_up,
    sum(bytes_down) FILTER (WHERE period = 'current') AS bytes_down,
    bool_or(server_status = 'unknown') FILTER (WHERE period = 'current') AS egress_to_unowned,
    bool_or(client_status = 'unknown') FILTER (WHERE period = 'current')
        AS inbound_from_unowned,
    bool_or(client_status <> 'exact' OR server_status <> 'exact')
        FILTER (WHERE period = 'current') AS not_exact,
    count(*) FILTER (WHERE period = 'previous') = 0 AS new
FROM windowed_connections
WHERE period IS NOT NULL
GROUP BY client, server, server_port
HAVING count(*) FILTER (WHERE period = 'current') > 0
ORDER BY egress_to_unowned DESC NULLS LAST, inbound_from_unowned DESC NULLS LAST,
    first_seen_ns, client, server, server_port
