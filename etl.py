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
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import urlparse

from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

__version__ = "1.0.0"

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
    "ETL": ("INPUT", "OUTPUT"),
    "SPARK": ("PACKAGES", "S3A_COMMITTER"),
}
S3A_COMMITTERS = ("magic", "directory", "partitioned", "file")


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

    def uses_s3(self) -> bool:
        return any(root.startswith(("s3a://", "s3://")) for root in (self.input_root, self.output_root))


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
    )


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


def build_spark_session(settings: Settings) -> SparkSession:
    """The one session of a run: UTC, tiny files packed into few read tasks, S3A when needed."""
    builder = (
        SparkSession.builder.appName("sparkify-etl")
        .config("spark.sql.session.timeZone", "UTC")
        # Opening a file costs about as much as reading 64 KB of it, not the 4 MB Spark
        # assumes: this packs thousands of one-record song files into each read task.
        .config("spark.sql.files.openCostInBytes", str(64 * 1024))
        .config("spark.ui.showConsoleProgress", "false")
    )
    master = requested_master()
    if master is None:
        master = "local[*]"
        builder = builder.master(master)
    if settings.output_root.startswith("file://") and not master.startswith("yarn"):
        # Without Hadoop's native library every local file and folder Spark creates costs
        # a forked chmod; the checksummed local filesystem doubles that with a .crc file
        # per file. Thousands of partition files make this most of the run time. (YARN's
        # client cannot stage its uploads through the raw filesystem, so not there.)
        builder = builder.config("spark.hadoop.fs.file.impl", "org.apache.hadoop.fs.RawLocalFileSystem")
    if settings.uses_s3() and not under_spark_submit():
        # Only a JVM this process starts can still take jars; spark-submit passes its own.
        for key, value in connector_confs(settings.packages).items():
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


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


def classify_song_records(records: DataFrame) -> DataFrame:
    """Song records with ``reject_reason`` set on the ones no table can use."""
    return records.withColumn("reject_reason", _reject_reason(
        (F.coalesce(F.trim("song_id"), F.lit("")) == "", "missing song_id"),
        (F.coalesce(F.trim("artist_id"), F.lit("")) == "", "missing artist_id"),
    ))


