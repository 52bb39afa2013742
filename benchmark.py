"""Benchmark etl.py end to end, on local disk or on a local S3 server, and print the figures.

    python benchmark.py                              # prod scale on local disk, 3 runs, with the floor
    python benchmark.py --scale prod --scale large   # several scales
    python benchmark.py --against HEAD~1             # A/B: that revision's etl.py and this one, alternated
    python benchmark.py --s3                         # on S3Proxy, 0 and 20 ms per request, requests counted
    python benchmark.py --levers                     # S3A settings one at a time, requests of one write each

Local: each run is ``python etl.py`` in a fresh process into a new folder; reported are the
median wall time, seconds per stage (from the run report), peak memory (PSS) of the whole
process tree, files written, and the **floor**: the least any Spark job must do with these
inputs (read both datasets once and write them unpartitioned), measured the same way.

S3: the dataset is uploaded once to an S3Proxy started for the benchmark; every run reads it
from there and writes a new output prefix through a proxy that adds a fixed delay to each
request and counts the requests by kind. Runs at each delay alternate.

Results go to benchmarks/ (local.json, s3.json; -delta for Delta runs) and into docs/PERFORMANCE.md (the marked sections).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import datagen
import locals3
from sparkify_etl.extract import parse_records, read_lines
from sparkify_etl.inputs import inventory_input
from sparkify_etl.jars import ivy_settings_file, session_packages
from sparkify_etl.s3 import S3Access
from sparkify_etl.s3a import s3a_options
from sparkify_etl.session import build_spark_session
from sparkify_etl.settings import Settings, to_root
from sparkify_etl.tables import DATASETS

HERE = Path(__file__).resolve().parent
PERFORMANCE = HERE / "docs" / "PERFORMANCE.md"
KEY, SECRET = "bench", "bench-secret"


@dataclass(frozen=True)
class BenchScale:
    name: str
    songs: int
    days: int
    events_per_day: int


SCALES = {
    scale.name: scale
    for scale in (
        BenchScale("prod", songs=15_000, days=30, events_per_day=270),  # the real dataset's size: ~8,000 events
        BenchScale("prod-2x-events", songs=15_000, days=30, events_per_day=540),
        BenchScale("large", songs=100_000, days=30, events_per_day=100_000),  # 3,000,000 events
    )
}


# --- measuring one process tree ---------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def resident_bytes(pids: list[int]) -> int:
    """Proportional set size of ``pids``: a page several processes share counts once."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def timed_run(command: list[str], env: dict | None = None) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall seconds and peak resident bytes of the process tree ``command`` starts."""
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=HERE, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_bytes(descendants(process.pid)))
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.monotonic() - started
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return wall, peak, subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def written_files(output: Path) -> dict[str, dict[str, int]]:
    tables = {}
    for table in ("songs", "artists", "users", "songplays", "time"):
        files = list((output / table).rglob("*.parquet"))
        tables[table] = {
            "files": len(files),
            "bytes": sum(path.stat().st_size for path in files),
            "folders": len({path.parent for path in files}),
        }
    return tables


# --- the floor: read both inputs once, write them unpartitioned ------------------------


def floor_job(input_root: str, output_root: str) -> None:
    """Run in a fresh process by ``--floor``: etl.py's session and reader, no transforms,
    no partitioning, no checks."""

    settings = Settings(to_root(input_root), to_root(output_root))
    inventories = inventory_input(settings)
    spark = build_spark_session(settings, verbose=False)
    try:
        for dataset, inventory in inventories.items():
            records = parse_records(read_lines(spark, inventory.read, None), DATASETS[dataset])
            records.write.mode("overwrite").parquet(f"file://{settings.output_root}/{dataset}")
    finally:
        spark.stop()


# --- local runs ------------------------------------------------------------------------


