"""The Delta publisher faulted at every step, on two tiny tables in one JVM
(tests/publish_faults.py). After every fault, and after faults during the abort and during
recovery: no table is ever missing or a mix of two loads; the next run's recovery restores
the previous set; the run after that publishes completely. (The parquet publishers need no
Spark to be driven step by step: test_publishing.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_delta import DELTA_SUPPORTED

from conftest import NON_UTC_ZONE, REPO

pytestmark = pytest.mark.slow
ALL = ("songs", "users")


def run_harness(root: Path, tmp_path: Path) -> list[dict]:
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "publish_faults.py"), str(root), str(results)],
        cwd=tmp_path,
        env={**os.environ, "TZ": NON_UTC_ZONE},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(results.read_text())


def every(version: str) -> dict[str, str]:
    return dict.fromkeys(ALL, version)


@pytest.mark.skipif(not DELTA_SUPPORTED, reason="Delta Lake publishes no release for this Spark line")
def test_delta_publishing_faulted_at_every_step(tmp_path):
    results = run_harness(tmp_path / "lake", tmp_path)
    steps = results[0]
    assert steps["steps"] == ["journal", "commit songs", "commit users", "done"]
    assert steps["after"] == every("B")
    recovery = next(case for case in results if case["case"] == "recovery steps")
    assert recovery["steps"] == ["restore songs", "done"]
    faulted = [case for case in results if "after_fault" in case]
    abort = [case for case in faulted if "again in the abort" in case["case"]]
    assert [case["case"].rsplit(" before ", 1)[1] for case in abort] == ["restore users", "restore songs", "done"]
    assert len(faulted) == 3 * len(steps["steps"]) + len(abort) + 2 * len(recovery["steps"])
    for case in faulted:
        # Every table is one load's, never missing, never a mix of two.
        assert set(case["after_fault"].values()) <= {"A", "B"}, case
        if case["case"].startswith(("Injected before", "KeyboardInterrupt before")) and "again" not in case["case"]:
            assert case["after_fault"] == every("A"), case  # the abort restored the versions before
        assert case["after_recovery"] == every("A"), case
        assert case["after_next"] == every("C"), case
