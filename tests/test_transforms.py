"""Unit tests of the pure transforms on tiny inline DataFrames holding the edge rows."""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime, timezone

import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkify_etl.checks import distinct_event_count
from sparkify_etl.extract import parse_records
from sparkify_etl.records import accepted_records, classify_log_events, classify_song_records, quarantine_records
from sparkify_etl.tables import LOG_SCHEMA, SONG_SCHEMA, SONGPLAYS, USER_STATE
from sparkify_etl.transforms import (
    USER_EVENT_COLUMNS,
    artists_table,
    distinct_plays,
    latest_user_events,
    merge_latest_user_events,
    months_of_window,
    months_touched,
    next_song_plays,
    repeated_plays,
    replace_window,
    song_matches,
    songplays_table,
    songs_table,
    time_table,
    users_table,
)
from tables import assert_frames_equal

UTC = timezone.utc
NOV_30_LAST_MS = 1543622399999  # 2018-11-30 23:59:59.999 UTC, a Friday: 15:59 the same day in LA


def event(**fields) -> dict:
    """A logged-in NextSong event; keyword arguments override its fields."""
    base = dict.fromkeys(LOG_SCHEMA.fieldNames())
    base.update(
        ts=1541105830796,
        userId="39",
        firstName="Walter",
        lastName="Frye",
        gender="M",
        level="free",
        location="San Francisco-Oakland-Hayward, CA",
        userAgent='"Mozilla/5.0"',
        page="NextSong",
        song="Hello",
        artist="Adele",
        length=295.2,
        sessionId=38,
        itemInSession=1,
        auth="Logged In",
        method="PUT",
        status=200,
        registration=1.5e12,
    )
    base.update(fields)
    return base


def song(**fields) -> dict:
    base = dict.fromkeys(SONG_SCHEMA.fieldNames())
    base.update(
        song_id="SOAAAAAAAAAAAAAAAA",
        title="Hello",
        artist_id="ARAAAAAAAAAAAAAAAA",
        artist_name="Adele",
        artist_location="London",
        duration=295.2,
        year=2015,
        num_songs=1,
    )
    base.update(fields)
    return base


def events_df(spark, *events):
    """Accepted log events as the transforms get them: with ``user_id``, the integer userId."""
    rows = [{**e, "user_id": int(e["userId"]) if e["userId"] else None} for e in events]
    schema = T.StructType([*LOG_SCHEMA.fields, T.StructField("user_id", T.IntegerType())])
    return spark.createDataFrame(rows, schema=schema)


def users_of(events):
    return users_table(latest_user_events(events))


def plays_of(events, repeated=None):
    return distinct_plays(next_song_plays(events), repeated)


def songs_df(spark, *songs):
    return spark.createDataFrame(list(songs), schema=SONG_SCHEMA)


def utc(*parts) -> datetime:
    return datetime(*parts, tzinfo=UTC)


# --- users -------------------------------------------------------------------


def test_users_table_takes_level_and_name_of_latest_event(spark):
    events = events_df(
        spark,
        event(userId="15", ts=1000, level="free", lastName="Old", page="Home"),
        event(userId="15", ts=3000, level="paid", lastName="New", page="Submit Upgrade"),
        event(userId="15", ts=2000, level="free", lastName="Mid"),
        event(userId="8", ts=500, level="paid", firstName="Kaylee", lastName="Summers", gender="F"),
    )
    expected = spark.createDataFrame(
        [(15, "Walter", "New", "M", "paid"), (8, "Kaylee", "Summers", "F", "paid")],
        "user_id int, first_name string, last_name string, gender string, level string",
    )
    assert_frames_equal(users_of(events), expected)


def test_users_table_ignores_logged_out_events(spark):
    events = events_df(
        spark,
        event(userId="", firstName=None, lastName=None, gender=None, page="Home", ts=9000),
        event(userId="3", ts=100, page="Login"),
    )
    assert [row.user_id for row in users_of(events).collect()] == [3]


