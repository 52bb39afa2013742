"""Delta Lake output: one commit per table, history, rollback, VACUUM."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from pyspark.sql import SparkSession

from .errors import EtlError, activity
from .journal import JOURNAL, Journal, Protocol, write_journal
from .publish import StepHook, Writers, no_fault
from .report import RunReport, utc_now
from .storage import Lake
from .tables import STAR_SCHEMA, USER_STATE
from .writing import SparkOutput, Write, arranged_for_writing, partition_folder

DELTA_TABLES = (*STAR_SCHEMA, USER_STATE)


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


def delta_path(output: SparkOutput, name: str) -> str:
    return "delta.`" + output.uri(name).replace("`", "``") + "`"


def delta_version(lake: Lake, name: str) -> int | None:
    """The table's latest version (its newest commit file in _delta_log), or None when
    there is no Delta table there."""
    commits = [int(entry[:-5]) for entry in lake.names(f"{name}/_delta_log") if re.fullmatch(r"\d{20}\.json", entry)]
    return max(commits) if commits else None


def restore_delta(
    spark: SparkSession,
    lake: Lake,
    output: SparkOutput,
    versions: Mapping[str, int | None],
    on_step: StepHook = no_fault,
) -> list[str]:
    """Tables back to ``versions`` (None: the table did not exist, so it is removed).
    Returns the names of the tables that changed."""
    changed = []
    for name, version in versions.items():
        current = delta_version(lake, name)
        if current == version:
            continue
        on_step(f"restore {name}")
        with activity(f"restoring {lake.display(name)} to version {version}"):
            if version is None:
                lake.remove(name)
            else:
                spark.sql(f"RESTORE TABLE {delta_path(output, name)} TO VERSION AS OF {version}")
        changed.append(name)
    return changed


class DeltaPublisher(Writers):
    """Writes each table as one Delta commit tagged with the run id.

    The steps: ``journal`` (the versions before the run), ``commit <table>`` for each table,
    then ``done`` (the journal removed). A run that fails after some commits restores the
    journaled versions (``restore``), and one that was killed is restored by the next run,
    so readers end with one consistent set.
    """

    def __init__(
        self,
        spark: SparkSession,
        lake: Lake,
        output: SparkOutput,
        report: RunReport,
        retain_days: int,
        on_step: StepHook = no_fault,
    ):
        super().__init__(on_step)
        self.spark, self.lake, self.output, self.report = spark, lake, output, report
        self.published: list[str] = []
        keep_retention(spark, lake, output, retain_days)
        self.before = {spec.name: delta_version(lake, spec.name) for spec in DELTA_TABLES}
        self.on_step("journal")
        write_journal(lake, Journal(report.run_id, Protocol.DELTA, versions_before=self.before))

    def write(self, write: Write, rows: int) -> dict[str, object]:
        spec = write.spec
        frame, facts = write.frame, {"written": "whole table"}
        if write.partitions is not None:
            # Only the months replaced: a row outside them would break the commit's condition.
            months = " OR ".join(f"(year = {year} AND month = {month})" for year, month in write.partitions)
            frame = frame.where(months or "false")
            facts = {
                "written": f"{len(write.partitions)} partition{'' if len(write.partitions) == 1 else 's'}",
                "partitions": [partition_folder(spec, partition) for partition in write.partitions],
            }
        writer = (
            arranged_for_writing(frame, spec)
            .write.format("delta")
            .option("userMetadata", f"sparkify-etl run {self.report.run_id}")
        )
        if spec.partition_by:
            writer = writer.partitionBy(*spec.partition_by)
        if write.partitions is not None:
            writer = writer.option("replaceWhere", months or "false")
        else:
            writer = writer.option("overwriteSchema", "true")
        self._step(f"commit {spec.name}")
        with activity(f"writing {self.lake.display(spec.name)}"):
            writer.mode("overwrite").save(self.output.uri(spec.name))
        self.published.append(spec.name)
        facts["version"] = delta_version(self.lake, spec.name)
        return facts

    def publish(self) -> None:
        self.report.versions = {spec.name: delta_version(self.lake, spec.name) for spec in DELTA_TABLES}
        self.on_step("done")
        self.lake.remove(JOURNAL)

    def abort(self) -> None:
        restored = restore_delta(self.spark, self.lake, self.output, self.before, self.on_step)
        if restored:
            self.report.warnings.append(f"restored {', '.join(restored)} to their versions before this run")
        self.published = []
        self.on_step("done")
        self.lake.remove(JOURNAL)


def delta_recovery(spark: SparkSession, lake: Lake, output: SparkOutput) -> Callable[[Journal], str]:
    """What ``publish.recover`` calls for a Delta journal: the versions before it, restored."""

    def restore(journal: Journal, on_step: StepHook = no_fault) -> str:
        restored = restore_delta(spark, lake, output, journal.versions_before, on_step)
        on_step("done")
        lake.remove(JOURNAL)
        return (
            f"run {journal.run_id} stopped between its table commits; restored "
            f"{', '.join(restored) or 'nothing'} to the versions before it"
        )

    return restore


def keep_retention(spark: SparkSession, lake: Lake, output: SparkOutput, retain_days: int) -> None:
    """Give the tables the retention of ``retain_days`` when the last run made them with another."""
    last = current_state(lake)
    if last is None or last["settings"].get("retain_days") == retain_days:
        return
    settings = ", ".join(f"'{key}' = '{value}'" for key, value in retention_properties(retain_days).items())
    for spec in DELTA_TABLES:
        if delta_version(lake, spec.name) is not None:
            spark.sql(f"ALTER TABLE {delta_path(output, spec.name)} SET TBLPROPERTIES ({settings})")


VACUUM_EVERY_HOURS = 24


def vacuum_delta(spark: SparkSession, lake: Lake, output: SparkOutput, report: RunReport) -> None:
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
                spark.sql(f"VACUUM {delta_path(output, name)} LITE").collect()
            except Exception as error:  # ... unless the log no longer reaches back far enough
                if _error_condition(error) != "DELTA_CANNOT_VACUUM_LITE":
                    raise
                spark.sql(f"VACUUM {delta_path(output, name)}").collect()

    with ThreadPoolExecutor(max_workers=len(DELTA_TABLES)) as pool:
        for done in [pool.submit(vacuum, spec.name) for spec in DELTA_TABLES]:
            done.result()
    report.vacuumed_at = utc_now()


def _error_condition(error: Exception) -> str | None:
    """Spark's error class of a failed statement (``getCondition`` from Spark 4, ``getErrorClass`` before)."""
    for method in ("getCondition", "getErrorClass"):
        if callable(getattr(error, method, None)):
            return getattr(error, method)()
    return None


