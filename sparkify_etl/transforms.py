"""Transforms: pure functions, DataFrames in, DataFrames out."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from .tables import TIME, USER_STATE


def one_record_per_key(
    frame: DataFrame, key: Sequence[str], order: Sequence[str], columns: Sequence[str], highest: bool = False
) -> DataFrame:
    """One row per ``key``: the ``columns`` of the record whose (``order``, ``columns``) sorts
    first (or last). Picking a whole struct keeps every column from one source record, and
    the full ordering makes the pick the same on every run."""
    pick = F.max if highest else F.min
    picked = frame.groupBy(*key).agg(pick(F.struct(*order, *columns)).alias("picked"))
    return picked.select(*key, *(F.col(f"picked.{column}").alias(column) for column in columns))


def songs_table(songs: DataFrame) -> DataFrame:
    """One row per song_id; a song_id seen twice keeps its smallest record."""
    return one_record_per_key(songs, ["song_id"], [], ["title", "artist_id", "year", "duration"]).select(
        "song_id",
        "title",
        "artist_id",
        F.col("year").cast("int").alias("year"),
        F.col("duration").cast("double").alias("duration"),
    )


def artists_table(songs: DataFrame) -> DataFrame:
    """One row per artist_id, every column from one song record: the most complete, then
    the one with the smallest song_id, so spellings are never mixed and reruns agree."""

    def unknown(column: str) -> Column:
        return F.when(F.col(column).isNull() | (F.col(column).cast("string") == ""), 1).otherwise(0)

    ranked = songs.withColumn(
        "unknown_fields",
        unknown("artist_name") + unknown("artist_location") + unknown("artist_latitude") + unknown("artist_longitude"),
    )
    picked = one_record_per_key(
        ranked,
        ["artist_id"],
        ["unknown_fields", "song_id"],
        ["artist_name", "artist_location", "artist_latitude", "artist_longitude"],
    )
    return picked.select(
        "artist_id",
        F.col("artist_name").alias("name"),
        F.col("artist_location").alias("location"),
        F.col("artist_latitude").cast("double").alias("latitude"),
        F.col("artist_longitude").cast("double").alias("longitude"),
    )


def song_matches(songs: DataFrame) -> DataFrame:
    """For each (title, artist_name, duration): the song with the smallest song_id."""
    return one_record_per_key(songs, ["title", "artist_name", "duration"], [], ["song_id", "artist_id"])


# A user's latest event is the greatest (ts, sessionId, itemInSession); its fields name the user.
USER_EVENT_COLUMNS = ("ts", "sessionId", "itemInSession", "firstName", "lastName", "gender", "level")


def latest_user_events(events: DataFrame) -> DataFrame:
    """Each logged-in user's latest event: its identity and the user's fields then."""
    return one_record_per_key(
        events.where(F.col("user_id").isNotNull()), ["user_id"], [], USER_EVENT_COLUMNS, highest=True
    )


def merge_latest_user_events(previous: DataFrame, latest: DataFrame) -> DataFrame:
    """Latest events from earlier runs and this one: the later event wins, whichever run saw it."""
    return one_record_per_key(
        previous.select(*USER_STATE.schema.fieldNames()).unionByName(latest),
        ["user_id"],
        [],
        USER_EVENT_COLUMNS,
        highest=True,
    )


def users_table(latest: DataFrame) -> DataFrame:
    """One row per logged-in user, named and levelled by their latest event."""
    return latest.select(
        F.col("user_id").cast("int").alias("user_id"),
        F.col("firstName").alias("first_name"),
        F.col("lastName").alias("last_name"),
        "gender",
        "level",
    )


# What identifies a play: an event delivered twice has the same four values.
PLAY_KEY = ("user_id", "session_id", "item_in_session", "ts")
PLAY_COLUMNS = ("level", "song", "artist", "length", "location", "userAgent")


def next_song_plays(events: DataFrame) -> DataFrame:
    """The NextSong events, as plays: their identity and what songplays takes from them."""
    return events.where(F.col("page") == "NextSong").select(
        "user_id",
        F.col("sessionId").alias("session_id"),
        F.col("itemInSession").alias("item_in_session"),
        "ts",
        *PLAY_COLUMNS,
    )


def repeated_plays(plays: DataFrame) -> DataFrame:
    """The play keys that more than one row of ``plays`` has, with their ``copies``."""
    return plays.groupBy(*PLAY_KEY).agg(F.count(F.lit(1)).alias("copies")).where(F.col("copies") > 1)


def distinct_plays(plays: DataFrame, repeated: DataFrame | None = None) -> DataFrame:
    """One row per play; a play delivered twice keeps one copy (the same one every run,
    should two copies ever differ).

    ``repeated``: the ``repeated_plays`` of these plays, when known. Only those are then
    sorted to pick a copy and every other play passes through: re-deliveries are rare,
    and sorting every play was most of the cost of building songplays.
    """
    if repeated is None:
        return one_record_per_key(plays, PLAY_KEY, [], PLAY_COLUMNS)
    # Renamed: both sides come from the same events, and same-named columns would be ambiguous.
    keys = repeated.select(*(F.col(column).alias(f"repeated_{column}") for column in PLAY_KEY))
    same_key = [F.col(column).eqNullSafe(F.col(f"repeated_{column}")) for column in PLAY_KEY]
    once = plays.join(keys, same_key, "left_anti")
    picked = one_record_per_key(plays.join(keys, same_key, "left_semi"), PLAY_KEY, [], PLAY_COLUMNS)
    return once.unionByName(picked)


def utc_calendar(timestamp: Column) -> dict[str, Column]:
    """Hour, day, ISO week, month, year and ISO weekday of an instant, in UTC.

    Computed from epoch seconds and dates, which carry no time zone, so the result is
    the same whatever the session or machine time zone is.
    """
    seconds = timestamp.cast("long")
    day = utc_day(seconds)
    return {
        "hour": F.pmod(F.floor(seconds / 3600), F.lit(24)).cast("int"),
        "day": F.dayofmonth(day),
        "week": F.weekofyear(day),  # ISO-8601: weeks start on Monday
        "weekday": (F.pmod(F.dayofweek(day) + 5, F.lit(7)) + 1).cast("int"),  # Monday 1 .. Sunday 7
        "month": F.month(day),
        "year": F.year(day),
    }


def utc_day(epoch_seconds: Column) -> Column:
    return F.date_from_unix_date(F.floor(epoch_seconds / 86400).cast("int"))


def within_days(day: Column, since: date | None, until: date | None) -> Column:
    """``since`` <= ``day`` < ``until``, an open end where a bound is None."""
    condition = F.lit(True)
    if since is not None:
        condition = condition & (day >= F.lit(since))
    if until is not None:
        condition = condition & (day < F.lit(until))
    return condition


def events_within(events: DataFrame, since: date | None, until: date | None) -> DataFrame:
    """The events of UTC days ``since`` <= day < ``until``."""
    return events.where(within_days(utc_day(F.col("ts") / 1000), since, until))


def replace_window(existing: DataFrame, fresh: DataFrame, since: date | None, until: date | None) -> DataFrame:
    """The rows the (year, month) partitions a load window touches must hold afterwards:
    those already there from outside the window, plus the window's fresh rows. A touched
    partition with no row left is not in the result, and must end up empty."""
    inside = within_days(utc_day(F.col("start_time").cast("long")), since, until)
    return existing.where(~inside).unionByName(fresh.select(*existing.columns))


def months_touched(existing: DataFrame | None, fresh: DataFrame, since: date | None, until: date | None) -> DataFrame:
    """The (year, month) partitions a window replaces: those of its fresh rows and those
    holding earlier rows inside the window."""
    touched = fresh.select("year", "month")
    if existing is not None:
        inside = within_days(utc_day(F.col("start_time").cast("long")), since, until)
        touched = touched.unionByName(existing.where(inside).select("year", "month"))
    return touched.distinct()


def songplay_id(user_id: Column, session_id: Column, item_in_session: Column, ts: Column) -> Column:
    """A deterministic id from the event's identity: the same event gets it on every run."""
    return F.md5(F.concat_ws("|", user_id, session_id, item_in_session, ts))


