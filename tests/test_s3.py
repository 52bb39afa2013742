"""S3 end to end against a real S3 protocol server (S3Proxy, which checks signatures) on
127.0.0.1, every request counted by a proxy in front of it; the S3 preflight and its
errors, from the server's own 403 answers where it gives them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import pytest

import datagen
import etl
from conftest import (
    BAD_DATA_ALLOWED,
    REPO,
    S3_KEY,
    S3_REGION,
    S3_SECRET,
    all_keys,
    assert_loaded,
    create_bucket,
    download,
    free_port,
    run_etl,
    s3_client,
    s3_environment,
    upload,
)
from oracle import expected_tables
from sparkify_etl.errors import EtlError, LockLost
from sparkify_etl.jars import connector_packages
from sparkify_etl.journal import JOURNAL
from sparkify_etl.locks import this_machine
from sparkify_etl.publish import recover
from sparkify_etl.report import utc_now
from sparkify_etl.s3 import S3Access
from sparkify_etl.s3a import s3a_options
from sparkify_etl.settings import Settings
from sparkify_etl.storage import LocalLake, S3Lake
from tables import TABLES, assert_one_file_per_partition_folder, quarantined, read_tables, run_reports


@pytest.fixture(scope="module")
def s3_dataset(tmp_path_factory) -> Path:
    """Every quirk and kind of bad record, small."""
    root = tmp_path_factory.mktemp("s3-input")
    datagen.generate(root, datagen.Scale(songs=120, days=8, events_per_day=60), seed=11, corrupt=True)
    return root


@pytest.fixture(scope="module")
def raw_bucket(s3_endpoint, s3_dataset) -> str:
    create_bucket(s3_endpoint, "sparkify-raw")
    upload(s3_endpoint, s3_dataset, "sparkify-raw", "udacity/")
    return "s3a://sparkify-raw/udacity/"


@pytest.fixture(scope="module")
def s3_run(counted_s3, raw_bucket, tmp_path_factory):
    """The messy dataset loaded from one bucket into another that does not exist yet,
    through the counting proxy, with the Spark event log kept for inspection."""
    events = tmp_path_factory.mktemp("event-log")
    env = {
        **s3_environment(counted_s3.endpoint),
        "PYSPARK_SUBMIT_ARGS": f"--conf spark.eventLog.enabled=true --conf spark.eventLog.dir={events.as_uri()} "
        "pyspark-shell",
    }
    counted_s3.reset()
    result = run_etl("--input", raw_bucket, "--output", "s3://sparkify-lake/star", *BAD_DATA_ALLOWED, env=env)
    assert_loaded(result)
    return result, counted_s3.reset(), events


@pytest.fixture(scope="module")
def s3_lake(s3_endpoint, s3_run, tmp_path_factory) -> Path:
    """The lake the S3 run wrote, copied to a local folder to be read."""
    return download(s3_endpoint, "sparkify-lake", "star/", tmp_path_factory.mktemp("s3-lake"))


def test_s3_run_writes_tables_that_match_the_oracle(spark, s3_dataset, s3_lake):
    expected, songs, logs = expected_tables(s3_dataset)
    assert songs.rejects and logs.rejects, "the S3 dataset should hold bad records"
    assert read_tables(spark, s3_lake) == expected


def test_s3_run_quarantines_each_rejected_record_with_its_object(s3_dataset, s3_lake):
    _, songs, logs = expected_tables(s3_dataset)
    for dataset, model in (("song_data", songs), ("log_data", logs)):
        kept = Counter((r["source_file"], r["reject_reason"]) for r in quarantined(s3_lake, dataset))
        as_keys = Counter(
            (path.replace(str(s3_dataset), "s3a://sparkify-raw/udacity"), reason) for path, reason in model.rejects
        )
        assert kept == as_keys


def test_s3_run_accounts_for_every_object_listed(s3_dataset, s3_lake):
    _, songs, logs = expected_tables(s3_dataset)
    (report,) = run_reports(s3_lake)
    for dataset, model in (("song_data", songs), ("log_data", logs)):
        facts = report["inputs"][dataset]
        assert (facts["files_read"], facts["files_skipped"]) == (len(model.read), len(model.skipped))


def test_s3_run_creates_the_output_bucket(s3_endpoint, s3_run):
    result, requests, _ = s3_run
    assert requests["CREATE_BUCKET"] == 1 and "created the output bucket sparkify-lake in eu-west-1" in result.stderr


def test_the_output_bucket_is_created_in_the_configured_region():
    """S3Proxy keeps no bucket regions: moto's server, which does, checks this one."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        access = S3Access(S3_REGION, f"http://127.0.0.1:{port}", S3_KEY, S3_SECRET)
        S3Lake("s3a://regional-lake/star", access).probe()
        assert access.client().get_bucket_location(Bucket="regional-lake")["LocationConstraint"] == S3_REGION
    finally:
        server.stop()


