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

S3, whatever the committer (``S3Commits``): no rename exists, so each folder's new files are
added beside the old ones, and the old ones deleted once the commit is journaled; a folder
cut off before that is rolled back, after it rolled forward. A reader sees each table
previous or new, never absent (both, for the seconds between a commit and its clean-up).

Delta has its own publisher (delta.DeltaPublisher), with the same journal and step hook.

Every step is announced to ``on_step`` before it runs, so the tests can stop a run at any
of them; ``on_step`` is a no-op in real runs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace

from pyspark.sql import DataFrame

from .errors import JournalError
from .journal import (
    JOURNAL,
    STAGING,
    Journal,
    Protocol,
    Replacement,
    Swap,
    read_journal,
    staging_folder,
    write_journal,
)
from .report import utc_now
from .storage import Lake, LocalLake, S3Lake
from .tables import QUARANTINE_COLUMNS, TableSpec
from .writing import SparkOutput, Write, arranged_for_writing, partition_counts, partition_folder, partition_rows

StepHook = Callable[[str], None]


class Stopped(Exception):
    """A table writer reached a step after its publisher was stopped."""


class Writers:
    """What publishers share: the step hook, and a stop that no later step gets past.

    Tables are written side by side in threads. When one fails (or Ctrl-C lands), the
    publisher is stopped first and every writer waited for; only then does the abort
    touch the lake, so it never races a writer still committing.
    """

    def __init__(self, on_step: StepHook):
        self.on_step = on_step
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def _step(self, step: str) -> None:
        if self._stopped.is_set():
            raise Stopped(f"stopped before {step}")
        self.on_step(step)


def no_fault(step: str) -> None:
    """The ``on_step`` of real runs."""


class ParquetPublisher(Writers):
    """Writes a run's tables as parquet, then publishes them together."""

    protocol: Protocol

    def __init__(self, lake: Lake, output: SparkOutput, run_id: str, on_step: StepHook = no_fault):
        super().__init__(on_step)
        self.lake, self.output, self.run_id = lake, output, run_id
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
    """S3, whatever the committer: new files added beside the old, the old deleted after.

    Per folder (a table, or one month of it): ``journal`` (its old objects listed into a
    manifest under ``_staging/<run>/``, the folder named in the journal), ``commit`` (Spark
    appends the new files; the committer makes them visible when the job commits),
    ``journal … committed``, ``clean`` (the old objects and the manifest deleted). Nothing is ever
    deleted before its replacement is committed. A folder cut off before its commit was
    journaled is rolled back (this run's new files deleted), one after it rolled forward
    (the old ones deleted), by the run's own abort or by the next run. Between a folder's
    commit and its ``clean``, a reader listing it sees the old and the new files.
    """

    protocol = Protocol.S3_COMMITS
    lake: S3Lake

    def __init__(self, lake: S3Lake, output: SparkOutput, run_id: str, tables: tuple[str, ...], on_step=no_fault):
        super().__init__(lake, output, run_id, on_step)
        self.tables = tables
        self.replacing: dict[str, Replacement] = {}  # folders whose old objects are not deleted yet
        self.on_step("journal")
        self._journal()

    def _journal(self) -> None:
        journal = Journal(
            self.run_id,
            self.protocol,
            tables=self.tables,
            committed=tuple(self.published),
            replacing=tuple(self.replacing.values()),
        )
        write_journal(self.lake, journal)

    def replace_folder(self, relative: str, save: Callable[[str], None] | None) -> None:
        """Replace the folder ``relative`` with what ``save(relative)`` writes (nothing, for None)."""
        old = [key for key in self.lake.keys_under(relative) if not _written_by_every_job(key)]
        manifest = f"{staging_folder(self.run_id)}/{relative}.old.json"
        self._step(f"journal {relative}")
        self.lake.write_json(manifest, old)
        with self._journal_lock:
            self.replacing[relative] = Replacement(relative, manifest, committed=save is None)
            self._journal()
        if save is not None:
            self._step(f"commit {relative}")
            save(relative)
            with self._journal_lock:
                self.replacing[relative] = Replacement(relative, manifest, committed=True)
                self._step(f"journal {relative} committed")
                self._journal()
        self._step(f"clean {relative}")
        _roll_forward(self.lake, self.replacing[relative], old)
        with self._journal_lock:
            del self.replacing[relative]

    def _replace(self, frame: DataFrame, spec: TableSpec, relative: str, rows: int, partition: bool = False) -> None:
        self.replace_folder(relative, lambda folder: self._save(frame, spec, folder, rows, partition))

    def _retire(self, relative: str) -> None:
        self.replace_folder(relative, None)

    def _written(self, table: str) -> None:
        with self._journal_lock:
            self.published.append(table)

    def publish(self) -> None:
        self.on_step("commit")
        self.lake.remove(JOURNAL)  # each folder's manifest went with its old objects

    def abort(self) -> None:
        journal = read_journal(self.lake)
        if journal is not None and journal.run_id == self.run_id:
            finish_replacements(self.lake, journal, self.on_step)
            self.published = sorted(
                set(self.published) | {r.folder.split("/")[0] for r in journal.replacing if r.committed}
            )


