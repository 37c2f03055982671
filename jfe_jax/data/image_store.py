"""One content-addressed store of encoded image files per data root, shared by every workdir
and stage that reads the same root.

A prepared training dataset (``jfe_jax.data.prepared``) holds image *references*; the bytes
live here once, however many records, stages and workdirs name the image. Layout::

    <store>/segment-<tag>.array_record   encoded image files (PNG/JPEG/... as on disk), one
                                         per row
    <store>/segment-<tag>.json           one entry per row: [relative path, size, mtime_ns,
                                         sha256, width, height, header error, decode state]
    <store>/.lock                        one ingesting process at a time (fcntl)
    <store>/stats.json                   how many ingestions ran and how many images each read

A segment is written by one worker process and becomes visible when its ``.json`` is renamed
into place (after the ``.array_record`` is closed), so an interrupted ingestion leaves no
half-visible segment; its orphaned ``.array_record`` is removed by the next ingestion. The
catalog is the union of the segments, a later entry for a path replacing an earlier one: an
image whose size or modification time changed is read again into a new segment, and nothing
else is (the old bytes stay unreferenced in their segment).

Every image is checked when ingested: its header is opened (PIL, no pixel decoded), giving its
size or why it is not an image; ``decode=True`` also decodes the raster (``verify_images=
"full"``), once per image. What a build then accepts (``max_image_pixels``) is decided per
build from the stored size, so one store serves builds with different limits.

The store reads with ``read(ref)``: ``ref`` is ``[sha256, segment, row]``, and the bytes read
are checked against the sha256 (a corrupt or replaced segment is one error naming the file).
Local or mounted filesystems only (a ``gs://`` bucket through a gcsfuse mount works);
ingestion uses a process pool (``workers``; default every core).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from jfe_jax.data.image_processor import decode_opened, open_image
from jfe_jax.progress import progress_bar

logger = logging.getLogger(__name__)

STORE_DIR = ".jfe_image_store"  # the default store, inside the data root when it is writable
LOCK_FILE = ".lock"
STATS_FILE = "stats.json"
_SEGMENT = re.compile(r"segment-([0-9a-z-]+)\.json")
# No header limit here: open_image's size check runs per build against its own limit.
_NO_PIXEL_LIMIT = 2**62
# Images per worker task: large enough that a segment file is not tiny, small enough that a
# pool of workers stays busy and the progress bar moves.
_IMAGES_PER_SEGMENT = 2000
# Segment files a reading process keeps open (oldest closed first): a 1.1M-record store has
# about a thousand segments, and each grain worker reads from all of them.
MAX_OPEN_SEGMENTS = 64
# decode state of an entry: not decoded yet, decoded fine, or the decode error's text.
NOT_DECODED, DECODED = None, ""


class ImageStoreError(ValueError):
    """The store is unusable (a corrupt segment, a bytes/hash mismatch, a remote path)."""


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """What the store knows of one image file of the root."""

    path: str  # relative to the data root, POSIX separators
    size: int  # file size in bytes when read
    mtime_ns: int  # modification time when read
    sha256: str  # of the bytes
    width: int  # from the header (0 when the header is unreadable)
    height: int
    header_error: str  # why the header is not an image ("" when it is one)
    decode_error: str | None  # None: never decoded; "": decodes; else the error
    segment: str  # the segment tag that holds the bytes
    row: int  # the row in that segment

    @property
    def signature(self) -> list[int]:
        return [self.size, self.mtime_ns]

    @property
    def ref(self) -> list[Any]:
        """What a record stores: [sha256, segment, row]."""
        return [self.sha256, self.segment, self.row]


def default_store_dir(root: str | os.PathLike) -> str:
    """``<root>/.jfe_image_store`` when the root is writable, else a per-user cache folder
    keyed by the root's real path (``$XDG_CACHE_HOME`` or ``~/.cache``, ``jfe_jax/image_store``)."""
    root = os.path.realpath(os.fspath(root))
    if os.access(root, os.W_OK):
        return os.path.join(root, STORE_DIR)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(root.encode()).hexdigest()[:16]
    return os.path.join(cache, "jfe_jax", "image_store", key)