def test_s3_output_has_one_object_per_partition_folder_and_no_stray_keys(s3_endpoint, s3_run):
    keys = [key[len("star/") :] for key in all_keys(s3_endpoint, "sparkify-lake", "star/")]
    assert_one_file_per_partition_folder([key for key in keys if key.endswith(".parquet")])
    allowed = re.compile(
        r"^(?:(?:songplays|users|songs|artists|time|_state/user_latest_event)/(?:.+/)?part-[^/]+"
        r"\.parquet|_quarantine/(?:song|log)_data/part-[^/]+\.json|_runs/[^/]+\.json(?:l)?"
        r"|[^/]+(?:/[^/]+)?/_SUCCESS|_sparkify_lake\.json"
        r"|(?:_quarantine|_state)/"
        r"|(?:songplays|users|songs|artists|time|_state/user_latest_event|_quarantine/(?:song|log)_data)/)$"
    )  # S3A's zero-byte markers of the folders it made
    assert [key for key in keys if not allowed.match(key)] == []
    assert not any("_temporary" in key or "__magic" in key or ".pending" in key or "_lock" in key for key in keys)
    assert s3_client(s3_endpoint).list_multipart_uploads(Bucket="sparkify-lake").get("Uploads", []) == []


def test_s3_tables_are_committed_by_the_staging_committer(s3_endpoint, s3_run):
    """The S3A committers write a JSON _SUCCESS manifest; the rename-based one writes 0 bytes."""
    client = s3_client(s3_endpoint)
    for table in ("songplays", "users", "songs", "artists", "time"):
        manifest = json.loads(client.get_object(Bucket="sparkify-lake", Key=f"star/{table}/_SUCCESS")["Body"].read())
        assert manifest["committer"] == "directory", table


def test_s3_requests_are_one_get_per_file_read_and_one_upload_per_file_written(s3_dataset, s3_lake, s3_run):
    """Reading lists each dataset once and GETs each file once; writing uploads each file
    in one multipart upload (initiate, part, complete) and probes nothing per file."""
    _, requests, _ = s3_run
    _, songs, logs = expected_tables(s3_dataset)
    written = [path for path in s3_lake.rglob("*") if path.is_file() and path.name.startswith("part-")]
    files_read = len(songs.read) + len(logs.read)
    assert files_read <= requests["GET"] <= files_read + 10  # + the reports, journal and lock the run reads
    assert requests["INITIATE_MULTIPART"] == requests["UPLOAD_PART"] == requests["COMPLETE_MULTIPART"] == len(written)
    per_table_jobs = 8  # five tables, the user state and two quarantines
    # What publishing adds per table, whatever its size: a LIST of its old files, the manifest
    # PUT, two journal PUTs (intent, then the commit) and four HEADs proving the lock is held.
    publishing = 8
    overhead = sum(requests.values()) - requests["GET"] - 3 * len(written)
    assert overhead <= (25 + publishing) * per_table_jobs, requests
    assert requests["HEAD"] <= (10 + 4) * per_table_jobs, requests


