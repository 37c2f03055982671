"""M-BEIR evaluation of a MIRe model: Recall@k (UniIR's hit rate) per task from exact MaxSim.

``evaluate_mire(model, root)`` evaluates a ``jfe_jax.models.mire.model.MIRe`` on an
M-BEIR-format root and returns what `jfe_jax.eval.mbeir_eval.evaluate_mbeir` returns for JFE
(the task table, JFE's groups and average, per-task details, the printed text), plus
``skipped``: {task: why MIRe does not apply to it}. `jfe eval --model DIR` of a MIRe model
(issue 34 item 3; its CLI wiring comes later) is to call it.

Which tasks apply (from ``TASK_MODALITIES``): MIRe (Nam et al. 2025, reference
``retrievers/mire.py``) scores text queries, optionally with an image, against text
documents, optionally with an image (its document images add their global and prompt-guided
tokens, ``MIRe.encode_documents``). So tasks 1 (text -> text), 2 (text -> image,text),
6 (image,text -> text) and 8 (image,text -> image,text) apply; tasks whose candidates are
images alone (0, 4, 7) or whose queries are images alone (3: MIRe's pooling is guided by the
query's text, and a query is its text's ColBERT vectors) are skipped with that reason. A
record of an applicable task that lacks a text is encoded with an empty one.

Each task's local pool is encoded with ``model.encode_documents`` in batches (a progress bar
counts them; images are the records' files, resolved and checked inside the root by
``MBEIR.image_file``, decoded by CLIP's processor), placed once on the device mesh as a
``jfe_jax.index.maxsim_search.MaxSimIndex`` and searched exhaustively: every query against
every document by ColBERT's ``sum_i max_j <q_i, d_j>``, as ColBERT's exhaustive
``colbert_score`` ranks, with no candidate generation (ties: lower pool row first). Queries
are their plain text by default (ColBERT's queries carry no instruction); ``instruction=True``
prefixes the task's fixed instruction and a space, as JFE's ``query_item`` does.

The metric is UniIR's (``src/common/mbeir_retriever.py``, via `jfe_jax.eval.recall`): a
query's positives are all its qrels lines with relevance > 0, and it scores 1 at k when any
of them is in its first k; a query without one scores 0. With ``out_dir``, every query's top
k goes to ``runs/<task>.local.tsv`` (`write_run`'s format) and the results to
``results.json`` and ``results.png``, as `evaluate_mbeir` writes them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jfe_jax.data.mbeir import MBEIR, TASK_MODALITIES, Candidate, Query, headline_k
from jfe_jax.data.mbeir_records import parse_task_name
from jfe_jax.eval.mbeir_eval import chance_recall, positives_from_qrels, task_ks, write_run
from jfe_jax.eval.plots import plot_headline_recall
from jfe_jax.eval.recall import (
    format_task_table,
    query_hits,
    recall_at_k,
    task_table,
    write_table_json,
)
from jfe_jax.index.maxsim_search import MaxSimIndex
from jfe_jax.models.mire.model import MIRe
from jfe_jax.paths import absolute
from jfe_jax.progress import progress_bar

log = logging.getLogger(__name__)

MIRE_QUERY_MODALITIES: tuple[str, ...] = ("text", "image,text")
MIRE_CANDIDATE_MODALITIES: tuple[str, ...] = ("text", "image,text")
DEFAULT_BATCH_SIZE = 64
RUN_POOL = "local"  # the pools MIRe is ranked against: each task's own


def mire_skip_reason(task: str) -> str | None:
    """Why MIRe does not apply to ``task`` (module docstring), or None when it does."""
    _, task_id = parse_task_name(task)
    query, candidate = TASK_MODALITIES[task_id]
    if candidate not in MIRE_CANDIDATE_MODALITIES:
        return (
            f"task {task_id} ranks {candidate} candidates for {query} queries: MIRe's "
            "documents are texts (an image only beside a text)"
        )
    if query not in MIRE_QUERY_MODALITIES:
        return (
            f"task {task_id} has {query}-only queries: MIRe's queries are texts (an image "
            "only beside a text, which guides its pooling)"
        )
    return None


def _image(mbeir: MBEIR, record: Query | Candidate) -> str | None:
    """The checked file of a record's image (inside the root), or None without one."""
    return None if record.image_path is None else str(mbeir.image_file(record))


