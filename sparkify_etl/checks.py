"""The quality gate every table passes before any is published."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from .errors import EtlError
from .extract import SourceBatch
from .tables import spec_of


@dataclass
class CheckResult:
    table: str
    check: str
    passed: bool
    detail: str
    examples: list[str] = field(default_factory=list)


def key_checks(name: str, table: DataFrame, key: str) -> tuple[int, list[CheckResult]]:
    """The table's row count, and whether ``key`` is set on every row and names one row only."""
    # As many distinct 64-bit hashes as keys proves the keys distinct, and counting hashes
    # is cheaper than counting long strings. Only when two hashes agree (a repeated key,
    # or a collision) are the keys themselves counted.
    key_hash = F.when(F.col(key).isNotNull(), F.xxhash64(key))
    counts = table.agg(
        F.count(F.lit(1)).alias("rows"), F.count(key).alias("keyed"), F.count_distinct(key_hash).alias("hashes")
    ).first()
    distinct = counts["hashes"]
    if distinct != counts["keyed"]:
        distinct = table.agg(F.count_distinct(key)).first()[0]
    missing, repeated = counts["rows"] - counts["keyed"], counts["keyed"] - distinct
    examples = (
        []
        if not repeated
        else [
            str(row[key])
            for row in table.where(F.col(key).isNotNull())
            .groupBy(key)
            .count()
            .where("count > 1")
            .orderBy(key)
            .limit(3)
            .collect()
        ]
    )
    return counts["rows"], [
        CheckResult(
            name, f"{key} is never null", missing == 0, f"{missing:,} of {counts['rows']:,} rows have no {key}"
        ),
        CheckResult(name, f"{key} is unique", repeated == 0, f"{repeated:,} rows repeat a {key}", examples),
    ]


def reference_check(name: str, table: DataFrame, column: str, parent_name: str, parent: DataFrame) -> CheckResult:
    """Every non-null ``column`` value of ``table`` is a key of ``parent``."""
    orphans = (
        table.where(F.col(column).isNotNull())
        .select(column)
        .distinct()
        .join(parent.select(column), column, "left_anti")
    )
    examples = [str(row[column]) for row in orphans.orderBy(column).limit(3).collect()]
    missing = orphans.count() if examples else 0
    return CheckResult(
        name,
        f"{column} references {parent_name}",
        not examples,
        f"{missing:,} {column} values missing from {parent_name}",
        examples,
    )


def count_check(name: str, check: str, actual: int, expected: int, unit: str) -> CheckResult:
    return CheckResult(name, check, actual == expected, f"{actual:,} {unit}, expected {expected:,}")


def distinct_event_count(plays: DataFrame, repeated: DataFrame) -> int:
    """How many distinct events ``plays`` holds, counted apart from songplays: its rows,
    less the extra copies of the ``repeated_plays``."""
    extra_copies = repeated.agg(F.sum(F.col("copies") - 1)).first()[0] or 0
    return plays.count() - extra_copies


REFERENCES = (("user_id", "users"), ("start_time", "time"), ("song_id", "songs"), ("artist_id", "artists"))


def quality_gate(
    tables: dict[str, DataFrame], fresh_songplays: DataFrame, distinct_events: int, batches: Sequence[SourceBatch]
) -> tuple[list[CheckResult], dict[str, int]]:
    """Keys, references and reconciliation, on the tables exactly as they will be written;
    also each table's row count.

    ``tables`` may lack songplays and time (an incremental window without plays).
    ``fresh_songplays`` are this run's plays, ``distinct_events`` how many distinct
    NextSong events the accepted records hold, counted from them. The checks are small
    jobs, run side by side so every core stays busy.
    """
    with ThreadPoolExecutor(max_workers=4) as pool:
        keyed = {name: pool.submit(key_checks, name, table, spec_of(name).key) for name, table in tables.items()}
        references = [
            pool.submit(reference_check, "songplays", tables["songplays"], column, parent, tables[parent])
            for column, parent in REFERENCES
            if "songplays" in tables
        ]
        fresh_count = pool.submit(fresh_songplays.count) if fresh_songplays is not tables.get("songplays") else None
    results, rows = [], {}
    for name, checks in keyed.items():
        rows[name], table_checks = checks.result()
        results += table_checks
    results += [reference.result() for reference in references]
    fresh_rows = fresh_count.result() if fresh_count is not None else rows["songplays"]
    results.append(count_check("songplays", "one row per distinct NextSong event", fresh_rows, distinct_events, "rows"))
    for batch in batches:
        results.append(
            count_check(
                batch.dataset,
                "files read = files listed - files skipped",
                batch.files_parsed,
                len(batch.inventory.read),
                "files",
            )
        )
        results.append(
            count_check(
                batch.dataset,
                "records read = accepted + quarantined",
                batch.accepted + batch.quarantined,
                batch.records,
                "accepted + quarantined",
            )
        )
    return results, rows


def enforce_quality_gate(results: Sequence[CheckResult]) -> None:
    failed = [result for result in results if not result.passed]
    if failed:
        lines = [
            f"  - {r.table}: {r.check} failed: {r.detail}" + (f" (e.g. {', '.join(r.examples)})" if r.examples else "")
            for r in failed
        ]
        raise EtlError("The quality gate failed, so no table was published:\n" + "\n".join(lines))


def enforce_reject_limit(batch: SourceBatch, limit: float, quarantine: str) -> None:
    """Too many unusable records means the input, not a few records, is wrong: stop."""
    if batch.records and batch.quarantined / batch.records > limit:
        reasons = ", ".join(f"{reason}: {count:,}" for reason, count in sorted(batch.rejects.items()))
        raise EtlError(
            f"{batch.quarantined:,} of {batch.records:,} {batch.dataset} records "
            f"({batch.quarantined / batch.records:.1%}) were quarantined, more than the {limit:.1%} allowed "
            f"(--max-reject-rate or [ETL] MAX_REJECT_RATE), so no table was published. The records, "
            f"with their files and reasons, are in {quarantine} ({reasons})."
        )
