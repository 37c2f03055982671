"""M-BEIR evaluation: Recall@k (UniIR's hit rate) per task from exact search, JFE's five groups.

For each task of a split, its candidate pool (the task's local pool, or the union pool) is
exported once into ``<out>/embeddings/<pool>`` (reused by later tasks and runs of the same
model fingerprint, item format and pool file, rebuilt otherwise: ``jfe_jax.index.export``)
and placed once on the device mesh as an ``ExactIndex``; the task's queries, each prefixed
with a deterministic instruction, are ranked by exact inner-product search, as UniIR ranks
(faiss Flat). That ranking gives the reported numbers. Unless ``index_mode="none"``, a ScaNN
index of the pool (``<out>/index/<pool>``) is searched too, and its agreement with the exact
ranking (ScaNN's recall@k against exact top k) and its own Recall@k are reported beside.

The metric is UniIR's (``src/common/mbeir_retriever.py``): the positives of a query are all
its qrels lines with relevance > 0, from any dataset, in the local and the global setting
alike; a query scores 1 at k when any of them is in its first k. A query with no positive
qrels line scores 0 (UniIR's ``compute_recall_at_k`` returns 0.0 for it); such queries are
counted per task in ``results.json`` and a WARNING names them. ``pos_cand_list`` is never
used for scoring.

Outputs in ``out``: ``results.json`` (per-task Recall@k, headline, groups, average, the
item format, instruction mode, ranking method, ScaNN agreement, and how the run was made),
``runs/<task>.<pool>.tsv`` (every query's exact top k: qid, rank, did, score, for
reproducing any number), ``results.png`` (bar chart) and the table printed by the CLI.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jfe_jax.data.mbeir import MBEIR, Query, headline_k
from jfe_jax.eval.mbeir_pools import (  # noqa: F401  (re-exported: callers import them here)
    ROOT_HINT_KEY,
    ROOT_KEY,
    ResidentPool,
    check_pool_not_empty,
    drop_modality,
    index_mbeir_root,
    load_pool,
    pool_embeddings,
    root_metadata,
    scann_index,
    stream_file_errors,
)
from jfe_jax.eval.plots import plot_headline_recall
from jfe_jax.eval.recall import (
    format_task_table,
    query_hits,
    recall_at_k,
    task_table,
    write_table_json,
)
from jfe_jax.index.embedder import Item, ItemEmbedder
from jfe_jax.index.identity import model_identity
from jfe_jax.index.scann_index import Index
from jfe_jax.paths import absolute

log = logging.getLogger(__name__)

# UniIR's reported k: R@1/5/10, and R@10/20/50 on the fashion tasks (whose headline is R@10).
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
FASHION_KS: tuple[int, ...] = (10, 20, 50)
INDEX_MODES = ("auto", "brute_force", "ah", "tree_ah", "none")


def task_ks(task: str, ks: Sequence[int] | None = None) -> tuple[int, ...]:
    """The k reported for a task: ``ks`` when given, else UniIR's (R@10/20/50 for the fashion
    tasks, R@1/5/10 otherwise); the task's headline k is always included."""
    if ks is None:
        ks = FASHION_KS if headline_k(task) == 10 else DEFAULT_KS
    return tuple(sorted({int(k) for k in ks} | {headline_k(task)}))


def positives_from_qrels(
    queries: Sequence[Query], qrels: dict[str, dict[str, int]]
) -> list[set[str]]:
    """Each query's positives: every qrels line with relevance > 0 (empty if it has none)."""
    return [{did for did, rel in qrels.get(q.qid, {}).items() if rel > 0} for q in queries]


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


def check_evaluate_args(
    *, drop: str | None, pool: str, index_mode: str, ks: Sequence[int] | None
) -> None:
    """ValueError naming the first of `evaluate_mbeir`'s options that is out of range."""
    if drop not in (None, "image", "text"):
        raise ValueError(f"drop must be None, 'image' or 'text', got {drop!r}")
    if pool not in ("local", "global"):
        raise ValueError(f"pool must be 'local' or 'global', got {pool!r}")
    if index_mode not in INDEX_MODES:
        raise ValueError(f"index_mode must be one of {INDEX_MODES}, got {index_mode!r}")
    if ks is not None and (not ks or any(not isinstance(k, int) or k < 1 for k in ks)):
        raise ValueError(f"ks must be positive integers, got {ks!r}")


