"""Reading written tables and run reports back, for comparison with the oracle. Tables
come back as multisets (Counters of rows): a duplicated row is a difference."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from pyspark.sql import functions as F

from oracle import COLUMNS

TYPES = {
    "songplays": {"start_time": "timestamp", "user_id": "int", "session_id": "bigint", "year": "int", "month": "int"},
    "users": {"user_id": "int"},
    "songs": {"year": "int", "duration": "double"},
    "artists": {"latitude": "double", "longitude": "double"},
    "time": {"start_time": "timestamp", **dict.fromkeys(("hour", "day", "week", "month", "year", "weekday"), "int")},
}
PARTITIONS = {"songplays": 2, "songs": 2, "time": 2, "users": 0, "artists": 0}
TABLES = tuple(COLUMNS)


def read_table(spark, location: str | Path, table: str, data_format: str = "parquet") -> Counter:
    """A written table as a Counter of tuples in the oracle's column order, types checked."""
    # Hadoop takes "file://" + a raw path; Path.as_uri() would percent-encode it.
    uri = f"file://{location}" if isinstance(location, Path) else location
    reader = spark.read.format("delta") if data_format == "delta" else spark.read.format("parquet")
    frame = reader.load(f"{uri}/{table}")
    types = dict(frame.dtypes)
    for column, wanted in TYPES[table].items():
        assert types[column] == wanted, f"{table}.{column} is {types[column]}, not {wanted}"
    columns = [
        F.unix_millis(F.col(name)).alias(name) if name == "start_time" else F.col(name) for name in COLUMNS[table]
    ]
    return Counter(tuple(row) for row in frame.select(*columns).collect())


def read_tables(spark, location: str | Path, data_format: str = "parquet") -> dict[str, Counter]:
    return {table: read_table(spark, location, table, data_format) for table in TABLES}


def read_delta_table(path: str, table: str, storage_options: dict | None = None) -> Counter:
    """A Delta table read by an independent reader (delta-rs), in the oracle's terms."""
    from deltalake import DeltaTable

    columns = DeltaTable(f"{path}/{table}", storage_options=storage_options).to_pyarrow_table().to_pylist()

    def value(name: str, cell):
        if name == "start_time" and cell is not None:
            return (
                int(cell.timestamp() * 1000)
                if cell.tzinfo
                else round((cell - cell.__class__(1970, 1, 1)).total_seconds() * 1000)
            )
        if isinstance(cell, float) and math.isnan(cell):
            return cell
        return cell

    return Counter(tuple(value(name, row[name]) for name in COLUMNS[table]) for row in columns)


def local_data_files(output: Path) -> list[str]:
    return [path.relative_to(output).as_posix() for path in output.rglob("*.parquet")]


def assert_one_file_per_partition_folder(data_files: Iterable[str]) -> None:
    """``data_files``: parquet paths relative to the output root, e.g. ``songs/year=0/artist_id=AR1/part-0.parquet``."""
    folders: dict[str, Counter] = defaultdict(Counter)
    for path in data_files:
        table, *partition, _ = path.split("/")
        folders[table]["/".join(partition)] += 1
    for table, depth in PARTITIONS.items():
        assert folders[table], f"{table} has no data files"
        assert set(folders[table].values()) == {1}, f"{table} has a folder with several files"
        assert {len(folder.split("/")) if folder else 0 for folder in folders[table]} == {depth}, table


def run_reports(output: Path) -> list[dict]:
    """The run reports under ``output/_runs/``, oldest first."""
    reports = [json.loads(path.read_text()) for path in (output / "_runs").glob("*.json")]
    return sorted(reports, key=lambda report: report["started_at"] + report["run_id"])


def quarantined(output: Path, dataset: str) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted((output / "_quarantine" / dataset).glob("*.json"))
        for line in path.read_text().splitlines()
        if line
    ]


def lake_snapshot(output: Path) -> dict[str, bytes]:
    """Every table file's bytes: a lake that must not change compares equal to its snapshot."""
    return {
        path.relative_to(output).as_posix(): path.read_bytes()
        for table in TABLES
        for path in sorted((output / table).rglob("*"))
        if path.is_file()
    }


def assert_frames_equal(actual, expected) -> None:
    """Same column names and types, and the same rows as a multiset (a repeated row counts)."""
    assert actual.dtypes == expected.dtypes, f"schema {actual.dtypes} != {expected.dtypes}"
    assert Counter(tuple(row) for row in actual.collect()) == Counter(tuple(row) for row in expected.collect())