def test_users_table_breaks_ties_at_the_latest_ts_by_the_whole_record(spark):
    events = [
        event(userId="15", ts=3000, sessionId=7, itemInSession=1, level="free", lastName="A"),
        event(userId="15", ts=3000, sessionId=7, itemInSession=2, level="paid", lastName="B"),
        event(userId="15", ts=3000, sessionId=6, itemInSession=9, level="paid", lastName="C"),
        event(userId="15", ts=2000, sessionId=9, itemInSession=9, level="free", lastName="D"),
        event(userId="8", ts=500, sessionId=1, itemInSession=0, level="free", lastName="E"),
        event(userId="8", ts=500, sessionId=1, itemInSession=0, level="paid", lastName="F"),
    ]
    # Independently: the greatest (ts, sessionId, itemInSession, firstName, lastName, gender, level).
    latest = {}
    for record in events:
        order = tuple(record[name] for name in USER_EVENT_COLUMNS)
        if record["userId"] not in latest or order > latest[record["userId"]][0]:
            latest[record["userId"]] = (order, record)
    expected = spark.createDataFrame(
        [(int(user), r["firstName"], r["lastName"], r["gender"], r["level"]) for user, (_, r) in latest.items()],
        "user_id int, first_name string, last_name string, gender string, level string",
    )
    assert sorted(r["lastName"] for _, r in latest.values()) == ["B", "F"]
    assert_frames_equal(users_of(events_df(spark, *events)), expected)


# --- songplays ---------------------------------------------------------------


def matches_df(spark, *songs):
    return song_matches(songs_df(spark, *songs))


def test_distinct_plays_keeps_one_copy_of_a_twice_delivered_event(spark):
    play = event(ts=1541105830796, sessionId=38, itemInSession=4)
    events = events_df(
        spark, play, play, event(ts=1541105830796, sessionId=38, itemInSession=5), event(page="Home", itemInSession=6)
    )
    plays = plays_of(events)
    assert sorted(row.item_in_session for row in plays.collect()) == [4, 5]


def redelivered_events() -> list[dict]:
    """Plays delivered once, twice (the same and with differing copies) and three times,
    plus a non-play event sharing a play's key."""
    return [
        event(itemInSession=1),
        event(itemInSession=2),
        event(itemInSession=2),
        event(itemInSession=3, level="paid", userAgent='"B"'),
        event(itemInSession=3, level="free", userAgent='"A"'),
        event(itemInSession=4, ts=7),
        event(itemInSession=4, ts=7, song="Zeta"),
        event(itemInSession=4, ts=7),
        event(itemInSession=4, ts=8),
        event(itemInSession=1, page="Home"),
        event(userId="40", itemInSession=1),
    ]


def expected_distinct_plays(events: list[dict]) -> list[tuple]:
    """Computed in Python: per (user, session, item, ts) key, the copy whose other fields sort first."""
    columns = ("level", "song", "artist", "length", "location", "userAgent")
    copies: dict[tuple, list[tuple]] = {}
    for e in events:
        if e["page"] == "NextSong":
            key = (int(e["userId"]), e["sessionId"], e["itemInSession"], e["ts"])
            copies.setdefault(key, []).append(tuple(e[c] for c in columns))
    return sorted((*key, *min(values)) for key, values in copies.items())


def test_distinct_plays_sorts_only_repeated_plays_and_keeps_the_same_copies(spark):
    events = redelivered_events()
    frame = events_df(spark, *events).repartition(3)
    repeated = repeated_plays(next_song_plays(frame))
    assert sorted(tuple(row) for row in repeated.collect()) == [
        (39, 38, 2, 1541105830796, 2),
        (39, 38, 3, 1541105830796, 2),
        (39, 38, 4, 7, 3),
    ]
    fast, full = plays_of(frame, repeated), plays_of(frame)
    assert fast.dtypes == full.dtypes
    assert sorted(tuple(row) for row in fast.collect()) == expected_distinct_plays(events)
    assert_frames_equal(fast, full)


def test_distinct_event_count_subtracts_extra_copies(spark):
    events = redelivered_events()
    plays = next_song_plays(events_df(spark, *events))
    assert distinct_event_count(plays, repeated_plays(plays)) == len(expected_distinct_plays(events)) == 6
    single = next_song_plays(events_df(spark, event()))
    assert distinct_event_count(single, repeated_plays(single)) == 1


