"""Runs flowlog's ClickHouse reports twice in one chDB session, an embedded ClickHouse: on the
Parquet files the enricher wrote, then on what ClickHouse's Kafka engine read from the topic the
enricher wrote (analysis/clickhouse/kafka.sql), and prints both sets of rows as JSON.

    clickhouse_kafka.py SPEC_JSON

SPEC_JSON is an object:
  brokers, topic, group   kafka.sql's broker list, topic and consumer group
  schemas                 {"ID": ".avsc path"}: what the schema registry answers for each id
  messages                how many messages the topic holds: the script waits (up to 60 s) until
                          flowlog.enriched has as many rows
  parquet                 a glob of the Parquet files (the `data` parameter of the file() path)
  runs                    [{"report": NAME, "vars": {"NAME": "VALUE", ...}}, ...]

The schema registry is a thread of this process on 127.0.0.1 answering GET /schemas/ids/ID (the
part of the Confluent Schema Registry's API that ClickHouse's AvroConfluent format uses). The
output is an object: "rows" (in flowlog.enriched), "adopted_rows" (those with adopted true),
"consumer_errors" (the Kafka engine's), "records" ({"parquet": [...], "kafka": [...]}: every
column of flowlog.records, one row per record) and "runs" ([{"parquet": [...], "kafka": [...]},
...]: each report's rows); each row an object keyed by column name.

chDB's Kafka engine works in chdb 4.1.0 on chdb-core 26.1.0 (ClickHouse 26.1); from chdb-core
26.3 on, CREATE TABLE ... ENGINE = Kafka answers the error "Shutdown was called", so
scripts/bootstrap installs that pair in a virtualenv of its own (FLOWLOG_CHDB_KAFKA_PYTHON).
"""
import http.server
import json
import os
import sys
import tempfile
import threading
import time

# The statement splitter of the Parquet-only runner beside this file, without leaving a
# __pycache__ in the tree.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sql_report import statements  # noqa: E402

ANALYSIS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "analysis", "clickhouse")
# The values kafka.sql ships with, for the user to edit; replaced here by the test's.
PLACEHOLDERS = {
    "brokers": "'kafka:9092'",
    "topic": "'flows.enriched'",
    "group": "'clickhouse-flowlog'",
    "registry": "'http://schema-registry:8081'",
}
PATIENCE_S = 60


def registry(schemas: dict) -> str:
    """Starts the schema registry; returns its URL."""
    bodies = {}
    for schema_id, path in schemas.items():
        with open(path, encoding="utf-8") as f:
            bodies[f"/schemas/ids/{schema_id}"] = json.dumps({"schema": f.read()}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the name http.server calls)
            body = bodies.get(self.path.split("?")[0])
            if body is None:
                self.send_response(404)
                body = json.dumps({"error_code": 40403, "message": "Schema not found"}).encode()
            else:
                self.send_response(200)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def kafka_sql(spec: dict, registry_url: str) -> list[str]:
    """kafka.sql's statements with the test's broker, topic, group and registry."""
    values = {
        "brokers": spec["brokers"],
        "topic": spec["topic"],
        "group": spec["group"],
        "registry": registry_url,
    }
    out = []
    for statement in statements(os.path.join(ANALYSIS, "kafka.sql")):
        for name, placeholder in PLACEHOLDERS.items():
            statement = statement.replace(placeholder, f"'{values[name]}'")
        out.append(statement)
    if not any(spec["brokers"] in s for s in out):
        sys.exit("clickhouse_kafka.py: kafka.sql no longer has the placeholders this script edits")
    return out


# Every record the views read, every column.
RECORDS = "SELECT * FROM flowlog.records(data = {data:String}) ORDER BY host, flow_id, seq"


def query_rows(session, query: str, variables: dict) -> list[dict]:
    for name, value in variables.items():
        session.query(f"SET param_{name} = '{value}'")
    out = session.query(query, "JSONEachRow").bytes().decode()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def report_rows(session, report: str, variables: dict) -> list[dict]:
    (query,) = statements(os.path.join(ANALYSIS, f"{report}.sql"))
    return query_rows(session, query, variables)


def scalar(session, query: str):
    """The one value `query` answers."""
    return json.loads(session.query(query, "JSONCompactEachRow").bytes().decode())[0]


def table_rows(session) -> int:
    return int(scalar(session, "SELECT count() FROM flowlog.enriched"))


def main() -> None:
    from chdb import session

    spec = json.loads(sys.argv[1])
    url = registry(spec["schemas"])
    result = {"runs": [{} for _ in spec["runs"]], "records": {}}
    with tempfile.TemporaryDirectory() as path:
        s = session.Session(path)
        for statement in statements(os.path.join(ANALYSIS, "views.sql")):
            s.query(statement)
        result["records"]["parquet"] = query_rows(s, RECORDS, {"data": spec["parquet"]})
        for run, out in zip(spec["runs"], result["runs"]):
            out["parquet"] = report_rows(s, run["report"], {**run["vars"], "data": spec["parquet"]})
        for statement in kafka_sql(spec, url):
            s.query(statement)
        deadline = time.monotonic() + PATIENCE_S
        while table_rows(s) < spec["messages"] and time.monotonic() < deadline:
            time.sleep(0.2)
        # Anything beyond the topic's messages would come within a poll or two.
        time.sleep(1)
        result["rows"] = table_rows(s)
        result["adopted_rows"] = int(scalar(s, "SELECT countIf(adopted) FROM flowlog.enriched"))
        # What the Kafka engine could not read, for a failing test to show.
        result["consumer_errors"] = scalar(
            s, "SELECT groupArrayArray(exceptions.text) FROM system.kafka_consumers"
        )
        result["records"]["kafka"] = query_rows(s, RECORDS, {"data": "^enriched$"})
        for run, out in zip(spec["runs"], result["runs"]):
            out["kafka"] = report_rows(s, run["report"], {**run["vars"], "data": "^enriched$"})
        s.query("DROP TABLE flowlog.enriched_mv")
        s.query("DROP TABLE flowlog.enriched_queue")
        s.close()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
