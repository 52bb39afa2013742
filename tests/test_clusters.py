"""The unchanged etl.py under spark-submit on real multi-process cluster managers: a Spark
standalone master with two workers, and YARN (a ResourceManager and two NodeManagers).
Every table is checked against the oracle; the commands are the ones README.md shows."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import datagen
from clusters import StandaloneCluster, YarnCluster, cluster_environment, spark_submit
from conftest import BAD_DATA_ALLOWED, REPO, create_bucket, download, s3_environment, upload
from oracle import expected_tables
from tables import assert_one_file_per_partition_folder, local_data_files, read_tables

ETL = str(REPO / "etl.py")
pytestmark = pytest.mark.slow


def assert_matches_oracle(spark, input_root: Path, output: Path) -> None:
    expected, _, _ = expected_tables(input_root)
    assert read_tables(spark, output) == expected


def assert_succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]


def connector_flags() -> list[str]:
    """``python etl.py --print-packages``, as README has users splice it into spark-submit."""
    printed = subprocess.run(
        [sys.executable, ETL, "--print-packages"], capture_output=True, text=True, check=True, cwd=REPO
    )
    return shlex.split(printed.stdout)


# --- Spark standalone ----------------------------------------------------------


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    with StandaloneCluster(tmp_path_factory.mktemp("standalone")) as cluster:
        yield cluster


def tasks_run_per_worker(cluster: StandaloneCluster) -> dict[str, int]:
    """Tasks each worker's executors ran, counted in their logs."""
    return {
        worker.name: sum(log.read_text(errors="replace").count("Running task") for log in worker.glob("app-*/*/stderr"))
        for worker in cluster.folder.glob("worker-*")
        if worker.is_dir()
    }


@pytest.fixture(scope="module")
def small_s3_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster-s3-input")
    datagen.generate(root, datagen.Scale(songs=120, days=2, events_per_day=120), seed=23, corrupt=True)
    return root


def test_standalone_cluster_runs_etl_on_s3a(spark, standalone, s3_endpoint, small_s3_dataset, tmp_path):
    """Executors on both workers fetch the input from S3 themselves; the tables go out
    through the magic committer, which needs no filesystem shared by driver and workers."""
    create_bucket(s3_endpoint, "cluster-raw")
    upload(s3_endpoint, small_s3_dataset, "cluster-raw")
    result = spark_submit(
        standalone.master_url,
        *connector_flags(),
        ETL,
        "--input",
        "s3a://cluster-raw/",
        "--output",
        "s3a://cluster-lake/star",
        *BAD_DATA_ALLOWED,
        env=cluster_environment(**s3_environment(s3_endpoint)),
    )
    assert_succeeded(result)
    lake = download(s3_endpoint, "cluster-lake", "star/", tmp_path / "lake")
    assert_matches_oracle(spark, small_s3_dataset, lake)
    assert '"s3a_committer": "magic"' in next((lake / "_runs").glob("*.json")).read_text()
    # The work ran in executors both workers launched, not in the driver.
    tasks = tasks_run_per_worker(standalone)
    assert len(tasks) == 2 and all(tasks.values()), tasks


# --- YARN ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def yarn(tmp_path_factory):
    with YarnCluster(tmp_path_factory.mktemp("yarn")) as cluster:
        yield cluster


def test_yarn_client_mode_runs_etl(spark, yarn, quirky_dataset, tmp_path):
    output = tmp_path / "lake"
    result = spark_submit(
        "yarn",
        "--deploy-mode",
        "client",
        ETL,
        "--input",
        str(quirky_dataset),
        "--output",
        str(output),
        *BAD_DATA_ALLOWED,
        env=yarn.environment(),
    )
    assert_succeeded(result)
    assert "Sparkify ETL finished" in result.stdout
    assert "Submitted application application_" in result.stderr
    assert_matches_oracle(spark, quirky_dataset, output)
    assert_one_file_per_partition_folder(local_data_files(output))


def test_yarn_cluster_mode_runs_with_the_package_zip_and_dl_cfg_shipped(spark, yarn, quirky_dataset, tmp_path):
    """The driver itself runs in a YARN container: it has the package only from the zip
    README's one extra flag ships (--py-files), and its settings only from the dl.cfg that
    --files puts in that container's working folder."""
    output = tmp_path / "lake"
    config = tmp_path / "dl.cfg"
    config.write_text(f"[ETL]\nINPUT = {quirky_dataset}\nOUTPUT = {output}\nMAX_REJECT_RATE = 0.1\n")
    package = tmp_path / "dist" / "sparkify_etl.zip"
    subprocess.run([sys.executable, ETL, "--package-zip", str(package)], check=True, cwd=REPO, capture_output=True)
    result = spark_submit(
        "yarn",
        "--deploy-mode",
        "cluster",
        "--py-files",
        str(package),
        "--files",
        str(config),
        "--conf",
        f"spark.yarn.appMasterEnv.PYSPARK_PYTHON={sys.executable}",
        ETL,
        env=yarn.environment(),
        cwd=tmp_path.parent,
    )
    assert_succeeded(result)
    assert "final status: SUCCEEDED" in result.stderr
    assert_matches_oracle(spark, quirky_dataset, output)


def test_spark_submit_without_the_connector_says_how_to_add_it(s3_endpoint, small_s3_dataset, tmp_path):
    result = spark_submit(
        "local[1]",
        ETL,
        "--input",
        str(small_s3_dataset),
        "--output",
        "s3a://bare-lake/star",
        *BAD_DATA_ALLOWED,
        env=cluster_environment(**s3_environment(s3_endpoint)),
    )
    # spark-submit merges the Python driver's stderr into its own stdout.
    assert result.returncode == 1
    assert "etl.py: This Spark has no S3A connector" in result.stdout
    assert "python etl.py --print-packages" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
