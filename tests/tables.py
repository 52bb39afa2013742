"""Reading written tables and run reports back for comparison with the oracle."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from pyspark.sql import functions as F

# Each table's columns in SPEC order; start_time is compared as epoch milliseconds.
COLUMNS = {
    "songplays": ("songplay_id", "start_time", "user_id", "level", "song_id", "artist_id",
                  "session_id", "location", "user_agent", "year", "month"),
    "users": ("user_id", "first_name", "last_name", "gender", "level"),
    "songs": ("song_id", "title", "artist_id", "year", "duration"),
    "artists": ("artist_id", "name", "location", "latitude", "longitude"),
    "time": ("start_time", "hour", "day", "week", "month", "year", "weekday"),
}
TYPES = {
    "songplays": {"start_time": "timestamp", "user_id": "int", "session_id": "bigint", "year": "int",
                  "month": "int"},
    "users": {"user_id": "int"},
    "songs": {"year": "int", "duration": "double"},
    "artists": {"latitude": "double", "longitude": "double"},
    "time": {"start_time": "timestamp", **{part: "int" for part in
                                           ("hour", "day", "week", "month", "year", "weekday")}},
}
PARTITIONS = {"songplays": 2, "songs": 2, "time": 2, "users": 0, "artists": 0}


def read_table(spark, root: str, table: str) -> set[tuple]:
    """A written table as a set of tuples in SPEC column order, its column types checked."""
    frame = spark.read.parquet(f"{root}/{table}")
    types = dict(frame.dtypes)
    for column, wanted in TYPES[table].items():
        assert types[column] == wanted, f"{table}.{column} is {types[column]}, not {wanted}"
    columns = [F.unix_millis(F.col(name)).alias(name) if name == "start_time" else F.col(name)
               for name in COLUMNS[table]]
    return {tuple(row) for row in frame.select(*columns).collect()}


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
