"""Delta Lake output on a local root and on S3 (S3Proxy): one commit per table tagged with
the run, incremental loads replacing exactly their months, rollback to the previous run,
a run killed between its table commits undone by the next one, and old files cleaned up
only past the retention period. Every table is read back by an independent reader,
delta-rs (the deltalake package), and compared with the oracle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

import datagen
from conftest import (
    BAD_DATA_ALLOWED,
    NON_UTC_ZONE,
    REPO,
    assert_loaded,
    create_bucket,
    download,
    run_etl,
    s3_environment,
)
from oracle import COLUMNS, expected_tables
from sparkify_etl.cli import parse_args
from sparkify_etl.delta import delta_version
from sparkify_etl.errors import EtlError
from sparkify_etl.jars import delta_package, pyspark_version
from sparkify_etl.journal import JOURNAL
from sparkify_etl.settings import resolve_settings
from sparkify_etl.storage import open_lake
from tables import run_reports

DELTA_LINE = ".".join(pyspark_version().split(".")[:2])
try:
    delta_package(pyspark_version())
    DELTA_SUPPORTED = True
except EtlError:
    DELTA_SUPPORTED = False


# On a Spark line Delta Lake publishes no release for, the Delta loads cannot run: they are
# skipped, saying so, and test_delta_is_refused_on_this_spark_line checks the refusal.
needs_delta = pytest.mark.skipif(
    not DELTA_SUPPORTED, reason=f"Delta Lake publishes no release for Spark {DELTA_LINE} (the refusal is tested)"
)


def test_delta_package_names_the_supported_spark_lines_for_any_other():
    with pytest.raises(
        EtlError,
        match=r"--format delta needs Delta Lake for Spark 9\.9, and none is published: Delta Lake supports "
        r"Spark 3\.5, 4\.0, 4\.1, 4\.2\.",
    ):
        delta_package("9.9.1")


@pytest.mark.skipif(DELTA_SUPPORTED, reason=f"Delta Lake is published for Spark {DELTA_LINE}: nothing to refuse")
def test_delta_is_refused_on_this_spark_line(quirky_dataset, tmp_path):
    output = tmp_path / "lake"
    result = run_etl("--input", str(quirky_dataset), "--output", str(output), "--format", "delta", *BAD_DATA_ALLOWED)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"etl.py: --format delta needs Delta Lake for Spark {DELTA_LINE}, and none is "
        "published: Delta Lake supports Spark 3.5, 4.0, 4.1, 4.2."
    )
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (output / "songplays").exists()


def delta_tables(path: Path, versions: dict[str, int] | None = None) -> dict:
    from deltalake import DeltaTable

    tables = {}
    for table in COLUMNS:
        version = None if versions is None else versions[table]
        rows = DeltaTable(str(path / table), version=version).to_pyarrow_table().to_pylist()
        tables[table] = read_delta_rows(rows, table)
    return tables


def read_delta_rows(rows: list[dict], table: str):
    from collections import Counter

    def cell(name: str, value):
        if name == "start_time" and value is not None:
            return int(value.timestamp() * 1000)
        return value

    return Counter(tuple(cell(name, row[name]) for name in COLUMNS[table]) for row in rows)


def run_sequence(*runs: list[str], env: dict | None = None, tmp_path: Path) -> list[dict]:
    """Several etl.py command lines in one process and session (see tests/sequence.py)."""
    results = tmp_path / f"sequence-{time.monotonic_ns()}.json"
    words = [word for run in runs for word in ("--", *run)]
    completed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "sequence.py"), str(results), *words],
        env={**os.environ, "TZ": NON_UTC_ZONE, **(env or {})},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    outcome = json.loads(results.read_text())
    for result in outcome:
        assert result["status"] == 0, result
    return outcome


@pytest.fixture(scope="module")
def two_months(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("delta-two-months")
    datagen.generate(root, datagen.Scale(songs=150, days=40, events_per_day=30, start=date(2018, 11, 10)), seed=31)
    return root


@pytest.fixture(scope="module")
def november(two_months, tmp_path_factory) -> Path:
    """The same input without December's logs: a load of it gives other tables."""
    root = tmp_path_factory.mktemp("delta-november") / "input"
    shutil.copytree(two_months, root)
    shutil.rmtree(root / "log_data" / "2018" / "12")
    return root


# --- every Spark line: one load, or the one error -----------------------------------


@needs_delta
def test_a_delta_load_matches_the_oracle_and_tags_each_commit_with_its_run(quirky_dataset, tmp_path):
    from deltalake import DeltaTable

    output = tmp_path / "lake"
    arguments = ("--input", str(quirky_dataset), "--output", str(output), "--format", "delta", *BAD_DATA_ALLOWED)
    assert_loaded(run_etl(*arguments))
    expected, _, _ = expected_tables(quirky_dataset)
    assert delta_tables(output) == expected
    (report,) = run_reports(output)
    assert report["format"] == "delta" and report["status"] == "succeeded"
    for table in COLUMNS:
        history = DeltaTable(str(output / table)).history(1)[0]
        assert history["userMetadata"] == f"sparkify-etl run {report['run_id']}", table
        assert report["versions"][table] == history["version"] == 0
    songplays = DeltaTable(str(output / "songplays"))
    assert songplays.metadata().partition_columns == ["year", "month"]
    assert songplays.metadata().configuration["delta.deletedFileRetentionDuration"] == "interval 7 days"
    assert not (output / JOURNAL).exists()


@needs_delta
def test_print_packages_names_the_jars_and_settings_for_spark_submit():
    result = run_etl("--print-packages", "--output", "s3a://lake/star", "--format", "delta")
    words = result.stdout.split()
    packages = words[words.index("--packages") + 1]
    assert delta_package(pyspark_version()) in packages and "org.apache.hadoop:hadoop-aws:" in packages
    assert "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension" in words


