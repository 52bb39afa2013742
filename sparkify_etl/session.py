"""The Spark session: one per run, started quietly, with the jars its roots need."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from pyspark.sql import SparkSession

from .errors import EtlError
from .jars import DELTA_SESSION, ivy_settings_file, session_packages
from .settings import Settings
from .tuning import size_shuffles, tune_local_session


def under_spark_submit() -> bool:
    """True when spark-submit started this driver (and its JVM, with its own settings)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def requested_master() -> str | None:
    """The master spark-submit (or PYSPARK_SUBMIT_ARGS) asked for, or None: then local[*]."""
    if under_spark_submit():
        from pyspark import SparkConf, SparkContext

        SparkContext._ensure_initialized()  # joins the JVM spark-submit started
        return SparkConf().get("spark.master", None)
    words = shlex.split(os.environ.get("PYSPARK_SUBMIT_ARGS", ""))
    if "--master" in words[:-1]:
        return words[words.index("--master") + 1]
    return None


def build_spark_session(settings: Settings, verbose: bool) -> SparkSession:
    """The one session of a run: UTC, the jars its roots and format need, quiet unless
    ``verbose`` (a JVM this process starts writes its own log to a file, not the terminal)."""
    master = requested_master()
    local_jvm = not under_spark_submit() and (master or "local").startswith("local")
    builder = (
        SparkSession.builder.appName("sparkify-etl")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.showConsoleProgress", "false")
    )
    if master is None:
        builder = builder.master("local[*]")
    if not under_spark_submit():
        packages = session_packages(settings, local_jvm)
        if packages and "ivySettings" not in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
            packages["spark.jars.ivySettings"] = ivy_settings_file()
        for key, value in packages.items():
            builder = builder.config(key, value)
    if settings.format == "delta":
        for key, value in DELTA_SESSION.items():
            builder = builder.config(key, value)
    if settings.catalog:
        builder = builder.enableHiveSupport()
    spark = start_session(builder, settings, verbose)
    spark.sparkContext.setLogLevel("INFO" if verbose else "WARN")
    if local_jvm:
        tune_local_session(spark, settings)
    size_shuffles(spark)
    ship_package(spark)
    return spark


def ship_package(spark: SparkSession) -> None:
    """Give the executors' Python workers this package (the file fetcher runs there):
    zipped from its folder and added to the session, so no deploy mode that starts the
    driver here needs a flag. A driver that imported the package from a zip (YARN cluster
    mode, given ``--py-files``) has shipped it already."""
    package = Path(__file__).resolve().parent
    if not package.is_dir():
        return
    sources = sorted(package.glob("*.py"))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]
    archive = Path(tempfile.gettempdir()) / f"{package.name}-{digest}.zip"
    if not archive.is_file():
        build_package_zip(archive)
    spark.sparkContext.addPyFile(str(archive))


def build_package_zip(target: Path) -> Path:
    """This package as a zip for ``spark-submit --py-files`` (``python etl.py --package-zip``)."""
    package = Path(__file__).resolve().parent
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        for source in sorted(package.glob("*.py")):
            archive.write(source, f"{package.name}/{source.name}")
    partial.replace(target)
    return target


_SPARK_LOG = None  # where a JVM this process started writes its log (see start_session)


def spark_log() -> str | None:
    """The file the JVM this process started writes its output to, if it started one."""
    return _SPARK_LOG.name if _SPARK_LOG is not None else None


def start_session(builder: SparkSession.Builder, settings: Settings, verbose: bool) -> SparkSession:
    """Start (or join) the session. A JVM this process starts gets a log file for its
    output, unless ``verbose``: Ivy's downloads and Spark's own logging and printing stay
    off the terminal, and a failure to start is explained from what the JVM said."""
    global _SPARK_LOG
    if under_spark_submit() or verbose:
        return builder.getOrCreate()
    # Open for the whole run: the JVM writes to it until the process ends.
    _SPARK_LOG = tempfile.NamedTemporaryFile(prefix="sparkify-etl-", suffix=".log", delete=False)  # noqa: SIM115
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        for descriptor in (1, 2):  # the JVM inherits these as its stdout and stderr
            os.dup2(_SPARK_LOG.fileno(), descriptor)
        return builder.getOrCreate()
    except Exception:  # noqa: BLE001 - whatever stopped the JVM, its own output says why
        raise EtlError(explain_start_failure(Path(_SPARK_LOG.name).read_text(errors="replace"), settings)) from None
    finally:
        for descriptor, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, descriptor)
            os.close(copy)


def explain_start_failure(jvm_output: str, settings: Settings) -> str:
    unresolved = re.findall(r"unresolved dependency: ([^\s:]+#[^\s;]+;[^\s:]+)", jvm_output)
    if unresolved or "UNRESOLVED DEPENDENCIES" in jvm_output or ("Host" in jvm_output and "not found" in jvm_output):
        names = ", ".join(sorted({item.replace("#", ":").replace(";", ":") for item in unresolved})) or "the jars"
        return (
            f"Spark could not fetch {names} from Maven Central, so it cannot start (Ivy: "
            f"{first_line_with(jvm_output, ('not found', 'unresolved', 'Connection', 'timed out'))}). Check the "
            "network and any proxy (Ivy takes -Dhttps.proxyHost in JAVA_TOOL_OPTIONS); once fetched, the jars "
            "are kept in the Ivy cache. [SPARK] PACKAGES = none starts Spark without them (no S3, no Delta)."
        )
    if "JAVA_HOME" in jvm_output or "java: not found" in jvm_output or "No such file" in jvm_output:
        return (
            "Spark cannot start: no usable Java was found. Install Java 17 and make `java` available on PATH "
            "(or set JAVA_HOME)."
        )
    return (
        f"Spark could not start: {first_line_with(jvm_output, ('Exception', 'Error', 'error'))}. "
        "Run again with --verbose to see all of Spark's output."
    )


def first_line_with(text: str, words: Sequence[str]) -> str:
    for line in text.splitlines():
        if any(word in line for word in words):
            return line.strip()[:300]
    return "no reason given"
