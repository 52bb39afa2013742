"""Every step of the Delta publisher faulted, on two tiny tables, in one JVM:

    python tests/publish_faults.py FOLDER RESULTS.json

For each step of a load that replaces set A with set B, and each fault (an exception, a
KeyboardInterrupt, and a stop with no cleanup at all, which is what a kill leaves), the run's
own abort runs (not after a stop), then the next run recovers and stops at its gate, then a
third run loads set C. A second fault at every step of the abort, and faults at every step of
recovery, are enumerated too. Which
set a reader sees after every stage (read by delta-rs, independently of Spark) goes to
RESULTS.json, which test_publishing_spark.py checks.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from publish_steps import fault_at
from sparkify_etl.delta import DeltaPublisher, configure_delta, delta_recovery
from sparkify_etl.publish import recover
from sparkify_etl.report import RunReport
from sparkify_etl.s3a import configure_output
from sparkify_etl.session import build_spark_session
from sparkify_etl.settings import Settings
from sparkify_etl.storage import open_lake
from sparkify_etl.tables import SONGS, USERS
from sparkify_etl.writing import Write

TABLES = (SONGS, USERS)  # a partitioned table and a plain one: every kind of step, few commits


class Injected(Exception):
    """An exception at a step."""


class Stopped(BaseException):
    """The process stops at a step: nothing after it runs, no abort, no cleanup (a kill)."""


def rows(version: str) -> dict[str, list[tuple]]:
    """Set ``version`` of the tiny tables: every row differs between sets."""
    return {
        "songs": [(f"SO{version}{i}", f"title {version}", f"AR{i}", 2000 + i, 1.5 * i) for i in range(3)],
        "users": [(10 * "ABC".index(version) + i, f"first {version}", "last", "F", "free") for i in range(2)],
    }


class Harness:
    def __init__(self, root: str):
        self.root = root
        self.settings = Settings(input_root="/unused", output_root=root, format="delta")
        self.spark = build_spark_session(self.settings, verbose=False)
        configure_delta(self.spark, self.settings.retain_days)
        # Two rows a table: one task a write, not one per core.
        self.spark.conf.set("spark.sql.shuffle.partitions", "1")
        self._base: str | None = None  # the lake holding set A, copied for each case
        self.fresh("base", "A")  # loaded once, never changed afterwards

    def fresh(self, name: str, base: str | None) -> None:
        """Point the harness at a new lake ``name``: a copy of the lake holding set A when
        ``base`` is "A" (loaded once, so each case costs only its own steps), else empty."""
        self.settings = replace(self.settings, output_root=f"{self.root}/{name}")
        self.lake = open_lake(self.settings)
        self.lake.probe()
        self.output = configure_output(self.spark, self.settings)
        if base is None:
            return
        if self._base is None:
            self.load(base, lambda step: None)
            self._base = self.settings.output_root
        else:
            _copy_lake(self._base, self.settings.output_root)

    def publisher(self, report: RunReport, on_step: Callable[[str], None]) -> DeltaPublisher:
        return DeltaPublisher(self.spark, self.lake, self.output, report, 7, on_step)

    def load(self, version: str, on_step: Callable[[str], None]) -> None:
        """What etl.py does once its gate passed: write, publish, abort on any failure."""
        report = RunReport.start(self.settings, "full")
        publisher = self.publisher(report, on_step)
        data = rows(version)
        try:
            for spec in TABLES:
                frame = self.spark.createDataFrame(data[spec.name], spec.schema)
                publisher.write(Write(spec, frame), len(data[spec.name]))
            publisher.publish()
        except Stopped:
            raise
        except BaseException:
            with contextlib.suppress(Injected, Stopped):  # a fault during the abort: left for the next run
                publisher.abort()
            raise

    def recover(self, on_step: Callable[[str], None]) -> list[str]:
        return recover(self.lake, delta_recovery(self.spark, self.lake, self.output), on_step)

    def seen(self) -> dict[str, str | None]:
        """Which set each table holds for a reader: "A", "B", "C", None (no table) or "mixed"."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        found = {}
        for spec in TABLES:
            try:
                table = DeltaTable(f"{self.settings.output_root}/{spec.name}").to_pyarrow_table()
            except TableNotFoundError:
                found[spec.name] = None
                continue
            keys = sorted(str(key) for key in table.column(spec.key).to_pylist())
            versions = {version for version in "ABC" if keys == sorted(str(r[0]) for r in rows(version)[spec.name])}
            found[spec.name] = versions.pop() if versions else "mixed"
        return found


def _copy_lake(source: str, target: str) -> None:
    """Every file of a tiny lake, copied (Delta logs name their files relative to the table)."""
    shutil.copytree(source, target, dirs_exist_ok=True)


def main(root: str, target: str) -> int:
    harness = Harness(root)
    results: list[dict] = []

    def record(case: str, **stages) -> None:
        results.append({"case": case, **stages})
        Path(target).write_text(json.dumps(results, indent=1))

    def then_repair(case: str) -> None:
        """What the readers see now, after the next run's recovery, and after the run after it."""
        after_fault = harness.seen()
        notes = harness.recover(lambda step: None)
        after_recovery = harness.seen()
        harness.load("C", lambda step: None)
        record(case, after_fault=after_fault, notes=notes, after_recovery=after_recovery, after_next=harness.seen())

    steps: list[str] = []
    harness.fresh("steps", "A")
    harness.load("B", steps.append)
    record("steps", steps=steps, after=harness.seen())

    for index, step in enumerate(steps):
        abort_steps: list[str] = []
        for fault in (Injected, KeyboardInterrupt, Stopped):
            harness.fresh(f"f{index}-{fault.__name__}", "A")
            with contextlib.suppress(Injected, KeyboardInterrupt, Stopped):
                harness.load("B", fault_at(index, fault, then=abort_steps.append if fault is Injected else None))
            then_repair(f"{fault.__name__} before {step}")
        # The abort after the last step restores every table: a second fault at each of its
        # steps covers every step an abort has (the same restore recovery runs, faulted below).
        for later, abort_step in enumerate(abort_steps if index == len(steps) - 1 else []):
            harness.fresh(f"a{index}-{later}", "A")
            with contextlib.suppress(Injected):
                harness.load("B", fault_at(index, Injected, then=fault_at(later, Injected)))
            then_repair(f"Injected before {step}, then again in the abort before {abort_step}")

    # Stopped after the first table commit; then the recovering run faulted at each of its steps.
    recovery_steps: list[str] = []
    harness.fresh("recovery-steps", "A")
    with contextlib.suppress(Stopped):
        harness.load("B", fault_at(2, Stopped))
    harness.recover(recovery_steps.append)
    record("recovery steps", steps=recovery_steps)
    for index, step in enumerate(recovery_steps):
        for fault in (Injected, Stopped):
            harness.fresh(f"r{index}-{fault.__name__}", "A")
            with contextlib.suppress(Stopped):
                harness.load("B", fault_at(2, Stopped))
            with contextlib.suppress(Injected, Stopped):
                harness.recover(fault_at(index, fault))
            then_repair(f"stopped mid-load, then recovery {fault.__name__} before {step}")
    harness.spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
