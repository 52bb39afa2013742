"""Extract: the listed files fetched by the tasks, split into lines, parsed and counted."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from .errors import InputReadError
from .fetch import FILE_COLUMNS, fetch_files
from .inputs import InputFile, Inventory
from .records import accepted_records, quarantine_records
from .s3 import S3Access
from .tables import CORRUPT_RECORD, DATASETS, UNUSED_FIELDS

log = logging.getLogger("sparkify.etl")


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


def read_lines(spark: SparkSession, files: Sequence[InputFile], access: S3Access | None) -> DataFrame:
    """Every line of every file, with the file it came from.

    Columns: ``source_file``; ``line`` (null for a file that could not be decoded, then
    ``error`` says why, or read, then ``unreadable`` does); ``first``, true on each file's
    first row, kept even when blank so that files can be counted; ``is_record``, false on
    such a blank first row.
    """
    tasks = spark.sparkContext.defaultParallelism * 2
    batches = [[(file.path, file.codec) for file in batch] for batch in balanced_batches(files, tasks)]
    fetched = spark.sparkContext.parallelize(batches, len(batches)).flatMap(lambda batch: fetch_files(batch, access))
    contents = spark.createDataFrame(fetched, FILE_COLUMNS)
    lines = contents.select(
        "source_file",
        "error",
        "unreadable",
        F.posexplode_outer(F.split(F.col("data").cast("string"), r"\r?\n")).alias("position", "line"),
    )
    first = F.coalesce(F.col("position"), F.lit(0)) == 0
    is_record = F.col("error").isNotNull() | F.col("line").rlike(r"\S")
    return lines.select(
        "source_file", "error", "unreadable", "line", first.alias("first"), is_record.alias("is_record")
    ).where(F.col("first") | F.col("is_record"))


def parse_records(lines: DataFrame, schema: T.StructType) -> DataFrame:
    """Each line parsed with ``schema``; a line that is not JSON of that shape keeps its
    text in ``_corrupt_record`` (the fields that did parse are kept)."""
    with_corrupt = T.StructType([*schema.fields, T.StructField(CORRUPT_RECORD, T.StringType())])
    parsed = F.from_json("line", with_corrupt, {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_RECORD})
    return lines.withColumn("parsed", parsed).select(*lines.columns, "parsed.*")


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
    # One pass fills the cache, counts the outcome of every record and every file, and
    # finds the first file (by path) that could not be read.
    unreadable = F.when(F.col("unreadable").isNotNull(), F.struct("source_file", "unreadable"))
    outcome = (
        classified.groupBy("reject_reason")
        .agg(
            F.count(F.when(F.col("is_record"), 1)).alias("records"),
            F.count(F.when(F.col("first"), 1)).alias("files"),
            F.min(unreadable).alias("unreadable"),
        )
        .collect()
    )
    failed = min((row["unreadable"] for row in outcome if row["unreadable"] is not None), default=None)
    if failed is not None:
        classified.unpersist()
        raise InputReadError(failed["source_file"], failed["unreadable"])
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
