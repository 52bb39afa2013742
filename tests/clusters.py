"""Real multi-process cluster managers on 127.0.0.1 for spark-submit tests.

``StandaloneCluster``: a Spark master and workers started with the installed pyspark's
``spark-class``. ``YarnCluster``: a ResourceManager and NodeManagers from Hadoop's
``MiniHadoopClusterManager`` at the Hadoop version the installed Spark bundles, its jars
fetched from Maven Central by Maven (cached in ~/.m2). Each is a context manager that
stops every process it started, and any process those left behind, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import NON_UTC_ZONE, REPO, free_port
from sparkify_etl.jars import installed_spark_jars

# Java 17 keeps these packages closed; Hadoop's web apps (Guice) need them open.
JAVA_OPENS = [
    f"--add-opens=java.base/{package}=ALL-UNNAMED"
    for package in (
        "java.lang",
        "java.lang.reflect",
        "java.util",
        "java.util.concurrent",
        "java.io",
        "java.net",
        "java.nio",
        "sun.nio.ch",
    )
]


def spark_home() -> Path:
    return installed_spark_jars().parent


def cluster_environment(**extra: str) -> dict[str, str]:
    """Every cluster process binds to loopback, runs Python from this venv, and keeps its
    clock off UTC so a time part that leaks the local zone shows."""
    return {
        **os.environ,
        "SPARK_HOME": str(spark_home()),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "TZ": NON_UTC_ZONE,
        **extra,
    }


def spark_submit(
    master: str, *args: str, env: dict[str, str], cwd: Path = REPO, timeout: int = 1200
) -> subprocess.CompletedProcess:
    command = [str(spark_home() / "bin" / "spark-submit"), "--master", master, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for(condition, what: str, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def processes_under(folder: Path) -> list[int]:
    """Processes whose command line or working directory lies in ``folder``: executors and
    containers the cluster daemons started in their work folders."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(folder) in cmdline or cwd.startswith(str(folder)):
            found.append(int(entry.name))
    return found


class ProcessGroup:
    """Daemons started in their own sessions, logging to files in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = self.folder / f"{name}.log"
        with log.open("wb") as output:
            self.processes.append(
                subprocess.Popen(
                    command, cwd=self.folder, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        self.logs.append(log)

    def assert_running(self) -> bool:
        for process, log in zip(self.processes, self.logs, strict=False):
            if process.poll() is not None:
                raise RuntimeError(
                    f"{log.stem} exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
                )
        return True

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for pid in processes_under(self.folder):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def http_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


class StandaloneCluster:
    """``spark-class`` master and ``workers`` workers (one core, 2 GB each) on 127.0.0.1."""

    def __init__(self, folder: Path, workers: int = 2):
        self.folder = folder
        self.workers = workers
        self.daemons = ProcessGroup(folder)
        self.master_url = ""

    def __enter__(self) -> StandaloneCluster:
        spark_class = str(spark_home() / "bin" / "spark-class")
        env = cluster_environment()
        port, web_port = free_port(), free_port()
        self.master_url = f"spark://127.0.0.1:{port}"
        try:
            self.daemons.start(
                "master",
                [
                    spark_class,
                    "org.apache.spark.deploy.master.Master",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--webui-port",
                    str(web_port),
                ],
                env,
            )
            for number in range(1, self.workers + 1):
                work_dir = self.folder / f"worker-{number}"
                work_dir.mkdir()
                self.daemons.start(
                    f"worker-{number}",
                    [
                        spark_class,
                        "org.apache.spark.deploy.worker.Worker",
                        "--host",
                        "127.0.0.1",
                        "--cores",
                        "1",
                        "--memory",
                        "2g",
                        "--work-dir",
                        str(work_dir),
                        "--webui-port",
                        str(free_port()),
                        self.master_url,
                    ],
                    env,
                )

            def workers_alive() -> bool:
                self.daemons.assert_running()
                state = http_json(f"http://127.0.0.1:{web_port}/json/") or {}
                return sum(worker["state"] == "ALIVE" for worker in state.get("workers", [])) == self.workers

            wait_for(workers_alive, f"{self.workers} ALIVE workers", 120, self.daemons.logs)
        except BaseException:
            self.daemons.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.daemons.stop()


def hadoop_version() -> str:
    jars = [path.name for path in installed_spark_jars().glob("hadoop-client-api-*.jar")]
    return re.fullmatch(r"hadoop-client-api-(.+)\.jar", jars[0]).group(1)


MINICLUSTER_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>sparkify.tests</groupId><artifactId>yarn-minicluster</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.hadoop</groupId><artifactId>hadoop-minicluster</artifactId>
      <version>{hadoop}</version></dependency>
    <dependency><groupId>junit</groupId><artifactId>junit</artifactId><version>4.13.2</version></dependency>
  </dependencies>
</project>
"""


