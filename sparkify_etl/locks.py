"""One run at a time per output root."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path

from .errors import EtlError
from .s3 import S3Access, explain_s3_error

log = logging.getLogger("sparkify.etl")

# The lock object (local: a file held with flock; S3: an object created only if absent).
LOCK = "_lock"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LocalLock:
    """An exclusive lock on a file under the output root: the kernel releases it when the
    process ends, however it ends, so a dead run's lock never blocks the next one."""

    def __init__(self, path: Path, holder: dict[str, object]):
        self.path, self.holder, self.handle = path, holder, None

    def __enter__(self) -> LocalLock:
        import fcntl

        self.handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.seek(0)
            other = self.handle.read()
            self.handle.close()
            raise EtlError(running_elsewhere(self.path.parent, other)) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps(self.holder) + "\n")
        self.handle.flush()
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.close()  # releases the lock


def running_elsewhere(root: object, holder_text: str) -> str:
    try:
        holder = json.loads(holder_text)
        who = f"run {holder['run_id']} (process {holder['pid']} on {holder['host']}, started {holder['started_at']})"
    except (ValueError, KeyError, TypeError):
        who = "another run"
    return (
        f"{who} is loading into {root} right now, and two runs on one output would mix their tables. "
        "Wait for it to finish and run again; a run that died releases its lock by itself."
    )


class S3Lock:
    """A lock object created only if absent (a conditional PUT). The holder refreshes it
    every minute; a lock whose process is gone (same host) or that was not refreshed for
    five minutes belongs to a dead run and is taken over, with a conditional PUT again."""

    REFRESH_SECONDS, STALE_SECONDS = 60, 300

    def __init__(self, client, bucket: str, key: str, where: str, access: S3Access, holder: dict[str, object]):
        self.client, self.bucket, self.key, self.where, self.access = client, bucket, key, where, access
        self.holder = holder
        self.etag: str | None = None
        self.stop = threading.Event()
        self.refresher: threading.Thread | None = None

    def _put(self, **condition: str) -> str:
        body = json.dumps({**self.holder, "refreshed_at": _utc_now()}).encode()
        answer = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)
        return answer["ETag"]

    def __enter__(self) -> S3Lock:
        from botocore.exceptions import ClientError

        try:
            self.etag = self._put(IfNoneMatch="*")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise explain_s3_error(error, f"lock {self.where}", self.access) from None
            current = self.client.get_object(Bucket=self.bucket, Key=self.key)
            text = current["Body"].read().decode("utf-8", "replace")
            if not lock_is_stale(text, self.STALE_SECONDS):
                raise EtlError(running_elsewhere(self.where, text)) from None
            log.warning("taking over the lock of a run that died: %s", text.strip())
            try:
                self.etag = self._put(IfMatch=current["ETag"])
            except ClientError:
                raise EtlError(running_elsewhere(self.where, text)) from None
        self.refresher = threading.Thread(target=self._refresh, daemon=True)
        self.refresher.start()
        return self

    def _refresh(self) -> None:
        while not self.stop.wait(self.REFRESH_SECONDS):
            with contextlib.suppress(Exception):
                self.etag = self._put(IfMatch=self.etag)

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        with contextlib.suppress(Exception):
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)


def lock_is_stale(text: str, stale_seconds: float) -> bool:
    try:
        holder = json.loads(text)
        refreshed = datetime.fromisoformat(holder["refreshed_at"])
    except (ValueError, KeyError, TypeError):
        return True
    if holder.get("host") == socket.gethostname() and not process_alive(int(holder.get("pid", 0))):
        return True
    return (datetime.now(timezone.utc) - refreshed).total_seconds() > stale_seconds


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