def classify_log_events(events: DataFrame) -> DataFrame:
    """Log events with ``reject_reason`` set on the ones no table can use."""
    logged_in = F.col("userId") != ""
    return events.withColumn("reject_reason", _reject_reason(
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
    parsed = classified.drop(CORRUPT_RECORD, "source_file", "reject_reason")
    return (
        classified.where(F.col("reject_reason").isNotNull())
        .select("source_file", "reject_reason",
                F.coalesce(F.col(CORRUPT_RECORD), F.to_json(F.struct(*parsed.columns))).alias("record"))
    )


def accepted_records(classified: DataFrame) -> DataFrame:
    return classified.where(F.col("reject_reason").isNull()).drop(CORRUPT_RECORD, "reject_reason")


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


def users_table(events: DataFrame) -> DataFrame:
    """One row per logged-in user, named and levelled by their latest event."""
    latest = one_record_per_key(events.where(F.col("userId") != ""), ["userId"],
                                ["ts", "sessionId", "itemInSession"],
                                ["firstName", "lastName", "gender", "level"], highest=True)
    return latest.select(
        F.col("userId").cast("int").alias("user_id"),
        F.col("firstName").alias("first_name"),
        F.col("lastName").alias("last_name"),
        "gender",
        "level",
    )


def distinct_plays(events: DataFrame) -> DataFrame:
    """One row per NextSong event; an event delivered twice keeps one copy (the same one
    every run, should two copies ever differ)."""
    plays = events.where(F.col("page") == "NextSong").select(
        F.col("userId").cast("int").alias("user_id"),
        F.col("sessionId").alias("session_id"),
        F.col("itemInSession").alias("item_in_session"),
        "ts", "level", "song", "artist", "length", "location", "userAgent",
    )
    return one_record_per_key(plays, ["user_id", "session_id", "item_in_session", "ts"], [],
                              ["level", "song", "artist", "length", "location", "userAgent"])


def utc_calendar(timestamp: Column) -> dict[str, Column]:
    """Hour, day, ISO week, month, year and ISO weekday of an instant, in UTC.

    Computed from epoch seconds and dates, which carry no time zone, so the result is
    the same whatever the session or machine time zone is.
    """
    seconds = timestamp.cast("long")
    utc_date = F.date_from_unix_date(F.floor(seconds / 86400).cast("int"))
    return {
        "hour": F.pmod(F.floor(seconds / 3600), F.lit(24)).cast("int"),
        "day": F.dayofmonth(utc_date),
        "week": F.weekofyear(utc_date),  # ISO-8601: weeks start on Monday
        "month": F.month(utc_date),
        "year": F.year(utc_date),
        "weekday": (F.pmod(F.dayofweek(utc_date) + 5, F.lit(7)) + 1).cast("int"),  # Monday 1 .. Sunday 7
    }


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


def write_table(table: DataFrame, spec: TableSpec, output_root: str) -> int:
    """Write one table as parquet, one file per partition folder; return its row count."""
    spark = table.sparkSession
    if spec.partition_by:
        # Every row of a partition folder goes to the same task, so each folder gets one
        # file; a fixed task count keeps AQE from merging the writes onto one core.
        writers = spark.sparkContext.defaultParallelism * 2
        arranged = table.repartition(writers, *spec.partition_by)
    else:
        arranged = table.repartition(1)
    rows = Observation()  # counted while writing, at no extra job
    (
        arranged.observe(rows, F.count(F.lit(1)).alias("rows"))
        .sortWithinPartitions(*spec.partition_by, *spec.sort_by)
        .write.mode("overwrite")
        .options(**dict(spec.writer_options))
        .partitionBy(*spec.partition_by)
        .parquet(table_path(output_root, spec.name))
    )
    count = rows.get["rows"]
    log.info("wrote %s: %d rows", spec.name, count)
    return count


def write_quarantine(rejected: DataFrame, dataset: str, output_root: str) -> None:
    """Keep rejected records as JSON lines under ``_quarantine/<dataset>/``."""
    (rejected.repartition(1).sortWithinPartitions(*QUARANTINE_COLUMNS)
     .write.mode("overwrite").json(table_path(output_root, f"_quarantine/{dataset}")))


# =============================================================================
# Stages
# =============================================================================

@dataclass
class StageReport:
    name: str
    dataset: str
    seconds: float = 0.0
    rows: dict[str, int] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)


def load_and_classify(spark: SparkSession, root: str, dataset: str, schema: T.StructType,
                      classify) -> tuple[DataFrame, DataFrame, dict[str, int]]:
    """Read a dataset once and split it: (accepted, rejected, rejects by reason)."""
    classified = classify(read_json_records(spark, table_path(root, dataset), schema)).persist()
    # One pass fills the cache and counts the outcome of every record.
    outcome = {row["reject_reason"]: row["count"]
               for row in classified.groupBy("reject_reason").count().collect()}
    accepted = outcome.pop(None, 0)
    if not accepted:
        raise EtlError(f"No usable records in {table_path(root, dataset)} ({sum(outcome.values())} "
                       "rejected, see the quarantine). Check that the input is the Sparkify dataset.")
    log.info("read %s: %d records accepted, %d quarantined", dataset, accepted, sum(outcome.values()))
    return accepted_records(classified), quarantine_records(classified), outcome


def process_song_data(spark: SparkSession, input_root: str, output_root: str) -> tuple[DataFrame, StageReport]:
    """Read song_data once; write songs and artists; return the song records for matching."""
    started = time.monotonic()
    report = StageReport("process_song_data", "song_data")
    songs, rejected, report.rejects = load_and_classify(
        spark, input_root, "song_data", SONG_SCHEMA, classify_song_records)
    write_quarantine(rejected, "song_data", output_root)
    report.rows["songs"] = write_table(songs_table(songs), SONGS, output_root)
    report.rows["artists"] = write_table(artists_table(songs), ARTISTS, output_root)
    report.seconds = time.monotonic() - started
    return songs, report


def process_log_data(spark: SparkSession, input_root: str, output_root: str,
                     songs: DataFrame) -> StageReport:
    """Read log_data once; write users, songplays and time."""
    started = time.monotonic()
    report = StageReport("process_log_data", "log_data")
    events, rejected, report.rejects = load_and_classify(
        spark, input_root, "log_data", LOG_SCHEMA, classify_log_events)
    write_quarantine(rejected, "log_data", output_root)
    report.rows["users"] = write_table(users_table(events), USERS, output_root)
    songplays = songplays_table(distinct_plays(events), song_matches(songs)).persist()
    report.rows["songplays"] = write_table(songplays, SONGPLAYS, output_root)
    report.rows["time"] = write_table(time_table(songplays), TIME, output_root)
    songplays.unpersist()
    report.seconds = time.monotonic() - started
    return report


def run(spark: SparkSession, settings: Settings) -> list[StageReport]:
    songs, song_report = process_song_data(spark, settings.input_root, settings.output_root)
    log_report = process_log_data(spark, settings.input_root, settings.output_root, songs)
    return [song_report, log_report]


def summary(reports: Sequence[StageReport], output_root: str) -> str:
    """The closing summary: rows per table, records quarantined, seconds per stage."""
    lines = [f"Sparkify ETL finished: tables in {output_root}/"]
    for report in reports:
        for table, rows in report.rows.items():
            lines.append(f"  {table:<10} {rows:>12,} rows")
    for report in reports:
        quarantined = sum(report.rejects.values())
        detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(report.rejects.items()))
        where = f" -> {output_root}/_quarantine/{report.dataset}/ ({detail})" if quarantined else ""
        lines.append(f"  quarantined from {report.dataset}: {quarantined:,}{where}")
    for report in reports:
        lines.append(f"  {report.name:<18} {report.seconds:8.1f} s")
    lines.append(f"  {'total':<18} {sum(r.seconds for r in reports):8.1f} s")
    return "\n".join(lines)


# =============================================================================
# CLI
# =============================================================================

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
            reports = run(spark, settings)
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
    print(summary(reports, settings.output_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
