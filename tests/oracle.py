"""An independent plain-Python model of SPEC.md: input files in, expected tables out.

It shares no code with etl.py: it parses the JSON with the json module, applies the
rules of SPEC sections 1, 2 and 4 directly, and returns each table as a set of tuples
in the column order of SPEC section 2 (start_time as epoch milliseconds).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

SONG_FIELDS = {
    "song_id": str, "title": str, "artist_id": str, "artist_name": str, "artist_location": str,
    "artist_latitude": float, "artist_longitude": float, "duration": float, "year": int,
    "num_songs": int,
}
LOG_FIELDS = {
    "ts": int, "userId": str, "firstName": str, "lastName": str, "gender": str, "level": str,
    "location": str, "userAgent": str, "page": str, "song": str, "artist": str, "length": float,
    "sessionId": int, "itemInSession": int, "auth": str, "method": str, "status": int,
    "registration": float,
}


@dataclass
class Dataset:
    records: list[dict] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)

    def reasons(self) -> Counter:
        return Counter(reason for _, reason in self.rejects)


def _coerce(record: dict, fields: dict) -> dict | None:
    """The record with text fields as text; None if a value has an unusable type."""
    out = {}
    for name, kind in fields.items():
        value = record.get(name)
        if value is None:
            out[name] = None
        elif kind is str:
            out[name] = value if isinstance(value, str) else json.dumps(value)
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
        elif kind is int and isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
        else:
            return None
    return out


def read_dataset(folder: Path, fields: dict, reject_rule) -> Dataset:
    dataset = Dataset()
    for path in sorted(folder.rglob("*.json")):
        for line in path.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                dataset.rejects.append((path.name, "malformed JSON"))
                continue
            if not isinstance(parsed, dict):
                dataset.rejects.append((path.name, "malformed JSON"))
                continue
            record = _coerce(parsed, fields)
            if record is None:
                dataset.rejects.append((path.name, "a field has the wrong type"))
                continue
            reason = reject_rule(record)
            if reason:
                dataset.rejects.append((path.name, reason))
            else:
                dataset.records.append(record)
    return dataset


def song_reject(record: dict) -> str | None:
    if not (record["song_id"] or "").strip():
        return "missing song_id"
    if not (record["artist_id"] or "").strip():
        return "missing artist_id"
    return None


def log_reject(event: dict) -> str | None:
    user = event["userId"]
    if event["ts"] is None:
        return "missing ts"
    if event["page"] is None:
        return "missing page"
    if user is None:
        return "missing userId"
    if user != "" and not (user.isascii() and user.isdigit() and len(user) <= 9):
        return "userId is not a number"
    if event["page"] == "NextSong" and user == "":
        return "NextSong event without a userId"
    if event["page"] == "NextSong" and (event["sessionId"] is None or event["itemInSession"] is None):
        return "NextSong event without sessionId or itemInSession"
    return None


def utc_parts(ts_ms: int) -> tuple[int, int, int, int, int, int]:
    moment = datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc)
    return (moment.hour, moment.day, moment.isocalendar().week, moment.month, moment.year,
            moment.isoweekday())


def expected_tables(root: Path) -> tuple[dict[str, set[tuple]], Dataset, Dataset]:
    """(tables, song dataset, log dataset) for the input under ``root``."""
    songs = read_dataset(root / "song_data", SONG_FIELDS, song_reject)
    logs = read_dataset(root / "log_data", LOG_FIELDS, log_reject)

    by_song_id: dict[str, dict] = {}
    for record in songs.records:
        assert record["song_id"] not in by_song_id, "the oracle expects unique song ids"
        by_song_id[record["song_id"]] = record
    songs_rows = {(r["song_id"], r["title"], r["artist_id"], r["year"], r["duration"])
                  for r in by_song_id.values()}

    def completeness(record: dict) -> int:
        return sum(record[name] not in (None, "") for name in
                   ("artist_name", "artist_location", "artist_latitude", "artist_longitude"))

    chosen: dict[str, dict] = {}
    for record in songs.records:
        best = chosen.get(record["artist_id"])
        if best is None or (-completeness(record), record["song_id"]) < (-completeness(best), best["song_id"]):
            chosen[record["artist_id"]] = record
    artists_rows = {(a, r["artist_name"], r["artist_location"], r["artist_latitude"], r["artist_longitude"])
                    for a, r in chosen.items()}

    latest: dict[str, dict] = {}
    for event in logs.records:
        if event["userId"] == "":
            continue
        key = (event["ts"], event["sessionId"], event["itemInSession"])
        current = latest.get(event["userId"])
        if current is None or key > (current["ts"], current["sessionId"], current["itemInSession"]):
            latest[event["userId"]] = event
    users_rows = {(int(u), e["firstName"], e["lastName"], e["gender"], e["level"]) for u, e in latest.items()}

    matches: dict[tuple, tuple[str, str]] = {}
    for record in songs.records:
        key = (record["title"], record["artist_name"], record["duration"])
        if key not in matches or record["song_id"] < matches[key][0]:
            matches[key] = (record["song_id"], record["artist_id"])

    plays = {}
    for event in logs.records:
        if event["page"] == "NextSong":
            identity = (int(event["userId"]), event["sessionId"], event["itemInSession"], event["ts"])
            plays.setdefault(identity, event)
    songplays_rows = set()
    for (user_id, session_id, item, ts), event in plays.items():
        song_id, artist_id = matches.get((event["song"], event["artist"], event["length"]), (None, None))
        play_id = hashlib.md5(f"{user_id}|{session_id}|{item}|{ts}".encode()).hexdigest()
        _, _, _, month, year, _ = utc_parts(ts)
        songplays_rows.add((play_id, ts, user_id, event["level"], song_id, artist_id, session_id,
                            event["location"], event["userAgent"], year, month))
    time_rows = {(ts, *utc_parts(ts)) for _, _, _, ts in plays}

    tables = {"songplays": songplays_rows, "users": users_rows, "songs": songs_rows,
              "artists": artists_rows, "time": time_rows}
    return tables, songs, logs
