"""Sparkify data lake ETL: song and event JSON in, a star schema of parquet tables out.

    python etl.py [--config FILE] [--input ROOT] [--output ROOT] [--verbose]
    spark-submit [--master ...] etl.py [same flags]

Reads ``ROOT/song_data/`` and ``ROOT/log_data/``, builds songplays (fact), users, songs,
artists and time, and writes them to ``OUTPUT/<table>/`` as parquet. Records that
cannot be used are kept, with their source file and the reason, under
``OUTPUT/_quarantine/``. The contract is SPEC.md; README.md shows how to run it.
"""

from __future__ import annotations

import argparse
import configparser
import json
import logging
import os
import re
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import urlparse

from pyspark.errors import PySparkRuntimeError
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

__version__ = "1.1.0"

log = logging.getLogger("sparkify.etl")

# =============================================================================
# Settings: built-in defaults < dl.cfg < environment < command-line flags
# =============================================================================

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE / "data" / "sample"
DEFAULT_OUTPUT = "output"
DEFAULT_CONFIG = "dl.cfg"

# Every key dl.cfg may hold, by section; dl.cfg.example documents each one.
CONFIG_KEYS = {
    "AWS": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
            "AWS_ENDPOINT_URL_S3"),
    "ETL": ("INPUT", "OUTPUT", "MAX_REJECT_RATE"),
    "SPARK": ("PACKAGES", "S3A_COMMITTER"),
}
S3A_COMMITTERS = ("magic", "directory", "partitioned", "file")
# Above this share of a dataset's records quarantined, the input is suspect: no table is written.
DEFAULT_MAX_REJECT_RATE = 0.01


class EtlError(Exception):
    """A failure the user can act on; its message is the whole paragraph they are shown."""


@dataclass(frozen=True)
class Settings:
    """Everything one run needs to know, resolved once."""

    input_root: str
    output_root: str
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    endpoint_url: str | None = None
    packages: str | None = None  # Maven coordinates to add; None: worked out from the installed Spark
    s3a_committer: str = "magic"
    max_reject_rate: float = DEFAULT_MAX_REJECT_RATE
    since: date | None = None  # incremental load: only log events from this UTC day ...
    until: date | None = None  # ... up to, not including, this one

    def uses_s3(self) -> bool:
        return any(root.startswith(("s3a://", "s3://")) for root in (self.input_root, self.output_root))

    def incremental(self) -> bool:
        return self.since is not None or self.until is not None

    def redacted(self) -> dict[str, object]:
        """The effective settings for the run report: no secret, the key id masked."""
        shown = {**vars(self),
                 "access_key_id": "****" + self.access_key_id[-4:] if self.access_key_id else None,
                 "secret_access_key": "****" if self.secret_access_key else None,
                 "session_token": "****" if self.session_token else None}
        return {name: value.isoformat() if isinstance(value, date) else value for name, value in shown.items()}


def read_config_file(path: Path) -> dict[str, str]:
    """The keys of a dl.cfg file as ``{"SECTION.KEY": value}``, empty values left out."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str.upper  # keys are case-insensitive, as in the AWS docs
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as error:
        raise EtlError(f"Cannot read the config file {path}: {error.strerror}. Pass an existing "
                       "file with --config, or copy dl.cfg.example to dl.cfg.") from None
    except configparser.Error as error:
        reason = str(error).splitlines()[0]
        raise EtlError(f"The config file {path} is not a valid INI file ({reason}). "
                       "See dl.cfg.example for its layout.") from None
    values = {}
    for section in parser.sections():
        known = CONFIG_KEYS.get(section.upper())
        if known is None:
            raise EtlError(f"The config file {path} has an unknown section [{section}]; "
                           f"the known sections are {', '.join(CONFIG_KEYS)} (see dl.cfg.example).")
        for key, value in parser.items(section):
            if key not in known:
                raise EtlError(f"The config file {path} has an unknown key {key} in [{section}]; "
                               f"that section takes {', '.join(known)} (see dl.cfg.example).")
            if value.strip():
                values[f"{section.upper()}.{key}"] = value.strip()
    return values


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Merge defaults, dl.cfg, environment and flags, the later winning."""
    if args.config is not None:
        config = read_config_file(Path(args.config))
    elif Path(DEFAULT_CONFIG).is_file():
        config = read_config_file(Path(DEFAULT_CONFIG))
    else:
        config = {}

    # The key, secret and token belong together: take all three from the first source
    # that names a key, so a key from one place never pairs with a secret from another.
    credential_names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    if environ.get("AWS_ACCESS_KEY_ID"):
        key_id, secret, token = (environ.get(name) or None for name in credential_names)
    else:
        key_id, secret, token = (config.get(f"AWS.{name}") for name in credential_names)
    if bool(key_id) != bool(secret):
        raise EtlError("AWS credentials are incomplete: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                       "must be given together (in dl.cfg [AWS] or the environment), or neither, to "
                       "use the default AWS credential chain.")

    def first(*candidates: str | None) -> str | None:
        return next((value for value in candidates if value), None)

    committer = config.get("SPARK.S3A_COMMITTER", "magic").lower()
    if committer not in S3A_COMMITTERS:
        raise EtlError(f"[SPARK] S3A_COMMITTER = {committer} is not an S3A committer; use one of "
                       f"{', '.join(S3A_COMMITTERS)} (see dl.cfg.example).")
    since, until = args.since, args.until
    if since and until and since >= until:
        raise EtlError(f"--since {since} is not before --until {until}: the window would hold no day.")
    return Settings(
        input_root=to_uri(first(args.input, config.get("ETL.INPUT"), str(DEFAULT_INPUT))),
        output_root=to_uri(first(args.output, config.get("ETL.OUTPUT"), DEFAULT_OUTPUT)),
        access_key_id=key_id,
        secret_access_key=secret,
        session_token=token,
        region=first(environ.get("AWS_REGION"), environ.get("AWS_DEFAULT_REGION"),
                     config.get("AWS.AWS_REGION")),
        endpoint_url=first(environ.get("AWS_ENDPOINT_URL_S3"), environ.get("AWS_ENDPOINT_URL"),
                           config.get("AWS.AWS_ENDPOINT_URL_S3")),
        packages=config.get("SPARK.PACKAGES"),
        s3a_committer=committer,
        max_reject_rate=reject_rate(first(args.max_reject_rate, config.get("ETL.MAX_REJECT_RATE"))),
        since=since,
        until=until,
    )


def reject_rate(text: str | None) -> float:
    if text is None:
        return DEFAULT_MAX_REJECT_RATE
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:
        raise EtlError(f"The reject limit {text!r} is not a fraction between 0 and 1 (0.01 allows 1% of "
                       "a dataset's records to be quarantined): check --max-reject-rate or [ETL] MAX_REJECT_RATE.")
    return rate


def to_uri(root: str) -> str:
    """A root as a URI without a trailing slash: local folders become absolute file:// URIs."""
    scheme = urlparse(root).scheme
    if scheme in ("s3", "s3a"):
        if not urlparse(root).netloc:
            raise EtlError(f"{root!r} names no bucket: write s3a://BUCKET/PREFIX.")
        return f"{scheme}://" + root.split("://", 1)[1].rstrip("/")
    if scheme == "file":
        return Path(urlparse(root).path).resolve().as_uri()
    if scheme:
        raise EtlError(f"Unsupported location {root!r}: use a local folder, a file:// URI or an "
                       "s3a:// (or s3://) URI.")
    return Path(root).resolve().as_uri()


def table_path(root: str, name: str) -> str:
    return f"{root}/{name}"


# =============================================================================
# Spark session
# =============================================================================

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


