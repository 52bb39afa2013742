"""An independent plain-Python model of the contract README.md states: input files in,
expected tables out.

It shares no code with etl.py: it walks the folders with os.walk, parses each line with
the json module, applies the rules directly, and returns each table as a Counter of
tuples (a multiset: a repeated row counts twice) in the table's column order, with
start_time as epoch milliseconds.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

SONG_FIELDS = {
    "song_id": str,
    "title": str,
    "artist_id": str,
    "artist_name": str,
    "artist_location": str,
    "artist_latitude": float,
    "artist_longitude": float,
    "duration": float,
    "year": "int32",
    "num_songs": "int32",
}
LOG_FIELDS = {
    "ts": "int64",
    "userId": str,
    "firstName": str,
    "lastName": str,
    "gender": str,
    "level": str,
    "location": str,
    "userAgent": str,
    "page": str,
    "song": str,
    "artist": str,
    "length": float,
    "sessionId": "int64",
    "itemInSession": "int64",
    "auth": str,
    "method": str,
    "status": "int32",
    "registration": float,
}
KIND_NAMES = {"int64": "a 64-bit integer", "int32": "a 32-bit integer", float: "a number"}
COMPRESSION = {
    ".gz": ("gzip", gzip.decompress),
    ".gzip": ("gzip", gzip.decompress),
    ".bz2": ("bzip2", bz2.decompress),
    ".deflate": ("deflate", zlib.decompress),
    ".zz": ("deflate", zlib.decompress),
}
MIN_TS, MAX_TS = -62135596800000, 253402300799999  # 0001-01-01 .. 9999-12-31 23:59:59.999 UTC
FOLDER_ESCAPES = set("\"#%'*/:=?\\\x7f{[]^") | {chr(code) for code in range(1, 32)}

COLUMNS = {
    "songplays": (
        "songplay_id",
        "start_time",
        "user_id",
        "level",
        "song_id",
        "artist_id",
        "session_id",
        "location",
        "user_agent",
        "year",
        "month",
    ),
    "users": ("user_id", "first_name", "last_name", "gender", "level"),
    "songs": ("song_id", "title", "artist_id", "year", "duration"),
    "artists": ("artist_id", "name", "location", "latitude", "longitude"),
    "time": ("start_time", "hour", "day", "week", "month", "year", "weekday"),
}


@dataclass
class Dataset:
    records: list[dict] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (file path, reason)
    read: list[str] = field(default_factory=list)  # files read
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file path, reason)

    def reasons(self) -> Counter:
        return Counter(reason for _, reason in self.rejects)


def file_verdict(relative: str) -> tuple[str | None, str | None]:
    """(reason to skip, or None; compression extension) for a path below the dataset folder."""
    *folders, name = relative.split("/")
    for folder in folders:
        if folder[:1] in (".", "_"):
            return f"in the folder {folder}, which starts with '{folder[0]}'", None
    if name[:1] in (".", "_"):
        return f"name starts with '{name[0]}' (hidden or metadata file)", None
    lower = name.lower()
    if lower.endswith(".json"):
        return None, None
    stem, _, extension = lower.rpartition(".")
    if not stem.endswith(".json") or not extension:
        return "not a .json file", None
    if f".{extension}" not in COMPRESSION:
        return f"compressed as .{extension}, which etl.py cannot decode (use .gz, .bz2 or .deflate)", None
    return None, f".{extension}"


def files_of(folder: Path):
    """(path, path below folder) of every file, following symlinked folders."""
    for directory, _, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(directory) / name
            yield str(path), path.relative_to(folder).as_posix()


def convert(value, kind):
    """The value as the table column holds it, or raise ValueError for a wrong type."""
    if value is None:
        return None
    if kind is str:
        if isinstance(value, str):
            return value
        return json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else json.dumps(value)
    if isinstance(value, bool):
        raise ValueError
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    if kind in ("int64", "int32") and isinstance(value, int):
        bits = 63 if kind == "int64" else 31
        if -(2**bits) <= value < 2**bits:
            return value
    raise ValueError


def parse_line(line: str, fields: dict) -> tuple[dict | None, str | None]:
    """(record, None) or (None, reason) for one non-blank line."""
    text = line.strip()
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None, "malformed JSON"
    if not isinstance(value, dict):
        return None, "malformed JSON"
    record = {}
    for name, kind in fields.items():
        try:
            record[name] = convert(value.get(name), kind)
        except ValueError:
            return None, f"{name} is not {KIND_NAMES[kind]}"
    if text[end:].strip():
        return None, "several JSON values on one line"
    return record, None


def read_dataset(folder: Path, fields: dict, rule) -> Dataset:
    dataset = Dataset()
    for path, relative in sorted(files_of(folder)):
        skip, extension = file_verdict(relative)
        if skip:
            dataset.skipped.append((path, skip))
            continue
        dataset.read.append(path)
        data = Path(path).read_bytes()
        if extension:
            codec, decompress = COMPRESSION[extension]
            try:
                data = decompress(data)
            except (OSError, EOFError, ValueError, zlib.error):
                dataset.rejects.append((path, f"the file cannot be decompressed as {codec}"))
                continue
        text = data.decode("utf-8", "replace").removeprefix("\ufeff")
        for line in re.split(r"\r?\n", text):
            if not line.strip():
                continue
            record, reason = parse_line(line, fields)
            reason = reason or rule(record)
            if reason:
                dataset.rejects.append((path, reason))
            else:
                dataset.records.append(record)
    return dataset


def blank(value) -> bool:
    return value is None or value.strip(" ") == ""


def song_rule(record: dict) -> str | None:
    if blank(record["song_id"]):
        return "missing song_id"
    if blank(record["artist_id"]):
        return "missing artist_id"
    value = record["artist_id"]
    if len("artist_id=") + len(value.encode()) + 2 * sum(ch in FOLDER_ESCAPES for ch in value) > 255:
        return "artist_id is too long for a folder name (over 255 bytes as artist_id=...)"
    return None


def log_rule(event: dict) -> str | None:
    user = event["userId"]
    if event["ts"] is None:
        return "missing ts"
    if not MIN_TS <= event["ts"] <= MAX_TS:
        return "ts is outside the range of a timestamp (years 1 to 9999)"
    if event["page"] is None:
        return "missing page"
    if user is None:
        return "missing userId"
    if user != "" and not re.fullmatch(r"[0-9]+", user):
        return "userId is not a number"
    if user != "" and int(user) > 2**31 - 1:
        return "userId is too large for a 32-bit user_id"
    if event["page"] == "NextSong" and user == "":
        return "NextSong event without a userId"
    if event["page"] == "NextSong" and (event["sessionId"] is None or event["itemInSession"] is None):
        return "NextSong event without sessionId or itemInSession"
    return None


def utc_parts(ts_ms: int) -> tuple[int, int, int, int, int, int]:
    """(hour, day, ISO week, month, year, ISO weekday)."""
    moment = datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc)
    return moment.hour, moment.day, moment.isocalendar().week, moment.month, moment.year, moment.isoweekday()


def nulls_first(values: tuple) -> tuple:
    """A sort key that orders None before any value, as Spark orders structs."""
    return tuple((0,) if value is None else (1, value) for value in values)


def read_inputs(root: Path) -> tuple[Dataset, Dataset]:
    return (
        read_dataset(root / "song_data", SONG_FIELDS, song_rule),
        read_dataset(root / "log_data", LOG_FIELDS, log_rule),
    )


def tables_from(songs: Dataset, events: list[dict]) -> dict[str, Counter]:
    """The five tables from accepted song records and accepted log events."""
    by_song_id: dict[str, dict] = {}
    for record in songs.records:
        key = nulls_first((record["title"], record["artist_id"], record["year"], record["duration"]))
        if record["song_id"] not in by_song_id or key < by_song_id[record["song_id"]][0]:
            by_song_id[record["song_id"]] = (key, record)
    songs_rows = Counter((s, r["title"], r["artist_id"], r["year"], r["duration"]) for s, (_, r) in by_song_id.items())

    def unknown(record: dict) -> int:
        return sum(
            record[name] in (None, "")
            for name in ("artist_name", "artist_location", "artist_latitude", "artist_longitude")
        )

    chosen: dict[str, tuple] = {}
    for record in songs.records:
        key = nulls_first(
            (
                unknown(record),
                record["song_id"],
                record["artist_name"],
                record["artist_location"],
                record["artist_latitude"],
                record["artist_longitude"],
            )
        )
        if record["artist_id"] not in chosen or key < chosen[record["artist_id"]][0]:
            chosen[record["artist_id"]] = (key, record)
    artists_rows = Counter(
        (a, r["artist_name"], r["artist_location"], r["artist_latitude"], r["artist_longitude"])
        for a, (_, r) in chosen.items()
    )

    latest: dict[int, tuple] = {}
    for event in events:
        if event["userId"] == "":
            continue
        user = int(event["userId"])
        key = nulls_first(
            tuple(
                event[name] for name in ("ts", "sessionId", "itemInSession", "firstName", "lastName", "gender", "level")
            )
        )
        if user not in latest or key > latest[user][0]:
            latest[user] = (key, event)
    users_rows = Counter((u, e["firstName"], e["lastName"], e["gender"], e["level"]) for u, (_, e) in latest.items())

    matches: dict[tuple, tuple[str, str]] = {}
    for record in songs.records:
        key = (record["title"], record["artist_name"], record["duration"])
        if key not in matches or record["song_id"] < matches[key][0]:
            matches[key] = (record["song_id"], record["artist_id"])

    plays: dict[tuple, tuple] = {}
    for event in events:
        if event["page"] == "NextSong":
            identity = (int(event["userId"]), event["sessionId"], event["itemInSession"], event["ts"])
            copy = nulls_first(
                tuple(event[name] for name in ("level", "song", "artist", "length", "location", "userAgent"))
            )
            if identity not in plays or copy < plays[identity][0]:
                plays[identity] = (copy, event)
    songplays_rows = Counter()
    for (user_id, session_id, item, ts), (_, event) in plays.items():
        song_id, artist_id = matches.get((event["song"], event["artist"], event["length"]), (None, None))
        play_id = hashlib.md5(f"{user_id}|{session_id}|{item}|{ts}".encode()).hexdigest()
        _, _, _, month, year, _ = utc_parts(ts)
        songplays_rows[
            (
                play_id,
                ts,
                user_id,
                event["level"],
                song_id,
                artist_id,
                session_id,
                event["location"],
                event["userAgent"],
                year,
                month,
            )
        ] += 1
    time_rows = Counter((ts, *utc_parts(ts)) for ts in {identity[3] for identity in plays})
    return {
        "songplays": songplays_rows,
        "users": users_rows,
        "songs": songs_rows,
        "artists": artists_rows,
        "time": time_rows,
    }


def expected_tables(root: Path) -> tuple[dict[str, Counter], Dataset, Dataset]:
    """(tables, song dataset, log dataset) of a full load of the input under ``root``."""
    songs, logs = read_inputs(root)
    return tables_from(songs, logs.records), songs, logs
