"""Shared fixtures: one local SparkSession for the whole run, generated datasets, a CLI runner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pyspark.sql import DataFrame, SparkSession

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import datagen  # noqa: E402
import etl  # noqa: E402

# The machine clock of every JVM and Python process in the tests runs in a zone far
# from UTC, so a time part that leaks the local zone shows up as a wrong hour or day.
NON_UTC_ZONE = "America/Los_Angeles"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: minutes of real clusters or repeated full runs; CI's "
                                       "second Spark line deselects them with -m 'not slow'")


@pytest.fixture(scope="session")
def spark() -> SparkSession:
    # With the same S3A connector etl.py adds, so tests can read tables back through s3a.
    jars = [path.name for path in etl.installed_spark_jars().glob("*.jar")]
    session = (
        SparkSession.builder.master("local[2]")
        .appName("sparkify-etl-tests")
        .config("spark.jars.packages", etl.connector_packages(jars, etl.pyspark_version()))
        .config("spark.jars.excludes", ",".join(etl.CONNECTOR_EXCLUDES))
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


# The generated bad datasets quarantine 1-7% of their records on purpose: above the
# default limit, so the runs that load them raise it.
BAD_DATA_ALLOWED = ("--max-reject-rate", "0.1")


def run_etl(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python etl.py ARGS`` as a user would, with the machine clock off UTC."""
    environment = {**os.environ, "TZ": NON_UTC_ZONE, **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "etl.py"), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=900)


def assert_frames_equal(actual: DataFrame, expected: DataFrame) -> None:
    """Same column names and types, and the same rows in any order (duplicates counted)."""
    assert actual.dtypes == expected.dtypes, f"schema {actual.dtypes} != {expected.dtypes}"

    def rows(frame: DataFrame) -> list[tuple]:
        return sorted((tuple(row) for row in frame.collect()), key=repr)

    assert rows(actual) == rows(expected)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 protocol server (moto) on 127.0.0.1 for the whole test run."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


class S3ErrorHandler(BaseHTTPRequestHandler):
    """Answers every request with one S3 error response, as S3 itself sends it."""

    status = 403
    code = "AccessDenied"

    def _answer(self) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{self.code}</Code>'
                f"<Message>stub says {self.code}</Message><RequestId>1</RequestId></Error>").encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def s3_error_endpoint():
    """Start an endpoint that fails every request with the given (status, code)."""
    servers = []

    def start(status: int, code: str) -> str:
        handler = type("Handler", (S3ErrorHandler,), {"status": status, "code": code})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
