"""The jars a run needs from Maven Central: the S3A connector and Delta Lake."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pyspark.sql import SparkSession

from .errors import EtlError
from .s3 import is_s3
from .settings import Settings


def delta_package(spark_version: str) -> str:
    """The delta-spark artifact for a Spark line; an error naming the supported lines."""
    line = ".".join(spark_version.split(".")[:2])
    packages = {
        "3.5": "io.delta:delta-spark_2.12:3.3.2",
        "4.0": "io.delta:delta-spark_4.0_2.13:4.4.0",
        "4.1": "io.delta:delta-spark_4.1_2.13:4.4.0",
        "4.2": "io.delta:delta-spark_4.2_2.13:4.4.0",
    }
    if line not in packages:
        raise EtlError(
            f"--format delta needs Delta Lake for Spark {line}, and none is published: Delta Lake "
            f"supports Spark {', '.join(packages)}. Install one of those pyspark lines "
            f"(pip install 'pyspark=={sorted(packages)[-1]}.*'), or write parquet (--format parquet)."
        )
    return packages[line]


DELTA_SESSION = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}

# Without Hadoop's native library (pyspark ships none) Hadoop's local filesystem sets the
# permissions of every file it writes by forking `chmod`. This filesystem (Apache-2.0;
# Hadoop's raw local filesystem, setting permissions through Java NIO) writes the same
# files without forking: thousands of song partition folders are written several times
# faster.
NIO_LOCAL_FS_PACKAGE = "com.globalmentor:hadoop-bare-naked-local-fs:0.1.0"
LOCAL_RUN_PACKAGES = (NIO_LOCAL_FS_PACKAGE,)

# Transitive dependencies of spark-hadoop-cloud and delta-spark that Spark already ships,
# or that serve other clouds: left out, they can neither clash with Spark's own versions
# nor cost downloads.
SHIPPED_WITH_SPARK = (
    "com.google.cloud.bigdataoss:gcs-connector",
    "org.apache.hadoop:hadoop-azure",
    "org.apache.hadoop:hadoop-azure-datalake",
    "org.apache.hadoop:hadoop-cloud-storage",
    "org.apache.hadoop:hadoop-huaweicloud",
    "org.apache.hadoop:hadoop-aliyun",
    "org.apache.hadoop:hadoop-openstack",
    "org.apache.hadoop:hadoop-client-api",
    "org.apache.hadoop:hadoop-client-runtime",
    "com.fasterxml.jackson.core:jackson-core",
    "com.fasterxml.jackson.core:jackson-databind",
    "com.fasterxml.jackson.core:jackson-annotations",
    "com.fasterxml.jackson.dataformat:jackson-dataformat-cbor",
    "org.slf4j:slf4j-api",
    "commons-codec:commons-codec",
    "org.apache.httpcomponents:httpclient",
    "org.apache.httpcomponents:httpcore",
    "joda-time:joda-time",
    "org.eclipse.jetty:jetty-util",
    "org.eclipse.jetty:jetty-util-ajax",
    "com.squareup.okhttp3:okhttp",
    "com.squareup.okio:okio",
    "org.apache.logging.log4j:log4j-api",
    "org.apache.logging.log4j:log4j-core",
    "org.apache.logging.log4j:log4j-slf4j2-impl",
    "org.apache.parquet:parquet-column",
    "org.apache.parquet:parquet-common",
    "org.apache.parquet:parquet-encoding",
    "org.apache.parquet:parquet-format-structures",
    "org.apache.parquet:parquet-hadoop",
    "org.apache.parquet:parquet-jackson",
    "org.xerial.snappy:snappy-java",
    "com.github.luben:zstd-jni",
    "org.roaringbitmap:RoaringBitmap",
    "com.google.code.findbugs:jsr305",
    "io.airlift:aircompressor",
    "org.antlr:antlr4-runtime",
)
# spark-hadoop-cloud, Spark's binding to the S3A committers, by Spark line: the newest
# release of each. It is not published past 4.1; newer lines load 4.1's classes.
CLOUD_BINDINGS = {"3.5": "3.5.8", "4.0": "4.0.2", "4.1": "4.1.2"}
# Jars come from Maven Central alone: Spark's default resolvers also look in ~/.m2, where
# a POM that Maven fetched without its jar makes the resolution fail, and in a package
# repository whose unreachable host costs every start a timeout.
IVY_SETTINGS = """<ivysettings>
  <settings defaultResolver="central"/>
  <resolvers><ibiblio name="central" m2compatible="true" root="https://repo1.maven.org/maven2/"/></resolvers>