def scann_detail(
    scann: Index,
    query_emb: np.ndarray,
    k: int,
    kh: int,
    positives: list[set[str]],
    reported: tuple[int, ...],
    exact_ids: np.ndarray,
) -> dict[str, Any]:
    """A task's ScaNN figures: its Recall@k, its agreement with the exact top ``kh``, and the
    index's settings."""
    scann_ids, _ = scann.search(query_emb, k)
    scann_ids = scann_ids.tolist()
    return {
        "recall": {int(kk): v for kk, v in recall_at_k(scann_ids, positives, reported).items()},
        # ScaNN's recall@k against the exact top k: 1.0 when ScaNN is exact.
        f"agreement_at_{kh}": float(
            np.mean(
                [len(set(a[:kh]) & set(b[:kh])) / kh for a, b in zip(scann_ids, exact_ids.tolist())]
            )
        ),
        "settings": dict(scann.metadata.get("settings", {})) or None,
    }


def evaluate_task(
    embedder: ItemEmbedder,
    mbeir: MBEIR,
    task: str,
    resident: ResidentPool,
    out_dir: str,
    *,
    split: str,
    pool: str,
    ks: Sequence[int] | None,
    instruction_mode: str,
    instruction_seed: int,
    drop: str | None,
) -> tuple[dict[int, float], dict[str, Any]]:
    """Ranks one task's queries against its resident pool; writes ``runs/<task>.<pool>.tsv``
    and returns (its exact Recall@k, its details for ``results.json``)."""
    queries = mbeir.read_queries(split, task)
    positives = positives_from_qrels(queries, mbeir.read_qrels(split, task))
    without = [q.qid for q, pos in zip(queries, positives) if not pos]
    if without:
        log.warning(
            "%s: %d of %d queries have no positive qrels line and score 0 (as in UniIR), e.g. %s",
            task,
            len(without),
            len(queries),
            ", ".join(without[:5]),
        )
    cand_ids = resident.ids
    reported = task_ks(task, ks)
    k = min(max(reported), len(cand_ids))
    query_emb = embedder.embed(
        drop_modality(query_item(mbeir, q, instruction_mode, instruction_seed), drop)
        for q in queries
    )
    exact_rows, exact_scores = resident.exact.search(query_emb, k)
    exact_ids = np.asarray(cand_ids, dtype=object)[exact_rows]
    recall = recall_at_k(exact_ids.tolist(), positives, reported)
    write_run(os.path.join(out_dir, "runs", f"{task}.{pool}.tsv"), queries, exact_ids, exact_scores)
    kh = min(headline_k(task), k)
    detail = {
        "queries": len(queries),
        "queries_without_qrels": len(without),
        "pool": resident.path.name,
        "pool_size": len(cand_ids),
        # Recall@k of a random ranking of this pool: what "k times chance" refers to.
        "chance_recall": {
            int(kk): chance_recall([len(p) for p in positives], len(cand_ids), kk)
            for kk in reported
        },
    }
    if resident.scann is not None:
        detail["scann"] = scann_detail(
            resident.scann, query_emb, k, kh, positives, reported, exact_ids
        )
    detail["per_query"] = {
        "qids": [q.qid for q in queries],
        f"hit_at_{headline_k(task)}": query_hits(exact_ids.tolist(), positives, kh),
    }
    return recall, detail


def summarise(
    embedder: ItemEmbedder,
    results: dict[str, dict[int, float]],
    details: dict[str, dict[str, Any]],
    out_dir: str,
    *,
    label: str,
    split: str,
    pool: str,
    ks: Sequence[int] | None,
    instruction_mode: str,
    instruction_seed: int,
    drop: str | None,
) -> dict[str, Any]:
    """Writes ``results.json`` and ``results.png`` from the per-task numbers; returns the
    results dict of `evaluate_mbeir`."""
    table = task_table(results)
    extra = {
        "label": label,
        "split": split,
        "pool": pool,
        "ranking": "exact",  # the numbers above; ScaNN's, when built, are under details
        "ks": list(ks) if ks is not None else "uniir",
        "instruction_mode": instruction_mode,
        "instruction_seed": instruction_seed,
        "drop": drop,
        "queries_without_qrels": sum(d["queries_without_qrels"] for d in details.values()),
        **model_identity(embedder),
        "prompt": embedder.prompt,
        "details": details,
    }
    write_table_json(table, os.path.join(out_dir, "results.json"), extra=extra)
    plot_headline_recall({label: table}, os.path.join(out_dir, "results.png"))
    return {
        "table": table,
        **extra,
        "text": format_task_table(table, title=f"{label} ({split}, {pool} pools, exact search)"),
    }


