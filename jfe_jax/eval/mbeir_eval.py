"""M-BEIR evaluation: Recall@k (UniIR's hit rate) per task, JFE's five groups, ScaNN vs exact.

For each task of a split, its candidate pool (the task's local pool, or the union pool) is
exported once into ``<out>/embeddings/<pool>`` and indexed with ScaNN (``<out>/index/<pool>``),
both reused by later tasks and runs of the same model fingerprint, item format and pool file
and rebuilt otherwise (``jfe_jax.index.export``), then searched with the task's queries, each
prefixed with a deterministic instruction. Exact search over the same embeddings runs beside
it, so the table can say how much ScaNN's approximation costs.

Outputs in ``out``: ``results.json`` (per-task Recall@1/5/10, headline, groups, average,
ScaNN-vs-exact recall, and how the run was made), ``results.png`` (bar chart) and the table
printed by the CLI.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jfe_jax.data.mbeir import MBEIR, Query
from jfe_jax.eval.plots import plot_headline_recall
from jfe_jax.eval.recall import format_task_table, recall_at_k, task_table, write_table_json
from jfe_jax.index.embedder import Item, ItemEmbedder
from jfe_jax.index.exact import exact_search
from jfe_jax.index.export import REBUILD_HINT, export_embeddings, file_source, load_embeddings
from jfe_jax.index.identity import MODEL_KEYS, RECORD_KEYS, model_identity
from jfe_jax.index.scann_index import Index
from jfe_jax.paths import absolute

log = logging.getLogger(__name__)

# UniIR's global-pool rule: for OVEN (5) and InfoSeek (6), only positives from the query's own
# dataset count.
OWN_DATASET_POSITIVES = (5, 6)


def chance_recall(num_positives: Sequence[int], pool_size: int, k: int) -> float:
    """Expected Recall@k of a random ranking: P(some positive in a random k-subset), averaged."""
    total = 0.0
    for p in num_positives:
        miss = 1.0
        for i in range(min(k, pool_size)):
            miss *= max(pool_size - p - i, 0) / (pool_size - i)
        total += 1.0 - miss
    return total / len(num_positives)


def query_item(mbeir: MBEIR, query: Query, mode: str, seed: int) -> Item:
    return Item(
        text=query.text,
        image=query.image_path,
        instruction=mbeir.instruction_for(query, mode, seed),
    )


def pool_embeddings(
    embedder: ItemEmbedder,
    mbeir: MBEIR,
    pool_path: Path,
    out_dir: str,
    *,
    progress: bool,
    overwrite: bool = True,
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Exports a pool jsonl once (resumable; another model's cache is rebuilt, or refused
    when ``overwrite`` is False) and returns its embeddings, dids and export metadata."""
    name = pool_path.name.removesuffix(".jsonl")
    directory = os.path.join(out_dir, "embeddings", name)
    records = (
        (c.did, Item(text=c.text, image=c.image_path)) for c in mbeir.iter_candidates(pool_path)
    )
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


def evaluate_mbeir(
    embedder: ItemEmbedder,
    root: str,
    out_dir: str,
    *,
    split: str = "test",
    tasks: Sequence[str] | None = None,
    pool: str = "local",
    ks: Sequence[int] = (1, 5, 10),
    instruction_mode: str = "fixed",
    instruction_seed: int = 0,
    index_mode: str = "auto",
    label: str = "JFE",
    progress: bool = True,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Evaluates ``embedder`` on the M-BEIR-layout directory ``root``; returns the results dict.

    Pool embeddings and indexes cached in ``out_dir`` by another model fingerprint, item
    format or pool file are rebuilt (a WARNING says what differs), or with ``overwrite=False``
    refused with a ValueError.
    """
    if pool not in ("local", "global"):
        raise ValueError(f"pool must be 'local' or 'global', got {pool!r}")
    root, out_dir = absolute(root), absolute(out_dir)
    mbeir = MBEIR(root)
    available = mbeir.tasks(split)
    tasks = list(tasks or available)
    unknown = sorted(set(tasks) - set(available))
    if unknown:
        raise ValueError(
            f"split {split!r} of {root} has no queries for {unknown}; it has {available}"
        )
    os.makedirs(out_dir, exist_ok=True)
    kmax = max(ks)
    results, details = {}, {}
    for task in tasks:
        pool_path = (
            mbeir.local_pool_path(task, split) if pool == "local" else mbeir.global_pool_path(split)
        )
        cand_emb, cand_ids, export = pool_embeddings(
            embedder, mbeir, pool_path, out_dir, progress=progress, overwrite=overwrite
        )
        index = scann_index(
            cand_emb,
            cand_ids,
            os.path.join(out_dir, "index", pool_path.name.removesuffix(".jsonl")),
            mode=index_mode,
            metadata={
                **{key: export[key] for key in (*RECORD_KEYS, "source")},
                "pool": pool_path.name,
            },
            overwrite=overwrite,
        )
        queries = mbeir.read_queries(split, task)
        qrels = mbeir.read_qrels(split, task)
        positives = []
        for q in queries:
            pos = {did for did, rel in qrels.get(q.qid, {}).items() if rel > 0} or set(
                q.pos_cand_list
            )
            if pool == "global" and q.dataset_id in OWN_DATASET_POSITIVES:
                pos = {d for d in pos if d.split(":")[0] == str(q.dataset_id)} or pos
            positives.append(pos)
        query_emb = embedder.embed(
            query_item(mbeir, q, instruction_mode, instruction_seed) for q in queries
        )
        k = min(kmax, len(cand_ids))
        scann_ids, _ = index.search(query_emb, k)
        exact_rows, _ = exact_search(query_emb, cand_emb, k)
        exact_ids = np.asarray(cand_ids, dtype=object)[exact_rows]
        results[task] = recall_at_k(scann_ids.tolist(), positives, ks)
        exact_recall = recall_at_k(exact_ids.tolist(), positives, ks)
        overlap = np.mean(
            [
                len(set(a[:k]) & set(b[:k])) / k
                for a, b in zip(scann_ids.tolist(), exact_ids.tolist())
            ]
        )
        details[task] = {
            "queries": len(queries),
            "pool": pool_path.name,
            "pool_size": len(cand_ids),
            # Recall@k of a random ranking of this pool: what "k times chance" refers to.
            "chance_recall": {
                int(kk): chance_recall([len(p) for p in positives], len(cand_ids), kk) for kk in ks
            },
            "exact_search_recall": {int(kk): v for kk, v in exact_recall.items()},
            f"scann_recall_at_{k}_vs_exact": float(overlap),
            "index_settings": dict(index.metadata.get("settings", {})) or None,
        }
        log.info("%s: %s (exact %s)", task, results[task], exact_recall)
    table = task_table(results)
    extra = {
        "label": label,
        "split": split,
        "pool": pool,
        "instruction_mode": instruction_mode,
        "instruction_seed": instruction_seed,
        **model_identity(embedder),
        "prompt": embedder.prompt,
        "details": details,
    }
    write_table_json(table, os.path.join(out_dir, "results.json"), extra=extra)
    plot_headline_recall({label: table}, os.path.join(out_dir, "results.png"))
    return {
        "table": table,
        **extra,
        "text": format_task_table(table, title=f"{label} ({split}, {pool} pools)"),
    }
