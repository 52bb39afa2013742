"""Local tables are written without a forked ``chmod`` per file, through the NIO local
filesystem; a first run that cannot fetch it still writes every table, more slowly."""

from __future__ import annotations

import stat

import etl
from conftest import BAD_DATA_ALLOWED, free_port, run_etl
from oracle import expected_tables
from tables import COLUMNS, read_table, run_reports

NIO_JAR = "com.globalmentor_hadoop-bare-naked-local-fs-0.1.0.jar"


def test_a_jar_fetched_before_is_found_in_either_spark_lines_ivy_home(tmp_path):
    assert etl.cached_package_jar(etl.NIO_LOCAL_FS_PACKAGE, tmp_path) is None
    for ivy_home in (".ivy2", ".ivy2.5.2"):  # Spark 3's, then Spark 4's (preferred)
        jar = tmp_path / ivy_home / "jars" / NIO_JAR
        jar.parent.mkdir(parents=True)
        jar.write_bytes(b"PK")
        assert etl.cached_package_jar(etl.NIO_LOCAL_FS_PACKAGE, tmp_path) == jar


def test_local_tables_are_written_by_the_nio_filesystem_with_hadoops_permissions(quirky_dataset, tmp_path):
    output = tmp_path / "out"
    result = run_etl("--input", str(quirky_dataset), "--output", str(output), *BAD_DATA_ALLOWED)
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = run_reports(output)
    assert report["output_filesystem"] == etl.NIO_LOCAL_FS_CLASS
    # Hadoop's umask (022), applied by the filesystem itself, whatever this process's umask.
    modes = {(path.is_dir(), stat.S_IMODE(path.stat().st_mode))
             for table in COLUMNS for path in (output / table).rglob("*")}
    assert modes == {(True, 0o755), (False, 0o644)}


def test_packages_none_adds_no_jar_and_writes_through_hadoops_own_filesystem(tmp_path):
    config = tmp_path / "dl.cfg"
    config.write_text("[SPARK]\nPACKAGES = none\n")
    result = run_etl("--config", str(config), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = run_reports(tmp_path / "out")
    assert report["status"] == "succeeded"
    assert report["output_filesystem"] == "org.apache.hadoop.fs.RawLocalFileSystem"


def test_a_first_run_without_maven_central_still_writes_every_table(spark, quirky_dataset, tmp_path):
    """No jar fetched before (an empty home) and every download refused by a dead proxy."""
    home, output, dead = tmp_path / "home", tmp_path / "out", free_port()
    home.mkdir()
    offline = {"HOME": str(home), "JAVA_TOOL_OPTIONS": " ".join(
        f"-D{scheme}.proxyHost=127.0.0.1 -D{scheme}.proxyPort={dead}" for scheme in ("http", "https"))}
    result = run_etl("--input", str(quirky_dataset), "--output", str(output), *BAD_DATA_ALLOWED, env=offline)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Could not fetch {etl.NIO_LOCAL_FS_PACKAGE}" in result.stderr
    (report,) = run_reports(output)
    assert report["output_filesystem"] == "org.apache.hadoop.fs.RawLocalFileSystem"
    assert report["status"] == "succeeded"
    expected, _, _ = expected_tables(quirky_dataset)
    for table in COLUMNS:
        assert read_table(spark, output.as_uri(), table) == expected[table], table


def test_a_local_run_drops_only_the_settings_of_services_it_never_uses(spark, tmp_path):
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    kept = {name: conf.get(name) for name in ("fs.defaultFS", "fs.s3a.connection.maximum",
                                              "mapreduce.fileoutputcommitter.algorithm.version",
                                              "mapreduce.output.fileoutputformat.compress",
                                              "io.file.buffer.size", "hadoop.security.authentication")}
    assert None not in kept.values()
    assert conf.getValByRegex("^yarn\\.").size() > 100  # YARN's defaults, before
    assert conf.getValByRegex("^ipc\\.").size() > 10  # Hadoop RPC's
    without_s3 = spark._jvm.org.apache.hadoop.conf.Configuration(conf)

    etl.drop_settings_of_unused_services(conf, uses_s3=True)

    assert conf.getValByRegex(etl.UNUSED_LOCAL_SERVICE_SETTINGS).size() == 0
    assert {name: conf.get(name) for name in kept} == kept
    # Jobs plan their Hadoop settings from the session's: the same smaller set, and they run.
    assert spark._jsparkSession.sessionState().newHadoopConf().getValByRegex("^(yarn|ipc)\\.").size() == 0
    spark.range(5).write.parquet(str(tmp_path / "t"))
    assert spark.read.parquet(str(tmp_path / "t")).count() == 5
    # Without an S3 root, S3A's defaults go too (on a copy: later tests here read S3).
    etl.drop_settings_of_unused_services(without_s3, uses_s3=False)
    assert without_s3.getValByRegex(etl.S3A_SETTINGS).size() == 0
    assert without_s3.get("fs.s3a.connection.maximum") is None
    assert without_s3.get("mapreduce.fileoutputcommitter.algorithm.version") == kept[
        "mapreduce.fileoutputcommitter.algorithm.version"]


def test_local_runs_take_the_parallel_collector_unless_the_user_chose_one(monkeypatch):
    settings = etl.Settings("file:///data", "file:///lake")
    monkeypatch.delenv("PYSPARK_SUBMIT_ARGS", raising=False)
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    for name in etl.JVM_OPTION_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def driver_options() -> list[str]:
        return etl.session_builder(settings, None, False)._options["spark.driver.extraJavaOptions"].split()

    assert driver_options() == ["-Djdk.lang.Process.launchMechanism=VFORK", "-XX:+UseParallelGC"]
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Xss4m -XX:+UseG1GC")  # two collectors: the JVM would not start
    assert driver_options() == ["-Djdk.lang.Process.launchMechanism=VFORK"]


def test_local_runs_get_a_2_gb_driver_unless_the_user_sized_it(monkeypatch):
    settings = etl.Settings("file:///data", "file:///lake")
    monkeypatch.delenv("PYSPARK_SUBMIT_ARGS", raising=False)
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    monkeypatch.delenv("SPARK_DRIVER_MEMORY", raising=False)

    def driver_memory(master: str | None = None) -> str | None:
        return etl.session_builder(settings, master, False)._options.get("spark.driver.memory")

    assert driver_memory() == "2g"
    assert driver_memory("yarn") is None  # a cluster's driver is sized by its own settings
    for submit_args in ("--driver-memory 6g pyspark-shell", "--conf spark.driver.memory=6g pyspark-shell"):
        monkeypatch.setenv("PYSPARK_SUBMIT_ARGS", submit_args)
        assert driver_memory() is None
    monkeypatch.delenv("PYSPARK_SUBMIT_ARGS")
    monkeypatch.setenv("SPARK_DRIVER_MEMORY", "6g")
    assert driver_memory() is None
