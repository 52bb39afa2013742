"""How Spark writes to S3: the S3A settings and the committer, decided once the session is up."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pyspark.sql import SparkSession

from .errors import EtlError
from .jars import jvm_has_class
from .s3 import is_s3
from .settings import Settings
from .writing import Committer, SparkOutput, local_output


def s3a_options(settings: Settings, committer: str, local_master: bool) -> dict[str, str]:
    """Hadoop settings for S3A: credentials, endpoint, requests in flight, committer."""
    options = {
        # Thousands of small files to upload and commit: many requests in flight.
        "fs.s3a.connection.maximum": "200",
        "fs.s3a.threads.max": "64",
        "fs.s3a.committer.threads": "64",
        "fs.s3a.committer.name": committer,
        "fs.s3a.committer.magic.enabled": "true",
        # Magic committer (clusters without HDFS): the list of a task's uploads stays in its
        # memory until the task commits, instead of two objects per file (Hadoop 3.3.6+).
        "fs.s3a.committer.magic.track.commits.in.memory.enabled": "true",
        "fs.s3a.committer.abort.pending.uploads": "true",
        # New files go beside the old ones (publish.S3Commits deletes the old ones once the new
        # are committed): "replace" would delete the folder during the job commit, "fail" refuse it.
        "fs.s3a.committer.staging.conflict-mode": "append",
        "mapreduce.outputcommitter.factory.scheme.s3a": "org.apache.hadoop.fs.s3a.commit.S3ACommitterFactory",
        # Keep folder markers: deleting them costs a request for every file written (Hadoop 3.3).
        "fs.s3a.directory.marker.retention": "keep",
        # Delta writes its files straight to their keys: without this, each create costs
        # probes (three HEADs and a LIST) for a file that cannot exist (Hadoop 3.4 and later).
        "fs.s3a.create.performance": "true",
    }
    if local_master:
        # The staging committer keeps its list of uploads on the cluster filesystem: in a
        # local run that is this machine's temporary folder, not the working folder.
        options["fs.s3a.committer.staging.tmp.path"] = Path(tempfile.gettempdir(), "sparkify-s3a-staging").as_uri()
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
        # S3-compatible stores differ in the ETag/version semantics S3A checks on reads,
        # and many reject the checksums newer AWS SDKs send by default.
        options["fs.s3a.change.detection.mode"] = "none"
        options["fs.s3a.checksum.generation"] = "false"
    return options


def configure_output(spark: SparkSession, settings: Settings) -> SparkOutput:
    """Point S3A at the store and the table writes at its committer; return how Spark
    reaches the output root (``s3://`` is EMRFS on EMR, S3A elsewhere).

    Only the output goes through Spark's filesystems: the input is fetched by the tasks
    themselves. Credentials go into the driver's Hadoop configuration, not the Spark
    conf: they stay off the command line, the Spark UI and the event log, and still reach
    executors with each job's serialized Hadoop configuration.
    """
    if not is_s3(settings.output_root):
        return local_output(settings.output_root)
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
    root = settings.output_root
    if root.startswith("s3://"):
        if hadoop_conf.get("fs.s3.impl") is not None:
            return SparkOutput(root, Committer.EMRFS)  # EMR's own committer and credentials
        root = "s3a://" + root[len("s3://") :]
    if not jvm_has_class(spark, "org.apache.hadoop.fs.s3a.S3AFileSystem"):
        hadoop = spark.sparkContext._jvm.org.apache.hadoop.util.VersionInfo.getVersion()
        raise EtlError(
            "This Spark has no S3A connector, so it cannot write s3a:// URIs. With spark-submit, add "
            f"--packages org.apache.hadoop:hadoop-aws:{hadoop} (the version of this Spark's Hadoop; "
            "`python etl.py --print-packages` prints the flags); python etl.py adds it by itself, and "
            "EMR ships it."
        )
    if not jvm_has_class(spark, "org.apache.spark.internal.io.cloud.PathOutputCommitProtocol"):
        raise EtlError(
            "spark-hadoop-cloud is missing, so Spark would write S3 tables by copying and deleting "
            "files, visible while half-written. Add it: `python etl.py --print-packages` prints the "
            "spark-submit flags."
        )
    master = spark.sparkContext.master
    # The staging committer needs a filesystem every task and the driver share (HDFS on
    # YARN, the local disk in local mode) for its lists of uploads; elsewhere, magic.
    committer = settings.s3a_committer or ("directory" if master.startswith(("local", "yarn")) else "magic")
    for key, value in s3a_options(settings, committer, master.startswith("local")).items():
        hadoop_conf.set(key, value)
    spark.conf.set(
        "spark.sql.sources.commitProtocolClass", "org.apache.spark.internal.io.cloud.PathOutputCommitProtocol"
    )
    spark.conf.set(
        "spark.sql.parquet.output.committer.class", "org.apache.spark.internal.io.cloud.BindingParquetOutputCommitter"
    )
    return SparkOutput(root, Committer(committer))
