"""Analysts query the lake by name: --catalog registers the tables in the session's
metastore (a later Spark session sees them), --print-ddl athena prints statements that
parse, and the queries in sql/ answer the team's questions, checked against an
independent computation from the oracle."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from datetime import date
from pathlib import Path

import pytest

import etl
from conftest import BAD_DATA_ALLOWED, NON_UTC_ZONE, REPO, assert_loaded, run_etl, run_in_session
from oracle import expected_tables
from sparkify_etl.catalog import athena_ddl
from sparkify_etl.errors import EtlError
from sparkify_etl.jars import delta_package, pyspark_version

sys.path.insert(0, str(REPO / "sql"))
import run_queries

TABLES = ("songplays", "users", "songs", "artists", "time")


# --- Athena DDL ---------------------------------------------------------------------


def statements(ddl: str) -> list[str]:
    return [statement.strip().rstrip(";") for statement in ddl.split(";\n") if statement.strip()]


def test_athena_ddl_parses_under_sparks_hive_dialect(spark, capsys):
    assert etl.main(["--print-ddl", "athena", "--output", "s3a://lake/star"]) == 0
    printed = capsys.readouterr().out
    parser = spark._jsparkSession.sessionState().sqlParser()
    parsed = [parser.parsePlan(statement) for statement in statements(printed)]
    assert len(parsed) == 6
    assert "s3a://" not in printed and "LOCATION 's3://lake/star/songplays/'" in printed


def test_athena_ddl_for_delta_tables_names_them_delta(capsys):
    """Athena's own syntax for Delta tables (its table_type property is not Spark's)."""
    assert etl.main(["--print-ddl", "athena", "--output", "s3://lake/star", "--format", "delta"]) == 0
    printed = statements(capsys.readouterr().out)
    assert printed == [
        f"CREATE EXTERNAL TABLE IF NOT EXISTS {table}\nLOCATION 's3://lake/star/{table}/'\n"
        "TBLPROPERTIES ('table_type' = 'DELTA')"
        for table in TABLES
    ]


def test_athena_ddl_projects_months_and_repairs_songs():
    ddl = athena_ddl("s3://lake/star", "parquet")
    songplays, users, songs, repair, artists, time_table = statements(ddl)
    for table in (songplays, time_table):
        assert "PARTITIONED BY (`year` INT, `month` INT)" in table
        assert "'projection.enabled' = 'true'" in table
        assert re.search(
            r"'storage.location.template' = 's3://lake/star/\w+/year=\$\{year\}/month=\$\{month\}/'", table
        )
    assert "PARTITIONED BY (`year` INT, `artist_id` STRING)" in songs and "projection" not in songs
    assert repair == "MSCK REPAIR TABLE songs"
    assert "`start_time` TIMESTAMP" in songplays and "`session_id` BIGINT" in songplays
    assert "PARTITIONED" not in users + artists


# --- the team's questions -------------------------------------------------------------


@pytest.fixture(scope="module")
def queried_lake(spark, quirky_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("queried") / "lake"
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_in_session(spark, "--input", str(quirky_dataset), "--output", str(output), *BAD_DATA_ALLOWED) == 0
    run_queries.use_lake(spark, str(output), "parquet")
    return {name: [tuple(row) for row in frame.collect()] for name, frame in run_queries.run(spark).items()}


def expected_answers(dataset: Path) -> dict[str, list[tuple]]:
    """Each question answered in plain Python from the oracle's tables."""
    tables, _, _ = expected_tables(dataset)
    plays = list(tables["songplays"].elements())
    songs = {row[0]: row for row in tables["songs"]}
    artists = {row[0]: row for row in tables["artists"]}
    users = {row[0]: row for row in tables["users"]}
    hours = {row[0]: row for row in tables["time"]}

    def top(counts: Counter, key) -> list[tuple]:
        return sorted(counts.items(), key=key)[:10]

    song_plays = Counter(p[4] for p in plays if p[4] is not None)
    top_songs = [(songs[s][1], artists[songs[s][2]][1], n) for s, n in song_plays.items()]
    top_songs = sorted(top_songs, key=lambda r: (-r[2], r[0], r[1]))[:10]
    artist_plays = Counter(p[5] for p in plays if p[5] is not None)
    top_artists = sorted(((artists[a][1], n) for a, n in artist_plays.items()), key=lambda r: (-r[1], r[0]))[:10]
    by_hour = sorted(Counter(hours[p[1]][1] for p in plays).items())
    by_weekday = sorted(Counter(hours[p[1]][6] for p in plays).items())
    levels = Counter(p[3] for p in plays)
    free_paid = [(level, n, round(100 * n / len(plays), 1)) for level, n in sorted(levels.items())]
    active = Counter(p[2] for p in plays)
    most_active = [
        (u, users[u][1], users[u][2], users[u][4], n) for u, n in top(active, key=lambda item: (-item[1], item[0]))
    ]
    played = {p[4] for p in plays}
    never = [(len(songs), sum(song not in played for song in songs))]
    matched = sum(p[4] is not None for p in plays)
    matched_share = [(len(plays), matched, round(100 * matched / len(plays), 1))]
    return {
        "top_songs": top_songs,
        "top_artists": top_artists,
        "plays_by_hour": by_hour,
        "plays_by_weekday": by_weekday,
        "free_vs_paid": free_paid,
        "most_active_users": most_active,
        "songs_never_played": never,
        "matched_plays": matched_share,
    }


