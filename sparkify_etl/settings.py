"""Settings: built-in defaults < dl.cfg < environment < command-line flags, resolved once."""

from __future__ import annotations

import argparse
import configparser
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import UsageError
from .s3 import S3Access

# The checkout: etl.py and data/ sit beside this package.
HERE = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = HERE / "data" / "sample"
DEFAULT_OUTPUT = "output"
DEFAULT_CONFIG = "dl.cfg"
DEFAULT_MAX_REJECT_RATE = 0.01  # above this share of a dataset quarantined, the input is suspect
DEFAULT_RETAIN_DAYS = 7
# An S3 lock not refreshed for this long (by S3's clock) belongs to a dead run.
DEFAULT_LOCK_STALE_SECONDS = 300
FORMATS = ("parquet", "delta")
S3A_COMMITTERS = ("directory", "magic")

# Every key dl.cfg may hold, by section; dl.cfg.example documents each one.
CONFIG_KEYS = {
    "AWS": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3"),
    "ETL": ("INPUT", "OUTPUT", "FORMAT", "MAX_REJECT_RATE", "CATALOG", "RETAIN_DAYS", "LOCK_STALE_SECONDS"),
    "SPARK": ("PACKAGES", "S3A_COMMITTER"),
}


@dataclass(frozen=True)
class Settings:
    """Everything one run needs to know, resolved once."""

    input_root: str  # an absolute local path, or s3a:// (s3://) URI, without a trailing slash
    output_root: str
    format: str = "parquet"
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    endpoint_url: str | None = None
    packages: str | None = None  # Maven coordinates to add; None: worked out from the installed Spark
    s3a_committer: str | None = None  # None: directory on local and YARN masters, magic elsewhere
    max_reject_rate: float = DEFAULT_MAX_REJECT_RATE
    since: date | None = None  # incremental load: only log events from this UTC day ...
    until: date | None = None  # ... up to, not including, this one
    catalog: str | None = None
    retain_days: int = DEFAULT_RETAIN_DAYS
    lock_stale_seconds: int = DEFAULT_LOCK_STALE_SECONDS
    allow_removing_days: bool = False  # an incremental window may delete plays of days without input

    def incremental(self) -> bool:
        return self.since is not None or self.until is not None

    def s3(self) -> S3Access:
        return S3Access(self.region, self.endpoint_url, self.access_key_id, self.secret_access_key, self.session_token)

    def redacted(self) -> dict[str, object]:
        """The effective settings for the run report: no secret, the key id masked."""
        shown = {
            **vars(self),
            "access_key_id": "****" + self.access_key_id[-4:] if self.access_key_id else None,
            "secret_access_key": "****" if self.secret_access_key else None,
            "session_token": "****" if self.session_token else None,
        }
        return {name: value.isoformat() if isinstance(value, date) else value for name, value in shown.items()}