def test_songplays_table_picks_smallest_song_id_when_several_songs_match(spark):
    matches = matches_df(
        spark,
        song(song_id="SOZZZZZZZZZZZZZZZZ", artist_id="ARZZZZZZZZZZZZZZZZ"),
        song(song_id="SOBBBBBBBBBBBBBBBB", artist_id="ARBBBBBBBBBBBBBBBB"),
        song(song_id="SOCCCCCCCCCCCCCCCC", artist_id="ARCCCCCCCCCCCCCCCC", duration=100.0),
    )
    plays = plays_of(events_df(spark, event()))
    (row,) = songplays_table(plays, matches).collect()
    assert (row.song_id, row.artist_id) == ("SOBBBBBBBBBBBBBBBB", "ARBBBBBBBBBBBBBBBB")


def test_songplays_table_keeps_unmatched_play_with_null_song_and_artist(spark):
    matches = matches_df(spark, song())
    plays = plays_of(
        events_df(
            spark,
            event(itemInSession=1, song="Hello", artist="Adele", length=295.21),  # duration differs
            event(itemInSession=2, song="Hello", artist="ADELE", length=295.2),  # artist differs
            event(itemInSession=3, song=None, artist=None, length=None),
        )
    )
    rows = songplays_table(plays, matches).collect()
    assert len(rows) == 3
    assert {(row.song_id, row.artist_id) for row in rows} == {(None, None)}


def test_songplays_table_matches_numeric_title_read_as_text(spark):
    songs = parsed_songs(
        spark,
        '{"song_id": "SO66AAAAAAAAAAAAAA", "title": 66, "artist_id": "ARNNNNNNNNNNNNNNNN", '
        '"artist_name": 311, "duration": 220.3424, "year": 0, "num_songs": 1}',
    )
    plays = plays_of(events_df(spark, event(song="66", artist="311", length=220.3424)))
    (row,) = songplays_table(plays, song_matches(songs)).collect()
    assert row.song_id == "SO66AAAAAAAAAAAAAA"


def test_songplays_table_has_spec_columns_and_deterministic_id(spark):
    plays = plays_of(events_df(spark, event(userId="39", sessionId=38, itemInSession=1, ts=NOV_30_LAST_MS)))
    table = songplays_table(plays, matches_df(spark, song()))
    expected_id = hashlib.md5(f"39|38|1|{NOV_30_LAST_MS}".encode()).hexdigest()
    expected = spark.createDataFrame(
        [
            (
                expected_id,
                utc(2018, 11, 30, 23, 59, 59, 999000),
                39,
                "free",
                "SOAAAAAAAAAAAAAAAA",
                "ARAAAAAAAAAAAAAAAA",
                38,
                "San Francisco-Oakland-Hayward, CA",
                '"Mozilla/5.0"',
                2018,
                11,
            )
        ],
        "songplay_id string, start_time timestamp, user_id int, level string, song_id string, "
        "artist_id string, session_id long, location string, user_agent string, year int, month int",
    )
    assert_frames_equal(table, expected)


def test_songplay_id_does_not_depend_on_partitioning(spark):
    events = [event(itemInSession=i, ts=1541105830796 + i) for i in range(50)]
    one = plays_of(events_df(spark, *events).coalesce(1))
    many = plays_of(events_df(spark, *reversed(events)).repartition(7))
    matches = matches_df(spark, song())
    ids = [sorted(r.songplay_id for r in songplays_table(p, matches).collect()) for p in (one, many)]
    assert ids[0] == ids[1] and len(set(ids[0])) == 50


# --- time --------------------------------------------------------------------


