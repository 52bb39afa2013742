"""How a table's rows are laid out and written by Spark, and read back from the lake."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from .errors import activity
from .tables import USER_STATE, TableSpec


class Committer(Enum):
    """How Spark's writes reach the output root, which decides how a folder is replaced."""

    LOCAL = "local"  # local folders: written aside by Spark, then swapped in by renames
    S3A_STAGING = "directory"  # S3A staging committer: a folder's old files go when its job commits
    S3A_MAGIC = "magic"  # S3A magic committer: Spark's overwrite deletes the old files first
    EMRFS = "emrfs"  # s3:// on EMR: EMR's own committer, Spark's overwrite as above


@dataclass(frozen=True)
class SparkOutput:
    """The output root as Spark writes to it, decided once the session is up."""

    root: str  # file:///..., s3a://bucket/prefix or s3://bucket/prefix (EMRFS)
    committer: Committer

    def settings(self) -> dict[str, str]:
        """What the run report adds to the settings: the root as S3A writes it, and its committer."""
        if self.committer in (Committer.S3A_STAGING, Committer.S3A_MAGIC):
            return {"output_root": self.root, "s3a_committer": self.committer.value}
        return {}

    def uri(self, relative: str = "") -> str:
        return "/".join(part for part in (self.root, relative) if part)

    def save(self, writer, relative: str, data_format: str, shown_as: str) -> None:
        """Write a folder of ``data_format`` files with ``writer``.

        Local folders are written whole (into a staging folder, see publish.LocalRenames).
        On S3 the new files are appended beside the old ones, whatever the committer: none
        deletes anything before the job, and publish.S3Commits deletes the old files once
        the new ones are committed.
        """
        mode = "overwrite" if self.committer is Committer.LOCAL else "append"
        with activity(f"writing {shown_as}"):
            writer.mode(mode).format(data_format).save(self.uri(relative))


def local_output(root: str) -> SparkOutput:
    # Hadoop takes "file:" + a raw path as it is: spaces and any other character stay.
    return SparkOutput("file://" + root, Committer.LOCAL)


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


def partition_counts(frame: DataFrame, spec: TableSpec, partitions: Sequence[tuple[int, int]]) -> dict[tuple, int]:
    counts = {tuple(row[:-1]): row[-1] for row in frame.groupBy(*spec.partition_by).count().collect()}
    return {partition: counts.get(partition, 0) for partition in partitions}


def committed_table(
    spark: SparkSession,
    output: SparkOutput,
    spec: TableSpec,
    table_format: str,
    shown_as: str,
    partitions: Column | None = None,
) -> DataFrame:
    """A table the lake holds; only the partitions that ``partitions`` selects when given.
    The rows are read once here, so the table can be written over afterwards."""
    uri = output.uri(spec.name)
    with activity(f"reading {shown_as}"):
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