# Transitive dependencies of spark-hadoop-cloud that Spark already ships, or that serve
# other clouds: left out, they can neither clash with Spark's own versions nor cost downloads.
CONNECTOR_EXCLUDES = (
    "com.google.cloud.bigdataoss:gcs-connector", "org.apache.hadoop:hadoop-azure",
    "org.apache.hadoop:hadoop-azure-datalake", "org.apache.hadoop:hadoop-cloud-storage",
    "org.apache.hadoop:hadoop-huaweicloud", "org.apache.hadoop:hadoop-aliyun",
    "org.apache.hadoop:hadoop-openstack", "org.apache.hadoop:hadoop-client-api",
    "org.apache.hadoop:hadoop-client-runtime", "com.fasterxml.jackson.core:jackson-core",
    "com.fasterxml.jackson.core:jackson-databind", "com.fasterxml.jackson.core:jackson-annotations",
    "com.fasterxml.jackson.dataformat:jackson-dataformat-cbor", "org.slf4j:slf4j-api",
    "commons-codec:commons-codec", "org.apache.httpcomponents:httpclient",
    "org.apache.httpcomponents:httpcore", "joda-time:joda-time", "org.eclipse.jetty:jetty-util",
    "org.eclipse.jetty:jetty-util-ajax", "com.squareup.okhttp3:okhttp", "com.squareup.okio:okio",
)


def installed_spark_jars() -> Path:
    import pyspark

    home = os.environ.get("SPARK_HOME")
    return Path(home) / "jars" if home else Path(pyspark.__file__).parent / "jars"


def connector_packages(jar_names: Sequence[str], spark_version: str) -> str | None:
    """Maven coordinates of the S3A connector matching the installed Spark's own Hadoop and
    Scala, or None when that Spark already ships one.

    hadoop-aws must be exactly the bundled Hadoop's version; spark-hadoop-cloud (the
    committer bindings) is not published for every Spark patch release, so the newest of
    the same major.minor line is taken: every release of a line bundles the same Hadoop.
    """
    if any(name.startswith("hadoop-aws-") for name in jar_names):
        return None
    hadoop = next((m.group(1) for m in map(re.compile(r"hadoop-client-api-(.+)\.jar").match, jar_names) if m), None)
    scala = next((m.group(1) for m in map(re.compile(r"spark-core_(2\.1\d)-").match, jar_names) if m), None)
    if hadoop is None or scala is None:
        raise EtlError("Cannot tell which Hadoop this Spark bundles (no hadoop-client-api jar in "
                       f"{installed_spark_jars()}), so the matching S3A connector is unknown. Set "
                       "[SPARK] PACKAGES in dl.cfg to org.apache.hadoop:hadoop-aws:<your Hadoop version>.")
    line = ".".join(spark_version.split(".")[:2])
    return f"org.apache.hadoop:hadoop-aws:{hadoop},org.apache.spark:spark-hadoop-cloud_{scala}:{line}.+"


def connector_confs(packages_override: str | None) -> dict[str, str]:
    """The spark.jars.* settings that give this Spark the S3A connector: empty when it ships
    one or ``[SPARK] PACKAGES`` is ``none``."""
    if packages_override:
        packages, excludes = packages_override, ()
    else:
        jars = [path.name for path in installed_spark_jars().glob("*.jar")]
        packages, excludes = connector_packages(jars, pyspark_version()), CONNECTOR_EXCLUDES
    if not packages or packages.lower() == "none":
        return {}
    confs = {"spark.jars.packages": packages}
    if excludes:
        confs["spark.jars.excludes"] = ",".join(excludes)
    return confs


def spark_submit_options(packages_override: str | None) -> list[str]:
    """The same connector as spark-submit flags, for ``--print-packages``."""
    flags = []
    for key, value in connector_confs(packages_override).items():
        flags += ["--packages", value] if key == "spark.jars.packages" else ["--conf", f"{key}={value}"]
    return flags


def s3a_options(settings: Settings) -> dict[str, str]:
    """Hadoop settings for S3A: credentials, endpoint, connection pool, committer."""
    options = {
        # Thousands of small song files and partition files: many requests in flight.
        "fs.s3a.connection.maximum": "200",
        "fs.s3a.threads.max": "64",
        "fs.s3a.committer.threads": "32",
        # Files become visible only when the job commits: no renames, no _temporary.
        "fs.s3a.committer.name": settings.s3a_committer,
        "fs.s3a.committer.magic.enabled": "true",
        "fs.s3a.committer.abort.pending.uploads": "true",
        "mapreduce.outputcommitter.factory.scheme.s3a": "org.apache.hadoop.fs.s3a.commit.S3ACommitterFactory",
    }
    if settings.access_key_id:
        # Hadoop-owned provider names exist under both AWS SDK v1 (Spark 3.5) and v2 (Spark 4).
        options["fs.s3a.access.key"] = settings.access_key_id
        options["fs.s3a.secret.key"] = settings.secret_access_key or ""
        if settings.session_token:
            options["fs.s3a.session.token"] = settings.session_token
            options["fs.s3a.aws.credentials.provider"] = "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider"
        else:
            options["fs.s3a.aws.credentials.provider"] = "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"
    if settings.region:
        options["fs.s3a.endpoint.region"] = settings.region
    if settings.endpoint_url:
        options["fs.s3a.endpoint"] = settings.endpoint_url
        options["fs.s3a.path.style.access"] = "true"
        options["fs.s3a.connection.ssl.enabled"] = str(settings.endpoint_url.startswith("https:")).lower()
        options.setdefault("fs.s3a.endpoint.region", "us-east-1")
        # S3-compatible stores differ in the ETag/version semantics S3A checks on reads.
        options["fs.s3a.change.detection.mode"] = "none"
    return options


# Without Hadoop's native library (pyspark ships none) Hadoop's local filesystem sets the
# permissions of every file and folder it creates by forking `chmod`: two forks per partition
# file, most of a local run's time with ~14,000 song folders. This small filesystem
# (Apache-2.0; Hadoop's raw local filesystem, setting permissions through Java NIO instead)
# writes the same files without forking: the prod songs write went from 50 s to 5-10 s.
NIO_LOCAL_FS_PACKAGE = "com.globalmentor:hadoop-bare-naked-local-fs:0.1.0"
NIO_LOCAL_FS_CLASS = "com.globalmentor.apache.hadoop.fs.NakedLocalFileSystem"


def cached_package_jar(coordinate: str, home: Path | None = None) -> Path | None:
    """The jar an earlier ``spark.jars.packages`` resolution stored for ``coordinate``.

    Given as a plain jar it needs no network: Ivy contacts the repositories on every start,
    even for packages it has cached, and fails offline.
    """
    group, artifact, version = coordinate.split(":")
    home = home or Path.home()
    for ivy_home in (".ivy2.5.2", ".ivy2"):  # Spark 4's and Spark 3's default Ivy homes
        jar = home / ivy_home / "jars" / f"{group}_{artifact}-{version}.jar"
        if jar.is_file():
            return jar
    return None


# Heap of a local run's driver JVM, unless the user set one (PYSPARK_SUBMIT_ARGS'
# --driver-memory or spark.driver.memory, or SPARK_DRIVER_MEMORY).
LOCAL_DRIVER_MEMORY = "2g"

# Where the JVM takes options from the environment as well as from its command line.
JVM_OPTION_VARIABLES = ("JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS")


