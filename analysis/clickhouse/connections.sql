-- One row per TCP connection (the same columns as analysis/duckdb/connections.sql). Run
-- views.sql first (it says which parameters to set).
SELECT *
FROM flowlog.connections(data = {data:String}, skew_ns = {skew_ns:UInt64},
    from_ns = {from_ns:UInt64}, to_ns = {to_ns:UInt64})
ORDER BY start_ns, client_addr, client_port;
