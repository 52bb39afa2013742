"""Sparkify data lake ETL: song and event JSON in, a star schema out.

Usage:
    python etl.py [--input ROOT] [--output ROOT] [--format parquet|delta] [--config FILE]
                  [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--max-reject-rate FRACTION]
                  [--catalog DATABASE] [--verbose]
    python etl.py --output ROOT --rollback        (Delta tables: back to the previous run's versions)
    python etl.py --print-packages [--format delta]
    python etl.py --print-ddl athena [--output ROOT] [--format delta]
    spark-submit [--master ...] [--packages ...] etl.py [the same flags]

Reads ROOT/song_data/ and ROOT/log_data/, builds songplays (fact), users, songs, artists
and time, checks them, and publishes them under OUTPUT/<table>/. Records that cannot be
used are kept with their file and the reason under OUTPUT/_quarantine/, and every run
leaves a report under OUTPUT/_runs/. README.md is the manual; docs/DESIGN.md gives reasons.
"""

from __future__ import annotations

import argparse
import bz2
import configparser
import contextlib
import gzip
import json
import logging
import os
import re
import shlex
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

__version__ = "2.0.0"

log = logging.getLogger("sparkify.etl")


# =============================================================================
# Schemas: explicit for every read; text where real data has numbers in text fields
# =============================================================================

SONG_SCHEMA = T.StructType(
    [
        T.StructField("song_id", T.StringType()),
        T.StructField("title", T.StringType()),  # sometimes a JSON number: read as its text
        T.StructField("artist_id", T.StringType()),
        T.StructField("artist_name", T.StringType()),  # sometimes a JSON number too
        T.StructField("artist_location", T.StringType()),
        T.StructField("artist_latitude", T.DoubleType()),
        T.StructField("artist_longitude", T.DoubleType()),
        T.StructField("duration", T.DoubleType()),
        T.StructField("year", T.IntegerType()),
        T.StructField("num_songs", T.IntegerType()),
    ]
)

LOG_SCHEMA = T.StructType(
    [
        T.StructField("ts", T.LongType()),  # epoch milliseconds, UTC
        T.StructField("userId", T.StringType()),  # "" when logged out
        T.StructField("firstName", T.StringType()),
        T.StructField("lastName", T.StringType()),
        T.StructField("gender", T.StringType()),
        T.StructField("level", T.StringType()),
        T.StructField("location", T.StringType()),
        T.StructField("userAgent", T.StringType()),
        T.StructField("page", T.StringType()),
        T.StructField("song", T.StringType()),
        T.StructField("artist", T.StringType()),
        T.StructField("length", T.DoubleType()),
        T.StructField("sessionId", T.LongType()),
        T.StructField("itemInSession", T.LongType()),
        T.StructField("auth", T.StringType()),
        T.StructField("method", T.StringType()),
        T.StructField("status", T.IntegerType()),
        T.StructField("registration", T.DoubleType()),
    ]
)

DATASETS = {"song_data": SONG_SCHEMA, "log_data": LOG_SCHEMA}
# Fields no table is built from: parsed (a wrong type there still rejects the record)
# and kept in a rejected record's quarantined text, but dropped once classified.
UNUSED_FIELDS = {"song_data": ("num_songs",), "log_data": ("auth", "method", "status", "registration")}

CORRUPT_RECORD = "_corrupt_record"
QUARANTINE_COLUMNS = ("source_file", "reject_reason", "record")

# What a Spark timestamp holds: 0001-01-01 to 9999-12-31 (UTC), in epoch milliseconds.
MIN_TS_MS, MAX_TS_MS = -62_135_596_800_000, 253_402_300_799_999
# The longest file or folder name most filesystems accept, in bytes.
MAX_NAME_BYTES = 255


def struct(ddl: str) -> T.StructType:
    """``"a string, b int"`` as a StructType (no session needed)."""
    kinds = {
        "string": T.StringType(),
        "int": T.IntegerType(),
        "bigint": T.LongType(),
        "double": T.DoubleType(),
        "timestamp": T.TimestampType(),
    }
    return T.StructType(
        [T.StructField(name, kinds[kind]) for name, kind in (column.split() for column in ddl.split(","))]
    )


@dataclass(frozen=True)
class TableSpec:
    """An output table: its columns and types (partition columns last), its layout."""

    name: str
    schema: T.StructType
    partition_by: tuple[str, ...] = ()
    sort_by: tuple[str, ...] = ()
    writer_options: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return self.schema.fieldNames()[0]


SONGPLAYS = TableSpec(
    "songplays",
    struct(
        "songplay_id string, start_time timestamp, user_id int, level string, song_id string, artist_id string, "
        "session_id bigint, location string, user_agent string, year int, month int"
    ),
    ("year", "month"),
    ("start_time", "songplay_id"),
)
USERS = TableSpec(
    "users", struct("user_id int, first_name string, last_name string, gender string, level string"), (), ("user_id",)
)
# Nearly every songs folder holds one or two rows: compression and dictionaries save
# nothing there, while setting them up costs time in each of thousands of files
# (measured in docs/PERFORMANCE.md).
SONGS = TableSpec(
    "songs",
    struct("song_id string, title string, artist_id string, year int, duration double"),
    ("year", "artist_id"),
    ("song_id",),
    (("compression", "uncompressed"), ("parquet.enable.dictionary", "false")),
)
ARTISTS = TableSpec(
    "artists",
    struct("artist_id string, name string, location string, latitude double, longitude double"),
    (),
    ("artist_id",),
)
TIME = TableSpec(
    "time",
    struct("start_time timestamp, hour int, day int, week int, month int, year int, weekday int"),
    ("year", "month"),
    ("start_time",),
)
STAR_SCHEMA = (SONGPLAYS, USERS, SONGS, ARTISTS, TIME)
# Each user's latest event so far, which an incremental load merges its window with.
USER_STATE = TableSpec(
    "_state/user_latest_event",
    struct(
        "user_id int, ts bigint, sessionId bigint, itemInSession bigint, firstName string, lastName string, "
        "gender string, level string"
    ),
    (),
    ("user_id",),
)


# =============================================================================
# Extract: list every input file, fetch the readable ones, parse each line
# =============================================================================

# Input file names: *.json, optionally compressed, extensions in any case.
JSON_NAME = re.compile(r"\.json(\.[^.]+)?$", re.IGNORECASE)
CODECS = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bzip2", ".deflate": "deflate", ".zz": "deflate"}


@dataclass(frozen=True)
class InputFile:
    path: str  # a local path, or s3a://bucket/key
    size: int
    codec: str | None = None


@dataclass
class Inventory:
    """Every file under one dataset folder: the ones to read and the skipped ones, with why."""

    dataset: str
    folder: str
    read: list[InputFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def found(self) -> int:
        return len(self.read) + len(self.skipped)

    def add(self, path: str, size: int, relative: str) -> None:
        reason, codec = skip_reason(relative)
        if reason:
            self.skipped.append((path, reason))
        else:
            self.read.append(InputFile(path, size, codec))

    def facts(self) -> dict[str, object]:
        return {
            "folder": self.folder,
            "files_found": self.found,
            "files_read": len(self.read),
            "files_skipped": len(self.skipped),
            "bytes_read": sum(f.size for f in self.read),
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }


def skip_reason(relative: str) -> tuple[str | None, str | None]:
    """(why a file is not read, or None; its compression codec) from its path below the dataset folder."""
    parts = relative.split("/")
    for part in parts[:-1]:
        if part.startswith((".", "_")):
            return f"in the folder {part}, which starts with '{part[0]}'", None
    name = parts[-1]
    if name.startswith((".", "_")):
        return f"name starts with '{name[0]}' (hidden or metadata file)", None
    match = JSON_NAME.search(name)
    if not match:
        return "not a .json file", None
    extension = (match.group(1) or "").lower()
    if extension and extension not in CODECS:
        return f"compressed as {extension}, which etl.py cannot decode (use .gz, .bz2 or .deflate)", None
    return None, CODECS.get(extension)


def list_local_dataset(root: Path, dataset: str) -> Inventory:
    """Walk a local dataset folder, following symlinked folders; a symlink loop is an error."""
    folder = root / dataset
    inventory = Inventory(dataset, str(folder))

    def walk(directory: Path, relative: str, ancestors: tuple[tuple[int, int], ...]) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            raise EtlError(f"Cannot list {directory}: {error.strerror}. Check that the input is readable.") from None
        for entry in entries:
            path = Path(entry.path)
            try:
                info = entry.stat()  # follows symlinks
            except OSError as error:
                if entry.is_symlink():
                    inventory.skipped.append((str(path), "a symlink whose target does not exist"))
                    continue
                raise EtlError(f"Cannot read {path}: {error.strerror}.") from None
            name = f"{relative}{entry.name}"
            if stat.S_ISDIR(info.st_mode):
                identity = (info.st_dev, info.st_ino)
                if identity in ancestors:
                    raise EtlError(
                        f"The input has a symlink loop: {path} leads back to a folder that contains it "
                        f"({os.path.realpath(path)}). Remove the link or point it elsewhere."
                    )
                walk(path, f"{name}/", (*ancestors, identity))
            elif stat.S_ISREG(info.st_mode):
                inventory.add(str(path), info.st_size, name)
            else:
                inventory.skipped.append((str(path), "not a regular file"))

    top = folder.stat()
    walk(folder, "", ((top.st_dev, top.st_ino),))
    return inventory


def list_s3_dataset(client, root: str, dataset: str) -> Inventory:
    """One listing of every key under an S3 dataset prefix (a request per 1,000 keys)."""
    bucket, prefix = bucket_and_key(f"{root}/{dataset}/")
    inventory = Inventory(dataset, f"{root}/{dataset}")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.endswith("/"):  # a folder marker, not a file
                continue
            inventory.add(f"{root.split('://')[0]}://{bucket}/{key}", item["Size"], key[len(prefix) :])
    return inventory


@dataclass(frozen=True)
class S3Access:
    """What a task needs to make its own S3 client: picklable, secrets kept out of repr."""

    region: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def client(self, connections: int = 10):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            region_name=self.region or "us-east-1",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            aws_session_token=self.session_token,
            config=Config(
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=connections,
                retries={"max_attempts": 5, "mode": "standard"},
                s3={"addressing_style": "path"} if self.endpoint_url else None,
            ),
        )


# A task fetching files from S3 keeps this many requests in flight: one file is a
# single GET of a few hundred bytes, so latency, not bandwidth, sets the pace.
S3_FETCHES_IN_FLIGHT = 32
READ_ERROR = "etl.py cannot read input file"


def fetch_files(
    files: Iterable[tuple[str, str | None]], access: S3Access | None
) -> Iterator[tuple[str, bytearray | None, str | None]]:
    """(path, decoded bytes, None) for each (path, codec), or (path, None, reason) when its
    content cannot be decompressed. A file that cannot be read at all fails the task."""
    files = list(files)
    if access is None:

        def read(path: str) -> bytes:
            with open(path, "rb") as handle:
                return handle.read()

        in_flight = 1
    else:
        client = access.client(S3_FETCHES_IN_FLIGHT)

        def read(path: str) -> bytes:
            bucket, key = bucket_and_key(path)
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()

        in_flight = S3_FETCHES_IN_FLIGHT

    def fetch(file: tuple[str, str | None]) -> tuple[str, bytearray | None, str | None]:
        path, codec = file
        try:
            data = read(path)
        except Exception as error:  # noqa: BLE001 - reported with the file named, then the run stops
            raise OSError(f"{READ_ERROR} {path}: {error}") from None
        try:
            data = decompress(data, codec)
        except (OSError, EOFError, ValueError, zlib.error):
            return path, None, f"the file cannot be decompressed as {codec}"
        # A byte order mark some Windows tools write is not part of the first record.
        return path, bytearray(data[3:] if data.startswith(b"\xef\xbb\xbf") else data), None

    if in_flight == 1:
        yield from map(fetch, files)
    else:
        with ThreadPoolExecutor(in_flight) as pool:
            yield from pool.map(fetch, files)


def decompress(data: bytes, codec: str | None) -> bytes:
    if codec == "gzip":
        return gzip.decompress(data)
    if codec == "bzip2":
        return bz2.decompress(data)
    if codec == "deflate":  # Hadoop's DefaultCodec: zlib-wrapped deflate
        return zlib.decompress(data)
    return data


def balanced_batches(files: Sequence[InputFile], batches: int) -> list[list[InputFile]]:
    """Files packed into ``batches`` of about equal bytes; a file costs at least 4 KiB,
    since opening it costs about as much as reading that."""
    packed: list[list[InputFile]] = [[] for _ in range(max(1, min(batches, len(files))))]
    loads = [0] * len(packed)
    for file in sorted(files, key=lambda f: (-f.size, f.path)):
        lightest = loads.index(min(loads))
        packed[lightest].append(file)
        loads[lightest] += max(file.size, 4096)
    return packed


FILE_COLUMNS = "source_file string, data binary, error string"


def read_lines(spark: SparkSession, files: Sequence[InputFile], access: S3Access | None) -> DataFrame:
    """Every line of every file, with the file it came from.

    Columns: ``source_file``; ``line`` (null for a file that could not be decoded, then
    ``error`` says why); ``first``, true on each file's first row, kept even when blank
    so that files can be counted; ``is_record``, false on such a blank first row.
    """
    tasks = spark.sparkContext.defaultParallelism * 2
    batches = [[(file.path, file.codec) for file in batch] for batch in balanced_batches(files, tasks)]
    fetched = spark.sparkContext.parallelize(batches, len(batches)).flatMap(lambda batch: fetch_files(batch, access))
    contents = spark.createDataFrame(fetched, FILE_COLUMNS)
    lines = contents.select(
        "source_file",
        "error",
        F.posexplode_outer(F.split(F.col("data").cast("string"), r"\r?\n")).alias("position", "line"),
    )
    first = F.coalesce(F.col("position"), F.lit(0)) == 0
    is_record = F.col("error").isNotNull() | F.col("line").rlike(r"\S")
    return lines.select("source_file", "error", "line", first.alias("first"), is_record.alias("is_record")).where(
        F.col("first") | F.col("is_record")
    )


def parse_records(lines: DataFrame, schema: T.StructType) -> DataFrame:
    """Each line parsed with ``schema``; a line that is not JSON of that shape keeps its
    text in ``_corrupt_record`` (the fields that did parse are kept)."""
    with_corrupt = T.StructType([*schema.fields, T.StructField(CORRUPT_RECORD, T.StringType())])
    parsed = F.from_json("line", with_corrupt, {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_RECORD})
    return lines.withColumn("parsed", parsed).select("source_file", "error", "line", "first", "is_record", "parsed.*")


# =============================================================================
# Transform: pure functions, DataFrames in, DataFrames out
# =============================================================================


def type_name(kind: T.DataType) -> str:
    return {T.LongType(): "a 64-bit integer", T.IntegerType(): "a 32-bit integer", T.DoubleType(): "a number"}.get(
        kind, "text"
    )


