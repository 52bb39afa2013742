"""Benchmark etl.py end to end at named scales, against a floor, and print the figures.

    python benchmark.py                       # prod scale, 3 runs each of the ETL and the floor
    python benchmark.py --scale prod --scale large --runs 3 --json benchmarks/latest.json

For each scale it generates the dataset once with datagen.py (kept under --work), then
runs ``python etl.py`` in a fresh process ``--runs`` times, each into a new output folder
(earlier outputs are deleted before a scale's runs: see clear_earlier_outputs), and reports the median wall
time, seconds per stage (from the run report), input records per second, peak resident
memory (PSS) of the whole process tree (Python driver + JVM), and files and bytes written per
table. The **floor** is the least any Spark job must do with these inputs: read both
datasets once with the explicit schemas and write them unpartitioned as parquet, in a
fresh process, also ``--runs`` times; every ETL figure is shown with its ratio to it.
"""

from __future__ import annotations

import argparse
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

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BenchScale:
    name: str
    songs: int
    days: int
    events_per_day: int


SCALES = {scale.name: scale for scale in (
    BenchScale("prod", songs=15_000, days=30, events_per_day=270),            # ~8,000 events
    BenchScale("prod-2x-events", songs=15_000, days=30, events_per_day=540),
    BenchScale("large", songs=100_000, days=30, events_per_day=100_000),      # 3,000,000 events
    BenchScale("large-2x-events", songs=100_000, days=30, events_per_day=200_000),
)}