def _check_local(directory: str) -> None:
    if "://" in directory:
        raise ImageStoreError(
            f"image store {directory}: only local or mounted filesystems are supported (mount "
            "the bucket with gcsfuse, or set data.image_store to a shared local path)"
        )


def _ingest_segment(task: tuple[str, str, str, list[str], bool]) -> list[list[Any]]:
    """Worker: reads, hashes and checks ``paths`` into a new segment; returns its entries.

    Runs in a pool process: everything it needs is in ``task``, and it imports no JAX.
    """
    root, directory, tag, paths, decode = task
    entries = []
    writer = ArrayRecordWriter(
        os.path.join(directory, f"segment-{tag}.array_record"), "group_size:1"
    )
    try:
        for relative in paths:
            absolute = os.path.join(root, relative)
            try:
                stat = os.stat(absolute)
                with open(absolute, "rb") as f:
                    data = f.read()
            except OSError:
                continue  # missing or unreadable: not stored; the build reports it
            width = height = 0
            header_error, decode_error = "", NOT_DECODED
            name = f"image {absolute}"
            try:
                image = open_image(io.BytesIO(data), max_image_pixels=_NO_PIXEL_LIMIT, name=name)
                width, height = image.size
                if decode:
                    try:
                        decode_opened(image, name)
                        decode_error = DECODED
                    except ValueError as error:
                        decode_error = str(error)
                else:
                    image.close()
            except ValueError as error:
                header_error = str(error)
            writer.write(data)
            sha = hashlib.sha256(data).hexdigest()
            entries.append(
                [relative, stat.st_size, stat.st_mtime_ns, sha, width, height,
                 header_error, decode_error, len(entries)]
            )  # fmt: skip
    finally:
        writer.close()
    temporary = os.path.join(directory, f"segment-{tag}.json.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(entries, f, separators=(",", ":"))
    os.replace(temporary, os.path.join(directory, f"segment-{tag}.json"))
    return entries


class ImageStore:
    """A content-addressed image store in ``directory`` (see the module docstring).

    Args:
      directory: the store's folder (created on first ingestion).
      workers: processes that ingest; 0: in this process; None: every core.
    """

    def __init__(self, directory: str | os.PathLike, *, workers: int | None = None):
        self.directory = os.path.abspath(os.fspath(directory))
        _check_local(self.directory)
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        if self.workers < 0:
            raise ValueError(f"image store workers={self.workers}; expected >= 0")
        self._readers: dict[str, ArrayRecordReader] = {}

    # --- catalog --------------------------------------------------------------------------

    def catalog(self) -> dict[str, ImageEntry]:
        """Every ingested image by relative path (the latest entry of each path)."""
        entries: dict[str, ImageEntry] = {}
        if not os.path.isdir(self.directory):
            return entries
        names = sorted(
            (os.stat(os.path.join(self.directory, n)).st_mtime_ns, n)
            for n in os.listdir(self.directory)
            if _SEGMENT.fullmatch(n)
        )
        for _, name in names:
            tag = _SEGMENT.fullmatch(name).group(1)
            path = os.path.join(self.directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    rows = json.load(f)
            except (OSError, ValueError) as error:
                raise ImageStoreError(
                    f"image store segment {path} is unreadable: {error}"
                ) from None
            for relative, size, mtime, sha, width, height, header, decoded, row in rows:
                entries[relative] = ImageEntry(
                    relative, size, mtime, sha, width, height, header, decoded, tag, row
                )
        return entries

    def stats(self) -> dict[str, Any]:
        """{"ingestions": how many ran, "images_read": total images read into the store}."""
        try:
            with open(os.path.join(self.directory, STATS_FILE), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"ingestions": 0, "images_read": 0}

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, LOCK_FILE), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another process that ingests into %s", self.directory)
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # --- ingestion ------------------------------------------------------------------------

    def ensure(
        self, root: str | os.PathLike, paths: Iterable[str], *, decode: bool = False
    ) -> dict[str, ImageEntry]:
        """The entries of ``paths`` (relative to ``root``), ingesting those that are new,
        changed since they were ingested (size or mtime), or (``decode``) never decoded.

        A path missing from the root has no entry in the result (the caller reports it).
        """
        root = os.fspath(root)
        wanted = sorted(set(paths))
        with self._lock():
            catalog = self.catalog()
            todo, present = [], []
            for relative in wanted:
                entry = catalog.get(relative)
                try:
                    stat = os.stat(os.path.join(root, relative))
                except OSError:
                    continue  # missing now: no entry, whatever the store once read
                present.append(relative)
                if (
                    entry is None
                    or entry.signature != [stat.st_size, stat.st_mtime_ns]
                    or (decode and entry.decode_error is NOT_DECODED and not entry.header_error)
                ):
                    todo.append(relative)
            if todo:
                self._ingest(root, todo, decode)
                catalog = self.catalog()
        return {p: catalog[p] for p in present if p in catalog}

    def _ingest(self, root: str, paths: Sequence[str], decode: bool) -> None:
        self._remove_orphans()
        run = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
        # At least four tasks per worker (an even finish), at most _IMAGES_PER_SEGMENT each.
        per_task = max(1, min(_IMAGES_PER_SEGMENT, -(-len(paths) // (4 * max(self.workers, 1)))))
        tasks = [
            (root, self.directory, f"{run}-{i // per_task:05d}",
             list(paths[i : i + per_task]), decode)
            for i in range(0, len(paths), per_task)
        ]  # fmt: skip
        workers = min(self.workers, len(tasks))
        logger.info(
            "image store %s: reading %d image(s) with %d worker(s)",
            self.directory,
            len(paths),
            max(workers, 1),
        )
        bar = progress_bar(total=len(paths), desc="image store", unit="img")
        try:
            if workers <= 1:
                for task in tasks:
                    _ingest_segment(task)
                    bar.update(len(task[3]))
            else:
                # spawn: the caller may hold JAX's threads, which fork would copy mid-flight.
                context = multiprocessing.get_context("spawn")
                with context.Pool(workers) as pool:
                    for done in pool.imap_unordered(_ingest_segment, tasks):
                        bar.update(len(done))
        finally:
            bar.close()
        stats = self.stats()
        stats = {
            "ingestions": stats["ingestions"] + 1,
            "images_read": stats["images_read"] + len(paths),
        }
        temporary = os.path.join(self.directory, f"{STATS_FILE}.tmp")
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(stats, f)
        os.replace(temporary, os.path.join(self.directory, STATS_FILE))

    def _remove_orphans(self) -> None:
        """Segment data without its catalog (an interrupted ingestion), under the lock."""
        names = set(os.listdir(self.directory))
        for name in names:
            if (
                name.endswith(".array_record")
                and name[: -len(".array_record")] + ".json" not in names
            ):
                os.remove(os.path.join(self.directory, name))
            elif name.endswith(".json.tmp"):
                os.remove(os.path.join(self.directory, name))

    # --- reading --------------------------------------------------------------------------

    def read(self, ref: Sequence[Any]) -> bytes:
        """The bytes of an image reference [sha256, segment, row], checked against its hash."""
        sha, tag, row = ref
        reader = self._readers.get(tag)
        path = os.path.join(self.directory, f"segment-{tag}.array_record")
        if reader is None:
            if not os.path.isfile(path):
                raise ImageStoreError(
                    f"image store segment {path} is missing (the store was moved or cleared): "
                    "rebuild the prepared data"
                )
            if len(self._readers) >= MAX_OPEN_SEGMENTS:  # bounded file handles per process
                self._readers.pop(next(iter(self._readers))).close()
            reader = self._readers[tag] = ArrayRecordReader(path, "readahead_buffer_size:0")
        try:
            data = reader.read([int(row)])[0]
        except Exception as error:  # noqa: BLE001  (array_record raises bare RuntimeErrors)
            raise ImageStoreError(f"image store segment {path}: row {row}: {error}") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise ImageStoreError(
                f"image store segment {path}: row {row} does not hold the image {sha[:12]}... "
                "the records name (the store was changed): rebuild the prepared data"
            )
        return data

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __getstate__(self) -> dict[str, Any]:  # grain workers get the store by pickle
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state
