"""End to end: the whole load on generated files, every table compared row for row (as a
multiset) with the independent oracle, run twice to prove reruns give the same tables
and ids, every input file and rejected record accounted for."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import BAD_DATA_ALLOWED, REPO, assert_loaded, run_etl, run_in_session
from oracle import expected_tables
from tables import TABLES, assert_one_file_per_partition_folder, local_data_files, quarantined, read_tables, run_reports


@pytest.fixture(scope="module")
def two_runs(spark, quirky_dataset, tmp_path_factory):
    """The messy dataset loaded twice, into two output roots; each run's stdout kept."""
    outputs = []
    for attempt in (1, 2):
        output = tmp_path_factory.mktemp(f"run{attempt}") / "lake"
        log = tmp_path_factory.mktemp(f"stdout{attempt}") / "stdout.txt"
        with open(log, "w") as stdout, _redirect_stdout(stdout):
            status = run_in_session(spark, "--input", str(quirky_dataset), "--output", str(output), *BAD_DATA_ALLOWED)
        assert status == 0, log.read_text()
        outputs.append((output, log.read_text()))
    return outputs


def _redirect_stdout(target):
    import contextlib

    return contextlib.redirect_stdout(target)


def test_every_table_matches_the_oracle_row_for_row(spark, quirky_dataset, two_runs):
    expected, _, _ = expected_tables(quirky_dataset)
    output, _ = two_runs[0]
    assert read_tables(spark, output) == expected


def test_rerun_gives_identical_tables_and_ids(spark, two_runs):
    (first, _), (second, _) = two_runs
    assert read_tables(spark, first) == read_tables(spark, second)


def test_generated_dataset_holds_every_quirk(quirky_dataset):
    """Guards the end-to-end test's meaning: the input really has the edge cases."""
    expected, songs, logs = expected_tables(quirky_dataset)
    raw_songs = [path.read_text() for path in (quirky_dataset / "song_data").rglob("*.json")]
    assert not any(text.endswith("\n") for text in raw_songs)
    parsed = [json.loads(text) for text in raw_songs if text.endswith("}") and "\n" not in text and "}{" not in text]
    assert any(isinstance(record.get("title"), int) for record in parsed), "no numeric title"
    raw_logs = [path.read_text() for path in (quirky_dataset / "log_data").glob("2018/11/*-events.json")]
    assert all(not text.endswith("\n") and "\\/" in text for text in raw_logs)
    nextsong = [e for e in logs.records if e["page"] == "NextSong"]
    identities = Counter((e["userId"], e["sessionId"], e["itemInSession"], e["ts"]) for e in nextsong)
    assert max(identities.values()) > 1, "no event delivered twice"
    assert any(e["userId"] == "" for e in logs.records), "no logged-out event"
    spellings = Counter(int(e["userId"]) for e in {e["userId"]: e for e in logs.records if e["userId"]}.values())
    assert max(spellings.values()) == 2, "no user id spelled two ways"
    levels = {}
    for e in logs.records:
        if e["userId"]:
            levels.setdefault(int(e["userId"]), set()).add(e["level"])
    assert any(len(found) > 1 for found in levels.values()), "no user whose level changes"
    plays = expected["songplays"]
    assert any(row[4] is None for row in plays) and any(row[4] is not None for row in plays)
    titles = Counter((s["title"], s["artist_name"], s["duration"]) for s in songs.records)
    assert max(titles.values()) > 1, "no play that matches several songs"
    names = {}
    for s in songs.records:
        names.setdefault(s["artist_id"], set()).add(s["artist_name"])
    assert any(len(found) > 1 for found in names.values()), "no artist with several spellings"
    assert any(row[1] == 23 and row[0] % 86_400_000 > 86_399_000 for row in expected["time"])
    assert {Path(path).suffix for path in logs.read} == {".json", ".gz", ".bz2", ".JSON"}
    assert {Path(path).suffix for path in songs.read} == {".json", ".gz", ".JSON"}
    assert len(songs.skipped) == 3 and len(logs.skipped) == 4
    assert set(logs.reasons()) == {
        "malformed JSON",
        "ts is not a 64-bit integer",
        "status is not a 32-bit integer",
        "sessionId is not a 64-bit integer",
        "missing ts",
        "missing page",
        "missing userId",
        "userId is not a number",
        "userId is too large for a 32-bit user_id",
        "NextSong event without a userId",
        "NextSong event without sessionId or itemInSession",
        "several JSON values on one line",
        "ts is outside the range of a timestamp (years 1 to 9999)",
        "the file cannot be decompressed as gzip",
    }
    assert set(songs.reasons()) == {
        "malformed JSON",
        "duration is not a number",
        "year is not a 32-bit integer",
        "missing song_id",
        "missing artist_id",
        "several JSON values on one line",
        "the file cannot be decompressed as gzip",
        "artist_id is too long for a folder name (over 255 bytes as artist_id=...)",
    }