def query_text(mbeir: MBEIR, query: Query, instruction: bool) -> str:
    """A query's text for MIRe: its own (empty without one), after the task's fixed
    instruction and a space with ``instruction``."""
    text = query.text or ""
    if not instruction:
        return text
    return f"{mbeir.instruction_for(query, 'fixed', 0).strip()} {text}".strip()


def _pad_cat(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Batches of ``(vectors [n, V_b, dim], mask [n, V_b])`` as one pair, each batch padded to
    the longest V with zero vectors at masked positions (which never match, nor add)."""
    width = max(vectors.shape[1] for vectors, _ in parts)
    vectors = [np.pad(v, ((0, 0), (0, width - v.shape[1]), (0, 0))) for v, _ in parts]
    masks = [np.pad(np.asarray(m, bool), ((0, 0), (0, width - m.shape[1]))) for _, m in parts]
    return np.concatenate(vectors), np.concatenate(masks)


def encode_in_batches(
    encode: Callable[..., tuple[np.ndarray, np.ndarray]],
    texts: Sequence[str],
    images: Sequence[str | None],
    *,
    batch_size: int,
    desc: str,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``encode(texts, images)`` (``MIRe.encode_queries`` or ``encode_documents``) over
    batches of ``batch_size`` items, with a progress bar; the results as `_pad_cat` joins
    them. A batch without images is encoded as text alone."""
    parts = []
    starts = range(0, len(texts), batch_size)
    for start in progress_bar(starts, desc=desc, unit="batch", disable=not progress):
        batch_images = list(images[start : start + batch_size])
        if all(image is None for image in batch_images):
            batch_images = None
        parts.append(encode(list(texts[start : start + batch_size]), batch_images))
    return _pad_cat(parts)


def encode_pool(
    model: MIRe, mbeir: MBEIR, task: str, split: str, *, batch_size: int, progress: bool
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A task's local pool: (its dids in file order, document vectors, their mask)."""
    path = mbeir.local_pool_path(task, split)
    candidates = list(mbeir.read_pool(path).values())
    if not candidates:
        raise ValueError(f"{task}: the pool {path} holds no candidates")
    vectors, mask = encode_in_batches(
        model.encode_documents,
        [c.text or "" for c in candidates],
        [_image(mbeir, c) for c in candidates],
        batch_size=batch_size,
        desc=f"{task} documents",
        progress=progress,
    )
    return [c.did for c in candidates], vectors, mask


def evaluate_mire_task(
    model: MIRe,
    mbeir: MBEIR,
    task: str,
    *,
    split: str,
    ks: Sequence[int] | None,
    batch_size: int,
    instruction: bool,
    out_dir: str | None,
    mesh: Mesh | None,
    progress: bool,
) -> tuple[dict[int, float], dict[str, Any]]:
    """Ranks one task's queries against its whole local pool by exact MaxSim; writes its run
    file when ``out_dir`` is given; returns (its Recall@k, its details for results.json)."""
    queries = mbeir.read_queries(split, task)
    if not queries:
        raise ValueError(f"{task}: split {split!r} holds no queries")
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
    cand_ids, doc_vectors, doc_mask = encode_pool(
        model, mbeir, task, split, batch_size=batch_size, progress=progress
    )
    query_vectors, query_mask = encode_in_batches(
        model.encode_queries,
        [query_text(mbeir, q, instruction) for q in queries],
        [_image(mbeir, q) for q in queries],
        batch_size=batch_size,
        desc=f"{task} queries",
        progress=progress,
    )
    index = MaxSimIndex(doc_vectors, doc_mask, np.asarray(cand_ids, dtype=object), mesh=mesh)
    reported = task_ks(task, ks)
    k = min(max(reported), len(cand_ids))
    ids, scores = index.search(query_vectors, query_mask, k, progress=progress)
    if out_dir is not None:
        write_run(os.path.join(out_dir, "runs", f"{task}.{RUN_POOL}.tsv"), queries, ids, scores)
    detail = {
        "queries": len(queries),
        "queries_without_qrels": len(without),
        "pool": mbeir.local_pool_path(task, split).name,
        "pool_size": len(cand_ids),
        "chance_recall": {
            int(kk): chance_recall([len(p) for p in positives], len(cand_ids), kk)
            for kk in reported
        },
        "per_query": {
            "qids": [q.qid for q in queries],
            f"hit_at_{headline_k(task)}": query_hits(
                ids.tolist(), positives, min(headline_k(task), k)
            ),
        },
    }
    return recall_at_k(ids.tolist(), positives, reported), detail


def check_mire_args(ks: Sequence[int] | None, batch_size: int) -> None:
    """ValueError naming the first of `evaluate_mire`'s options that is out of range."""
    if ks is not None and (not ks or any(not isinstance(k, int) or k < 1 for k in ks)):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def split_tasks(
    mbeir: MBEIR, split: str, tasks: Sequence[str] | None
) -> tuple[list[str], dict[str, str]]:
    """(the tasks MIRe applies to, {task: why not} for the others) among ``tasks`` (default:
    every task of the split); ValueError naming a task the split lacks."""
    available = mbeir.tasks(split)
    tasks = list(available if tasks is None else tasks)
    unknown = sorted(set(tasks) - set(available))
    if unknown or not tasks:
        raise ValueError(
            f"split {split!r} of {mbeir.root} has no queries for {unknown or 'no tasks'}; "
            f"it has {available}"
        )
    reasons = {task: mire_skip_reason(task) for task in tasks}
    skipped = {task: reason for task, reason in reasons.items() if reason is not None}
    applied = [task for task in tasks if task not in skipped]
    if not applied:
        raise ValueError(f"MIRe applies to none of the tasks {tasks}: {skipped}")
    return applied, skipped


def summarise_mire(
    model: MIRe,
    results: dict[str, dict[int, float]],
    details: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    out_dir: str | None,
    *,
    split: str,
    ks: Sequence[int] | None,
    instruction: bool,
) -> dict[str, Any]:
    """`evaluate_mire`'s results dict (`mbeir_eval.summarise`'s keys, and ``skipped``);
    writes ``results.json`` and ``results.png`` when ``out_dir`` is given."""
    label = "MIRe"
    table = task_table(results)
    extra = {
        "label": label,
        "split": split,
        "pool": RUN_POOL,
        "ranking": "exact_maxsim",
        "ks": list(ks) if ks is not None else "uniir",
        "instruction_mode": "fixed" if instruction else "none",
        "instruction_seed": 0,
        "drop": None,
        "queries_without_qrels": sum(d["queries_without_qrels"] for d in details.values()),
        "model": "mire",
        "model_config": dataclasses.asdict(model.config),
        "skipped": dict(skipped),
        "details": details,
    }
    if out_dir is not None:
        write_table_json(table, os.path.join(out_dir, "results.json"), extra=extra)
        plot_headline_recall({label: table}, os.path.join(out_dir, "results.png"))
    title = f"{label} ({split}, {RUN_POOL} pools, exact MaxSim)"
    return {"table": table, **extra, "text": format_task_table(table, title=title)}


def evaluate_mire(
    model: MIRe,
    mbeir_root: str | os.PathLike,
    *,
    split: str = "test",
    tasks: Sequence[str] | None = None,
    ks: Sequence[int] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    instruction: bool = False,
    out_dir: str | os.PathLike | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates ``model`` on the M-BEIR-format ``mbeir_root``; returns the results dict.

    ``tasks``: default every task of ``split``; those MIRe does not apply to are listed under
    ``skipped`` with the reason (`mire_skip_reason`). ``ks``: the k reported for every task
    (its headline k is added); default UniIR's per task (`task_ks`). ``batch_size``: items
    encoded at once. ``instruction``: prefix each query with its task's fixed instruction.
    ``mesh``: the 1-D mesh the pools are placed on (default all devices). FileNotFoundError
    for a missing root or file, ValueError for a task the split lacks or a bad option.
    """
    check_mire_args(ks, batch_size)
    mbeir = MBEIR(mbeir_root)
    applied, skipped = split_tasks(mbeir, split, tasks)
    for task, reason in skipped.items():
        log.info("%s: skipped, %s", task, reason)
    if out_dir is not None:
        out_dir = absolute(out_dir)
        os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    options = dict(split=split, ks=ks, instruction=instruction)
    results, details = {}, {}
    for task in applied:
        results[task], details[task] = evaluate_mire_task(
            model,
            mbeir,
            task,
            batch_size=batch_size,
            out_dir=out_dir,
            mesh=mesh,
            progress=progress,
            **options,
        )
        log.info("%s: exact MaxSim %s", task, results[task])
    return summarise_mire(model, results, details, skipped, out_dir, **options)