def session_builder(settings: Settings, master: str | None, nio_local_fs: bool) -> SparkSession.Builder:
    """The session settings of a run; ``nio_local_fs``: also load the NIO local filesystem."""
    builder = (
        SparkSession.builder.appName("sparkify-etl")
        .config("spark.sql.session.timeZone", "UTC")
        # Opening a file costs about as much as reading 64 KB of it, not the 4 MB Spark
        # assumes: this packs thousands of one-record song files into each read task.
        .config("spark.sql.files.openCostInBytes", str(64 * 1024))
        .config("spark.ui.showConsoleProgress", "false")
    )
    if master is None:
        master = "local[*]"
        builder = builder.master(master)
    if settings.output_root.startswith("file://") and not master.startswith("yarn"):
        # Hadoop's checksummed local filesystem writes a .crc file beside every file, which
        # doubles the chmod forks above. (YARN's client cannot stage its uploads through the
        # raw filesystem, so not there.)
        builder = builder.config("spark.hadoop.fs.file.impl", "org.apache.hadoop.fs.RawLocalFileSystem")
    submit_args = os.environ.get("PYSPARK_SUBMIT_ARGS", "")
    # Only a local JVM this process starts takes JVM settings from here.
    starts_local_jvm = master.startswith("local") and not under_spark_submit()
    if (starts_local_jvm and not os.environ.get("SPARK_DRIVER_MEMORY")
            and not re.search(r"--driver-memory|spark\.driver\.memory", submit_args)):
        # The driver is the whole local cluster. With Spark's 1 GB default the gate's hash
        # aggregations spill and the GC works harder: quality gate 32.5 and 33.5 s at large,
        # 29.2 and 29.9 s with 2 GB (alternating runs), at a peak of 2.2-2.3 GiB (PSS).
        builder = builder.config("spark.driver.memory", LOCAL_DRIVER_MEMORY)
    if (starts_local_jvm and sys.platform.startswith("linux")
            and "--driver-java-options" not in submit_args and "extraJavaOptions" not in submit_args):
        # Where chmod is still forked (no NIO filesystem), each fork goes through posix_spawn
        # and a helper process by default; vfork starts chmod directly: -18% load time at prod.
        # The parallel collector has none of G1's concurrent threads and write barriers,
        # which on 2 cores took CPU from the tasks: large 160 s -> 140 s, prod 39-45 s -> 38 s.
        # (Not where the user picked a collector: the JVM refuses two.)
        options = "-Djdk.lang.Process.launchMechanism=VFORK"
        environment_options = " ".join(os.environ.get(name, "") for name in JVM_OPTION_VARIABLES)
        if not re.search(r"-XX:[+-]Use\w+GC\b", environment_options):
            options += " -XX:+UseParallelGC"
        builder = builder.config("spark.driver.extraJavaOptions", options)
    packages = []
    if settings.uses_s3() and not under_spark_submit():
        # Only a JVM this process starts can still take jars; spark-submit passes its own.
        for key, value in connector_confs(settings.packages).items():
            if key == "spark.jars.packages":
                packages.append(value)
            else:
                builder = builder.config(key, value)
    if nio_local_fs:
        jar = cached_package_jar(NIO_LOCAL_FS_PACKAGE)
        if jar:
            builder = builder.config("spark.jars", str(jar))
        else:
            packages.append(NIO_LOCAL_FS_PACKAGE)
    if packages:
        builder = builder.config("spark.jars.packages", ",".join(packages))
    return builder


def build_spark_session(settings: Settings) -> SparkSession:
    """The one session of a run: UTC, tiny files packed into few read tasks, local writes
    without forks, S3A when needed."""
    master = requested_master()
    local = (master or "local").startswith("local")
    nio_local_fs = (settings.output_root.startswith("file://") and local and not under_spark_submit()
                    and (settings.packages or "").lower() != "none")
    try:
        spark = session_builder(settings, master, nio_local_fs).getOrCreate()
    except PySparkRuntimeError:
        if not nio_local_fs or cached_package_jar(NIO_LOCAL_FS_PACKAGE):
            raise
        # Maven Central out of reach on a first local run: the job still runs, only slower.
        log.warning("Could not fetch %s (see Ivy's messages above): writing through Hadoop's own "
                    "local filesystem, which forks a chmod for every file. Same tables, slower.",
                    NIO_LOCAL_FS_PACKAGE)
        nio_local_fs = False
        spark = session_builder(settings, master, nio_local_fs).getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    if nio_local_fs and jvm_has_class(spark, NIO_LOCAL_FS_CLASS):
        hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
        hadoop_conf.set("fs.file.impl", NIO_LOCAL_FS_CLASS)
        # spark-submit cached a file:// filesystem before the jar was loaded: go around
        # the cache so that every use (driver and tasks) gets the NIO one.
        hadoop_conf.set("fs.file.impl.disable.cache", "true")
    if local:
        drop_settings_of_unused_services(spark.sparkContext._jsc.hadoopConfiguration(), settings.uses_s3())
    if not spark.sparkContext.getConf().contains("spark.sql.shuffle.partitions"):
        # The tables are small: 200 shuffle tasks per aggregation cost more in scheduling
        # than the work (the quality gate's 17 checks took 26 s on the sample, 5 s so).
        spark.conf.set("spark.sql.shuffle.partitions", str(spark.sparkContext.defaultParallelism * 2))
    return spark


# Services a local run never talks to: YARN, MapReduce's own tasks and history server,
# Hadoop RPC, HA and ZooKeeper, the service registry, Hadoop's web servers, and the
# filesystems of other clouds. Their defaults are ~800 of Hadoop's ~1,100 settings.
UNUSED_LOCAL_SERVICE_SETTINGS = (
    r"^(yarn|mapreduce\.(jobhistory|map|reduce|shuffle|jvm|ifile|am|app-submission|client|cluster)"
    r"|ipc|ha|hadoop\.(registry|http|zk)|rpc\.metrics|net\.topology"
    r"|fs\.(viewfs|azure|adl|wasbs?|ftp)|adl|ftp|tfile|seq\.io|io\.(seqfile|mapfile|erasurecode))\."
)
S3A_SETTINGS = r"^fs\.s3a\."


def drop_settings_of_unused_services(conf, uses_s3: bool) -> None:
    """Leave the defaults of services a local run never uses out of its Hadoop settings
    ``conf`` (S3A's too, when neither root is on S3).

    Hadoop copies its whole configuration for every file a task opens (a JobConf for each
    line reader) and scans it again for per-file read and per-column Parquet options: with
    100,000 one-record song files that copying was half of the song read's CPU (JFR).
    """
    for pattern in (UNUSED_LOCAL_SERVICE_SETTINGS,) + (() if uses_s3 else (S3A_SETTINGS,)):
        for name in list(conf.getValByRegex(pattern).keys()):
            conf.unset(name)


def pyspark_version() -> str:
    import pyspark

    return pyspark.__version__


def jvm_has_class(spark: SparkSession, name: str) -> bool:
    jvm = spark.sparkContext._jvm
    try:
        jvm.java.lang.Class.forName(name, False, jvm.Thread.currentThread().getContextClassLoader())
    except Exception:  # py4j wraps ClassNotFoundException
        return False
    return True


def configure_storage(spark: SparkSession, settings: Settings) -> Settings:
    """Point S3A at the store and the committer at S3; return the roots Spark should use.

    ``s3://`` stays with EMRFS where the cluster serves it (EMR, with its own committer and
    the instance profile) and goes through S3A everywhere else. Credentials go into the
    driver's Hadoop configuration, not the Spark conf: they stay off the command line, the
    Spark UI and the event log, and still reach executors with each job's serialized
    Hadoop configuration.
    """
    if not settings.uses_s3():
        return settings
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
    if hadoop_conf.get("fs.s3.impl") is None:
        def as_s3a(root: str) -> str:
            return "s3a://" + root[len("s3://"):] if root.startswith("s3://") else root

        settings = replace(settings, input_root=as_s3a(settings.input_root),
                           output_root=as_s3a(settings.output_root))
    if not any(root.startswith("s3a://") for root in (settings.input_root, settings.output_root)):
        return settings
    if not jvm_has_class(spark, "org.apache.hadoop.fs.s3a.S3AFileSystem"):
        hadoop = spark.sparkContext._jvm.org.apache.hadoop.util.VersionInfo.getVersion()
        raise EtlError("This Spark has no S3A connector, so it cannot read or write s3a:// URIs. With "
                       f"spark-submit, add --packages org.apache.hadoop:hadoop-aws:{hadoop} (the version of "
                       "this Spark's Hadoop; `python etl.py --print-packages` prints the flags); python "
                       "etl.py adds it by itself, and EMR ships it.")
    if settings.incremental() and settings.output_root.startswith("s3a://"):
        raise EtlError("--since/--until replace single partitions of songplays and time, which S3A's "
                       "committers cannot do without risking a half-replaced table. Load S3 output in full "
                       "(without --since/--until), or load incrementally into a local or HDFS root.")
    for key, value in s3a_options(settings).items():
        hadoop_conf.set(key, value)
    if settings.output_root.startswith("s3a://"):
        if jvm_has_class(spark, "org.apache.spark.internal.io.cloud.PathOutputCommitProtocol"):
            spark.conf.set("spark.sql.sources.commitProtocolClass",
                           "org.apache.spark.internal.io.cloud.PathOutputCommitProtocol")
            spark.conf.set("spark.sql.parquet.output.committer.class",
                           "org.apache.spark.internal.io.cloud.BindingParquetOutputCommitter")
        else:
            log.warning("spark-hadoop-cloud is missing: writing to S3 with the cluster's default committer")
    return settings