# --- the whole life of a Delta lake, on a local root and on S3 -------------------------


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(the output root, the environment to run with, a function that brings the lake to a local folder)"""
    if request.param == "local":
        output = tmp_path / "lake"
        return str(output), {}, lambda: output
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"delta-{int(time.time() * 1000) % 10**9}"
    create_bucket(endpoint, bucket)
    return (
        f"s3a://{bucket}/star",
        s3_environment(endpoint),
        lambda: download(endpoint, bucket, "star/", tmp_path / f"copy-{time.monotonic_ns()}"),
    )


@needs_delta
@pytest.mark.slow
def test_halves_a_second_load_and_a_rollback(two_months, november, root, tmp_path):
    output, env, fetch = root
    delta = ["--output", output, "--format", "delta"]
    results = run_sequence(
        ["--input", str(two_months), *delta, "--until", "2018-11-25"],
        ["--input", str(two_months), *delta, "--since", "2018-11-25"],
        ["--input", str(november), *delta],
        [*delta, "--rollback"],
        env=env,
        tmp_path=tmp_path,
    )
    lake = fetch()
    halves, second, rolled_back = run_reports(lake)[1:]
    full, _, _ = expected_tables(two_months)
    assert delta_tables(lake, halves["versions"]) == full, "two halves differ from a full load"
    assert delta_tables(lake, second["versions"]) == expected_tables(november)[0]
    assert delta_tables(lake) == full, "the rollback did not return to the tables of the halves"
    assert rolled_back["mode"] == "rollback" and rolled_back["rolled_back_to"] == halves["run_id"]
    assert f"rolled back the tables in {output} to run {halves['run_id']}" in results[-1]["stdout"]
    # The second half replaced only the months it touched, in one commit per table.
    assert halves["tables"]["songplays"]["written"] == "2 partitions"


@needs_delta
@pytest.mark.slow
@pytest.mark.parametrize("root", ["s3"], indirect=True)  # every step, locally: test_publishing_spark.py
def test_a_run_killed_between_table_commits_is_undone_by_the_next(two_months, november, root, tmp_path):
    output, env, fetch = root
    assert_loaded(run_etl("--input", str(two_months), "--output", output, "--format", "delta", env=env))
    before = delta_tables(fetch())
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "etl.py"), "--input", str(november), "--output", output, "--format", "delta"],
        env={**os.environ, "TZ": NON_UTC_ZONE, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    lake = open_lake(resolve_settings(parse_args(["--output", output]), {**os.environ, **env}))
    deadline = time.monotonic() + 600
    while not any(delta_version(lake, table) for table in COLUMNS):  # the first commit of the new run
        assert driver.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    committed = [table for table in COLUMNS if delta_version(lake, table)]
    assert committed and lake.read_json(JOURNAL)["versions_before"]["songplays"] == 0

    result = run_etl("--input", str(two_months), "--output", output, "--format", "delta", env=env)
    assert_loaded(result)
    assert "stopped between its table commits; restored" in result.stdout
    after = fetch()
    assert delta_tables(after) == before
    assert [report["status"] for report in run_reports(after)] == ["succeeded", "died", "succeeded"]


@needs_delta
@pytest.mark.slow
def test_old_files_are_cleaned_up_past_the_retention_period_and_never_inside_it(two_months, november, tmp_path):
    output = tmp_path / "lake"
    delta = ["--output", str(output), "--format", "delta"]
    run_sequence(
        ["--input", str(two_months), *delta],
        ["--input", str(november), *delta],
        ["--input", str(two_months), *delta],
        tmp_path=tmp_path,
    )
    log = output / "users" / "_delta_log"
    first_files = {
        action["add"]["path"]
        for action in map(json.loads, (log / f"{0:020}.json").read_text().splitlines())
        if "add" in action
    }
    second_files = {
        action["add"]["path"]
        for action in map(json.loads, (log / f"{1:020}.json").read_text().splitlines())
        if "add" in action
    }
    # The first two loads happened ten days ago: their commits, the files they wrote and the
    # removal of the first load's files by the second are all dated back.
    ten_days_ago = (datetime.now(timezone.utc) - timedelta(days=10)).timestamp()
    for version in (0, 1):
        commit = log / f"{version:020}.json"
        actions = [json.loads(line) for line in commit.read_text().splitlines()]
        for action in actions:
            for kind, stamp in (
                ("commitInfo", "timestamp"),
                ("remove", "deletionTimestamp"),
                ("add", "modificationTime"),
            ):
                if kind in action:
                    action[kind][stamp] = int(ten_days_ago * 1000)
        commit.write_text("\n".join(json.dumps(action) for action in actions) + "\n")
        (log / f".{commit.name}.crc").unlink()  # Hadoop's checksum of the commit file as it was
        os.utime(commit, (ten_days_ago, ten_days_ago))
    for name in first_files:
        os.utime(output / "users" / name, (ten_days_ago, ten_days_ago))
    for report_path in (output / "_runs").glob("*.json"):  # the last clean-up was two days ago
        report = json.loads(report_path.read_text())
        if report.get("vacuumed_at"):
            report["vacuumed_at"] = (datetime.now(timezone.utc) - timedelta(days=2)).isoformat(timespec="seconds")
            report_path.write_text(json.dumps(report))
    assert_loaded(run_etl("--input", str(november), *delta))
    remaining = {path.name for path in (output / "users").glob("*.parquet")}
    assert not first_files & remaining, "files removed ten days ago were kept"
    assert second_files <= remaining, "files removed today, inside the retention period, were deleted"
    assert run_reports(output)[-1]["vacuumed_at"] is not None
