"""Run the analytics queries in this folder against a lake and print their results.

    python sql/run_queries.py --output ROOT [--format delta]      # tables read from an output root
    python sql/run_queries.py --catalog DATABASE                  # tables registered with --catalog
    python sql/run_queries.py --output ROOT --chart plays_by_hour.png

Each *.sql file is one query over the tables by their plain names (songplays, users,
songs, artists, time). The results print as Markdown tables; --chart also draws plays by
hour of day as a bar chart (it needs matplotlib: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparkify_etl.jars import DELTA_SESSION, delta_package, pyspark_version
from sparkify_etl.s3 import is_s3
from sparkify_etl.settings import FORMATS, to_root

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


TABLES = ("songplays", "users", "songs", "artists", "time")


def queries() -> dict[str, str]:
    """Every query here by name, in file order."""
    return {path.stem: path.read_text() for path in sorted(HERE.glob("*.sql"))}


def describe(sql: str) -> str:
    """A query's leading comment: what it answers."""
    return " ".join(line.strip("- ").strip() for line in sql.splitlines() if line.startswith("--"))


def use_lake(spark, output: str, table_format: str) -> None:
    """The tables of an output root as temporary views under their plain names."""
    root = to_root(output)
    location = root if is_s3(root) else f"file://{root}"
    for table in TABLES:
        reader = spark.read.format("delta" if table_format == "delta" else "parquet")
        reader.load(f"{location}/{table}").createOrReplaceTempView(table)


def run(spark) -> dict[str, list[tuple]]:
    """(columns, rows) of every query."""
    return {name: spark.sql(sql) for name, sql in queries().items()}


# Results with one row per hour or weekday read better across the page.
ACROSS = ("plays_by_hour", "plays_by_weekday")


def markdown(name: str, frame) -> str:
    rows = [["" if value is None else str(value) for value in row] for row in frame.collect()]
    table = [frame.columns, *rows]
    if name in ACROSS:
        table = [list(column) for column in zip(*table, strict=True)]
    lines = [
        f"**{name}**: {describe(queries()[name])}",
        "",
        "| " + " | ".join(table[0]) + " |",
        "|" + "---|" * len(table[0]),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def chart(plays_by_hour, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = plays_by_hour.collect()
    figure, axes = pyplot.subplots(figsize=(7, 2.6), dpi=100)
    axes.bar([row["hour"] for row in rows], [row["plays"] for row in rows], color="#3b6ea5")
    axes.set_xlabel("hour of day (UTC)")
    axes.set_ylabel("plays")
    axes.set_xticks(range(0, 24, 2))
    axes.set_title("Song plays by hour of day")
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", metavar="ROOT", help="the output root etl.py wrote the tables to")
    where.add_argument("--catalog", metavar="DATABASE", help="the database etl.py registered the tables in")
    parser.add_argument("--format", choices=FORMATS, default="parquet")
    parser.add_argument("--chart", metavar="PNG", help="also draw plays by hour of day into this file")
    args = parser.parse_args(argv)

    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.master("local[*]")
        .appName("sparkify-queries")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.showConsoleProgress", "false")
    )
    if args.format == "delta":
        builder = builder.config("spark.jars.packages", delta_package(pyspark_version()))
        for key, value in DELTA_SESSION.items():
            builder = builder.config(key, value)
    if args.catalog:
        builder = builder.enableHiveSupport()
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        if args.catalog:
            spark.sql(f"USE `{args.catalog}`")
        else:
            use_lake(spark, args.output, args.format)
        results = run(spark)
        print("\n\n".join(markdown(name, frame) for name, frame in results.items()))
        if args.chart:
            chart(results["plays_by_hour"], Path(args.chart))
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