def _written_by_every_job(key: str) -> bool:
    """Objects each job writes under the same name: not old data, never deleted as such."""
    return key.rsplit("/", 1)[-1] == "_SUCCESS"


def _manifest(lake: S3Lake, replacement: Replacement) -> list[str] | None:
    """The folder's old objects; None once its roll forward or back finished (the manifest
    is the last thing either deletes), so a finished folder is never touched again."""
    text = lake.read_text(replacement.manifest)
    return None if text is None else json.loads(text)


def _roll_forward(lake: S3Lake, replacement: Replacement, old: list[str] | None = None) -> None:
    old = old if old is not None else _manifest(lake, replacement)
    if old is not None:
        lake.delete_keys([*old, replacement.manifest])


def _roll_back(lake: S3Lake, replacement: Replacement) -> None:
    listed = _manifest(lake, replacement)
    if listed is None:
        return
    old = set(listed)
    lake.abort_uploads(replacement.folder)
    new = [key for key in lake.keys_under(replacement.folder) if key not in old and not _written_by_every_job(key)]
    lake.delete_keys([*new, replacement.manifest])


def finish_replacements(lake: S3Lake, journal: Journal, on_step: StepHook = no_fault) -> list[str]:
    """Every folder a journal names, made whole: rolled forward where its commit was
    journaled, back where it was not. Returns the folders rolled back."""
    rolled_back = []
    for replacement in journal.replacing:
        if replacement.committed:
            on_step(f"clean {replacement.folder}")
            _roll_forward(lake, replacement)
        else:
            on_step(f"undo {replacement.folder}")
            _roll_back(lake, replacement)
            rolled_back.append(replacement.folder)
    on_step("commit")
    lake.remove(JOURNAL)
    lake.remove(journal.staging)
    return rolled_back


def publish_quarantine(
    lake: Lake, output: SparkOutput, run_id: str, rejected: DataFrame, dataset: str, on_step: StepHook = no_fault
) -> None:
    """Replace ``_quarantine/<dataset>/`` with this run's rejected records, as JSON lines,
    published on its own (before the quality gate, so a run it stops can point at them)."""
    final = f"_quarantine/{dataset}"
    writer = rejected.repartition(1).sortWithinPartitions(*QUARANTINE_COLUMNS).write
    if isinstance(lake, S3Lake):
        publisher = S3Commits(lake, output, run_id, (final,), on_step)
        publisher.replace_folder(final, lambda folder: output.save(writer, folder, "json", lake.display(folder)))
        publisher.publish()
        return
    publisher = LocalRenames(lake, output, run_id, on_step)
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
    done = [*journal.committed, *(r.folder.split("/")[0] for r in journal.replacing if r.committed)]
    committed = list(dict.fromkeys(done))
    rolled_back = finish_replacements(lake, journal, on_step) if isinstance(lake, S3Lake) else None
    if rolled_back is None:
        on_step("commit")
        lake.remove(JOURNAL)
    note = (
        f"run {journal.run_id} stopped while replacing tables on S3 after committing "
        f"{', '.join(committed) or 'none'} of them; this run replaces them"
    )
    if rolled_back:
        note += f" (its uncommitted files in {', '.join(rolled_back)} were removed)"
    return note


def recover(
    lake: Lake, restore: Callable[[Journal, StepHook], str] | None = None, on_step: StepHook = no_fault
) -> list[str]:
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
            notes.append(restore(journal, on_step))
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