def evaluate_mbeir(
    embedder: ItemEmbedder,
    root: str,
    out_dir: str,
    *,
    split: str = "test",
    tasks: Sequence[str] | None = None,
    pool: str = "local",
    ks: Sequence[int] | None = None,
    instruction_mode: str = "fixed",
    instruction_seed: int = 0,
    index_mode: str = "auto",
    label: str = "JFE",
    progress: bool = True,
    overwrite: bool = True,
    drop: str | None = None,
) -> dict[str, Any]:
    """Evaluates ``embedder`` on the M-BEIR-layout directory ``root``; returns the results dict.

    Numbers come from exact search. ``ks``: the k reported for every task (its headline k is
    added); default UniIR's per task (`task_ks`). ``index_mode``: the ScaNN index searched
    beside exact search for its agreement ("none": no ScaNN index).

    Pool embeddings and indexes cached in ``out_dir`` by another model fingerprint, item
    format or pool file are rebuilt (a WARNING says what differs), or with ``overwrite=False``
    refused with a ValueError.

    ``drop`` ("image" or "text") removes that modality from every query and candidate that has
    both (an ablation: how much a task needs the two together); single-modality items are kept.
    ``details[task]["per_query"]`` holds every query's id and hit at the task's headline k.
    """
    check_evaluate_args(drop=drop, pool=pool, index_mode=index_mode, ks=ks)
    root, out_dir = absolute(root), absolute(out_dir)
    mbeir = MBEIR(root)
    available = mbeir.tasks(split)
    tasks = list(tasks or available)
    unknown = sorted(set(tasks) - set(available))
    if unknown:
        raise ValueError(
            f"split {split!r} of {root} has no queries for {unknown}; it has {available}"
        )
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    options = dict(
        split=split,
        pool=pool,
        ks=ks,
        instruction_mode=instruction_mode,
        instruction_seed=instruction_seed,
        drop=drop,
    )
    results, details = {}, {}
    # One resident exact index per pool file: the global pool is placed on the devices once.
    resident: dict[str, ResidentPool] = {}
    for task in tasks:
        pool_path = (
            mbeir.local_pool_path(task, split) if pool == "local" else mbeir.global_pool_path(split)
        )
        pool_name = pool_path.name.removesuffix(".jsonl") + (f".no_{drop}" if drop else "")
        if pool_name not in resident:
            resident.clear()  # a local pool is used by one task: free the devices
            resident[pool_name] = load_pool(
                embedder,
                mbeir,
                pool_path,
                out_dir,
                index_mode=index_mode,
                progress=progress,
                overwrite=overwrite,
                drop=drop,
            )
        results[task], details[task] = evaluate_task(
            embedder, mbeir, task, resident[pool_name], out_dir, **options
        )
        log.info("%s: exact %s", task, results[task])
    return summarise(embedder, results, details, out_dir, label=label, **options)


def write_run(path: str, queries: Sequence[Query], ids: np.ndarray, scores: np.ndarray) -> None:
    """A TREC-style run file: ``qid Q0 did rank score jfe`` per retrieved candidate."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for q, row_ids, row_scores in zip(queries, ids, scores):
            for rank, (did, score) in enumerate(zip(row_ids, row_scores), start=1):
                f.write(f"{q.qid} Q0 {did} {rank} {float(score):.7g} jfe\n")
    os.replace(tmp, path)


def scann_agreement(details: dict[str, Any]) -> dict[str, float]:
    """{task: ScaNN's recall@k against the exact top k} for the tasks with a ScaNN index."""
    out = {}
    for task, detail in details.items():
        scann = detail.get("scann") or {}
        for key, value in scann.items():
            if key.startswith("agreement_at_"):
                out[task] = value
    return out