def test_the_run_report_lands_in_the_bucket_without_the_secret(s3_endpoint, s3_run):
    (key,) = [key for key in all_keys(s3_endpoint, "sparkify-lake", "star/_runs/") if key.endswith(".json")]
    text = s3_client(s3_endpoint).get_object(Bucket="sparkify-lake", Key=key)["Body"].read().decode()
    report = json.loads(text)
    assert report["status"] == "succeeded" and report["settings"]["output_root"] == "s3a://sparkify-lake/star"
    assert report["settings"]["s3a_committer"] == "directory"
    assert S3_SECRET not in text and S3_KEY not in text
    assert report["settings"]["access_key_id"] == "****" + S3_KEY[-4:]


def test_secrets_never_appear_in_output_or_event_log(s3_run):
    result, _, events = s3_run
    assert S3_SECRET not in result.stdout + result.stderr
    logs = [path.read_text(errors="replace") for path in events.rglob("*") if path.is_file()]
    assert logs, "the run wrote no event log"
    assert not any(S3_SECRET in text for text in logs)


@pytest.mark.slow
def test_two_incremental_halves_on_s3_equal_a_full_load(spark, s3_endpoint, tmp_path):
    dataset = tmp_path / "two-months"
    datagen.generate(dataset, datagen.Scale(songs=80, days=40, events_per_day=30, start=date(2018, 11, 10)), seed=31)
    create_bucket(s3_endpoint, "halves-raw")
    upload(s3_endpoint, dataset, "halves-raw")
    env = s3_environment(s3_endpoint)
    for window in (("--until", "2018-11-25"), ("--since", "2018-11-25")):
        assert_loaded(run_etl("--input", "s3a://halves-raw", "--output", "s3a://halves-lake/star", *window, env=env))
    halves = download(s3_endpoint, "halves-lake", "star/", tmp_path / "halves")
    expected, _, _ = expected_tables(dataset)
    assert read_tables(spark, halves) == expected
    assert_one_file_per_partition_folder([path.relative_to(halves).as_posix() for path in halves.rglob("*.parquet")])
    assert [report["mode"] for report in run_reports(halves)] == ["incremental", "incremental"]


# --- preflight: clear errors before Spark starts ------------------------------


@pytest.fixture
def s3_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)

    def use(endpoint: str, key: str = S3_KEY, secret: str = S3_SECRET) -> None:
        for name, value in s3_environment(endpoint, key, secret).items():
            monkeypatch.setenv(name, value)

    return use


def fails_before_spark(capsys, argv: list[str], pattern: str) -> None:
    assert etl.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("etl.py: ") and "Traceback" not in err and S3_SECRET not in err, err
    assert re.search(pattern, err), err


def test_missing_input_bucket_is_named(capsys, s3_env, s3_endpoint):
    s3_env(s3_endpoint)
    fails_before_spark(
        capsys,
        ["--input", "s3a://no-such-bucket/", "--output", "s3a://out/"],
        r"The bucket does not exist: cannot list s3a://no-such-bucket/song_data/",
    )


def test_empty_input_prefix_is_refused(capsys, s3_env, s3_endpoint):
    s3_env(s3_endpoint)
    create_bucket(s3_endpoint, "empty-raw")
    fails_before_spark(
        capsys,
        ["--input", "s3a://empty-raw/", "--output", "s3a://out/"],
        r"s3a://empty-raw/song_data holds no non-empty \.json files \(0 files found",
    )


