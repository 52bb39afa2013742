"""Listing and reading the input: every file found is read or skipped with its reason,
compressed files are decoded, symlinked folders are followed, and every line becomes a
record of the file it came from."""

from __future__ import annotations

import bz2
import gzip
import os
import zlib
from pathlib import Path

import pytest

from sparkify_etl.errors import EtlError, InputReadError
from sparkify_etl.extract import balanced_batches, load_and_classify, read_lines
from sparkify_etl.fetch import fetch_files
from sparkify_etl.inputs import InputFile, Inventory, list_local_dataset, skip_reason
from sparkify_etl.records import classify_log_events, classify_song_records
from sparkify_etl.tables import LOG_SCHEMA, UNUSED_FIELDS


@pytest.mark.parametrize(
    "relative, verdict",
    [
        ("A/B/C/TRA.json", (None, None)),
        ("A/B/C/TRA.JSON", (None, None)),
        ("2018/11/day.json.gz", (None, "gzip")),
        ("2018/11/day.Json.GZ", (None, "gzip")),
        ("2018/11/day.json.bz2", (None, "bzip2")),
        ("2018/11/day.json.deflate", (None, "deflate")),
        ("2018/11/day.json.zst", ("compressed as .zst, which etl.py cannot decode (use .gz, .bz2 or .deflate)", None)),
        ("2018/11/notes.txt", ("not a .json file", None)),
        ("2018/11/day.json.", ("not a .json file", None)),
        ("2018/11/day.json.gz.tmp", ("not a .json file", None)),
        ("_SUCCESS", ("name starts with '_' (hidden or metadata file)", None)),
        ("A/.DS_Store", ("name starts with '.' (hidden or metadata file)", None)),
        (".git/objects/x.json", ("in the folder .git, which starts with '.'", None)),
        ("A/_temporary/0/x.json", ("in the folder _temporary, which starts with '_'", None)),
    ],
)
def test_skip_reason_reads_json_files_in_any_case_and_names_why_others_are_skipped(relative, verdict):
    assert skip_reason(relative) == verdict


