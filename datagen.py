"""Deterministic generator of Sparkify-shaped input data, at any scale.

Writes ``ROOT/song_data/A/B/C/TR....json`` (one JSON object per file, no trailing
newline) and ``ROOT/log_data/YYYY/MM/YYYY-MM-DD-events.json`` (newline-delimited
events, ``\\/``-escaped slashes, no trailing newline) with the quirks of the real
datasets described in SPEC.md section 1:

- numeric titles and artist names (``"title":66``), shuffled key order and spacing;
- artists whose name and location are spelled differently across their songs;
- songs that share (title, artist_name, duration), so a play matches several songs;
- logged-out events with ``userId ""`` and null names; users whose level changes;
- events delivered twice; an event in the last second of every UTC day;
- on request (``corrupt=True``) what messy buckets hold: corrupt lines and files, records
  of unusable types or out-of-range values, several JSON values on one line, a user id
  spelled with a leading zero, gzip and bzip2 files, upper-case extensions, an empty
  file, and files that are not input at all (``_SUCCESS``, hidden files, notes).

The same arguments always produce byte-identical files.

    python datagen.py OUT_DIR --songs 15000 --days 30 --events-per-day 270 [--corrupt]
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import random
import string
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

WORDS = [
    "love",
    "night",
    "heart",
    "dream",
    "fire",
    "rain",
    "blue",
    "road",
    "home",
    "summer",
    "light",
    "shadow",
    "river",
    "girl",
    "time",
    "world",
    "dance",
    "gold",
    "moon",
    "city",
    "wild",
    "soul",
    "baby",
    "star",
    "angel",
    "ghost",
    "train",
    "sky",
    "ocean",
    "hello",
    "yesterday",
    "forever",
    "broken",
    "electric",
    "sweet",
    "lonely",
    "midnight",
    "paradise",
]
FIRST_NAMES = [
    "Walter",
    "Kaylee",
    "Lily",
    "Jacob",
    "Layla",
    "Tegan",
    "Chloe",
    "Ryan",
    "Jayden",
    "Aleena",
    "Cienna",
    "Matthew",
    "Kate",
    "Ava",
    "Connar",
    "Sara",
    "Mohammad",
    "Jordan",
    "Harper",
    "Rylan",
    "Anabelle",
    "Lucero",
    "Avery",
    "Kinsley",
]
LAST_NAMES = [
    "Frye",
    "Summers",
    "Koch",
    "Rogers",
    "Griffin",
    "Levine",
    "Cuevas",
    "Smith",
    "Bell",
    "Kirby",
    "Freeman",
    "Jones",
    "Harrell",
    "Robinson",
    "Moreno",
    "Johnson",
    "Rodriguez",
    "Hodges",
    "Barrera",
    "George",
    "Simpson",
    "Reed",
]
CITIES = (
    "San Francisco-Oakland-Hayward, CA",
    "Atlanta-Sandy Springs-Roswell, GA",
    "Portland-South Portland, ME",
    "Chicago-Naperville-Elgin, IL-IN-WI",
    "New York-Newark-Jersey City, NY-NJ-PA",
    "Lansing-East Lansing, MI",
    "Waterloo-Cedar Falls, IA",
    "Tampa-St. Petersburg-Clearwater, FL",
)
USER_AGENTS = (
    '"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_4) AppleWebKit/537.36 (KHTML, like Gecko) '
    'Chrome/36.0.1985.143 Safari/537.36"',
    '"Mozilla/5.0 (Windows NT 6.1; WOW64; rv:31.0) Gecko/20100101 Firefox/31.0"',
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Ubuntu Chromium/36.0",
    '"Mozilla/5.0 (iPhone; CPU iPhone OS 7_1_2 like Mac OS X) AppleWebKit/537.51.2 (KHTML, like '
    'Gecko) Version/7.0 Mobile/11D257 Safari/9537.53"',
)
OTHER_PAGES = (
    "Home",
    "Settings",
    "Help",
    "About",
    "Add to Playlist",
    "Thumbs Up",
    "Thumbs Down",
    "Add Friend",
    "Roll Advert",
    "Error",
    "Logout",
)
ID_ALPHABET = string.ascii_uppercase + string.digits
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Scale:
    """How much data to generate."""

    songs: int = 300
    days: int = 30
    events_per_day: int = 60
    users: int = 0  # 0: derived from events_per_day
    start: date = date(2018, 11, 1)


@dataclass
class Artist:
    artist_id: str
    name: object  # str, or an int for the numeric names real data has
    location: str | None
    latitude: float | None
    longitude: float | None


@dataclass
class User:
    user_id: str
    first_name: str
    last_name: str
    gender: str
    location: str
    user_agent: str
    level: str
    registration: float
    level_change_ms: int | None  # when the level flips, if it does


def _random_id(rng: random.Random, prefix: str) -> str:
    return prefix + "".join(rng.choice(ID_ALPHABET) for _ in range(16))


def _dump(record: dict, rng: random.Random) -> str:
    """One JSON object with shuffled keys and either spacing style, slashes escaped."""
    items = list(record.items())
    rng.shuffle(items)
    separators = (", ", ": ") if rng.random() < 0.5 else (",", ":")
    return json.dumps(dict(items), separators=separators).replace("/", "\\/")


def _artists(rng: random.Random, count: int) -> list[Artist]:
    artists = []
    for index in range(count):
        name: object = " ".join(rng.choice(WORDS).title() for _ in range(rng.randint(1, 3)))
        if index % 97 == 5:
            name = rng.randint(10, 999)  # bands like "311" arrive as JSON numbers
        has_place = rng.random() < 0.35
        artists.append(
            Artist(
                artist_id=_random_id(rng, "AR"),
                name=name,
                location=rng.choice(CITIES) if rng.random() < 0.6 else rng.choice(("", None)),
                latitude=round(rng.uniform(-60, 60), 5) if has_place else None,
                longitude=round(rng.uniform(-150, 150), 5) if has_place else None,
            )
        )
    return artists


def _song_records(rng: random.Random, scale: Scale) -> list[dict]:
    artists = _artists(rng, max(1, int(scale.songs * 0.85)))
    records = []
    for index in range(scale.songs):
        # Most artists have one song; the first few have many, as in the Million Song Dataset.
        artist = artists[index] if index < len(artists) else artists[rng.randrange(max(1, len(artists) // 50))]
        name, location = artist.name, artist.location
        if index >= len(artists) and rng.random() < 0.5:  # another spelling on a later song
            name = f"{name} featuring {rng.choice(FIRST_NAMES)}"
            location = rng.choice((*CITIES, ""))
        title: object = " ".join(rng.choice(WORDS).title() for _ in range(rng.randint(1, 4)))
        if index % 53 == 7:
            title = rng.randint(1, 999)  # numeric titles, as in the real data
        duration = round(rng.uniform(30, 600), 5)
        year = 0 if rng.random() < 0.5 else rng.randint(1955, 2010)
        records.append(
            {
                "num_songs": 1,
                "artist_id": artist.artist_id,
                "artist_latitude": artist.latitude,
                "artist_longitude": artist.longitude,
                "artist_location": location,
                "artist_name": name,
                "song_id": _random_id(rng, "SO"),
                "title": title,
                "duration": duration,
                "year": year,
            }
        )
        if index % 41 == 3:  # a second song with the same (title, artist_name, duration)
            twin = dict(records[-1], song_id=_random_id(rng, "SO"), year=rng.randint(1960, 2010))
            records.append(twin)
    return records[: scale.songs]


def _users(rng: random.Random, scale: Scale) -> list[User]:
    count = scale.users or max(8, min(400, scale.events_per_day // 3 + 5))
    month_ms = scale.days * DAY_MS
    start_ms = _day_start_ms(scale.start)
    users = []
    for number in range(1, count + 1):
        level_change = None
        if number % 12 == 2:  # about 8 % of users upgrade or downgrade during the period
            level_change = start_ms + rng.randrange(DAY_MS, max(DAY_MS + 1, month_ms - DAY_MS))
        users.append(
            User(
                user_id=str(number),
                first_name=rng.choice(FIRST_NAMES),
                last_name=rng.choice(LAST_NAMES),
                gender=rng.choice("MF"),
                location=rng.choice(CITIES),
                user_agent=rng.choice(USER_AGENTS),
                level=rng.choice(("free", "free", "paid")),
                registration=float(start_ms - rng.randrange(DAY_MS, 60 * DAY_MS)),
                level_change_ms=level_change,
            )
        )
    return users


def _day_start_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp() * 1000)


def _level_at(user: User, ts: int) -> str:
    if user.level_change_ms is None or ts < user.level_change_ms:
        return user.level
    return "paid" if user.level == "free" else "free"


def _event(
    user: User | None, session_id: int, item: int, ts: int, page: str, song: dict | None, rng: random.Random
) -> dict:
    logged_in = user is not None
    return {
        "artist": None if song is None else song["artist_name"],
        "auth": "Logged In" if logged_in else "Logged Out",
        "firstName": user.first_name if logged_in else None,
        "gender": user.gender if logged_in else None,
        "itemInSession": item,
        "lastName": user.last_name if logged_in else None,
        "length": None if song is None else song["duration"],
        "level": _level_at(user, ts) if logged_in else rng.choice(("free", "paid")),
        "location": user.location if logged_in else None,
        "method": "PUT" if page in ("NextSong", "Login", "Submit Upgrade") else "GET",
        "page": page,
        "registration": user.registration if logged_in else None,
        "sessionId": session_id,
        "song": None if song is None else song["title"],
        "status": 307 if page in ("Login", "Logout", "Submit Upgrade") else 200,
        "ts": ts,
        "userAgent": user.user_agent if logged_in else None,
        "userId": user.user_id if logged_in else "",
    }


def _play(rng: random.Random, songs: list[dict]) -> dict:
    """The (song, artist, length) of a play: mostly a catalogue song, sometimes an unknown one."""
    if rng.random() < 0.8:
        record = rng.choice(songs)
        return {
            "title": str(record["title"]),
            "artist_name": str(record["artist_name"]),
            "duration": record["duration"],
        }
    return {
        "title": rng.choice(WORDS).title() + " (Live)",
        "artist_name": rng.choice(LAST_NAMES),
        "duration": round(rng.uniform(30, 600), 5),
    }


def _day_events(
    rng: random.Random, day: date, users: list[User], songs: list[dict], per_day: int, first_session: int
) -> tuple[list[dict], int]:
    """Sessions of one UTC day, in time order, the last event in the day's final second."""
    day_ms = _day_start_ms(day)
    events: list[dict] = []
    session_id = first_session
    while len(events) < per_day:
        session_id += 1
        user = None if rng.random() < 0.04 else rng.choice(users)
        length = min(per_day - len(events), rng.randint(1, 25) if user else rng.randint(1, 3))
        ts = day_ms + rng.randrange(0, DAY_MS - 30 * 60_000)
        for item in range(length):
            if user is None:
                page, song = rng.choice(("Home", "Login", "About", "Help")), None
            elif (
                user.level_change_ms is not None and ts >= user.level_change_ms and ts - 300_000 < user.level_change_ms
            ):
                page, song = "Submit Upgrade" if user.level == "free" else "Submit Downgrade", None
            elif rng.random() < 0.84:
                page, song = "NextSong", _play(rng, songs)
            else:
                page, song = rng.choice(OTHER_PAGES), None
            events.append(_event(user, session_id, item, ts, page, song, rng))
            ts += rng.randint(1_000, 60_000)
    # One play in the day's last second: it must stay on this date in every UTC time part.
    session_id += 1
    events.append(
        _event(
            rng.choice(users), session_id, 0, day_ms + DAY_MS - rng.randint(1, 999), "NextSong", _play(rng, songs), rng
        )
    )
    events.sort(key=lambda event: (event["ts"], event["sessionId"], event["itemInSession"]))
    return events, session_id


