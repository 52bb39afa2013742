"""End to end: ``python etl.py`` on generated files, every table checked row for row
against the independent oracle, run twice to prove reruns give the same tables and ids."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from conftest import BAD_DATA_ALLOWED, REPO, run_etl
from oracle import expected_tables
from tables import COLUMNS, assert_one_file_per_partition_folder, local_data_files, read_table

@pytest.fixture(scope="module")
def two_runs(quirky_dataset, tmp_path_factory):
    """The same input loaded twice into two output roots."""
    outputs = []
    for attempt in (1, 2):
        output = tmp_path_factory.mktemp(f"run{attempt}")
        result = run_etl("--input", str(quirky_dataset), "--output", str(output), *BAD_DATA_ALLOWED)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append((output, result))
    return outputs


def test_every_table_matches_the_oracle_row_for_row(spark, quirky_dataset, two_runs):
    expected, _, _ = expected_tables(quirky_dataset)
    output, _ = two_runs[0]
    for table in COLUMNS:
        assert read_table(spark, output.as_uri(), table) == expected[table], f"{table} differs from the oracle"


def test_rerun_gives_identical_tables_and_ids(spark, two_runs):
    (first, _), (second, _) = two_runs
    for table in COLUMNS:
        assert read_table(spark, first.as_uri(), table) == read_table(spark, second.as_uri(), table), table


def test_generated_dataset_holds_every_quirk(quirky_dataset):
    """Guards the end-to-end test's meaning: the input really has the edge cases."""
    expected, songs, logs = expected_tables(quirky_dataset)
    raw_songs = [path.read_text() for path in (quirky_dataset / "song_data").rglob("*.json")]
    assert not any(text.endswith("\n") for text in raw_songs)
    parsed = [json.loads(text) for text in raw_songs if text.endswith("}")]
    assert any(isinstance(record.get("title"), int) for record in parsed), "no numeric title"
    raw_logs = [path.read_text() for path in (quirky_dataset / "log_data").rglob("*.json")]
    assert all(not text.endswith("\n") and "\\/" in text for text in raw_logs)
    nextsong = [e for e in logs.records if e["page"] == "NextSong"]
    identities = Counter((e["userId"], e["sessionId"], e["itemInSession"], e["ts"]) for e in nextsong)
    assert max(identities.values()) > 1, "no event delivered twice"
    assert any(e["userId"] == "" for e in logs.records), "no logged-out event"
    levels = {}
    for e in logs.records:
        if e["userId"]:
            levels.setdefault(e["userId"], set()).add(e["level"])
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
    assert set(logs.reasons()) == {"malformed JSON", "a field has the wrong type", "missing ts", "missing page",
                                   "missing userId", "userId is not a number", "NextSong event without a userId",
                                   "NextSong event without sessionId or itemInSession"}
    assert set(songs.reasons()) == {"malformed JSON", "a field has the wrong type", "missing song_id",
                                    "missing artist_id"}


def test_every_rejected_record_is_quarantined_with_file_and_reason(quirky_dataset, two_runs):
    _, songs, logs = expected_tables(quirky_dataset)
    output, result = two_runs[0]
    for dataset, model in (("song_data", songs), ("log_data", logs)):
        kept = [json.loads(line) for path in (output / "_quarantine" / dataset).glob("*.json")
                for line in path.read_text().splitlines() if line]
        assert Counter((Path(r["source_file"]).name, r["reject_reason"]) for r in kept) == Counter(model.rejects)
        assert all(r["record"] for r in kept)
        assert f"quarantined from {dataset}: {len(model.rejects)}" in result.stdout


def test_each_partition_folder_holds_one_file(two_runs):
    output, _ = two_runs[0]
    assert_one_file_per_partition_folder(local_data_files(output))


def test_summary_reports_rows_per_table_and_stage_seconds(quirky_dataset, two_runs):
    expected, _, _ = expected_tables(quirky_dataset)
    _, result = two_runs[0]
    for table, rows in expected.items():
        assert f"{table:<10} {len(rows):>12,} rows" in result.stdout
    assert "process_song_data" in result.stdout and "process_log_data" in result.stdout


def test_python_etl_py_without_arguments_loads_the_shipped_sample(spark, tmp_path):
    result = run_etl(cwd=tmp_path, env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    expected, _, _ = expected_tables(REPO / "data" / "sample")
    for table in COLUMNS:
        assert read_table(spark, (tmp_path / "output").as_uri(), table) == expected[table], table
    assert_one_file_per_partition_folder(local_data_files(tmp_path / "output"))
    assert os.listdir(tmp_path) == ["output"]