# =============================================================================
# Schemas: explicit for every read; text where real data has numbers in text fields
# =============================================================================

CORRUPT_RECORD = "_corrupt_record"

SONG_SCHEMA = T.StructType([
    T.StructField("song_id", T.StringType()),
    T.StructField("title", T.StringType()),  # sometimes a JSON number: read as its text
    T.StructField("artist_id", T.StringType()),
    T.StructField("artist_name", T.StringType()),  # sometimes a JSON number too
    T.StructField("artist_location", T.StringType()),
    T.StructField("artist_latitude", T.DoubleType()),
    T.StructField("artist_longitude", T.DoubleType()),
    T.StructField("duration", T.DoubleType()),
    T.StructField("year", T.IntegerType()),
    T.StructField("num_songs", T.IntegerType()),
])

LOG_SCHEMA = T.StructType([
    T.StructField("ts", T.LongType()),  # epoch milliseconds, UTC
    T.StructField("userId", T.StringType()),  # "" when logged out
    T.StructField("firstName", T.StringType()),
    T.StructField("lastName", T.StringType()),
    T.StructField("gender", T.StringType()),
    T.StructField("level", T.StringType()),
    T.StructField("location", T.StringType()),
    T.StructField("userAgent", T.StringType()),
    T.StructField("page", T.StringType()),
    T.StructField("song", T.StringType()),
    T.StructField("artist", T.StringType()),
    T.StructField("length", T.DoubleType()),
    T.StructField("sessionId", T.LongType()),
    T.StructField("itemInSession", T.LongType()),
    T.StructField("auth", T.StringType()),
    T.StructField("method", T.StringType()),
    T.StructField("status", T.IntegerType()),
    T.StructField("registration", T.DoubleType()),
])

QUARANTINE_COLUMNS = ("source_file", "reject_reason", "record")

# Fields no table is built from. They are parsed (a wrong type there still rejects the
# record) and are in a rejected record's quarantined text, but are not kept after that.
SONG_FIELDS_NO_TABLE_USES = ("num_songs",)
LOG_FIELDS_NO_TABLE_USES = ("auth", "method", "status", "registration")


# =============================================================================
# Extract
# =============================================================================

def read_json_records(spark: SparkSession, root: str, schema: T.StructType) -> DataFrame:
    """Every *.json file under ``root`` in one recursive listing, parsed with ``schema``.

    A line that is not JSON, or holds a value of the wrong type, keeps its text in
    ``_corrupt_record``; ``source_file`` names the file each record came from.
    """
    return (
        spark.read.schema(T.StructType([*schema.fields, T.StructField(CORRUPT_RECORD, T.StringType())]))
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT_RECORD)
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", "*.json")
        .json(root)
        .withColumn("source_file", F.col("_metadata.file_path"))
        .withColumn("source_file_size", F.col("_metadata.file_size"))
    )


# =============================================================================
# Preflight: input readable and output writable before Spark starts
# =============================================================================

def check_local_input(root_uri: str) -> None:
    """Fail when a local input dataset is missing or holds no JSON."""
    root = Path(urlparse(root_uri).path)
    for dataset in ("song_data", "log_data"):
        folder = root / dataset
        if not folder.is_dir():
            raise EtlError(f"The input root {root} has no {dataset}/ folder. Point --input (or "
                           "[ETL] INPUT in dl.cfg) at the folder that holds song_data/ and log_data/.")
        if not any(path.stat().st_size for path in folder.rglob("*.json")):
            raise EtlError(f"{folder} holds no non-empty .json files, so there is nothing to load. "
                           "Check that --input points at a complete copy of the dataset.")


def s3_client(settings: Settings):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        region_name=settings.region or "us-east-1",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
        # Fail in seconds, not minutes, when the endpoint is wrong or unreachable.
        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"},
                      s3={"addressing_style": "path"} if settings.endpoint_url else None),
    )


def bucket_and_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def explain_s3_error(error: Exception, action: str, settings: Settings) -> EtlError:
    """One paragraph saying what went wrong talking to S3 and how to fix it."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = settings.endpoint_url or "AWS S3"
    if isinstance(error, NoCredentialsError):
        return EtlError(f"No AWS credentials were found to {action}. Set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY (or [AWS] in dl.cfg), or run where an instance profile provides them.")
    if isinstance(error, EndpointConnectionError) or not isinstance(error, ClientError):
        return EtlError(f"Cannot reach {where} to {action} ({type(error).__name__}). Check the network "
                        "and AWS_ENDPOINT_URL_S3 / [AWS] AWS_ENDPOINT_URL_S3.")
    code = error.response.get("Error", {}).get("Code", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "InvalidAccessKeyId":
        return EtlError(f"{where} does not know the AWS access key in use, so it cannot {action}. "
                        "Check AWS_ACCESS_KEY_ID (environment or dl.cfg [AWS]).")
    if code == "SignatureDoesNotMatch":
        return EtlError(f"The AWS secret key does not match the access key, so {where} refused to {action}. "
                        "Check AWS_SECRET_ACCESS_KEY (environment or dl.cfg [AWS]).")
    if code in ("ExpiredToken", "TokenRefreshRequired"):
        return EtlError(f"The AWS session token has expired, so {where} refused to {action}. "
                        "Get fresh temporary credentials and set AWS_SESSION_TOKEN again.")
    if code in ("NoSuchBucket", "404", "NotFound") or status == 404:
        return EtlError(f"The bucket does not exist: cannot {action}. Check the bucket name in --input/--output "
                        "(or [ETL] in dl.cfg) and the region.")
    if code in ("AccessDenied", "403", "Forbidden") or status == 403:
        return EtlError(f"Access denied: the AWS credentials in use may not {action}. Grant them s3:ListBucket, "
                        "s3:GetObject, s3:PutObject and s3:DeleteObject on the buckets, or use other credentials.")
    return EtlError(f"{where} refused to {action}: {code or status}. Check the bucket, the credentials and the region.")


def check_s3_access(settings: Settings) -> None:
    """Before Spark starts: credentials work, the input is readable, the output bucket exists
    (it is created, in the configured region, when it does not)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise EtlError("boto3 is needed to check S3 access before the run: pip install -r requirements.txt.") from None
    client = s3_client(settings)
    if settings.input_root.startswith(("s3a://", "s3://")):
        bucket, prefix = bucket_and_key(settings.input_root)
        for dataset in ("song_data", "log_data"):
            key_prefix = f"{prefix}/{dataset}/".lstrip("/")
            action = f"list s3://{bucket}/{key_prefix}"
            try:
                listing = client.list_objects_v2(Bucket=bucket, Prefix=key_prefix, MaxKeys=1)
            except (BotoCoreError, ClientError) as error:
                raise explain_s3_error(error, action, settings) from None
            if not listing.get("KeyCount"):
                raise EtlError(f"s3://{bucket}/{key_prefix} holds no objects, so there is nothing to load. "
                               "Point --input (or [ETL] INPUT) at the prefix that holds song_data/ and log_data/.")
    if settings.output_root.startswith(("s3a://", "s3://")):
        bucket, _ = bucket_and_key(settings.output_root)
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise explain_s3_error(error, f"write to bucket {bucket}", settings) from None
            create_bucket(client, bucket, settings)
        except BotoCoreError as error:
            raise explain_s3_error(error, f"write to bucket {bucket}", settings) from None


