"""Classification: why a parsed record cannot be used, or that it can."""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from .tables import CORRUPT_RECORD, LOG_SCHEMA, QUARANTINE_COLUMNS, SONG_SCHEMA

# What a Spark timestamp holds: 0001-01-01 to 9999-12-31 (UTC), in epoch milliseconds.
MIN_TS_MS, MAX_TS_MS = -62_135_596_800_000, 253_402_300_799_999
# The longest file or folder name most filesystems accept, in bytes.
MAX_NAME_BYTES = 255


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
        "reject_reason", "record", "first", "is_record", "unreadable"
    )