def reject_reason(schema: T.StructType, *rules: tuple[Column, str | Column]) -> Column:
    """Why a parsed line cannot be used, or null: the parser's verdicts, then ``rules`` in order."""
    corrupt, raw = F.col(CORRUPT_RECORD), F.col("_raw_fields")
    # A field the parser could not convert is null in the record but present in the raw text.
    wrong_type = F.coalesce(
        *[
            F.when(
                F.col(f.name).isNull() & raw.getItem(f.name).isNotNull(),
                F.lit(f"{f.name} is not {type_name(f.dataType)}"),
            )
            for f in schema.fields
            if type_name(f.dataType) != "text"
        ],
        F.lit("a field has the wrong type"),
    )
    # The parser stops after the first JSON value on a line. Text after a closing brace
    # makes the line suspect; it holds one value only if it parses as a one-item array.
    one_value = (
        F.coalesce(F.size(F.from_json(F.concat(F.lit("["), "line", F.lit("]")), "array<string>")), F.lit(-1)) == 1
    )
    reason = (
        F.when(F.col("error").isNotNull(), F.col("error"))
        .when(corrupt.isNotNull() & raw.isNull(), "malformed JSON")
        .when(corrupt.isNotNull(), wrong_type)
        .when(F.col("line").rlike(r"\}\s*\S") & ~one_value, "several JSON values on one line")
    )
    for rule, text in rules:
        reason = reason.when(rule, text)
    return reason


def classify(records: DataFrame, schema: T.StructType, *rules: tuple[Column, str | Column]) -> DataFrame:
    """``records`` with ``reject_reason`` set on those no table can use, and ``record``:
    the line as read (kept for the quarantine only on rejected ones)."""
    raw_fields = F.when(F.col(CORRUPT_RECORD).isNotNull(), F.from_json(F.col(CORRUPT_RECORD), "map<string,string>"))
    return (
        records.withColumn("_raw_fields", raw_fields)
        .withColumn("reject_reason", F.when(F.col("is_record"), reject_reason(schema, *rules)))
        .withColumn("record", F.when(F.col("reject_reason").isNotNull(), F.col("line")))
        .drop("_raw_fields", CORRUPT_RECORD, "line", "error")
    )


def blank(column: str) -> Column:
    return F.coalesce(F.trim(column), F.lit("")) == ""


# Characters Spark escapes as %XX in a partition folder name (three bytes instead of one).
ESCAPED_IN_FOLDER_NAMES = r"""[\x01-\x1f"#%'*/:=?\\\x7f{\[\]^]"""


def folder_name_bytes(column: str) -> Column:
    """Bytes of the partition folder name ``column=<value>`` Spark writes for a value."""
    escaped = F.length(F.regexp_replace(F.col(column), rf"[^{ESCAPED_IN_FOLDER_NAMES[1:-1]}]", ""))
    return F.lit(len(column) + 1) + F.octet_length(column) + 2 * escaped


def classify_song_records(records: DataFrame) -> DataFrame:
    """Song records with ``reject_reason`` set on those no table can use."""
    return classify(
        records,
        SONG_SCHEMA,
        (blank("song_id"), "missing song_id"),
        (blank("artist_id"), "missing artist_id"),
        (
            folder_name_bytes("artist_id") > MAX_NAME_BYTES,
            f"artist_id is too long for a folder name (over {MAX_NAME_BYTES} bytes as artist_id=...)",
        ),
    )


def classify_log_events(events: DataFrame) -> DataFrame:
    """Log events with ``reject_reason`` set on those no table can use, and ``user_id``:
    the integer value of ``userId`` ("019" and "19" are user 19)."""
    logged_in = F.col("userId") != ""
    user_number = F.expr("try_cast(userId AS BIGINT)")
    classified = classify(
        events,
        LOG_SCHEMA,
        (F.col("ts").isNull(), "missing ts"),
        (~F.col("ts").between(MIN_TS_MS, MAX_TS_MS), "ts is outside the range of a timestamp (years 1 to 9999)"),
        (F.col("page").isNull(), "missing page"),
        (F.col("userId").isNull(), "missing userId"),
        (logged_in & ~F.col("userId").rlike(r"^[0-9]+$"), "userId is not a number"),
        (logged_in & (user_number.isNull() | (user_number > 2**31 - 1)), "userId is too large for a 32-bit user_id"),
        ((F.col("page") == "NextSong") & ~logged_in, "NextSong event without a userId"),
        (
            (F.col("page") == "NextSong") & (F.col("sessionId").isNull() | F.col("itemInSession").isNull()),
            "NextSong event without sessionId or itemInSession",
        ),
    )
    user_id = F.when(F.col("reject_reason").isNull() & logged_in, user_number.cast("int"))
    return classified.withColumn("user_id", user_id)


def quarantine_records(classified: DataFrame) -> DataFrame:
    """Rejected records with their file, their reason and their text."""
    return classified.where(F.col("reject_reason").isNotNull()).select(*QUARANTINE_COLUMNS)


def accepted_records(classified: DataFrame) -> DataFrame:
    """The usable records, without the classification columns."""
    return classified.where(F.col("is_record") & F.col("reject_reason").isNull()).drop(
        "reject_reason", "record", "first", "is_record"
    )


def one_record_per_key(
    frame: DataFrame, key: Sequence[str], order: Sequence[str], columns: Sequence[str], highest: bool = False
) -> DataFrame:
    """One row per ``key``: the ``columns`` of the record whose (``order``, ``columns``) sorts
    first (or last). Picking a whole struct keeps every column from one source record, and
    the full ordering makes the pick the same on every run."""
    pick = F.max if highest else F.min
    picked = frame.groupBy(*key).agg(pick(F.struct(*order, *columns)).alias("picked"))
    return picked.select(*key, *(F.col(f"picked.{column}").alias(column) for column in columns))


def songs_table(songs: DataFrame) -> DataFrame:
    """One row per song_id; a song_id seen twice keeps its smallest record."""
    return one_record_per_key(songs, ["song_id"], [], ["title", "artist_id", "year", "duration"]).select(
        "song_id",
        "title",
        "artist_id",
        F.col("year").cast("int").alias("year"),
        F.col("duration").cast("double").alias("duration"),
    )


def artists_table(songs: DataFrame) -> DataFrame:
    """One row per artist_id, every column from one song record: the most complete, then
    the one with the smallest song_id, so spellings are never mixed and reruns agree."""

    def unknown(column: str) -> Column:
        return F.when(F.col(column).isNull() | (F.col(column).cast("string") == ""), 1).otherwise(0)

    ranked = songs.withColumn(
        "unknown_fields",
        unknown("artist_name") + unknown("artist_location") + unknown("artist_latitude") + unknown("artist_longitude"),
    )
    picked = one_record_per_key(
        ranked,
        ["artist_id"],
        ["unknown_fields", "song_id"],
        ["artist_name", "artist_location", "artist_latitude", "artist_longitude"],
    )
    return picked.select(
        "artist_id",
        F.col("artist_name").alias("name"),
        F.col("artist_location").alias("location"),
        F.col("artist_latitude").cast("double").alias("latitude"),
        F.col("artist_longitude").cast("double").alias("longitude"),
    )


def song_matches(songs: DataFrame) -> DataFrame:
    """For each (title, artist_name, duration): the song with the smallest song_id."""
    return one_record_per_key(songs, ["title", "artist_name", "duration"], [], ["song_id", "artist_id"])


# A user's latest event is the greatest (ts, sessionId, itemInSession); its fields name the user.
USER_EVENT_COLUMNS = ("ts", "sessionId", "itemInSession", "firstName", "lastName", "gender", "level")


def latest_user_events(events: DataFrame) -> DataFrame:
    """Each logged-in user's latest event: its identity and the user's fields then."""
    return one_record_per_key(
        events.where(F.col("user_id").isNotNull()), ["user_id"], [], USER_EVENT_COLUMNS, highest=True
    )


def merge_latest_user_events(previous: DataFrame, latest: DataFrame) -> DataFrame:
    """Latest events from earlier runs and this one: the later event wins, whichever run saw it."""
    return one_record_per_key(
        previous.select(*USER_STATE.schema.fieldNames()).unionByName(latest),
        ["user_id"],
        [],
        USER_EVENT_COLUMNS,
        highest=True,
    )


def users_table(latest: DataFrame) -> DataFrame:
    """One row per logged-in user, named and levelled by their latest event."""
    return latest.select(
        F.col("user_id").cast("int").alias("user_id"),
        F.col("firstName").alias("first_name"),
        F.col("lastName").alias("last_name"),
        "gender",
        "level",
    )


# What identifies a play: an event delivered twice has the same four values.
PLAY_KEY = ("user_id", "session_id", "item_in_session", "ts")
PLAY_COLUMNS = ("level", "song", "artist", "length", "location", "userAgent")


def next_song_plays(events: DataFrame) -> DataFrame:
    """The NextSong events, as plays: their identity and what songplays takes from them."""
    return events.where(F.col("page") == "NextSong").select(
        "user_id",
        F.col("sessionId").alias("session_id"),
        F.col("itemInSession").alias("item_in_session"),
        "ts",
        *PLAY_COLUMNS,
    )


def repeated_plays(plays: DataFrame) -> DataFrame:
    """The play keys that more than one row of ``plays`` has, with their ``copies``."""
    return plays.groupBy(*PLAY_KEY).agg(F.count(F.lit(1)).alias("copies")).where(F.col("copies") > 1)


def distinct_plays(plays: DataFrame, repeated: DataFrame | None = None) -> DataFrame:
    """One row per play; a play delivered twice keeps one copy (the same one every run,
    should two copies ever differ).

    ``repeated``: the ``repeated_plays`` of these plays, when known. Only those are then
    sorted to pick a copy and every other play passes through: re-deliveries are rare,
    and sorting every play was most of the cost of building songplays.
    """
    if repeated is None:
        return one_record_per_key(plays, PLAY_KEY, [], PLAY_COLUMNS)
    # Renamed: both sides come from the same events, and same-named columns would be ambiguous.
    keys = repeated.select(*(F.col(column).alias(f"repeated_{column}") for column in PLAY_KEY))
    same_key = [F.col(column).eqNullSafe(F.col(f"repeated_{column}")) for column in PLAY_KEY]
    once = plays.join(keys, same_key, "left_anti")
    picked = one_record_per_key(plays.join(keys, same_key, "left_semi"), PLAY_KEY, [], PLAY_COLUMNS)
    return once.unionByName(picked)


def utc_calendar(timestamp: Column) -> dict[str, Column]:
    """Hour, day, ISO week, month, year and ISO weekday of an instant, in UTC.

    Computed from epoch seconds and dates, which carry no time zone, so the result is
    the same whatever the session or machine time zone is.
    """
    seconds = timestamp.cast("long")
    day = utc_day(seconds)
    return {
        "hour": F.pmod(F.floor(seconds / 3600), F.lit(24)).cast("int"),
        "day": F.dayofmonth(day),
        "week": F.weekofyear(day),  # ISO-8601: weeks start on Monday
        "weekday": (F.pmod(F.dayofweek(day) + 5, F.lit(7)) + 1).cast("int"),  # Monday 1 .. Sunday 7
        "month": F.month(day),
        "year": F.year(day),
    }


def utc_day(epoch_seconds: Column) -> Column:
    return F.date_from_unix_date(F.floor(epoch_seconds / 86400).cast("int"))


def within_days(day: Column, since: date | None, until: date | None) -> Column:
    """``since`` <= ``day`` < ``until``, an open end where a bound is None."""
    condition = F.lit(True)
    if since is not None:
        condition = condition & (day >= F.lit(since))
    if until is not None:
        condition = condition & (day < F.lit(until))
    return condition


def events_within(events: DataFrame, since: date | None, until: date | None) -> DataFrame:
    """The events of UTC days ``since`` <= day < ``until``."""
    return events.where(within_days(utc_day(F.col("ts") / 1000), since, until))


def replace_window(existing: DataFrame, fresh: DataFrame, since: date | None, until: date | None) -> DataFrame:
    """The rows the (year, month) partitions a load window touches must hold afterwards:
    those already there from outside the window, plus the window's fresh rows. A touched
    partition with no row left is not in the result, and must end up empty."""
    inside = within_days(utc_day(F.col("start_time").cast("long")), since, until)
    return existing.where(~inside).unionByName(fresh.select(*existing.columns))


def months_touched(existing: DataFrame | None, fresh: DataFrame, since: date | None, until: date | None) -> DataFrame:
    """The (year, month) partitions a window replaces: those of its fresh rows and those
    holding earlier rows inside the window."""
    touched = fresh.select("year", "month")
    if existing is not None:
        inside = within_days(utc_day(F.col("start_time").cast("long")), since, until)
        touched = touched.unionByName(existing.where(inside).select("year", "month"))
    return touched.distinct()


def songplay_id(user_id: Column, session_id: Column, item_in_session: Column, ts: Column) -> Column:
    """A deterministic id from the event's identity: the same event gets it on every run."""
    return F.md5(F.concat_ws("|", user_id, session_id, item_in_session, ts))


def songplays_table(plays: DataFrame, matches: DataFrame) -> DataFrame:
    """The fact table: every play, with its song and artist when the catalogue has them."""
    calendar = utc_calendar(F.col("start_time"))
    matched = plays.join(
        F.broadcast(matches),
        on=[plays.song == matches.title, plays.artist == matches.artist_name, plays.length == matches.duration],
        how="left",
    )
    return matched.withColumn("start_time", F.timestamp_millis(F.col("ts"))).select(
        songplay_id(F.col("user_id"), F.col("session_id"), F.col("item_in_session"), F.col("ts")).alias("songplay_id"),
        "start_time",
        F.col("user_id").cast("int").alias("user_id"),
        "level",
        "song_id",
        "artist_id",
        F.col("session_id").cast("long").alias("session_id"),
        "location",
        F.col("userAgent").alias("user_agent"),
        calendar["year"].alias("year"),
        calendar["month"].alias("month"),
    )


def time_table(songplays: DataFrame) -> DataFrame:
    """One row per distinct songplays start_time, with its UTC calendar parts."""
    calendar = utc_calendar(F.col("start_time"))
    return (
        songplays.select("start_time")
        .distinct()
        .select("start_time", *(calendar[part].alias(part) for part in TIME.schema.fieldNames()[1:]))
    )


# =============================================================================
# Checks: the quality gate every table passes before any is published
# =============================================================================


@dataclass
class CheckResult:
    table: str
    check: str
    passed: bool
    detail: str
    examples: list[str] = field(default_factory=list)


def key_checks(name: str, table: DataFrame, key: str) -> tuple[int, list[CheckResult]]:
    """The table's row count, and whether ``key`` is set on every row and names one row only."""
    # As many distinct 64-bit hashes as keys proves the keys distinct, and counting hashes
    # is cheaper than counting long strings. Only when two hashes agree (a repeated key,
    # or a collision) are the keys themselves counted.
    key_hash = F.when(F.col(key).isNotNull(), F.xxhash64(key))
    counts = table.agg(
        F.count(F.lit(1)).alias("rows"), F.count(key).alias("keyed"), F.count_distinct(key_hash).alias("hashes")
    ).first()
    distinct = counts["hashes"]
    if distinct != counts["keyed"]:
        distinct = table.agg(F.count_distinct(key)).first()[0]
    missing, repeated = counts["rows"] - counts["keyed"], counts["keyed"] - distinct
    examples = (
        []
        if not repeated
        else [
            str(row[key])
            for row in table.where(F.col(key).isNotNull())
            .groupBy(key)
            .count()
            .where("count > 1")
            .orderBy(key)
            .limit(3)
            .collect()
        ]
    )
    return counts["rows"], [
        CheckResult(
            name, f"{key} is never null", missing == 0, f"{missing:,} of {counts['rows']:,} rows have no {key}"
        ),
        CheckResult(name, f"{key} is unique", repeated == 0, f"{repeated:,} rows repeat a {key}", examples),
    ]


