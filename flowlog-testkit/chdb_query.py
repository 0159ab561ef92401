"""Runs one of flowlog's shipped ClickHouse reports (analysis/clickhouse/) in chDB, an embedded
ClickHouse, on Parquet files, after the views they are built on (views.sql), and prints its
rows as JSON: a list of objects, one per row, keyed by column name.

    chdb_query.py VIEWS_SQL REPORT_SQL DATA_GLOB [NAME=VALUE ...]

DATA_GLOB becomes the `data` parameter; each NAME=VALUE sets another query parameter.
scripts/bootstrap installs chdb.
"""
import json
import sys
import tempfile

from chdb import session


def statements(path: str) -> list[str]:
    """The statements of a SQL file: separated by `;` at the end of a line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    parts = [p.strip() for p in text.split(";\n")]
    return [p.rstrip(";") for p in parts if p and not all(
        line.strip().startswith("--") or not line.strip() for line in p.splitlines())]


def main() -> None:
    views_file, sql_file, data, *parameters = sys.argv[1:]
    with tempfile.TemporaryDirectory() as path:
        s = session.Session(path)
        s.query(f"SET param_data = '{data}'")
        for assignment in parameters:
            name, value = assignment.split("=", 1)
            s.query(f"SET param_{name} = '{value}'")
        for statement in statements(views_file):
            s.query(statement)
        (report,) = statements(sql_file)
        out = s.query(report, "JSONEachRow").bytes().decode()
        s.close()
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    json.dump(rows, sys.stdout)


if __name__ == "__main__":
    main()
