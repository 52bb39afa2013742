"""A run never leaves the lake worse than before: the reject limit and the quality gate
stop it before anything is published, the publish is journaled and completed after an
interruption, one run at a time holds the output, signals and kills leave the previous
tables in place, and incremental loads replace exactly the months they touch."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
from pyspark.sql import functions as F

import datagen
import etl
from conftest import BAD_DATA_ALLOWED, NON_UTC_ZONE, REPO, assert_loaded, run_etl, run_in_session
from oracle import expected_tables, read_inputs, tables_from
from sparkify_etl.checks import CheckResult, enforce_quality_gate, key_checks, quality_gate
from sparkify_etl.delta import current_state
from sparkify_etl.errors import EtlError
from sparkify_etl.extract import SourceBatch
from sparkify_etl.inputs import InputFile, Inventory
from sparkify_etl.locks import lock_is_stale, this_machine
from sparkify_etl.publish import recover
from sparkify_etl.storage import LocalLake
from sparkify_etl.tables import spec_of
from sparkify_etl.transforms import songs_table
from tables import (
    assert_one_file_per_partition_folder,
    lake_snapshot,
    local_data_files,
    quarantined,
    read_table,
    read_tables,
    run_reports,
)


def run_quietly(spark, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = run_in_session(spark, *args)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def loaded_lake(spark, quirky_dataset, tmp_path_factory) -> Path:
    """A lake holding one good load of the messy dataset, to copy and then fail to replace."""
    output = tmp_path_factory.mktemp("loaded") / "lake"
    status, _, err = run_quietly(spark, "--input", str(quirky_dataset), "--output", str(output), *BAD_DATA_ALLOWED)
    assert status == 0, err
    return output


def copy_of(lake: Path, tmp_path: Path) -> Path:
    target = tmp_path / "lake"
    shutil.copytree(lake, target)
    return target


# --- the reject limit and the quality gate ------------------------------------------


def test_too_many_rejects_stop_the_run_and_leave_the_tables_as_they_were(spark, quirky_dataset, loaded_lake, tmp_path):
    _, songs, _ = expected_tables(quirky_dataset)
    read, rejected = len(songs.records) + len(songs.rejects), len(songs.rejects)
    assert 0.015 < rejected / read < 0.1
    output = copy_of(loaded_lake, tmp_path)
    before = lake_snapshot(output)
    status, _, err = run_quietly(
        spark, "--input", str(quirky_dataset), "--output", str(output), "--max-reject-rate", "0.015"
    )
    assert status == 1
    reasons = ", ".join(f"{reason}: {count:,}" for reason, count in sorted(songs.reasons().items()))
    assert err == (
        f"etl.py: {rejected} of {read} song_data records ({rejected / read:.1%}) were quarantined, "
        "more than the 1.5% allowed (--max-reject-rate or [ETL] MAX_REJECT_RATE), so no table was "
        f"published. The records, with their files and reasons, are in {output}/_quarantine/song_data "
        f"({reasons}).\n"
    )
    assert lake_snapshot(output) == before
    report = run_reports(output)[-1]
    assert report["status"] == "failed" and "were quarantined, more than the 1.5% allowed" in report["error"]
    assert report["inputs"]["song_data"]["quarantined"] == rejected and report["tables"] == {}
    assert len(quarantined(output, "song_data")) == rejected
    assert not (output / "_staging").exists()


def tiny_star(spark) -> dict:
    """Five consistent one- and two-row tables, and the inputs they reconcile with."""
    start = "timestamp_millis(1541105830796)"
    tables = {
        "songs": spark.sql("select 'SO1' song_id, 'Hey' title, 'AR1' artist_id, 2000 year, 210.5d duration"),
        "artists": spark.sql("select 'AR1' artist_id, 'Band' name, 'Here' location, 1.0d latitude, 2.0d longitude"),
        "users": spark.sql("select 39 user_id, 'Ann' first_name, 'Lee' last_name, 'F' gender, 'paid' level"),
        "songplays": spark.sql(
            f"select 'id1' songplay_id, {start} start_time, 39 user_id, 'paid' level, "
            "'SO1' song_id, 'AR1' artist_id, 7L session_id, 'Here' location, 'ua' user_agent, "
            "2018 year, 11 month union all "
            f"select 'id2', {start}, 39, 'paid', null, null, 7L, 'Here', 'ua', 2018, 11"
        ),
        "time": spark.sql(f"select {start} start_time, 20 hour, 1 day, 44 week, 11 month, 2018 year, 4 weekday"),
    }
    inventory = Inventory("log_data", "/in/log_data", [InputFile("/in/log_data/a.json", 100)])
    batch = SourceBatch("log_data", inventory, None, None, files_parsed=1, records=3, accepted=2, rejects={"x": 1})
    return {"tables": tables, "fresh": tables["songplays"], "distinct_events": 2, "batches": [batch]}


def gate(star: dict) -> list[CheckResult]:
    results, _ = quality_gate(star["tables"], star["fresh"], star["distinct_events"], star["batches"])
    return results


def test_quality_gate_passes_consistent_tables(spark):
    results = gate(tiny_star(spark))
    assert [r for r in results if not r.passed] == []
    assert len(results) == 2 * 5 + 4 + 1 + 2


@pytest.mark.parametrize(
    "table, change, message",
    [
        (
            "songplays",
            lambda t: t.unionByName(t.limit(1)),
            "songplays: songplay_id is unique failed: 1 rows repeat a songplay_id (e.g. id1)",
        ),
        (
            "users",
            lambda t: t.withColumn("user_id", F.lit(None).cast("int")),
            "users: user_id is never null failed: 1 of 1 rows have no user_id",
        ),
        (
            "users",
            lambda t: t.withColumn("user_id", F.lit(40)),
            "songplays: user_id references users failed: 1 user_id values missing from users (e.g. 39)",
        ),
        (
            "artists",
            lambda t: t.withColumn("artist_id", F.lit("AR9")),
            "songplays: artist_id references artists failed: 1 artist_id values missing from artists (e.g. AR1)",
        ),
        (
            "time",
            lambda t: t.limit(0),
            "songplays: start_time references time failed: 1 start_time values missing from time",
        ),
    ],
)
def test_quality_gate_names_the_table_the_check_and_example_keys(spark, table, change, message):
    star = tiny_star(spark)
    star["tables"][table] = change(star["tables"][table])
    if table == "songplays":
        star["fresh"] = star["tables"]["songplays"]
    with pytest.raises(EtlError, match="The quality gate failed, so no table was published") as failure:
        enforce_quality_gate(gate(star))
    assert message in str(failure.value)


def test_quality_gate_reconciles_files_plays_and_records(spark):
    star = tiny_star(spark)
    star["distinct_events"] = 3
    star["batches"][0].rejects = {}
    star["batches"][0].files_parsed = 0
    failed = {(r.table, r.check): r.detail for r in gate(star) if not r.passed}
    assert failed == {
        ("songplays", "one row per distinct NextSong event"): "2 rows, expected 3",
        ("log_data", "records read = accepted + quarantined"): "2 accepted + quarantined, expected 3",
        ("log_data", "files read = files listed - files skipped"): "0 files, expected 1",
    }


def test_key_checks_count_missing_and_repeated_keys_apart(spark):
    table = spark.createDataFrame([("a",), ("a",), (None,), ("b",), (None,), ("c",)], "k string")
    rows, (never_null, unique) = key_checks("t", table, "k")
    assert rows == 6
    assert (never_null.passed, never_null.detail) == (False, "2 of 6 rows have no k")
    assert (unique.passed, unique.detail, unique.examples) == (False, "1 rows repeat a k", ["a"])


def test_a_gate_failure_in_a_real_run_leaves_the_previous_tables(
    spark, monkeypatch, quirky_dataset, loaded_lake, tmp_path
):
    """The real pipeline with a songs transform that repeats a song: nothing is published."""
    real_songs_table = songs_table
    monkeypatch.setattr(
        etl,
        "songs_table",
        lambda songs: real_songs_table(songs).unionByName(real_songs_table(songs).orderBy("song_id").limit(2)),
    )
    output = copy_of(loaded_lake, tmp_path)
    before = lake_snapshot(output)
    status, _, err = run_quietly(spark, "--input", str(quirky_dataset), "--output", str(output), *BAD_DATA_ALLOWED)
    assert status == 1
    assert "songs: song_id is unique failed: 2 rows repeat a song_id (e.g. SO" in err
    assert lake_snapshot(output) == before
    assert not (output / "_staging").exists()
    report = run_reports(output)[-1]
    assert {(c["table"], c["check"]) for c in report["checks"] if not c["passed"]} == {("songs", "song_id is unique")}


# --- recovery (the publishing protocol step by step is in test_publishing.py) ---------


def test_recovery_removes_unpublished_staging_and_closes_reports_of_dead_runs(tmp_path):
    lake = LocalLake(str(tmp_path))
    (tmp_path / "_staging" / "R0" / "songs").mkdir(parents=True)
    lake.write_json("_runs/R0.json", {"run_id": "R0", "started_at": "2026-01-01T00:00:00+00:00", "status": "running"})
    lake.write_json("_runs/R9.json", {"run_id": "R9", "started_at": "2025-01-01T00:00:00+00:00", "status": "succeeded"})
    notes = recover(lake)
    assert notes == [
        "removed the staging folder of run R0, which never published",
        "closed the report of run R0, whose process had died",
    ]
    dead = json.loads((tmp_path / "_runs" / "R0.json").read_text())
    assert dead["status"] == "died" and "ended without closing this report" in dead["error"]
    assert json.loads((tmp_path / "_runs" / "R9.json").read_text())["status"] == "succeeded"
    assert not (tmp_path / "_staging").exists()


# --- one run at a time ---------------------------------------------------------------


def test_a_second_run_on_the_same_output_is_refused_and_names_the_first(spark, quirky_dataset, loaded_lake, tmp_path):
    output = copy_of(loaded_lake, tmp_path)
    before = lake_snapshot(output)
    holder = {"run_id": "20260101T000000Z-abcdef", "pid": 4242, "host": "worker-7", "started_at": "2026-01-01T00:00:00"}
    with LocalLake(str(output)).lock(holder, 300):
        status, _, err = run_quietly(spark, "--input", str(quirky_dataset), "--output", str(output), *BAD_DATA_ALLOWED)
    assert status == 1
    assert (
        "etl.py: run 20260101T000000Z-abcdef (process 4242 on worker-7, started 2026-01-01T00:00:00) is "
        f"loading into {output} right now"
    ) in err
    assert lake_snapshot(output) == before


def test_a_lock_left_by_a_dead_run_does_not_block_the_next(tmp_path):
    lock = tmp_path / "_lock"
    lock.write_text(json.dumps({"run_id": "dead", "pid": 999999, "host": "here", "started_at": "then"}))
    with LocalLake(str(tmp_path)).lock(
        {"run_id": "next", "pid": os.getpid(), "host": "here", "started_at": "now"}, 300
    ):
        assert json.loads(lock.read_text())["run_id"] == "next"


def test_a_stale_s3_lock_is_recognised_by_its_age_or_a_dead_process_on_this_machine():
    """(holder, age by S3's clock): a pid is trusted only on the same host, boot and PID namespace."""
    here = this_machine()
    cases = [
        ({"pid": 1, "host": "elsewhere"}, 10, False),
        ({"pid": 1, "host": "elsewhere"}, 301, True),
        ({"pid": 999999, **here}, 10, True),
        ({"pid": os.getpid(), **here}, 10, False),
        ({"pid": 999999, **here, "pid_namespace": -1}, 10, False),  # same host name, another container
        ({"pid": 999999, **here, "boot_id": "another boot"}, 10, False),
    ]
    assert [lock_is_stale(json.dumps(holder), age, 300) for holder, age, _ in cases] == [stale for *_, stale in cases]
    assert lock_is_stale("garbage", 0, 300)


# --- signals and kills ------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_songs(tmp_path_factory) -> Path:
    """Enough songs that writing their partition folders takes seconds."""
    root = tmp_path_factory.mktemp("many-songs")
    datagen.generate(root, datagen.Scale(songs=3000, days=3, events_per_day=100), seed=5)
    return root


@pytest.fixture(scope="module")
def many_songs_lake(many_songs, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("many-songs-lake") / "lake"
    assert_loaded(run_etl("--input", str(many_songs), "--output", str(output)))
    return output


def start_run(input_root: Path, output: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "etl.py"), "--input", str(input_root), "--output", str(output)],
        cwd=cwd,
        env={**os.environ, "TZ": NON_UTC_ZONE},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_staged_songs(driver: subprocess.Popen, output: Path, files: int = 50) -> None:
    deadline = time.monotonic() + 600
    while not sum(1 for _ in (output / "_staging").glob("*/songs/*/*/*.parquet")) >= files:
        assert driver.poll() is None, f"the run ended before the test could stop it: {driver.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the songs write never started"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(
    "how, status, note",
    [
        (signal.SIGTERM, 143, "etl.py: stopped by SIGTERM; nothing this run wrote was published"),
        (signal.SIGINT, 130, "etl.py: interrupted (Ctrl-C); nothing this run wrote was published"),
    ],
)
def test_a_stopped_run_exits_with_its_status_and_leaves_the_lake_as_it_was(
    many_songs, many_songs_lake, tmp_path, how, status, note
):
    output = copy_of(many_songs_lake, tmp_path)
    before = lake_snapshot(output)
    driver = start_run(many_songs, output, tmp_path)
    wait_for_staged_songs(driver, output)
    os.kill(driver.pid, how)  # the driver only, as a scheduler or Ctrl-C in a terminal does
    _stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == status, stderr[-3000:]
    assert stderr.strip() == note + " (see its run report).", stderr[-3000:]
    assert lake_snapshot(output) == before
    assert not (output / "_staging").exists()
    report = run_reports(output)[-1]
    assert report["status"] == "interrupted" and report["error"] in (
        "stopped by SIGTERM",
        "interrupted (SIGINT, Ctrl-C)",
    )


@pytest.mark.slow
def test_a_run_killed_mid_write_leaves_the_lake_whole_and_a_rerun_repairs_it(
    spark, many_songs, many_songs_lake, tmp_path
):
    output = copy_of(many_songs_lake, tmp_path)
    before = lake_snapshot(output)
    driver = start_run(many_songs, output, tmp_path)
    wait_for_staged_songs(driver, output)
    # The driver and its JVM, as a crash or the OOM killer would: no handler runs.
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert lake_snapshot(output) == before
    assert (output / "_staging").exists(), "the killed run's staging is left for the next run to remove"
    assert run_reports(output)[-1]["status"] == "running"

    result = run_etl("--input", str(many_songs), "--output", str(output))
    assert_loaded(result)
    assert "note: removed the staging folder of run" in result.stdout
    assert "note: closed the report of run" in result.stdout
    expected, _, _ = expected_tables(many_songs)
    assert read_tables(spark, output) == expected
    assert not [path for path in output.rglob("*") if "_temporary" in path.name or path.name == "_staging"]
    assert_one_file_per_partition_folder(local_data_files(output))
    assert [report["status"] for report in run_reports(output)] == ["succeeded", "died", "succeeded"]


@pytest.mark.slow
def test_a_full_disk_fails_the_run_with_one_paragraph_and_leaves_the_lake(spark, tmp_path):
    """The lake on a 12 MB filesystem: a small load fits, a bigger one cannot be staged."""
    small, big = tmp_path / "small", tmp_path / "big"
    datagen.generate(small, datagen.Scale(songs=200, days=2, events_per_day=50), seed=3)
    datagen.generate(big, datagen.Scale(songs=6000, days=2, events_per_day=50), seed=3)
    mount, copy = tmp_path / "disk", tmp_path / "after"
    mount.mkdir()
    etl_py = REPO / "etl.py"
    script = f"""
set -u
mount -t tmpfs -o size=12m tmpfs '{mount}'
'{sys.executable}' '{etl_py}' --input '{small}' --output '{mount}/lake' > '{tmp_path}/first.out' 2>&1
echo $? > '{tmp_path}/first.status'
'{sys.executable}' '{etl_py}' --input '{big}' --output '{mount}/lake' > '{tmp_path}/second.out' 2> '{tmp_path}/second.err'
echo $? > '{tmp_path}/second.status'
cp -a '{mount}/lake' '{copy}'
"""
    subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        check=True,
        env={**os.environ, "TZ": NON_UTC_ZONE},
        timeout=900,
    )
    assert (tmp_path / "first.status").read_text().strip() == "0", (tmp_path / "first.out").read_text()[-3000:]
    assert (tmp_path / "second.status").read_text().strip() == "1"
    err = (tmp_path / "second.err").read_text()
    assert err.startswith("etl.py: No space left on device while writing") and err.count("\n") == 1, err
    assert "Traceback" not in err and "at org.apache" not in err
    expected, _, _ = expected_tables(small)
    assert read_tables(spark, copy) == expected
    assert not (copy / "_staging").exists()
    report = run_reports(copy)[-1]
    assert report["status"] == "failed" and report["error"].startswith("No space left on device while writing")


