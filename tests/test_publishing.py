"""The local publishing protocol, faulted at every one of its steps.

For each step of a publish, an exception, a KeyboardInterrupt (what SIGINT raises) and a
SIGKILL land right before it. After the run's own abort (there is none after a kill) the
readers see the previous set or the new set; the next run recovers, stops at its quality
gate, and leaves the same set; a plain run after that publishes completely. Faults during
the abort and during recovery itself are enumerated the same way. No Spark: the protocol
swaps folders, and folders of plain files show every step."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from publish_steps import (
    NEW,
    NEXT_RUN_ID,
    OLD,
    RUN_ID,
    THIRD_RUN_ID,
    build_lake,
    fault_at,
    live,
    staged_publisher,
)
from sparkify_etl.errors import JournalError
from sparkify_etl.journal import JOURNAL, Journal, Protocol, Swap, read_journal, write_journal
from sparkify_etl.publish import discard_unpublished, recover
from sparkify_etl.storage import LocalLake

THIRD = {**NEW, "songs": "third songs", "users": "third users"}
HERE = Path(__file__).resolve().parent


class Injected(Exception):
    """The fault a test injects."""


def recording():
    steps: list[str] = []
    return steps, steps.append


def steps_of_a_publish(tmp_path: Path) -> list[str]:
    steps, on_step = recording()
    lake = build_lake(tmp_path / "reference")
    staged_publisher(lake, RUN_ID, NEW, on_step).publish()
    assert live(lake.root) == NEW
    return steps


STEPS = steps_of_a_publish(Path(tempfile.mkdtemp(prefix="publish-steps-")))


def test_a_publish_has_the_documented_steps():
    assert STEPS == [
        "journal",
        "aside songs",
        "in songs",
        "aside users",
        "in users",
        "in artists",
        "aside songplays/year=2018/month=11",
        "in songplays/year=2018/month=11",
        "retire songplays/year=2018/month=12",
        "commit",
        "clean",
    ]


def publish_as_a_run_does(lake: LocalLake, run_id: str, tables: dict[str, str], on_step) -> None:
    """What etl.py does around a publish: abort on any failure, then discard what no journal needs."""
    publisher = staged_publisher(lake, run_id, tables, on_step)
    try:
        publisher.publish()
    except BaseException:
        with contextlib.suppress(Injected):  # the run reports it; the journal is left for the next run
            publisher.abort()
        raise
    finally:
        discard_unpublished(lake, run_id)


def assert_next_runs_repair(lake: LocalLake, expected: dict[str, str]) -> None:
    """The next run recovers and stops at its gate: ``expected`` stays. The one after publishes."""
    recover(lake)
    assert live(lake.root) == expected
    gated = staged_publisher(lake, NEXT_RUN_ID, THIRD, lambda step: None)
    gated.abort()  # the quality gate failed: nothing was journaled
    discard_unpublished(lake, NEXT_RUN_ID)
    assert live(lake.root) == expected
    assert sorted(os.listdir(lake.root)) == sorted({folder.split("/")[0] for folder in expected})
    publish_as_a_run_does(lake, THIRD_RUN_ID, THIRD, lambda step: None)
    assert live(lake.root) == THIRD
    assert not lake.exists("_staging") and not lake.exists(JOURNAL)


@pytest.mark.parametrize("fault", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("index", range(len(STEPS)))
def test_a_fault_at_any_step_leaves_the_previous_or_the_new_set(tmp_path, index, fault):
    lake = build_lake(tmp_path / "lake")
    with pytest.raises(fault):
        publish_as_a_run_does(lake, RUN_ID, NEW, fault_at(index, fault))
    # Before the journal the run is undone; after it, its abort finishes the publish.
    assert live(lake.root) == (OLD if STEPS[index] == "journal" else NEW)
    assert_next_runs_repair(lake, live(lake.root))


@pytest.mark.parametrize("abort_index", range(len(STEPS) - 1))
@pytest.mark.parametrize("index", range(1, len(STEPS)))
def test_a_fault_during_the_abort_is_repaired_by_the_next_run(tmp_path, index, abort_index):
    """A second fault at any later step, while the abort rolls forward: the journal stays,
    and the next run finishes the publish."""
    lake = build_lake(tmp_path / "lake")
    abort_faults = fault_at(abort_index, Injected)
    with pytest.raises(Injected):
        publish_as_a_run_does(lake, RUN_ID, NEW, fault_at(index, Injected, then=abort_faults))
    assert_next_runs_repair(lake, NEW)


def kill(lake: LocalLake, index: int, *what: str) -> None:
    child = subprocess.run(
        [sys.executable, str(HERE / "publish_steps.py"), str(lake.root), str(index), *what],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -9, child.stderr[-2000:]


@pytest.mark.parametrize("index", range(len(STEPS)))
def test_a_kill_at_any_step_is_repaired_by_the_next_run(tmp_path, index):
    lake = build_lake(tmp_path / "lake")
    kill(lake, index)
    seen = live(lake.root)
    # Until the next run, every folder is its previous or its new version, but for the one
    # being swapped when the kill came, which may be missing for that long.
    missing = {folder for folder in OLD.keys() | NEW.keys() if folder not in seen}
    assert all(seen[folder] in (OLD.get(folder), NEW.get(folder)) for folder in seen)
    assert len(missing - (OLD.keys() - NEW.keys()) - (NEW.keys() - OLD.keys())) <= 1
    assert_next_runs_repair(lake, OLD if STEPS[index] == "journal" else NEW)


def crashed_after_journal(root: Path) -> LocalLake:
    """A lake whose publish died right after its journal: no abort ran, every swap is left."""
    lake = build_lake(root)
    with contextlib.suppress(Injected):  # as a kill: nothing else runs
        staged_publisher(lake, RUN_ID, NEW, fault_at(1, Injected)).publish()
    return lake


def steps_of_a_recovery(root: Path) -> list[str]:
    steps, on_step = recording()
    recover(crashed_after_journal(root), on_step=on_step)
    return steps


RECOVERY_STEPS = steps_of_a_recovery(Path(tempfile.mkdtemp(prefix="recovery-steps-")))


def test_a_recovery_has_the_publish_steps_after_the_journal():
    assert STEPS[1:] == RECOVERY_STEPS


@pytest.mark.parametrize("recovery_index", range(len(RECOVERY_STEPS)))
def test_a_kill_during_recovery_is_repaired_by_the_run_after(tmp_path, recovery_index):
    lake = crashed_after_journal(tmp_path / "lake")
    kill(lake, recovery_index, "recover")
    assert_next_runs_repair(lake, NEW)


@pytest.mark.parametrize("recovery_index", range(len(RECOVERY_STEPS)))
def test_a_failure_during_recovery_is_repaired_by_the_run_after(tmp_path, recovery_index):
    lake = crashed_after_journal(tmp_path / "lake")
    with pytest.raises(Injected):
        recover(lake, on_step=fault_at(recovery_index, Injected))
    assert_next_runs_repair(lake, NEW)


def test_recovery_never_moves_a_live_table_whose_replacement_is_gone(tmp_path):
    """The old protocol's loss: an abort removed the staging while the journal stayed, and
    the replay moved every live table into the removed staging. Now a swap whose staged
    copy is gone leaves its live table in place."""
    lake = build_lake(tmp_path / "lake")
    swaps = tuple(
        Swap(folder, f"_staging/{RUN_ID}/{folder}", f"_staging/{RUN_ID}/_previous/{folder}") for folder in OLD
    )
    write_journal(lake, Journal(RUN_ID, Protocol.LOCAL_RENAMES, swaps))
    notes = recover(lake)
    assert live(lake.root) == OLD
    assert notes == [f"completed the publish of run {RUN_ID}, which was interrupted"]
    assert not lake.exists(JOURNAL)


def test_a_removed_staging_folder_mid_publish_keeps_the_previous_version(tmp_path):
    lake = build_lake(tmp_path / "lake")
    kill(lake, STEPS.index("in users"))  # songs is new, users moved aside, its new copy staged
    lake.remove(f"_staging/{RUN_ID}/users")  # a user freeing disk
    notes = recover(lake)
    assert live(lake.root)["users"] == "old users" and live(lake.root)["songs"] == "new songs"
    assert notes == [
        f"completed the publish of run {RUN_ID}, which was interrupted; users kept their previous version, "
        "as their new one had been removed"
    ]


@pytest.mark.parametrize(
    "document, problem",
    [
        ({"version": 2, "run_id": "../../x", "protocol": "local-renames"}, "run id '../../x' is not one etl.py makes"),
        (
            {"version": 2, "run_id": RUN_ID, "protocol": "local-renames", "swaps": [["songs", "../elsewhere", "x"]]},
            "path '../elsewhere' leaves the output",
        ),
        (
            {"version": 2, "run_id": RUN_ID, "protocol": "local-renames", "swaps": [["/etc", None, "x"]]},
            "path '/etc' leaves the output",
        ),
        (
            {"version": 2, "run_id": RUN_ID, "protocol": "local-renames", "swaps": [["songs", "songs2", "x"]]},
            f"path 'songs2' is not in the staging folder of run {RUN_ID}",
        ),
        ({"version": 9, "run_id": RUN_ID, "protocol": "delta"}, "version 9, expected 2"),
    ],
)
def test_a_journal_naming_paths_outside_the_output_is_refused_and_nothing_moves(tmp_path, document, problem):
    lake = build_lake(tmp_path / "lake")
    (lake.root / JOURNAL).write_text(json.dumps(document))
    with pytest.raises(JournalError, match=rf"is not a journal this version of etl.py can read \({problem}\)"):
        recover(lake)
    assert live(lake.root) == OLD


def test_a_journal_of_the_previous_release_is_completed(tmp_path):
    """etl.py 2.0 journaled a flat list of renames."""
    lake = build_lake(tmp_path / "lake")
    publisher = staged_publisher(lake, RUN_ID, NEW, lambda step: None)
    moves = []
    for swap in publisher.swaps:
        if swap.staged is None or lake.exists(swap.live):
            moves.append([swap.live, swap.previous])
        if swap.staged is not None:
            moves.append([swap.staged, swap.live])
    (lake.root / JOURNAL).write_text(json.dumps({"run_id": RUN_ID, "moves": moves}))
    assert read_journal(lake).protocol is Protocol.LOCAL_RENAMES
    recover(lake)
    assert live(lake.root) == NEW


def test_deletes_never_follow_a_symlink_out_of_the_output(tmp_path):
    outside = tmp_path / "precious"
    (outside / "R").mkdir(parents=True)
    (outside / "R" / "keep.txt").write_text("keep")
    lake = build_lake(tmp_path / "lake")
    (lake.root / "_staging").symlink_to(outside)
    with pytest.raises(Exception, match="a symlink on its way leads outside the output"):
        recover(lake)
    assert (outside / "R" / "keep.txt").read_text() == "keep"


# --- S3: the same enumeration for S3Commits, against S3Proxy ------------------------------
# The protocol's steps need no Spark: a folder's new files are uploaded at its commit step,
# as a committer makes them visible at job commit. (Spark's own commits on S3 are killed and
# interrupted for real in test_s3.py.)

S3_TABLES = ("songs", "users")


class S3Harness:
    def __init__(self, endpoint: str, bucket: str):
        from conftest import S3_KEY, S3_REGION, S3_SECRET, create_bucket
        from sparkify_etl.s3 import S3Access
        from sparkify_etl.storage import S3Lake

        create_bucket(endpoint, bucket)
        self.access, self.bucket, self.S3Lake = S3Access(S3_REGION, endpoint, S3_KEY, S3_SECRET), bucket, S3Lake
        self.client = self.access.client()

    def lake(self, name: str, version: str | None = "A"):
        lake = self.S3Lake(f"s3a://{self.bucket}/{name}", self.access)
        if version is not None:
            for table in S3_TABLES:
                self.put(lake, f"{table}/part-{version}-0.parquet", version)
                self.put(lake, f"{table}/part-{version}-1.parquet", version)
        return lake

    def put(self, lake, relative: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=lake.key(relative), Body=text.encode())

    def load(self, lake, version: str, on_step, run_id: str = RUN_ID) -> None:
        """A load replacing every table with ``version``, aborted on any failure as etl.py does."""
        from sparkify_etl.publish import S3Commits

        publisher = S3Commits(lake, None, run_id, S3_TABLES, on_step)

        def save(folder: str) -> None:
            for index in range(2):
                self.put(lake, f"{folder}/part-{version}-{index}.parquet", version)

        try:
            for table in S3_TABLES:
                publisher.replace_folder(table, save)
                publisher._written(table)
            publisher.publish()
        except Stopped_:
            raise
        except BaseException:
            with contextlib.suppress(Injected, Stopped_):
                publisher.abort()
            raise

    def seen(self, lake) -> dict[str, str | None]:
        found = {}
        for table in S3_TABLES:
            keys = [key for key in lake.keys_under(table) if "/part-" in key]
            versions = {lake.read_text(key) for key in keys}
            found[table] = None if not versions else versions.pop() if len(versions) == 1 else "both"
        return found


class Stopped_(BaseException):
    """The process stops here: nothing after it runs (a kill, for a driver without Spark)."""


def s3_steps(harness: S3Harness) -> list[str]:
    steps, on_step = recording()
    lake = harness.lake("steps")
    harness.load(lake, "B", on_step)
    assert harness.seen(lake) == dict.fromkeys(S3_TABLES, "B")
    return steps


@pytest.fixture(scope="module")
def s3_harness(s3_endpoint) -> S3Harness:
    return S3Harness(s3_endpoint, "publishing-faults")


S3_STEPS = (
    ["journal"]
    + [
        step
        for table in S3_TABLES
        for step in (f"journal {table}", f"commit {table}", f"journal {table} committed", f"clean {table}")
    ]
    + ["commit"]
)


def test_an_s3_publish_has_the_documented_steps(s3_harness):
    assert s3_steps(s3_harness) == S3_STEPS


def assert_s3_repaired(harness: S3Harness, lake, after_fault: dict, run_id_next: str = NEXT_RUN_ID) -> None:
    """The next run recovers: every table whole, those whose commit was journaled new; it names
    them; the run after that loads completely."""
    left = lake.read_text(JOURNAL) is not None
    notes = recover(lake)
    after = harness.seen(lake)
    assert set(after.values()) <= {"A", "B"}, after
    assert all(after[table] == "B" for table, seen in after_fault.items() if seen == "B"), (after_fault, after)
    if left and "B" in after.values():  # the journal the failed run left names what it replaced
        assert all(table in notes[0] for table, seen in after.items() if seen == "B"), notes
    harness.load(lake, "C", lambda step: None, THIRD_RUN_ID)
    assert harness.seen(lake) == dict.fromkeys(S3_TABLES, "C")
    assert not lake.keys_under("_staging") and lake.read_text(JOURNAL) is None


@pytest.mark.parametrize("fault", [Injected, KeyboardInterrupt, Stopped_])
@pytest.mark.parametrize("index", range(len(S3_STEPS)))
def test_an_s3_publish_faulted_at_any_step_leaves_every_table_whole(s3_harness, index, fault):
    lake = s3_harness.lake(f"fault-{index}-{fault.__name__}")
    with pytest.raises(fault):
        s3_harness.load(lake, "B", fault_at(index, fault))
    after_fault = s3_harness.seen(lake)
    if fault is Stopped_:  # until the next run, a table being cleaned up shows both versions
        assert None not in after_fault.values() and list(after_fault.values()).count("both") <= 1
    else:  # the run's own abort made every table whole
        assert set(after_fault.values()) <= {"A", "B"}, after_fault
    assert_s3_repaired(s3_harness, lake, after_fault)


@pytest.mark.parametrize("later", range(3))
@pytest.mark.parametrize("index", range(1, len(S3_STEPS)))
def test_an_s3_publish_faulted_again_during_its_abort_is_repaired_by_the_next_run(s3_harness, index, later):
    lake = s3_harness.lake(f"abort-{index}-{later}")
    with pytest.raises(Injected):
        s3_harness.load(lake, "B", fault_at(index, Injected, then=fault_at(later, Injected)))
    assert None not in s3_harness.seen(lake).values()
    assert_s3_repaired(s3_harness, lake, s3_harness.seen(lake))


def test_an_s3_recovery_has_the_steps_of_the_folders_it_finishes(s3_harness):
    lake = s3_harness.lake("recovery-steps")
    with pytest.raises(Stopped_):
        s3_harness.load(lake, "B", fault_at(S3_STEPS.index("clean songs"), Stopped_))
    steps, on_step = recording()
    recover(lake, on_step=on_step)
    assert steps == S3_RECOVERY_STEPS


# Stopped while songs was between its commit and its clean-up, before users began.
S3_RECOVERY_STEPS = ["clean songs", "commit"]


@pytest.mark.parametrize("fault", [Injected, Stopped_])
@pytest.mark.parametrize("recovery_index", range(len(S3_RECOVERY_STEPS)))
def test_an_s3_recovery_faulted_at_any_step_is_repaired_by_the_run_after(s3_harness, recovery_index, fault):
    lake = s3_harness.lake(f"recovery-{recovery_index}-{fault.__name__}")
    with pytest.raises(Stopped_):
        s3_harness.load(lake, "B", fault_at(S3_STEPS.index("clean songs"), Stopped_))
    with pytest.raises(fault):
        recover(lake, on_step=fault_at(recovery_index, fault))
    assert_s3_repaired(s3_harness, lake, {"songs": "B", "users": "A"})
