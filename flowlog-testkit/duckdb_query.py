"""Runs one of flowlog's shipped DuckDB reports (analysis/duckdb/) on Parquet files, after the
views they are built on (views.sql), and prints its rows as JSON: a list of objects, one per
row, keyed by column name.

    duckdb_query.py VIEWS_SQL REPORT_SQL DATA_GLOB [NAME=VALUE ...]

DATA_GLOB becomes the `data` variable; each NAME=VALUE sets another variable (a number when it
parses as one). scripts/bootstrap installs duckdb.
"""
import json
import sys

import duckdb


def number(value: str):
    """An int or a float when `value` spells one, else the string."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def main() -> None:
    views_file, sql_file, data, *variables = sys.argv[1:]
    con = duckdb.connect()
    con.execute("SET VARIABLE data = ?", [data])
    for assignment in variables:
        name, value = assignment.split("=", 1)
        con.execute(f"SET VARIABLE {name} = ?", [number(value)])
    with open(views_file, encoding="utf-8") as f:
        con.execute(f.read())
    with open(sql_file, encoding="utf-8") as f:
        result = con.execute(f.read())
    columns = [d[0] for d in result.description]
    rows = [dict(zip(columns, row)) for row in result.fetchall()]
    json.dump(rows, sys.stdout, default=str)


if __name__ == "__main__":
    main()
