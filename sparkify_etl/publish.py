"""Publishing parquet: how a run's checked tables replace the lake's, as named steps.

The rule every protocol keeps (docs/DESIGN.md): the journal records the intent before the
first live folder or object changes; old data is removed only after its replacement is in
place; once the journal exists, every path (the run's own abort, the next run's recovery)
rolls forward to the complete new set; recovery never deletes a live table.

Local roots (``LocalRenames``), the steps of ``publish``:
  stage          every folder written by Spark under ``_staging/<run>/`` (the lake is untouched)
  journal        the swaps written to ``_journal.json``
  aside <path>   a live folder moved to ``_staging/<run>/_previous/`` (only once its
                 replacement is staged)
  in <path>      the staged folder renamed into its place
  retire <path>  a live folder no row is left for, moved aside
  commit         the journal removed: the new set is the lake's
  clean          the run's staging folder, now holding only the previous folders, deleted

S3 through the staging committer (``S3Commits``): no rename exists, so each table is
replaced in place when its Spark job commits. The journal names every table before the
first job; each commit is added to it; ``commit`` removes it. A reader sees each table
previous or new, never absent.

Every step is announced to ``on_step`` before it runs, so the tests can stop a run at any
of them; ``on_step`` is a no-op in real runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

from pyspark.sql import DataFrame

from .errors import JournalError
from .journal import JOURNAL, STAGING, Journal, Protocol, Swap, read_journal, staging_folder, write_journal
from .report import utc_now
from .storage import Lake, LocalLake
from .tables import QUARANTINE_COLUMNS, TableSpec
from .writing import SparkOutput, Write, arranged_for_writing, partition_counts, partition_folder, partition_rows

StepHook = Callable[[str], None]


def no_fault(step: str) -> None:
    """The ``on_step`` of real runs."""


class ParquetPublisher:
    """Writes a run's tables as parquet, then publishes them together."""

    protocol: Protocol

    def __init__(self, lake: Lake, output: SparkOutput, run_id: str, on_step: StepHook = no_fault):
        self.lake, self.output, self.run_id, self.on_step = lake, output, run_id, on_step
        self.published: list[str] = []  # tables of this run that readers see now
        self._journal_lock = threading.Lock()

    def write(self, write: Write, rows: int) -> dict[str, object]:
        """Write one table (or the partitions a window touched) without publishing it yet."""
        spec = write.spec
        if write.partitions is None:
            self._replace(write.frame, spec, spec.name, rows)
            facts: dict[str, object] = {"written": "whole table"}
        else:
            counts = partition_counts(write.frame, spec, write.partitions)
            for partition, count in counts.items():
                folder = f"{spec.name}/{partition_folder(spec, partition)}"
                if count:
                    rows_of_month = partition_rows(write.frame, spec, partition)
                    self._replace(rows_of_month, replace(spec, partition_by=()), folder, count, partition=True)
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
        self._written(spec.name)
        return facts

    def _save(self, frame: DataFrame, spec: TableSpec, relative: str, rows: int, partition: bool) -> None:
        if spec.partition_by and rows:
            writer = arranged_for_writing(frame, spec).write.partitionBy(*spec.partition_by)
        else:
            # One file: an empty table keeps its schema that way, readable like any other.
            writer = frame.repartition(1).sortWithinPartitions(*spec.sort_by).write
        writer = writer.options(**dict(spec.writer_options))
        if partition:  # the table's own _SUCCESS stays the only one
            writer = writer.option("mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        self.output.save(writer, relative, "parquet", self.lake.display(relative))

    def _replace(self, frame: DataFrame, spec: TableSpec, relative: str, rows: int, partition: bool = False) -> None:
        raise NotImplementedError

    def _retire(self, relative: str) -> None:
        raise NotImplementedError

    def _written(self, table: str) -> None:
        """Called once a table's writes are done."""

    def publish(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """After a failure: leave the lake as it was, or finish what the journal promised."""
        raise NotImplementedError


class LocalRenames(ParquetPublisher):
    """Local roots: every folder staged, then all swapped in by journaled renames."""

    protocol = Protocol.LOCAL_RENAMES
    lake: LocalLake

    def __init__(self, lake: LocalLake, output: SparkOutput, run_id: str, on_step: StepHook = no_fault):
        super().__init__(lake, output, run_id, on_step)
        self.staging = staging_folder(run_id)
        self.swaps: list[Swap] = []
        self.journaled = False

    def _previous(self, relative: str) -> str:
        return f"{self.staging}/_previous/{relative}"

    def _replace(self, frame: DataFrame, spec: TableSpec, relative: str, rows: int, partition: bool = False) -> None:
        staged = f"{self.staging}/{relative}"
        self._save(frame, spec, staged, rows, partition)
        with self._journal_lock:
            self.swaps.append(Swap(relative, staged, self._previous(relative)))

    def _retire(self, relative: str) -> None:
        if self.lake.exists(relative):
            with self._journal_lock:
                self.swaps.append(Swap(relative, None, self._previous(relative)))

    def retire(self, relative: str) -> None:
        """Have ``relative`` removed by the publish (moved aside with the replaced folders)."""
        self._retire(relative)

    def stage(self, relative: str) -> str:
        """Where a folder that replaces ``relative`` is to be written (by the caller)."""
        staged = f"{self.staging}/{relative}"
        self.swaps.append(Swap(relative, staged, self._previous(relative)))
        return staged

    def publish(self) -> None:
        self.on_step("journal")
        journal = Journal(self.run_id, self.protocol, tuple(self.swaps))
        write_journal(self.lake, journal)
        self.journaled = True
        complete_swaps(self.lake, journal, self.on_step)
        self.published = sorted({swap.live.split("/")[0] for swap in self.swaps})

    def abort(self) -> None:
        if self.journaled:  # every table was written and checked: finish the publish
            journal = read_journal(self.lake)
            if journal is not None and journal.run_id == self.run_id:
                complete_swaps(self.lake, journal, self.on_step)
            self.published = sorted({swap.live.split("/")[0] for swap in self.swaps})
            return
        self.on_step("discard")
        discard_staging(self.lake, self.run_id)


def complete_swaps(lake: LocalLake, journal: Journal, on_step: StepHook = no_fault) -> list[str]:
    """Roll a journaled swap set forward to its end; safe to run again after it was cut
    off at any step. Returns the live folders it could not give their new version (their
    staged copy is gone): those keep, or get back, their previous version."""
    kept = [live for swap in journal.swaps if (live := _swap(lake, swap, on_step))]
    on_step("commit")
    lake.remove(JOURNAL)
    # Only now is the old data deleted: what the swaps moved aside, in the run's staging.
    on_step("clean")
    lake.remove(journal.staging)
    _remove_if_empty(lake, STAGING)
    return kept


def _swap(lake: LocalLake, swap: Swap, on_step: StepHook) -> str | None:
    """One swap, done only as far as it is not yet; returns ``swap.live`` when its new
    version is lost and the previous one was kept."""
    if swap.staged is None:
        if lake.exists(swap.live):
            _refuse_if_taken(lake, swap.previous, swap)
            on_step(f"retire {swap.live}")
            lake.rename(swap.live, swap.previous)
        return None
    if lake.exists(swap.staged):
        if lake.exists(swap.live):
            _refuse_if_taken(lake, swap.previous, swap)
            on_step(f"aside {swap.live}")
            lake.rename(swap.live, swap.previous)
        on_step(f"in {swap.live}")
        lake.rename(swap.staged, swap.live)
        return None
    if lake.exists(swap.live):
        return None  # swapped in already
    # Neither the staged copy nor the live folder: someone removed the staging folder
    # mid-publish. The previous version is better than none.
    if lake.exists(swap.previous):
        on_step(f"restore {swap.live}")
        lake.rename(swap.previous, swap.live)
    return swap.live


def _refuse_if_taken(lake: LocalLake, previous: str, swap: Swap) -> None:
    if lake.exists(previous):
        raise JournalError(
            f"{lake.display(swap.live)} and its moved-aside copy {lake.display(previous)} both exist, so the "
            "journaled publish cannot continue without deleting one. Compare them, keep the right one in place, "
            f"and remove {lake.display(JOURNAL)}."
        )


def _remove_if_empty(lake: LocalLake, relative: str) -> None:
    try:
        lake.path(relative).rmdir()
    except OSError:
        return  # not empty (another run's staging), or already gone


def discard_unpublished(lake: Lake, run_id: str) -> None:
    """At the end of a run: remove what it staged, unless a journal still needs it."""
    if not isinstance(lake, LocalLake):
        return  # S3 runs stage nothing
    journal = read_journal(lake)
    if journal is None or journal.run_id != run_id:
        discard_staging(lake, run_id)


def discard_staging(lake: Lake, run_id: str) -> None:
    """Remove what a run staged and never published; the live tables are not touched."""
    lake.remove(staging_folder(run_id))
    if isinstance(lake, LocalLake):
        _remove_if_empty(lake, STAGING)


class S3Commits(ParquetPublisher):
    """S3: each table replaced in place when its job commits, every commit journaled."""

    protocol = Protocol.S3_COMMITS

    def __init__(self, lake: Lake, output: SparkOutput, run_id: str, tables: tuple[str, ...], on_step=no_fault):
        super().__init__(lake, output, run_id, on_step)
        self.tables = tables
        self.on_step("journal")
        write_journal(lake, Journal(run_id, self.protocol, tables=tables))

    def _replace(self, frame: DataFrame, spec: TableSpec, relative: str, rows: int, partition: bool = False) -> None:
        self.on_step(f"commit {relative}")
        self._save(frame, spec, relative, rows, partition)

    def _retire(self, relative: str) -> None:
        self.on_step(f"retire {relative}")
        self.lake.remove(relative)

    def _written(self, table: str) -> None:
        with self._journal_lock:
            self.published.append(table)
            self.on_step(f"journal {table}")
            write_journal(
                self.lake, Journal(self.run_id, self.protocol, tables=self.tables, committed=tuple(self.published))
            )

    def publish(self) -> None:
        self.on_step("commit")
        self.lake.remove(JOURNAL)

    def abort(self) -> None:
        if not self.published:
            self.on_step("discard")
            self.lake.remove(JOURNAL)  # nothing was replaced: the lake is as it was
        # Otherwise the journal stays: the next run names the tables this one replaced.


def publish_quarantine(lake: Lake, output: SparkOutput, run_id: str, rejected: DataFrame, dataset: str) -> None:
    """Replace ``_quarantine/<dataset>/`` with this run's rejected records, as JSON lines,
    published on its own (before the quality gate, so a run it stops can point at them)."""
    final = f"_quarantine/{dataset}"
    writer = rejected.repartition(1).sortWithinPartitions(*QUARANTINE_COLUMNS).write
    if not isinstance(lake, LocalLake):
        output.save(writer, final, "json", lake.display(final))
        return
    publisher = LocalRenames(lake, output, run_id)
    output.save(writer, publisher.stage(final), "json", lake.display(final))
    publisher.publish()


def recover_parquet(lake: Lake, journal: Journal, on_step: StepHook = no_fault) -> str:
    """Finish what a parquet run's journal promised; returns what was done, for the report."""
    if journal.protocol is Protocol.LOCAL_RENAMES:
        if not isinstance(lake, LocalLake):
            raise JournalError(f"{lake.display(JOURNAL)} describes renames, which an S3 output cannot do.")
        kept = complete_swaps(lake, journal, on_step)
        note = f"completed the publish of run {journal.run_id}, which was interrupted"
        if kept:
            note += f"; {', '.join(kept)} kept their previous version, as their new one had been removed"
        return note
    on_step("commit")
    lake.remove(JOURNAL)
    return (
        f"run {journal.run_id} stopped while replacing tables on S3 after committing "
        f"{', '.join(journal.committed) or 'none'} of them; this run replaces them"
    )


def recover(lake: Lake, restore: Callable[[Journal], str] | None = None, on_step: StepHook = no_fault) -> list[str]:
    """Repair what an interrupted run left, before this one changes anything; returns what
    was done. ``restore`` finishes a Delta journal (it needs Spark); without it a Delta
    journal is refused with what to do.

    - A journaled publish is rolled forward (its tables were all written and checked).
    - Staging folders no journal names are removed: they hold what a run staged and never
      published, or what a completed publish moved aside. Never a live table.
    - Reports still saying "running" are closed as died.
    """
    notes = []
    journal = read_journal(lake)
    if journal is not None:
        if journal.protocol is Protocol.DELTA:
            if restore is None:
                raise JournalError(
                    f"{lake.display(JOURNAL)} says Delta run {journal.run_id} stopped between table "
                    "commits: rerun with --format delta so its tables can be restored first."
                )
            notes.append(restore(journal))
        else:
            notes.append(recover_parquet(lake, journal, on_step))
    for leftover in lake.names(STAGING):
        on_step(f"discard {leftover}")
        discard_staging(lake, leftover)
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