def songplays_table(plays: DataFrame, matches: DataFrame) -> DataFrame:
    """The fact table: every play, with its song and artist when the catalogue has them."""
    calendar = utc_calendar(F.col("start_time"))
    matched = plays.join(
        F.broadcast(matches),
        on=[plays.song == matches.title, plays.artist == matches.artist_name, plays.length == matches.duration],
        how="left",
    )
    return matched.withColumn("start_time", F.timestamp_millis(F.col("ts"))).select(
        songplay_id(F.col("user_id"), F.col("session_id"), F.col("item_in_session"), F.col("ts")).alias("songplay_id"),
        "start_time",
        F.col("user_id").cast("int").alias("user_id"),
        "level",
        "song_id",
        "artist_id",
        F.col("session_id").cast("long").alias("session_id"),
        "location",
        F.col("userAgent").alias("user_agent"),
        calendar["year"].alias("year"),
        calendar["month"].alias("month"),
    )


def time_table(songplays: DataFrame) -> DataFrame:
    """One row per distinct songplays start_time, with its UTC calendar parts."""
    calendar = utc_calendar(F.col("start_time"))
    return (
        songplays.select("start_time")
        .distinct()
        .select("start_time", *(calendar[part].alias(part) for part in TIME.schema.fieldNames()[1:]))
    )


def months_of_window(since: date | None, until: date | None) -> Column:
    """A filter on (year, month) partition columns keeping the months a window can reach."""
    month = F.col("year") * 12 + F.col("month")
    condition = F.lit(True)
    if since is not None:
        condition = condition & (month >= since.year * 12 + since.month)
    if until is not None:
        last = date.fromordinal(until.toordinal() - 1)
        condition = condition & (month <= last.year * 12 + last.month)
    return condition


def days_without_input(existing: DataFrame, events: DataFrame, since: date | None, until: date | None) -> DataFrame:
    """The UTC days inside a window where songplays has rows but the input has no event at
    all: replacing the window would delete those rows with nothing to say they are gone."""
    inside = within_days(utc_day(F.col("start_time").cast("long")), since, until)
    stored = existing.where(inside).select(utc_day(F.col("start_time").cast("long")).alias("day")).distinct()
    delivered = events.select(utc_day(F.col("ts") / 1000).alias("day")).distinct()
    return stored.join(delivered, "day", "left_anti")


def window_changes(existing: DataFrame, fresh: DataFrame, since: date | None, until: date | None) -> DataFrame:
    """Per (year, month): how many songplays rows a window removes (stored, not in the
    window's plays) and adds (in the window's plays, not stored)."""
    inside = within_days(utc_day(F.col("start_time").cast("long")), since, until)
    stored = existing.where(inside).select("songplay_id", "year", "month", F.lit(1).alias("stored"))
    loaded = fresh.select("songplay_id", "year", "month", F.lit(1).alias("loaded"))
    both = stored.join(loaded, ["songplay_id", "year", "month"], "full_outer")
    return both.groupBy("year", "month").agg(
        F.count(F.when(F.col("loaded").isNull(), 1)).alias("removed"),
        F.count(F.when(F.col("stored").isNull(), 1)).alias("added"),
    )