def reference_check(name: str, table: DataFrame, column: str, parent_name: str, parent: DataFrame) -> CheckResult:
    """Every non-null ``column`` value of ``table`` is a key of ``parent``."""
    orphans = (
        table.where(F.col(column).isNotNull())
        .select(column)
        .distinct()
        .join(parent.select(column), column, "left_anti")
    )
    examples = [str(row[column]) for row in orphans.orderBy(column).limit(3).collect()]
    missing = orphans.count() if examples else 0
    return CheckResult(
        name,
        f"{column} references {parent_name}",
        not examples,
        f"{missing:,} {column} values missing from {parent_name}",
        examples,
    )


def count_check(name: str, check: str, actual: int, expected: int, unit: str) -> CheckResult:
    return CheckResult(name, check, actual == expected, f"{actual:,} {unit}, expected {expected:,}")


def distinct_event_count(plays: DataFrame, repeated: DataFrame) -> int:
    """How many distinct events ``plays`` holds, counted apart from songplays: its rows,
    less the extra copies of the ``repeated_plays``."""
    extra_copies = repeated.agg(F.sum(F.col("copies") - 1)).first()[0] or 0
    return plays.count() - extra_copies


REFERENCES = (("user_id", "users"), ("start_time", "time"), ("song_id", "songs"), ("artist_id", "artists"))


def quality_gate(
    tables: dict[str, DataFrame], fresh_songplays: DataFrame, distinct_events: int, batches: Sequence[SourceBatch]
) -> tuple[list[CheckResult], dict[str, int]]:
    """Keys, references and reconciliation, on the tables exactly as they will be written;
    also each table's row count.

    ``tables`` may lack songplays and time (an incremental window without plays).
    ``fresh_songplays`` are this run's plays, ``distinct_events`` how many distinct
    NextSong events the accepted records hold, counted from them. The checks are small
    jobs, run side by side so every core stays busy.
    """
    with ThreadPoolExecutor(max_workers=4) as pool:
        keyed = {name: pool.submit(key_checks, name, table, spec_of(name).key) for name, table in tables.items()}
        references = [
            pool.submit(reference_check, "songplays", tables["songplays"], column, parent, tables[parent])
            for column, parent in REFERENCES
            if "songplays" in tables
        ]
        fresh_count = pool.submit(fresh_songplays.count) if fresh_songplays is not tables.get("songplays") else None
    results, rows = [], {}
    for name, checks in keyed.items():
        rows[name], table_checks = checks.result()
        results += table_checks
    results += [reference.result() for reference in references]
    fresh_rows = fresh_count.result() if fresh_count is not None else rows["songplays"]
    results.append(count_check("songplays", "one row per distinct NextSong event", fresh_rows, distinct_events, "rows"))
    for batch in batches:
        results.append(
            count_check(
                batch.dataset,
                "files read = files listed - files skipped",
                batch.files_parsed,
                len(batch.inventory.read),
                "files",
            )
        )
        results.append(
            count_check(
                batch.dataset,
                "records read = accepted + quarantined",
                batch.accepted + batch.quarantined,
                batch.records,
                "accepted + quarantined",
            )
        )
    return results, rows


def enforce_quality_gate(results: Sequence[CheckResult]) -> None:
    failed = [result for result in results if not result.passed]
    if failed:
        lines = [
            f"  - {r.table}: {r.check} failed: {r.detail}" + (f" (e.g. {', '.join(r.examples)})" if r.examples else "")
            for r in failed
        ]
        raise EtlError("The quality gate failed, so no table was published:\n" + "\n".join(lines))


def enforce_reject_limit(batch: SourceBatch, limit: float, quarantine: str) -> None:
    """Too many unusable records means the input, not a few records, is wrong: stop."""
    if batch.records and batch.quarantined / batch.records > limit:
        reasons = ", ".join(f"{reason}: {count:,}" for reason, count in sorted(batch.rejects.items()))
        raise EtlError(
            f"{batch.quarantined:,} of {batch.records:,} {batch.dataset} records "
            f"({batch.quarantined / batch.records:.1%}) were quarantined, more than the {limit:.1%} allowed "
            f"(--max-reject-rate or [ETL] MAX_REJECT_RATE), so no table was published. The records, "
            f"with their files and reasons, are in {quarantine} ({reasons})."
        )


# =============================================================================
# Load: stage, check, publish
# =============================================================================


def spec_of(name: str) -> TableSpec:
    return next(spec for spec in (*STAR_SCHEMA, USER_STATE) if spec.name == name)


@dataclass(frozen=True)
class Write:
    """One table of a run: all of it, or only the ``partitions`` a window touched."""

    spec: TableSpec
    frame: DataFrame
    partitions: tuple[tuple[int, int], ...] | None = None  # (year, month); None: the whole table


def arranged_for_writing(frame: DataFrame, spec: TableSpec) -> DataFrame:
    """Rows grouped so each partition folder gets one file, sorted within it."""
    if spec.partition_by:
        # Every row of a partition folder goes to the same task, so each folder gets one
        # file; a task per core keeps adaptive execution from merging the writes onto one.
        frame = frame.repartition(frame.sparkSession.sparkContext.defaultParallelism, *spec.partition_by)
    else:
        frame = frame.repartition(1)
    return frame.sortWithinPartitions(*spec.partition_by, *spec.sort_by)


def partition_folder(spec: TableSpec, partition: tuple[int, int]) -> str:
    return "/".join(f"{column}={value}" for column, value in zip(spec.partition_by, partition, strict=True))


def partition_rows(frame: DataFrame, spec: TableSpec, partition: tuple[int, int]) -> DataFrame:
    condition = F.lit(True)
    for column, value in zip(spec.partition_by, partition, strict=True):
        condition = condition & (F.col(column) == value)
    return frame.where(condition).drop(*spec.partition_by)


def save(writer, lake: Lake, relative: str, data_format: str) -> None:
    """Write a folder of ``data_format`` files with ``writer``, replacing what is there.

    On S3 with the staging committer, the old files are replaced when the job commits,
    not before the job: until then readers keep the previous version.
    """
    uri = lake.spark_uri(relative)
    with activity(f"writing {lake.display(relative)}"):
        if lake.replaces_on_commit:
            (
                writer.mode("append")
                .option("fs.s3a.committer.name", "directory")
                .option("fs.s3a.committer.staging.conflict-mode", "replace")
                .format(data_format)
                .save(uri)
            )
        else:
            writer.mode("overwrite").format(data_format).save(uri)


def partition_counts(frame: DataFrame, spec: TableSpec, partitions: Sequence[tuple[int, int]]) -> dict[tuple, int]:
    counts = {tuple(row[:-1]): row[-1] for row in frame.groupBy(*spec.partition_by).count().collect()}
    return {partition: counts.get(partition, 0) for partition in partitions}


