"""Runs one of flowlog's shipped DuckDB SQL files (analysis/duckdb/) on Parquet files and prints
its rows as JSON: a list of objects, one per row, keyed by column name.

    duckdb_query.py SQL_FILE DATA_GLOB [NAME=VALUE ...]

DATA_GLOB becomes the `data` variable the SQL reads; each NAME=VALUE sets another variable (an
integer when it parses as one). scripts/bootstrap installs duckdb.
"""
import json
import sys

import duckdb


def main() -> None:
    sql_file, data, *variables = sys.argv[1:]
    con = duckdb.connect()
    con.execute("SET VARIABLE data = ?", [data])
    for assignment in variables:
        name, value = assignment.split("=", 1)
        con.execute(f"SET VARIABLE {name} = ?", [int(value) if value.isdigit() else value])
    with open(sql_file, encoding="utf-8") as f:
        result = con.execute(f.read())
    columns = [d[0] for d in result.description]
    rows = [dict(zip(columns, row)) for row in result.fetchall()]
    json.dump(rows, sys.stdout, default=str)


if __name__ == "__main__":
    main()
