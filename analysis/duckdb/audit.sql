-- Security audit: who talks to whom. One row per distinct edge (client → server:port), with
-- when it was first and last seen, its connections and bytes, and what an auditor looks for
-- first. Read views.sql first (it says which variables to set).
--
-- Columns: client, client_status, server, server_port, server_status, first_seen_ns,
-- last_seen_ns, connections, bytes_up, bytes_down, egress_to_unowned (the server's address is
-- owned by no inventory: unexpected egress), inbound_from_unowned (the client's address is
-- owned by no inventory: traffic from outside), not_exact (either end is ambiguous or unknown:
-- listed here rather than hidden), new (no connection on the edge in the window of the same
-- length just before: a baseline to compare with). Edges with no connection in the window are
-- left out.
SELECT
    client,
    any_value(client_status) AS client_status,
    server,
    server_port,
    any_value(server_status) AS server_status,
    min(start_ns) FILTER (WHERE period = 'current') AS first_seen_ns,
    max(end_ns) FILTER (WHERE period = 'current') AS last_seen_ns,
    count(*) FILTER (WHERE period = 'current') AS connections,
    sum(bytes_up) FILTER (WHERE period = 'current')::UBIGINT AS bytes_up,
    sum(bytes_down) FILTER (WHERE period = 'current')::UBIGINT AS bytes_down,
    bool_or(server_status = 'unknown') FILTER (WHERE period = 'current') AS egress_to_unowned,
    bool_or(client_status = 'unknown') FILTER (WHERE period = 'current') AS inbound_from_unowned,
    bool_or(client_status <> 'exact' OR server_status <> 'exact')
        FILTER (WHERE period = 'current') AS not_exact,
    count(*) FILTER (WHERE period = 'previous') = 0 AS new
FROM windowed_connections
WHERE period IS NOT NULL
GROUP BY client, server, server_port
HAVING count(*) FILTER (WHERE period = 'current') > 0
ORDER BY egress_to_unowned DESC, inbound_from_unowned DESC, first_seen_ns, client, server,
    server_port;