class ParquetTables:
    """Writes the tables as parquet.

    On a local root every table is staged under _staging/<run>/ and swapped in by
    journaled renames once all are written (see LocalLake.publish). On S3, where there is
    no rename, each table is written in place by the S3A committer, which replaces it when
    its job commits; a journal lists the tables committed so far, so that the run after a
    failed one can say which tables are from which run.
    """

    def __init__(self, spark: SparkSession, lake: Lake, run_id: str):
        self.spark, self.lake, self.run_id = spark, lake, run_id
        self.staging = f"_staging/{run_id}"
        self.moves: list[tuple[str, str]] = []  # the renames that publish the run (local roots)
        self.committed: list[str] = []  # tables already replaced in place (S3)
        self.journal_lock = threading.Lock()
        if not lake.renames:
            lake.write_json(JOURNAL, {"run_id": run_id, "format": "parquet", "committed": []})

    def write(self, write: Write, rows: int) -> dict[str, object]:
        spec = write.spec
        if write.partitions is None:
            self._replace(write.frame, spec, spec.name, rows)
            facts: dict[str, object] = {"written": "whole table"}
        else:
            counts = partition_counts(write.frame, spec, write.partitions)
            for partition, count in counts.items():
                folder = f"{spec.name}/{partition_folder(spec, partition)}"
                if count:
                    self._replace(
                        partition_rows(write.frame, spec, partition),
                        replace(spec, partition_by=()),
                        folder,
                        count,
                        partition=True,
                    )
                else:  # the window left no row in this month: the folder goes
                    self._retire(folder)
            # A table written while empty holds one schema-only file at its top; next to
            # partition folders it would give readers two layouts.
            for top_file in self.lake.data_files_at(spec.name):
                self._retire(f"{spec.name}/{top_file}")
            facts = {
                "written": f"{len(counts)} partition{'' if len(counts) == 1 else 's'}",
                "partitions": [partition_folder(spec, partition) for partition in counts],
            }
        if not self.lake.renames:
            with self.journal_lock:
                self.committed.append(spec.name)
                self.lake.write_json(JOURNAL, {"run_id": self.run_id, "format": "parquet", "committed": self.committed})
        return facts

    def _replace(self, frame: DataFrame, spec: TableSpec, relative: str, rows: int, partition: bool = False) -> None:
        if spec.partition_by and rows:
            writer = arranged_for_writing(frame, spec).write.partitionBy(*spec.partition_by)
        else:
            # One file: an empty table keeps its schema that way, readable like any other.
            writer = frame.repartition(1).sortWithinPartitions(*spec.sort_by).write
        writer = writer.options(**dict(spec.writer_options))
        if partition:  # the table's own _SUCCESS stays the only one
            writer = writer.option("mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        if not self.lake.renames:
            save(writer, self.lake, relative, "parquet")
            return
        staged = f"{self.staging}/{relative}"
        save(writer, self.lake, staged, "parquet")
        self.moves += self.lake.replacement_moves(relative, staged, f"{self.staging}/_previous/{relative}")

    def _retire(self, relative: str) -> None:
        if self.lake.renames:
            if self.lake.exists(relative):
                self.moves.append((relative, f"{self.staging}/_previous/{relative}"))
        else:
            self.lake.remove(relative)

    def publish(self, report: RunReport) -> None:
        if self.lake.renames:
            self.lake.publish(self.run_id, self.moves)
        else:
            self.lake.remove(JOURNAL)

    def abort(self) -> None:
        if self.lake.renames:
            self.lake.discard_staging(self.run_id)
        elif not self.committed:
            self.lake.remove(JOURNAL)  # nothing was replaced: the lake is as it was


def write_quarantine(rejected: DataFrame, dataset: str, lake: Lake, run_id: str) -> None:
    """Replace ``_quarantine/<dataset>/`` with this run's rejected records, as JSON lines."""
    final = f"_quarantine/{dataset}"
    writer = rejected.repartition(1).sortWithinPartitions(*QUARANTINE_COLUMNS).write
    if not lake.renames:
        save(writer, lake, final, "json")
        return
    staged, previous = f"_staging/{run_id}/{final}", f"_staging/{run_id}/_previous/{final}"
    save(writer, lake, staged, "json")
    lake.execute_moves(lake.replacement_moves(final, staged, previous))
    lake.remove(previous)


def committed_table(
    spark: SparkSession, lake: Lake, spec: TableSpec, table_format: str, partitions: Column | None = None
) -> DataFrame | None:
    """A table the lake holds, or None when it has none; only the partitions that
    ``partitions`` selects when given. The rows are read once here, so the table can be
    written over afterwards."""
    if not lake.exists(spec.name):
        return None
    uri = lake.spark_uri(spec.name)
    with activity(f"reading {lake.display(spec.name)}"):
        if table_format == "delta":
            frame = spark.read.format("delta").load(uri)
        elif spec is USER_STATE:
            frame = spark.read.parquet(uri)
            if "userId" in frame.columns:  # written by etl.py 1.x, which keyed users by the text
                frame = frame.withColumn("user_id", F.col("userId").cast("int")).drop("userId")
        else:
            frame = spark.read.schema(spec.schema).parquet(uri)
        if partitions is not None:
            frame = frame.where(partitions)
        return frame.localCheckpoint()


# =============================================================================
# Run: the stages of one load, timed into its report
# =============================================================================


@dataclass
class SourceBatch:
    """One input dataset, read once and classified: what is usable, what is not, how much."""

    dataset: str
    inventory: Inventory
    accepted_records: DataFrame
    rejected_records: DataFrame
    files_parsed: int
    records: int
    accepted: int
    rejects: dict[str, int]

    @property
    def quarantined(self) -> int:
        return sum(self.rejects.values())

    def facts(self) -> dict[str, object]:
        return {
            **self.inventory.facts(),
            "records": self.records,
            "accepted": self.accepted,
            "quarantined": self.quarantined,
            "rejects": self.rejects,
        }


def load_and_classify(
    spark: SparkSession,
    inventory: Inventory,
    access: S3Access | None,
    classify_records: Callable[[DataFrame], DataFrame],
) -> SourceBatch:
    """Read a dataset's files once and split the records into accepted and rejected, counted.

    Only what later steps read is cached: rejected records carry their text, so the
    fields no table uses are left out.
    """
    lines = read_lines(spark, inventory.read, access)
    classified = (
        classify_records(parse_records(lines, DATASETS[inventory.dataset]))
        .drop(*UNUSED_FIELDS[inventory.dataset])
        .persist()
    )
    # One pass fills the cache and counts the outcome of every record and every file.
    outcome = (
        classified.groupBy("reject_reason")
        .agg(F.count(F.when(F.col("is_record"), 1)).alias("records"), F.count(F.when(F.col("first"), 1)).alias("files"))
        .collect()
    )
    rejects = {row["reject_reason"]: row["records"] for row in outcome if row["reject_reason"] is not None}
    accepted = sum(row["records"] for row in outcome if row["reject_reason"] is None)
    files = sum(row["files"] for row in outcome)
    log.info(
        "read %s: %d files, %d records accepted, %d quarantined",
        inventory.dataset,
        files,
        accepted,
        sum(rejects.values()),
    )
    return SourceBatch(
        inventory.dataset,
        inventory,
        accepted_records(classified),
        quarantine_records(classified),
        files_parsed=files,
        records=accepted + sum(rejects.values()),
        accepted=accepted,
        rejects=rejects,
    )


@dataclass
class Run:
    """Everything one load works with: its settings, session, lake and report."""

    settings: Settings
    spark: SparkSession
    lake: Lake
    report: RunReport
    inventories: dict[str, Inventory]

    def extract(self, dataset: str, classify_records: Callable[[DataFrame], DataFrame]) -> SourceBatch:
        """Read, classify, quarantine, report; stop when too much of the dataset is unusable."""
        with activity(f"reading {self.inventories[dataset].folder}"):
            access = self.settings.s3() if is_s3(self.settings.input_root) else None
            batch = load_and_classify(self.spark, self.inventories[dataset], access, classify_records)
        if not batch.accepted:
            raise EtlError(
                f"No usable records in {batch.inventory.folder} ({batch.quarantined:,} quarantined, see "
                f"{self.lake.display('_quarantine/' + dataset)}). Check that the input is the Sparkify dataset."
            )
        write_quarantine(batch.rejected_records, dataset, self.lake, self.report.run_id)
        self.report.inputs[dataset] = batch.facts()
        enforce_reject_limit(batch, self.settings.max_reject_rate, self.lake.display(f"_quarantine/{dataset}"))
        return batch


@dataclass
class SongTables:
    batch: SourceBatch
    songs: DataFrame
    artists: DataFrame
    matches: DataFrame


@dataclass
class LogTables:
    batch: SourceBatch
    distinct_events: int  # distinct NextSong events in the load window
    users: DataFrame
    user_state: DataFrame
    fresh_songplays: DataFrame  # this window's plays
    songplays: DataFrame | None  # as written: everything, or the touched partitions in full; None: untouched
    time: DataFrame | None
    touched: tuple[tuple[int, int], ...] | None  # the (year, month) partitions an incremental load replaces


def process_song_data(run: Run) -> SongTables:
    """song_data read once: the songs and artists tables, and the lookup plays are matched on."""
    batch = run.extract("song_data", classify_song_records)
    songs = batch.accepted_records
    return SongTables(batch, songs_table(songs).persist(), artists_table(songs).persist(), song_matches(songs))


def process_log_data(run: Run, song_tables: SongTables) -> LogTables:
    """log_data read once: users, songplays and time, merged with earlier loads when only a
    window of days is loaded."""
    settings, spark, lake = run.settings, run.spark, run.lake
    batch = run.extract("log_data", classify_log_events)
    events = events_within(batch.accepted_records, settings.since, settings.until)
    latest = latest_user_events(events)
    plays = next_song_plays(events)
    repeated = repeated_plays(plays).persist()
    distinct_events = distinct_event_count(plays, repeated)
    fresh = songplays_table(distinct_plays(plays, repeated), song_tables.matches).persist()
    songplays, touched = fresh, None
    if settings.incremental():
        previous_state = committed_table(spark, lake, USER_STATE, settings.format)
        if previous_state is None and lake.exists(USERS.name):
            raise EtlError(
                f"{lake.display(USERS.name)} exists but {lake.display(USER_STATE.name)} does not, so users "
                "cannot be merged. Run a full load (without --since/--until) once first."
            )
        if previous_state is not None:
            latest = merge_latest_user_events(previous_state, latest)
        if distinct_events == 0:
            # Nothing was played in the window: songplays and time stay as they are.
            run.report.warnings.append(
                "no NextSong events in the load window: songplays and time were left as they are"
            )
            songplays = None
        else:
            existing = committed_table(
                spark, lake, SONGPLAYS, settings.format, months_of_window(settings.since, settings.until)
            )
            touched = tuple(
                sorted(
                    (row.year, row.month)
                    for row in months_touched(existing, fresh, settings.since, settings.until).collect()
                )
            )
            if existing is not None:
                songplays = replace_window(existing, fresh, settings.since, settings.until)
    latest = latest.persist()
    songplays = songplays.persist() if songplays is not None else None
    time_rows = time_table(songplays).persist() if songplays is not None else None
    return LogTables(
        batch, distinct_events, users_table(latest).persist(), latest, fresh, songplays, time_rows, touched
    )


def months_of_window(since: date | None, until: date | None) -> Column:
    """A filter on (year, month) partition columns keeping the months a window can reach."""
    month = F.col("year") * 12 + F.col("month")
    condition = F.lit(True)
    if since is not None:
        condition = condition & (month >= since.year * 12 + since.month)
    if until is not None:
        last = date.fromordinal(until.toordinal() - 1)
        condition = condition & (month <= last.year * 12 + last.month)
    return condition


def load(run: Run, writes: Sequence[Write], rows: dict[str, int]) -> dict[str, dict[str, object]]:
    """Write every table, side by side, then publish them together.

    The writes run at the same time: a month of songplays or time is one partition
    folder, so one file written by one task, and the other cores write songs meanwhile.
    """
    if run.settings.format == "delta":
        tables = DeltaTables(run.spark, run.lake, run.report, run.settings.retain_days)
    else:
        tables = ParquetTables(run.spark, run.lake, run.report.run_id)
    try:
        with ThreadPoolExecutor(max_workers=len(writes)) as pool:
            done = {write.spec.name: pool.submit(tables.write, write, rows.get(write.spec.name, 1)) for write in writes}
        written = {name: future.result() for name, future in done.items()}
        with activity("publishing the tables"):
            tables.publish(run.report)
    except BaseException:
        tables.abort()
        raise
    return {name: {"rows": rows[name], **facts} for name, facts in written.items() if name in rows}


def run_load(run: Run) -> None:
    """Extract and transform both datasets, check every table, then write and publish them."""
    report = run.report
    song_tables = report.timed("process_song_data", process_song_data, run)
    log_tables = report.timed("process_log_data", process_log_data, run, song_tables)
    tables = {"songs": song_tables.songs, "artists": song_tables.artists, "users": log_tables.users}
    if log_tables.songplays is not None:
        tables.update(songplays=log_tables.songplays, time=log_tables.time)
    results, rows = report.timed(
        "quality_gate",
        quality_gate,
        tables,
        log_tables.fresh_songplays,
        log_tables.distinct_events,
        [song_tables.batch, log_tables.batch],
    )
    report.checks = [asdict(result) for result in results]
    enforce_quality_gate(results)
    writes = [
        Write(spec, tables[spec.name], log_tables.touched if spec.partition_by == ("year", "month") else None)
        for spec in STAR_SCHEMA
        if spec.name in tables
    ]
    writes.append(Write(USER_STATE, log_tables.user_state))
    report.tables = report.timed("load", load, run, writes, rows)


# =============================================================================
# Delta Lake output: one commit per table, history, rollback
# =============================================================================

DELTA_TABLES = (*STAR_SCHEMA, USER_STATE)


def delta_package(spark_version: str) -> str:
    """The delta-spark artifact for a Spark line; an error naming the supported lines."""
    line = ".".join(spark_version.split(".")[:2])
    packages = {
        "3.5": "io.delta:delta-spark_2.12:3.3.2",
        "4.0": "io.delta:delta-spark_4.0_2.13:4.4.0",
        "4.1": "io.delta:delta-spark_4.1_2.13:4.4.0",
        "4.2": "io.delta:delta-spark_4.2_2.13:4.4.0",
    }
    if line not in packages:
        raise EtlError(
            f"--format delta needs Delta Lake for Spark {line}, and none is published: Delta Lake "
            f"supports Spark {', '.join(packages)}. Install one of those pyspark lines "
            f"(pip install 'pyspark=={sorted(packages)[-1]}.*'), or write parquet (--format parquet)."
        )
    return packages[line]


DELTA_SESSION = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


def configure_delta(spark: SparkSession, retain_days: int) -> None:
    """Delta's session settings for tables this size, and the retention new tables get."""
    tasks = str(spark.sparkContext.defaultParallelism * 2)
    # Delta rebuilds a table's state in 50 tasks and lists files in up to 10,000: for
    # tables this size that is most of the time of every read, commit and VACUUM.
    spark.conf.set("spark.databricks.delta.snapshotPartitions", tasks)
    spark.conf.set("spark.sql.sources.parallelPartitionDiscovery.parallelism", tasks)
    for key, value in retention_properties(retain_days).items():
        spark.conf.set(f"spark.databricks.delta.properties.defaults.{key.removeprefix('delta.')}", value)
    # Delta refuses a retention under its 7-day default unless told the shorter one is meant.
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", str(retain_days >= 7).lower())


def retention_properties(retain_days: int) -> dict[str, str]:
    """Files no longer needed stay ``retain_days`` days; the log at least as long (30 by default)."""
    return {
        "delta.deletedFileRetentionDuration": f"interval {retain_days} days",
        "delta.logRetentionDuration": f"interval {max(retain_days, 30)} days",
    }


def delta_path(lake: Lake, name: str) -> str:
    return "delta.`" + lake.spark_uri(name).replace("`", "``") + "`"


def delta_version(lake: Lake, name: str) -> int | None:
    """The table's latest version (its newest commit file in _delta_log), or None when
    there is no Delta table there."""
    commits = [int(entry[:-5]) for entry in lake.names(f"{name}/_delta_log") if re.fullmatch(r"\d{20}\.json", entry)]
    return max(commits) if commits else None


def restore_delta(spark: SparkSession, lake: Lake, versions: Mapping[str, int | None]) -> list[str]:
    """Tables back to ``versions`` (None: the table did not exist, so it is removed).
    Returns the names of the tables that changed."""
    changed = []
    for name, version in versions.items():
        current = delta_version(lake, name)
        if current == version:
            continue
        with activity(f"restoring {lake.display(name)} to version {version}"):
            if version is None:
                lake.remove(name)
            else:
                spark.sql(f"RESTORE TABLE {delta_path(lake, name)} TO VERSION AS OF {version}")
        changed.append(name)
    return changed


class DeltaTables:
    """Writes each table as one Delta commit tagged with the run id. The versions before
    the run are journaled first: a run that fails after some commits restores them, and
    one that was killed is restored by the next run, so readers get one consistent set."""

    def __init__(self, spark: SparkSession, lake: Lake, report: RunReport, retain_days: int):
        self.spark, self.lake, self.report = spark, lake, report
        keep_retention(spark, lake, retain_days)
        self.before = {spec.name: delta_version(lake, spec.name) for spec in DELTA_TABLES}
        lake.write_json(JOURNAL, {"run_id": report.run_id, "format": "delta", "versions_before": self.before})

    def write(self, write: Write, rows: int) -> dict[str, object]:
        spec = write.spec
        writer = (
            arranged_for_writing(write.frame, spec)
            .write.format("delta")
            .option("userMetadata", f"sparkify-etl run {self.report.run_id}")
        )
        if spec.partition_by:
            writer = writer.partitionBy(*spec.partition_by)
        facts: dict[str, object] = {"written": "whole table"}
        if write.partitions is not None:
            months = " OR ".join(f"(year = {year} AND month = {month})" for year, month in write.partitions)
            # Only the months replaced: a row outside them would break the commit's condition.
            writer = (
                arranged_for_writing(write.frame.where(months or "false"), spec)
                .write.format("delta")
                .option("userMetadata", f"sparkify-etl run {self.report.run_id}")
                .partitionBy(*spec.partition_by)
                .option("replaceWhere", months or "false")
            )
            facts = {
                "written": f"{len(write.partitions)} partition{'' if len(write.partitions) == 1 else 's'}",
                "partitions": [partition_folder(spec, partition) for partition in write.partitions],
            }
        else:
            writer = writer.option("overwriteSchema", "true")
        with activity(f"writing {self.lake.display(spec.name)}"):
            writer.mode("overwrite").save(self.lake.spark_uri(spec.name))
        facts["version"] = delta_version(self.lake, spec.name)
        return facts

    def publish(self, report: RunReport) -> None:
        report.versions = {spec.name: delta_version(self.lake, spec.name) for spec in DELTA_TABLES}
        self.lake.remove(JOURNAL)

    def abort(self) -> None:
        restored = restore_delta(self.spark, self.lake, self.before)
        if restored:
            self.report.warnings.append(f"restored {', '.join(restored)} to their versions before this run")
        self.lake.remove(JOURNAL)


def keep_retention(spark: SparkSession, lake: Lake, retain_days: int) -> None:
    """Give the tables the retention of ``retain_days`` when the last run made them with another."""
    last = current_state(lake)
    if last is None or last["settings"].get("retain_days") == retain_days:
        return
    settings = ", ".join(f"'{key}' = '{value}'" for key, value in retention_properties(retain_days).items())
    for spec in DELTA_TABLES:
        if delta_version(lake, spec.name) is not None:
            spark.sql(f"ALTER TABLE {delta_path(lake, spec.name)} SET TBLPROPERTIES ({settings})")


VACUUM_EVERY_HOURS = 24


def vacuum_delta(spark: SparkSession, lake: Lake, report: RunReport) -> None:
    """Once a day, remove the files no version inside the retention period needs (the
    tables' delta.deletedFileRetentionDuration); never newer ones."""
    last = max((r.get("vacuumed_at") or "" for r in lake.reports()), default="")
    if last and (datetime.now(timezone.utc) - datetime.fromisoformat(last)).total_seconds() < VACUUM_EVERY_HOURS * 3600:
        return
    if report.based_on is None:  # the tables are new: nothing older to clean up
        report.vacuumed_at = utc_now()
        return

    def vacuum(name: str) -> None:
        with activity(f"cleaning up {lake.display(name)}"):
            try:  # from the log alone, without listing the table's files ...
                spark.sql(f"VACUUM {delta_path(lake, name)} LITE").collect()
            except Exception as error:  # ... unless the log no longer reaches back far enough
                if "LITE" not in f"{error} {root_cause(error)}":
                    raise
                spark.sql(f"VACUUM {delta_path(lake, name)}").collect()

    with ThreadPoolExecutor(max_workers=len(DELTA_TABLES)) as pool:
        for done in [pool.submit(vacuum, spec.name) for spec in DELTA_TABLES]:
            done.result()
    report.vacuumed_at = utc_now()


def current_state(lake: Lake) -> dict | None:
    """The report of the run whose table versions the lake holds: the last successful
    load, or the run the last rollback returned to."""
    succeeded = {r["run_id"]: r for r in lake.reports() if r.get("status") == "succeeded" and r.get("versions")}
    if not succeeded:
        return None
    last = list(succeeded.values())[-1]
    return succeeded.get(last["rolled_back_to"]) if last.get("mode") == "rollback" else last


def rollback(spark: SparkSession, lake: Lake, report: RunReport) -> str:
    """Every table back to the versions it had before the current state's run; returns
    the id of the run those versions came from."""
    current = current_state(lake)
    if current is None:
        raise EtlError(
            f"{lake.display('_runs')} records no successful Delta load, so there is nothing to roll back to."
        )
    earlier = next((r for r in lake.reports() if r["run_id"] == current.get("based_on")), None)
    if earlier is None:
        raise EtlError(
            f"The tables are at the versions of run {current['run_id']}, which replaced no earlier "
            "successful run: there is nothing to roll back to."
        )
    try:
        restore_delta(spark, lake, earlier["versions"])
    except EtlError as error:
        raise EtlError(
            f"{error} Versions older than the retention period ([ETL] RETAIN_DAYS) are cleaned up "
            "and cannot be restored."
        ) from None
    report.versions = {spec.name: delta_version(lake, spec.name) for spec in DELTA_TABLES}
    report.rolled_back_to = earlier["run_id"]
    return earlier["run_id"]


# =============================================================================
# Catalog: the tables registered by name in the session's metastore
# =============================================================================


def column_ddl(schema: T.StructType, names: Sequence[str]) -> str:
    kinds = {"string": "STRING", "int": "INT", "bigint": "BIGINT", "double": "DOUBLE", "timestamp": "TIMESTAMP"}
    return ", ".join(f"`{name}` {kinds[schema[name].dataType.simpleString()]}" for name in names)


def register_tables(spark: SparkSession, lake: Lake, database: str, table_format: str) -> None:
    """Each table as an external table of ``database``, with all its partitions; running
    again leaves one definition per table."""
    spark.sql(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    for spec in STAR_SCHEMA:
        qualified, location = f"`{database}`.`{spec.name}`", lake.spark_uri(spec.name)
        existing = spark.sql(f"SHOW TABLES IN `{database}` LIKE '{spec.name}'").collect()
        if existing:
            kind = spark.sql(f"DESCRIBE TABLE EXTENDED {qualified}").where("col_name = 'Type'").first()
            if kind is not None and kind["data_type"].upper() == "MANAGED":
                raise EtlError(
                    f"{database}.{spec.name} exists as a managed table, which etl.py will not replace: "
                    "choose another database with --catalog."
                )
            spark.sql(f"DROP TABLE {qualified}")  # external: its files stay
        if table_format == "delta":
            spark.sql(f"CREATE TABLE {qualified} USING DELTA LOCATION '{location}'")
            continue
        data = [name for name in spec.schema.fieldNames() if name not in spec.partition_by]
        partitioned = f" PARTITIONED BY ({', '.join(spec.partition_by)})" if spec.partition_by else ""
        spark.sql(
            f"CREATE TABLE {qualified} ({column_ddl(spec.schema, data + list(spec.partition_by))}) "
            f"USING PARQUET{partitioned} LOCATION '{location}'"
        )
        if spec.partition_by:
            spark.sql(f"MSCK REPAIR TABLE {qualified} SYNC PARTITIONS")


def athena_ddl(output_root: str, table_format: str) -> str:
    """CREATE EXTERNAL TABLE statements for Athena: songplays and time use partition
    projection, songs (artist_id cannot be projected) is repaired after each load."""
    root = re.sub(r"^s3a://", "s3://", output_root).rstrip("/")
    statements = []
    for spec in STAR_SCHEMA:
        location = f"{root}/{spec.name}/"
        if table_format == "delta":
            statements.append(
                f"CREATE EXTERNAL TABLE IF NOT EXISTS {spec.name}\nLOCATION '{location}'\n"
                "TBLPROPERTIES ('table_type' = 'DELTA');"
            )
            continue
        data = [name for name in spec.schema.fieldNames() if name not in spec.partition_by]
        text = f"CREATE EXTERNAL TABLE IF NOT EXISTS {spec.name} ({column_ddl(spec.schema, data)})"
        if spec.partition_by:
            text += f"\nPARTITIONED BY ({column_ddl(spec.schema, spec.partition_by)})"
        text += f"\nSTORED AS PARQUET\nLOCATION '{location}'"
        if spec.partition_by == ("year", "month"):
            text += (
                "\nTBLPROPERTIES (\n  'projection.enabled' = 'true',\n"
                "  'projection.year.type' = 'integer', 'projection.year.range' = '2000,2099',\n"
                "  'projection.month.type' = 'integer', 'projection.month.range' = '1,12',\n"
                f"  'storage.location.template' = '{location}year=${{year}}/month=${{month}}/')"
            )
        statements.append(text + ";")
        if spec.name == "songs":
            statements.append("MSCK REPAIR TABLE songs;")
    return "\n\n".join(statements) + "\n"


# =============================================================================
# Settings: built-in defaults < dl.cfg < environment < command-line flags
# =============================================================================

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE / "data" / "sample"
DEFAULT_OUTPUT = "output"
DEFAULT_CONFIG = "dl.cfg"
DEFAULT_MAX_REJECT_RATE = 0.01  # above this share of a dataset quarantined, the input is suspect
DEFAULT_RETAIN_DAYS = 7
FORMATS = ("parquet", "delta")
S3A_COMMITTERS = ("directory", "magic")
STAGING_COMMITTERS = ("directory",)

# Every key dl.cfg may hold, by section; dl.cfg.example documents each one.
CONFIG_KEYS = {
    "AWS": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3"),
    "ETL": ("INPUT", "OUTPUT", "FORMAT", "MAX_REJECT_RATE", "CATALOG", "RETAIN_DAYS"),
    "SPARK": ("PACKAGES", "S3A_COMMITTER"),
}


class EtlError(Exception):
    """A failure the user can act on; its message is the whole paragraph they are shown."""


class UsageError(EtlError):
    """A flag or setting that cannot work as given (exit status 2)."""


@dataclass(frozen=True)
class Settings:
    """Everything one run needs to know, resolved once."""

    input_root: str  # an absolute local path, or s3a:// (s3://) URI, without a trailing slash
    output_root: str
    format: str = "parquet"
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    endpoint_url: str | None = None
    packages: str | None = None  # Maven coordinates to add; None: worked out from the installed Spark
    s3a_committer: str | None = None  # None: directory on local and YARN masters, magic elsewhere
    max_reject_rate: float = DEFAULT_MAX_REJECT_RATE
    since: date | None = None  # incremental load: only log events from this UTC day ...
    until: date | None = None  # ... up to, not including, this one
    catalog: str | None = None
    retain_days: int = DEFAULT_RETAIN_DAYS

    def incremental(self) -> bool:
        return self.since is not None or self.until is not None

    def s3(self) -> S3Access:
        return S3Access(self.region, self.endpoint_url, self.access_key_id, self.secret_access_key, self.session_token)

    def redacted(self) -> dict[str, object]:
        """The effective settings for the run report: no secret, the key id masked."""
        shown = {
            **vars(self),
            "access_key_id": "****" + self.access_key_id[-4:] if self.access_key_id else None,
            "secret_access_key": "****" if self.secret_access_key else None,
            "session_token": "****" if self.session_token else None,
        }
        return {name: value.isoformat() if isinstance(value, date) else value for name, value in shown.items()}


def is_s3(root: str) -> bool:
    return root.startswith(("s3a://", "s3://"))


def read_config_file(path: Path) -> dict[str, str]:
    """The keys of a dl.cfg file as ``{"SECTION.KEY": value}``, empty values left out."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str.upper  # keys are case-insensitive, as in the AWS docs
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as error:
        raise UsageError(
            f"Cannot read the config file {path}: {error.strerror}. Pass an existing "
            "file with --config, or copy dl.cfg.example to dl.cfg."
        ) from None
    except configparser.Error as error:
        reason = str(error).splitlines()[0]
        raise UsageError(
            f"The config file {path} is not a valid INI file ({reason}). See dl.cfg.example for its layout."
        ) from None
    values = {}
    for section in parser.sections():
        known = CONFIG_KEYS.get(section.upper())
        if known is None:
            raise UsageError(
                f"The config file {path} has an unknown section [{section}]; "
                f"the known sections are {', '.join(CONFIG_KEYS)} (see dl.cfg.example)."
            )
        for key, value in parser.items(section):
            if key not in known:
                raise UsageError(
                    f"The config file {path} has an unknown key {key} in [{section}]; "
                    f"that section takes {', '.join(known)} (see dl.cfg.example)."
                )
            if value.strip():
                values[f"{section.upper()}.{key}"] = value.strip()
    return values


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Merge defaults, dl.cfg, environment and flags, the later winning."""
    if args.config is not None:
        config = read_config_file(Path(args.config))
    elif Path(DEFAULT_CONFIG).is_file():
        config = read_config_file(Path(DEFAULT_CONFIG))
    else:
        config = {}

    # The key, secret and token belong together: take all three from the first source
    # that names a key, so a key from one place never pairs with a secret from another.
    credential_names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    if environ.get("AWS_ACCESS_KEY_ID"):
        key_id, secret, token = (environ.get(name) or None for name in credential_names)
    else:
        key_id, secret, token = (config.get(f"AWS.{name}") for name in credential_names)
    if bool(key_id) != bool(secret):
        raise UsageError(
            "AWS credentials are incomplete: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "must be given together (in dl.cfg [AWS] or the environment), or neither, to "
            "use the default AWS credential chain."
        )

    def first(*candidates: str | None) -> str | None:
        return next((value for value in candidates if value), None)

    committer = config.get("SPARK.S3A_COMMITTER")
    if committer is not None and committer.lower() not in S3A_COMMITTERS:
        raise UsageError(
            f"[SPARK] S3A_COMMITTER = {committer} is not a committer etl.py supports; use "
            f"{' or '.join(S3A_COMMITTERS)} (see dl.cfg.example)."
        )
    table_format = (first(args.format, config.get("ETL.FORMAT")) or "parquet").lower()
    if table_format not in FORMATS:
        raise UsageError(f"[ETL] FORMAT = {table_format} is not a format etl.py writes; use {' or '.join(FORMATS)}.")
    if getattr(args, "rollback", False) and table_format != "delta":
        raise UsageError(
            "--rollback returns Delta tables to earlier versions; parquet tables keep no history. "
            "Add --format delta (and load with it) to have rollbacks."
        )
    since, until = args.since, args.until
    if since and until and since >= until:
        raise UsageError(f"--since {since} is not before --until {until}: the window would hold no day.")
    catalog = first(args.catalog, config.get("ETL.CATALOG"))
    if catalog is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", catalog):
        raise UsageError(f"The catalog database name {catalog!r} must be letters, digits and underscores.")
    return Settings(
        input_root=to_root(first(args.input, config.get("ETL.INPUT")) or str(DEFAULT_INPUT)),
        output_root=to_root(first(args.output, config.get("ETL.OUTPUT")) or DEFAULT_OUTPUT),
        format=table_format,
        access_key_id=key_id,
        secret_access_key=secret,
        session_token=token,
        region=first(environ.get("AWS_REGION"), environ.get("AWS_DEFAULT_REGION"), config.get("AWS.AWS_REGION")),
        endpoint_url=first(
            environ.get("AWS_ENDPOINT_URL_S3"), environ.get("AWS_ENDPOINT_URL"), config.get("AWS.AWS_ENDPOINT_URL_S3")
        ),
        packages=config.get("SPARK.PACKAGES"),
        s3a_committer=committer.lower() if committer else None,
        max_reject_rate=reject_rate(first(args.max_reject_rate, config.get("ETL.MAX_REJECT_RATE"))),
        since=since,
        until=until,
        catalog=catalog,
        retain_days=retain_days(config.get("ETL.RETAIN_DAYS")),
    )


def reject_rate(text: str | None) -> float:
    if text is None:
        return DEFAULT_MAX_REJECT_RATE
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:
        raise UsageError(
            f"The reject limit {text!r} is not a fraction between 0 and 1 (0.01 allows 1% of "
            "a dataset's records to be quarantined): check --max-reject-rate or [ETL] MAX_REJECT_RATE."
        )
    return rate


def retain_days(text: str | None) -> int:
    if text is None:
        return DEFAULT_RETAIN_DAYS
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"[ETL] RETAIN_DAYS = {text} is not a whole number of days of at least 1.")
    return int(text)


def to_root(root: str) -> str:
    """A root as an absolute local path (never percent-encoded) or an s3a:// or s3:// URI,
    without a trailing slash."""
    scheme = urlparse(root).scheme
    if scheme in ("s3", "s3a"):
        if not urlparse(root).netloc:
            raise UsageError(f"{root!r} names no bucket: write s3a://BUCKET/PREFIX.")
        return f"{scheme}://" + root.split("://", 1)[1].rstrip("/")
    if scheme == "file":
        return os.path.abspath(unquote(urlparse(root).path))
    if scheme and len(scheme) > 1:  # not a Windows drive letter
        raise UsageError(
            f"Unsupported location {root!r}: use a local folder, a file:// URI or an s3a:// (or s3://) "
            "URI. On EMR, write to s3:// (HDFS does not outlive the cluster); elsewhere, copy the data "
            "to a local folder or a bucket first."
        )
    return os.path.abspath(root)


def bucket_and_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


# =============================================================================
# Lake: the output root as the driver sees it (local folders or an S3 prefix), the
# lock, the journal and the reports; the table files themselves are Spark's
# =============================================================================

JOURNAL = "_journal.json"
LOCK = "_lock"


class Lake:
    """Operations on the output root that need no Spark: small files, listings, renames."""

    renames = False  # whether folders can be renamed (local roots), so tables can be swapped in
    replaces_on_commit = False  # whether Spark's committer replaces a folder when its job commits (S3)

    def display(self, relative: str = "") -> str:
        raise NotImplementedError

    def spark_uri(self, relative: str = "") -> str:
        raise NotImplementedError

    def read_text(self, relative: str) -> str | None:
        raise NotImplementedError

    def write_text(self, relative: str, text: str) -> None:
        raise NotImplementedError

    def exists(self, relative: str) -> bool:
        raise NotImplementedError

    def remove(self, relative: str) -> None:
        raise NotImplementedError

    def names(self, relative: str) -> list[str]:
        """The names directly under a folder."""
        raise NotImplementedError

    def data_files_at(self, table: str) -> list[str]:
        """Data files right at a table's top (not in partition folders)."""
        return [name for name in self.names(table) if not name.startswith(("_", ".")) and "=" not in name]

    def has_table(self, name: str) -> bool:
        return self.exists(f"{name}/_SUCCESS") or self.exists(f"{name}/_delta_log")

    def read_json(self, relative: str) -> dict | None:
        text = self.read_text(relative)
        return json.loads(text) if text else None

    def write_json(self, relative: str, document: object) -> None:
        self.write_text(relative, json.dumps(document, indent=2, default=str) + "\n")

    def reports(self) -> list[dict]:
        """The run reports, oldest first."""
        found = [self.read_json(f"_runs/{name}") for name in self.names("_runs") if name.endswith(".json")]
        return sorted((r for r in found if r), key=lambda r: (r.get("started_at", ""), r.get("run_id", "")))


class LocalLake(Lake):
    renames = True

    def __init__(self, root: str):
        self.root = Path(root)

    def path(self, relative: str) -> Path:
        return self.root / relative if relative else self.root

    def display(self, relative: str = "") -> str:
        return str(self.path(relative))

    def spark_uri(self, relative: str = "") -> str:
        # Hadoop takes "file:" + a raw path as it is: spaces and any other character stay.
        return "file://" + str(self.path(relative))

    def read_text(self, relative: str) -> str | None:
        try:
            return self.path(relative).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, relative: str, text: str) -> None:
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)

    def exists(self, relative: str) -> bool:
        return os.path.lexists(self.path(relative))

    def remove(self, relative: str) -> None:
        target = self.path(relative)
        if target.is_dir() and not target.is_symlink():
            import shutil

            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()

    def names(self, relative: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(relative)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def replacement_moves(self, final: str, staged: str, previous: str) -> list[tuple[str, str]]:
        """The renames that put ``staged`` in place of ``final``, keeping the old one at ``previous``."""
        return ([(final, previous)] if self.exists(final) else []) + [(staged, final)]

    def execute_moves(self, moves: Iterable[tuple[str, str]]) -> None:
        """Each rename whose source is still there and whose destination is free: run
        again after an interruption, it completes what is left and redoes nothing."""
        for source, destination in moves:
            if self.exists(source) and not self.exists(destination):
                self.path(destination).parent.mkdir(parents=True, exist_ok=True)
                os.rename(self.path(source), self.path(destination))

    def publish(self, run_id: str, moves: list[tuple[str, str]]) -> None:
        """Swap the staged tables in: the renames are journaled first, so a run that dies
        in the middle is completed by the next one (see recover)."""
        self.write_json(JOURNAL, {"run_id": run_id, "moves": moves})
        self.execute_moves(moves)
        self.remove(JOURNAL)
        self.discard_staging(run_id)

    def discard_staging(self, run_id: str) -> None:
        self.remove(f"_staging/{run_id}")
        with contextlib.suppress(OSError):
            self.path("_staging").rmdir()  # only when no other run's folder is left in it

    def lock(self, holder: dict[str, object]) -> contextlib.AbstractContextManager:
        return LocalLock(self.path(LOCK), holder)

    def probe(self) -> None:
        """Fail now if the output cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"_probe-{os.getpid()}"
            probe.write_text("etl.py write probe\n")
            probe.unlink()
        except OSError as error:
            raise EtlError(
                f"Cannot write to the output {self.root}: {error.strerror}. Choose a folder you can "
                "write to (--output or [ETL] OUTPUT)."
            ) from None


class LocalLock:
    """An exclusive lock on a file under the output root: the kernel releases it when the
    process ends, however it ends, so a dead run's lock never blocks the next one."""

    def __init__(self, path: Path, holder: dict[str, object]):
        self.path, self.holder, self.handle = path, holder, None

    def __enter__(self) -> LocalLock:
        import fcntl

        self.handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.seek(0)
            other = self.handle.read()
            self.handle.close()
            raise EtlError(running_elsewhere(self.path.parent, other)) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps(self.holder) + "\n")
        self.handle.flush()
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.close()  # releases the lock


