"""The output root as the driver sees it: local folders or an S3 prefix."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import EtlError
from .locks import LOCK, LocalLock, S3Lock
from .s3 import S3Access, bucket_and_key, create_bucket, explain_s3_error, is_s3
from .settings import Settings


class Lake:
    """Operations on the output root that need no Spark: small files, listings, deletes,
    the lock. The table files themselves are Spark's (see writing.SparkOutput)."""

    root: str

    def display(self, relative: str = "") -> str:
        raise NotImplementedError

    def read_text(self, relative: str) -> str | None:
        raise NotImplementedError

    def write_text(self, relative: str, text: str) -> None:
        raise NotImplementedError

    def exists(self, relative: str) -> bool:
        raise NotImplementedError

    def remove(self, relative: str) -> None:
        """Delete a file or a folder with all it holds; a failure is raised, never ignored."""
        raise NotImplementedError

    def names(self, relative: str) -> list[str]:
        """The names directly under a folder."""
        raise NotImplementedError

    def data_files_at(self, table: str) -> list[str]:
        """Data files right at a table's top (not in partition folders)."""
        return [name for name in self.names(table) if not name.startswith(("_", ".")) and "=" not in name]

    def has_table(self, name: str) -> bool:
        return self.exists(f"{name}/_SUCCESS") or self.exists(f"{name}/_delta_log")

    def read_json(self, relative: str) -> dict | None:
        text = self.read_text(relative)
        return json.loads(text) if text else None

    def write_json(self, relative: str, document: object) -> None:
        self.write_text(relative, json.dumps(document, indent=2, default=str) + "\n")

    def reports(self) -> list[dict]:
        """The run reports, oldest first."""
        found = [self.read_json(f"_runs/{name}") for name in self.names("_runs") if name.endswith(".json")]
        return sorted((r for r in found if r), key=lambda r: (r.get("started_at", ""), r.get("run_id", "")))

    def lock(self, holder: dict[str, object], stale_seconds: int) -> contextlib.AbstractContextManager:
        """This output's lock for one run; entered, it has ``check(step)`` to call before each change."""
        raise NotImplementedError

    def probe(self) -> None:
        """Fail now if the output cannot be written."""
        raise NotImplementedError


