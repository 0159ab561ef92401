"""Runs one of flowlog's shipped SQL reports on Parquet files, after the views they are built on
(views.sql), and prints its rows as JSON: a list of objects, one per row, keyed by column name.

    sql_report.py ENGINE VIEWS_SQL REPORT_SQL DATA_GLOB [NAME=VALUE ...]

ENGINE is `duckdb` (analysis/duckdb/, DuckDB variables) or `chdb` (analysis/clickhouse/, in
chDB, an embedded ClickHouse; query parameters). DATA_GLOB becomes the `data` variable or
parameter; each NAME=VALUE sets another. scripts/bootstrap installs both.
"""
import json
import sys
import tempfile


def number(value: str):
    """An int or a float when `value` spells one, else the string."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def statements(path: str) -> list[str]:
    """The statements of a SQL file: separated by `;` at the end of a line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    parts = [p.strip() for p in text.split(";\n")]
    return [
        p.rstrip(";")
        for p in parts
        if p and not all(line.strip().startswith("--") or not line.strip() for line in p.splitlines())
    ]


def duckdb_rows(views: str, report: str, variables: dict) -> list[dict]:
    import duckdb

    con = duckdb.connect()
    for name, value in variables.items():
        con.execute(f"SET VARIABLE {name} = ?", [number(value)])
    with open(views, encoding="utf-8") as f:
        con.execute(f.read())
    with open(report, encoding="utf-8") as f:
        result = con.execute(f.read())
    columns = [d[0] for d in result.description]
    return [dict(zip(columns, row)) for row in result.fetchall()]


def chdb_rows(views: str, report: str, variables: dict) -> list[dict]:
    from chdb import session

    with tempfile.TemporaryDirectory() as path:
        s = session.Session(path)
        for name, value in variables.items():
            s.query(f"SET param_{name} = '{value}'")
        for statement in statements(views):
            s.query(statement)
        (query,) = statements(report)
        out = s.query(query, "JSONEachRow").bytes().decode()
        s.close()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def main() -> None:
    engine, views, report, data, *assignments = sys.argv[1:]
    variables = {"data": data}
    variables.update(a.split("=", 1) for a in assignments)
    run = {"duckdb": duckdb_rows, "chdb": chdb_rows}[engine]
    json.dump(run(views, report, variables), sys.stdout, default=str)


if __name__ == "__main__":
    main()
