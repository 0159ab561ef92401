#!/usr/bin/env python3
"""Independent reader for the enricher's Parquet output (tests/storage.rs runs it).

pyarrow, a Parquet implementation nobody here wrote, reads every file under a root (a local
directory or s3://bucket/prefix on an S3-compatible endpoint) and prints one JSON document:
every object under the root (so leftovers show), and for each .parquet file its row count,
row groups, compression codecs, key-value metadata, column types and rows; plus the row count
per hive partition as pyarrow.dataset's hive partitioning sees it.

    parquet_reader.py read ROOT [ENDPOINT|-] [COLUMN,...]   (rows of those columns only)
    parquet_reader.py mkbucket ENDPOINT BUCKET
    parquet_reader.py rmbucket ENDPOINT BUCKET      (deletes its objects first)

S3 credentials are the static test ones (moto accepts any).
"""
import json
import sys

KEY, SECRET, REGION = "test", "test", "us-east-1"


def s3_client(endpoint):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name=REGION,
    )


def describe(t):
    """A type as text with every nested field's name and nullability (pyarrow's own str()
    omits some, e.g. a map value's)."""
    import pyarrow.types as pt

    def field(f):
        return f"{f.name}: {describe(f.type)}" + ("" if f.nullable else " not null")

    if pt.is_map(t):
        return f"map<{field(t.key_field)}, {field(t.item_field)}>"
    if pt.is_list(t):
        return f"list<{field(t.value_field)}>"
    if pt.is_struct(t):
        return "struct<" + ", ".join(field(t.field(i)) for i in range(t.num_fields)) + ">"
    return str(t)


def filesystem(root, endpoint):
    import pyarrow.fs as pafs

    if root.startswith("s3://"):
        scheme, host = endpoint.split("://", 1)
        fs = pafs.S3FileSystem(
            access_key=KEY,
            secret_key=SECRET,
            region=REGION,
            endpoint_override=host,
            scheme=scheme,
        )
        return fs, root[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), root.rstrip("/")


def read(root, endpoint=None, columns=None):
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, base = filesystem(root, endpoint)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    objects = sorted(
        i.path[len(base):].lstrip("/") for i in infos if i.type == pafs.FileType.File
    )
    files = []
    for rel in objects:
        if not rel.endswith(".parquet"):
            continue
        with fs.open_input_file(f"{base}/{rel}") as f:
            pf = pq.ParquetFile(f)
            meta = pf.metadata
            table = pf.read(columns=columns)
        codecs = sorted(
            {
                meta.row_group(g).column(c).compression
                for g in range(meta.num_row_groups)
                for c in range(meta.num_columns)
            }
        )
        kv = {
            k.decode(): v.decode()
            for k, v in (meta.metadata or {}).items()
            if k != b"ARROW:schema"
        }
        files.append(
            {
                "path": rel,
                "size": fs.get_file_info(f"{base}/{rel}").size,
                "num_rows": meta.num_rows,
                "num_row_groups": meta.num_row_groups,
                "codecs": codecs,
                "key_value": kv,
                "columns": [[f.name, describe(f.type), f.nullable] for f in pf.schema_arrow],
                "rows": table.to_pylist(),
            }
        )
    partitions = {}
    if files:
        dataset = ds.dataset(
            base, format="parquet", partitioning="hive", filesystem=fs
        )
        counts = dataset.to_table(columns=["dt", "hour"]).group_by(["dt", "hour"]).aggregate(
            [([], "count_all")]
        )
        for row in counts.to_pylist():
            partitions[f"dt={row['dt']}/hour={row['hour']}"] = row["count_all"]
    print(json.dumps({"objects": objects, "files": files, "partitions": partitions}))


def main():
    cmd = sys.argv[1]
    if cmd == "read":
        endpoint = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
        columns = sys.argv[4].split(",") if len(sys.argv) > 4 else None
        read(sys.argv[2], endpoint, columns)
    elif cmd == "mkbucket":
        s3_client(sys.argv[2]).create_bucket(Bucket=sys.argv[3])
    elif cmd == "rmbucket":
        s3 = s3_client(sys.argv[2])
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[3]):
            for obj in page.get("Contents", []):
                s3.delete_object(Bucket=sys.argv[3], Key=obj["Key"])
        s3.delete_bucket(Bucket=sys.argv[3])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