# --- what an incremental load replaces ---------------------------------------------


@pytest.fixture(scope="module")
def two_months(tmp_path_factory) -> Path:
    """Forty days of events from 10 November to 19 December 2018, with every quirk."""
    root = tmp_path_factory.mktemp("two-months")
    datagen.generate(root, datagen.Scale(songs=150, days=40, events_per_day=40, start=date(2018, 11, 10)), seed=31)
    return root


@pytest.fixture(scope="module")
def full_load(spark, two_months, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("full-load") / "lake"
    status, _, err = run_quietly(spark, "--input", str(two_months), "--output", str(output))
    assert status == 0, err
    return output


def test_the_full_load_of_two_months_matches_the_oracle(spark, two_months, full_load):
    expected, _, _ = expected_tables(two_months)
    assert read_tables(spark, full_load) == expected
    assert {row[-1] for row in expected["songplays"]} == {11, 12}


def without_december(dataset: Path, target: Path) -> Path:
    shutil.copytree(dataset, target)
    shutil.rmtree(target / "log_data" / "2018" / "12")
    return target


def test_a_window_over_days_the_input_lacks_is_refused_and_changes_nothing(spark, two_months, full_load, tmp_path):
    output = copy_of(full_load, tmp_path)
    before = lake_snapshot(output)
    november_only = without_december(two_months, tmp_path / "november-only")
    status, _, err = run_quietly(spark, "--input", str(november_only), "--output", str(output), "--since", "2018-11-25")
    assert status == 1
    assert err.startswith(
        "etl.py: The load window holds songplays on 19 days the input has no events for (2018-12-01, "
        "2018-12-02, 2018-12-03, 2018-12-04, 2018-12-05 ...): replacing the window would delete them."
    ), err
    assert "--allow-removing-days" in err
    assert lake_snapshot(output) == before


def test_a_window_reports_the_rows_it_removes_and_adds_per_month(spark, two_months, full_load, tmp_path):
    output = copy_of(full_load, tmp_path)
    november_only = without_december(two_months, tmp_path / "november-only")
    status, stdout, err = run_quietly(
        spark, "--input", str(november_only), "--output", str(output), "--since", "2018-11-25", "--allow-removing-days"
    )
    assert status == 0, err
    expected_full, _, _ = expected_tables(two_months)
    december = sum(count for row, count in expected_full["songplays"].items() if row[-1] == 12)
    assert run_reports(output)[-1]["months"] == {
        "2018-11": {"removed": 0, "added": 0},  # the same plays, the same ids
        "2018-12": {"removed": december, "added": 0},
    }
    assert f"songplays 2018-12: {december:,} rows removed, 0 added" in stdout


def test_a_reload_that_leaves_a_month_without_plays_empties_that_month(spark, two_months, full_load, tmp_path):
    output = copy_of(full_load, tmp_path)
    november_only = without_december(two_months, tmp_path / "november-only")
    status, stdout, err = run_quietly(
        spark,
        "--input",
        str(november_only),
        "--output",
        str(output),
        "--since",
        "2018-11-25",
        "--allow-removing-days",
    )
    assert status == 0, err
    assert "(2 partitions)" in stdout
    assert not (output / "songplays" / "year=2018" / "month=12").exists()
    assert not (output / "time" / "year=2018" / "month=12").exists()
    expected_short, _, _ = expected_tables(november_only)
    expected_full, _, _ = expected_tables(two_months)
    tables = read_tables(spark, output)
    assert tables["songplays"] == expected_short["songplays"] and tables["time"] == expected_short["time"]
    # The users remember December: their latest events came from the earlier load.
    assert tables["users"] == expected_full["users"]


def test_a_window_without_plays_leaves_songplays_and_time_as_they_are(spark, two_months, full_load, tmp_path):
    output = copy_of(full_load, tmp_path)
    before = {table: read_table(spark, output, table) for table in ("songplays", "time")}
    files = {
        path: path.read_bytes()
        for table in ("songplays", "time")
        for path in (output / table).rglob("*")
        if path.is_file()
    }
    status, stdout, err = run_quietly(
        spark, "--input", str(two_months), "--output", str(output), "--since", "2019-03-01"
    )
    assert status == 0, err
    assert "note: no NextSong events in the load window: songplays and time were left as they are" in stdout
    assert {table: read_table(spark, output, table) for table in ("songplays", "time")} == before
    assert {path: path.read_bytes() for path in files} == files


def test_a_full_load_without_plays_writes_empty_tables_that_keep_their_schema(spark, tmp_path):
    dataset = tmp_path / "no-plays"
    datagen.generate(dataset, datagen.Scale(songs=20, days=2, events_per_day=30), seed=2)
    for path in (dataset / "log_data").rglob("*.json"):
        lines = [line for line in path.read_text().split("\n") if '"NextSong"' not in line]
        path.write_text("\n".join(lines))
    output = tmp_path / "lake"
    status, _stdout, err = run_quietly(spark, "--input", str(dataset), "--output", str(output))
    assert status == 0, err
    for table in ("songplays", "time"):
        frame = spark.read.parquet(f"file://{output}/{table}")
        assert frame.count() == 0
        assert [name for name, _ in frame.dtypes] == [field.name for field in spec_of(table).schema.fields]
    expected, _, _ = expected_tables(dataset)
    assert read_tables(spark, output) == expected

    # A later load with plays replaces the empty table: one layout, partitions only.
    datagen.generate(tmp_path / "with-plays", datagen.Scale(songs=20, days=2, events_per_day=30), seed=2)
    status, _, err = run_quietly(
        spark, "--input", str(tmp_path / "with-plays"), "--output", str(output), "--since", "2018-11-01"
    )
    assert status == 0, err
    assert not list((output / "songplays").glob("*.parquet"))
    assert read_table(spark, output, "songplays") == expected_tables(tmp_path / "with-plays")[0]["songplays"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "first, second, written",
    [
        (("--until", "2018-11-25"), ("--since", "2018-11-25"), "2 partitions"),  # November's tail and December
        (
            ("--since", "2018-11-25"),
            ("--until", "2018-11-25"),
            "1 partition",
        ),  # the later half first: latest level wins
    ],
    ids=["in order", "later half first"],
)
def test_two_halves_give_the_same_tables_as_one_full_run(
    spark, two_months, full_load, tmp_path, first, second, written
):
    output = tmp_path / "lake"
    for window in (first, second):
        status, stdout, err = run_quietly(spark, "--input", str(two_months), "--output", str(output), *window)
        assert status == 0, err
    assert "(incremental load, parquet)" in stdout
    assert read_tables(spark, output) == read_tables(spark, full_load)
    assert_one_file_per_partition_folder(local_data_files(output))
    report = run_reports(output)[-1]
    assert report["mode"] == "incremental" and report["status"] == "succeeded"
    assert report["tables"]["songplays"]["written"] == written


def partition_files(output: Path, month: int) -> dict[str, tuple[bytes, int]]:
    files = {}
    for table in ("songplays", "time"):
        for path in (output / table / "year=2018" / f"month={month}").iterdir():
            files[path.relative_to(output).as_posix()] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


def test_reloading_december_leaves_november_partitions_byte_for_byte(spark, two_months, full_load, tmp_path):
    output = copy_of(full_load, tmp_path)
    november, december = partition_files(output, 11), partition_files(output, 12)
    status, _, err = run_quietly(spark, "--input", str(two_months), "--output", str(output), "--since", "2018-12-01")
    assert status == 0, err
    assert partition_files(output, 11) == november
    assert set(partition_files(output, 12)).isdisjoint(december), "December's files were not replaced"
    assert read_tables(spark, output) == read_tables(spark, full_load)


def test_incremental_windows_match_the_oracle_of_their_events(spark, two_months, tmp_path):
    """Loading only a window into an empty lake gives the oracle's tables of those days."""
    output = tmp_path / "lake"
    status, _, err = run_quietly(
        spark, "--input", str(two_months), "--output", str(output), "--since", "2018-11-20", "--until", "2018-12-05"
    )
    assert status == 0, err
    songs, logs = read_inputs(two_months)
    window = [
        e
        for e in logs.records
        if date(2018, 11, 20) <= datetime.fromtimestamp(e["ts"] / 1000, timezone.utc).date() < date(2018, 12, 5)
    ]
    assert read_tables(spark, output) == tables_from(songs, window)


# --- the outcome told truthfully --------------------------------------------------------


def test_a_failure_after_publishing_says_the_tables_are_published(
    spark, monkeypatch, quirky_dataset, loaded_lake, tmp_path
):
    def catalog_down(*args):
        raise EtlError("The metastore refused the connection.")

    monkeypatch.setattr(etl, "register_tables", catalog_down)
    output = copy_of(loaded_lake, tmp_path)
    status, _, err = run_quietly(
        spark, "--input", str(quirky_dataset), "--output", str(output), "--catalog", "sparkify", *BAD_DATA_ALLOWED
    )
    assert status == 1
    tables = "artists, songplays, songs, time, users"
    assert err == (
        f"etl.py: The metastore refused the connection. This run had published {tables} before it failed: "
        "those tables are this run's.\n"
    )
    report = run_reports(output)[-1]
    assert report["status"] == "failed" and report["published"] == tables.split(", ") and report["published_at"]
    expected, _, _ = expected_tables(quirky_dataset)
    assert read_tables(spark, output) == expected


def test_a_run_that_published_all_its_tables_counts_for_history_even_if_it_then_failed(tmp_path):
    lake = LocalLake(str(tmp_path))
    earlier = {"run_id": "R1", "started_at": "2026-01-01", "status": "succeeded", "versions": {"songs": 1}}
    published = {"run_id": "R2", "started_at": "2026-01-02", "status": "failed", "versions": {"songs": 2}}
    published["published_at"] = "2026-01-02T00:10:00+00:00"
    unpublished = {"run_id": "R3", "started_at": "2026-01-03", "status": "failed", "versions": {"songs": 3}}
    for report in (earlier, published, unpublished):
        lake.write_json(f"_runs/{report['run_id']}.json", report)
    assert current_state(lake)["run_id"] == "R2"
