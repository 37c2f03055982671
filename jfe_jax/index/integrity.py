"""Sizes and content hashes of the files of an export shard or an index, written when they are
made and checked when they are read.

A file's record is ``{"bytes": size, "blake2b": hex digest}``. An export shard keeps the
records of its other files in its ``manifest.json`` (written last, before the shard's folder
is renamed into place); an index keeps them under ``"files"`` in ``index_metadata.json``.
What is checked on every load, and why:

- the size of every file: a missing, truncated or grown file is refused before it is read;
- the hash of the ids (``ids.json``, ``ids.npy``), the shard identities and every file of the
  ScaNN searcher: they are small, or (the searcher) read whole by ScaNN anyway, so hashing
  them costs about a second per 1.4 GB on one core;
- the hash of an export's embeddings only when the export holds at most
  ``HASH_EMBEDDINGS_UP_TO`` bytes of them (or the caller asks): a 5.6M x 1536 pool is 34 GB,
  about 25 s of hashing on every evaluation. Larger exports get their sizes checked, and
  each ``embeddings.npy`` header's shape must agree with its size and its ids.

A mismatch raises ``IntegrityError``, a ValueError: the ``jfe`` command prints it as one line
naming the file (exit 2).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from etils import epath

MANIFEST_FILE = "manifest.json"
HASH_EMBEDDINGS_UP_TO = 2**30  # bytes of embeddings hashed on every load: under a second
_CHUNK_BYTES = 2**20  # read into one reused buffer per file: hashing holds little memory
_HASH_THREADS = 8  # hashlib releases the GIL on large buffers: files hash in parallel


class IntegrityError(ValueError):
    """A file is missing, truncated, or holds other bytes than its metadata recorded."""


def digest(data: bytes | memoryview) -> str:
    """The blake2b hex digest (32 bytes) that file records carry."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"bytes": size, "blake2b": digest}`` of the file at ``path``, read in 1 MiB chunks."""
    hasher = hashlib.blake2b(digest_size=32)
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            hasher.update(view[:count])
    return {"bytes": os.path.getsize(path), "blake2b": hasher.hexdigest()}


def record_files(root: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The records of the files ``names`` (relative to ``root``, "/"-separated), by name."""
    names = sorted(names)
    with ThreadPoolExecutor(min(_HASH_THREADS, max(1, len(names)))) as pool:
        records = pool.map(lambda name: file_record(os.path.join(root, name)), names)
        return dict(zip(names, records))


def files_under(root: str | os.PathLike) -> list[str]:
    """Every file below ``root``, as "/"-separated paths relative to it."""
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def write_manifest(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Records every file of ``directory`` (a flat export shard being written; local or
    ``gs://``) into its ``manifest.json``; returns the records."""
    folder = epath.Path(directory)
    records = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name != MANIFEST_FILE and path.is_file():
            data = path.read_bytes()
            records[path.name] = {"bytes": len(data), "blake2b": digest(data)}
    (folder / MANIFEST_FILE).write_text(
        json.dumps(records, indent=2, sort_keys=True), encoding="utf-8"
    )
    return records


def read_manifest(directory: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """A shard's file records, or None when it has no manifest (written before them).

    Raises IntegrityError when the manifest exists but does not parse."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, ValueError) as error:
        raise IntegrityError(f"{path} does not parse ({error}); rebuild it") from None
    if not isinstance(records, dict):
        raise IntegrityError(f"{path} holds {type(records).__name__}, expected file records")
    return records


def check_size(path: str, record: Mapping[str, Any], *, rebuild: str) -> None:
    """Raises FileNotFoundError when ``path`` is missing, IntegrityError when its size is not
    the recorded one; ``rebuild`` says how to remake it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; {rebuild}")
    size = os.path.getsize(path)
    if size != record.get("bytes"):
        cut = "truncated" if size < record.get("bytes", 0) else "changed"
        raise IntegrityError(
            f"{path} is {size} bytes but was written with {record.get('bytes')} ({cut}); {rebuild}"
        )


def check_digest(path: str, found: str, record: Mapping[str, Any], *, rebuild: str) -> None:
    """Raises IntegrityError when ``found`` (the digest of what was read) is not recorded."""
    if found != record.get("blake2b"):
        raise IntegrityError(
            f"{path} holds other bytes than were written (blake2b {found[:12]}, recorded "
            f"{str(record.get('blake2b'))[:12]}): modified after it was written; {rebuild}"
        )


def read_checked(path: str, record: Mapping[str, Any], *, rebuild: str) -> bytes:
    """The bytes of ``path``, after checking its size and hash against ``record``."""
    check_size(path, record, rebuild=rebuild)
    with open(path, "rb") as f:
        data = f.read()
    check_digest(path, digest(data), record, rebuild=rebuild)
    return data


def check_files(
    root: str, records: Mapping[str, Mapping[str, Any]], *, rebuild: str, hashed: bool = True
) -> None:
    """Checks the size of every recorded file below ``root``, then (``hashed``) its hash,
    hashing files in parallel; raises on the first that differs (by name)."""
    for name in sorted(records):
        check_size(os.path.join(root, name), records[name], rebuild=rebuild)
    if not hashed:
        return
    found = record_files(root, records)
    for name in sorted(records):
        check_digest(
            os.path.join(root, name), found[name]["blake2b"], records[name], rebuild=rebuild
        )