@pytest.mark.parametrize("session_zone", ["UTC", "America/Los_Angeles", "Asia/Kolkata"])
def test_time_table_parts_are_utc_whatever_the_session_time_zone(spark, session_zone):
    songplays = spark.createDataFrame(
        [
            (utc(2018, 11, 30, 23, 59, 59, 999000),),  # Friday, last millisecond of the day
            (utc(2018, 12, 31, 23, 59, 59, 500000),),  # Monday, ISO week 1 of 2019
            (utc(2018, 11, 4, 0, 0, 0),),  # Sunday, first instant of the day
            (utc(2018, 11, 4, 0, 0, 0),),
        ],  # the same start_time twice: one row
        "start_time timestamp",
    )
    expected = spark.createDataFrame(
        [
            (utc(2018, 11, 30, 23, 59, 59, 999000), 23, 30, 48, 11, 2018, 5),
            (utc(2018, 12, 31, 23, 59, 59, 500000), 23, 31, 1, 12, 2018, 1),
            (utc(2018, 11, 4, 0, 0, 0), 0, 4, 44, 11, 2018, 7),
        ],
        "start_time timestamp, hour int, day int, week int, month int, year int, weekday int",
    )
    previous = spark.conf.get("spark.sql.session.timeZone")
    spark.conf.set("spark.sql.session.timeZone", session_zone)
    try:
        assert_frames_equal(time_table(songplays), expected)
    finally:
        spark.conf.set("spark.sql.session.timeZone", previous)


# --- songs and artists -------------------------------------------------------


def test_songs_table_has_one_row_per_song_id(spark):
    songs = songs_df(
        spark, song(), song(title="Hello (remaster)"), song(song_id="SOBBBBBBBBBBBBBBBB", title="66", year=0)
    )
    expected = spark.createDataFrame(
        [
            ("SOAAAAAAAAAAAAAAAA", "Hello", "ARAAAAAAAAAAAAAAAA", 2015, 295.2),
            ("SOBBBBBBBBBBBBBBBB", "66", "ARAAAAAAAAAAAAAAAA", 0, 295.2),
        ],
        "song_id string, title string, artist_id string, year int, duration double",
    )
    assert_frames_equal(songs_table(songs), expected)


def test_artists_table_takes_every_column_from_one_record(spark):
    songs = songs_df(
        spark,
        # The smallest song_id has a name but no location or coordinates.
        song(
            song_id="SOA",
            artist_id="AR1",
            artist_name="Prince",
            artist_location="",
            artist_latitude=None,
            artist_longitude=None,
        ),
        # Two complete records with different spellings: the smaller song_id wins whole.
        song(
            song_id="SOC",
            artist_id="AR1",
            artist_name="Prince & The Revolution",
            artist_location="Minneapolis, MN",
            artist_latitude=44.97,
            artist_longitude=-93.26,
        ),
        song(
            song_id="SOB",
            artist_id="AR1",
            artist_name="Prince and the New Power Generation",
            artist_location="Minnesota",
            artist_latitude=46.0,
            artist_longitude=-94.0,
        ),
        song(song_id="SOD", artist_id="AR2", artist_name="311", artist_location=None),
    )
    expected = spark.createDataFrame(
        [("AR1", "Prince and the New Power Generation", "Minnesota", 46.0, -94.0), ("AR2", "311", None, None, None)],
        "artist_id string, name string, location string, latitude double, longitude double",
    )
    assert_frames_equal(artists_table(songs), expected)


# --- classifying records ---------------------------------------------------------


def lines_df(spark, *lines: str, source: str = "/in/2018-11-01-events.json"):
    """Lines as read_lines yields them: every line a record of one file."""
    rows = [(source, None, line, index == 0, True) for index, line in enumerate(lines)]
    return spark.createDataFrame(
        rows, "source_file string, error string, line string, first boolean, is_record boolean"
    )


def parsed_songs(spark, *lines: str):
    return accepted_records(classify_song_records(parse_records(lines_df(spark, *lines), SONG_SCHEMA)))


def reasons(classified) -> dict[str, str | None]:
    return {
        row.line_text: row.reject_reason
        for row in classified.select(
            F.coalesce("record", F.lit("(accepted)")).alias("line_text"), "reject_reason"
        ).collect()
    }


def classify_logs(spark, *lines: str):
    return classify_log_events(parse_records(lines_df(spark, *lines), LOG_SCHEMA))