class LocalLake(Lake):
    """A local folder: tables can be swapped in by renaming folders."""

    def __init__(self, root: str):
        self.root = Path(root)

    def path(self, relative: str) -> Path:
        return self.root / relative if relative else self.root

    def display(self, relative: str = "") -> str:
        return str(self.path(relative))

    def read_text(self, relative: str) -> str | None:
        try:
            return self.path(relative).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, relative: str, text: str) -> None:
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)

    def exists(self, relative: str) -> bool:
        return os.path.lexists(self.path(relative))

    def remove(self, relative: str) -> None:
        target = self.path(relative)
        # Nothing outside the output is deleted: not through a symlinked folder on the way,
        # and a symlink itself is removed as a link.
        root = os.path.realpath(self.root)
        if os.path.commonpath([os.path.realpath(target.parent), root]) != root:
            raise EtlError(f"Refusing to delete {target}: a symlink on its way leads outside the output {self.root}.")
        if target.is_dir() and not target.is_symlink():
            _remove_tree(target)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()

    def rename(self, source: str, destination: str) -> None:
        """Move a file or folder within the output (atomic on one filesystem)."""
        self.path(destination).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.path(source), self.path(destination))

    def names(self, relative: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(relative)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def lock(self, holder: dict[str, object], stale_seconds: int) -> contextlib.AbstractContextManager:
        return LocalLock(self.path(LOCK), holder)

    def probe(self) -> None:
        """Fail now if the output cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"_probe-{os.getpid()}"
            probe.write_text("etl.py write probe\n")
            probe.unlink()
        except OSError as error:
            raise EtlError(
                f"Cannot write to the output {self.root}: {error.strerror}. Choose a folder you can "
                "write to (--output or [ETL] OUTPUT)."
            ) from None


def _remove_tree(folder: Path) -> None:
    """``rmtree``, where files a just-cancelled Spark task still writes or removes may come
    and go meanwhile: a file already gone is fine, and the tree is removed until it stays gone."""

    def gone_already(function, path, error) -> None:
        if not isinstance(error[1], FileNotFoundError):
            raise error[1]

    for attempt in range(5):
        shutil.rmtree(folder, onerror=gone_already)
        if not folder.exists():
            return
        time.sleep(0.2 * (attempt + 1))
    shutil.rmtree(folder)


class S3Lake(Lake):
    """An S3 prefix, through boto3. There is no rename: Spark's committers write the tables
    in place, and this keeps the lock, the journal and the reports."""

    def __init__(self, root: str, access: S3Access):
        self.root = root
        self.bucket, self.prefix = bucket_and_key(root)
        self.access = access
        self.client = access.client(32)

    def key(self, relative: str) -> str:
        return "/".join(part for part in (self.prefix, relative) if part)

    def display(self, relative: str = "") -> str:
        return "/".join(part for part in (self.root, relative) if part)

    def read_text(self, relative: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(relative))["Body"].read().decode("utf-8")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise explain_s3_error(error, f"read {self.display(relative)}", self.access) from None

    def write_text(self, relative: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(relative), Body=text.encode("utf-8"))

    def _keys(self, relative: str, delimiter: str | None = None) -> Iterator[dict]:
        prefix = self.key(relative).rstrip("/") + "/" if relative or self.prefix else ""
        arguments = {"Bucket": self.bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
        for page in self.client.get_paginator("list_objects_v2").paginate(**arguments):
            yield from page.get("Contents", [])
            yield from ({"Key": common["Prefix"]} for common in page.get("CommonPrefixes", []))

    def exists(self, relative: str) -> bool:
        if self.read_head(relative):
            return True
        return next(self._keys(relative), None) is not None

    def read_head(self, relative: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(relative))
            return True
        except ClientError:
            return False

    def has_table(self, name: str) -> bool:
        return self.read_head(f"{name}/_SUCCESS") or next(self._keys(f"{name}/_delta_log"), None) is not None

    def keys_under(self, relative: str) -> list[str]:
        """The object at ``relative`` and every object below it, relative to the root, folder
        markers left out; one listing (a request per 1,000 keys)."""
        return [key for key in self._relative_keys(relative) if not key.endswith("/")]

    def _relative_keys(self, relative: str) -> list[str]:
        prefix, root = self.key(relative), self.key("")
        strip = len(root) + 1 if root else 0
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                if key == prefix or key.startswith(prefix.rstrip("/") + "/") or not relative:
                    found.append(key[strip:])
        return found

    def abort_uploads(self, relative: str) -> int:
        """Abort the multipart uploads still open below ``relative`` (a killed job's files
        that were never committed); returns how many."""
        prefix = self.key(relative).rstrip("/") + "/"
        aborted = 0
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted

    def delete_keys(self, relatives: list[str]) -> None:
        """Delete these objects, a request per 1,000; a key S3 could not delete is an error."""
        keys = [{"Key": self.key(relative)} for relative in relatives]
        for start in range(0, len(keys), 1000):
            answer = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000], "Quiet": True}
            )
            # DeleteObjects answers 200 even when some keys could not be deleted.
            failed = answer.get("Errors", [])
            if failed:
                raise EtlError(
                    f"{len(failed)} objects under {self.display()} could not be deleted (e.g. "
                    f"{failed[0].get('Key')}: {failed[0].get('Code')}). Check the credentials' s3:DeleteObject "
                    "permission; the next run finishes the deletes."
                )

    def remove(self, relative: str) -> None:
        self.delete_keys(self._relative_keys(relative))

    def names(self, relative: str) -> list[str]:
        prefix = self.key(relative).rstrip("/") + "/" if relative or self.prefix else ""
        return sorted({item["Key"][len(prefix) :].rstrip("/") for item in self._keys(relative, "/")} - {""})

    def lock(self, holder: dict[str, object], stale_seconds: int) -> contextlib.AbstractContextManager:
        return S3Lock(self.client, self.bucket, self.key(LOCK), self.root, self.access, holder, stale_seconds)

    def probe(self) -> None:
        """The bucket exists (it is created when it does not) and takes writes and deletes."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise explain_s3_error(error, f"write to bucket {self.bucket}", self.access) from None
            create_bucket(self.client, self.bucket, self.access)
        except BotoCoreError as error:
            raise explain_s3_error(error, f"write to bucket {self.bucket}", self.access) from None
        probe = self.key(f"_probe-{os.getpid()}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"etl.py write probe\n")
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except (BotoCoreError, ClientError) as error:
            raise explain_s3_error(error, f"write to {self.root}", self.access) from None


def open_lake(settings: Settings) -> Lake:
    if is_s3(settings.output_root):
        return S3Lake(settings.output_root, settings.s3())
    return LocalLake(settings.output_root)
