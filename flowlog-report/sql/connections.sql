-- One row per TCP connection: the columns of analysis/duckdb/connections.sql, in its order.
SELECT * FROM connections ORDER BY start_ns, client_addr, client_port