def normalised(rows: list[tuple]) -> list[tuple]:
    return [tuple(float(value) if hasattr(value, "as_tuple") else value for value in row) for row in rows]


@pytest.mark.slow
def test_every_query_answers_its_question_as_the_oracle_does(quirky_dataset, queried_lake):
    expected = expected_answers(quirky_dataset)
    assert set(queried_lake) == set(expected) == set(run_queries.queries())
    for name, rows in queried_lake.items():
        assert normalised(rows) == expected[name], name


@pytest.mark.slow
def test_the_readme_shows_the_queries_results_on_the_shipped_sample(spark, tmp_path):
    """The results in README.md come from running sql/ on a load of the sample."""
    output = tmp_path / "lake"
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_in_session(spark, "--input", str(REPO / "data" / "sample"), "--output", str(output)) == 0
    run_queries.use_lake(spark, str(output), "parquet")
    shown = "\n\n".join(run_queries.markdown(name, frame) for name, frame in run_queries.run(spark).items())
    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- query results: begin -->\n", 1)[1].split("\n<!-- query results: end -->", 1)[0]
    assert section.strip() == shown.strip()
    assert (REPO / "docs" / "plays_by_hour.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "docs/plays_by_hour.png" in readme


# --- registration in a metastore --------------------------------------------------------

LATER_SESSION = """
import json, sys
from pyspark.sql import SparkSession
database, packages = sys.argv[1], sys.argv[2]
builder = SparkSession.builder.master("local[1]").enableHiveSupport()
if packages:
    builder = (builder.config("spark.jars.packages", packages)
               .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
               .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog"))
spark = builder.getOrCreate()
tables = sorted(row.tableName for row in spark.sql(f"SHOW TABLES IN {database}").collect())
counts = {table: spark.sql(f"SELECT COUNT(*) FROM {database}.{table}").first()[0] for table in tables}
partitions = spark.sql(f"SHOW PARTITIONS {database}.songplays").count() if not packages else None
print(json.dumps({"tables": tables, "counts": counts, "songplays_partitions": partitions}))
"""


def later_session(cwd: Path, database: str, packages: str = "") -> dict:
    """A new Spark session started afterwards in the same folder, as `pyspark` would be."""
    result = subprocess.run(
        [sys.executable, "-c", LATER_SESSION, database, packages],
        cwd=cwd,
        env={**os.environ, "TZ": NON_UTC_ZONE},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def rows_of(dataset: Path) -> dict[str, int]:
    return {table: sum(rows.values()) for table, rows in expected_tables(dataset)[0].items()}


@pytest.mark.slow
def test_registered_tables_are_queried_by_name_from_a_later_session(two_month_input, tmp_path):
    cwd = tmp_path / "analyst"
    cwd.mkdir()
    lake = tmp_path / "lake"
    flags = ("--input", str(two_month_input), "--output", str(lake), "--catalog", "sparkify")
    for _ in range(2):  # registering twice leaves one definition per table
        assert_loaded(run_etl(*flags, "--until", "2018-12-01", cwd=cwd))
    found = later_session(cwd, "sparkify")
    november = rows_of_window(two_month_input, until="2018-12-01")
    assert found["tables"] == sorted(TABLES)
    assert found["counts"] == november
    assert found["songplays_partitions"] == 1

    assert_loaded(run_etl(*flags, "--since", "2018-12-01", cwd=cwd))
    found = later_session(cwd, "sparkify")
    assert found["counts"] == rows_of(two_month_input)
    assert found["songplays_partitions"] == 2, "the incremental load's new month was not registered"
    assert sorted(os.listdir(cwd)) == ["derby.log", "metastore_db", "spark-warehouse"]  # as pyspark leaves them


@pytest.mark.slow
def test_delta_tables_are_registered_as_delta(two_month_input, tmp_path):
    flags = ("--input", str(two_month_input), "--output", str(tmp_path / "lake"), "--format", "delta")
    try:
        package = delta_package(pyspark_version())
    except EtlError:
        result = run_etl(*flags, "--catalog", "sparkify", cwd=tmp_path)
        assert result.returncode == 1 and "--format delta needs Delta Lake" in result.stderr
        return
    assert_loaded(run_etl(*flags, "--catalog", "sparkify", cwd=tmp_path))
    found = later_session(tmp_path, "sparkify", package)
    assert found["counts"] == rows_of(two_month_input)


def rows_of_window(dataset: Path, until: str) -> dict[str, int]:
    from datetime import date, datetime, timezone

    from oracle import read_inputs, tables_from

    songs, logs = read_inputs(dataset)
    end = date.fromisoformat(until)
    window = [e for e in logs.records if datetime.fromtimestamp(e["ts"] / 1000, timezone.utc).date() < end]
    return {table: sum(rows.values()) for table, rows in tables_from(songs, window).items()}


@pytest.fixture(scope="module")
def two_month_input(tmp_path_factory) -> Path:
    import datagen

    root = tmp_path_factory.mktemp("catalog-input")
    datagen.generate(root, datagen.Scale(songs=100, days=30, events_per_day=30, start=date(2018, 11, 16)), seed=4)
    return root