</ivysettings>
"""


def installed_spark_jars() -> Path:
    import pyspark

    home = os.environ.get("SPARK_HOME")
    return Path(home) / "jars" if home else Path(pyspark.__file__).parent / "jars"


def pyspark_version() -> str:
    import pyspark

    return pyspark.__version__


def connector_packages(jar_names: Sequence[str], spark_version: str) -> str | None:
    """Maven coordinates of the S3A connector matching the installed Spark's own Hadoop
    and Scala, or None when that Spark already ships one.

    hadoop-aws must be exactly the bundled Hadoop's version. spark-hadoop-cloud is not
    published for every release: the newest of the same major.minor line is taken (every
    release of a line bundles the same Hadoop), and Spark lines newer than any published
    one take the newest published line.
    """
    if any(name.startswith("hadoop-aws-") for name in jar_names):
        return None
    hadoop = next((m.group(1) for m in map(re.compile(r"hadoop-client-api-(.+)\.jar").match, jar_names) if m), None)
    scala = next((m.group(1) for m in map(re.compile(r"spark-core_(2\.1\d)-").match, jar_names) if m), None)
    if hadoop is None or scala is None:
        raise EtlError(
            "Cannot tell which Hadoop this Spark bundles (no hadoop-client-api jar in "
            f"{installed_spark_jars()}), so the matching S3A connector is unknown. Set "
            "[SPARK] PACKAGES in dl.cfg to org.apache.hadoop:hadoop-aws:<your Hadoop version>."
        )
    line = ".".join(spark_version.split(".")[:2])
    binding = CLOUD_BINDINGS.get(line, CLOUD_BINDINGS[max(CLOUD_BINDINGS, key=lambda v: tuple(map(int, v.split("."))))])
    return f"org.apache.hadoop:hadoop-aws:{hadoop},org.apache.spark:spark-hadoop-cloud_{scala}:{binding}"


def session_packages(settings: Settings, local_jvm: bool) -> dict[str, str]:
    """The spark.jars.* settings a run needs: the S3A connector for S3 roots, Delta Lake
    for --format delta. ``[SPARK] PACKAGES`` replaces the connector (``none``: nothing)."""
    packages, excludes = [], ()
    if is_s3(settings.output_root):
        if settings.packages:
            packages += [] if settings.packages.lower() == "none" else [settings.packages]
        else:
            jars = [path.name for path in installed_spark_jars().glob("*.jar")]
            connector = connector_packages(jars, pyspark_version())
            if connector:
                packages.append(connector)
                excludes = SHIPPED_WITH_SPARK
    if settings.format == "delta":
        packages.append(delta_package(pyspark_version()))
        excludes = SHIPPED_WITH_SPARK
    if local_jvm:
        packages += [package for package in LOCAL_RUN_PACKAGES if (settings.packages or "").lower() != "none"]
    confs = {"spark.jars.packages": ",".join(packages)} if packages else {}
    if excludes:
        confs["spark.jars.excludes"] = ",".join(excludes)
    return confs


def ivy_settings_file() -> str:
    path = Path(tempfile.gettempdir()) / f"sparkify-ivysettings-{os.getuid() if hasattr(os, 'getuid') else 0}.xml"
    if not path.is_file() or path.read_text() != IVY_SETTINGS:
        path.write_text(IVY_SETTINGS)
    return str(path)


def spark_submit_options(settings: Settings) -> list[str]:
    """The same jars (and Delta's session settings) as spark-submit flags, for ``--print-packages``."""
    flags = []
    for key, value in session_packages(replace(settings, output_root="s3a://any"), local_jvm=False).items():
        flags += ["--packages", value] if key == "spark.jars.packages" else ["--conf", f"{key}={value}"]
    if settings.format == "delta":
        for key, value in DELTA_SESSION.items():
            flags += ["--conf", f"{key}={value}"]
    return flags


def jvm_has_class(spark: SparkSession, name: str) -> bool:
    """Whether the driver JVM can load ``name``; other JVM failures are raised."""
    from py4j.protocol import Py4JJavaError

    jvm = spark.sparkContext._jvm
    try:
        jvm.java.lang.Class.forName(name, False, jvm.Thread.currentThread().getContextClassLoader())
    except Py4JJavaError as error:
        if error.java_exception.getClass().getName() == "java.lang.ClassNotFoundException":
            return False
        raise
    return True