def running_elsewhere(root: object, holder_text: str) -> str:
    try:
        holder = json.loads(holder_text)
        who = f"run {holder['run_id']} (process {holder['pid']} on {holder['host']}, started {holder['started_at']})"
    except (ValueError, KeyError, TypeError):
        who = "another run"
    return (
        f"{who} is loading into {root} right now, and two runs on one output would mix their tables. "
        "Wait for it to finish and run again; a run that died releases its lock by itself."
    )


class S3Lake(Lake):
    """An S3 prefix, through boto3: there is no rename, so Spark's committers write the
    tables in place and this only keeps the lock, the journal and the reports."""

    def __init__(self, root: str, access: S3Access):
        self.root = root
        self.bucket, self.prefix = bucket_and_key(root)
        self.access = access
        self.client = access.client(32)

    def key(self, relative: str) -> str:
        return "/".join(part for part in (self.prefix, relative) if part)

    def display(self, relative: str = "") -> str:
        return "/".join(part for part in (self.root, relative) if part)

    def spark_uri(self, relative: str = "") -> str:
        return self.display(relative)

    def read_text(self, relative: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(relative))["Body"].read().decode("utf-8")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise explain_s3_error(error, f"read {self.display(relative)}", self.access) from None

    def write_text(self, relative: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(relative), Body=text.encode("utf-8"))

    def _keys(self, relative: str, delimiter: str | None = None) -> Iterator[dict]:
        prefix = self.key(relative).rstrip("/") + "/" if relative or self.prefix else ""
        arguments = {"Bucket": self.bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
        for page in self.client.get_paginator("list_objects_v2").paginate(**arguments):
            yield from page.get("Contents", [])
            yield from ({"Key": common["Prefix"]} for common in page.get("CommonPrefixes", []))

    def exists(self, relative: str) -> bool:
        if self.read_head(relative):
            return True
        return next(self._keys(relative), None) is not None

    def read_head(self, relative: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(relative))
            return True
        except ClientError:
            return False

    def has_table(self, name: str) -> bool:
        return self.read_head(f"{name}/_SUCCESS") or next(self._keys(f"{name}/_delta_log"), None) is not None

    def remove(self, relative: str) -> None:
        keys = [{"Key": self.key(relative)}] + [{"Key": item["Key"]} for item in self._keys(relative)]
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000], "Quiet": True}
            )

    def names(self, relative: str) -> list[str]:
        prefix = self.key(relative).rstrip("/") + "/" if relative or self.prefix else ""
        return sorted({item["Key"][len(prefix) :].rstrip("/") for item in self._keys(relative, "/")} - {""})

    def lock(self, holder: dict[str, object]) -> contextlib.AbstractContextManager:
        return S3Lock(self, holder)

    def probe(self) -> None:
        """The bucket exists (it is created when it does not) and takes writes and deletes."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise explain_s3_error(error, f"write to bucket {self.bucket}", self.access) from None
            create_bucket(self.client, self.bucket, self.access)
        except BotoCoreError as error:
            raise explain_s3_error(error, f"write to bucket {self.bucket}", self.access) from None
        probe = self.key(f"_probe-{os.getpid()}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"etl.py write probe\n")
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except (BotoCoreError, ClientError) as error:
            raise explain_s3_error(error, f"write to {self.root}", self.access) from None


class S3Lock:
    """A lock object created only if absent (a conditional PUT). The holder refreshes it
    every minute; a lock whose process is gone (same host) or that was not refreshed for
    five minutes belongs to a dead run and is taken over, with a conditional PUT again."""

    REFRESH_SECONDS, STALE_SECONDS = 60, 300

    def __init__(self, lake: S3Lake, holder: dict[str, object]):
        self.lake, self.holder = lake, holder
        self.etag: str | None = None
        self.stop = threading.Event()
        self.refresher: threading.Thread | None = None

    def _put(self, **condition: str) -> str:
        body = json.dumps({**self.holder, "refreshed_at": utc_now()}).encode()
        answer = self.lake.client.put_object(Bucket=self.lake.bucket, Key=self.lake.key(LOCK), Body=body, **condition)
        return answer["ETag"]

    def __enter__(self) -> S3Lock:
        from botocore.exceptions import ClientError

        try:
            self.etag = self._put(IfNoneMatch="*")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise explain_s3_error(error, f"lock {self.lake.root}", self.lake.access) from None
            current = self.lake.client.get_object(Bucket=self.lake.bucket, Key=self.lake.key(LOCK))
            text = current["Body"].read().decode("utf-8", "replace")
            if not lock_is_stale(text, self.STALE_SECONDS):
                raise EtlError(running_elsewhere(self.lake.root, text)) from None
            log.warning("taking over the lock of a run that died: %s", text.strip())
            try:
                self.etag = self._put(IfMatch=current["ETag"])
            except ClientError:
                raise EtlError(running_elsewhere(self.lake.root, text)) from None
        self.refresher = threading.Thread(target=self._refresh, daemon=True)
        self.refresher.start()
        return self

    def _refresh(self) -> None:
        while not self.stop.wait(self.REFRESH_SECONDS):
            with contextlib.suppress(Exception):
                self.etag = self._put(IfMatch=self.etag)

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        with contextlib.suppress(Exception):
            self.lake.client.delete_object(Bucket=self.lake.bucket, Key=self.lake.key(LOCK), IfMatch=self.etag)


def lock_is_stale(text: str, stale_seconds: float) -> bool:
    try:
        holder = json.loads(text)
        refreshed = datetime.fromisoformat(holder["refreshed_at"])
    except (ValueError, KeyError, TypeError):
        return True
    if holder.get("host") == socket.gethostname() and not process_alive(int(holder.get("pid", 0))):
        return True
    return (datetime.now(timezone.utc) - refreshed).total_seconds() > stale_seconds


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_lake(settings: Settings) -> Lake:
    if is_s3(settings.output_root):
        return S3Lake(settings.output_root, settings.s3())
    return LocalLake(settings.output_root)


def recover(lake: Lake, spark_for_delta: Callable[[], SparkSession] | None = None) -> list[str]:
    """Repair what an interrupted run left, before this one starts; returns what was done.

    - A publish that was journaled is completed (its tables were all written and checked).
    - A Delta run that died between table commits is undone: its tables go back to their
      versions before it.
    - Staging folders of runs that died before publishing are removed.
    - Reports still saying "running" are closed as died.
    """
    notes = []
    journal = lake.read_json(JOURNAL)
    if journal is not None:
        if journal.get("format") == "delta":
            if spark_for_delta is None:
                raise EtlError(
                    f"{lake.display(JOURNAL)} says Delta run {journal['run_id']} stopped between table "
                    "commits: rerun with --format delta so its tables can be restored first."
                )
            restored = restore_delta(spark_for_delta(), lake, journal["versions_before"])
            notes.append(
                f"run {journal['run_id']} stopped between its table commits; restored "
                f"{', '.join(restored) or 'nothing'} to the versions before it"
            )
        elif "moves" in journal:
            lake.execute_moves(journal["moves"])
            lake.discard_staging(journal["run_id"])
            notes.append(f"completed the publish of run {journal['run_id']}, which was interrupted")
        else:
            notes.append(
                f"run {journal['run_id']} stopped while replacing tables on S3 after committing "
                f"{', '.join(journal.get('committed', [])) or 'none'} of them; this run replaces them"
            )
        lake.remove(JOURNAL)
    for leftover in lake.names("_staging"):
        lake.discard_staging(leftover)
        notes.append(f"removed the staging folder of run {leftover}, which never published")
    for report in lake.reports():
        if report.get("status") == "running":
            report.update(
                status="died",
                finished_at=utc_now(),
                error="the run's process ended without closing this report (killed, or the machine stopped)",
            )
            lake.write_json(f"_runs/{report['run_id']}.json", report)
            notes.append(f"closed the report of run {report['run_id']}, whose process had died")
    return notes


# =============================================================================
# Preflight: before Spark starts, the input is listed and the output is writable
# =============================================================================


def inventory_input(settings: Settings) -> dict[str, Inventory]:
    """Every file of both datasets, each to be read or skipped with a reason."""
    inventories = {}
    for dataset in DATASETS:
        if is_s3(settings.input_root):
            try:
                inventory = list_s3_dataset(settings.s3().client(), settings.input_root, dataset)
            except Exception as error:  # noqa: BLE001 - boto3 errors become one paragraph
                raise explain_s3_error(error, f"list {settings.input_root}/{dataset}/", settings.s3()) from None
        else:
            folder = Path(settings.input_root) / dataset
            if not folder.is_dir():
                raise EtlError(
                    f"The input root {settings.input_root} has no {dataset}/ folder. Point --input (or "
                    "[ETL] INPUT in dl.cfg) at the folder that holds song_data/ and log_data/."
                )
            inventory = list_local_dataset(Path(settings.input_root), dataset)
        if not any(file.size for file in inventory.read):
            raise EtlError(
                f"{inventory.folder} holds no non-empty .json files ({inventory.found} files found, "
                f"{len(inventory.skipped)} skipped), so there is nothing to load. Check that --input "
                "points at a complete copy of the dataset."
            )
        inventories[dataset] = inventory
    return inventories


def check_roots_apart(settings: Settings) -> None:
    """The input and the output must not contain each other: a load replaces its output."""

    def parts(root: str) -> tuple[str, ...]:
        if is_s3(root):
            bucket, key = bucket_and_key(root)
            return ("s3", bucket, *[part for part in key.split("/") if part])
        return ("local", *Path(os.path.realpath(root)).parts)

    source, target = parts(settings.input_root), parts(settings.output_root)
    shorter = min(len(source), len(target))
    if source[:shorter] == target[:shorter]:
        raise EtlError(
            f"The input {settings.input_root} and the output {settings.output_root} overlap: a load "
            "replaces what is under its output, which would then include its own input. Choose an "
            "output outside the input folder, and the other way round."
        )


def explain_s3_error(error: Exception, action: str, access: S3Access | Settings) -> EtlError:
    """One paragraph saying what went wrong talking to S3 and how to fix it."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = access.endpoint_url or "AWS S3"
    if isinstance(error, NoCredentialsError):
        return EtlError(
            f"No AWS credentials were found to {action}. Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or [AWS] in dl.cfg), or run where an instance profile provides them."
        )
    if isinstance(error, EndpointConnectionError) or not isinstance(error, ClientError):
        return EtlError(
            f"Cannot reach {where} to {action} ({type(error).__name__}). Check the network "
            "and AWS_ENDPOINT_URL_S3 / [AWS] AWS_ENDPOINT_URL_S3."
        )
    code = error.response.get("Error", {}).get("Code", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "InvalidAccessKeyId":
        return EtlError(
            f"{where} does not know the AWS access key in use, so it cannot {action}. "
            "Check AWS_ACCESS_KEY_ID (environment or dl.cfg [AWS])."
        )
    if code == "SignatureDoesNotMatch":
        return EtlError(
            f"The AWS secret key does not match the access key, so {where} refused to {action}. "
            "Check AWS_SECRET_ACCESS_KEY (environment or dl.cfg [AWS])."
        )
    if code in ("ExpiredToken", "TokenRefreshRequired"):
        return EtlError(
            f"The AWS session token has expired, so {where} refused to {action}. "
            "Get fresh temporary credentials and set AWS_SESSION_TOKEN again."
        )
    if code in ("NoSuchBucket", "404", "NotFound") or status == 404:
        return EtlError(
            f"The bucket does not exist: cannot {action}. Check the bucket name in --input/--output "
            "(or [ETL] in dl.cfg) and the region."
        )
    if code in ("AccessDenied", "403", "Forbidden") or status == 403:
        return EtlError(
            f"Access denied: the AWS credentials in use may not {action}. Grant them s3:ListBucket, "
            "s3:GetObject, s3:PutObject and s3:DeleteObject on the buckets, or use other credentials."
        )
    return EtlError(f"{where} refused to {action}: {code or status}. Check the bucket, the credentials and the region.")


def create_bucket(client, bucket: str, access: S3Access) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    region = access.region or "us-east-1"
    location = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        client.create_bucket(Bucket=bucket, **location)
    except (BotoCoreError, ClientError) as error:
        raise explain_s3_error(error, f"create the output bucket {bucket} in {region}", access) from None
    log.warning("created the output bucket %s in %s", bucket, region)


# =============================================================================
# Spark session: one per run, with the jars and settings the roots need
# =============================================================================


def under_spark_submit() -> bool:
    """True when spark-submit started this driver (and its JVM, with its own settings)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def requested_master() -> str | None:
    """The master spark-submit (or PYSPARK_SUBMIT_ARGS) asked for, or None: then local[*]."""
    if under_spark_submit():
        from pyspark import SparkConf, SparkContext

        SparkContext._ensure_initialized()  # joins the JVM spark-submit started
        return SparkConf().get("spark.master", None)
    words = shlex.split(os.environ.get("PYSPARK_SUBMIT_ARGS", ""))
    if "--master" in words[:-1]:
        return words[words.index("--master") + 1]
    return None


# Transitive dependencies of spark-hadoop-cloud and delta-spark that Spark already ships,
# or that serve other clouds: left out, they can neither clash with Spark's own versions
# nor cost downloads.
SHIPPED_WITH_SPARK = (
    "com.google.cloud.bigdataoss:gcs-connector",
    "org.apache.hadoop:hadoop-azure",
    "org.apache.hadoop:hadoop-azure-datalake",
    "org.apache.hadoop:hadoop-cloud-storage",
    "org.apache.hadoop:hadoop-huaweicloud",
    "org.apache.hadoop:hadoop-aliyun",
    "org.apache.hadoop:hadoop-openstack",
    "org.apache.hadoop:hadoop-client-api",
    "org.apache.hadoop:hadoop-client-runtime",
    "com.fasterxml.jackson.core:jackson-core",
    "com.fasterxml.jackson.core:jackson-databind",
    "com.fasterxml.jackson.core:jackson-annotations",
    "com.fasterxml.jackson.dataformat:jackson-dataformat-cbor",
    "org.slf4j:slf4j-api",
    "commons-codec:commons-codec",
    "org.apache.httpcomponents:httpclient",
    "org.apache.httpcomponents:httpcore",
    "joda-time:joda-time",
    "org.eclipse.jetty:jetty-util",
    "org.eclipse.jetty:jetty-util-ajax",
    "com.squareup.okhttp3:okhttp",
    "com.squareup.okio:okio",
    "org.apache.logging.log4j:log4j-api",
    "org.apache.logging.log4j:log4j-core",
    "org.apache.logging.log4j:log4j-slf4j2-impl",
    "org.apache.parquet:parquet-column",
    "org.apache.parquet:parquet-common",
    "org.apache.parquet:parquet-encoding",
    "org.apache.parquet:parquet-format-structures",
    "org.apache.parquet:parquet-hadoop",
    "org.apache.parquet:parquet-jackson",
    "org.xerial.snappy:snappy-java",
    "com.github.luben:zstd-jni",
    "org.roaringbitmap:RoaringBitmap",
    "com.google.code.findbugs:jsr305",
    "io.airlift:aircompressor",
    "org.antlr:antlr4-runtime",
)
# spark-hadoop-cloud, Spark's binding to the S3A committers, by Spark line: the newest
# release of each. It is not published past 4.1; newer lines load 4.1's classes.
CLOUD_BINDINGS = {"3.5": "3.5.8", "4.0": "4.0.2", "4.1": "4.1.2"}
# Jars come from Maven Central alone: Spark's default resolvers also look in ~/.m2, where
# a POM that Maven fetched without its jar makes the resolution fail, and in a package
# repository whose unreachable host costs every start a timeout.
IVY_SETTINGS = """<ivysettings>
  <settings defaultResolver="central"/>
  <resolvers><ibiblio name="central" m2compatible="true" root="https://repo1.maven.org/maven2/"/></resolvers>
</ivysettings>
"""


def installed_spark_jars() -> Path:
    import pyspark

    home = os.environ.get("SPARK_HOME")
    return Path(home) / "jars" if home else Path(pyspark.__file__).parent / "jars"


def pyspark_version() -> str:
    import pyspark

    return pyspark.__version__


def connector_packages(jar_names: Sequence[str], spark_version: str) -> str | None:
    """Maven coordinates of the S3A connector matching the installed Spark's own Hadoop
    and Scala, or None when that Spark already ships one.

    hadoop-aws must be exactly the bundled Hadoop's version. spark-hadoop-cloud is not
    published for every release: the newest of the same major.minor line is taken (every
    release of a line bundles the same Hadoop), and Spark lines newer than any published
    one take the newest published line.
    """
    if any(name.startswith("hadoop-aws-") for name in jar_names):
        return None
    hadoop = next((m.group(1) for m in map(re.compile(r"hadoop-client-api-(.+)\.jar").match, jar_names) if m), None)
    scala = next((m.group(1) for m in map(re.compile(r"spark-core_(2\.1\d)-").match, jar_names) if m), None)
    if hadoop is None or scala is None:
        raise EtlError(
            "Cannot tell which Hadoop this Spark bundles (no hadoop-client-api jar in "
            f"{installed_spark_jars()}), so the matching S3A connector is unknown. Set "
            "[SPARK] PACKAGES in dl.cfg to org.apache.hadoop:hadoop-aws:<your Hadoop version>."
        )
    line = ".".join(spark_version.split(".")[:2])
    binding = CLOUD_BINDINGS.get(line, CLOUD_BINDINGS[max(CLOUD_BINDINGS, key=lambda v: tuple(map(int, v.split("."))))])
    return f"org.apache.hadoop:hadoop-aws:{hadoop},org.apache.spark:spark-hadoop-cloud_{scala}:{binding}"


def session_packages(settings: Settings, local_jvm: bool) -> dict[str, str]:
    """The spark.jars.* settings a run needs: the S3A connector for S3 roots, Delta Lake
    for --format delta. ``[SPARK] PACKAGES`` replaces the connector (``none``: nothing)."""
    packages, excludes = [], ()
    if is_s3(settings.output_root):
        if settings.packages:
            packages += [] if settings.packages.lower() == "none" else [settings.packages]
        else:
            jars = [path.name for path in installed_spark_jars().glob("*.jar")]
            connector = connector_packages(jars, pyspark_version())
            if connector:
                packages.append(connector)
                excludes = SHIPPED_WITH_SPARK
    if settings.format == "delta":
        packages.append(delta_package(pyspark_version()))
        excludes = SHIPPED_WITH_SPARK
    if local_jvm:
        packages += [package for package in LOCAL_RUN_PACKAGES if (settings.packages or "").lower() != "none"]
    confs = {"spark.jars.packages": ",".join(packages)} if packages else {}
    if excludes:
        confs["spark.jars.excludes"] = ",".join(excludes)
    return confs


def ivy_settings_file() -> str:
    path = Path(tempfile.gettempdir()) / f"sparkify-ivysettings-{os.getuid() if hasattr(os, 'getuid') else 0}.xml"
    if not path.is_file() or path.read_text() != IVY_SETTINGS:
        path.write_text(IVY_SETTINGS)
    return str(path)


def spark_submit_options(settings: Settings) -> list[str]:
    """The same jars (and Delta's session settings) as spark-submit flags, for ``--print-packages``."""
    flags = []
    for key, value in session_packages(replace(settings, output_root="s3a://any"), local_jvm=False).items():
        flags += ["--packages", value] if key == "spark.jars.packages" else ["--conf", f"{key}={value}"]
    if settings.format == "delta":
        for key, value in DELTA_SESSION.items():
            flags += ["--conf", f"{key}={value}"]
    return flags


def build_spark_session(settings: Settings, verbose: bool) -> SparkSession:
    """The one session of a run: UTC, the jars its roots and format need, quiet unless
    ``verbose`` (a JVM this process starts writes its own log to a file, not the terminal)."""
    master = requested_master()
    local_jvm = not under_spark_submit() and (master or "local").startswith("local")
    builder = (
        SparkSession.builder.appName("sparkify-etl")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.showConsoleProgress", "false")
    )
    if master is None:
        builder = builder.master("local[*]")
    if not under_spark_submit():
        packages = session_packages(settings, local_jvm)
        if packages and "ivySettings" not in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
            packages["spark.jars.ivySettings"] = ivy_settings_file()
        for key, value in packages.items():
            builder = builder.config(key, value)
    if settings.format == "delta":
        for key, value in DELTA_SESSION.items():
            builder = builder.config(key, value)
    if settings.catalog:
        builder = builder.enableHiveSupport()
    spark = start_session(builder, settings, verbose)
    spark.sparkContext.setLogLevel("INFO" if verbose else "WARN")
    if local_jvm:
        tune_local_session(spark, settings)
    size_shuffles(spark)
    return spark


SPARK_LOG = None  # where a JVM this process started writes its log (see start_session)


def start_session(builder: SparkSession.Builder, settings: Settings, verbose: bool) -> SparkSession:
    """Start (or join) the session. A JVM this process starts gets a log file for its
    output, unless ``verbose``: Ivy's downloads and Spark's own logging and printing stay
    off the terminal, and a failure to start is explained from what the JVM said."""
    global SPARK_LOG
    if under_spark_submit() or verbose:
        return builder.getOrCreate()
    # Open for the whole run: the JVM writes to it until the process ends.
    SPARK_LOG = tempfile.NamedTemporaryFile(prefix="sparkify-etl-", suffix=".log", delete=False)  # noqa: SIM115
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        for descriptor in (1, 2):  # the JVM inherits these as its stdout and stderr
            os.dup2(SPARK_LOG.fileno(), descriptor)
        return builder.getOrCreate()
    except Exception:  # noqa: BLE001 - whatever stopped the JVM, its own output says why
        raise EtlError(explain_start_failure(Path(SPARK_LOG.name).read_text(errors="replace"), settings)) from None
    finally:
        for descriptor, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, descriptor)
            os.close(copy)


def explain_start_failure(jvm_output: str, settings: Settings) -> str:
    unresolved = re.findall(r"unresolved dependency: ([^\s:]+#[^\s;]+;[^\s:]+)", jvm_output)
    if unresolved or "UNRESOLVED DEPENDENCIES" in jvm_output or ("Host" in jvm_output and "not found" in jvm_output):
        names = ", ".join(sorted({item.replace("#", ":").replace(";", ":") for item in unresolved})) or "the jars"
        return (
            f"Spark could not fetch {names} from Maven Central, so it cannot start (Ivy: "
            f"{first_line_with(jvm_output, ('not found', 'unresolved', 'Connection', 'timed out'))}). Check the "
            "network and any proxy (Ivy takes -Dhttps.proxyHost in JAVA_TOOL_OPTIONS); once fetched, the jars "
            "are kept in the Ivy cache. [SPARK] PACKAGES = none starts Spark without them (no S3, no Delta)."
        )
    if "JAVA_HOME" in jvm_output or "java: not found" in jvm_output or "No such file" in jvm_output:
        return (
            "Spark cannot start: no usable Java was found. Install Java 17 and make `java` available on PATH "
            "(or set JAVA_HOME)."
        )
    return (
        f"Spark could not start: {first_line_with(jvm_output, ('Exception', 'Error', 'error'))}. "
        "Run again with --verbose to see all of Spark's output."
    )


def first_line_with(text: str, words: Sequence[str]) -> str:
    for line in text.splitlines():
        if any(word in line for word in words):
            return line.strip()[:300]
    return "no reason given"


def jvm_has_class(spark: SparkSession, name: str) -> bool:
    """Whether the driver JVM can load ``name``; other JVM failures are raised."""
    from py4j.protocol import Py4JJavaError

    jvm = spark.sparkContext._jvm
    try:
        jvm.java.lang.Class.forName(name, False, jvm.Thread.currentThread().getContextClassLoader())
    except Py4JJavaError as error:
        if error.java_exception.getClass().getName() == "java.lang.ClassNotFoundException":
            return False
        raise
    return True


def s3a_options(settings: Settings, committer: str, local_master: bool) -> dict[str, str]:
    """Hadoop settings for S3A: credentials, endpoint, requests in flight, committer."""
    options = {
        # Thousands of small files to upload and commit: many requests in flight.
        "fs.s3a.connection.maximum": "200",
        "fs.s3a.threads.max": "64",
        "fs.s3a.committer.threads": "64",
        "fs.s3a.committer.name": committer,
        "fs.s3a.committer.magic.enabled": "true",
        # Magic committer (clusters without HDFS): the list of a task's uploads stays in its
        # memory until the task commits, instead of two objects per file (Hadoop 3.3.6+).
        "fs.s3a.committer.magic.track.commits.in.memory.enabled": "true",
        "fs.s3a.committer.abort.pending.uploads": "true",
        "mapreduce.outputcommitter.factory.scheme.s3a": "org.apache.hadoop.fs.s3a.commit.S3ACommitterFactory",
        # Keep folder markers: deleting them costs a request for every file written (Hadoop 3.3).
        "fs.s3a.directory.marker.retention": "keep",
        # Delta writes its files straight to their keys: without this, each create costs
        # probes (three HEADs and a LIST) for a file that cannot exist (Hadoop 3.4 and later).
        "fs.s3a.create.performance": "true",
    }
    if local_master:
        # The staging committer keeps its list of uploads on the cluster filesystem: in a
        # local run that is this machine's temporary folder, not the working folder.
        options["fs.s3a.committer.staging.tmp.path"] = Path(tempfile.gettempdir(), "sparkify-s3a-staging").as_uri()
    if settings.access_key_id:
        # Hadoop-owned provider names exist under both AWS SDK v1 (Spark 3.5) and v2 (Spark 4).
        options["fs.s3a.access.key"] = settings.access_key_id
        options["fs.s3a.secret.key"] = settings.secret_access_key or ""
        if settings.session_token:
            options["fs.s3a.session.token"] = settings.session_token
            options["fs.s3a.aws.credentials.provider"] = "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider"
        else:
            options["fs.s3a.aws.credentials.provider"] = "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"
    if settings.region:
        options["fs.s3a.endpoint.region"] = settings.region
    if settings.endpoint_url:
        options["fs.s3a.endpoint"] = settings.endpoint_url
        options["fs.s3a.path.style.access"] = "true"
        options["fs.s3a.connection.ssl.enabled"] = str(settings.endpoint_url.startswith("https:")).lower()
        options.setdefault("fs.s3a.endpoint.region", "us-east-1")
        # S3-compatible stores differ in the ETag/version semantics S3A checks on reads,
        # and many reject the checksums newer AWS SDKs send by default.
        options["fs.s3a.change.detection.mode"] = "none"
        options["fs.s3a.checksum.generation"] = "false"
    return options


def configure_storage(spark: SparkSession, settings: Settings, lake: Lake) -> Settings:
    """Point S3A at the store and the table writes at its committer; return the settings
    with the output root Spark should use (``s3://`` is EMRFS on EMR, S3A elsewhere).

    Only the output goes through Spark's filesystems: the input is fetched by the tasks
    themselves. Credentials go into the driver's Hadoop configuration, not the Spark
    conf: they stay off the command line, the Spark UI and the event log, and still reach
    executors with each job's serialized Hadoop configuration.
    """
    if not is_s3(settings.output_root):
        return settings
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
    if settings.output_root.startswith("s3://"):
        if hadoop_conf.get("fs.s3.impl") is not None:
            return settings  # EMRFS, with EMR's own committer and credentials
        settings = replace(settings, output_root="s3a://" + settings.output_root[len("s3://") :])
        lake.root = settings.output_root
    if not jvm_has_class(spark, "org.apache.hadoop.fs.s3a.S3AFileSystem"):
        hadoop = spark.sparkContext._jvm.org.apache.hadoop.util.VersionInfo.getVersion()
        raise EtlError(
            "This Spark has no S3A connector, so it cannot write s3a:// URIs. With spark-submit, add "
            f"--packages org.apache.hadoop:hadoop-aws:{hadoop} (the version of this Spark's Hadoop; "
            "`python etl.py --print-packages` prints the flags); python etl.py adds it by itself, and "
            "EMR ships it."
        )
    if not jvm_has_class(spark, "org.apache.spark.internal.io.cloud.PathOutputCommitProtocol"):
        raise EtlError(
            "spark-hadoop-cloud is missing, so Spark would write S3 tables by copying and deleting "
            "files, visible while half-written. Add it: `python etl.py --print-packages` prints the "
            "spark-submit flags."
        )
    master = spark.sparkContext.master
    # The staging committer needs a filesystem every task and the driver share (HDFS on
    # YARN, the local disk in local mode) for its lists of uploads; elsewhere, magic.
    committer = settings.s3a_committer or ("directory" if master.startswith(("local", "yarn")) else "magic")
    settings = replace(settings, s3a_committer=committer)
    for key, value in s3a_options(settings, committer, master.startswith("local")).items():
        hadoop_conf.set(key, value)
    spark.conf.set(
        "spark.sql.sources.commitProtocolClass", "org.apache.spark.internal.io.cloud.PathOutputCommitProtocol"
    )
    spark.conf.set(
        "spark.sql.parquet.output.committer.class", "org.apache.spark.internal.io.cloud.BindingParquetOutputCommitter"
    )
    lake.replaces_on_commit = committer in STAGING_COMMITTERS
    return settings


# =============================================================================
# Tuning: every setting that is there for speed alone, each measured in
# docs/PERFORMANCE.md (the songs table's writer options live with its schema).
# =============================================================================

# The tables are small: Spark's default of 200 shuffle tasks costs more in scheduling and
# tiny files than the shuffles do work. Applies unless spark.sql.shuffle.partitions is set.
SHUFFLE_TASKS_PER_CORE = 2


def size_shuffles(spark: SparkSession) -> None:
    if not spark.sparkContext.getConf().contains("spark.sql.shuffle.partitions"):
        spark.conf.set(
            "spark.sql.shuffle.partitions", str(spark.sparkContext.defaultParallelism * SHUFFLE_TASKS_PER_CORE)
        )


# Local runs (python etl.py) only.

# Without Hadoop's native library (pyspark ships none) Hadoop's local filesystem sets the
# permissions of every file it writes by forking `chmod`. This filesystem (Apache-2.0;
# Hadoop's raw local filesystem, setting permissions through Java NIO) writes the same
# files without forking: thousands of song partition folders are written several times
# faster.
NIO_LOCAL_FS_PACKAGE = "com.globalmentor:hadoop-bare-naked-local-fs:0.1.0"
NIO_LOCAL_FS_CLASS = "com.globalmentor.apache.hadoop.fs.NakedLocalFileSystem"  # raw: no .crc files
# The same with Hadoop's checksums, a LocalFileSystem, as the S3A staging committer needs
# for the files it stages on local disk before uploading them.
NIO_CHECKSUMMED_FS_CLASS = "com.globalmentor.apache.hadoop.fs.BareLocalFileSystem"
LOCAL_RUN_PACKAGES = (NIO_LOCAL_FS_PACKAGE,)


def tune_local_session(spark: SparkSession, settings: Settings) -> None:
    """Write local files through the NIO filesystem when its jar could be loaded: the
    tables of a local output, or the files an S3 output stages on local disk."""
    name = NIO_CHECKSUMMED_FS_CLASS if is_s3(settings.output_root) else NIO_LOCAL_FS_CLASS
    if not jvm_has_class(spark, name):
        return
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
    hadoop_conf.set("fs.file.impl", name)
    # A file:// filesystem cached before the jar was loaded would be used otherwise.
    hadoop_conf.set("fs.file.impl.disable.cache", "true")


# =============================================================================
# Run report: what a run read, wrote, checked and how long it took, under _runs/
# =============================================================================


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunReport:
    run_id: str
    started_at: str
    settings: dict[str, object]
    mode: str  # full, incremental or rollback
    format: str
    etl_version: str = __version__
    spark_version: str | None = None
    status: str = "running"  # then succeeded, failed, interrupted; died when closed by a later run
    finished_at: str | None = None
    error: str | None = None
    recovered: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    inputs: dict[str, dict[str, object]] = field(default_factory=dict)
    tables: dict[str, dict[str, object]] = field(default_factory=dict)
    versions: dict[str, int | None] = field(default_factory=dict)  # Delta tables after the run
    based_on: str | None = None  # the run whose tables this one replaced (Delta)
    vacuumed_at: str | None = None  # when this run cleaned up old Delta files
    rolled_back_to: str | None = None
    checks: list[dict[str, object]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, settings: Settings, mode: str) -> RunReport:
        moment = datetime.now(timezone.utc)
        return cls(
            run_id=f"{moment:%Y%m%dT%H%M%SZ}-{os.urandom(3).hex()}",
            started_at=utc_now(),
            settings=settings.redacted(),
            mode=mode,
            format=settings.format,
        )

    def holder(self) -> dict[str, object]:
        return {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(), "started_at": self.started_at}

    def timed(self, stage: str, step, *args):
        started = time.monotonic()
        try:
            return step(*args)
        finally:
            self.stages[stage] = round(time.monotonic() - started, 3)

    def finish(self, status: str, error: str | None = None) -> None:
        self.finished_at, self.status, self.error = utc_now(), status, error

    @property
    def location(self) -> str:
        return f"_runs/{self.run_id}.json"

    def save(self, lake: Lake) -> None:
        """Write the report; one that cannot be written is logged and never masks the run's outcome."""
        try:
            lake.write_json(self.location, asdict(self))
        except Exception as error:  # noqa: BLE001 - the run's own result matters more
            log.warning("could not write the run report %s: %s", lake.display(self.location), one_line(error))

    def save_file_list(self, lake: Lake, inventories: Mapping[str, Inventory]) -> None:
        """Every input file and what became of it, one JSON line each, beside the report."""
        lines = []
        for dataset, inventory in inventories.items():
            lines += [
                json.dumps({"dataset": dataset, "path": f.path, "bytes": f.size, "read": True}) for f in inventory.read
            ]
            lines += [
                json.dumps({"dataset": dataset, "path": path, "read": False, "reason": reason})
                for path, reason in inventory.skipped
            ]
        with contextlib.suppress(Exception):
            lake.write_text(f"_runs/{self.run_id}.files.jsonl", "\n".join(lines) + "\n")


def summary(report: RunReport, lake: Lake) -> str:
    """The closing summary, drawn from the run report."""
    if report.mode == "rollback":
        return (
            f"Sparkify ETL rolled back the tables in {lake.display()} to run {report.rolled_back_to}\n"
            + "".join(f"  {name:<10} version {version}\n" for name, version in report.versions.items())
            + f"  run report: {lake.display(report.location)}"
        )
    lines = [f"Sparkify ETL finished ({report.mode} load, {report.format}): tables in {lake.display()}"]
    lines += [f"  note: {note}" for note in report.recovered + report.warnings]
    for table, facts in report.tables.items():
        lines.append(
            f"  {table:<10} {facts['rows']:>12,} rows"
            + (f"  ({facts['written']})" if facts["written"] != "whole table" else "")
        )
    for dataset, facts in report.inputs.items():
        lines.append(
            f"  {dataset}: {facts['files_read']:,} files read, {facts['files_skipped']:,} skipped, "
            f"{facts['records']:,} records"
        )
        quarantined = facts["quarantined"]
        detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(facts["rejects"].items()))
        where = f" -> {lake.display('_quarantine/' + dataset)} ({detail})" if quarantined else ""
        lines.append(f"  quarantined from {dataset}: {quarantined:,}{where}")
    passed = sum(check["passed"] for check in report.checks)
    lines.append(f"  quality checks passed: {passed} of {len(report.checks)}")
    for stage, seconds in report.stages.items():
        lines.append(f"  {stage:<18} {seconds:8.1f} s")
    lines.append(f"  {'total':<18} {sum(report.stages.values()):8.1f} s")
    lines.append(f"  run report: {lake.display(report.location)}")
    return "\n".join(lines)