def make_files(root: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_local_listing_follows_symlinked_folders_and_files(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    make_files(elsewhere, {"B/C/TRB.json": b"{}", "TRC.json": b"{}"})
    make_files(tmp_path / "in", {"song_data/A/TRA.json": b"{}"})
    os.symlink(elsewhere / "B", tmp_path / "in" / "song_data" / "linked")
    os.symlink(elsewhere / "TRC.json", tmp_path / "in" / "song_data" / "TRC.json")
    os.symlink(tmp_path / "nowhere", tmp_path / "in" / "song_data" / "dangling.json")
    inventory = list_local_dataset(tmp_path / "in", "song_data")
    folder = tmp_path / "in" / "song_data"
    assert sorted(file.path for file in inventory.read) == sorted(
        str(folder / name) for name in ("A/TRA.json", "TRC.json", "linked/C/TRB.json")
    )
    assert inventory.skipped == [(str(folder / "dangling.json"), "a symlink whose target does not exist")]
    assert inventory.found == 4


def test_a_symlink_loop_in_the_input_is_a_clear_error(tmp_path):
    make_files(tmp_path / "in", {"song_data/A/TRA.json": b"{}"})
    os.symlink(tmp_path / "in" / "song_data", tmp_path / "in" / "song_data" / "A" / "back")
    with pytest.raises(
        EtlError,
        match=r"The input has a symlink loop: .*/song_data/A/back leads back to a "
        r"folder that contains it",
    ):
        list_local_dataset(tmp_path / "in", "song_data")


def test_fetch_files_decodes_by_extension_and_drops_a_byte_order_mark(tmp_path):
    text = b'{"a": 1}\n{"a": 2}'
    make_files(
        tmp_path,
        {
            "plain.json": b"\xef\xbb\xbf" + text,
            "g.json.gz": gzip.compress(text),
            "b.json.bz2": bz2.compress(text),
            "d.json.deflate": zlib.compress(text),
            "bad.json.gz": text,
        },
    )
    files = [
        (str(tmp_path / name), codec)
        for name, codec in (
            ("plain.json", None),
            ("g.json.gz", "gzip"),
            ("b.json.bz2", "bzip2"),
            ("d.json.deflate", "deflate"),
            ("bad.json.gz", "gzip"),
        )
    ]
    fetched = {
        Path(path).name: (bytes(data) if data is not None else None, error)
        for path, data, error, unreadable in fetch_files(files, None)
        if unreadable is None
    }
    assert fetched == {
        "plain.json": (text, None),
        "g.json.gz": (text, None),
        "b.json.bz2": (text, None),
        "d.json.deflate": (text, None),
        "bad.json.gz": (None, "the file cannot be decompressed as gzip"),
    }


def test_a_file_that_cannot_be_read_is_reported_as_data_naming_it(tmp_path):
    (tmp_path / "here.json").write_bytes(b'{"x": 1}')
    fetched = list(fetch_files([(str(tmp_path / "gone.json"), None), (str(tmp_path / "here.json"), None)], None))
    assert [(Path(path).name, error) for path, _, error, _ in fetched] == [("gone.json", None), ("here.json", None)]
    gone, here = fetched
    assert gone[1] is None and "No such file or directory" in gone[3]
    assert bytes(here[1]) == b'{"x": 1}' and here[3] is None


def test_load_and_classify_fails_with_the_typed_error_naming_the_unreadable_file(spark, tmp_path):
    make_files(tmp_path, {"a.json": b'{"song_id": "SOA", "artist_id": "ARA"}'})
    files = [InputFile(str(tmp_path / "a.json"), 40), InputFile(str(tmp_path / "vanished.json"), 40)]
    inventory = Inventory("song_data", str(tmp_path), files)
    with pytest.raises(
        InputReadError, match=rf"Cannot read the input file {tmp_path}/vanished.json: .*No such file"
    ) as failure:
        load_and_classify(spark, inventory, None, classify_song_records)
    assert failure.value.path == str(tmp_path / "vanished.json")


def test_read_lines_gives_every_line_its_file_and_counts_empty_files(spark, tmp_path):
    make_files(
        tmp_path,
        {"a.json": b'{"x": 1}\r\n\n  \n{"x": 2}', "empty.json": b"", "one.json": b'{"x": 3}', "z.json.gz": b"not gzip"},
    )
    files = [
        InputFile(str(tmp_path / name), 1, codec)
        for name, codec in (("a.json", None), ("empty.json", None), ("one.json", None), ("z.json.gz", "gzip"))
    ]
    rows = sorted(
        (Path(r.source_file).name, r.line, r.error, r.first, r.is_record)
        for r in read_lines(spark, files, None).collect()
    )
    assert rows == [
        ("a.json", '{"x": 1}', None, True, True),
        ("a.json", '{"x": 2}', None, False, True),
        ("empty.json", "", None, True, False),
        ("one.json", '{"x": 3}', None, True, True),
        ("z.json.gz", None, "the file cannot be decompressed as gzip", True, True),
    ]


def test_balanced_batches_spread_bytes_and_keep_every_file_once():
    files = [InputFile(f"/f{index}", size) for index, size in enumerate([10_000_000, 5_000_000, *[300] * 1000])]
    batches = balanced_batches(files, 4)
    assert sorted(file.path for batch in batches for file in batch) == sorted(file.path for file in files)
    assert len(batches) == 4
    loads = [sum(max(file.size, 4096) for file in batch) for batch in batches]
    assert max(loads) == 10_000_000  # the biggest file alone; the small ones spread over the rest
    assert balanced_batches(files[:2], 8) == [[files[0]], [files[1]]]


def test_load_and_classify_counts_files_and_records_and_keeps_unused_fields_out(spark, tmp_path):
    lines = [
        '{"ts": 1541105830796, "userId": "39", "page": "Home", "auth": "Logged In", "status": 200}',
        '{"ts": 1541105830797, "userId": "39", "page": "Home", "auth": "Logged In", "status": "OK"}',
    ]
    make_files(
        tmp_path / "in", {"log_data/2018-11-01-events.json": "\n".join(lines).encode(), "log_data/empty.json": b""}
    )
    inventory = list_local_dataset(tmp_path / "in", "log_data")
    batch = load_and_classify(spark, inventory, None, classify_log_events)
    kept = [name for name in LOG_SCHEMA.fieldNames() if name not in UNUSED_FIELDS["log_data"]]
    assert batch.accepted_records.columns == ["source_file", *kept, "user_id"]
    assert [row.ts for row in batch.accepted_records.collect()] == [1541105830796]
    # The wrong type is in a field no table uses: still rejected, with the line as read.
    assert [(row.reject_reason, row.record) for row in batch.rejected_records.collect()] == [
        ("status is not a 32-bit integer", lines[1])
    ]
    assert (batch.files_parsed, batch.records, batch.accepted, batch.rejects) == (
        2,
        2,
        1,
        {"status is not a 32-bit integer": 1},
    )
