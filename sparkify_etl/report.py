"""The run report: what a run read, wrote, checked and how long it took, under _runs/."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from . import __version__
from .errors import one_line
from .inputs import Inventory
from .locks import this_machine
from .settings import Settings
from .storage import Lake

log = logging.getLogger("sparkify.etl")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunReport:
    run_id: str
    started_at: str
    settings: dict[str, object]
    mode: str  # full, incremental or rollback
    format: str
    etl_version: str = __version__
    spark_version: str | None = None
    status: str = "running"  # then succeeded, failed, interrupted; died when closed by a later run
    finished_at: str | None = None
    error: str | None = None
    recovered: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)  # tables of this run that readers see
    published_at: str | None = None  # when all of this run's tables were published
    months: dict[str, dict[str, int]] = field(default_factory=dict)  # "2018-11": songplays rows removed, added
    inputs: dict[str, dict[str, object]] = field(default_factory=dict)
    tables: dict[str, dict[str, object]] = field(default_factory=dict)
    versions: dict[str, int | None] = field(default_factory=dict)  # Delta tables after the run
    based_on: str | None = None  # the run whose tables this one replaced (Delta)
    vacuumed_at: str | None = None  # when this run cleaned up old Delta files
    rolled_back_to: str | None = None
    checks: list[dict[str, object]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, settings: Settings, mode: str) -> RunReport:
        moment = datetime.now(timezone.utc)
        return cls(
            run_id=f"{moment:%Y%m%dT%H%M%SZ}-{os.urandom(3).hex()}",
            started_at=utc_now(),
            settings=settings.redacted(),
            mode=mode,
            format=settings.format,
        )

    def holder(self) -> dict[str, object]:
        return {"run_id": self.run_id, "pid": os.getpid(), **this_machine(), "started_at": self.started_at}

    def timed(self, stage: str, step, *args):
        started = time.monotonic()
        try:
            return step(*args)
        finally:
            self.stages[stage] = round(time.monotonic() - started, 3)

    def finish(self, status: str, error: str | None = None) -> None:
        self.finished_at, self.status, self.error = utc_now(), status, error

    @property
    def location(self) -> str:
        return f"_runs/{self.run_id}.json"

    def save(self, lake: Lake) -> None:
        """Write the report; one that cannot be written is logged and never masks the run's outcome."""
        try:
            lake.write_json(self.location, asdict(self))
        except Exception as error:  # noqa: BLE001 - the run's own result matters more
            log.warning("could not write the run report %s: %s", lake.display(self.location), one_line(error))

    def save_file_list(self, lake: Lake, inventories: Mapping[str, Inventory]) -> None:
        """Every input file and what became of it, one JSON line each, beside the report."""
        lines = []
        for dataset, inventory in inventories.items():
            lines += [
                json.dumps({"dataset": dataset, "path": f.path, "bytes": f.size, "read": True}) for f in inventory.read
            ]
            lines += [
                json.dumps({"dataset": dataset, "path": path, "read": False, "reason": reason})
                for path, reason in inventory.skipped
            ]
        location = f"_runs/{self.run_id}.files.jsonl"
        try:
            lake.write_text(location, "\n".join(lines) + "\n")
        except Exception as error:  # noqa: BLE001 - the run's own result matters more
            log.warning("could not write the file list %s: %s", lake.display(location), one_line(error))


def summary(report: RunReport, lake: Lake) -> str:
    """The closing summary, drawn from the run report."""
    if report.mode == "rollback":
        return (
            f"Sparkify ETL rolled back the tables in {lake.display()} to run {report.rolled_back_to}\n"
            + "".join(f"  {name:<10} version {version}\n" for name, version in report.versions.items())
            + f"  run report: {lake.display(report.location)}"
        )
    lines = [f"Sparkify ETL finished ({report.mode} load, {report.format}): tables in {lake.display()}"]
    lines += [f"  note: {note}" for note in report.recovered + report.warnings]
    for table, facts in report.tables.items():
        lines.append(
            f"  {table:<10} {facts['rows']:>12,} rows"
            + (f"  ({facts['written']})" if facts["written"] != "whole table" else "")
        )
    for month, change in report.months.items():
        lines.append(f"  songplays {month}: {change['removed']:,} rows removed, {change['added']:,} added")
    for dataset, facts in report.inputs.items():
        lines.append(
            f"  {dataset}: {facts['files_read']:,} files read, {facts['files_skipped']:,} skipped, "
            f"{facts['records']:,} records"
        )
        quarantined = facts["quarantined"]
        detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(facts["rejects"].items()))
        where = f" -> {lake.display('_quarantine/' + dataset)} ({detail})" if quarantined else ""
        lines.append(f"  quarantined from {dataset}: {quarantined:,}{where}")
    passed = sum(check["passed"] for check in report.checks)
    lines.append(f"  quality checks passed: {passed} of {len(report.checks)}")
    for stage, seconds in report.stages.items():
        lines.append(f"  {stage:<18} {seconds:8.1f} s")
    lines.append(f"  {'total':<18} {sum(report.stages.values()):8.1f} s")
    lines.append(f"  run report: {lake.display(report.location)}")
    return "\n".join(lines)