def minicluster_classpath(folder: Path) -> str:
    """Hadoop's mini cluster and its dependencies from Maven Central, at this Spark's Hadoop."""
    if shutil.which("mvn") is None:
        raise RuntimeError("the YARN test needs Maven (mvn) to fetch Hadoop's mini cluster jars")
    (folder / "pom.xml").write_text(MINICLUSTER_POM.format(hadoop=hadoop_version()))
    classpath = folder / "classpath.txt"
    result = subprocess.run(
        ["mvn", "-q", "-B", "dependency:build-classpath", f"-Dmdep.outputFile={classpath}"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mvn could not fetch hadoop-minicluster:\n{result.stdout[-3000:]}")
    return classpath.read_text().strip()


class YarnCluster:
    """A ResourceManager and ``nodemanagers`` NodeManagers (4 GB, 8 vcores each) on
    localhost, no HDFS: the default filesystem is local, as every process shares this disk.
    ``conf_dir`` is what HADOOP_CONF_DIR should name for spark-submit."""

    def __init__(self, folder: Path, nodemanagers: int = 2):
        self.folder = folder
        self.nodemanagers = nodemanagers
        self.daemons = ProcessGroup(folder)
        self.conf_dir = folder / "conf"

    def __enter__(self) -> YarnCluster:
        classpath = minicluster_classpath(self.folder)
        self.conf_dir.mkdir()
        site, details = self.conf_dir / "yarn-site.xml", self.folder / "details.json"
        # The mini cluster's other services default to fixed ports: give each a free one.
        addresses = {
            name: f"127.0.0.1:{free_port()}"
            for name in (
                "yarn.resourcemanager.scheduler.address",
                "yarn.resourcemanager.resource-tracker.address",
                "yarn.resourcemanager.admin.address",
                "yarn.resourcemanager.webapp.address",
                "mapreduce.jobhistory.webapp.address",
                "mapreduce.jobhistory.admin.address",
            )
        }
        command = [
            "java",
            "-Xmx1g",
            *JAVA_OPENS,
            "-cp",
            classpath,
            "org.apache.hadoop.mapreduce.MiniHadoopClusterManager",
            "-nodfs",
            "-nodemanagers",
            str(self.nodemanagers),
            "-rmport",
            str(free_port()),
            "-jhsport",
            str(free_port()),
            "-writeConfig",
            str(site),
            "-writeDetails",
            str(details),
        ]
        for name, address in addresses.items():
            command += ["-D", f"{name}={address}"]
        # A NodeManager whose disk is over 90% used reports itself unhealthy and gets no
        # containers: every application would wait in ACCEPTED until spark-submit timed out.
        # The test machine's disk is shared with everything else on it: no such limit here.
        command += [
            "-D",
            "yarn.nodemanager.disk-health-checker.max-disk-utilization-per-disk-percentage=100.0",
            "-D",
            "yarn.nodemanager.disk-health-checker.min-free-space-per-disk-mb=0",
        ]
        try:
            self.daemons.start("minicluster", command, cluster_environment())
            wait_for(
                lambda: self.daemons.assert_running() and details.exists() and site.exists(),
                "the YARN mini cluster",
                180,
                self.daemons.logs,
            )
            log = self.daemons.logs[0]
            wait_for(
                lambda: log.read_text(errors="replace").count("registered with capability") >= self.nodemanagers,
                f"{self.nodemanagers} NodeManagers",
                120,
                self.daemons.logs,
            )
        except BaseException:
            self.daemons.stop()
            raise
        return self

    def environment(self, **extra: str) -> dict[str, str]:
        return cluster_environment(HADOOP_CONF_DIR=str(self.conf_dir), **extra)

    def __exit__(self, *exc_info) -> None:
        self.daemons.stop()
