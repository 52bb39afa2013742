"""The Spark-backed publishers (Delta on a local root and on S3, parquet through the S3A
staging committer) faulted at every step, on tiny tables in one JVM per backend
(tests/publish_faults.py). After every fault, and after faults during the abort and during
recovery: no table is ever missing or a mix of two loads; the next run's recovery leaves a
complete set (Delta: the previous one; S3 parquet: each table previous or new, as documented,
with the tables this run replaced named); the run after that publishes completely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_delta import DELTA_SUPPORTED

from conftest import NON_UTC_ZONE, REPO, create_bucket, s3_environment

pytestmark = pytest.mark.slow
ALL = ("songs", "users")


def run_harness(backend: str, root: str, tmp_path: Path, env: dict[str, str] | None = None) -> list[dict]:
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "publish_faults.py"), backend, root, str(results)],
        cwd=tmp_path,
        env={**os.environ, "TZ": NON_UTC_ZONE, **(env or {})},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(results.read_text())


def every(version: str) -> dict[str, str]:
    return dict.fromkeys(ALL, version)


def assert_whole_tables(case: dict, stage: str) -> None:
    """Every table is one load's, never missing, never a mix of two."""
    assert set(case[stage].values()) <= {"A", "B"}, f"{case['case']}: {stage} {case[stage]}"


def check_delta(results: list[dict]) -> None:
    steps = results[0]
    assert steps["steps"] == ["journal", "commit songs", "commit users", "done"]
    assert steps["after"] == every("B")
    recovery = next(case for case in results if case["case"] == "recovery steps")
    assert recovery["steps"] == ["restore songs", "done"]
    faulted = [case for case in results if "after_fault" in case]
    assert len(faulted) >= 3 * len(steps["steps"]) + 2 * len(recovery["steps"])
    for case in faulted:
        assert_whole_tables(case, "after_fault")
        if case["case"].startswith(("Injected before", "KeyboardInterrupt before")) and "again" not in case["case"]:
            assert case["after_fault"] == every("A"), case  # the abort restored the versions before
        assert case["after_recovery"] == every("A"), case
        assert case["after_next"] == every("C"), case


@pytest.mark.skipif(not DELTA_SUPPORTED, reason="Delta Lake publishes no release for this Spark line")
@pytest.mark.parametrize("where", ["local", "s3"])
def test_delta_publishing_faulted_at_every_step(tmp_path, where, request):
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        create_bucket(endpoint, "faults-delta")
        results = run_harness("delta", "s3a://faults-delta/lake", tmp_path, s3_environment(endpoint))
    else:
        results = run_harness("delta", str(tmp_path / "lake"), tmp_path)
    check_delta(results)


def test_s3_parquet_publishing_faulted_at_every_step(tmp_path, s3_endpoint):
    create_bucket(s3_endpoint, "faults-parquet")
    results = run_harness("s3-parquet", "s3a://faults-parquet/lake", tmp_path, s3_environment(s3_endpoint))
    steps = results[0]
    assert steps["steps"] == ["journal"] + [
        step
        for table in ALL
        for step in (
            f"journal {table}",
            f"commit {table}",
            f"journal {table} committed",
            f"clean {table}",
        )
    ] + ["commit"]
    assert steps["after"] == every("B")
    faulted = [case for case in results if "after_fault" in case]
    assert len(faulted) >= 3 * len(steps["steps"])
    for case in faulted:
        if "Stopped" in case["case"]:
            # Between a folder's commit and its clean-up a reader sees both versions' rows,
            # until the next run finishes the clean-up.
            mixed = [table for table, seen in case["after_fault"].items() if seen == "mixed"]
            assert len(mixed) <= 1, case
            assert set(case["after_fault"].values()) <= {"A", "B", "mixed"}, case
        else:  # the run's own abort made every table whole
            assert_whole_tables(case, "after_fault")
            assert case["after_recovery"] == case["after_fault"], case
        assert_whole_tables(case, "after_recovery")
        replaced = [table for table in ALL if case["after_recovery"][table] == "B"]
        if replaced and case["notes"]:
            assert all(table in case["notes"][0] for table in replaced), case
        assert case["after_next"] == every("C"), case
