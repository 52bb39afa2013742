"""The tables registered by name in the session's metastore, and Athena DDL."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pyspark.sql import SparkSession
from pyspark.sql import types as T

from .errors import EtlError
from .tables import STAR_SCHEMA
from .writing import SparkOutput


def column_ddl(schema: T.StructType, names: Sequence[str]) -> str:
    kinds = {"string": "STRING", "int": "INT", "bigint": "BIGINT", "double": "DOUBLE", "timestamp": "TIMESTAMP"}
    return ", ".join(f"`{name}` {kinds[schema[name].dataType.simpleString()]}" for name in names)


def register_tables(spark: SparkSession, output: SparkOutput, database: str, table_format: str) -> None:
    """Each table as an external table of ``database``, with all its partitions; running
    again leaves one definition per table."""
    spark.sql(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    for spec in STAR_SCHEMA:
        qualified, location = f"`{database}`.`{spec.name}`", output.uri(spec.name)
        existing = spark.sql(f"SHOW TABLES IN `{database}` LIKE '{spec.name}'").collect()
        if existing:
            kind = spark.sql(f"DESCRIBE TABLE EXTENDED {qualified}").where("col_name = 'Type'").first()
            if kind is not None and kind["data_type"].upper() == "MANAGED":
                raise EtlError(
                    f"{database}.{spec.name} exists as a managed table, which etl.py will not replace: "
                    "choose another database with --catalog."
                )
            spark.sql(f"DROP TABLE {qualified}")  # external: its files stay
        if table_format == "delta":
            spark.sql(f"CREATE TABLE {qualified} USING DELTA LOCATION '{location}'")
            continue
        data = [name for name in spec.schema.fieldNames() if name not in spec.partition_by]
        partitioned = f" PARTITIONED BY ({', '.join(spec.partition_by)})" if spec.partition_by else ""
        spark.sql(
            f"CREATE TABLE {qualified} ({column_ddl(spec.schema, data + list(spec.partition_by))}) "
            f"USING PARQUET{partitioned} LOCATION '{location}'"
        )
        if spec.partition_by:
            spark.sql(f"MSCK REPAIR TABLE {qualified} SYNC PARTITIONS")


def athena_ddl(output_root: str, table_format: str) -> str:
    """CREATE EXTERNAL TABLE statements for Athena: songplays and time use partition
    projection, songs (artist_id cannot be projected) is repaired after each load."""
    root = re.sub(r"^s3a://", "s3://", output_root).rstrip("/")
    statements = []
    for spec in STAR_SCHEMA:
        location = f"{root}/{spec.name}/"
        if table_format == "delta":
            statements.append(
                f"CREATE EXTERNAL TABLE IF NOT EXISTS {spec.name}\nLOCATION '{location}'\n"
                "TBLPROPERTIES ('table_type' = 'DELTA');"
            )
            continue
        data = [name for name in spec.schema.fieldNames() if name not in spec.partition_by]
        text = f"CREATE EXTERNAL TABLE IF NOT EXISTS {spec.name} ({column_ddl(spec.schema, data)})"
        if spec.partition_by:
            text += f"\nPARTITIONED BY ({column_ddl(spec.schema, spec.partition_by)})"
        text += f"\nSTORED AS PARQUET\nLOCATION '{location}'"
        if spec.partition_by == ("year", "month"):
            text += (
                "\nTBLPROPERTIES (\n  'projection.enabled' = 'true',\n"
                "  'projection.year.type' = 'integer', 'projection.year.range' = '2000,2099',\n"
                "  'projection.month.type' = 'integer', 'projection.month.range' = '1,12',\n"
                f"  'storage.location.template' = '{location}year=${{year}}/month=${{month}}/')"
            )
        statements.append(text + ";")
        if spec.name == "songs":
            statements.append("MSCK REPAIR TABLE songs;")
    return "\n\n".join(statements) + "\n"