def create_bucket(client, bucket: str, settings: Settings) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    region = settings.region or "us-east-1"
    location = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        client.create_bucket(Bucket=bucket, **location)
    except (BotoCoreError, ClientError) as error:
        raise explain_s3_error(error, f"create the output bucket {bucket} in {region}", settings) from None
    log.warning("created the output bucket %s in %s", bucket, region)


def preflight(settings: Settings) -> None:
    """Check the input and the output before Spark starts, so failures are quick and clear."""
    if settings.input_root.startswith("file://"):
        check_local_input(settings.input_root)
    if settings.uses_s3():
        check_s3_access(settings)


# =============================================================================
# Transform: pure functions, DataFrames in, DataFrames out
# =============================================================================

def _reject_reason(*rules: tuple[Column, str]) -> Column:
    """The first reason whose rule holds, after the two the JSON parser decides, else null."""
    corrupt = F.col(CORRUPT_RECORD)
    reason = (F.when(corrupt.isNotNull() & F.from_json(corrupt, "map<string,string>").isNull(),
                     "malformed JSON")
              .when(corrupt.isNotNull(), "a field has the wrong type"))
    for rule, text in rules:
        reason = reason.when(rule, text)
    return reason


def with_reject_reason(records: DataFrame, reason: Column) -> DataFrame:
    """``records`` with their ``reject_reason`` and, on rejected ones only, the ``record``
    text to quarantine: the line as read, or the parsed fields as JSON."""
    parsed = [name for name in records.columns if name not in (CORRUPT_RECORD, "source_file", "source_file_size")]
    text = F.coalesce(F.col(CORRUPT_RECORD), F.to_json(F.struct(*parsed)))
    return (records.withColumn("reject_reason", reason)
            .withColumn("record", F.when(F.col("reject_reason").isNotNull(), text)))


def classify_song_records(records: DataFrame) -> DataFrame:
    """Song records with ``reject_reason`` set on the ones no table can use (and their ``record``)."""
    return with_reject_reason(records, _reject_reason(
        (F.coalesce(F.trim("song_id"), F.lit("")) == "", "missing song_id"),
        (F.coalesce(F.trim("artist_id"), F.lit("")) == "", "missing artist_id"),
    ))


def classify_log_events(events: DataFrame) -> DataFrame:
    """Log events with ``reject_reason`` set on the ones no table can use (and their ``record``)."""
    logged_in = F.col("userId") != ""
    return with_reject_reason(events, _reject_reason(
        (F.col("ts").isNull(), "missing ts"),
        (F.col("page").isNull(), "missing page"),
        (F.col("userId").isNull(), "missing userId"),
        # Digits only, and few enough to fit the int user_id column.
        (logged_in & ~F.col("userId").rlike(r"^[0-9]{1,9}$"), "userId is not a number"),
        ((F.col("page") == "NextSong") & ~logged_in, "NextSong event without a userId"),
        ((F.col("page") == "NextSong") & (F.col("sessionId").isNull() | F.col("itemInSession").isNull()),
         "NextSong event without sessionId or itemInSession"),
    ))


def quarantine_records(classified: DataFrame) -> DataFrame:
    """Rejected records with their file, their reason and their text."""
    return classified.where(F.col("reject_reason").isNotNull()).select(*QUARANTINE_COLUMNS)


def accepted_records(classified: DataFrame) -> DataFrame:
    return classified.where(F.col("reject_reason").isNull()).drop(CORRUPT_RECORD, "reject_reason", "record",
                                                                   "source_file_size")


def one_record_per_key(frame: DataFrame, key: Sequence[str], order: Sequence[str],
                       columns: Sequence[str], highest: bool = False) -> DataFrame:
    """One row per ``key``: the ``columns`` of the record whose (``order``, ``columns``) sorts
    first (or last). Picking a whole struct keeps every column from one source record, and
    the full ordering makes the pick the same on every run."""
    pick = F.max if highest else F.min
    picked = frame.groupBy(*key).agg(pick(F.struct(*order, *columns)).alias("picked"))
    return picked.select(*key, *(F.col(f"picked.{column}").alias(column) for column in columns))


def songs_table(songs: DataFrame) -> DataFrame:
    """One row per song_id; a song_id seen twice keeps its smallest record."""
    return one_record_per_key(songs, ["song_id"], [], ["title", "artist_id", "year", "duration"]).select(
        "song_id", "title", "artist_id",
        F.col("year").cast("int").alias("year"),
        F.col("duration").cast("double").alias("duration"),
    )


def artists_table(songs: DataFrame) -> DataFrame:
    """One row per artist_id, every column from one song record: the most complete, then
    the one with the smallest song_id, so spellings are never mixed and reruns agree."""
    def unknown(column: str) -> Column:
        return F.when(F.col(column).isNull() | (F.col(column).cast("string") == ""), 1).otherwise(0)

    ranked = songs.withColumn("unknown_fields", unknown("artist_name") + unknown("artist_location")
                              + unknown("artist_latitude") + unknown("artist_longitude"))
    picked = one_record_per_key(ranked, ["artist_id"], ["unknown_fields", "song_id"],
                                ["artist_name", "artist_location", "artist_latitude", "artist_longitude"])
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
    return one_record_per_key(events.where(F.col("userId") != ""), ["userId"], [], USER_EVENT_COLUMNS,
                              highest=True)


def merge_latest_user_events(previous: DataFrame, latest: DataFrame) -> DataFrame:
    """Latest events from earlier runs and this one: the later event wins, whichever run saw it."""
    return one_record_per_key(previous.unionByName(latest), ["userId"], [], USER_EVENT_COLUMNS, highest=True)


def users_table(events: DataFrame) -> DataFrame:
    """One row per logged-in user, named and levelled by their latest event."""
    return users_from_latest_events(latest_user_events(events))


def users_from_latest_events(latest: DataFrame) -> DataFrame:
    return latest.select(
        F.col("userId").cast("int").alias("user_id"),
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
        F.col("userId").cast("int").alias("user_id"),
        F.col("sessionId").alias("session_id"),
        F.col("itemInSession").alias("item_in_session"),
        "ts", *PLAY_COLUMNS,
    )


def repeated_plays(plays: DataFrame) -> DataFrame:
    """The play keys that more than one row of ``plays`` has, with their ``copies``."""
    return plays.groupBy(*PLAY_KEY).agg(F.count(F.lit(1)).alias("copies")).where(F.col("copies") > 1)


