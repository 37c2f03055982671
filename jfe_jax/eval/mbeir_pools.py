"""M-BEIR candidate pools for evaluation and `jfe export`: their cached embeddings and indexes.

A pool file is exported once into ``<out>/embeddings/<pool>`` (reused by later tasks and runs
of the same model fingerprint, item format and pool file, rebuilt otherwise:
``jfe_jax.index.export``); its ScaNN index is saved in ``<out>/index/<pool>`` with the M-BEIR
root it came from (``root_metadata``), so that ``jfe search`` can show each hit; `load_pool`
places a pool on the device mesh once as an ``ExactIndex``. ``jfe_jax.eval.mbeir_eval`` scores
the tasks against it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jfe_jax.data.mbeir import MBEIR
from jfe_jax.index.embedder import Item, ItemEmbedder
from jfe_jax.index.exact import ExactIndex
from jfe_jax.index.export import (
    REBUILD_HINT,
    DuplicateIdError,
    export_embeddings,
    file_source,
    load_embeddings,
)
from jfe_jax.index.identity import MODEL_KEYS, RECORD_KEYS
from jfe_jax.index.scann_index import Index

log = logging.getLogger("jfe_jax.eval.mbeir_eval")  # the name these messages always had

# Where `jfe export`'s pool file is, in an index's metadata: relative to the index directory
# (so an index copied or moved with its M-BEIR folder still finds it), and absolute as a hint.
ROOT_KEY, ROOT_HINT_KEY = "mbeir_root", "mbeir_root_absolute"


def check_pool_not_empty(mbeir, path) -> None:
    """ValueError naming the pool file ``path`` when it holds no candidate."""
    candidates = mbeir.iter_candidates(path)
    try:
        if next(candidates, None) is None:
            raise ValueError(f"pool {path} holds no candidates; expected at least one")
    finally:
        candidates.close()


@contextlib.contextmanager
def stream_file_errors(mbeir, path, id_field: str) -> Iterator[None]:
    """An id that occurs twice in an export of M-BEIR file ``path`` (its ``id_field``, "did"
    or "qid"), reported with the file and the lines it occurs on."""
    try:
        yield
    except DuplicateIdError as error:
        records = mbeir.iter_candidates(path) if id_field == "did" else mbeir.iter_query_file(path)
        lines = [
            r.source.rpartition(":")[2] for r in records if getattr(r, id_field) == error.record_id
        ]
        where = f"lines {' and '.join(lines[:2])}" if len(lines) >= 2 else "two lines"
        raise ValueError(
            f"{path}: {id_field} {error.record_id!r} occurs on {where}; expected each id once"
        ) from error


def root_metadata(mbeir_root: str, index_dir: str) -> dict[str, str]:
    """An index's record of the M-BEIR root its pool came from: relative to ``index_dir``
    (``ROOT_KEY``) and, as a hint where the relative one is gone, absolute."""
    absolute = os.path.abspath(mbeir_root)
    return {
        ROOT_KEY: os.path.relpath(absolute, os.path.abspath(index_dir)),
        ROOT_HINT_KEY: absolute,
    }


def index_mbeir_root(index_dir: str, meta: dict, given: str | None) -> tuple[str | None, str]:
    """(the M-BEIR root of an index's pool, or None; what is missing when it is None).

    ``given`` (``--mbeir-root``) wins; else the index's ``ROOT_KEY`` relative to
    ``index_dir`` (an index from before relative roots holds an absolute one there), else its
    absolute hint, whichever is a directory."""
    if given:
        return given, ""
    recorded = meta.get(ROOT_KEY)
    if not recorded:
        return None, f"--mbeir-root DIR: the index {index_dir} names no M-BEIR directory"
    tried = [os.path.normpath(os.path.join(index_dir, recorded))]
    if meta.get(ROOT_HINT_KEY) and meta[ROOT_HINT_KEY] not in tried:
        tried.append(meta[ROOT_HINT_KEY])
    for candidate in tried:
        if os.path.isdir(candidate):
            return candidate, ""
    return None, (
        f"the M-BEIR root of index {index_dir}, which is not at {' nor '.join(tried)}; "
        "pass --mbeir-root DIR"
    )


def drop_modality(item: Item, drop: str | None) -> Item:
    """``item`` without its image (``drop="image"``) or text (``"text"``) when it has both."""
    if drop is None or item.text is None or item.image is None:
        return item
    if drop == "image":
        return dataclasses.replace(item, image=None)
    return dataclasses.replace(item, text=None)


def pool_embeddings(
    embedder: ItemEmbedder,
    mbeir: MBEIR,
    pool_path: Path,
    out_dir: str,
    *,
    progress: bool,
    overwrite: bool = True,
    drop: str | None = None,
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Exports a pool jsonl once (resumable; another model's cache is rebuilt, or refused
    when ``overwrite`` is False) and returns its embeddings, dids and export metadata."""
    check_pool_not_empty(mbeir, pool_path)
    name = pool_path.name.removesuffix(".jsonl")
    if drop is not None:  # ablated embeddings never share a cache with the full items'
        name += f".no_{drop}"
    directory = os.path.join(out_dir, "embeddings", name)
    records = (
        (c.did, drop_modality(Item(text=c.text, image=c.image_path), drop))
        for c in mbeir.iter_candidates(pool_path)
    )
    with stream_file_errors(mbeir, pool_path, "did"):
        export_embeddings(
            embedder,
            records,
            directory,
            progress=progress,
            metadata={"pool": str(pool_path.relative_to(mbeir.root))},
            source=file_source(pool_path, mbeir.root),
            overwrite=overwrite,
        )
    return load_embeddings(directory)


def scann_index(
    embeddings, ids, directory: str, *, mode: str, metadata: dict, overwrite: bool = True
) -> Index:
    """Builds the ScaNN index of a pool, or reloads it when it was built over the same pool
    (``metadata["source"]``) by the same model fingerprint and item format."""
    expect = {
        "n": len(ids),
        "dim": embeddings.shape[1],
        **{key: metadata[key] for key in (*MODEL_KEYS, "source")},
    }
    if os.path.isfile(os.path.join(directory, "index_metadata.json")):
        try:
            return Index.load(directory, expect=expect)
        except ValueError as e:
            if not overwrite:
                raise ValueError(f"{e}; {REBUILD_HINT}") from e
            log.warning("rebuilding index %s: %s", directory, e)
    index = Index.build(embeddings, ids, mode=mode, metadata=metadata)
    index.save(directory)
    return index


@dataclasses.dataclass(frozen=True)
class ResidentPool:
    """A candidate pool placed on the devices once: its exact index, candidate ids, the pool
    file, and its ScaNN index (None with ``index_mode="none"``)."""

    exact: ExactIndex
    ids: list[str]
    path: Path
    scann: Index | None


def load_pool(
    embedder: ItemEmbedder,
    mbeir: MBEIR,
    pool_path: Path,
    out_dir: str,
    *,
    index_mode: str,
    progress: bool,
    overwrite: bool,
    drop: str | None,
) -> ResidentPool:
    """Exports (or reloads) a pool's embeddings and ScaNN index and places it on the devices."""
    pool_name = pool_path.name.removesuffix(".jsonl") + (f".no_{drop}" if drop else "")
    cand_emb, cand_ids, export = pool_embeddings(
        embedder, mbeir, pool_path, out_dir, progress=progress, overwrite=overwrite, drop=drop
    )
    scann = None
    if index_mode != "none":
        index_dir = os.path.join(out_dir, "index", pool_name)
        scann = scann_index(
            cand_emb,
            cand_ids,
            index_dir,
            mode=index_mode,
            metadata={
                **{key: export[key] for key in (*RECORD_KEYS, "source")},
                "pool": pool_path.name,
                # what `jfe search` needs to show each hit's text and image
                **root_metadata(str(mbeir.root), index_dir),
            },
            overwrite=overwrite,
        )
    return ResidentPool(ExactIndex(cand_emb), cand_ids, pool_path, scann)
