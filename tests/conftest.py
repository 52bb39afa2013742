"""Shared fixtures: one local SparkSession for the whole run, generated datasets, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import datagen  # noqa: E402

# The machine clock of every JVM and Python process in the tests runs in a zone far
# from UTC, so a time part that leaks the local zone shows up as a wrong hour or day.
NON_UTC_ZONE = "America/Los_Angeles"


@pytest.fixture(scope="session")
def spark() -> SparkSession:
    session = (
        SparkSession.builder.master("local[2]")
        .appName("sparkify-etl-tests")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.extraJavaOptions", f"-Duser.timezone={NON_UTC_ZONE}")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def quirky_dataset(tmp_path_factory) -> Path:
    """A small generated dataset with every quirk of SPEC section 1 and corrupt records."""
    root = tmp_path_factory.mktemp("quirky-input")
    datagen.generate(root, datagen.Scale(songs=400, days=5, events_per_day=150), seed=7, corrupt=True)
    return root


def run_etl(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python etl.py ARGS`` as a user would, with the machine clock off UTC."""
    environment = {**os.environ, "TZ": NON_UTC_ZONE, **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "etl.py"), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=900)