def test_unreachable_endpoint_is_reported(capsys, s3_env):
    s3_env(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    fails_before_spark(
        capsys,
        ["--input", "s3a://raw/", "--output", "s3a://out/"],
        r"Cannot reach http://127\.0\.0\.1:\d+ to list s3a://raw/song_data/",
    )


@pytest.mark.parametrize(
    "key, secret, pattern",
    [
        ("AKIDNOBODYKNOWS", S3_SECRET, r"does not know the AWS access key in use.*Check AWS_ACCESS_KEY_ID"),
        (S3_KEY, "not-the-secret", r"secret key does not match the access key.*Check AWS_SECRET_ACCESS_KEY"),
    ],
)
def test_wrong_credentials_get_the_servers_403_as_one_paragraph(
    capsys, s3_env, s3_endpoint, raw_bucket, key, secret, pattern
):
    s3_env(s3_endpoint, key, secret)
    fails_before_spark(capsys, ["--input", raw_bucket, "--output", "s3a://out/"], pattern)


@pytest.mark.parametrize(
    "code, pattern",
    [
        ("AccessDenied", r"Access denied: the AWS credentials in use may not list s3a://raw/song_data/"),
        ("ExpiredToken", r"The AWS session token has expired"),
    ],
)
def test_refusals_s3proxy_cannot_give_are_explained_too(capsys, s3_env, s3_error_endpoint, code, pattern):
    s3_env(s3_error_endpoint(403 if code == "AccessDenied" else 400, code))
    fails_before_spark(capsys, ["--input", "s3a://raw/", "--output", "s3a://out/"], pattern)


def test_an_output_the_credentials_cannot_write_is_refused_before_spark(s3_error_endpoint):
    lake = S3Lake(
        "s3a://locked-lake/star", S3Access(S3_REGION, s3_error_endpoint(403, "AccessDenied"), S3_KEY, S3_SECRET)
    )
    with pytest.raises(
        EtlError,
        match=r"Access denied: the AWS credentials in use may not write to bucket "
        r"locked-lake",
    ):
        lake.probe()


def test_a_second_run_on_an_s3_output_is_refused_while_the_first_holds_it(capsys, s3_env, s3_endpoint, raw_bucket):
    s3_env(s3_endpoint)
    create_bucket(s3_endpoint, "busy-lake")
    lake = S3Lake("s3a://busy-lake/star", S3Access(S3_REGION, s3_endpoint, S3_KEY, S3_SECRET))
    holder = {"run_id": "R-first", "pid": 1, "host": "elsewhere", "started_at": "2026-01-01T00:00:00+00:00"}
    with lake.lock(holder, 300):
        fails_before_spark(
            capsys,
            ["--input", raw_bucket, "--output", "s3a://busy-lake/star"],
            r"run R-first \(process 1 on elsewhere, started 2026-01-01T00:00:00\+00:00\) is loading "
            r"into s3a://busy-lake/star right now",
        )
    assert "star/_lock" not in all_keys(s3_endpoint, "busy-lake")


def test_a_dead_runs_s3_lock_is_taken_over(s3_endpoint):
    create_bucket(s3_endpoint, "stale-lake")
    lake = S3Lake("s3a://stale-lake/star", S3Access(S3_REGION, s3_endpoint, S3_KEY, S3_SECRET))
    lake.write_json("_lock", {"run_id": "R-dead", "pid": 999999, **this_machine(), "refreshed_at": utc_now()})
    with lake.lock({"run_id": "R-next", "pid": 1, "host": "here", "started_at": "now"}, 300):
        assert lake.read_json("_lock")["run_id"] == "R-next"


def test_a_lock_taken_over_fences_its_old_holder_before_its_next_change(s3_endpoint):
    create_bucket(s3_endpoint, "fenced-lake")
    lake = S3Lake("s3a://fenced-lake/star", S3Access(S3_REGION, s3_endpoint, S3_KEY, S3_SECRET))
    with lake.lock({"run_id": "R-first", "pid": 1, "host": "elsewhere", "started_at": "then"}, 300) as first:
        first.check("journal")  # still held: nothing raised
        # Another run, after this one was paused past the stale time, took the lock over.
        lake.write_json("_lock", {"run_id": "R-second", "pid": 2, "host": "elsewhere", "refreshed_at": utc_now()})
        with pytest.raises(
            LockLost, match=r"no longer holds the lock on s3a://fenced-lake/star: another run took it over"
        ):
            first.check("commit songs")
    # Leaving does not delete the lock that is now the other run's.
    assert lake.read_json("_lock")["run_id"] == "R-second"


@pytest.mark.slow
def test_a_run_paused_past_the_stale_time_changes_nothing_once_another_took_over(spark, s3_endpoint, tmp_path):
    """Run A is stopped (SIGSTOP, driver and JVM) once it holds the lock, for longer than the
    stale time; run B takes the lock over and loads; A, resumed, stops before any change."""
    dataset = tmp_path / "input"
    datagen.generate(dataset, datagen.Scale(songs=40, days=2, events_per_day=40), seed=41)
    create_bucket(s3_endpoint, "paused-raw")
    upload(s3_endpoint, dataset, "paused-raw")
    config = tmp_path / "dl.cfg"
    config.write_text("[ETL]\nLOCK_STALE_SECONDS = 5\n")
    args = ["--config", str(config), "--input", "s3a://paused-raw/", "--output", "s3a://paused-lake/star"]
    first = start_etl(s3_endpoint, *args)
    deadline = time.monotonic() + 120
    while not any(key.endswith(".json") for key in keys_or_none(s3_endpoint, "paused-lake", "star/_runs/")):
        assert first.poll() is None and time.monotonic() < deadline, "run A never took the lock"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGSTOP)  # holds the lock, has changed nothing yet
    try:
        time.sleep(8)  # past the stale time, by S3's clock too
        second = run_etl(*args, env=s3_environment(s3_endpoint))
        assert_loaded(second)
        assert "taking over the lock of a run that died" in second.stderr
        after_second = {key: etag for key, etag in etags(s3_endpoint, "paused-lake", "star/") if "/_runs/" not in key}
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 1, stderr[-3000:]
    assert "This run no longer holds the lock on s3a://paused-lake/star" in stderr
    assert "changed nothing more" in stderr
    assert {
        key: etag for key, etag in etags(s3_endpoint, "paused-lake", "star/") if "/_runs/" not in key
    } == after_second
    lake = download(s3_endpoint, "paused-lake", "star/", tmp_path / "lake")
    expected, _, _ = expected_tables(dataset)
    assert read_tables(spark, lake) == expected
    assert sorted(report["status"] for report in run_reports(lake)) == ["failed", "succeeded"]