def distinct_plays(events: DataFrame, repeated: DataFrame | None = None) -> DataFrame:
    """One row per NextSong event; an event delivered twice keeps one copy (the same one
    every run, should two copies ever differ).

    ``repeated``: the ``repeated_plays`` of these events, when known. Only their plays are
    then sorted to pick a copy, and every other play passes through: re-deliveries are
    rare, and sorting all plays (twice, around a 690 MB shuffle at 2.5 M plays) was most
    of building songplays.
    """
    plays = next_song_plays(events)
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
    utc_date = utc_day(seconds)
    return {
        "hour": F.pmod(F.floor(seconds / 3600), F.lit(24)).cast("int"),
        "day": F.dayofmonth(utc_date),
        "week": F.weekofyear(utc_date),  # ISO-8601: weeks start on Monday
        "month": F.month(utc_date),
        "year": F.year(utc_date),
        "weekday": (F.pmod(F.dayofweek(utc_date) + 5, F.lit(7)) + 1).cast("int"),  # Monday 1 .. Sunday 7
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
    """The (year, month) partitions a load window touches, as they must read afterwards:
    the rows already there from outside the window, plus the window's fresh rows."""
    inside = within_days(utc_day(F.col("start_time").cast("long")), since, until)
    touched = (fresh.select("year", "month")
               .unionByName(existing.where(inside).select("year", "month")).distinct())
    kept = existing.join(touched, ["year", "month"], "left_semi").where(~inside)
    return kept.unionByName(fresh.select(*existing.columns))


def songplay_id(user_id: Column, session_id: Column, item_in_session: Column, ts: Column) -> Column:
    """A deterministic id from the event's identity: the same event gets it on every run."""
    return F.md5(F.concat_ws("|", user_id, session_id, item_in_session, ts))


def songplays_table(plays: DataFrame, matches: DataFrame) -> DataFrame:
    """The fact table: every play, with its song and artist when the catalogue has them."""
    calendar = utc_calendar(F.col("start_time"))
    matched = plays.join(
        F.broadcast(matches),
        on=[plays.song == matches.title, plays.artist == matches.artist_name,
            plays.length == matches.duration],
        how="left",
    )
    return (
        matched
        .withColumn("start_time", F.timestamp_millis(F.col("ts")))
        .select(
            songplay_id(F.col("user_id"), F.col("session_id"), F.col("item_in_session"), F.col("ts"))
            .alias("songplay_id"),
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
    )


def time_table(songplays: DataFrame) -> DataFrame:
    """One row per distinct songplays start_time, with its UTC calendar parts."""
    calendar = utc_calendar(F.col("start_time"))
    return songplays.select("start_time").distinct().select(
        "start_time", *(calendar[part].alias(part) for part in
                        ("hour", "day", "week", "month", "year", "weekday"))
    )


# =============================================================================
# Checks: the quality gate every table passes before any is written
# =============================================================================

@dataclass
class CheckResult:
    table: str
    check: str
    passed: bool
    detail: str
    examples: list[str] = field(default_factory=list)


TABLE_KEYS = {"songs": "song_id", "artists": "artist_id", "users": "user_id",
              "songplays": "songplay_id", "time": "start_time"}


def key_checks(name: str, table: DataFrame, key: str) -> tuple[int, list[CheckResult]]:
    """The table's row count, and whether ``key`` is set on every row and names one row only."""
    # As many distinct 64-bit hashes as keys proves the keys distinct, and counting hashes
    # costs a third of counting 2.5 M songplay_id strings. Only when two hashes agree (a
    # repeated key, or a collision) are the keys themselves counted.
    key_hash = F.when(F.col(key).isNotNull(), F.xxhash64(key))
    counts = table.agg(F.count(F.lit(1)).alias("rows"), F.count(key).alias("keyed"),
                       F.count_distinct(key_hash).alias("hashes")).first()
    distinct = counts["hashes"]
    if distinct != counts["keyed"]:
        distinct = table.agg(F.count_distinct(key)).first()[0]
    missing, repeated = counts["rows"] - counts["keyed"], counts["keyed"] - distinct
    examples = [] if not repeated else [
        str(row[key]) for row in table.where(F.col(key).isNotNull()).groupBy(key).count()
        .where("count > 1").orderBy(key).limit(3).collect()]
    return counts["rows"], [
        CheckResult(name, f"{key} is never null", missing == 0, f"{missing:,} of {counts['rows']:,} rows have no {key}"),
        CheckResult(name, f"{key} is unique", repeated == 0, f"{repeated:,} rows repeat a {key}", examples),
    ]


def reference_check(name: str, table: DataFrame, column: str, parent_name: str, parent: DataFrame) -> CheckResult:
    """Every non-null ``column`` value of ``table`` is a key of ``parent``."""
    orphans = (table.where(F.col(column).isNotNull()).select(column).distinct()
               .join(parent.select(column), column, "left_anti"))
    examples = [str(row[column]) for row in orphans.orderBy(column).limit(3).collect()]
    missing = orphans.count() if examples else 0
    return CheckResult(name, f"{column} references {parent_name}", not examples,
                       f"{missing:,} {column} values missing from {parent_name}", examples)


def count_check(name: str, check: str, actual: int, expected: int, unit: str) -> CheckResult:
    return CheckResult(name, check, actual == expected, f"{actual:,} {unit}, expected {expected:,}")


def distinct_event_count(plays: DataFrame, repeated: DataFrame) -> int:
    """How many distinct events ``plays`` holds, counted apart from songplays: its rows,
    less the extra copies of the ``repeated_plays``."""
    extra_copies = repeated.agg(F.sum(F.col("copies") - 1)).first()[0] or 0
    return plays.count() - extra_copies


def quality_gate(tables: dict[str, DataFrame], fresh_songplays: DataFrame, distinct_events: int,
                 batches: Sequence["SourceBatch"]) -> tuple[list[CheckResult], dict[str, int]]:
    """Keys, references and reconciliation, on the tables exactly as they will be written;
    also each table's row count.

    ``fresh_songplays`` are this run's plays (in an incremental load, ``tables`` holds the
    touched partitions merged with what was there); ``distinct_events`` how many distinct
    NextSong events the accepted records hold, counted from them. The checks are small
    jobs, run side by side so both cores stay busy.
    """
    songplays = tables["songplays"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        keyed = {name: pool.submit(key_checks, name, tables[name], key) for name, key in TABLE_KEYS.items()}
        references = [pool.submit(reference_check, "songplays", songplays, column, parent, tables[parent])
                      for column, parent in (("user_id", "users"), ("start_time", "time"),
                                             ("song_id", "songs"), ("artist_id", "artists"))]
        fresh_count = None if fresh_songplays is songplays else pool.submit(fresh_songplays.count)
    results, rows = [], {}
    for name, checks in keyed.items():
        rows[name], table_checks = checks.result()
        results += table_checks
    results += [reference.result() for reference in references]
    fresh_rows = rows["songplays"] if fresh_count is None else fresh_count.result()
    results.append(count_check("songplays", "one row per distinct NextSong event", fresh_rows,
                               distinct_events, "rows"))
    for batch in batches:
        results.append(count_check(batch.dataset, "records read = accepted + quarantined",
                                   batch.accepted + batch.quarantined, batch.records, "accepted + quarantined"))
    return results, rows


def enforce_quality_gate(results: Sequence[CheckResult]) -> None:
    failed = [result for result in results if not result.passed]
    if failed:
        lines = [f"  - {r.table}: {r.check} failed: {r.detail}"
                 + (f" (e.g. {', '.join(r.examples)})" if r.examples else "") for r in failed]
        raise EtlError("The quality gate failed, so no table was written:\n" + "\n".join(lines))


def enforce_reject_limit(batch: "SourceBatch", limit: float, output_root: str) -> None:
    """Too many unusable records means the input, not a few records, is wrong: stop."""
    if batch.records and batch.quarantined / batch.records > limit:
        reasons = ", ".join(f"{reason}: {count:,}" for reason, count in sorted(batch.rejects.items()))
        raise EtlError(
            f"{batch.quarantined:,} of {batch.records:,} {batch.dataset} records "
            f"({batch.quarantined / batch.records:.1%}) were quarantined, more than the {limit:.1%} allowed "
            f"(--max-reject-rate or [ETL] MAX_REJECT_RATE), so no table was written. The records, "
            f"with their files and reasons, are in {output_root}/_quarantine/{batch.dataset}/ ({reasons}).")


# =============================================================================
# Load
# =============================================================================

@dataclass(frozen=True)
class TableSpec:
    name: str
    partition_by: tuple[str, ...] = ()
    sort_by: tuple[str, ...] = ()
    writer_options: tuple[tuple[str, str], ...] = ()


# Nearly every songs folder holds one or two rows: compression and dictionaries save
# nothing there, while setting them up costs time in each of ~14,000 files.
SONGS = TableSpec("songs", ("year", "artist_id"), ("song_id",),
                  (("compression", "uncompressed"), ("parquet.enable.dictionary", "false")))
ARTISTS = TableSpec("artists", (), ("artist_id",))
USERS = TableSpec("users", (), ("user_id",))
TIME = TableSpec("time", ("year", "month"), ("start_time",))
SONGPLAYS = TableSpec("songplays", ("year", "month"), ("start_time", "songplay_id"))
# In write order: the biggest single-task writes first (see load).
TABLE_SPECS = (SONGPLAYS, TIME, SONGS, USERS, ARTISTS)
# Each user's latest event so far, kept for incremental loads to merge with.
USER_STATE = TableSpec("_state/user_latest_event", (), ("userId",))


def write_table(table: DataFrame, spec: TableSpec, output_root: str, replace_partitions: bool = False) -> None:
    """Write one table as parquet, one file per partition folder.

    ``replace_partitions``: replace only the partition folders ``table`` has rows for
    (dynamic partition overwrite), leaving every other one as it is. Spark writes no
    _SUCCESS marker then, so the table's marker is removed first and written after the
    commit: a table whose partitions were being replaced when a run died reads incomplete.
    """
    spark = table.sparkSession
    location = table_path(output_root, spec.name)
    marker, fs = hadoop_path(spark, f"{location}/_SUCCESS")
    if replace_partitions:
        fs.delete(marker, False)
    if spec.partition_by:
        # Every row of a partition folder goes to the same task, so each folder gets one
        # file; a fixed task count keeps AQE from merging the writes onto one core. Four
        # tasks per core keep them short, so the one-task songplays and time writes that
        # run beside the songs write get a core soon after they are ready.
        writers = spark.sparkContext.defaultParallelism * 4
        arranged = table.repartition(writers, *spec.partition_by)
    else:
        arranged = table.repartition(1)
    (
        arranged.sortWithinPartitions(*spec.partition_by, *spec.sort_by)
        .write.mode("overwrite")
        .option("partitionOverwriteMode", "dynamic" if replace_partitions else "static")
        .options(**dict(spec.writer_options))
        .partitionBy(*spec.partition_by)
        .parquet(location)
    )
    if replace_partitions:
        write_text(spark, f"{location}/_SUCCESS", "")
    log.info("wrote %s", spec.name)


def write_quarantine(rejected: DataFrame, dataset: str, output_root: str) -> int:
    """Keep rejected records as JSON lines under ``_quarantine/<dataset>/``; return how many
    records the written files hold, counted by reading them back."""
    location = table_path(output_root, f"_quarantine/{dataset}")
    (rejected.repartition(1).sortWithinPartitions(*QUARANTINE_COLUMNS)
     .write.mode("overwrite").json(location))
    return rejected.sparkSession.read.text(location).count()


def hadoop_path(spark: SparkSession, uri: str):
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path, path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())


def is_committed(spark: SparkSession, output_root: str, name: str) -> bool:
    """Whether an earlier run wrote the table completely; False when there is none, and an
    error for an incomplete one (its writer stopped before the _SUCCESS marker)."""
    location = table_path(output_root, name)
    folder, fs = hadoop_path(spark, location)
    if not fs.exists(folder):
        return False
    if not fs.exists(hadoop_path(spark, f"{location}/_SUCCESS")[0]):
        raise EtlError(f"{location} is incomplete (no _SUCCESS: the run writing it stopped early), so an "
                       "incremental load cannot build on it. Run a full load (without --since/--until) first.")
    return True


def committed_table(spark: SparkSession, output_root: str, name: str) -> DataFrame | None:
    """A table an earlier run wrote completely, or None when there is none."""
    if not is_committed(spark, output_root, name):
        return None
    # Cut the lineage to the files: the merged result is written back over them.
    return spark.read.parquet(table_path(output_root, name)).localCheckpoint()


def write_text(spark: SparkSession, uri: str, text: str) -> None:
    """One small file through Hadoop's filesystem, so any root Spark writes to works."""
    path, fs = hadoop_path(spark, uri)
    stream = fs.create(path, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()


# =============================================================================
# Run report: what a run read, wrote, checked and how long it took, under _runs/
# =============================================================================

def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class RunReport:
    run_id: str
    started_at: str
    settings: dict[str, object]
    mode: str
    spark_version: str
    output_filesystem: str  # the Hadoop FileSystem class that writes the tables
    etl_version: str = __version__
    status: str = "running"
    finished_at: str | None = None
    error: str | None = None
    inputs: dict[str, dict[str, object]] = field(default_factory=dict)
    tables: dict[str, dict[str, object]] = field(default_factory=dict)
    checks: list[dict[str, object]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, spark: SparkSession, settings: Settings) -> "RunReport":
        moment = datetime.now(timezone.utc)
        _, output_fs = hadoop_path(spark, settings.output_root)
        return cls(run_id=f"{moment:%Y%m%dT%H%M%SZ}-{os.urandom(3).hex()}", started_at=utc_now(),
                   settings=settings.redacted(), mode="incremental" if settings.incremental() else "full",
                   spark_version=spark.version, output_filesystem=output_fs.getClass().getName())

    def timed(self, stage: str, step, *args):
        started = time.monotonic()
        try:
            return step(*args)
        finally:
            self.stages[stage] = round(time.monotonic() - started, 3)

    def finish(self, error: BaseException | None) -> None:
        self.finished_at = utc_now()
        self.status = "failed" if error else "succeeded"
        if error is not None:
            self.error = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if isinstance(error, EtlError):
                self.error = str(error)

    def location(self, output_root: str) -> str:
        return table_path(output_root, f"_runs/{self.run_id}.json")

    def save(self, spark: SparkSession, output_root: str) -> None:
        write_text(spark, self.location(output_root), json.dumps(asdict(self), indent=2, default=str) + "\n")


def summary(report: RunReport, output_root: str) -> str:
    """The closing summary, drawn from the run report."""
    lines = [f"Sparkify ETL finished ({report.mode} load): tables in {output_root}/"]
    for table, facts in report.tables.items():
        lines.append(f"  {table:<10} {facts['rows']:>12,} rows")
    for dataset, facts in report.inputs.items():
        quarantined = facts["quarantined"]
        detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(facts["rejects"].items()))
        where = f" -> {output_root}/_quarantine/{dataset}/ ({detail})" if quarantined else ""
        lines.append(f"  quarantined from {dataset}: {quarantined:,}{where}")
    passed = sum(check["passed"] for check in report.checks)
    lines.append(f"  quality checks passed: {passed} of {len(report.checks)}")
    for stage, seconds in report.stages.items():
        lines.append(f"  {stage:<18} {seconds:8.1f} s")
    lines.append(f"  {'total':<18} {sum(report.stages.values()):8.1f} s")
    lines.append(f"  run report: {report.location(output_root)}")
    return "\n".join(lines)


# =============================================================================
# Stages
# =============================================================================

@dataclass
class SourceBatch:
    """One input dataset, read once and classified: what is usable, what is not, how much."""
    dataset: str
    accepted_records: DataFrame
    rejected_records: DataFrame
    files: int
    bytes: int
    records: int
    accepted: int
    rejects: dict[str, int]
    quarantined: int = 0  # records written to the quarantine

    def facts(self) -> dict[str, object]:
        return {"files": self.files, "bytes": self.bytes, "records": self.records, "accepted": self.accepted,
                "quarantined": self.quarantined, "rejects": self.rejects}


def load_and_classify(spark: SparkSession, root: str, dataset: str, schema: T.StructType, classify,
                      unused_fields: Sequence[str] = ()) -> SourceBatch:
    """Read a dataset once and split it into accepted and rejected records, counted.

    Only what later steps read is cached: rejected records carry their text, so the raw
    line and the ``unused_fields`` are left out (3 M events: 218 MiB cached before, 187 now).
    """
    classified = (classify(read_json_records(spark, table_path(root, dataset), schema))
                  .drop(CORRUPT_RECORD, *unused_fields).persist())
    # One pass fills the cache and counts the outcome of every record.
    outcome = {row["reject_reason"]: row["count"]
               for row in classified.groupBy("reject_reason").count().collect()}
    accepted = outcome.pop(None, 0)
    if not accepted:
        raise EtlError(f"No usable records in {table_path(root, dataset)} ({sum(outcome.values())} "
                       "rejected, see the quarantine). Check that the input is the Sparkify dataset.")
    files = (classified.select("source_file", "source_file_size").distinct()
             .agg(F.count(F.lit(1)).alias("files"), F.sum("source_file_size").alias("bytes")).first())
    log.info("read %s: %d records accepted, %d quarantined", dataset, accepted, sum(outcome.values()))
    return SourceBatch(dataset, accepted_records(classified), quarantine_records(classified),
                       files=files["files"], bytes=files["bytes"], records=accepted + sum(outcome.values()),
                       accepted=accepted, rejects=outcome)


def extract(spark: SparkSession, settings: Settings, report: RunReport, dataset: str, schema: T.StructType,
            classify, unused_fields: Sequence[str]) -> SourceBatch:
    """Read, classify, quarantine, report; stop when too much of the dataset is unusable."""
    batch = load_and_classify(spark, settings.input_root, dataset, schema, classify, unused_fields)
    batch.quarantined = write_quarantine(batch.rejected_records, dataset, settings.output_root)
    report.inputs[dataset] = batch.facts()
    enforce_reject_limit(batch, settings.max_reject_rate, settings.output_root)
    return batch


@dataclass
class SongTables:
    batch: SourceBatch
    songs: DataFrame
    artists: DataFrame
    matches: DataFrame


@dataclass
class LogTables:
    batch: SourceBatch
    distinct_events: int  # distinct NextSong events in the load window
    users: DataFrame
    user_state: DataFrame
    fresh_songplays: DataFrame  # this window's plays
    songplays: DataFrame  # as written: everything, or the touched partitions in full
    time: DataFrame


def process_song_data(spark: SparkSession, settings: Settings, report: RunReport) -> SongTables:
    """song_data read once: the songs and artists tables, and the lookup plays are matched on."""
    batch = extract(spark, settings, report, "song_data", SONG_SCHEMA, classify_song_records,
                    SONG_FIELDS_NO_TABLE_USES)
    songs = batch.accepted_records
    return SongTables(batch, songs_table(songs).persist(), artists_table(songs).persist(), song_matches(songs))


def process_log_data(spark: SparkSession, settings: Settings, report: RunReport, song_tables: SongTables) -> LogTables:
    """log_data read once: users, songplays and time, merged with earlier loads when only a
    window of days is loaded."""
    batch = extract(spark, settings, report, "log_data", LOG_SCHEMA, classify_log_events, LOG_FIELDS_NO_TABLE_USES)
    events = events_within(batch.accepted_records, settings.since, settings.until)
    latest = latest_user_events(events)
    plays = next_song_plays(events)
    repeated = repeated_plays(plays).persist()
    distinct_events = distinct_event_count(plays, repeated)
    fresh = songplays_table(distinct_plays(events, repeated), song_tables.matches)
    songplays = fresh
    if settings.incremental():
        previous_state = committed_table(spark, settings.output_root, USER_STATE.name)
        if previous_state is None and is_committed(spark, settings.output_root, USERS.name):
            raise EtlError(f"{settings.output_root} has a users table but no {USER_STATE.name}, so users "
                           "cannot be merged. Run a full load (without --since/--until) once first.")
        if previous_state is not None:
            latest = merge_latest_user_events(previous_state, latest)
        existing = committed_table(spark, settings.output_root, SONGPLAYS.name)
        if existing is not None:
            songplays = replace_window(existing, fresh, settings.since, settings.until)
    latest = latest.persist()
    songplays = songplays.persist()
    return LogTables(batch, distinct_events, users_from_latest_events(latest).persist(), latest, fresh, songplays,
                     time_table(songplays).persist())


def load(settings: Settings, tables: dict[str, DataFrame], user_state: DataFrame,
         rows: dict[str, int]) -> dict[str, dict[str, object]]:
    """Write the five tables (and the users state); an incremental load replaces only the
    songplays and time partitions its window touches.

    The writes run side by side: a month of songplays or time is one partition folder, so
    one file written by one task, and the other cores write songs meanwhile. A write that
    fails fails the load once the others end.
    """
    partial = {SONGPLAYS.name, TIME.name} if settings.incremental() else set()
    writes = [(tables[spec.name], spec, spec.name in partial) for spec in TABLE_SPECS]
    writes.append((user_state, USER_STATE, False))
    with ThreadPoolExecutor(max_workers=len(writes)) as pool:
        done = [pool.submit(write_table, table, spec, settings.output_root, replace)
                for table, spec, replace in writes]
    for write in done:
        write.result()
    return {spec.name: {"rows": rows[spec.name],
                        "written": "touched partitions" if spec.name in partial else "whole table"}
            for spec in TABLE_SPECS}


def run(spark: SparkSession, settings: Settings, report: RunReport) -> None:
    """Extract and transform both datasets, check every table, then write them all."""
    song_tables = report.timed("process_song_data", process_song_data, spark, settings, report)
    log_tables = report.timed("process_log_data", process_log_data, spark, settings, report, song_tables)
    tables = {"songs": song_tables.songs, "artists": song_tables.artists, "users": log_tables.users,
              "songplays": log_tables.songplays, "time": log_tables.time}
    results, rows = report.timed("quality_gate", quality_gate, tables, log_tables.fresh_songplays,
                                 log_tables.distinct_events, [song_tables.batch, log_tables.batch])
    report.checks = [asdict(result) for result in results]
    enforce_quality_gate(results)
    report.tables = report.timed("load", load, settings, tables, log_tables.user_state, rows)


# =============================================================================
# CLI
# =============================================================================

def utc_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2018-11-15") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="etl.py",
        description="Build the Sparkify star schema (songplays, users, songs, artists, time) "
                    "as parquet from song_data/ and log_data/ JSON.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help=f"INI settings file (default: ./{DEFAULT_CONFIG} when present)")
    parser.add_argument("--input", metavar="ROOT",
                        help="folder or s3a:// URI holding song_data/ and log_data/ "
                             "(default: the sample dataset in data/sample)")
    parser.add_argument("--output", metavar="ROOT",
                        help=f"folder or s3a:// URI for the tables (default: ./{DEFAULT_OUTPUT})")
    parser.add_argument("--since", metavar="YYYY-MM-DD", type=utc_date,
                        help="incremental load: only log events from this UTC day on; the songplays "
                             "and time partitions the window touches are replaced, users merged")
    parser.add_argument("--until", metavar="YYYY-MM-DD", type=utc_date,
                        help="incremental load: only log events before this UTC day")
    parser.add_argument("--max-reject-rate", metavar="FRACTION",
                        help="share of a dataset's records that may be quarantined before the run "
                             f"fails without writing any table (default {DEFAULT_MAX_REJECT_RATE})")
    parser.add_argument("--verbose", action="store_true",
                        help="log every step and show full stack traces on failure")
    parser.add_argument("--print-packages", action="store_true",
                        help="print the spark-submit flags (--packages ...) that add the S3A "
                             "connector matching this Spark, and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = resolve_settings(args, os.environ)
        if args.print_packages:
            print(shlex.join(spark_submit_options(settings.packages)))
            return 0
        preflight(settings)
        spark = build_spark_session(settings)
        try:
            settings = configure_storage(spark, settings)
            report = RunReport.start(spark, settings)
            save_report(spark, report, settings.output_root)
            try:
                run(spark, settings, report)
                report.finish(None)
            except BaseException as error:
                report.finish(error)
                raise
            finally:
                save_report(spark, report, settings.output_root)
        finally:
            spark.stop()
    except EtlError as error:
        print(f"etl.py: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # Spark and Java errors: one line unless --verbose
        if args.verbose:
            raise
        headline = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"etl.py: the run failed: {headline}\nRun again with --verbose for the full trace.",
              file=sys.stderr)
        return 1
    print(summary(report, settings.output_root))
    return 0


def save_report(spark: SparkSession, report: RunReport, output_root: str) -> None:
    """Write the run report; a report that cannot be written is logged, never masks the run's outcome."""
    try:
        report.save(spark, output_root)
    except Exception as error:  # noqa: BLE001 - the run's own result matters more
        log.warning("could not write the run report %s: %s", report.location(output_root),
                    str(error).splitlines()[0] if str(error) else type(error).__name__)

if __name__ == "__main__":
    sys.exit(main())