def test_classify_log_events_names_the_field_and_the_problem(spark):
    cases = {
        '{"ts": 1541105830796, "userId": "39", "page": "Home"}': None,
        '{"ts": 1541105830': "malformed JSON",
        "[1, 2]": "malformed JSON",
        '{"ts": "yesterday", "userId": "39", "page": "Home"}': "ts is not a 64-bit integer",
        '{"ts": 1541105830796, "userId": "39", "page": "Home", "status": "OK"}': "status is not a 32-bit integer",
        '{"ts": 1541105830796, "userId": "39", "page": "NextSong", "length": "long"}': "length is not a number",
        '{"ts": 1541105830796, "userId": "39", "page": "Home", "sessionId": 1.5}': "sessionId is not a 64-bit integer",
        '{"ts": 1541105830796, "userId": "39", "page": "Home"} {"ts": 1541105830797, "userId": "39", "page": "Home"}': "several JSON values on one line",
        '{"ts": 1541105830796, "userId": "39", "page": "Home"}, 7': "several JSON values on one line",
        '{"ts": 10000000000000000, "userId": "39", "page": "Home"}': "ts is outside the range of a timestamp (years 1 to 9999)",
        '{"ts": -62135596800001, "userId": "39", "page": "Home"}': "ts is outside the range of a timestamp (years 1 to 9999)",
        '{"userId": "39", "page": "Home"}': "missing ts",
        '{"ts": 1541105830796, "userId": "39"}': "missing page",
        '{"ts": 1541105830796, "page": "Home"}': "missing userId",
        '{"ts": 1541105830796, "userId": "guest-7", "page": "Home"}': "userId is not a number",
        '{"ts": 1541105830796, "userId": "2147483648", "page": "Home"}': "userId is too large for a 32-bit user_id",
        '{"ts": 1541105830796, "userId": "", "page": "NextSong", "sessionId": 1, "itemInSession": 0}': "NextSong event without a userId",
        '{"ts": 1541105830796, "userId": "39", "page": "NextSong", "itemInSession": 0}': "NextSong event without sessionId or itemInSession",
    }
    classified = classify_logs(spark, *cases)
    rejected = {line: reason for line, reason in reasons(classified).items() if line != "(accepted)"}
    assert rejected == {line: reason for line, reason in cases.items() if reason}
    (accepted,) = accepted_records(classified).collect()
    assert (accepted.ts, accepted.user_id) == (1541105830796, 39)


def test_a_user_id_is_the_integer_value_of_user_id_whatever_its_spelling(spark):
    classified = classify_logs(
        spark,
        *[
            f'{{"ts": {ts}, "userId": "{user}", "page": "Home"}}'
            for ts, user in ((1, "19"), (2, "019"), (3, "0000000019"), (4, ""))
        ],
    )
    accepted = accepted_records(classified)
    assert sorted((row.ts, row.user_id) for row in accepted.collect()) == [(1, 19), (2, 19), (3, 19), (4, None)]
    assert [row.user_id for row in users_of(accepted).collect()] == [19]


def test_classify_song_records_refuses_partition_values_no_folder_can_hold(spark):
    def song_line(artist_id: str) -> str:
        return json.dumps({"song_id": "SO1", "title": "T", "artist_id": artist_id, "duration": 1.0, "year": 1})

    fits = "AR" + "x" * (255 - len("artist_id=") - 2)  # exactly 255 bytes as a folder name
    escaped = "AR" + "/" * 81  # each / is written as %2F: 10 + 2 + 243 bytes
    cases = {
        song_line(fits): None,
        song_line(fits + "x"): "too long",
        song_line("AR" + "é" * 121): None,
        song_line("AR" + "é" * 122): "too long",
        song_line(escaped): None,
        song_line(escaped + "/"): "too long",
        song_line(" "): "missing artist_id",
    }
    classified = classify_song_records(parse_records(lines_df(spark, *cases), SONG_SCHEMA))
    found = {line: reason for line, reason in reasons(classified).items() if line != "(accepted)"}
    expected = {line: reason for line, reason in cases.items() if reason}
    assert {line: ("too long" if "too long" in reason else reason) for line, reason in found.items()} == expected


