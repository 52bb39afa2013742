"""Reading input files inside Spark tasks: the code that runs in Python on the executors."""

from __future__ import annotations

import bz2
import gzip
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from .s3 import S3Access, bucket_and_key

# A task fetching files from S3 keeps this many requests in flight: one file is a
# single GET of a few hundred bytes, so latency, not bandwidth, sets the pace.
S3_FETCHES_IN_FLIGHT = 32

# What a task hands Spark for each file: its decoded bytes, or why it could not be decoded
# (the file is quarantined), or why it could not be read at all (the run fails, naming it).
FILE_COLUMNS = "source_file string, data binary, error string, unreadable string"


def fetch_files(
    files: Iterable[tuple[str, str | None]], access: S3Access | None
) -> Iterator[tuple[str, bytearray | None, str | None, str | None]]:
    """A row of FILE_COLUMNS for each (path, codec). A file that cannot be read is a row
    too, so the driver learns which file and why as data, not by parsing a task failure."""
    files = list(files)
    if access is None:

        def read(path: str) -> bytes:
            with open(path, "rb") as handle:
                return handle.read()

        in_flight = 1
    else:
        client = access.client(S3_FETCHES_IN_FLIGHT)

        def read(path: str) -> bytes:
            bucket, key = bucket_and_key(path)
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()

        in_flight = S3_FETCHES_IN_FLIGHT

    def fetch(file: tuple[str, str | None]) -> tuple[str, bytearray | None, str | None, str | None]:
        path, codec = file
        try:
            data = read(path)
        except Exception as error:  # noqa: BLE001 - the driver fails the run naming the file
            return path, None, None, str(error) or type(error).__name__
        try:
            data = decompress(data, codec)
        except (OSError, EOFError, ValueError, zlib.error):
            return path, None, f"the file cannot be decompressed as {codec}", None
        # A byte order mark some Windows tools write is not part of the first record.
        return path, bytearray(data[3:] if data.startswith(b"\xef\xbb\xbf") else data), None, None

    if in_flight == 1:
        yield from map(fetch, files)
    else:
        with ThreadPoolExecutor(in_flight) as pool:
            yield from pool.map(fetch, files)


def decompress(data: bytes, codec: str | None) -> bytes:
    if codec == "gzip":
        return gzip.decompress(data)
    if codec == "bzip2":
        return bz2.decompress(data)
    if codec == "deflate":  # Hadoop's DefaultCodec: zlib-wrapped deflate
        return zlib.decompress(data)
    return data