@pytest.mark.slow
def test_an_s3_load_interrupted_after_some_commits_names_what_it_published(spark, s3_endpoint, tmp_path):
    dataset = tmp_path / "input"
    datagen.generate(dataset, datagen.Scale(songs=600, days=3, events_per_day=60), seed=43)
    create_bucket(s3_endpoint, "interrupted-raw")
    upload(s3_endpoint, dataset, "interrupted-raw")
    args = ["--input", "s3a://interrupted-raw/", "--output", "s3a://interrupted-lake/star"]
    assert_loaded(run_etl(*args, env=s3_environment(s3_endpoint)))
    before = {key: etag for key, etag in etags(s3_endpoint, "interrupted-lake", "star/") if "/_runs/" not in key}
    driver = start_etl(s3_endpoint, *args)
    client, deadline = s3_client(s3_endpoint), time.monotonic() + 600
    while True:  # until the journal records a table whose new files are committed
        assert driver.poll() is None and time.monotonic() < deadline, "no table was committed before the run ended"
        try:
            journal = json.loads(client.get_object(Bucket="interrupted-lake", Key="star/_journal.json")["Body"].read())
        except Exception:  # noqa: BLE001 - not written yet, or between two writes
            journal = {}
        tables = journal.get("tables") or ["_quarantine"]
        committed = journal.get("committed") or any(done for *_, done in journal.get("replacing", []))
        if not tables[0].startswith("_quarantine") and committed:
            break
        time.sleep(0.02)
    os.kill(driver.pid, signal.SIGINT)  # as Ctrl-C in its terminal
    _, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 130, stderr[-3000:]
    report = run_reports(download(s3_endpoint, "interrupted-lake", "star/", tmp_path / "lake"))[-1]
    published = report["published"]
    assert published, report
    assert f"etl.py: interrupted (Ctrl-C); this run had already published {', '.join(published)}; the other " in stderr
    # Each table is whole: the published ones are new, every other one is as it was. (The
    # committers' _SUCCESS marker, which each job removes when it starts, is no table data.)
    after = {key: etag for key, etag in etags(s3_endpoint, "interrupted-lake", "star/") if "/_runs/" not in key}
    for table in ("songplays", "users", "songs", "artists", "time"):
        old, now = table_files(before, table), table_files(after, table)
        if table in published:
            assert now and not set(old.items()) & set(now.items()), table
        else:
            assert now == old, table
    assert not any(key.startswith(("star/_staging/", "star/_journal")) for key in after)