def dataset_for(scale: BenchScale, work: Path) -> Path:
    root = work / "data" / scale.name
    marker = root / ".complete"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(
            f"generating {scale.name}: {scale.songs:,} songs, {scale.days} days x {scale.events_per_day:,} events",
            flush=True,
        )
        datagen.generate(root, datagen.Scale(songs=scale.songs, days=scale.days, events_per_day=scale.events_per_day))
        marker.write_text("generated\n")
    return root


def etl_run(script: Path, data: Path, output: Path, extra: list[str]) -> dict:
    wall, peak, _ = timed_run([sys.executable, str(script), "--input", str(data), "--output", str(output), *extra])
    (report_path,) = (output / "_runs").glob("*.json")
    report = json.loads(report_path.read_text())
    return {
        "wall_seconds": round(wall, 2),
        "peak_pss_bytes": peak,
        "stages": report["stages"],
        "inputs": {
            name: {key: facts[key] for key in ("files_read", "records")} for name, facts in report["inputs"].items()
        },
        "rows": {table: facts["rows"] for table, facts in report["tables"].items()},
    }


def summarise(runs: list[dict]) -> dict:
    return {
        "median_seconds": statistics.median(run["wall_seconds"] for run in runs),
        "walls": [run["wall_seconds"] for run in runs],
        "peak_pss_gib": round(max(run["peak_pss_bytes"] for run in runs) / 2**30, 2),
        "median_stages": {
            stage: round(statistics.median(run["stages"][stage] for run in runs), 2) for stage in runs[0]["stages"]
        },
    }


def measure_local(scale: BenchScale, runs: int, work: Path, extra: list[str], against: Path | None) -> dict:
    """``runs`` ETL runs alternated with the floor (or with etl.py at another revision)."""
    data = dataset_for(scale, work)
    shutil.rmtree(work / "out" / scale.name, ignore_errors=True)
    current, other, floors = [], [], []
    for attempt in range(1, runs + 1):
        output = work / "out" / scale.name / f"etl-{attempt}"
        current.append(etl_run(HERE / "etl.py", data, output, extra))
        print(f"  {scale.name} run {attempt}: {current[-1]['wall_seconds']:.1f} s", flush=True)
        if against is not None:
            other.append(etl_run(against, data, work / "out" / scale.name / f"against-{attempt}", extra))
            print(f"  {scale.name} run {attempt} at the other revision: {other[-1]['wall_seconds']:.1f} s", flush=True)
        else:
            wall, peak, _ = timed_run(
                [sys.executable, __file__, "--floor", str(data), str(work / "out" / scale.name / f"floor-{attempt}")]
            )
            floors.append({"wall_seconds": round(wall, 2), "peak_pss_bytes": peak})
            print(f"  {scale.name} floor {attempt}: {wall:.1f} s", flush=True)
    result = {
        "scale": scale.__dict__,
        "etl": summarise(current),
        "runs": current,
        "records": sum(facts["records"] for facts in current[0]["inputs"].values()),
        "written": written_files(work / "out" / scale.name / "etl-1"),
    }
    if against is not None:
        result["against"] = summarise(other)
    else:
        result["floor_median_seconds"] = statistics.median(run["wall_seconds"] for run in floors)
        result["floor_walls"] = [run["wall_seconds"] for run in floors]
    return result


