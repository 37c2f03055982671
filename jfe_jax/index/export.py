"""``jfe export``: embed a candidate pool (or a query set) into resumable per-host shards.

Layout of an export directory::

    shard-00000/embeddings.npy   float32 [n, D], unit norm
    shard-00000/ids.json         the n string ids, in row order
    shard-00000/identity.json    what made the shard (``jfe_jax.index.identity``): model
                                 fingerprint, item format, source, shard size
    metadata-host000.json        that identity, model path, checkpoint step, dim, prompt,
                                 normalisation, total items, the shards this host wrote

Shard s holds items [s * shard_size, (s + 1) * shard_size) of the stream and is written by
host ``s % process_count``, into the one export directory, local or on an object store
(``gs://...``, through ``etils.epath``). Memory stays at one shard whatever the pool size.
Items are prepared by worker threads ahead of the device and batched by length within a
shard (``ItemEmbedder.embed_groups``). A shard is written to a temporary folder and renamed
when complete (on an object store: in place, ``ids.json`` last), so an interrupted export
resumes by skipping the shards that exist. A shard is reused only when its identity and ids are this
export's: shards made by another model, checkpoint, item format or source are removed and
rebuilt (or, with ``overwrite=False``, refused), never relabelled. Each host checks and
removes only the shards it owns, so hosts never race.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from etils import epath

from jfe_jax.index.embedder import Item, ItemEmbedder, StreamTiming, default_workers
from jfe_jax.index.identity import mismatch, model_identity
from jfe_jax.index.layout import IDENTITY_FILE, METADATA_PATTERN, SHARD_PATTERN
from jfe_jax.index.pool import load_embeddings as load_embeddings  # the reader, re-exported
from jfe_jax.models.fingerprint import hash_file
from jfe_jax.paths import is_remote
from jfe_jax.progress import progress_bar

log = logging.getLogger(__name__)

_SHARD_NAME = re.compile(r"shard-(\d+)(\.tmp)?")
_METADATA_NAME = re.compile(r"metadata-host(\d+)\.json")
REBUILD_HINT = "rerun without --no-overwrite (overwrite=True) to rebuild"
# Batches' worth of a shard's items sorted by length together: less padding, and at most
# this many (twice, read ahead) prepared items held in memory.
DEFAULT_BUCKET_WINDOW = 4


# -- duplicate ids (issue 38 item 3): the error carries the id, so a caller that knows the
# stream's file can name the lines it occurs on.
class DuplicateIdError(ValueError):
    """An id (``record_id``) that occurs twice in an exported stream."""

    def __init__(self, record_id: str):
        super().__init__(f"id {record_id!r} occurs twice in the exported stream")
        self.record_id = record_id


# -- end duplicate ids


def file_source(path: str | os.PathLike, root: str | os.PathLike) -> dict[str, Any]:
    """A source file's identity: its path relative to ``root``, size and content hash."""
    return {
        "file": os.path.relpath(path, root).replace(os.sep, "/"),
        "bytes": os.path.getsize(path),
        "blake2b": hash_file(path),
    }


