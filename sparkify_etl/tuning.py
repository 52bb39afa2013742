"""Every setting that is there for speed alone, each measured in docs/PERFORMANCE.md."""

from __future__ import annotations

from pyspark.sql import SparkSession

from .jars import jvm_has_class
from .s3 import is_s3
from .settings import Settings

# The tables are small: Spark's default of 200 shuffle tasks costs more in scheduling and
# tiny files than the shuffles do work. Applies unless spark.sql.shuffle.partitions is set.
SHUFFLE_TASKS_PER_CORE = 2


def size_shuffles(spark: SparkSession) -> None:
    if not spark.sparkContext.getConf().contains("spark.sql.shuffle.partitions"):
        spark.conf.set(
            "spark.sql.shuffle.partitions", str(spark.sparkContext.defaultParallelism * SHUFFLE_TASKS_PER_CORE)
        )


# Local runs (python etl.py) only: Hadoop's local filesystem through Java NIO (see jars.LOCAL_RUN_PACKAGES).
NIO_LOCAL_FS_CLASS = "com.globalmentor.apache.hadoop.fs.NakedLocalFileSystem"  # raw: no .crc files
# The same with Hadoop's checksums, a LocalFileSystem, as the S3A staging committer needs
# for the files it stages on local disk before uploading them.
NIO_CHECKSUMMED_FS_CLASS = "com.globalmentor.apache.hadoop.fs.BareLocalFileSystem"


def tune_local_session(spark: SparkSession, settings: Settings) -> None:
    """Write local files through the NIO filesystem when its jar could be loaded: the
    tables of a local output, or the files an S3 output stages on local disk."""
    name = NIO_CHECKSUMMED_FS_CLASS if is_s3(settings.output_root) else NIO_LOCAL_FS_CLASS
    if not jvm_has_class(spark, name):
        return
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
    hadoop_conf.set("fs.file.impl", name)
    # A file:// filesystem cached before the jar was loaded would be used otherwise.
    hadoop_conf.set("fs.file.impl.disable.cache", "true")
