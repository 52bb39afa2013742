"""The star schema and the input schemas: every table's columns, types and layout."""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import types as T

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


def spec_of(name: str) -> TableSpec:
    return next(spec for spec in (*STAR_SCHEMA, USER_STATE) if spec.name == name)
