"""The lake's mark: an output root says it is a lake this job made, and in which format.

Written before a run's first change to a new lake. A run refuses a folder or prefix that
holds table-like folders but no mark (it is not a lake this job made: a load would replace
them), and refuses to switch the format of a marked lake unless asked to.
"""

from __future__ import annotations

import json

from .errors import UsageError
from .storage import Lake

MARK = "_sparkify_lake.json"
LAYOUT_VERSION = 1
TABLE_FOLDERS = ("songplays", "users", "songs", "artists", "time")


def check_lake(lake: Lake, table_format: str, switch_format: bool) -> str | None:
    """Refuse an output this run must not write; otherwise the note for marking it (None
    when it is marked as it should be). Reads only."""
    text = lake.read_text(MARK)
    names = set(lake.names(""))
    if text is None:
        tables = sorted(names.intersection(TABLE_FOLDERS))
        if tables and "_runs" not in names:
            raise UsageError(
                f"{lake.display()} holds {', '.join(tables)} but is not a lake etl.py made (it has no {MARK}), "
                "and a load would replace those folders. Choose an empty or new output, or move them away."
            )
        _refuse_switch(lake, _format_found(lake, tables), table_format, switch_format)
        return f"marked {lake.display()} as a {table_format} lake" + (" (made by an earlier etl.py)" if tables else "")
    try:
        mark = json.loads(text)
        marked_format, version = mark["format"], mark["layout_version"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{lake.display(MARK)} is damaged; it should say which format the lake holds.") from None
    if version > LAYOUT_VERSION:
        raise UsageError(
            f"{lake.display()} has layout version {version}, newer than this etl.py knows ({LAYOUT_VERSION}): "
            "run the etl.py that made it."
        )
    _refuse_switch(lake, marked_format, table_format, switch_format)
    if marked_format != table_format:
        return f"switched {lake.display()} from {marked_format} to {table_format}"
    return None


def claim_lake(lake: Lake, table_format: str, switch_format: bool, fence=lambda step: None) -> str | None:
    """``check_lake`` again, under the run's lock, then the mark written where it is due."""
    note = check_lake(lake, table_format, switch_format)
    if note is not None:
        fence("mark")
        lake.write_json(MARK, {"layout_version": LAYOUT_VERSION, "format": table_format, "made_by": "sparkify-etl"})
    return note


def _format_found(lake: Lake, tables: list[str]) -> str | None:
    if not tables:
        return None
    return "delta" if any(lake.exists(f"{table}/_delta_log") for table in tables) else "parquet"


def _refuse_switch(lake: Lake, found: str | None, table_format: str, switch_format: bool) -> None:
    if found is None or found == table_format:
        return
    if not switch_format:
        switch = (
            f"or --switch-format to replace every table with a full load in {table_format}"
            if table_format == "parquet"
            else "or load the Delta tables into a new output"
        )
        raise UsageError(
            f"{lake.display()} holds {found} tables, and this run would write {table_format}. "
            f"Pass --format {found}, {switch}."
        )
    if table_format == "delta":
        raise UsageError(
            f"--switch-format from parquet to delta in place would leave the parquet files beside the Delta "
            f"tables, where parquet readers would count them twice. Load the Delta tables into a new output, "
            f"then remove {lake.display()}."
        )
