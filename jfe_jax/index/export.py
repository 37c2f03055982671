"""``jfe export``: embed a candidate pool (or a query set) into resumable per-host shards.

Layout of an export directory::

    shard-00000/embeddings.npy   float32 [n, D], unit norm
    shard-00000/ids.json         the n string ids, in row order
    metadata-host000.json        model, checkpoint step, dim, prompt, normalisation, shard
                                 size, total items, the shards this host wrote

Shard s holds items [s * shard_size, (s + 1) * shard_size) of the stream and is written by
host ``s % process_count``. Memory stays at one shard whatever the pool size. A shard is
written to a temporary folder and renamed when complete, so an interrupted export resumes by
skipping the shards that exist.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jfe_jax.index.embedder import Item, ItemEmbedder

SHARD_PATTERN = "shard-{:05d}"
METADATA_PATTERN = "metadata-host{:03d}.json"


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
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embeds ``(id, Item)`` records into shards of ``out_dir``; returns this host's metadata.

    Every host streams the same records and embeds only its own shards.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    os.makedirs(out_dir, exist_ok=True)
    written, skipped, count, seen_ids = [], [], 0, set()
    bar = tqdm(
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
        if os.path.isdir(final):
            skipped.append(shard)
            bar.update(len(chunk))
            continue
        ids = [record_id for record_id, _ in chunk]
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
        os.replace(tmp, final)
        written.append(shard)
    bar.close()
    encoder = embedder.encoder
    host_metadata = {
        "format": "jfe-jax embeddings",
        "model": encoder.source_dir,
        "checkpoint_step": encoder.step,
        "dim": embedder.dim,
        "prompt": embedder.prompt,
        "normalized": True,
        "shard_size": shard_size,
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
      ValueError: no metadata, hosts that disagree, or a missing shard (named).
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
    for key in ("dim", "shard_size", "total_items", "model", "prompt"):
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
