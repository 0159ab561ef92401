"""Runs one of flowlog's shipped DuckDB reports and writes its rows to a CSV file with DuckDB's
own COPY, for benches/src/bin/report (the DuckDB side of the comparison).

    duckdb_copy.py VIEWS_SQL REPORT_SQL OUT_CSV NAME=VALUE ...
"""
import os
import sys

import duckdb


def number(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def main() -> None:
    views, report, out, *assignments = sys.argv[1:]
    con = duckdb.connect()
    # As many threads as CPUs this process may run on (the harness pins it with taskset).
    con.execute(f"SET threads = {len(os.sched_getaffinity(0))}")
    for name, value in (a.split("=", 1) for a in assignments):
        con.execute(f"SET VARIABLE {name} = ?", [number(value)])
    with open(views, encoding="utf-8") as f:
        con.execute(f.read())
    with open(report, encoding="utf-8") as f:
        query = f.read().strip().rstrip(";")
    con.execute(f"COPY ({query}) TO '{out}' (HEADER, DELIMITER ',')")


if __name__ == "__main__":
    main()
