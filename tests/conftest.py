"""Shared fixtures: one local SparkSession for the whole run, generated datasets, a CLI
runner, and a real S3 server (S3Proxy, which checks signatures) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from sparkify_etl.s3 import S3Access

REPO = Path(__file__).resolve().parent.parent
# The tests import etl and sparkify_etl from the checkout. Nothing else does: no process
# a test starts gets a PYTHONPATH pointing here, so a packaging mistake fails its tests.
sys.path.insert(0, str(REPO))

import datagen  # noqa: E402
import etl  # noqa: E402
import locals3  # noqa: E402
from sparkify_etl.session import ship_package  # noqa: E402

# The machine clock of every JVM and Python process in the tests runs in a zone far
# from UTC, so a time part that leaks the local zone shows up as a wrong hour or day.
NON_UTC_ZONE = "America/Los_Angeles"
# Test JVMs live for seconds to a minute: the quick (C1) compiler alone and the serial
# collector cost them much less CPU than the full JIT's compile threads. C1 alone gets a
# 48 MB code cache, which several Delta loads in one JVM fill: it gets the usual 240 MB.
# The session below sets them itself; etl.py and spark-submit in subprocesses read them
# from SPARK_CONF_DIR.
TEST_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=240m -XX:+UseSerialGC"
if "SPARK_CONF_DIR" not in os.environ:
    _conf_dir = Path(tempfile.mkdtemp(prefix="sparkify-tests-spark-conf-"))
    (_conf_dir / "spark-defaults.conf").write_text(f"spark.driver.extraJavaOptions {TEST_JVM_OPTIONS}\n")
    os.environ["SPARK_CONF_DIR"] = str(_conf_dir)
# The generated messy datasets quarantine a few percent of their records on purpose:
# above the default limit, so the runs that load them raise it.
BAD_DATA_ALLOWED = ("--max-reject-rate", "0.1")


@pytest.fixture(scope="session")
def spark() -> SparkSession:
    """A plain local session (no S3 connector: tests that touch S3 run etl.py in its own process)."""
    session = (
        SparkSession.builder.master("local[2]")
        .appName("sparkify-etl-tests")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.extraJavaOptions", f"-Duser.timezone={NON_UTC_ZONE} {TEST_JVM_OPTIONS}")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    ship_package(session)  # as etl.py's own sessions do: the tasks' Python imports the fetcher
    yield session
    session.stop()


@pytest.fixture(scope="session")
def quirky_dataset(tmp_path_factory) -> Path:
    """A small generated dataset with every quirk of the real data and of messy buckets."""
    root = tmp_path_factory.mktemp("quirky-input")
    datagen.generate(root, datagen.Scale(songs=400, days=8, events_per_day=150), seed=8, corrupt=True)
    return root


def run_etl(
    *args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 900, script: Path = REPO / "etl.py"
) -> subprocess.CompletedProcess:
    """Run ``python etl.py ARGS`` as a user would, with the machine clock off UTC."""
    environment = {**os.environ, "TZ": NON_UTC_ZONE, **(env or {})}
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def run_in_session(spark: SparkSession, *args: str) -> int:
    """etl.py's main() with ``args``, inside the test session (no JVM start per run)."""
    return etl.main(list(args), spark=spark)


def assert_loaded(result) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- S3 ------------------------------------------------------------------------

S3_KEY, S3_SECRET = "AKIDTESTSPARKIFY", "s3cr3t-that-must-never-be-printed"
S3_REGION = "eu-west-1"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    """S3Proxy on 127.0.0.1 for the whole test run: real S3 protocol and real signature checks."""
    with locals3.s3proxy(
        tmp_path_factory.mktemp("s3proxy") / "data", access_key=S3_KEY, secret_key=S3_SECRET
    ) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def counted_s3(s3_endpoint):
    """The S3 server behind a proxy that counts every request by kind."""
    with locals3.LatencyProxy(s3_endpoint) as proxy:
        yield proxy


def s3_environment(endpoint: str, key: str = S3_KEY, secret: str = S3_SECRET) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": S3_REGION,
    }


def s3_client(endpoint: str):
    return S3Access(S3_REGION, endpoint, S3_KEY, S3_SECRET).client()


def create_bucket(endpoint: str, bucket: str) -> None:
    s3_client(endpoint).create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": S3_REGION})


def upload(endpoint: str, root: Path, bucket: str, prefix: str = "") -> int:
    """Every file under ``root`` (skipped ones too: the listing must see them)."""
    client = s3_client(endpoint)
    files = [path for path in root.rglob("*") if path.is_file()]
    for path in files:
        client.upload_file(str(path), bucket, f"{prefix}{path.relative_to(root).as_posix()}")
    return len(files)


def all_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def download(endpoint: str, bucket: str, prefix: str, target: Path) -> Path:
    """Every object under ``prefix`` into ``target``, to be read locally."""
    client = s3_client(endpoint)
    for key in all_keys(endpoint, bucket, prefix):
        if key.endswith("/"):
            continue
        path = target / key[len(prefix) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(path))
    return target


class S3ErrorHandler(BaseHTTPRequestHandler):
    """Answers every request with one S3 error, as S3 sends it: for the refusals S3Proxy
    cannot give (it has no IAM policies or session tokens)."""

    status = 403
    code = "AccessDenied"

    def _answer(self) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{self.code}</Code>'
            f"<Message>{self.code}</Message><RequestId>1</RequestId></Error>"
        ).encode()
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