def _corrupt_log_lines(rng: random.Random, sample: dict, other: dict) -> list[str]:
    """Lines a real pipeline meets: truncated JSON, text where a number belongs, bad ids,
    out-of-range values, two events on one line."""

    def variant(**changes) -> str:
        return _dump(dict(sample, **changes), rng)

    def without(name: str) -> str:
        return _dump({key: value for key, value in sample.items() if key != name}, rng)

    return [
        _dump(sample, rng)[:57],  # truncated
        variant(ts="yesterday"),
        variant(userId="anonymous-7"),
        without("ts"),
        without("page"),
        without("userId"),
        variant(page="NextSong", userId="", firstName=None, lastName=None),
        variant(page="NextSong", sessionId=None),
        "not json at all",
        variant(ts=10**16),  # year 318857: no timestamp holds it
        variant(userId="99999999999"),  # does not fit the int user_id
        variant(status="OK"),  # a wrong type in a field no table uses still rejects the record
        variant(sessionId="abc"),
        _dump(sample, rng) + " " + _dump(other, rng),  # two events on one line
    ]


def _dump_song_files(root: Path, rng: random.Random, songs: list[dict]) -> None:
    """Song files a messy bucket holds beside the good ones."""
    bad = root / "song_data" / "Z" / "Z" / "Z"
    bad.mkdir(parents=True, exist_ok=True)

    def song(**changes) -> dict:
        return dict(songs[rng.randrange(len(songs))], song_id=_random_id(rng, "SO"), **changes)

    (bad / "TRZZZCORRUPTFILE01.json").write_text(_dump(songs[0], rng)[:40])
    (bad / "TRZZZBADDURATION1.json").write_text(_dump(song(duration="long"), rng))
    (bad / "TRZZZBADYEAR00001.json").write_text(_dump(song(year=1.5), rng))
    (bad / "TRZZZNOSONGID0001.json").write_text(_dump(dict(songs[2], song_id=None), rng))
    (bad / "TRZZZNOARTISTID01.json").write_text(_dump(dict(songs[3], artist_id=" "), rng))
    (bad / "TRZZZLONGARTIST01.json").write_text(_dump(song(artist_id="AR" + "X" * 300), rng))
    (bad / "TRZZZTWOSONGS0001.json").write_text(_dump(song(), rng) + _dump(song(), rng))  # one line: rejected whole
    (bad / "TRZZZTWOLINES0001.json").write_text(_dump(song(), rng) + "\n" + _dump(song(), rng))  # two records
    (bad / "TRZZZUPPERCASE001.JSON").write_text(_dump(song(), rng))
    (bad / "TRZZZGZIPPED00001.json.gz").write_bytes(gzip.compress(_dump(song(), rng).encode(), mtime=0))
    (bad / "TRZZZNOTGZIP00001.json.gz").write_text(_dump(song(), rng))  # named .gz, but plain text
    (bad / "TRZZZEMPTY0000001.json").write_text("")
    (bad / "TRZZZNOTES0000001.txt").write_text("not a song")
    (root / "song_data" / "_SUCCESS").write_text("")
    (root / "song_data" / "Z" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")


def _write_log_file(folder: Path, day: date, lines: list[str], offset: int, messy: bool) -> None:
    """One day of events; in a messy bucket some days are compressed or upper-case."""
    text = "\n".join(lines).encode()
    name = f"{day:%Y-%m-%d}-events"
    if messy and offset % 10 == 3:
        (folder / f"{name}.json.gz").write_bytes(gzip.compress(text, mtime=0))
    elif messy and offset % 10 == 5:
        (folder / f"{name}.json.bz2").write_bytes(bz2.compress(text))
    elif messy and offset % 10 == 7:
        (folder / f"{name}.JSON").write_bytes(text)
    else:
        (folder / f"{name}.json").write_bytes(text)


def generate(root: str | Path, scale: Scale = Scale(), seed: int = 42, corrupt: bool = False) -> None:
    """Write song_data/ and log_data/ under ``root``."""
    rng = random.Random(seed)
    root = Path(root)
    songs = _song_records(rng, scale)
    for record in songs:
        # Like the Million Song subset: folders A/<A-Z>/<A-Z>, so about 700 leaf folders.
        track_id = "TRA" + "".join(rng.choice(string.ascii_uppercase) for _ in range(2)) + _random_id(rng, "")[:13]
        folder = root / "song_data" / track_id[2] / track_id[3] / track_id[4]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{track_id}.json").write_text(_dump(record, rng))
    if corrupt:
        _dump_song_files(root, rng, songs)

    users = _users(rng, scale)
    session_id = 0
    resend: list[dict] = []
    for offset in range(scale.days):
        day = scale.start + timedelta(days=offset)
        events, session_id = _day_events(rng, day, users, songs, scale.events_per_day, session_id)
        if corrupt and offset == 1:
            # One user's id spelled with and without a leading zero: still one user.
            user = next(event["userId"] for event in events if event["userId"])
            mine = [index for index, event in enumerate(events) if event["userId"] == user]
            for index in mine[1::2]:
                events[index] = dict(events[index], userId="0" + user)
        lines = [_dump(event, rng) for event in resend]  # late re-deliveries of yesterday's events
        resend = []
        for event in events:
            lines.append(_dump(event, rng))
            if rng.random() < 0.005:
                lines.append(_dump(event, rng))  # delivered twice, back to back
            elif rng.random() < 0.003:
                resend.append(event)  # delivered again in tomorrow's file
        if corrupt and offset % 10 == 0:
            for line in _corrupt_log_lines(rng, events[0], events[-1]):
                lines.insert(rng.randrange(len(lines) + 1), line)
        folder = root / "log_data" / f"{day:%Y}" / f"{day:%m}"
        folder.mkdir(parents=True, exist_ok=True)
        _write_log_file(folder, day, lines, offset, corrupt)
    if corrupt:
        logs = root / "log_data"
        (logs / "_SUCCESS").write_text("")
        (logs / f"{scale.start:%Y}" / ".hidden").mkdir(exist_ok=True)
        (logs / f"{scale.start:%Y}" / ".hidden" / "old-events.json").write_text("{}")
        month = logs / f"{scale.start:%Y}" / f"{scale.start:%m}"
        (month / "README.md").write_text("events of the month\n")
        (month / "archive.json.zst").write_bytes(b"(\xb5/\xfd")
        (month / "broken-events.json.gz").write_bytes(b"this is not gzip data")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder to write song_data/ and log_data/ into")
    parser.add_argument("--songs", type=int, default=Scale.songs, help="number of song files")
    parser.add_argument("--days", type=int, default=Scale.days, help="number of daily log files")
    parser.add_argument("--events-per-day", type=int, default=Scale.events_per_day)
    parser.add_argument("--users", type=int, default=0, help="number of users (0: from events)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--corrupt", action="store_true", help="add corrupt lines, files and records")
    args = parser.parse_args(argv)
    scale = Scale(songs=args.songs, days=args.days, events_per_day=args.events_per_day, users=args.users)
    generate(args.root, scale, seed=args.seed, corrupt=args.corrupt)


if __name__ == "__main__":
    main()
