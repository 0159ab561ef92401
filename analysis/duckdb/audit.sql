-- Security audit: who talks to whom. One row per distinct edge (client → server:port), with
-- when it was first and last seen, its connections and bytes, and what an auditor looks for
-- first. Read views.sql first (it says which variables to set).
--
-- Columns: client, client_status, server, server_port, server_status, first_seen_ns,
-- last_seen_ns, connections, bytes_up, bytes_down, egress_to_unowned (the server's address is
-- owned by no inventory: unexpected egress), inbound_from_unowned (the client's address is
-- owned by no inventory: traffic from outside), not_exact (either end is ambiguous or unknown:
-- listed here rather than hidden). An edge is new against an earlier window when it has no row
-- there: run this with that window's from_ns/to_ns and compare.
SELECT
    client,
    any_value(client_status) AS client_status,
    server,
    server_port,
    any_value(server_status) AS server_status,
    min(start_ns) AS first_seen_ns,
    max(end_ns) AS last_seen_ns,
    count(*) AS connections,
    sum(bytes_up)::UBIGINT AS bytes_up,
    sum(bytes_down)::UBIGINT AS bytes_down,
    bool_or(server_status = 'unknown') AS egress_to_unowned,
    bool_or(client_status = 'unknown') AS inbound_from_unowned,
    bool_or(client_status <> 'exact' OR server_status <> 'exact') AS not_exact
FROM connections
GROUP BY client, server, server_port
ORDER BY egress_to_unowned DESC, inbound_from_unowned DESC, first_seen_ns, client, server, server_port;