# =============================================================================
# Failures: one paragraph, an exit status, and a report closed with the cause
# =============================================================================


class Terminated(BaseException):
    """SIGTERM, as from a scheduler stopping the job."""


EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143

# Causes worth naming, found anywhere in a Java or Python error's text.
KNOWN_CAUSES = (
    (r"No space left on device", "No space left on device"),
    (r"Disk quota exceeded", "The disk quota is exceeded"),
    (r"File name too long", "A file name is too long for the filesystem"),
    (r"Permission denied|AccessDeniedException|Access Denied", "Permission denied"),
    (r"Read-only file system", "The filesystem is read-only"),
    (
        r"OutOfMemoryError",
        "Spark ran out of memory (give the driver more: spark-submit --driver-memory, or "
        "PYSPARK_SUBMIT_ARGS='--driver-memory 4g pyspark-shell')",
    ),
    (rf"{READ_ERROR} ([^\n]*)", None),
)


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def root_cause(error: BaseException) -> str:
    """The innermost Java exception of a Spark error (its class and message), or the error's first line."""
    java = getattr(error, "java_exception", None)
    if java is None:
        return one_line(error)
    try:
        while java.getCause() is not None:
            java = java.getCause()
        return str(java.toString()).splitlines()[0]
    except Exception:  # noqa: BLE001 - the JVM may be gone
        return one_line(error)


