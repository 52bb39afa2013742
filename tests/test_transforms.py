"""Unit tests of the pure transforms on tiny inline DataFrames holding the edge rows."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pytest
import etl
from conftest import assert_frames_equal

UTC = timezone.utc
NOV_30_LAST_MS = 1543622399999  # 2018-11-30 23:59:59.999 UTC, a Friday: 15:59 the same day in LA


def event(**fields) -> dict:
    """A logged-in NextSong event; keyword arguments override its fields."""
    base = {name: None for name in etl.LOG_SCHEMA.fieldNames()}
    base.update(ts=1541105830796, userId="39", firstName="Walter", lastName="Frye", gender="M",
                level="free", location="San Francisco-Oakland-Hayward, CA", userAgent='"Mozilla/5.0"',
                page="NextSong", song="Hello", artist="Adele", length=295.2, sessionId=38,
                itemInSession=1, auth="Logged In", method="PUT", status=200, registration=1.5e12)
    base.update(fields)
    return base


def song(**fields) -> dict:
    base = {name: None for name in etl.SONG_SCHEMA.fieldNames()}
    base.update(song_id="SOAAAAAAAAAAAAAAAA", title="Hello", artist_id="ARAAAAAAAAAAAAAAAA",
                artist_name="Adele", artist_location="London", duration=295.2, year=2015, num_songs=1)
    base.update(fields)
    return base


def events_df(spark, *events):
    return spark.createDataFrame(list(events), schema=etl.LOG_SCHEMA)


def songs_df(spark, *songs):
    return spark.createDataFrame(list(songs), schema=etl.SONG_SCHEMA)


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
        "user_id int, first_name string, last_name string, gender string, level string")
    assert_frames_equal(etl.users_table(events), expected)


def test_users_table_ignores_logged_out_events(spark):
    events = events_df(
        spark,
        event(userId="", firstName=None, lastName=None, gender=None, page="Home", ts=9000),
        event(userId="3", ts=100, page="Login"),
    )
    assert [row.user_id for row in etl.users_table(events).collect()] == [3]


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
        order = tuple(record[name] for name in etl.USER_EVENT_COLUMNS)
        if record["userId"] not in latest or order > latest[record["userId"]][0]:
            latest[record["userId"]] = (order, record)
    expected = spark.createDataFrame(
        [(int(user), r["firstName"], r["lastName"], r["gender"], r["level"]) for user, (_, r) in latest.items()],
        "user_id int, first_name string, last_name string, gender string, level string")
    assert sorted(r["lastName"] for _, r in latest.values()) == ["B", "F"]
    assert_frames_equal(etl.users_table(events_df(spark, *events)), expected)


# --- songplays ---------------------------------------------------------------

def matches_df(spark, *songs):
    return etl.song_matches(songs_df(spark, *songs))


def test_distinct_plays_keeps_one_copy_of_a_twice_delivered_event(spark):
    play = event(ts=1541105830796, sessionId=38, itemInSession=4)
    events = events_df(spark, play, play, event(ts=1541105830796, sessionId=38, itemInSession=5),
                       event(page="Home", itemInSession=6))
    plays = etl.distinct_plays(events)
    assert sorted(row.item_in_session for row in plays.collect()) == [4, 5]


def redelivered_events() -> list[dict]:
    """Plays delivered once, twice (the same and with differing copies) and three times,
    plus a non-play event sharing a play's key."""
    return [
        event(itemInSession=1),
        event(itemInSession=2), event(itemInSession=2),
        event(itemInSession=3, level="paid", userAgent='"B"'), event(itemInSession=3, level="free", userAgent='"A"'),
        event(itemInSession=4, ts=7), event(itemInSession=4, ts=7, song="Zeta"), event(itemInSession=4, ts=7),
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
    repeated = etl.repeated_plays(etl.next_song_plays(frame))
    assert sorted(tuple(row) for row in repeated.collect()) == [(39, 38, 2, 1541105830796, 2),
                                                               (39, 38, 3, 1541105830796, 2), (39, 38, 4, 7, 3)]
    fast, full = etl.distinct_plays(frame, repeated), etl.distinct_plays(frame)
    assert fast.dtypes == full.dtypes
    assert sorted(tuple(row) for row in fast.collect()) == expected_distinct_plays(events)
    assert_frames_equal(fast, full)


def test_distinct_event_count_subtracts_extra_copies(spark):
    events = redelivered_events()
    plays = etl.next_song_plays(events_df(spark, *events))
    assert etl.distinct_event_count(plays, etl.repeated_plays(plays)) == len(expected_distinct_plays(events)) == 6
    single = etl.next_song_plays(events_df(spark, event()))
    assert etl.distinct_event_count(single, etl.repeated_plays(single)) == 1


def test_songplays_table_picks_smallest_song_id_when_several_songs_match(spark):
    matches = matches_df(
        spark,
        song(song_id="SOZZZZZZZZZZZZZZZZ", artist_id="ARZZZZZZZZZZZZZZZZ"),
        song(song_id="SOBBBBBBBBBBBBBBBB", artist_id="ARBBBBBBBBBBBBBBBB"),
        song(song_id="SOCCCCCCCCCCCCCCCC", artist_id="ARCCCCCCCCCCCCCCCC", duration=100.0),
    )
    plays = etl.distinct_plays(events_df(spark, event()))
    row, = etl.songplays_table(plays, matches).collect()
    assert (row.song_id, row.artist_id) == ("SOBBBBBBBBBBBBBBBB", "ARBBBBBBBBBBBBBBBB")


def test_songplays_table_keeps_unmatched_play_with_null_song_and_artist(spark):
    matches = matches_df(spark, song())
    plays = etl.distinct_plays(events_df(
        spark,
        event(itemInSession=1, song="Hello", artist="Adele", length=295.21),  # duration differs
        event(itemInSession=2, song="Hello", artist="ADELE", length=295.2),  # artist differs
        event(itemInSession=3, song=None, artist=None, length=None),
    ))
    rows = etl.songplays_table(plays, matches).collect()
    assert len(rows) == 3
    assert {(row.song_id, row.artist_id) for row in rows} == {(None, None)}


def test_songplays_table_matches_numeric_title_read_as_text(spark, tmp_path):
    (tmp_path / "TRX.json").write_text(
        '{"song_id": "SO66AAAAAAAAAAAAAA", "title": 66, "artist_id": "ARNNNNNNNNNNNNNNNN", '
        '"artist_name": 311, "duration": 220.3424, "year": 0, "num_songs": 1}')
    songs = etl.accepted_records(etl.classify_song_records(
        etl.read_json_records(spark, str(tmp_path), etl.SONG_SCHEMA)))
    plays = etl.distinct_plays(events_df(spark, event(song="66", artist="311", length=220.3424)))
    row, = etl.songplays_table(plays, etl.song_matches(songs)).collect()
    assert row.song_id == "SO66AAAAAAAAAAAAAA"


def test_songplays_table_has_spec_columns_and_deterministic_id(spark):
    plays = etl.distinct_plays(events_df(spark, event(userId="39", sessionId=38, itemInSession=1,
                                                      ts=NOV_30_LAST_MS)))
    table = etl.songplays_table(plays, matches_df(spark, song()))
    expected_id = hashlib.md5(f"39|38|1|{NOV_30_LAST_MS}".encode()).hexdigest()
    expected = spark.createDataFrame(
        [(expected_id, utc(2018, 11, 30, 23, 59, 59, 999000), 39, "free", "SOAAAAAAAAAAAAAAAA",
          "ARAAAAAAAAAAAAAAAA", 38, "San Francisco-Oakland-Hayward, CA", '"Mozilla/5.0"', 2018, 11)],
        "songplay_id string, start_time timestamp, user_id int, level string, song_id string, "
        "artist_id string, session_id long, location string, user_agent string, year int, month int")
    assert_frames_equal(table, expected)


def test_songplay_id_does_not_depend_on_partitioning(spark):
    events = [event(itemInSession=i, ts=1541105830796 + i) for i in range(50)]
    one = etl.distinct_plays(events_df(spark, *events).coalesce(1))
    many = etl.distinct_plays(events_df(spark, *reversed(events)).repartition(7))
    matches = matches_df(spark, song())
    ids = [sorted(r.songplay_id for r in etl.songplays_table(p, matches).collect()) for p in (one, many)]
    assert ids[0] == ids[1] and len(set(ids[0])) == 50


# --- time --------------------------------------------------------------------

@pytest.mark.parametrize("session_zone", ["UTC", "America/Los_Angeles", "Asia/Kolkata"])
def test_time_table_parts_are_utc_whatever_the_session_time_zone(spark, session_zone):
    songplays = spark.createDataFrame(
        [(utc(2018, 11, 30, 23, 59, 59, 999000),),  # Friday, last millisecond of the day
         (utc(2018, 12, 31, 23, 59, 59, 500000),),  # Monday, ISO week 1 of 2019
         (utc(2018, 11, 4, 0, 0, 0),),  # Sunday, first instant of the day
         (utc(2018, 11, 4, 0, 0, 0),)],  # the same start_time twice: one row
        "start_time timestamp")
    expected = spark.createDataFrame(
        [(utc(2018, 11, 30, 23, 59, 59, 999000), 23, 30, 48, 11, 2018, 5),
         (utc(2018, 12, 31, 23, 59, 59, 500000), 23, 31, 1, 12, 2018, 1),
         (utc(2018, 11, 4, 0, 0, 0), 0, 4, 44, 11, 2018, 7)],
        "start_time timestamp, hour int, day int, week int, month int, year int, weekday int")
    previous = spark.conf.get("spark.sql.session.timeZone")
    spark.conf.set("spark.sql.session.timeZone", session_zone)
    try:
        assert_frames_equal(etl.time_table(songplays), expected)
    finally:
        spark.conf.set("spark.sql.session.timeZone", previous)


# --- songs and artists -------------------------------------------------------

def test_songs_table_has_one_row_per_song_id(spark):
    songs = songs_df(spark, song(), song(title="Hello (remaster)"),
                     song(song_id="SOBBBBBBBBBBBBBBBB", title="66", year=0))
    expected = spark.createDataFrame(
        [("SOAAAAAAAAAAAAAAAA", "Hello", "ARAAAAAAAAAAAAAAAA", 2015, 295.2),
         ("SOBBBBBBBBBBBBBBBB", "66", "ARAAAAAAAAAAAAAAAA", 0, 295.2)],
        "song_id string, title string, artist_id string, year int, duration double")
    assert_frames_equal(etl.songs_table(songs), expected)


def test_artists_table_takes_every_column_from_one_record(spark):
    songs = songs_df(
        spark,
        # The smallest song_id has a name but no location or coordinates.
        song(song_id="SOA", artist_id="AR1", artist_name="Prince", artist_location="",
             artist_latitude=None, artist_longitude=None),
        # Two complete records with different spellings: the smaller song_id wins whole.
        song(song_id="SOC", artist_id="AR1", artist_name="Prince & The Revolution",
             artist_location="Minneapolis, MN", artist_latitude=44.97, artist_longitude=-93.26),
        song(song_id="SOB", artist_id="AR1", artist_name="Prince and the New Power Generation",
             artist_location="Minnesota", artist_latitude=46.0, artist_longitude=-94.0),
        song(song_id="SOD", artist_id="AR2", artist_name="311", artist_location=None),
    )
    expected = spark.createDataFrame(
        [("AR1", "Prince and the New Power Generation", "Minnesota", 46.0, -94.0),
         ("AR2", "311", None, None, None)],
        "artist_id string, name string, location string, latitude double, longitude double")
    assert_frames_equal(etl.artists_table(songs), expected)


# --- reading and quarantine ----------------------------------------------------

def test_read_and_classify_log_events_quarantines_each_unusable_record(spark, tmp_path):
    lines = [
        '{"ts": 1541105830796, "userId": "39", "page": "NextSong", "sessionId": 1, "itemInSession": 0}',
        '{"ts": 1541105830797, "userId": "", "page": "Home", "sessionId": 2, "itemInSession": 0}',
        '{"ts": 1541105830',
        '{"ts": "yesterday", "userId": "39", "page": "Home"}',
        '{"ts": 1541105830798, "userId": "guest-7", "page": "Home"}',
        '{"userId": "39", "page": "Home"}',
        '{"ts": 1541105830799, "userId": "", "page": "NextSong", "sessionId": 3, "itemInSession": 0}',
        '[1, 2]',
    ]
    (tmp_path / "2018-11-01-events.json").write_text("\n".join(lines))
    classified = etl.classify_log_events(etl.read_json_records(spark, str(tmp_path), etl.LOG_SCHEMA))
    accepted = etl.accepted_records(classified)
    rejected = etl.quarantine_records(classified)

    assert sorted(row.ts for row in accepted.collect()) == [1541105830796, 1541105830797]
    assert accepted.columns == etl.LOG_SCHEMA.fieldNames() + ["source_file"]
    quarantined = sorted((row.reject_reason, row.record) for row in rejected.collect())
    assert [reason for reason, _ in quarantined] == sorted([
        "malformed JSON", "a field has the wrong type", "userId is not a number", "missing ts",
        "NextSong event without a userId", "malformed JSON"])
    assert ("malformed JSON", '{"ts": 1541105830') in quarantined
    assert ("a field has the wrong type", lines[3]) in quarantined
    assert {row.source_file.rsplit("/", 1)[-1] for row in rejected.collect()} == {"2018-11-01-events.json"}


def test_read_json_records_lists_nested_folders_and_reads_numbers_as_text(spark, tmp_path):
    nested = tmp_path / "A" / "B" / "C"
    nested.mkdir(parents=True)
    (nested / "TRABC.json").write_text('{"song_id":"SO1","title":66,"artist_id":"AR1","artist_name":311}')
    (tmp_path / "notes.txt").write_text("not a song")
    records = etl.read_json_records(spark, str(tmp_path), etl.SONG_SCHEMA).collect()
    assert [(r.song_id, r.title, r.artist_name, r._corrupt_record) for r in records] == [
        ("SO1", "66", "311", None)]


def test_load_and_classify_fails_clearly_when_no_record_is_usable(spark, tmp_path):
    (tmp_path / "song_data").mkdir()
    (tmp_path / "song_data" / "TRA.json").write_text("{not json")
    with pytest.raises(etl.EtlError, match=r"No usable records in .*song_data \(1 rejected"):
        etl.load_and_classify(spark, tmp_path.as_uri(), "song_data", etl.SONG_SCHEMA,
                              etl.classify_song_records)


def test_load_and_classify_keeps_unused_fields_only_in_the_quarantined_text(spark, tmp_path):
    (tmp_path / "log_data").mkdir()
    lines = [
        '{"ts": 1541105830796, "userId": "39", "page": "Home", "auth": "Logged In", "status": 200}',
        '{"ts": 1541105830797, "userId": "39", "page": "Home", "auth": "Logged In", "status": "OK"}',
    ]
    (tmp_path / "log_data" / "2018-11-01-events.json").write_text("\n".join(lines))
    batch = etl.load_and_classify(spark, tmp_path.as_uri(), "log_data", etl.LOG_SCHEMA,
                                  etl.classify_log_events, etl.LOG_FIELDS_NO_TABLE_USES)

    kept = [name for name in etl.LOG_SCHEMA.fieldNames() if name not in etl.LOG_FIELDS_NO_TABLE_USES]
    assert batch.accepted_records.columns == kept + ["source_file"]
    assert [row.ts for row in batch.accepted_records.collect()] == [1541105830796]
    # The wrong type is in a field no table uses: still rejected, with the line as read.
    assert [(row.reject_reason, row.record) for row in batch.rejected_records.collect()] == [
        ("a field has the wrong type", lines[1])]
    assert (batch.records, batch.accepted, batch.rejects) == (2, 1, {"a field has the wrong type": 1})