@pytest.mark.slow
def test_a_magic_committer_load_killed_as_old_files_go_leaves_each_table_whole(spark, s3_endpoint, tmp_path):
    """The kill lands the moment a table's old files start disappearing. Until the next run a
    reader may see old and new files of the tables being cleaned up then; the next run (here
    stopped by its reject limit right after recovering) leaves every table previous or new;
    the one after loads completely."""
    dataset = tmp_path / "input"
    datagen.generate(dataset, datagen.Scale(songs=600, days=3, events_per_day=60), seed=47, corrupt=True)
    create_bucket(s3_endpoint, "magic-raw")
    upload(s3_endpoint, dataset, "magic-raw")
    config = tmp_path / "dl.cfg"
    config.write_text("[SPARK]\nS3A_COMMITTER = magic\n")
    args = [
        "--config",
        str(config),
        "--input",
        "s3a://magic-raw/",
        "--output",
        "s3a://magic-lake/star",
        *BAD_DATA_ALLOWED,
    ]
    assert_loaded(run_etl(*args, env=s3_environment(s3_endpoint)))
    before = dict(etags(s3_endpoint, "magic-lake", "star/"))
    old = {table: table_files(before, table) for table in TABLES}
    driver = start_etl(s3_endpoint, *args)
    deadline = time.monotonic() + 600
    while True:
        assert driver.poll() is None and time.monotonic() < deadline, "no old file went before the run ended"
        now = dict(etags(s3_endpoint, "magic-lake", "star/"))
        if any(not set(files) <= set(now) for files in old.values()):
            break
        time.sleep(0.01)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    def seen() -> dict[str, str]:
        now = dict(etags(s3_endpoint, "magic-lake", "star/"))
        verdict = {}
        for table in TABLES:
            files = table_files(now, table)
            kept = set(files.items()) & set(old[table].items())
            verdict[table] = (
                "absent" if not files else "previous" if files == old[table] else "new" if not kept else "both"
            )
        return verdict

    # Tables are written side by side: those between their commit and their clean-up when
    # the kill came show both versions' files until the next run. None is ever absent.
    assert "absent" not in seen().values()
    stopped = run_etl(*args[:-2], "--max-reject-rate", "0", env=s3_environment(s3_endpoint))
    assert stopped.returncode == 1 and "were quarantined, more than the 0.0% allowed" in stopped.stderr
    assert set(seen().values()) <= {"previous", "new"}
    assert_loaded(run_etl(*args, env=s3_environment(s3_endpoint)))
    lake = download(s3_endpoint, "magic-lake", "star/", tmp_path / "lake")
    expected, _, _ = expected_tables(dataset)
    assert read_tables(spark, lake) == expected
    assert not any(key.startswith(("star/_staging/", "star/_journal")) for key in all_keys(s3_endpoint, "magic-lake"))