def read_config_file(path: Path) -> dict[str, str]:
    """The keys of a dl.cfg file as ``{"SECTION.KEY": value}``, empty values left out."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str.upper  # keys are case-insensitive, as in the AWS docs
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as error:
        raise UsageError(
            f"Cannot read the config file {path}: {error.strerror}. Pass an existing "
            "file with --config, or copy dl.cfg.example to dl.cfg."
        ) from None
    except configparser.Error as error:
        reason = str(error).splitlines()[0]
        raise UsageError(
            f"The config file {path} is not a valid INI file ({reason}). See dl.cfg.example for its layout."
        ) from None
    values = {}
    for section in parser.sections():
        known = CONFIG_KEYS.get(section.upper())
        if known is None:
            raise UsageError(
                f"The config file {path} has an unknown section [{section}]; "
                f"the known sections are {', '.join(CONFIG_KEYS)} (see dl.cfg.example)."
            )
        for key, value in parser.items(section):
            if key not in known:
                raise UsageError(
                    f"The config file {path} has an unknown key {key} in [{section}]; "
                    f"that section takes {', '.join(known)} (see dl.cfg.example)."
                )
            if value.strip():
                values[f"{section.upper()}.{key}"] = value.strip()
    return values


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Merge defaults, dl.cfg, environment and flags, the later winning."""
    if args.config is not None:
        config = read_config_file(Path(args.config))
    elif Path(DEFAULT_CONFIG).is_file():
        config = read_config_file(Path(DEFAULT_CONFIG))
    else:
        config = {}

    # The key, secret and token belong together: take all three from the first source
    # that names a key, so a key from one place never pairs with a secret from another.
    credential_names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    if environ.get("AWS_ACCESS_KEY_ID"):
        key_id, secret, token = (environ.get(name) or None for name in credential_names)
    else:
        key_id, secret, token = (config.get(f"AWS.{name}") for name in credential_names)
    if bool(key_id) != bool(secret):
        raise UsageError(
            "AWS credentials are incomplete: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "must be given together (in dl.cfg [AWS] or the environment), or neither, to "
            "use the default AWS credential chain."
        )

    def first(*candidates: str | None) -> str | None:
        return next((value for value in candidates if value), None)

    committer = config.get("SPARK.S3A_COMMITTER")
    if committer is not None and committer.lower() not in S3A_COMMITTERS:
        raise UsageError(
            f"[SPARK] S3A_COMMITTER = {committer} is not a committer etl.py supports; use "
            f"{' or '.join(S3A_COMMITTERS)} (see dl.cfg.example)."
        )
    table_format = (first(args.format, config.get("ETL.FORMAT")) or "parquet").lower()
    if table_format not in FORMATS:
        raise UsageError(f"[ETL] FORMAT = {table_format} is not a format etl.py writes; use {' or '.join(FORMATS)}.")
    if getattr(args, "rollback", False) and table_format != "delta":
        raise UsageError(
            "--rollback returns Delta tables to earlier versions; parquet tables keep no history. "
            "Add --format delta (and load with it) to have rollbacks."
        )
    since, until = args.since, args.until
    if getattr(args, "switch_format", False) and (since or until):
        raise UsageError("--switch-format replaces every table, so it needs a full load: leave out --since/--until.")
    if since and until and since >= until:
        raise UsageError(f"--since {since} is not before --until {until}: the window would hold no day.")
    catalog = first(args.catalog, config.get("ETL.CATALOG"))
    if catalog is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", catalog):
        raise UsageError(f"The catalog database name {catalog!r} must be letters, digits and underscores.")
    return Settings(
        input_root=to_root(first(args.input, config.get("ETL.INPUT")) or str(DEFAULT_INPUT)),
        output_root=to_root(first(args.output, config.get("ETL.OUTPUT")) or DEFAULT_OUTPUT),
        format=table_format,
        access_key_id=key_id,
        secret_access_key=secret,
        session_token=token,
        region=first(environ.get("AWS_REGION"), environ.get("AWS_DEFAULT_REGION"), config.get("AWS.AWS_REGION")),
        endpoint_url=first(
            environ.get("AWS_ENDPOINT_URL_S3"), environ.get("AWS_ENDPOINT_URL"), config.get("AWS.AWS_ENDPOINT_URL_S3")
        ),
        packages=config.get("SPARK.PACKAGES"),
        s3a_committer=committer.lower() if committer else None,
        max_reject_rate=reject_rate(first(args.max_reject_rate, config.get("ETL.MAX_REJECT_RATE"))),
        since=since,
        until=until,
        catalog=catalog,
        retain_days=retain_days(config.get("ETL.RETAIN_DAYS")),
        lock_stale_seconds=lock_stale_seconds(config.get("ETL.LOCK_STALE_SECONDS")),
        allow_removing_days=bool(getattr(args, "allow_removing_days", False)),
    )


def reject_rate(text: str | None) -> float:
    if text is None:
        return DEFAULT_MAX_REJECT_RATE
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:
        raise UsageError(
            f"The reject limit {text!r} is not a fraction between 0 and 1 (0.01 allows 1% of "
            "a dataset's records to be quarantined): check --max-reject-rate or [ETL] MAX_REJECT_RATE."
        )
    return rate


def lock_stale_seconds(text: str | None) -> int:
    if text is None:
        return DEFAULT_LOCK_STALE_SECONDS
    if not text.isdigit() or int(text) < 5:
        raise UsageError(f"[ETL] LOCK_STALE_SECONDS = {text} is not a whole number of seconds of at least 5.")
    return int(text)


def retain_days(text: str | None) -> int:
    if text is None:
        return DEFAULT_RETAIN_DAYS
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"[ETL] RETAIN_DAYS = {text} is not a whole number of days of at least 1.")
    return int(text)


def to_root(root: str) -> str:
    """A root as an absolute local path (never percent-encoded) or an s3a:// or s3:// URI,
    without a trailing slash."""
    scheme = urlparse(root).scheme
    if scheme in ("s3", "s3a"):
        if not urlparse(root).netloc:
            raise UsageError(f"{root!r} names no bucket: write s3a://BUCKET/PREFIX.")
        return f"{scheme}://" + root.split("://", 1)[1].rstrip("/")
    if scheme == "file":
        return os.path.abspath(unquote(urlparse(root).path))
    if scheme and len(scheme) > 1:  # not a Windows drive letter
        raise UsageError(
            f"Unsupported location {root!r}: use a local folder, a file:// URI or an s3a:// (or s3://) "
            "URI. On EMR, write to s3:// (HDFS does not outlive the cluster); elsewhere, copy the data "
            "to a local folder or a bucket first."
        )
    return os.path.abspath(root)
