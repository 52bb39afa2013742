"""One paragraph per failure: the error types, exit statuses, and Spark failures explained."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

log = logging.getLogger("sparkify.etl")


class EtlError(Exception):
    """A failure the user can act on; its message is the whole paragraph they are shown."""


class UsageError(EtlError):
    """A flag or setting that cannot work as given (exit status 2)."""


class InputReadError(EtlError):
    """An input file that could not be read at all (not one that could not be decoded)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"Cannot read the input file {path}: {reason}. Check that it exists and is readable.")
        self.path, self.reason = path, reason


class JournalError(EtlError):
    """A journal left by an earlier run that this run cannot act on safely."""


class LockLost(EtlError):
    """This run no longer holds the output's lock: it must change nothing more."""


class Terminated(BaseException):
    """SIGTERM, as from a scheduler stopping the job."""


EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143

# Causes worth naming, found anywhere in a Java or Python error's text.
KNOWN_CAUSES = (
    (r"No space left on device", "No space left on device"),
    (r"Disk quota exceeded", "The disk quota is exceeded"),
    (r"File name too long", "A file name is too long for the filesystem"),
    (r"Permission denied|AccessDeniedException|Access Denied", "Permission denied"),
    (r"Read-only file system", "The filesystem is read-only"),
    (
        r"OutOfMemoryError",
        "Spark ran out of memory (give the driver more: spark-submit --driver-memory, or "
        "PYSPARK_SUBMIT_ARGS='--driver-memory 4g pyspark-shell')",
    ),
)


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def root_cause(error: BaseException) -> str:
    """The innermost Java exception of a Spark error (its class and message), or the error's first line."""
    java = getattr(error, "java_exception", None)
    if java is None:
        return one_line(error)
    try:
        while java.getCause() is not None:
            java = java.getCause()
        return str(java.toString()).splitlines()[0]
    except Exception:  # noqa: BLE001 - the JVM may be gone
        return one_line(error)


def explain(error: BaseException, doing: str) -> str:
    """One paragraph for a Spark or Java failure while ``doing`` something."""
    text = f"{error}\n{root_cause(error)}"
    for pattern, cause in KNOWN_CAUSES:
        match = re.search(pattern, text)
        if match:
            return f"{cause} while {doing}."
    return f"Spark failed while {doing}: {root_cause(error)}"


@contextlib.contextmanager
def activity(doing: str) -> Iterator[None]:
    """Turn a Spark or Java failure inside the block into one paragraph naming ``doing``."""
    try:
        yield
    except (EtlError, KeyboardInterrupt, Terminated):
        raise
    except Exception as error:
        log.info("failed while %s", doing, exc_info=True)  # the whole trace, with --verbose
        raise EtlError(explain(error, doing)) from error
