"""The input inventory: every file under song_data/ and log_data/, read or skipped with a reason."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EtlError
from .s3 import bucket_and_key, explain_s3_error, is_s3
from .settings import Settings
from .tables import DATASETS

# Input file names: *.json, optionally compressed, extensions in any case.
JSON_NAME = re.compile(r"\.json(\.[^.]+)?$", re.IGNORECASE)
CODECS = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bzip2", ".deflate": "deflate", ".zz": "deflate"}


@dataclass(frozen=True)
class InputFile:
    path: str  # a local path, or s3a://bucket/key
    size: int
    codec: str | None = None


@dataclass
class Inventory:
    """Every file under one dataset folder: the ones to read and the skipped ones, with why."""

    dataset: str
    folder: str
    read: list[InputFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def found(self) -> int:
        return len(self.read) + len(self.skipped)

    def add(self, path: str, size: int, relative: str) -> None:
        reason, codec = skip_reason(relative)
        if reason:
            self.skipped.append((path, reason))
        else:
            self.read.append(InputFile(path, size, codec))

    def facts(self) -> dict[str, object]:
        return {
            "folder": self.folder,
            "files_found": self.found,
            "files_read": len(self.read),
            "files_skipped": len(self.skipped),
            "bytes_read": sum(f.size for f in self.read),
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }


def skip_reason(relative: str) -> tuple[str | None, str | None]:
    """(why a file is not read, or None; its compression codec) from its path below the dataset folder."""
    parts = relative.split("/")
    for part in parts[:-1]:
        if part.startswith((".", "_")):
            return f"in the folder {part}, which starts with '{part[0]}'", None
    name = parts[-1]
    if name.startswith((".", "_")):
        return f"name starts with '{name[0]}' (hidden or metadata file)", None
    match = JSON_NAME.search(name)
    if not match:
        return "not a .json file", None
    extension = (match.group(1) or "").lower()
    if extension and extension not in CODECS:
        return f"compressed as {extension}, which etl.py cannot decode (use .gz, .bz2 or .deflate)", None
    return None, CODECS.get(extension)


def list_local_dataset(root: Path, dataset: str) -> Inventory:
    """Walk a local dataset folder, following symlinked folders; a symlink loop is an error."""
    folder = root / dataset
    inventory = Inventory(dataset, str(folder))

    def walk(directory: Path, relative: str, ancestors: tuple[tuple[int, int], ...]) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            raise EtlError(f"Cannot list {directory}: {error.strerror}. Check that the input is readable.") from None
        for entry in entries:
            path = Path(entry.path)
            try:
                info = entry.stat()  # follows symlinks
            except OSError as error:
                if entry.is_symlink():
                    inventory.skipped.append((str(path), "a symlink whose target does not exist"))
                    continue
                raise EtlError(f"Cannot read {path}: {error.strerror}.") from None
            name = f"{relative}{entry.name}"
            if stat.S_ISDIR(info.st_mode):
                identity = (info.st_dev, info.st_ino)
                if identity in ancestors:
                    raise EtlError(
                        f"The input has a symlink loop: {path} leads back to a folder that contains it "
                        f"({os.path.realpath(path)}). Remove the link or point it elsewhere."
                    )
                walk(path, f"{name}/", (*ancestors, identity))
            elif stat.S_ISREG(info.st_mode):
                inventory.add(str(path), info.st_size, name)
            else:
                inventory.skipped.append((str(path), "not a regular file"))

    top = folder.stat()
    walk(folder, "", ((top.st_dev, top.st_ino),))
    return inventory


def list_s3_dataset(client, root: str, dataset: str) -> Inventory:
    """One listing of every key under an S3 dataset prefix (a request per 1,000 keys)."""
    bucket, prefix = bucket_and_key(f"{root}/{dataset}/")
    inventory = Inventory(dataset, f"{root}/{dataset}")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.endswith("/"):  # a folder marker, not a file
                continue
            inventory.add(f"{root.split('://')[0]}://{bucket}/{key}", item["Size"], key[len(prefix) :])
    return inventory


def inventory_input(settings: Settings) -> dict[str, Inventory]:
    """Every file of both datasets, each to be read or skipped with a reason."""
    inventories = {}
    for dataset in DATASETS:
        if is_s3(settings.input_root):
            try:
                inventory = list_s3_dataset(settings.s3().client(), settings.input_root, dataset)
            except Exception as error:  # noqa: BLE001 - boto3 errors become one paragraph
                raise explain_s3_error(error, f"list {settings.input_root}/{dataset}/", settings.s3()) from None
        else:
            folder = Path(settings.input_root) / dataset
            if not folder.is_dir():
                raise EtlError(
                    f"The input root {settings.input_root} has no {dataset}/ folder. Point --input (or "
                    "[ETL] INPUT in dl.cfg) at the folder that holds song_data/ and log_data/."
                )
            inventory = list_local_dataset(Path(settings.input_root), dataset)
        if not any(file.size for file in inventory.read):
            raise EtlError(
                f"{inventory.folder} holds no non-empty .json files ({inventory.found} files found, "
                f"{len(inventory.skipped)} skipped), so there is nothing to load. Check that --input "
                "points at a complete copy of the dataset."
            )
        inventories[dataset] = inventory
    return inventories


def check_roots_apart(settings: Settings) -> None:
    """The input and the output must not contain each other: a load replaces its output."""

    def parts(root: str) -> tuple[str, ...]:
        if is_s3(root):
            bucket, key = bucket_and_key(root)
            return ("s3", bucket, *[part for part in key.split("/") if part])
        return ("local", *Path(os.path.realpath(root)).parts)

    source, target = parts(settings.input_root), parts(settings.output_root)
    shorter = min(len(source), len(target))
    if source[:shorter] == target[:shorter]:
        raise EtlError(
            f"The input {settings.input_root} and the output {settings.output_root} overlap: a load "
            "replaces what is under its output, which would then include its own input. Choose an "
            "output outside the input folder, and the other way round."
        )
