"""An output root knows it is a lake: marked before its first change, foreign folders refused,
formats switched only when asked (and only where the switch leaves nothing behind)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_in_session
from sparkify_etl.errors import UsageError
from sparkify_etl.lakemark import MARK, claim_lake
from sparkify_etl.storage import LocalLake


def folder_with(root: Path, *names: str) -> LocalLake:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "part-0.parquet").write_text(name)
    return LocalLake(str(root))


def test_a_new_output_is_marked_with_its_format(tmp_path):
    lake = LocalLake(str(tmp_path))
    assert claim_lake(lake, "delta", switch_format=False) == f"marked {tmp_path} as a delta lake"
    assert json.loads((tmp_path / MARK).read_text()) == {
        "layout_version": 1,
        "format": "delta",
        "made_by": "sparkify-etl",
    }
    assert claim_lake(lake, "delta", switch_format=False) is None


def test_a_folder_with_tables_etl_py_did_not_make_is_refused_untouched(tmp_path):
    lake = folder_with(tmp_path, "users", "songs/year=2000", "notes")
    with pytest.raises(UsageError, match=rf"{tmp_path} holds songs, users but is not a lake etl.py made"):
        claim_lake(lake, "parquet", switch_format=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "songs", "users"]


def test_a_lake_of_the_previous_release_is_adopted_in_its_format(tmp_path):
    lake = folder_with(tmp_path, "users", "songs", "_runs")
    assert claim_lake(lake, "parquet", switch_format=False) == (
        f"marked {tmp_path} as a parquet lake (made by an earlier etl.py)"
    )
    (tmp_path / MARK).unlink()
    (tmp_path / "users" / "_delta_log").mkdir()
    with pytest.raises(UsageError, match=rf"{tmp_path} holds delta tables, and this run would write parquet"):
        claim_lake(lake, "parquet", switch_format=False)


def test_switching_formats_needs_asking_and_never_leaves_parquet_beside_delta(tmp_path):
    lake = LocalLake(str(tmp_path))
    claim_lake(lake, "parquet", switch_format=False)
    with pytest.raises(UsageError, match="Pass --format parquet, or load the Delta tables into a new output"):
        claim_lake(lake, "delta", switch_format=False)
    with pytest.raises(UsageError, match="parquet readers would count them twice"):
        claim_lake(lake, "delta", switch_format=True)
    assert json.loads((tmp_path / MARK).read_text())["format"] == "parquet"

    (tmp_path / MARK).write_text(json.dumps({"layout_version": 1, "format": "delta", "made_by": "sparkify-etl"}))
    with pytest.raises(UsageError, match="Pass --format delta, or --switch-format to replace every table"):
        claim_lake(lake, "parquet", switch_format=False)
    assert claim_lake(lake, "parquet", switch_format=True) == f"switched {tmp_path} from delta to parquet"
    assert json.loads((tmp_path / MARK).read_text())["format"] == "parquet"


def test_a_run_into_a_foreign_folder_is_refused_before_anything_changes(spark, quirky_dataset, tmp_path, capsys):
    output = tmp_path / "shared"
    folder_with(output, "time", "artists")
    before = sorted(path.relative_to(output).as_posix() for path in output.rglob("*"))
    assert run_in_session(spark, "--input", str(quirky_dataset), "--output", str(output)) == 2
    assert "holds artists, time but is not a lake etl.py made" in capsys.readouterr().err
    assert sorted(path.relative_to(output).as_posix() for path in output.rglob("*")) == before