# --- measuring one process tree -------------------------------------------------

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
    """Proportional set size (PSS) of ``pids``: a page shared by several processes counts
    once in the sum. (Plain RSS counts a vfork'ed child, which shares the JVM's memory until
    it execs chmod, as a second JVM.)"""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def timed_run(command: list[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall seconds and peak resident bytes of the process tree ``command`` starts."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return wall, peak, result


def written_files(output: Path) -> dict[str, dict[str, int]]:
    tables = {}
    for table in ("songs", "artists", "users", "songplays", "time"):
        files = [path for path in (output / table).rglob("*.parquet")]
        folders = {path.parent for path in files}
        tables[table] = {"files": len(files), "bytes": sum(path.stat().st_size for path in files),
                         "folders": len(folders)}
    return tables


# --- the floor: read both inputs once, write them unpartitioned ------------------

def floor_job(input_root: str, output_root: str) -> None:
    """Run in a fresh process by ``--floor``: the same session settings and explicit
    schemas as etl.py, no transforms, no partitioning."""
    import etl

    settings = etl.Settings(etl.to_uri(input_root), etl.to_uri(output_root))
    spark = etl.build_spark_session(settings)
    try:
        for dataset, schema in (("song_data", etl.SONG_SCHEMA), ("log_data", etl.LOG_SCHEMA)):
            records = etl.read_json_records(spark, etl.table_path(settings.input_root, dataset), schema)
            records.write.mode("overwrite").parquet(etl.table_path(settings.output_root, dataset))
    finally:
        spark.stop()


# --- one scale -----------------------------------------------------------------

def dataset_for(scale: BenchScale, work: Path) -> Path:
    root = work / "data" / scale.name
    marker = root / ".complete"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        started = time.monotonic()
        print(f"generating {scale.name}: {scale.songs:,} songs, {scale.days} days x {scale.events_per_day:,} events",
              flush=True)
        datagen.generate(root, datagen.Scale(songs=scale.songs, days=scale.days,
                                             events_per_day=scale.events_per_day))
        marker.write_text(f"{time.monotonic() - started:.1f} s\n")
    return root


# This machine's ext4 root has no journal, and ext4 then skips each inode freed in the
# last 60 s (360 s while its inode table block is unwritten) when it allocates new ones,
# checking them one by one. Writing the songs folders right after deleting the previous
# run's took 36 s instead of 22 s at large (94,206 folders; /tmp/exp/wlarge.py, session 4).
# So earlier outputs are deleted once per scale, before its runs, and left to age; each
# run writes into a folder of its own.
FREED_INODE_WAIT_SECONDS = 65


def clear_earlier_outputs(work: Path) -> None:
    earlier = [folder for folder in (work / "out", work / "floor") if folder.exists()]
    if not earlier:
        return
    for folder in earlier:
        shutil.rmtree(folder)
    os.sync()
    print(f"  deleted earlier outputs under {work}; waiting {FREED_INODE_WAIT_SECONDS} s for the filesystem "
          "to stop skipping their freed inodes", flush=True)
    time.sleep(FREED_INODE_WAIT_SECONDS)


def measure(scale: BenchScale, runs: int, work: Path) -> dict:
    data = dataset_for(scale, work)
    clear_earlier_outputs(work)
    etl_runs, floor_runs = [], []
    for attempt in range(1, runs + 1):
        output = work / "out" / scale.name / f"run-{attempt}"
        wall, peak, result = timed_run([sys.executable, "etl.py", "--input", str(data), "--output", str(output)])
        (report_path,) = (output / "_runs").glob("*.json")
        report = json.loads(report_path.read_text())
        etl_runs.append({"wall_seconds": round(wall, 2), "peak_pss_bytes": peak, "stages": report["stages"],
                         "inputs": report["inputs"], "rows": {t: f["rows"] for t, f in report["tables"].items()}})
        print(f"  {scale.name} etl run {attempt}: {wall:.1f} s, peak {peak / 2**30:.2f} GiB", flush=True)
        floor_output = work / "floor" / scale.name / f"run-{attempt}"
        wall, peak, _ = timed_run([sys.executable, __file__, "--floor", str(data), str(floor_output)])
        floor_runs.append({"wall_seconds": round(wall, 2), "peak_pss_bytes": peak})
        print(f"  {scale.name} floor run {attempt}: {wall:.1f} s", flush=True)
    median = statistics.median(run["wall_seconds"] for run in etl_runs)
    floor = statistics.median(run["wall_seconds"] for run in floor_runs)
    records = sum(facts["records"] for facts in etl_runs[0]["inputs"].values())
    return {
        "scale": scale.__dict__, "runs": etl_runs, "floor_runs": floor_runs,
        "median_seconds": median, "floor_median_seconds": floor, "ratio_to_floor": round(median / floor, 2),
        "records": records, "records_per_second": round(records / median),
        "peak_pss_bytes": max(run["peak_pss_bytes"] for run in etl_runs),
        "median_stages": {stage: round(statistics.median(run["stages"][stage] for run in etl_runs), 2)
                          for stage in etl_runs[0]["stages"]},
        "written": written_files(output),
    }


def table(results: list[dict]) -> str:
    lines = ["| scale | songs | events | ETL median (s) | floor median (s) | ratio | records/s | peak memory (GiB) | stages, median s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        scale = result["scale"]
        stages = ", ".join(f"{name} {seconds}" for name, seconds in result["median_stages"].items())
        lines.append(f"| {scale['name']} | {scale['songs']:,} | {result['runs'][0]['inputs']['log_data']['records']:,} "
                     f"| {result['median_seconds']:.1f} ({', '.join(str(r['wall_seconds']) for r in result['runs'])}) "
                     f"| {result['floor_median_seconds']:.1f} | {result['ratio_to_floor']:.2f}x "
                     f"| {result['records_per_second']:,} | {result['peak_pss_bytes'] / 2**30:.2f} | {stages} |")
    lines += ["", "| scale | table | files | partition folders | bytes |", "|---|---|---|---|---|"]
    for result in results:
        for name, facts in result["written"].items():
            lines.append(f"| {result['scale']['name']} | {name} | {facts['files']:,} | {facts['folders']:,} "
                         f"| {facts['bytes']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", action="append", choices=sorted(SCALES),
                        help="scale to measure (repeatable; default: prod)")
    parser.add_argument("--runs", type=int, default=3, help="runs of the ETL and of the floor per scale")
    parser.add_argument("--work", default="/tmp/sparkify-bench", help="folder for datasets and outputs")
    parser.add_argument("--json", default=str(HERE / "benchmarks" / "latest.json"), help="where to write the results")
    parser.add_argument("--floor", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor:
        floor_job(*args.floor)
        return 0
    work = Path(args.work)
    results = [measure(SCALES[name], args.runs, work) for name in (args.scale or ["prod"])]
    import pyspark

    document = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "pyspark": pyspark.__version__},
                "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    print(table(results))
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
