"""Sparkify data lake ETL: song and event JSON in, a star schema out.

Usage:
    python etl.py [--input ROOT] [--output ROOT] [--format parquet|delta] [--config FILE]
                  [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--max-reject-rate FRACTION]
                  [--catalog DATABASE] [--verbose]
    python etl.py --output ROOT --rollback        (Delta tables: back to the previous run's versions)
    python etl.py --print-packages [--format delta]
    python etl.py --print-ddl athena [--output ROOT] [--format delta]
    python etl.py --package-zip FILE               (the package, for spark-submit --py-files)
    spark-submit [--master ...] [--packages ...] etl.py [the same flags]

Reads ROOT/song_data/ and ROOT/log_data/, builds songplays (fact), users, songs, artists
and time, checks them, and publishes them under OUTPUT/<table>/. Records that cannot be
used are kept with their file and the reason under OUTPUT/_quarantine/, and every run
leaves a report under OUTPUT/_runs/. This file is the job, read top-down; the machinery
behind it is the sparkify_etl package beside it (docs/DESIGN.md has the map).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession

from sparkify_etl.catalog import athena_ddl, register_tables
from sparkify_etl.checks import distinct_event_count, enforce_quality_gate, enforce_reject_limit, quality_gate
from sparkify_etl.cli import on_sigterm, parse_args
from sparkify_etl.delta import DeltaPublisher, configure_delta, current_state, delta_recovery, rollback, vacuum_delta
from sparkify_etl.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    EtlError,
    Terminated,
    UsageError,
    activity,
    one_line,
)
from sparkify_etl.extract import SourceBatch, load_and_classify
from sparkify_etl.inputs import Inventory, check_roots_apart, inventory_input
from sparkify_etl.jars import spark_submit_options
from sparkify_etl.lakemark import check_lake, claim_lake
from sparkify_etl.publish import LocalRenames, S3Commits, StepHook, discard_unpublished, publish_quarantine, recover
from sparkify_etl.records import classify_log_events, classify_song_records
from sparkify_etl.report import RunReport, summary, utc_now
from sparkify_etl.s3 import is_s3
from sparkify_etl.s3a import configure_output
from sparkify_etl.session import build_package_zip, build_spark_session, spark_log
from sparkify_etl.settings import Settings, resolve_settings
from sparkify_etl.storage import Lake, LocalLake, open_lake
from sparkify_etl.tables import SONGPLAYS, STAR_SCHEMA, USER_STATE, USERS, TableSpec
from sparkify_etl.transforms import (
    artists_table,
    days_without_input,
    distinct_plays,
    events_within,
    latest_user_events,
    merge_latest_user_events,
    months_of_window,
    months_touched,
    next_song_plays,
    repeated_plays,
    replace_window,
    song_matches,
    songplays_table,
    songs_table,
    time_table,
    users_table,
    window_changes,
)
from sparkify_etl.writing import SparkOutput, Write, committed_table

log = logging.getLogger("sparkify.etl")


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
    report = None
    try:
        settings = resolve_settings(args, os.environ)
        if args.print_packages:
            print(shlex.join(spark_submit_options(settings)))
            return 0
        if args.print_ddl:
            print(athena_ddl(settings.output_root, settings.format), end="")
            return 0
        if args.package_zip:
            print(build_package_zip(Path(args.package_zip).resolve()))
            return 0
        mode = "rollback" if args.rollback else "incremental" if settings.incremental() else "full"
        report = RunReport.start(settings, mode)
        lake = execute(settings, args, report, spark)
        print(summary(report, lake))
        return 0
    except UsageError as error:
        print(f"etl.py: {error}", file=sys.stderr)
        return EXIT_USAGE
    except EtlError as error:
        print(f"etl.py: {error}{_published_before(report)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"etl.py: interrupted (Ctrl-C); {_what_was_published(report)} (see its run report).", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"etl.py: stopped by SIGTERM; {_what_was_published(report)} (see its run report).", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as error:  # anything unforeseen: one paragraph unless --verbose
        if args.verbose:
            raise
        where = f" Spark's log: {spark_log()}." if spark_log() else ""
        print(
            f"etl.py: the run failed: {one_line(error)}. Run again with --verbose for the full trace.{where}"
            f"{_published_before(report)}",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _what_was_published(report: RunReport | None) -> str:
    if report is None or not report.published:
        return "nothing this run wrote was published"
    return f"this run had already published {', '.join(report.published)}; the other tables are the previous ones"


def _published_before(report: RunReport | None) -> str:
    if report is None or not report.published:
        return ""
    return f" This run had published {', '.join(report.published)} before it failed: those tables are this run's."


@dataclass(frozen=True)
class Run:
    """Everything one load works with, fixed for the whole load."""

    settings: Settings
    spark: SparkSession
    lake: Lake
    output: SparkOutput  # how Spark reaches the output, decided once the session was up
    report: RunReport
    inventories: dict[str, Inventory]
    fence: StepHook  # called before every change to the lake: proves the lock is still this run's


def execute(
    settings: Settings, args: argparse.Namespace, report: RunReport, given_session: SparkSession | None = None
) -> Lake:
    """One run: preflight, lock, repair, load (or roll back), report."""
    inventories = {}
    if not args.rollback:
        check_roots_apart(settings)
        inventories = inventory_input(settings)
    lake = open_lake(settings)
    lake.probe()
    check_lake(lake, settings.format, args.switch_format)  # refused before this run leaves any trace
    spark: SparkSession | None = None
    with lake.lock(report.holder(), settings.lock_stale_seconds) as lock:
        try:
            # Before anything changes: is this a lake this job made, in this format?
            marked = claim_lake(lake, settings.format, args.switch_format, lock.check)
            if settings.format == "delta":  # recovery may have to restore Delta versions
                spark, output = start_spark(settings, args.verbose, given_session)
                report.recovered = recover(lake, delta_recovery(spark, lake, output), on_step=lock.check)
            else:
                report.recovered = recover(lake, on_step=lock.check)
            report.recovered += [marked] if marked else []
            report.based_on = (current_state(lake) or {}).get("run_id") if settings.format == "delta" else None
            report.save(lake)
            if spark is None:
                spark, output = start_spark(settings, args.verbose, given_session)
            report.settings = {**settings.redacted(), **output.settings()}
            report.spark_version = spark.version
            run = Run(settings, spark, lake, output, report, inventories, lock.check)
            if args.rollback:
                report.timed("rollback", rollback, spark, lake, output, report, lock.check)
            else:
                report.save_file_list(lake, inventories)
                run_load(run)
                if settings.format == "delta":
                    report.timed("vacuum", vacuum_delta, spark, lake, output, report)
            if settings.catalog:
                with activity(f"registering the tables in database {settings.catalog}"):
                    report.timed("catalog", register_tables, spark, output, settings.catalog, settings.format)
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
            discard_unpublished(lake, report.run_id)
            report.save(lake)
            if spark is not None and given_session is None:
                with contextlib.suppress(Exception):
                    spark.stop()
    if spark_log() is not None:
        with contextlib.suppress(OSError):
            os.unlink(spark_log())
    return lake


def start_spark(
    settings: Settings, verbose: bool, given_session: SparkSession | None
) -> tuple[SparkSession, SparkOutput]:
    """The run's session, and how it reaches the output (decided once it is up)."""
    spark = given_session or build_spark_session(settings, verbose)
    output = configure_output(spark, settings)
    if settings.format == "delta":
        configure_delta(spark, settings.retain_days)
    return spark, output


