"""One run at a time per output root."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

from .errors import EtlError, LockLost
from .s3 import S3Access, explain_s3_error

log = logging.getLogger("sparkify.etl")

# The lock object (local: a file held with flock; S3: an object created only if absent).
LOCK = "_lock"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LocalLock:
    """An exclusive lock on a file under the output root: the kernel releases it when the
    process ends, however it ends, so a dead run's lock never blocks the next one. The
    kernel holds it for as long as the process lives, so there is nothing to fence. (Over
    NFS, flock excludes other hosts only where the server supports NFSv4 locks; SMB shares
    are not supported as output roots: see README.)"""

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

    def check(self, step: str = "") -> None:
        """Held until this process ends: nothing to prove."""

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
    """A lock object created only if absent (a conditional PUT), refreshed by its holder
    every fifth of ``stale_seconds``. A lock not refreshed for ``stale_seconds`` by S3's own
    clock, or whose process is gone on this very machine, belongs to a dead run and is
    taken over, with a conditional PUT again.

    Fencing: before each step that changes the lake, ``check`` proves the lock is still this
    run's (a HEAD conditional on its ETag). A run paused past the stale time, or whose
    refresh failed, stops there and changes nothing more."""

    def __init__(
        self, client, bucket: str, key: str, where: str, access: S3Access, holder: dict[str, object], stale_seconds: int
    ):
        self.client, self.bucket, self.key, self.where, self.access = client, bucket, key, where, access
        self.holder, self.stale_seconds = holder, stale_seconds
        self._etag: str | None = None
        self._lost: str | None = None  # why the lock is no longer this run's
        self._guard = threading.Lock()
        self._stop = threading.Event()

    def _put(self, **condition: str) -> str:
        body = json.dumps({**self.holder, "refreshed_at": _utc_now()}).encode()
        answer = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)
        return answer["ETag"]

    def __enter__(self) -> S3Lock:
        from botocore.exceptions import ClientError

        try:
            self._etag = self._put(IfNoneMatch="*")
        except ClientError as error:
            if _code(error) not in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                raise explain_s3_error(error, f"lock {self.where}", self.access) from None
            current = self.client.get_object(Bucket=self.bucket, Key=self.key)
            text = current["Body"].read().decode("utf-8", "replace")
            age = _age_by_s3_clock(current)
            if not lock_is_stale(text, age, self.stale_seconds):
                raise EtlError(running_elsewhere(self.where, text)) from None
            log.warning("taking over the lock of a run that died: %s", text.strip())
            try:
                self._etag = self._put(IfMatch=current["ETag"])
            except ClientError:
                raise EtlError(running_elsewhere(self.where, text)) from None
        threading.Thread(target=self._refresh, name="s3-lock-refresh", daemon=True).start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(max(1.0, self.stale_seconds / 5)):
            try:
                with self._guard:
                    self._etag = self._put(IfMatch=self._etag)
            except Exception as error:  # noqa: BLE001 - remembered: the next step stops the run
                self._lost = f"refreshing it failed ({type(error).__name__}: {error})"
                log.warning("the lock on %s could not be refreshed: %s", self.where, error)
                return

    def check(self, step: str = "") -> None:
        """Raise LockLost unless the lock is still this run's; called before every change."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self._lost is None:
            try:
                with self._guard:
                    self.client.head_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
            except ClientError as error:
                if _code(error) not in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                    raise explain_s3_error(error, f"check the lock on {self.where}", self.access) from None
                self._lost = "another run took it over (this one was paused or cut off for longer than the stale time)"
            except BotoCoreError as error:
                raise explain_s3_error(error, f"check the lock on {self.where}", self.access) from None
        if self._lost is not None:
            raise LockLost(
                f"This run no longer holds the lock on {self.where}: {self._lost}. It stopped before "
                f"{step or 'its next change'} and changed nothing more; the run holding the lock now owns the lake."
            )

    def __exit__(self, *exc_info) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._stop.set()
        if self._lost is not None:
            return  # another run's lock now: not ours to delete
        try:
            with self._guard:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
        except (BotoCoreError, ClientError) as error:
            log.warning(
                "could not release the lock %s/%s (%s): the next run takes it over after %d s",
                self.where,
                LOCK,
                error,
                self.stale_seconds,
            )


def _code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _age_by_s3_clock(answer: dict) -> float:
    """How long ago the object was last written, by S3's clock alone (its Date header)."""
    now = parsedate_to_datetime(answer["ResponseMetadata"]["HTTPHeaders"]["date"])
    return (now - answer["LastModified"]).total_seconds()


def this_machine() -> dict[str, object]:
    """What identifies this process's machine and PID namespace: where a pid can be checked."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, namespace = None, None
    return {"host": socket.gethostname(), "boot_id": boot, "pid_namespace": namespace}


def lock_is_stale(text: str, age_seconds: float, stale_seconds: float) -> bool:
    """Whether a lock whose holder wrote ``text`` ``age_seconds`` ago belongs to a dead run.
    The holder's pid is trusted only on the same machine, boot and PID namespace."""
    try:
        holder = json.loads(text)
        pid = int(holder["pid"])
    except (ValueError, KeyError, TypeError):
        return True
    here = this_machine()
    same_machine = here["boot_id"] is not None and all(holder.get(key) == value for key, value in here.items())
    if same_machine and not process_alive(pid):
        return True
    return age_seconds > stale_seconds


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
