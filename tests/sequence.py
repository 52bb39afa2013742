"""Run several etl.py command lines one after another in one Spark session (one JVM),
as tests/test_delta.py does for its sequences of loads:

    python tests/sequence.py RESULTS.json -- ARGS... -- ARGS...

The session is the one etl.py builds for the first command line. Each run's exit
status, stdout and stderr go to RESULTS.json, written after every run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import etl
from sparkify_etl.cli import parse_args
from sparkify_etl.session import build_spark_session
from sparkify_etl.settings import resolve_settings


def main(argv: list[str]) -> int:
    target, *rest = argv
    runs = [list(group) for group in _split(rest)]
    settings = resolve_settings(parse_args(runs[0]), os.environ)
    spark = build_spark_session(settings, verbose=False)
    results = []
    try:
        for run in runs:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = etl.main(run, spark=spark)
            results.append({"argv": run, "status": status, "stdout": out.getvalue(), "stderr": err.getvalue()})
            Path(target).write_text(json.dumps(results, indent=1))
    finally:
        spark.stop()
    return 0


def _split(words: list[str]):
    group: list[str] = []
    for word in words[1:] if words and words[0] == "--" else words:
        if word == "--":
            yield group
            group = []
        else:
            group.append(word)
    yield group


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