# --- extract and transform ---------------------------------------------------------


def extract(run: Run, dataset: str, classify_records: Callable[[DataFrame], DataFrame]) -> SourceBatch:
    """Read, classify, quarantine, report; stop when too much of the dataset is unusable."""
    with activity(f"reading {run.inventories[dataset].folder}"):
        access = run.settings.s3() if is_s3(run.settings.input_root) else None
        batch = load_and_classify(run.spark, run.inventories[dataset], access, classify_records)
    quarantine = run.lake.display(f"_quarantine/{dataset}")
    if not batch.accepted:
        raise EtlError(
            f"No usable records in {batch.inventory.folder} ({batch.quarantined:,} quarantined, see "
            f"{quarantine}). Check that the input is the Sparkify dataset."
        )
    publish_quarantine(run.lake, run.output, run.report.run_id, batch.rejected_records, dataset, run.fence)
    run.report.inputs[dataset] = batch.facts()
    enforce_reject_limit(batch, run.settings.max_reject_rate, quarantine)
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
    batch = extract(run, "song_data", classify_song_records)
    songs = batch.accepted_records
    return SongTables(batch, songs_table(songs).persist(), artists_table(songs).persist(), song_matches(songs))


def process_log_data(run: Run, song_tables: SongTables) -> LogTables:
    """log_data read once: users, songplays and time, merged with earlier loads when only a
    window of days is loaded."""
    settings = run.settings
    batch = extract(run, "log_data", classify_log_events)
    events = events_within(batch.accepted_records, settings.since, settings.until)
    latest = latest_user_events(events)
    plays = next_song_plays(events)
    repeated = repeated_plays(plays).persist()
    distinct_events = distinct_event_count(plays, repeated)
    fresh = songplays_table(distinct_plays(plays, repeated), song_tables.matches).persist()
    songplays, touched = fresh, None
    if settings.incremental():
        previous_state = _committed(run, USER_STATE)
        if previous_state is None and run.lake.exists(USERS.name):
            raise EtlError(
                f"{run.lake.display(USERS.name)} exists but {run.lake.display(USER_STATE.name)} does not, so "
                "users cannot be merged. Run a full load (without --since/--until) once first."
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
            existing = _committed(run, SONGPLAYS, months_of_window(settings.since, settings.until))
            touched = tuple(
                sorted(
                    (row.year, row.month)
                    for row in months_touched(existing, fresh, settings.since, settings.until).collect()
                )
            )
            if existing is not None:
                _refuse_removing_undelivered_days(run, existing, events)
                changes = window_changes(existing, fresh, settings.since, settings.until).orderBy("year", "month")
                run.report.months = {
                    f"{row.year}-{row.month:02d}": {"removed": row.removed, "added": row.added}
                    for row in changes.collect()
                }
                songplays = replace_window(existing, fresh, settings.since, settings.until)
    latest = latest.persist()
    songplays = songplays.persist() if songplays is not None else None
    time_rows = time_table(songplays).persist() if songplays is not None else None
    return LogTables(
        batch, distinct_events, users_table(latest).persist(), latest, fresh, songplays, time_rows, touched
    )


def _refuse_removing_undelivered_days(run: Run, existing: DataFrame, events: DataFrame) -> None:
    """A window replaces every stored play inside it. Where the input has no event at all on
    a day that has stored plays (--until alone, or input files that expired), those plays
    would go without a trace: refused unless the user says so."""
    if run.settings.allow_removing_days:
        return
    days = [row.day for row in days_without_input(existing, events, run.settings.since, run.settings.until).collect()]
    if days:
        shown = ", ".join(str(day) for day in sorted(days)[:5]) + (" ..." if len(days) > 5 else "")
        raise EtlError(
            f"The load window holds songplays on {len(days)} days the input has no events for ({shown}): "
            "replacing the window would delete them. Narrow --since/--until to the days the input holds, or "
            "pass --allow-removing-days if those plays should go."
        )


def _committed(run: Run, spec: TableSpec, partitions=None) -> DataFrame | None:
    """A table the lake holds (only ``partitions`` of it when given), or None."""
    if not run.lake.exists(spec.name):
        return None
    return committed_table(run.spark, run.output, spec, run.settings.format, run.lake.display(spec.name), partitions)


# --- check, then publish ------------------------------------------------------------


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
    report.tables = report.timed("load", publish_tables, run, writes, rows)


def publisher_for(run: Run, writes: Sequence[Write]):
    """The publishing protocol of this output (see sparkify_etl/publish.py and delta.py)."""
    if run.settings.format == "delta":
        return DeltaPublisher(run.spark, run.lake, run.output, run.report, run.settings.retain_days, run.fence)
    if isinstance(run.lake, LocalLake):
        return LocalRenames(run.lake, run.output, run.report.run_id, run.fence)
    return S3Commits(run.lake, run.output, run.report.run_id, tuple(w.spec.name for w in writes), run.fence)


def publish_tables(run: Run, writes: Sequence[Write], rows: dict[str, int]) -> dict[str, dict[str, object]]:
    """Write every table, side by side, then publish them together.

    The writes run at the same time: a month of songplays or time is one partition
    folder, so one file written by one task, and the other cores write songs meanwhile.
    """
    publisher = publisher_for(run, writes)
    pool = ThreadPoolExecutor(max_workers=len(writes))
    done = {}
    try:
        done = {w.spec.name: pool.submit(publisher.write, w, rows.get(w.spec.name, 1)) for w in writes}
        written = {name: future.result() for name, future in done.items()}
        pool.shutdown()
        with activity("publishing the tables"):
            publisher.publish()
        run.report.published_at = utc_now()
    except BaseException:
        # No writer may still be committing while the abort repairs the lake: stop them at
        # their next step, cancel any Spark job one started meanwhile, and wait for all of
        # them (a second Ctrl-C leaves the repair to the next run).
        publisher.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        while not all(future.done() for future in done.values()):
            run.spark.sparkContext.cancelAllJobs()
            wait(list(done.values()), timeout=0.5)
        try:
            publisher.abort()
        except Exception as error:  # noqa: BLE001 - the first failure is the one to report
            run.report.warnings.append(
                f"could not finish or undo this run's publish ({one_line(error)}): the next run completes it"
            )
        raise
    finally:
        run.report.published = sorted(name for name in publisher.published if name in rows)
    return {name: {"rows": rows[name], **facts} for name, facts in written.items() if name in rows}


if __name__ == "__main__":
    sys.exit(main())
