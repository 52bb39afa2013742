"""The local publishing protocol on a tiny lake of plain files, step by step: no Spark is
needed to swap folders, so every step can be faulted cheaply. Used by test_publishing.py,
and run as a script to be killed (SIGKILL) at one step:

    python tests/publish_steps.py LAKE STEP_INDEX     publish the NEW set, killed at that step
    python tests/publish_steps.py LAKE STEP_INDEX recover
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparkify_etl.publish import LocalRenames, recover
from sparkify_etl.storage import LocalLake
from sparkify_etl.writing import local_output

RUN_ID, NEXT_RUN_ID, THIRD_RUN_ID = "20261208T010000Z-aaaaaa", "20261208T020000Z-bbbbbb", "20261208T030000Z-cccccc"
# The folders a load replaces: whole tables, one month of songplays; artists is new, and
# December of songplays is left with no rows (retired); time is untouched.
OLD = {
    "songs": "old songs",
    "users": "old users",
    "songplays/year=2018/month=11": "old november",
    "songplays/year=2018/month=12": "old december",
    "time/year=2018/month=11": "old time",
}
NEW = {
    "songs": "new songs",
    "users": "new users",
    "artists": "new artists",
    "songplays/year=2018/month=11": "new november",
    "time/year=2018/month=11": "old time",
}
RETIRED = ("songplays/year=2018/month=12",)


def build_lake(root: Path, tables: dict[str, str] = OLD) -> LocalLake:
    for folder, text in tables.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "part-0.parquet").write_text(text)
    return LocalLake(str(root))


def staged_publisher(lake: LocalLake, run_id: str, tables: dict[str, str], on_step) -> LocalRenames:
    """A publisher with ``tables`` (those not already as given) staged, as Spark would have written them."""
    publisher = LocalRenames(lake, local_output(str(lake.root)), run_id, on_step)
    for folder, text in tables.items():
        if (lake.root / folder / "part-0.parquet").is_file() and text.startswith("old"):
            continue  # untouched by the load
        staged = lake.path(publisher.stage(folder))
        staged.mkdir(parents=True)
        (staged / "part-0.parquet").write_text(text)
    for folder in RETIRED:
        if folder not in tables:
            publisher.retire(folder)
    return publisher


def live(root: Path) -> dict[str, str]:
    """What a reader sees: every data file outside the underscore folders, by its folder."""
    return {
        path.parent.relative_to(root).as_posix(): path.read_text()
        for path in sorted(root.rglob("part-0.parquet"))
        if not path.relative_to(root).parts[0].startswith("_")
    }


def fault_at(index: int, fault: type[BaseException], then=None):
    """An ``on_step`` raising ``fault`` before step ``index``, then ``then``'s faults, if given."""
    seen = []

    def on_step(step: str) -> None:
        seen.append(step)
        if len(seen) - 1 == index:
            raise fault(f"injected before {step}")
        if then is not None and len(seen) - 1 > index:
            then(step)

    return on_step


def kill_at(index: int):
    seen = []

    def on_step(step: str) -> None:
        seen.append(step)
        if len(seen) - 1 == index:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


if __name__ == "__main__":
    lake_root, index, *what = sys.argv[1:]
    lake = LocalLake(lake_root)
    if what == ["recover"]:
        recover(lake, on_step=kill_at(int(index)))
    else:
        staged_publisher(lake, RUN_ID, NEW, kill_at(int(index))).publish()
    sys.exit(3)  # the step was never reached
