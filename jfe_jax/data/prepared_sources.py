"""Whether a prepared dataset still matches its inputs, and one preparer at a time.

A prepared dataset is a copy of its inputs (jsonl records, image bytes), so it goes stale when
they change. Next to it, ``jfe_sources.json`` records what it was built from: the builder
settings, the size and modification time of every input file (jsonl, pool, instructions: a
few files), and for the images the build read (M-BEIR: about 1.5M) only their count and one
sha256 over their sorted (path, size, modification time) entries, so that the record stays a
few KB. The paths of those images are listed in ``jfe_source_images.gz`` beside it: the check
at start needs them to stat each image once, but not their old sizes and times.
``stale_reason`` compares the record with the files as they are now (one ``os.stat`` per
file; contents are never read), and says what changed: the input file by name, for images
only that some of them changed (the digest cannot tell which).

``prepare_lock`` serialises preparation: an exclusive ``fcntl.flock`` on a lock file in the
data directory, so a second process waits for the first and then finds its dataset prepared.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gzip
import hashlib
import itertools
import json
import logging
import os
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

from etils import epath

logger = logging.getLogger(__name__)

SOURCES_FILE = "jfe_sources.json"  # inside the prepared version's directory
# Beside it: the relative paths of the images read, sorted, NUL-separated (os.stat, which the
# build ran on each, refuses a path that holds NUL).
IMAGE_LIST_FILE = "jfe_source_images.gz"
LOCK_FILE = ".jfe_prepare.lock"  # inside the data directory

Signature = list[int] | None  # [size, mtime_ns]; None: the file does not exist


def file_signature(path: str | os.PathLike) -> Signature:
    """[size in bytes, modification time in ns] of a file, or None when it does not exist."""
    try:
        stat = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [stat.st_size, stat.st_mtime_ns]


def images_digest(images: Mapping[str, Signature]) -> str:
    """sha256 (hex) over the images' entries sorted by relative path: the paths, NUL-joined,
    then their sizes and mtime_ns as int64 (-1 for a missing file)."""
    paths = sorted(images)
    joined = "\0".join(paths).encode()
    digest = hashlib.sha256(len(joined).to_bytes(8, "little") + joined)
    # One array of ints, not a string per image: this runs over every image at each start.
    signatures = itertools.chain.from_iterable(images[path] or (-1, -1) for path in paths)
    digest.update(array.array("q", signatures).tobytes())
    return digest.hexdigest()


def write_sources(
    directory: epath.Path,
    settings: Mapping[str, Any],
    files: Mapping[str, Signature],
    images: Mapping[str, Signature],
) -> None:
    """Records what the dataset in ``directory`` was built from (written last, atomically:
    a dataset without the record counts as stale). ``images`` are relative to settings' root.
    """
    paths = sorted(images)
    (directory / IMAGE_LIST_FILE).write_bytes(gzip.compress("\0".join(paths).encode(), 6))
    record = {
        "settings": dict(settings),
        "files": dict(files),
        "images": {"count": len(paths), "sha256": images_digest(images)},
    }
    temporary = directory / f"{SOURCES_FILE}.tmp"
    temporary.write_text(json.dumps(record, indent=1))
    temporary.replace(directory / SOURCES_FILE)


def _read_image_list(directory: epath.Path, count: int) -> list[str]:
    """The image paths written beside the record; ValueError when they are not ``count``."""
    text = gzip.decompress((directory / IMAGE_LIST_FILE).read_bytes()).decode()
    paths = text.split("\0") if text else []
    if len(paths) != count:
        raise ValueError(f"{IMAGE_LIST_FILE} lists {len(paths)} images, expected {count}")
    return paths


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def stale_reason(
    directory: epath.Path,
    settings: Mapping[str, Any],
    files: Mapping[str, Signature],
    root: str | os.PathLike,
    *,
    check_images: bool = True,
) -> str | None:
    """None when the dataset in ``directory`` was built from these settings and input files
    and its images under ``root`` are unchanged; otherwise what differs, in a few words.
    ``check_images=False`` skips the one stat per image (another process checked them)."""
    path = directory / SOURCES_FILE
    if not path.exists():
        return f"it has no {SOURCES_FILE} (an older or interrupted build)"
    try:
        stored = json.loads(path.read_text())
        old_settings, old_files = dict(stored["settings"]), dict(stored["files"])
        image_count, image_digest = int(stored["images"]["count"]), stored["images"]["sha256"]
    except (ValueError, KeyError, TypeError) as error:
        return f"its {SOURCES_FILE} is unreadable ({error})"
    settings, files = json.loads(json.dumps([settings, files]))  # as they read back
    if changed := _changed(old_settings, settings):
        return "its settings changed: " + ", ".join(
            f"{key} {old_settings.get(key)!r} -> {settings.get(key)!r}" for key in changed
        )
    if changed := _changed(old_files, files):
        return f"{len(changed)} input file(s) changed, added or removed: {', '.join(changed[:3])}"
    if not check_images:
        return None
    try:
        paths = _read_image_list(directory, image_count)
    except (OSError, EOFError, ValueError, zlib.error) as error:  # BadGzipFile: OSError
        return f"its {IMAGE_LIST_FILE} is missing or unreadable ({error})"
    # One stat per distinct image (the list holds each once, however many records read it).
    images = {path: file_signature(os.path.join(root, path)) for path in paths}
    if images_digest(images) != image_digest:
        return (
            f"of the {image_count} image file(s) read by the build, one or more changed size "
            "or modification time, or appeared or disappeared"
        )
    return None


@contextlib.contextmanager
def prepare_lock(data_dir: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive lock on ``data_dir`` while the block prepares datasets in it.

    A remote directory (``gs://...``) has no file locks: there the caller serialises (on
    several hosts only host 0 prepares).
    """
    data_dir = os.fspath(data_dir)
    if "://" in data_dir:
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, LOCK_FILE), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that prepares datasets in %s", data_dir)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