def local_table(results: list[dict]) -> str:
    lines = [
        "| scale | records | ETL median (s), runs | floor median (s) | ratio | peak memory (GiB) | stages, median s |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        etl_runs = result["etl"]
        stages = ", ".join(f"{name} {seconds}" for name, seconds in etl_runs["median_stages"].items())
        floor = result.get("floor_median_seconds")
        floor_text = f"{floor:.1f} | {etl_runs['median_seconds'] / floor:.2f}x" if floor else "- | -"
        lines.append(
            f"| {result['scale']['name']} | {result['records']:,} | {etl_runs['median_seconds']:.1f} "
            f"({', '.join(map(str, etl_runs['walls']))}) | {floor_text} | {etl_runs['peak_pss_gib']} "
            f"| {stages} |"
        )
        if "against" in result:
            other = result["against"]
            lines.append(
                f"| {result['scale']['name']} (other revision) | | {other['median_seconds']:.1f} "
                f"({', '.join(map(str, other['walls']))}) | | | {other['peak_pss_gib']} | | "
            )
    return "\n".join(lines)


# --- S3 runs -----------------------------------------------------------------------------


def measure_s3(scale: BenchScale, runs: int, work: Path, extra: list[str], delays: list[float]) -> dict:
    """Each run reads the dataset from S3Proxy and writes a new prefix, through a proxy
    adding ``delay`` ms to every request; the delays alternate."""
    data = dataset_for(scale, work)
    with locals3.s3proxy(work / "s3" / "data", access_key=KEY, secret_key=SECRET) as endpoint:
        server = next(pid for pid in descendants(os.getpid()) if "s3proxy" in _cmdline(pid))
        access = _access(endpoint)
        client = access.client(32)
        upload_once(client, data, scale.name)
        results = {delay: [] for delay in delays}
        for attempt in range(1, runs + 1):
            for delay in delays:
                with locals3.LatencyProxy(endpoint, delay) as proxy:
                    prefix = f"{scale.name}/{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{delay:g}ms"
                    server_cpu = cpu_seconds(server)
                    wall, peak, _completed = timed_run(
                        [
                            sys.executable,
                            str(HERE / "etl.py"),
                            "--input",
                            f"s3a://bench-input/{scale.name}",
                            "--output",
                            f"s3a://bench-output/{prefix}",
                            *extra,
                        ],
                        env=_environment(proxy.endpoint),
                    )
                    requests = proxy.reset()
                    server_cpu = cpu_seconds(server) - server_cpu
                written = _keys(client, "bench-output", prefix + "/")
                report = json.loads(
                    client.get_object(
                        Bucket="bench-output",
                        Key=next(key for key in written if key.endswith(".json") and "/_runs/" in key),
                    )["Body"].read()
                )
                read = sum(facts["files_read"] for facts in report["inputs"].values())
                objects = read + len(written)
                results[delay].append(
                    {
                        "wall_seconds": round(wall, 2),
                        "peak_pss_bytes": peak,
                        "stages": report["stages"],
                        "requests": dict(sorted(requests.items())),
                        "requests_total": sum(requests.values()),
                        "objects_read": read,
                        "objects_written": len(written),
                        "requests_per_object": round(sum(requests.values()) / objects, 3),
                        "server_cpu_seconds": round(server_cpu, 1),
                    }
                )
                print(
                    f"  {scale.name} s3 run {attempt} at {delay:g} ms: {wall:.1f} s, {sum(requests.values()):,} "
                    f"requests for {objects:,} objects",
                    flush=True,
                )
                for batch in range(0, len(written), 1000):
                    client.delete_objects(
                        Bucket="bench-output",
                        Delete={"Objects": [{"Key": key} for key in written[batch : batch + 1000]], "Quiet": True},
                    )
    return {
        "scale": scale.__dict__,
        "format": "delta" if "delta" in extra else "parquet",
        "delays": {f"{delay:g}": {**summarise(runs_at), "runs": runs_at} for delay, runs_at in results.items()},
    }


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _access(endpoint: str):

    return S3Access("us-east-1", endpoint, KEY, SECRET)


def _environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
    }