def explain(error: BaseException, doing: str) -> str:
    """One paragraph for a Spark or Java failure while ``doing`` something."""
    text = f"{error}\n{root_cause(error)}"
    for pattern, cause in KNOWN_CAUSES:
        match = re.search(pattern, text)
        if match:
            if cause is None:
                return f"{READ_ERROR} {match.group(1).strip()}"
            return f"{cause} while {doing}."
    return f"Spark failed while {doing}: {root_cause(error)}"


@contextlib.contextmanager
def activity(doing: str) -> Iterator[None]:
    """Turn a Spark or Java failure inside the block into one paragraph naming ``doing``."""
    try:
        yield
    except (EtlError, KeyboardInterrupt, Terminated):
        raise
    except Exception as error:
        log.info("failed while %s", doing, exc_info=True)  # the whole trace, with --verbose
        raise EtlError(explain(error, doing)) from error


def on_sigterm(signum, frame) -> None:
    from pyspark import SparkContext

    context = SparkContext._active_spark_context
    if context is not None:
        with contextlib.suppress(Exception):
            context.cancelAllJobs()
    raise Terminated()


# =============================================================================
# CLI
# =============================================================================


def utc_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2018-11-15") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="etl.py",
        allow_abbrev=False,
        description="Build the Sparkify star schema (songplays, users, songs, artists, time) "
        "from song_data/ and log_data/ JSON.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help=f"INI settings file (default: ./{DEFAULT_CONFIG} when present)"
    )
    parser.add_argument(
        "--input",
        metavar="ROOT",
        help="folder or s3a:// URI holding song_data/ and log_data/ (default: the sample dataset in data/sample)",
    )
    parser.add_argument(
        "--output", metavar="ROOT", help=f"folder or s3a:// URI for the tables (default: ./{DEFAULT_OUTPUT})"
    )
    parser.add_argument("--format", choices=FORMATS, help="table format (default: parquet)")
    parser.add_argument(
        "--since",
        metavar="YYYY-MM-DD",
        type=utc_date,
        help="incremental load: only log events from this UTC day on; the songplays "
        "and time partitions the window touches are replaced, users merged",
    )
    parser.add_argument(
        "--until", metavar="YYYY-MM-DD", type=utc_date, help="incremental load: only log events before this UTC day"
    )
    parser.add_argument(
        "--max-reject-rate",
        metavar="FRACTION",
        help="share of a dataset's records that may be quarantined before the run "
        f"fails without publishing any table (default {DEFAULT_MAX_REJECT_RATE})",
    )
    parser.add_argument(
        "--catalog",
        metavar="DATABASE",
        help="after the load, register the tables in this database of the session's metastore",
    )
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="Delta tables: return all of them to the versions of the previous successful run",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="log every step and show Spark's output and full stack traces"
    )
    parser.add_argument(
        "--print-packages",
        action="store_true",
        help="print the spark-submit flags (--packages ...) for the jars a run needs, and exit",
    )
    parser.add_argument(
        "--print-ddl",
        choices=("athena",),
        help="print CREATE EXTERNAL TABLE statements for the tables at --output, and exit",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, spark: SparkSession | None = None) -> int:
    """Run etl.py with ``argv``; returns the exit status. ``spark``: a session to run in
    (left running) instead of one of its own."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        settings = resolve_settings(args, os.environ)
        if args.print_packages:
            print(shlex.join(spark_submit_options(settings)))
            return 0
        if args.print_ddl:
            print(athena_ddl(settings.output_root, settings.format), end="")
            return 0
        report, lake = execute(settings, args, spark)
        print(summary(report, lake))
        return 0
    except UsageError as error:
        print(f"etl.py: {error}", file=sys.stderr)
        return EXIT_USAGE
    except EtlError as error:
        print(f"etl.py: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            "etl.py: interrupted (Ctrl-C); nothing this run wrote was published (see its run report).", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    except Terminated:
        print("etl.py: stopped by SIGTERM; nothing this run wrote was published (see its run report).", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as error:  # anything unforeseen: one paragraph unless --verbose
        if args.verbose:
            raise
        where = f" Spark's log: {SPARK_LOG.name}." if SPARK_LOG is not None else ""
        print(
            f"etl.py: the run failed: {one_line(error)}. Run again with --verbose for the full trace.{where}",
            file=sys.stderr,
        )
        return EXIT_FAILED


def execute(
    settings: Settings, args: argparse.Namespace, given_session: SparkSession | None = None
) -> tuple[RunReport, Lake]:
    """One run: preflight, lock, repair, load (or roll back), report."""
    inventories = {}
    if not args.rollback:
        check_roots_apart(settings)
        inventories = inventory_input(settings)
    lake = open_lake(settings)
    lake.probe()
    report = RunReport.start(
        settings, "rollback" if args.rollback else "incremental" if settings.incremental() else "full"
    )
    spark: SparkSession | None = None

    def session() -> SparkSession:
        nonlocal spark, settings
        if spark is None:
            spark = given_session or build_spark_session(settings, args.verbose)
            settings = configure_storage(spark, settings, lake)
            if settings.format == "delta":
                configure_delta(spark, settings.retain_days)
        return spark

    with lake.lock(report.holder()):
        report.recovered = recover(lake, session if settings.format == "delta" else None)
        if settings.format == "delta" and not args.rollback:
            report.based_on = (current_state(lake) or {}).get("run_id")
        report.save(lake)
        try:
            run = Run(settings, session(), lake, report, inventories)
            run.settings = settings  # as configure_storage left them
            report.settings, report.spark_version = settings.redacted(), run.spark.version
            if args.rollback:
                report.timed("rollback", rollback, run.spark, lake, report)
            else:
                report.save_file_list(lake, inventories)
                run_load(run)
                if settings.format == "delta":
                    report.timed("vacuum", vacuum_delta, run.spark, lake, report)
            if settings.catalog:
                with activity(f"registering the tables in database {settings.catalog}"):
                    report.timed("catalog", register_tables, run.spark, lake, settings.catalog, settings.format)
            report.finish("succeeded")
        except EtlError as error:
            report.finish("failed", str(error))
            raise
        except KeyboardInterrupt:
            report.finish("interrupted", "interrupted (SIGINT, Ctrl-C)")
            raise
        except Terminated:
            report.finish("interrupted", "stopped by SIGTERM")
            raise
        except BaseException as error:
            report.finish("failed", one_line(error))
            raise
        finally:
            if lake.renames:
                lake.discard_staging(report.run_id)
            report.save(lake)
            if spark is not None and given_session is None:
                with contextlib.suppress(Exception):
                    spark.stop()
    if SPARK_LOG is not None:
        with contextlib.suppress(OSError):
            os.unlink(SPARK_LOG.name)
    return report, lake


if __name__ == "__main__":
    sys.exit(main())
