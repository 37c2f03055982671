"""``jfe export``: embed a candidate pool (or a query set) into resumable per-host shards.

Layout of an export directory::

    shard-00000/embeddings.npy   float32 [n, D], unit norm
    shard-00000/ids.json         the n string ids, in row order
    shard-00000/identity.json    what made the shard (``jfe_jax.index.identity``): model
                                 fingerprint, item format, source, shard size
    metadata-host000.json        that identity, model path, checkpoint step, dim, prompt,
                                 normalisation, total items, the shards this host wrote

Shard s holds items [s * shard_size, (s + 1) * shard_size) of the stream and is written by
host ``s % process_count``. Memory stays at one shard whatever the pool size. A shard is
written to a temporary folder and renamed when complete, so an interrupted export resumes by
skipping the shards that exist. A shard is reused only when its identity and ids are this
export's: shards made by another model, checkpoint, item format or source are removed and
rebuilt (or, with ``overwrite=False``, refused), never relabelled. Each host checks and
removes only the shards it owns, so hosts never race.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from jfe_jax.index.embedder import Item, ItemEmbedder
from jfe_jax.index.identity import EXPORT_KEYS, mismatch, model_identity
from jfe_jax.models.fingerprint import hash_file
from jfe_jax.progress import progress_bar

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{:05d}"
METADATA_PATTERN = "metadata-host{:03d}.json"
IDENTITY_FILE = "identity.json"
_SHARD_NAME = re.compile(r"shard-(\d+)(\.tmp)?")
_METADATA_NAME = re.compile(r"metadata-host(\d+)\.json")
REBUILD_HINT = "rerun without --no-overwrite (overwrite=True) to rebuild"


def file_source(path: str | os.PathLike, root: str | os.PathLike) -> dict[str, Any]:
    """A source file's identity: its path relative to ``root``, size and content hash."""
    return {
        "file": os.path.relpath(path, root).replace(os.sep, "/"),
        "bytes": os.path.getsize(path),
        "blake2b": hash_file(path),
    }


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
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
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        shard, meta = _SHARD_NAME.fullmatch(name), _METADATA_NAME.fullmatch(name)
        if shard and int(shard.group(1)) % process_count == process_index:
            if shard.group(2):  # an interrupted write: never reused
                stale.append(path)
            elif what := mismatch(_read_json(os.path.join(path, IDENTITY_FILE)), identity):
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
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


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
) -> dict[str, Any]:
    """Embeds ``(id, Item)`` records into shards of ``out_dir``; returns this host's metadata.

    Every host streams the same records and embeds only its own shards. ``source`` (JSON)
    names the records (``file_source(pool, root)``, or a query set's task, split and
    instruction settings); shards already in ``out_dir`` are reused only when they were made
    by this model fingerprint and item format from this source with this shard size (and hold
    the same ids). Other shards are removed and rebuilt with a WARNING, or with
    ``overwrite=False`` refused with a ValueError naming what differs. ``metadata`` is
    added to the metadata file as it is.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    os.makedirs(out_dir, exist_ok=True)
    identity = {**model_identity(embedder), "source": source or {}, "shard_size": shard_size}
    _remove_stale(
        out_dir,
        identity,
        overwrite=overwrite,
        process_index=process_index,
        process_count=process_count,
    )
    written, skipped, count, seen_ids = [], [], 0, set()
    bar = progress_bar(
        total=total, desc=f"export {os.path.basename(out_dir)}", unit="item", disable=not progress
    )
    for shard, chunk in _shard_chunks(records, shard_size):
        count += len(chunk)
        for record_id, _ in chunk:
            if record_id in seen_ids:
                raise ValueError(f"id {record_id!r} occurs twice in the exported stream")
            seen_ids.add(record_id)
        if shard % process_count != process_index:
            bar.update(len(chunk))
            continue
        final = os.path.join(out_dir, SHARD_PATTERN.format(shard))
        ids = [record_id for record_id, _ in chunk]
        if os.path.isdir(final):
            if _read_json(os.path.join(final, "ids.json")) == ids:
                skipped.append(shard)
                bar.update(len(chunk))
                continue
            message = f"export {out_dir}: {os.path.basename(final)} holds other ids than the stream"
            if not overwrite:
                raise ValueError(f"{message}; {REBUILD_HINT}")
            log.warning("%s: rebuilding it", message)
            shutil.rmtree(final)
        rows = []
        for start in range(0, len(chunk), embedder.batch_size):
            part = chunk[start : start + embedder.batch_size]
            rows.append(embedder.embed_processed([embedder.process(item) for _, item in part]))
            bar.update(len(part))
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        np.save(os.path.join(tmp, "embeddings.npy"), np.concatenate(rows).astype(np.float32))
        with open(os.path.join(tmp, "ids.json"), "w", encoding="utf-8") as f:
            json.dump(ids, f)
        with open(os.path.join(tmp, IDENTITY_FILE), "w", encoding="utf-8") as f:
            json.dump(identity, f, indent=2, sort_keys=True)
        os.replace(tmp, final)
        written.append(shard)
    bar.close()
    host_metadata = {
        "format": "jfe-jax embeddings",
        **identity,
        "dim": embedder.dim,
        "prompt": embedder.prompt,
        "normalized": True,
        "total_items": count,
        "num_shards": -(-count // shard_size),
        "process_index": process_index,
        "process_count": process_count,
        "shards": sorted(written + skipped),
        "resumed_shards": sorted(skipped),
        **(metadata or {}),
    }
    with open(os.path.join(out_dir, METADATA_PATTERN.format(process_index)), "w") as f:
        json.dump(host_metadata, f, indent=2, sort_keys=True)
    return host_metadata


def load_embeddings(out_dir: str) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """All shards of an export, in stream order: (embeddings [n, D], ids, metadata).

    Raises:
      ValueError: no metadata, metadata without a model fingerprint (an older export), hosts
        that disagree, or a missing shard or one made under another identity (named).
    """
    if not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is not an export directory")
    metas = [
        json.load(open(os.path.join(out_dir, name), encoding="utf-8"))
        for name in sorted(os.listdir(out_dir))
        if name.startswith("metadata-host") and name.endswith(".json")
    ]
    if not metas:
        raise ValueError(f"{out_dir} has no metadata-host*.json: the export did not finish")
    first = metas[0]
    if not first.get("model_fingerprint"):
        raise ValueError(
            f"export {out_dir} has no model fingerprint (made by an older jfe-jax), so nothing "
            "says which model made it; rerun jfe export into it to rebuild it"
        )
    for key in ("dim", "total_items", *EXPORT_KEYS):
        values = {json.dumps(m.get(key)) for m in metas}
        if len(values) > 1:
            raise ValueError(f"the hosts of {out_dir} disagree on {key}: {sorted(values)}")
    embeddings, ids = [], []
    for shard in range(first["num_shards"]):
        path = os.path.join(out_dir, SHARD_PATTERN.format(shard))
        if not os.path.isfile(os.path.join(path, "ids.json")):
            raise ValueError(
                f"export {out_dir} is missing shard {SHARD_PATTERN.format(shard)} of "
                f"{first['num_shards']} (a host did not finish; rerun the export to resume)"
            )
        what = mismatch(
            _read_json(os.path.join(path, IDENTITY_FILE)), first, this="its metadata says"
        )
        if what:
            raise ValueError(
                f"export {out_dir}: {SHARD_PATTERN.format(shard)} was made {what}; rerun the "
                "export to rebuild it"
            )
        embeddings.append(np.load(os.path.join(path, "embeddings.npy")))
        with open(os.path.join(path, "ids.json"), encoding="utf-8") as f:
            ids.extend(json.load(f))
    matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, first["dim"]), np.float32)
    if matrix.shape != (first["total_items"], first["dim"]) or len(ids) != matrix.shape[0]:
        raise ValueError(
            f"export {out_dir} holds {matrix.shape} embeddings and {len(ids)} ids, metadata "
            f"says {first['total_items']} x {first['dim']}"
        )
    return matrix, ids, first
