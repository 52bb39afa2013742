"""The command line: flags, and signals turned into exceptions."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from datetime import date

from .errors import Terminated
from .settings import DEFAULT_CONFIG, DEFAULT_MAX_REJECT_RATE, DEFAULT_OUTPUT, FORMATS


def on_sigterm(signum, frame) -> None:
    from pyspark import SparkContext

    context = SparkContext._active_spark_context
    if context is not None:
        with contextlib.suppress(Exception):
            context.cancelAllJobs()
    raise Terminated()


def utc_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2018-11-15") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="etl.py",
        allow_abbrev=False,
        description="Build the Sparkify star schema (songplays, users, songs, artists, time) "
        "from song_data/ and log_data/ JSON.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help=f"INI settings file (default: ./{DEFAULT_CONFIG} when present)"
    )
    parser.add_argument(
        "--input",
        metavar="ROOT",
        help="folder or s3a:// URI holding song_data/ and log_data/ (default: the sample dataset in data/sample)",
    )
    parser.add_argument(
        "--output", metavar="ROOT", help=f"folder or s3a:// URI for the tables (default: ./{DEFAULT_OUTPUT})"
    )
    parser.add_argument("--format", choices=FORMATS, help="table format (default: parquet)")
    parser.add_argument(
        "--since",
        metavar="YYYY-MM-DD",
        type=utc_date,
        help="incremental load: only log events from this UTC day on; the songplays "
        "and time partitions the window touches are replaced, users merged",
    )
    parser.add_argument(
        "--until", metavar="YYYY-MM-DD", type=utc_date, help="incremental load: only log events before this UTC day"
    )
    parser.add_argument(
        "--max-reject-rate",
        metavar="FRACTION",
        help="share of a dataset's records that may be quarantined before the run "
        f"fails without publishing any table (default {DEFAULT_MAX_REJECT_RATE})",
    )
    parser.add_argument(
        "--catalog",
        metavar="DATABASE",
        help="after the load, register the tables in this database of the session's metastore",
    )
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="Delta tables: return all of them to the versions of the previous successful run",
    )
    parser.add_argument(
        "--allow-removing-days",
        action="store_true",
        help="incremental load: let the window delete stored plays on days the input has no events for",
    )
    parser.add_argument(
        "--switch-format",
        action="store_true",
        help="replace every table of a lake written in the other format with a full load in --format",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="log every step and show Spark's output and full stack traces"
    )
    parser.add_argument(
        "--print-packages",
        action="store_true",
        help="print the spark-submit flags (--packages ...) for the jars a run needs, and exit",
    )
    parser.add_argument(
        "--package-zip",
        metavar="FILE",
        help="write the sparkify_etl package as a zip for spark-submit --py-files (YARN cluster mode), and exit",
    )
    parser.add_argument(
        "--print-ddl",
        choices=("athena",),
        help="print CREATE EXTERNAL TABLE statements for the tables at --output, and exit",
    )
    return parser.parse_args(argv)