def start_etl(endpoint: str, *args: str) -> subprocess.Popen:
    """``python etl.py ARGS`` on the S3 server, in the background, in its own process group."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "etl.py"), *args],
        env={**os.environ, **s3_environment(endpoint)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def table_files(etags_by_key: dict[str, str], table: str) -> dict[str, str]:
    """A table's data files (not folder markers, not the committers' _SUCCESS)."""
    return {
        key: etag
        for key, etag in etags_by_key.items()
        if key.startswith(f"star/{table}/") and not key.endswith(("/", "/_SUCCESS"))
    }


def keys_or_none(endpoint: str, bucket: str, prefix: str) -> list[str]:
    try:
        return all_keys(endpoint, bucket, prefix)
    except Exception:  # noqa: BLE001 - the bucket does not exist until run A creates it
        return []


def etags(endpoint: str, bucket: str, prefix: str) -> list[tuple[str, str]]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [(item["Key"], item["ETag"]) for page in pages for item in page.get("Contents", [])]


def test_the_run_after_a_failed_s3_load_says_which_tables_it_had_replaced(tmp_path):
    lake = LocalLake(str(tmp_path))
    # As etl.py 2.0 wrote it; the current shape is read the same way.
    lake.write_json(
        JOURNAL, {"run_id": "20261201T000000Z-0a0b0c", "format": "parquet", "committed": ["songs", "artists"]}
    )
    assert recover(lake) == [
        "run 20261201T000000Z-0a0b0c stopped while replacing tables on S3 after committing songs, artists of them; this run replaces them"
    ]
    assert not (tmp_path / JOURNAL).exists()


# --- which jars, for which Spark -------------------------------------------------


@pytest.mark.parametrize(
    "jars, version, expected",
    [
        (
            ["spark-core_2.13-4.1.4.jar", "hadoop-client-api-3.4.2.jar"],
            "4.1.4",
            "org.apache.hadoop:hadoop-aws:3.4.2,org.apache.spark:spark-hadoop-cloud_2.13:4.1.2",
        ),
        (
            ["spark-core_2.12-3.5.9.jar", "hadoop-client-api-3.3.4.jar"],
            "3.5.9",
            "org.apache.hadoop:hadoop-aws:3.3.4,org.apache.spark:spark-hadoop-cloud_2.12:3.5.8",
        ),
        # spark-hadoop-cloud is published up to 4.1: newer lines take the newest one.
        (
            ["spark-core_2.13-4.3.0.jar", "hadoop-client-api-3.5.0.jar"],
            "4.3.0",
            "org.apache.hadoop:hadoop-aws:3.5.0,org.apache.spark:spark-hadoop-cloud_2.13:4.1.2",
        ),
        (["spark-core_2.13-4.1.4.jar", "hadoop-client-api-3.4.2.jar", "hadoop-aws-3.4.2.jar"], "4.1.4", None),
    ],
)
def test_connector_matches_the_installed_spark(jars, version, expected):
    assert connector_packages(jars, version) == expected


def test_s3a_options_carry_credentials_endpoint_and_committer():
    settings = Settings(
        "/in",
        "s3a://lake",
        access_key_id="KEY",
        secret_access_key="SECRET",
        session_token="TOKEN",
        region="us-west-2",
        endpoint_url="http://127.0.0.1:9000",
    )
    options = s3a_options(settings, "directory", local_master=True)
    assert options["fs.s3a.aws.credentials.provider"] == "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider"
    assert (options["fs.s3a.access.key"], options["fs.s3a.secret.key"], options["fs.s3a.session.token"]) == (
        "KEY",
        "SECRET",
        "TOKEN",
    )
    assert (
        options["fs.s3a.endpoint"],
        options["fs.s3a.path.style.access"],
        options["fs.s3a.connection.ssl.enabled"],
        options["fs.s3a.endpoint.region"],
    ) == ("http://127.0.0.1:9000", "true", "false", "us-west-2")
    assert options["fs.s3a.committer.name"] == "directory"
    assert options["fs.s3a.committer.staging.tmp.path"].startswith("file:/")
    assert options["fs.s3a.directory.marker.retention"] == "keep"
    default_chain = s3a_options(Settings("/in", "s3a://lake"), "magic", local_master=False)
    assert not any(
        key.startswith(("fs.s3a.access", "fs.s3a.secret", "fs.s3a.aws.credentials")) for key in default_chain
    )
    assert "fs.s3a.committer.staging.tmp.path" not in default_chain