def _keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def upload_once(client, data: Path, name: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    for bucket in ("bench-input", "bench-output"):
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
    if _keys(client, "bench-input", f"{name}/.complete"):
        return
    files = [path for path in data.rglob("*") if path.is_file() and path.name != ".complete"]
    print(f"uploading {len(files):,} files of {name} to the benchmark's S3 server", flush=True)
    with ThreadPoolExecutor(32) as pool:
        list(
            pool.map(
                lambda path: client.upload_file(
                    str(path), "bench-input", f"{name}/{path.relative_to(data).as_posix()}"
                ),
                files,
            )
        )
    client.put_object(Bucket="bench-input", Key=f"{name}/.complete", Body=b"")


def s3_table(results: list[dict]) -> str:
    lines = [
        "| scale | format | delay (ms) | wall median (s), runs | vs 0 ms | requests per object | requests | "
        "by kind | S3 server CPU (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        base = result["delays"].get("0", {}).get("median_seconds")
        for delay, facts in result["delays"].items():
            run = facts["runs"][0]
            kinds = ", ".join(f"{kind} {count:,}" for kind, count in run["requests"].items())
            ratio = f"{facts['median_seconds'] / base:.2f}x" if base else "-"
            lines.append(
                f"| {result['scale']['name']} | {result['format']} | {delay} | {facts['median_seconds']:.1f} "
                f"({', '.join(map(str, facts['walls']))}) | {ratio} | {run['requests_per_object']} | "
                f"{run['requests_total']:,} for {run['objects_read']:,} read + {run['objects_written']:,} "
                f"written | {kinds} | {run['server_cpu_seconds']} |"
            )
    return "\n".join(lines)


# --- S3A levers, one at a time ---------------------------------------------------------------

IN_MEMORY = "fs.s3a.committer.magic.track.commits.in.memory.enabled"
LEVERS = (  # (what, committer, Hadoop settings over etl.py's own)
    ("staging committer, as etl.py sets it", "directory", {}),
    ("staging committer, create performance mode off", "directory", {"fs.s3a.create.performance": "false"}),
    ("staging committer, directory markers deleted", "directory", {"fs.s3a.directory.marker.retention": "delete"}),
    ("magic committer, commits tracked in S3 objects", "magic", {IN_MEMORY: "false"}),
    ("magic committer, as etl.py sets it (commits tracked in memory)", "magic", {}),
)


def measure_levers(work: Path, folders: int = 200) -> str:
    """One partitioned write of ``folders`` one-file folders per lever, through etl.py's S3A
    settings with that lever changed alone; requests counted at the S3 server."""
    from pyspark.sql import SparkSession

    with (
        locals3.s3proxy(work / "s3" / "data", access_key=KEY, secret_key=SECRET) as endpoint,
        locals3.LatencyProxy(endpoint, 0) as proxy,
    ):
        client = _access(endpoint).client(4)
        settings = Settings(
            input_root="",
            output_root="s3a://bench-levers",
            access_key_id=KEY,
            secret_access_key=SECRET,
            region="us-east-1",
            endpoint_url=proxy.endpoint,
        )
        builder = SparkSession.builder.master("local[2]").config("spark.ui.showConsoleProgress", "false")
        for key, value in {
            **session_packages(settings, local_jvm=True),
            "spark.jars.ivySettings": ivy_settings_file(),
        }.items():
            builder = builder.config(key, value)
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
        spark.conf.set(
            "spark.sql.sources.commitProtocolClass", "org.apache.spark.internal.io.cloud.PathOutputCommitProtocol"
        )
        spark.conf.set(
            "spark.sql.parquet.output.committer.class",
            "org.apache.spark.internal.io.cloud.BindingParquetOutputCommitter",
        )
        hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
        frame = spark.range(folders * 10).selectExpr("id", f"id % {folders} AS folder").repartition(2, "folder")
        lines = [
            f"| lever ({folders} partition folders, one file each) | requests | per file | by kind |",
            "|---|---|---|---|",
        ]
        for number, (what, committer, overrides) in enumerate(LEVERS):
            # A bucket per lever: S3A reads its filesystem-wide settings once per bucket.
            bucket = f"bench-levers-{time.time_ns()}-{number}"
            client.create_bucket(Bucket=bucket)
            for key, value in {**s3a_options(settings, committer, True), **overrides}.items():
                hadoop_conf.set(key, value)
            uri = f"s3a://{bucket}/table"
            frame.write.mode("append").partitionBy("folder").parquet(uri)  # a table to replace
            proxy.reset()
            writer = frame.write.partitionBy("folder")
            if committer == "directory":
                writer.mode("append").option("fs.s3a.committer.staging.conflict-mode", "replace").parquet(uri)
            else:
                writer.mode("overwrite").parquet(uri)
            requests = proxy.reset()
            total = sum(requests.values())
            kinds = ", ".join(f"{kind} {count:,}" for kind, count in sorted(requests.items()))
            lines.append(f"| {what} | {total:,} | {total / folders:.2f} | {kinds} |")
            print(lines[-1], flush=True)
        spark.stop()
    return "\n".join(lines)


# --- results -------------------------------------------------------------------------------


def publish(section: str, text: str) -> None:
    """Replace the marked section of docs/PERFORMANCE.md with ``text``."""
    begin, end = f"<!-- benchmark {section}: begin -->", f"<!-- benchmark {section}: end -->"
    document = PERFORMANCE.read_text() if PERFORMANCE.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in document and end in document:
        document = document.split(begin)[0] + block + document.split(end, 1)[1]
    else:
        document += f"\n{block}\n"
    PERFORMANCE.write_text(document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", action="append", choices=sorted(SCALES), help="repeatable (default: prod)")
    parser.add_argument("--runs", type=int, default=3, help="runs per scale (and per delay)")
    parser.add_argument("--format", choices=("parquet", "delta"), default="parquet")
    parser.add_argument(
        "--against",
        metavar="REVISION",
        help="A/B: alternate with etl.py at this git revision instead of the floor (local runs)",
    )
    parser.add_argument("--s3", action="store_true", help="read and write a local S3 server instead of local disk")
    parser.add_argument("--delays", default="0,20", help="milliseconds added to each S3 request (default 0,20)")
    parser.add_argument("--work", default="/tmp/sparkify-bench", help="folder for datasets and outputs")
    parser.add_argument(
        "--levers", action="store_true", help="S3A settings one at a time: requests of one partitioned write each"
    )
    parser.add_argument("--no-publish", action="store_true", help="leave docs/PERFORMANCE.md as it is")
    parser.add_argument("--floor", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor:
        floor_job(*args.floor)
        return 0
    work = Path(args.work)
    extra = ["--format", "delta"] if args.format == "delta" else []
    scales = [SCALES[name] for name in (args.scale or ["prod"])]
    against = None
    if args.against:
        checkout = work / "against"
        shutil.rmtree(checkout, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=HERE, check=True)
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-f", str(checkout), args.against],
            cwd=HERE,
            check=True,
            capture_output=True,
        )
        against = checkout / "etl.py"
    if args.levers:
        import pyspark

        text = measure_levers(work)
        if not args.no_publish:
            line = ".".join(pyspark.__version__.split(".")[:2])
            publish(
                f"s3 levers {line}",
                f"Measured {datetime.now(timezone.utc):%Y-%m-%d} with pyspark {pyspark.__version__} "
                f"(`python benchmark.py --levers`):\n\n{text}",
            )
        return 0
    if args.s3:
        delays = [float(delay) for delay in args.delays.split(",")]
        results = [measure_s3(scale, args.runs, work, extra, delays) for scale in scales]
        text = s3_table(results)
    else:
        results = [measure_local(scale, args.runs, work, extra, against) for scale in scales]
        text = local_table(results)
    import pyspark

    document = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyspark": pyspark.__version__},
        "against": args.against,
        "results": results,
    }
    output = HERE / "benchmarks" / f"{'s3' if args.s3 else 'local'}{'-delta' if args.format == 'delta' else ''}.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(text)
    if not args.no_publish and not args.against:
        publish(
            f"{'s3' if args.s3 else 'local'} {args.format}",
            f"Measured {document['measured_at'][:10]} with pyspark {pyspark.__version__} on {os.cpu_count()} cores "
            f"(`python benchmark.py{' --s3' if args.s3 else ''}"
            f"{' --format delta' if args.format == 'delta' else ''}"
            f"{''.join(f' --scale {s.name}' for s in scales)}"
            f"{f' --runs {args.runs}' if args.runs != 3 else ''}"
            f"{f' --delays {args.delays}' if args.s3 and args.delays != '0,20' else ''}`):\n\n{text}",
        )
    print(f"\nresults: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
