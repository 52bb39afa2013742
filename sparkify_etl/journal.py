"""The publishing journal: one typed, versioned record of what a run is about to change.

It is written before the first live folder, object or Delta version changes, and removed
only once the change is complete, so whoever finds it (the run itself when it aborts, or
the next run) knows exactly what to finish. ``read_journal`` and ``write_journal`` are
its only reader and writer; every path read back is checked to stay inside the output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePosixPath

from .errors import JournalError
from .storage import Lake

JOURNAL = "_journal.json"
JOURNAL_VERSION = 2
STAGING = "_staging"
# Run ids are made by RunReport.start: a UTC timestamp and six hex digits.
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")


class Protocol(Enum):
    """How a run publishes, and so how its journal is completed."""

    LOCAL_RENAMES = "local-renames"  # staged folders swapped in by renames
    S3_COMMITS = "s3-commits"  # new files added in place, then the old ones deleted
    DELTA = "delta"  # one Delta commit per table


@dataclass(frozen=True)
class Swap:
    """One live folder replaced by a staged one (or, with ``staged`` None, retired)."""

    live: str  # a table, or one partition folder of it
    staged: str | None  # where this run wrote the replacement
    previous: str  # where the live folder is moved aside until the swap set is complete


@dataclass(frozen=True)
class Replacement:
    """One S3 folder being replaced in place: its old objects listed in ``manifest`` before
    Spark added the new ones; ``committed`` once Spark's job committed them."""

    folder: str
    manifest: str
    committed: bool = False


@dataclass(frozen=True)
class Journal:
    run_id: str
    protocol: Protocol
    swaps: tuple[Swap, ...] = ()  # LOCAL_RENAMES
    tables: tuple[str, ...] = ()  # S3_COMMITS: the tables this run replaces
    committed: tuple[str, ...] = ()  # S3_COMMITS: tables whose new version is in place
    replacing: tuple[Replacement, ...] = ()  # S3_COMMITS: folders not yet rid of their old objects
    versions_before: dict[str, int | None] = field(default_factory=dict)  # DELTA

    @property
    def staging(self) -> str:
        return staging_folder(self.run_id)


def staging_folder(run_id: str) -> str:
    return f"{STAGING}/{run_id}"


def write_journal(lake: Lake, journal: Journal) -> None:
    document = {
        "version": JOURNAL_VERSION,
        "run_id": journal.run_id,
        "protocol": journal.protocol.value,
        "swaps": [[swap.live, swap.staged, swap.previous] for swap in journal.swaps],
        "tables": list(journal.tables),
        "committed": list(journal.committed),
        "replacing": [[r.folder, r.manifest, r.committed] for r in journal.replacing],
        "versions_before": journal.versions_before,
    }
    lake.write_json(JOURNAL, document)


def read_journal(lake: Lake) -> Journal | None:
    """The journal the output holds, or None; a journal that is not well formed, or that
    names a path outside the output, is refused with what to do."""
    text = lake.read_text(JOURNAL)
    if not text:
        return None
    try:
        document = json.loads(text)
        journal = _legacy(document) if "version" not in document else _parse(document)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise JournalError(
            f"{lake.display(JOURNAL)} is not a journal this version of etl.py can read ({error}). "
            "Move it aside and check the tables by hand: it describes a publish that did not finish."
        ) from None
    return journal


def _parse(document: dict) -> Journal:
    if document["version"] != JOURNAL_VERSION:
        raise ValueError(f"version {document['version']}, expected {JOURNAL_VERSION}")
    run_id = _run_id(document["run_id"])
    swaps = tuple(
        Swap(_inside(live), None if staged is None else _inside(staged, run_id), _inside(previous, run_id))
        for live, staged, previous in document.get("swaps", [])
    )
    return Journal(
        run_id,
        Protocol(document["protocol"]),
        swaps,
        tuple(_inside(name) for name in document.get("tables", [])),
        tuple(_inside(name) for name in document.get("committed", [])),
        tuple(
            Replacement(_inside(folder), _inside(manifest, run_id), bool(committed))
            for folder, manifest, committed in document.get("replacing", [])
        ),
        {
            _inside(name): None if version is None else int(version)
            for name, version in document.get("versions_before", {}).items()
        },
    )


def _legacy(document: dict) -> Journal:
    """The three journal shapes etl.py 2.0 wrote, read as today's record."""
    run_id = _run_id(document["run_id"])
    if document.get("format") == "delta":
        return Journal(run_id, Protocol.DELTA, versions_before=dict(document["versions_before"]))
    if "moves" not in document:
        committed = tuple(_inside(name) for name in document.get("committed", []))
        return Journal(run_id, Protocol.S3_COMMITS, committed=committed)
    staging, previous = f"{staging_folder(run_id)}/", f"{staging_folder(run_id)}/_previous/"
    staged = {
        destination: source
        for source, destination in document["moves"]
        if source.startswith(staging) and not source.startswith(previous)
    }
    aside = {source for source, destination in document["moves"] if destination.startswith(previous)}
    swaps = [Swap(_inside(live), _inside(source, run_id), f"{previous}{live}") for live, source in staged.items()]
    swaps += [Swap(_inside(live), None, f"{previous}{live}") for live in aside if live not in staged]
    return Journal(run_id, Protocol.LOCAL_RENAMES, tuple(swaps))


def _run_id(value: object) -> str:
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        raise ValueError(f"run id {value!r} is not one etl.py makes")
    return value


def _inside(relative: object, run_id: str | None = None) -> str:
    """``relative`` when it names a place inside the output (inside the run's staging
    folder when ``run_id`` is given); otherwise a ValueError."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"path {relative!r} is empty")
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or "\\" in relative or str(path) != relative:
        raise ValueError(f"path {relative!r} leaves the output")
    if run_id is not None and path.parts[:2] != (STAGING, run_id):
        raise ValueError(f"path {relative!r} is not in the staging folder of run {run_id}")
    return relative