def current_state(lake: Lake) -> dict | None:
    """The report of the run whose table versions the lake holds: the last successful
    load, or the run the last rollback returned to."""
    # A run whose tables were all published counts, even if a later step (VACUUM, the catalog) failed.
    succeeded = {
        r["run_id"]: r
        for r in lake.reports()
        if r.get("versions") and (r.get("status") == "succeeded" or r.get("published_at"))
    }
    if not succeeded:
        return None
    last = list(succeeded.values())[-1]
    return succeeded.get(last["rolled_back_to"]) if last.get("mode") == "rollback" else last


def rollback(
    spark: SparkSession, lake: Lake, output: SparkOutput, report: RunReport, on_step: StepHook = no_fault
) -> str:
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
    # Journaled like a load: a rollback cut off half way is undone, by itself or the next run.
    before = {spec.name: delta_version(lake, spec.name) for spec in DELTA_TABLES}
    on_step("journal")
    write_journal(lake, Journal(report.run_id, Protocol.DELTA, versions_before=before))
    try:
        restore_delta(spark, lake, output, earlier["versions"], on_step)
    except BaseException as error:
        restore_delta(spark, lake, output, before, on_step)
        on_step("done")
        lake.remove(JOURNAL)
        if isinstance(error, EtlError):
            raise EtlError(
                f"{error} Versions older than the retention period ([ETL] RETAIN_DAYS) are cleaned up "
                "and cannot be restored. The tables are back at the versions they had before the rollback."
            ) from None
        raise
    on_step("done")
    lake.remove(JOURNAL)
    report.published_at = utc_now()
    report.versions = {spec.name: delta_version(lake, spec.name) for spec in DELTA_TABLES}
    report.rolled_back_to = earlier["run_id"]
    return earlier["run_id"]