def test_every_rejected_record_is_quarantined_with_file_and_reason(quirky_dataset, two_runs):
    _, songs, logs = expected_tables(quirky_dataset)
    output, stdout = two_runs[0]
    for dataset, model in (("song_data", songs), ("log_data", logs)):
        kept = quarantined(output, dataset)
        assert Counter((r["source_file"], r["reject_reason"]) for r in kept) == Counter(model.rejects)
        assert all(r.get("record") for r in kept if not r["reject_reason"].startswith("the file cannot"))
        assert f"quarantined from {dataset}: {len(model.rejects)}" in stdout


def test_a_line_with_two_records_is_quarantined_whole(quirky_dataset, two_runs):
    output, _ = two_runs[0]
    (line,) = [
        r["record"] for r in quarantined(output, "log_data") if r["reject_reason"] == "several JSON values on one line"
    ]
    first, end = json.JSONDecoder().raw_decode(line)
    assert isinstance(first, dict) and isinstance(json.loads(line[end:]), dict)


def test_every_input_file_is_accounted_for_in_the_run_report(quirky_dataset, two_runs):
    _, songs, logs = expected_tables(quirky_dataset)
    output, stdout = two_runs[0]
    (report,) = run_reports(output)
    for dataset, model in (("song_data", songs), ("log_data", logs)):
        facts = report["inputs"][dataset]
        assert facts["files_found"] == facts["files_read"] + facts["files_skipped"]
        assert facts["files_read"] == len(model.read)
        assert {(s["path"], s["reason"]) for s in facts["skipped"]} == set(model.skipped)
        assert f"{dataset}: {len(model.read):,} files read, {len(model.skipped):,} skipped" in stdout
    listed = [
        json.loads(line) for line in (output / "_runs" / f"{report['run_id']}.files.jsonl").read_text().splitlines()
    ]
    assert sorted(entry["path"] for entry in listed if entry["read"]) == sorted(songs.read + logs.read)
    assert {(e["path"], e["reason"]) for e in listed if not e["read"]} == set(songs.skipped + logs.skipped)
    checks = {(c["table"], c["check"]): c["passed"] for c in report["checks"]}
    assert checks[("song_data", "files read = files listed - files skipped")]
    assert checks[("log_data", "records read = accepted + quarantined")]


def test_each_partition_folder_holds_one_file(two_runs):
    output, _ = two_runs[0]
    assert_one_file_per_partition_folder(local_data_files(output))


def test_summary_reports_rows_per_table_and_stage_seconds(quirky_dataset, two_runs):
    expected, _, _ = expected_tables(quirky_dataset)
    _, stdout = two_runs[0]
    for table, rows in expected.items():
        assert f"{table:<10} {sum(rows.values()):>12,} rows" in stdout
    assert "process_song_data" in stdout and "process_log_data" in stdout


def test_the_lake_holds_only_tables_and_underscore_folders(two_runs):
    output, _ = two_runs[0]
    assert sorted(os.listdir(output)) == [
        "_lock",
        "_quarantine",
        "_runs",
        "_sparkify_lake.json",
        "_state",
        *sorted(TABLES),
    ]
    assert not [path for path in output.rglob("*") if "_temporary" in path.name or path.name == "_staging"]


@pytest.mark.slow
def test_python_etl_py_without_arguments_loads_the_shipped_sample(spark, tmp_path):
    result = run_etl(cwd=tmp_path, env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    assert_loaded(result)
    expected, _, _ = expected_tables(REPO / "data" / "sample")
    assert read_tables(spark, tmp_path / "output") == expected
    assert_one_file_per_partition_folder(local_data_files(tmp_path / "output"))
    assert os.listdir(tmp_path) == ["output"]
    assert result.stderr == "", result.stderr


@pytest.mark.slow
def test_a_clone_in_a_folder_with_spaces_and_accents_writes_where_it_is_told(spark, tmp_path):
    """The repository, its sample and the output all under names with spaces, non-ASCII
    letters and a trailing space: every path stays as given, never percent-encoded."""
    clone = tmp_path / "My Projects" / "spärkify dätä"
    clone.mkdir(parents=True)
    shutil.copy(REPO / "etl.py", clone / "etl.py")
    shutil.copytree(REPO / "sparkify_etl", clone / "sparkify_etl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data", clone / "data")
    output = tmp_path / "lake folder é" / "out "
    result = run_etl("--output", str(output), cwd=clone, env={"PYTHONPATH": ""}, script=clone / "etl.py")
    assert_loaded(result)
    expected, _, _ = expected_tables(clone / "data" / "sample")
    assert read_tables(spark, output) == expected
    assert not list(tmp_path.rglob("*%20*")) and not list(tmp_path.rglob("*%C3*"))
    (report,) = run_reports(output)
    assert report["settings"]["output_root"] == str(output)
    assert report["inputs"]["log_data"]["folder"] == str(clone / "data" / "sample" / "log_data")
