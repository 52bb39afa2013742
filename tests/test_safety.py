"""The job proves its output and survives faults: the reject limit, the quality gate, the
run report, a run killed mid-write and run again, and incremental loads."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import pytest
from pyspark.sql import functions as F

import datagen
import etl
from conftest import BAD_DATA_ALLOWED, NON_UTC_ZONE, REPO, run_etl
from oracle import expected_tables
from tables import COLUMNS, assert_one_file_per_partition_folder, local_data_files, read_table, run_reports

TABLES = tuple(COLUMNS)


def assert_loaded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


# --- the reject limit ---------------------------------------------------------

def test_too_many_rejects_fail_the_run_before_any_table_is_written(quirky_dataset, tmp_path):
    _, songs, logs = expected_tables(quirky_dataset)
    song_read, log_read = len(songs.records) + len(songs.rejects), len(logs.records) + len(logs.rejects)
    # song_data stays within the default 1%, log_data does not: the log_data check fails the run.
    assert len(songs.rejects) / song_read <= etl.DEFAULT_MAX_REJECT_RATE < len(logs.rejects) / log_read
    output = tmp_path / "lake"
    result = run_etl("--input", str(quirky_dataset), "--output", str(output))
    assert result.returncode == 1
    rejected = len(logs.rejects)
    reasons = ", ".join(f"{reason}: {count:,}" for reason, count in sorted(logs.reasons().items()))
    assert (f"etl.py: {rejected} of {log_read} log_data records ({rejected / log_read:.1%}) were quarantined, "
            "more than the 1.0% allowed (--max-reject-rate or [ETL] MAX_REJECT_RATE), so no table was "
            f"written. The records, with their files and reasons, are in {output.as_uri()}/_quarantine/log_data/ "
            f"({reasons}).") in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in output.iterdir()) == ["_quarantine", "_runs"]
    (report,) = run_reports(output)
    assert report["status"] == "failed" and "were quarantined, more than the 1.0% allowed" in report["error"]
    assert report["inputs"]["log_data"]["quarantined"] == rejected and report["tables"] == {}


# --- the quality gate ---------------------------------------------------------

def tiny_star(spark) -> dict:
    """Five consistent one- and two-row tables, and the inputs they reconcile with."""
    start = "timestamp_millis(1541105830796)"
    tables = {
        "songs": spark.sql("select 'SO1' song_id, 'Hey' title, 'AR1' artist_id, 2000 year, 210.5d duration"),
        "artists": spark.sql("select 'AR1' artist_id, 'Band' name, 'Here' location, 1.0d latitude, 2.0d longitude"),
        "users": spark.sql("select 39 user_id, 'Ann' first_name, 'Lee' last_name, 'F' gender, 'paid' level"),
        "songplays": spark.sql(f"select 'id1' songplay_id, {start} start_time, 39 user_id, 'paid' level, "
                               "'SO1' song_id, 'AR1' artist_id, 7L session_id, 'Here' location, 'ua' user_agent, "
                               "2018 year, 11 month union all "
                               f"select 'id2', {start}, 39, 'paid', null, null, 7L, 'Here', 'ua', 2018, 11"),
        "time": spark.sql(f"select {start} start_time, 20 hour, 1 day, 44 week, 11 month, 2018 year, 4 weekday"),
    }
    batch = etl.SourceBatch("log_data", None, None, files=1, bytes=100, records=3, accepted=2, rejects={"x": 1},
                            quarantined=1)
    return {"tables": tables, "fresh": tables["songplays"], "distinct_events": 2, "batches": [batch]}


def gate(star: dict) -> list[etl.CheckResult]:
    results, _ = etl.quality_gate(star["tables"], star["fresh"], star["distinct_events"], star["batches"])
    return results


def test_quality_gate_passes_consistent_tables(spark):
    results = gate(tiny_star(spark))
    assert [r for r in results if not r.passed] == []
    assert len(results) == 2 * 5 + 4 + 1 + 1


@pytest.mark.parametrize("table, change, message", [
    ("songplays", lambda t: t.unionByName(t.limit(1)),
     "songplays: songplay_id is unique failed: 1 rows repeat a songplay_id (e.g. id1)"),
    ("users", lambda t: t.withColumn("user_id", F.lit(None).cast("int")),
     "users: user_id is never null failed: 1 of 1 rows have no user_id"),
    ("users", lambda t: t.withColumn("user_id", F.lit(40)),
     "songplays: user_id references users failed: 1 user_id values missing from users (e.g. 39)"),
    ("artists", lambda t: t.withColumn("artist_id", F.lit("AR9")),
     "songplays: artist_id references artists failed: 1 artist_id values missing from artists (e.g. AR1)"),
    ("time", lambda t: t.limit(0),
     "songplays: start_time references time failed: 1 start_time values missing from time"),
])
def test_quality_gate_names_the_table_the_check_and_example_keys(spark, table, change, message):
    star = tiny_star(spark)
    star["tables"][table] = change(star["tables"][table])
    if table == "songplays":
        star["fresh"] = star["tables"]["songplays"]
    with pytest.raises(etl.EtlError, match="The quality gate failed, so no table was written") as failure:
        etl.enforce_quality_gate(gate(star))
    assert message in str(failure.value)


def test_key_checks_count_missing_and_repeated_keys_apart(spark):
    table = spark.createDataFrame([("a",), ("a",), (None,), ("b",), (None,), ("c",)], "k string")
    rows, (never_null, unique) = etl.key_checks("t", table, "k")
    assert rows == 6
    assert (never_null.passed, never_null.detail) == (False, "2 of 6 rows have no k")
    assert (unique.passed, unique.detail, unique.examples) == (False, "1 rows repeat a k", ["a"])
    rows, (never_null, unique) = etl.key_checks("t", table.where("k is distinct from 'a'"), "k")
    assert (rows, never_null.detail, unique.passed, unique.detail) == (4, "2 of 4 rows have no k", True,
                                                                       "0 rows repeat a k")


def test_quality_gate_reconciles_plays_and_records(spark):
    star = tiny_star(spark)
    star["distinct_events"] = 3
    star["batches"][0].quarantined = 0
    failed = {(r.table, r.check): r.detail for r in gate(star) if not r.passed}
    assert failed == {
        ("songplays", "one row per distinct NextSong event"): "2 rows, expected 3",
        ("log_data", "records read = accepted + quarantined"): "2 accepted + quarantined, expected 3",
    }


def test_a_gate_failure_in_a_real_run_writes_no_table(spark, monkeypatch, tmp_path):
    """The real pipeline with a songs transform that repeats a song: the run stops at the gate."""
    real_songs_table = etl.songs_table
    monkeypatch.setattr(etl, "songs_table", lambda songs: real_songs_table(songs).unionByName(
        real_songs_table(songs).orderBy("song_id").limit(2)))
    output = tmp_path / "lake"
    settings = etl.Settings((REPO / "data" / "sample").as_uri(), output.as_uri())
    report = etl.RunReport.start(spark, settings)
    with pytest.raises(etl.EtlError, match=r"songs: song_id is unique failed: 2 rows repeat a song_id \(e\.g\. SO"):
        etl.run(spark, settings, report)
    assert sorted(path.name for path in output.iterdir()) == ["_quarantine"]
    assert {(c["table"], c["check"]) for c in report.checks if not c["passed"]} == {("songs", "song_id is unique")}


# --- a driver killed in the middle of writing ---------------------------------

@pytest.fixture(scope="module")
def many_songs(tmp_path_factory) -> Path:
    """Enough songs that writing their partition folders takes seconds."""
    root = tmp_path_factory.mktemp("many-songs")
    datagen.generate(root, datagen.Scale(songs=3000, days=3, events_per_day=100), seed=5)
    return root


@pytest.mark.slow
def test_a_run_killed_mid_write_is_marked_partial_and_a_rerun_repairs_it(spark, many_songs, tmp_path):
    output = tmp_path / "lake"
    driver = subprocess.Popen([sys.executable, str(REPO / "etl.py"), "--input", str(many_songs),
                               "--output", str(output)], cwd=tmp_path, env={**os.environ, "TZ": NON_UTC_ZONE},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    songs = output / "songs"
    deadline = time.monotonic() + 600
    while not (songs.exists() and sum(1 for _ in songs.rglob("*.parquet")) >= 50):
        assert driver.poll() is None, "the run ended before the test could kill it"
        assert time.monotonic() < deadline, "the songs write never started"
        time.sleep(0.1)
    # The driver and its JVM, as a crash or the OOM killer would: no shutdown hooks run.
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    assert not (songs / "_SUCCESS").exists(), "a half-written table must not look complete"
    expected, _, _ = expected_tables(many_songs)
    for table in TABLES:  # written side by side: those that finished before the kill are whole
        if (output / table / "_SUCCESS").exists():
            assert read_table(spark, output.as_uri(), table) == expected[table], table
    (killed,) = run_reports(output)
    assert killed["status"] == "running" and killed["finished_at"] is None

    assert_loaded(run_etl("--input", str(many_songs), "--output", str(output)))
    for table in TABLES:
        assert (output / table / "_SUCCESS").exists(), table
        assert read_table(spark, output.as_uri(), table) == expected[table], table
    assert not [path for path in output.rglob("*") if "_temporary" in path.name or ".spark-staging" in path.name]
    assert_one_file_per_partition_folder(local_data_files(output))
    assert [report["status"] for report in run_reports(output)] == ["running", "succeeded"]


# --- incremental loads --------------------------------------------------------

@pytest.fixture(scope="module")
def two_months(tmp_path_factory) -> Path:
    """Forty days of events from 10 November to 19 December 2018, with every quirk."""
    root = tmp_path_factory.mktemp("two-months")
    datagen.generate(root, datagen.Scale(songs=150, days=40, events_per_day=40, start=date(2018, 11, 10)), seed=31)
    return root


def load(dataset: Path, output: Path, *window: str) -> subprocess.CompletedProcess:
    result = run_etl("--input", str(dataset), "--output", str(output), *window)
    assert_loaded(result)
    return result


@pytest.fixture(scope="module")
def full_load(two_months, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("full-load") / "lake"
    load(two_months, output)
    return output


def tables_of(spark, output: Path) -> dict[str, set]:
    return {table: read_table(spark, output.as_uri(), table) for table in TABLES}


def test_the_full_load_of_two_months_matches_the_oracle(spark, two_months, full_load):
    expected, _, _ = expected_tables(two_months)
    assert tables_of(spark, full_load) == expected
    assert {row[-1] for row in expected["songplays"]} == {11, 12}


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [
    (("--until", "2018-11-25"), ("--since", "2018-11-25")),
    (("--since", "2018-11-25"), ("--until", "2018-11-25")),  # the later half first: latest level still wins
], ids=["in order", "later half first"])
def test_two_halves_of_a_month_give_the_same_tables_as_one_full_run(spark, two_months, full_load, tmp_path,
                                                                    first, second):
    output = tmp_path / "lake"
    load(two_months, output, *first)
    result = load(two_months, output, *second)
    assert "(incremental load)" in result.stdout
    assert tables_of(spark, output) == tables_of(spark, full_load)
    assert_one_file_per_partition_folder(local_data_files(output))
    report = run_reports(output)[-1]
    assert report["mode"] == "incremental" and report["status"] == "succeeded"
    assert report["tables"]["songplays"]["written"] == "touched partitions"


def partition_files(output: Path, month: int) -> dict[str, tuple[bytes, int]]:
    files = {}
    for table in ("songplays", "time"):
        for path in (output / table / "year=2018" / f"month={month}").iterdir():
            files[path.relative_to(output).as_posix()] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


@pytest.mark.slow
def test_reloading_december_leaves_november_partitions_byte_for_byte(spark, two_months, full_load, tmp_path):
    output = tmp_path / "lake"
    shutil.copytree(full_load, output)
    november, december = partition_files(output, 11), partition_files(output, 12)
    load(two_months, output, "--since", "2018-12-01")
    assert partition_files(output, 11) == november
    assert set(partition_files(output, 12)).isdisjoint(december), "December's files were not replaced"
    assert tables_of(spark, output) == tables_of(spark, full_load)


def test_an_incremental_load_refuses_to_build_on_a_partial_table(two_months, full_load, tmp_path):
    output = tmp_path / "lake"
    shutil.copytree(full_load, output)
    (output / "songplays" / "_SUCCESS").unlink()
    result = run_etl("--input", str(two_months), "--output", str(output), "--since", "2018-12-01")
    assert result.returncode == 1
    assert f"etl.py: {output.as_uri()}/songplays is incomplete (no _SUCCESS" in result.stderr
    assert "Run a full load (without --since/--until) first." in result.stderr


def test_run_report_records_the_whole_run(quirky_dataset, tmp_path):
    output = tmp_path / "lake"
    result = load(quirky_dataset, output, *BAD_DATA_ALLOWED)
    (report,) = run_reports(output)
    expected, songs, logs = expected_tables(quirky_dataset)
    assert report["status"] == "succeeded" and report["mode"] == "full" and report["error"] is None
    assert report["etl_version"] == etl.__version__ and report["spark_version"] == etl.pyspark_version()
    assert report["started_at"] <= report["finished_at"]
    for dataset, model in (("song_data", songs), ("log_data", logs)):
        files = list((quirky_dataset / dataset).rglob("*.json"))
        assert report["inputs"][dataset] == {
            "files": len(files), "bytes": sum(path.stat().st_size for path in files),
            "records": len(model.records) + len(model.rejects), "accepted": len(model.records),
            "quarantined": len(model.rejects), "rejects": dict(Counter(model.reasons()))}
    assert {table: facts["rows"] for table, facts in report["tables"].items()} == {
        table: len(rows) for table, rows in expected.items()}
    assert all(check["passed"] for check in report["checks"]) and len(report["checks"]) == 17
    assert list(report["stages"]) == ["process_song_data", "process_log_data", "quality_gate", "load"]
    assert report["settings"]["input_root"] == quirky_dataset.as_uri()
    assert report["settings"]["max_reject_rate"] == 0.1 and report["settings"]["secret_access_key"] is None
    assert f"run report: {output.as_uri()}/_runs/{report['run_id']}.json" in result.stdout
    assert "quality checks passed: 17 of 17" in result.stdout