def test_a_blank_first_line_counts_its_file_but_no_record(spark):
    rows = [
        ("/in/empty.json", None, "", True, False),
        ("/in/a.json", None, '{"song_id": "S", "artist_id": "A"}', True, True),
    ]
    lines = spark.createDataFrame(
        rows, "source_file string, error string, line string, first boolean, is_record boolean"
    )
    classified = classify_song_records(parse_records(lines, SONG_SCHEMA))
    assert [row.song_id for row in accepted_records(classified).collect()] == ["S"]
    assert quarantine_records(classified).count() == 0


# --- incremental loads: the window and the merge ------------------------------------


def play_row(ts_ms: int, play_id: str) -> tuple:
    moment = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return (play_id, moment, 39, "free", None, None, 1, "here", "ua", moment.year, moment.month)


def songplays_df(spark, *rows):
    return spark.createDataFrame(list(rows), SONGPLAYS.schema)


NOV_25 = 1543104000000  # 2018-11-25 00:00 UTC
DEC_01 = 1543622400000  # 2018-12-01 00:00 UTC
DAY = 86_400_000


def test_replace_window_keeps_rows_outside_the_window_and_takes_the_new_ones_inside(spark):
    existing = songplays_df(
        spark, play_row(NOV_25 - 1, "before"), play_row(NOV_25, "inside-old"), play_row(DEC_01 + DAY, "december-old")
    )
    fresh = songplays_df(spark, play_row(NOV_25 + 5, "inside-new"))
    since, until = date(2018, 11, 25), date(2018, 12, 1)
    kept = replace_window(existing, fresh, since, until)
    assert sorted(row.songplay_id for row in kept.collect()) == ["before", "december-old", "inside-new"]
    touched = months_touched(existing, fresh, since, until)
    assert sorted(tuple(row) for row in touched.collect()) == [(2018, 11)]


def test_a_window_that_removes_every_row_of_a_month_still_touches_that_month(spark):
    existing = songplays_df(spark, play_row(NOV_25, "nov"), play_row(DEC_01 + DAY, "dec"))
    fresh = songplays_df(spark, play_row(NOV_25 + 1, "nov-new"))
    since = date(2018, 11, 20)
    touched = sorted(tuple(row) for row in months_touched(existing, fresh, since, None).collect())
    assert touched == [(2018, 11), (2018, 12)]
    rows = replace_window(existing, fresh, since, None)
    assert {(row.year, row.month) for row in rows.collect()} == {(2018, 11)}  # December is left empty


@pytest.mark.parametrize(
    "since, until, months",
    [
        (date(2018, 11, 25), date(2018, 12, 1), [(2018, 11)]),
        (date(2018, 11, 25), date(2018, 12, 2), [(2018, 11), (2018, 12)]),
        (None, date(2018, 11, 1), [(2018, 10)]),
        (date(2018, 12, 31), None, [(2018, 12), (2019, 1)]),
    ],
)
def test_months_of_window_selects_the_partitions_a_window_can_reach(spark, since, until, months):
    frame = spark.createDataFrame([(2018, 10), (2018, 11), (2018, 12), (2019, 1)], "year int, month int")
    assert sorted(tuple(row) for row in frame.where(months_of_window(since, until)).collect()) == months


def test_merge_latest_user_events_keeps_the_later_event_whichever_run_saw_it(spark):
    columns = USER_STATE.schema
    earlier = spark.createDataFrame(
        [(15, 3000, 1, 1, "A", "Old", "F", "paid"), (8, 100, 1, 1, "K", "S", "F", "free")], columns
    )
    latest = spark.createDataFrame(
        [(15, 2000, 9, 9, "A", "New", "F", "free"), (20, 50, 1, 1, "N", "W", "M", "free")], columns
    )
    merged = merge_latest_user_events(earlier, latest)
    assert sorted((row.user_id, row.lastName, row.level) for row in merged.collect()) == [
        (8, "S", "free"),
        (15, "Old", "paid"),
        (20, "W", "free"),
    ]