def _read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(epath.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_stale(
    out_dir: str,
    identity: dict[str, Any],
    *,
    overwrite: bool,
    process_index: int,
    process_count: int,
) -> None:
    """Removes this host's shards and metadata that another identity made (a WARNING names
    what differs), or raises ValueError when ``overwrite`` is False. Host 0 also removes the
    metadata of hosts beyond ``process_count`` (an earlier export on more hosts)."""
    stale, reasons = [], []
    out = epath.Path(out_dir)
    for path in sorted(out.iterdir(), key=lambda p: p.name):
        shard, meta = _SHARD_NAME.fullmatch(path.name), _METADATA_NAME.fullmatch(path.name)
        if shard and int(shard.group(1)) % process_count == process_index:
            if shard.group(2) or not (path / "ids.json").exists():  # an interrupted write
                stale.append(path)
            elif what := mismatch(_read_json(path / IDENTITY_FILE), identity):
                stale.append(path)
                reasons.append(what)
        elif meta:
            host = int(meta.group(1))
            if host >= process_count and process_index == 0:  # an export on more hosts
                stale.append(path)
            elif host == process_index and (what := mismatch(_read_json(path), identity)):
                stale.append(path)
                reasons.append(what)
    if reasons:
        message = f"export {out_dir} was made {reasons[0]}"
        if not overwrite:
            raise ValueError(f"{message}; {REBUILD_HINT}")
        log.warning(
            "%s: removing %d stale file(s) of this host and rebuilding", message, len(stale)
        )
    for path in stale:
        if path.is_dir():
            path.rmtree()
        else:
            path.unlink()


def _shard_chunks(
    records: Iterable[tuple[str, Item]], shard_size: int
) -> Iterator[tuple[int, list[tuple[str, Item]]]]:
    chunk, shard = [], 0
    for record in records:
        chunk.append(record)
        if len(chunk) == shard_size:
            yield shard, chunk
            chunk, shard = [], shard + 1
    if chunk:
        yield shard, chunk


def _write_shard(
    out: epath.Path, shard: int, embeddings: np.ndarray, ids: list[str], identity: dict
) -> None:
    """Writes one complete shard. Locally into ``shard-NNNNN.tmp``, then renamed (atomic);
    on an object store (``gs://``, where a folder rename copies file by file) into the shard
    itself with ``ids.json`` last, so a shard with its ids is complete either way."""
    final = out / SHARD_PATTERN.format(shard)
    remote = is_remote(out)
    target = final if remote else out / (final.name + ".tmp")
    if target.exists():
        target.rmtree()
    target.mkdir(parents=True)
    buffer = io.BytesIO()
    np.save(buffer, embeddings.astype(np.float32))
    (target / "embeddings.npy").write_bytes(buffer.getvalue())
    (target / IDENTITY_FILE).write_text(
        json.dumps(identity, indent=2, sort_keys=True), encoding="utf-8"
    )
    (target / "ids.json").write_text(json.dumps(ids), encoding="utf-8")
    # -- integrity (jfe_jax.index.integrity): the shard's file sizes and hashes, checked on load
    from jfe_jax.index.integrity import write_manifest

    write_manifest(target)
    # -- end integrity
    if not remote:
        target.rename(final)


class _HostShards:
    """This host's shards of a stream, checked as the stream is read (by the preparing threads
    when ``workers`` > 0): duplicate ids anywhere, and this host's complete shards that already
    hold the stream's ids (skipped) or other ids (rebuilt, or refused without ``overwrite``)."""

    def __init__(self, out, out_dir, shard_size, process_index, process_count, overwrite, bar):
        self.out, self.out_dir, self.shard_size = out, out_dir, shard_size
        self.process_index, self.process_count = process_index, process_count
        self.overwrite, self.bar = overwrite, bar
        self.skipped: list[int] = []
        self.seen_ids: set[str] = set()
        self.ids_of: dict[int, list[str]] = {}  # the ids of the shards yielded, not yet written
        self.count = 0  # items in the stream, counted as the stream is read

    def to_embed(self, records: Iterable[tuple[str, Item]]) -> Iterator[tuple[int, list[Item]]]:
        """(shard, items) for each shard this host must embed."""
        for shard, chunk in _shard_chunks(records, self.shard_size):
            self.count += len(chunk)
            for record_id, _ in chunk:
                if record_id in self.seen_ids:
                    raise DuplicateIdError(record_id)
                self.seen_ids.add(record_id)
            if shard % self.process_count != self.process_index:
                self.bar.update(len(chunk))
                continue
            final = self.out / SHARD_PATTERN.format(shard)
            ids = [record_id for record_id, _ in chunk]
            if final.is_dir():
                if _read_json(final / "ids.json") == ids:
                    self.skipped.append(shard)
                    self.bar.update(len(chunk))
                    continue
                message = f"export {self.out_dir}: {final.name} holds other ids than the stream"
                if not self.overwrite:
                    raise ValueError(f"{message}; {REBUILD_HINT}")
                log.warning("%s: rebuilding it", message)
                final.rmtree()
            self.ids_of[shard] = ids
            yield shard, [item for _, item in chunk]


def _log_timing(out_dir: str, timing: StreamTiming, workers: int) -> None:
    if timing.items:
        log.info(
            "export %s: embedded %d items in %.1f s (%.1f items/s, %d workers); the device "
            "waited on item preparation for %.0f%% of it",
            out_dir,
            timing.items,
            timing.wall_s,
            timing.items / max(timing.wall_s, 1e-9),
            workers,
            100 * timing.host_share,
        )


def export_embeddings(
    embedder: ItemEmbedder,
    records: Iterable[tuple[str, Item]],
    out_dir: str,
    *,
    shard_size: int = 4096,
    total: int | None = None,
    metadata: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    overwrite: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
    workers: int | None = None,
    bucket_window: int = DEFAULT_BUCKET_WINDOW,
    timing: StreamTiming | None = None,
) -> dict[str, Any]:
    """Embeds ``(id, Item)`` records into shards of ``out_dir``; returns this host's metadata.

    Every host streams the same records and embeds only its own shards. ``source`` (JSON)
    names the records (``file_source(pool, root)``, or a query set's task, split and
    instruction settings); shards already in ``out_dir`` are reused only when they were made
    by this model fingerprint and item format from this source with this shard size (and hold
    the same ids). Other shards are removed and rebuilt with a WARNING, or with
    ``overwrite=False`` refused with a ValueError naming what differs. ``metadata`` is
    added to the metadata file as it is. ``out_dir`` may be local or a ``gs://`` location
    (``etils.epath``); every host writes its shards there.

    ``workers``: threads preparing items ahead of the device (default ``default_workers()``;
    0: in line, one batch at a time). ``bucket_window``: batches' worth of a shard's items
    sorted by length together (``ItemEmbedder.embed_groups``; 0: stream order). Neither
    changes which items a shard holds; the same ``bucket_window`` gives the same embeddings
    bit for bit whatever ``workers`` is. ``timing`` is filled with where the time went.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    workers = default_workers() if workers is None else workers
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = {**model_identity(embedder), "source": source or {}, "shard_size": shard_size}
    _remove_stale(
        out_dir,
        identity,
        overwrite=overwrite,
        process_index=process_index,
        process_count=process_count,
    )
    written = []
    bar = progress_bar(total=total, desc=f"export {out.name}", unit="item", disable=not progress)
    host = _HostShards(out, out_dir, shard_size, process_index, process_count, overwrite, bar)
    timing = timing if timing is not None else StreamTiming()
    for shard, rows in embedder.embed_groups(
        host.to_embed(records),
        workers=workers,
        bucket_window=bucket_window,
        timing=timing,
        on_rows=bar.update,
    ):
        _write_shard(out, shard, rows, host.ids_of.pop(shard), identity)
        written.append(shard)
    bar.close()
    _log_timing(out_dir, timing, workers)
    host_metadata = {
        "format": "jfe-jax embeddings",
        **identity,
        "dim": embedder.dim,
        "prompt": embedder.prompt,
        "normalized": True,
        "total_items": host.count,
        "num_shards": -(-host.count // shard_size),
        "process_index": process_index,
        "process_count": process_count,
        "shards": sorted(written + host.skipped),
        "resumed_shards": sorted(host.skipped),
        **(metadata or {}),
    }
    (out / METADATA_PATTERN.format(process_index)).write_text(
        json.dumps(host_metadata, indent=2, sort_keys=True), encoding="utf-8"
    )
    return host_metadata
