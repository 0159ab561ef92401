"""Runs one of flowlog's shipped SQL reports on Parquet files, after the views they are built on
(views.sql), and prints its rows as JSON: a list of objects, one per row, keyed by column name.

    sql_report.py [--csv OUT] ENGINE VIEWS_SQL REPORT_SQL DATA_GLOB [NAME=VALUE ...]

ENGINE is `duckdb` (analysis/duckdb/, DuckDB variables) or `chdb` (analysis/clickhouse/, in
chDB, an embedded ClickHouse; query parameters). DATA_GLOB becomes the `data` variable or
parameter; each NAME=VALUE sets another. scripts/bootstrap installs both.

With `--csv OUT` (DuckDB only; benches/src/bin/report), the rows go to the CSV file OUT through
DuckDB's own COPY instead, with as many threads as CPUs this process may run on.
"""
import json
import os
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


def duckdb_connection(views: str, variables: dict):
    """A DuckDB connection with the variables set and the views created."""
    import duckdb

    con = duckdb.connect()
    for name, value in variables.items():
        con.execute(f"SET VARIABLE {name} = ?", [number(value)])
    with open(views, encoding="utf-8") as f:
        con.execute(f.read())
    return con


def duckdb_rows(views: str, report: str, variables: dict) -> list[dict]:
    con = duckdb_connection(views, variables)
    with open(report, encoding="utf-8") as f:
        result = con.execute(f.read())
    columns = [d[0] for d in result.description]
    return [dict(zip(columns, row)) for row in result.fetchall()]


def duckdb_csv(views: str, report: str, variables: dict, out: str) -> None:
    con = duckdb_connection(views, variables)
    con.execute(f"SET threads = {len(os.sched_getaffinity(0))}")
    with open(report, encoding="utf-8") as f:
        query = f.read().strip().rstrip(";")
    con.execute(f"COPY ({query}) TO '{out}' (HEADER, DELIMITER ',')")


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
    args = sys.argv[1:]
    csv = None
    if args[:1] == ["--csv"]:
        csv, args = args[1], args[2:]
    engine, views, report, data, *assignments = args
    variables = {"data": data}
    variables.update(a.split("=", 1) for a in assignments)
    if csv is not None:
        if engine != "duckdb":
            sys.exit("sql_report.py: --csv is for duckdb only")
        duckdb_csv(views, report, variables, csv)
        return
    run = {"duckdb": duckdb_rows, "chdb": chdb_rows}[engine]
    json.dump(run(views, report, variables), sys.stdout, default=str)


if __name__ == "__main__":
    main()
