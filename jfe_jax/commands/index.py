"""``jfe export``, ``jfe index build|search`` and ``jfe search``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from jfe_jax.commands.model_args import (  # noqa: F401  (re-exported: they were defined here)
    cli_remedies,
    format_overrides,
    instruction_args,
    load_embedder,
    mesh_arg,
    mesh_spec,
    model_args,
    model_mesh,
    truncate_text_arg,
)
from jfe_jax.errors import ArgumentParser, positive_int

log = logging.getLogger(__name__)


def _export_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="jfe export",
        description="Embed an M-BEIR candidate pool (or a task's queries) into resumable shards.",
    )
    model_args(parser)
    parser.add_argument("--mbeir-root", required=True, help="M-BEIR-layout directory")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--pool", help="a task's local pool (e.g. mscoco_task0) or 'global'")
    what.add_argument("--queries", help="a task whose queries to embed (with instructions)")
    parser.add_argument("--split", default="test", help="M-BEIR split")
    parser.add_argument("--out", required=True, help="export directory")
    parser.add_argument("--shard-size", type=positive_int, default=4096, help="items per shard")
    instruction_args(parser)
    parser.add_argument(
        "--no-overwrite",
        dest="overwrite",
        action="store_false",
        help="refuse, rather than rebuild, shards in --out made by another model, checkpoint, "
        "item format or source",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="threads preparing items (read, decode, resize, patchify, tokenise) ahead of the "
        "device; 0: one batch at a time in line. Default: min(8, CPU count)",
    )
    parser.add_argument(
        "--bucket-window",
        type=int,
        default=4,
        help="batches' worth of a shard's items sorted by token and patch count together, so "
        "batches pad less (rows are written in stream order); 0: batches in stream order",
    )
    return parser


def _export_records(args: argparse.Namespace, mbeir):
    """(the M-BEIR file, its (id, Item) records, the export's metadata, its source) for
    ``--pool`` or ``--queries``."""
    from jfe_jax.eval.mbeir_eval import query_item
    from jfe_jax.eval.mbeir_pools import check_pool_not_empty
    from jfe_jax.index.embedder import Item
    from jfe_jax.index.export import file_source

    if args.pool:
        path = (
            mbeir.global_pool_path(args.split)
            if args.pool == "global"
            else mbeir.local_pool_path(args.pool, args.split)
        )
        check_pool_not_empty(mbeir, path)
        records = ((c.did, Item(c.text, c.image_path)) for c in mbeir.iter_candidates(path))
        extra = {
            "pool": str(path.relative_to(mbeir.root)),
            "mbeir_root": os.path.abspath(args.mbeir_root),
        }
        return path, records, extra, file_source(path, mbeir.root)
    path = mbeir.query_path(args.split, args.queries)
    queries = mbeir.read_queries(args.split, args.queries)
    if not queries:
        raise ValueError(f"query file {path} holds no queries; expected at least one")
    records = ((q.qid, query_item(mbeir, q, args.instruction_mode, args.seed)) for q in queries)
    extra = {
        "queries": f"{args.queries} ({args.split})",
        "instruction_mode": args.instruction_mode,
        "instruction_seed": args.seed,
    }
    return path, records, extra, {**extra, **file_source(path, mbeir.root)}


def export_main(argv: Sequence[str]) -> int:
    parser = _export_parser()
    args = parser.parse_args(argv)
    for name in ("workers", "bucket_window"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")

    from jfe_jax.data.mbeir import MBEIR
    from jfe_jax.eval.mbeir_pools import stream_file_errors
    from jfe_jax.index.export import export_embeddings

    mbeir = MBEIR(args.mbeir_root)
    embedder = load_embedder(args, image_root=args.mbeir_root)
    path, records, extra, source = _export_records(args, mbeir)
    with cli_remedies(), stream_file_errors(mbeir, path, "qid" if args.queries else "did"):
        meta = export_embeddings(
            embedder,
            records,
            args.out,
            shard_size=args.shard_size,
            metadata=extra,
            source=source,
            overwrite=args.overwrite,
            workers=args.workers,
            bucket_window=args.bucket_window,
        )
    reused = len(meta["resumed_shards"])
    print(
        f"exported {meta['total_items']} items ({meta['dim']}-d) into {meta['num_shards']} "
        f"shards of {args.out}; this host wrote {len(meta['shards']) - reused}, reused {reused}"
    )
    return 0


def index_main(argv: Sequence[str]) -> int:
    usage = (
        "usage: jfe index {build,search} ...\n\n"
        "  build    build a ScaNN index from `jfe export` shards (jfe index build --help)\n"
        "  search   search it with exported queries (jfe index search --help)"
    )
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in ("build", "search"):
        print(usage, file=sys.stderr)
        return 2
    return _index_build(argv[1:]) if argv[0] == "build" else _index_search(argv[1:])


def _index_build(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="jfe index build",
        description="Build a ScaNN index from `jfe export` shards (defaults chosen by pool size).",
    )
    parser.add_argument("--embeddings", required=True, help="export directory of the pool")
    parser.add_argument("--out", required=True, help="index directory to write")
    parser.add_argument(
        "--mode",
        default="auto",
        choices=["auto", "brute_force", "ah", "tree_ah"],
        help="ScaNN searcher; auto: brute force for small pools, tree + AH for large ones",
    )
    parser.add_argument(
        "--num-leaves", type=int, help="tree_ah partitions; default: chosen from the pool size"
    )
    parser.add_argument(
        "--num-leaves-to-search",
        type=int,
        help="partitions searched per query; default: chosen from the pool size",
    )
    parser.add_argument(
        "--training-sample-size",
        type=int,
        help="embeddings the partitioner is trained on; default: chosen from the pool size",
    )
    parser.add_argument(
        "--reorder-k", type=int, help="candidates rescored exactly; default: chosen by mode"
    )
    args = parser.parse_args(argv)

    from jfe_jax.eval.mbeir_pools import root_metadata
    from jfe_jax.index.export import load_embeddings
    from jfe_jax.index.identity import RECORD_KEYS
    from jfe_jax.index.scann_index import Index

    embeddings, ids, meta = load_embeddings(args.embeddings)
    if not ids:
        of = f" of pool {meta['pool']} in {meta.get('mbeir_root')}" if meta.get("pool") else ""
        raise ValueError(
            f"export {args.embeddings} holds no embeddings{of}; expected at least one to index"
        )
    # What made the embeddings (jfe_jax.index.identity), which the searches check.
    keep = (*RECORD_KEYS, "source", "prompt", "pool")
    metadata = {k: meta[k] for k in keep if k in meta}
    if meta.get("mbeir_root"):
        metadata.update(root_metadata(meta["mbeir_root"], args.out))
    index = Index.build(
        embeddings,
        ids,
        mode=args.mode,
        num_leaves=args.num_leaves,
        num_leaves_to_search=args.num_leaves_to_search,
        training_sample_size=args.training_sample_size,
        reorder_k=args.reorder_k,
        metadata=metadata,
    )
    index.save(args.out)
    print(
        f"built {index.metadata.get('settings', {}).get('mode', args.mode)} index over "
        f"{index.size} x {index.dim} embeddings into {args.out}"
    )
    return 0


def _index_search(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="jfe index search", description="Search an index with exported query embeddings."
    )
    parser.add_argument("--index", required=True, help="index directory (jfe index build)")
    parser.add_argument("--queries", required=True, help="export directory of the queries")
    parser.add_argument("-k", type=positive_int, default=10, help="hits per query")
    parser.add_argument("--out", required=True, help="JSON lines: qid, ids, scores")
    args = parser.parse_args(argv)

    from jfe_jax.index.export import load_embeddings
    from jfe_jax.index.identity import check_index_model
    from jfe_jax.index.scann_index import Index

    queries, qids, meta = load_embeddings(args.queries)
    index = Index.load(args.index, expect={"dim": meta["dim"]})
    check_index_model(index.metadata, meta, args.index, this="the queries' export has")
    ids, scores = index.search(queries, args.k)
    with open(args.out, "w", encoding="utf-8") as f:
        for qid, row_ids, row_scores in zip(qids, ids, scores):
            f.write(
                json.dumps(
                    {
                        "qid": qid,
                        "ids": row_ids.tolist(),
                        "scores": [round(float(s), 6) for s in row_scores],
                    }
                )
                + "\n"
            )
    print(f"searched {len(qids)} queries, top {args.k} each, into {args.out}")
    return 0


def _search_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="jfe search",
        description="Search an index with a text, an image, or both (and an instruction).",
    )
    model_args(parser)
    parser.add_argument("--index", required=True, help="index directory (jfe index build)")
    parser.add_argument("--text", help="query text")
    parser.add_argument("--image", help="path of a query image")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--instruction", help="task instruction prefixed to the query")
    how.add_argument(
        "--task",
        help="an M-BEIR task (e.g. mscoco_task0) whose instruction, from "
        "the data's instructions file, is prefixed to the query as in evaluation",
    )
    parser.add_argument(
        "--mbeir-root",
        help="M-BEIR-layout directory: the instructions for --task, the hits' texts and "
        "images; default: the one the index was built from (looked for relative to the index, "
        "then at its absolute path)",
    )
    parser.add_argument("-k", type=positive_int, default=5, help="hits to show")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _add_hit_items(hits: list[dict], root: str | None, meta: dict, missing: str) -> None:
    """Each hit's text and image, from the pool the index was built from, where it is found."""
    from jfe_jax.data.mbeir import MBEIR

    pool = root and meta.get("pool") and _pool_file(MBEIR(root), meta["pool"])
    if pool:
        wanted = {h["id"] for h in hits}
        found = {c.did: c for c in MBEIR(root).iter_candidates(pool) if c.did in wanted}
        for h in hits:
            c = found.get(h["id"])
            h["text"] = c.text if c else None
            h["image"] = os.path.join(root, c.image_path) if c and c.image_path else None
    elif missing and meta.get("pool"):
        log.warning("the hits are shown without their text and image: they need %s", missing)


def _print_hits(args: argparse.Namespace, instruction: str | None, hits: list[dict]) -> None:
    """The hits as JSON (``--json``, with the query) or as a table."""
    if args.json:
        described = {
            "text": args.text,
            "image": args.image,
            "instruction": instruction,
            "task": args.task,
            "model": args.model,
            "index": args.index,
            "k": args.k,
        }
        print(json.dumps({"query": described, "hits": hits}, indent=2))
        return
    if instruction:
        print(f"instruction: {instruction}")
    print(f"{'rank':>4}  {'score':>7}  {'id':<14} text / image")
    for h in hits:
        detail = " | ".join(x for x in (h.get("text"), h.get("image")) if x)
        print(f"{h['rank']:>4}  {h['score']:>7.4f}  {h['id']:<14} {detail}")


def search_main(argv: Sequence[str]) -> int:
    args = _search_parser().parse_args(argv)
    if not args.text and not args.image:
        raise ValueError("a query needs --text, --image or both")

    from jfe_jax.data.mbeir import MBEIR
    from jfe_jax.eval.mbeir_pools import index_mbeir_root
    from jfe_jax.index.embedder import Item
    from jfe_jax.index.identity import check_index_model, model_identity
    from jfe_jax.index.scann_index import Index

    embedder = load_embedder(args)
    index = Index.load(args.index, expect={"dim": embedder.dim})
    check_index_model(index.metadata, model_identity(embedder), args.index, this="--model has")
    meta = index.metadata.get("user", {})
    # The M-BEIR root is looked for only here: a copied index whose root is gone still searches.
    root, missing = index_mbeir_root(args.index, meta, args.mbeir_root)
    instruction = args.instruction
    if args.task is not None:
        if root is None:
            raise ValueError(f"--task {args.task} needs {missing}")
        instruction = task_instruction(MBEIR(root), args.task, args.text, args.image)
    with cli_remedies():
        query = embedder.embed(
            [Item(args.text, args.image and os.path.abspath(args.image), instruction)]
        )
    ids, scores = index.search(query, args.k)
    hits = [
        {"rank": r + 1, "id": str(i), "score": float(s)}
        for r, (i, s) in enumerate(zip(ids[0], scores[0]))
    ]
    _add_hit_items(hits, root, meta, missing)
    _print_hits(args, instruction, hits)
    return 0


def _pool_file(mbeir, pool: str) -> str | None:
    """The pool file an index names: a path under the M-BEIR root (``jfe export``'s indexes),
    or a file name in its local or global pool folder (``jfe eval``'s); None if absent."""
    for candidate in (pool, f"cand_pool/local/{pool}", f"cand_pool/global/{pool}"):
        if (mbeir.root / candidate).is_file():
            return candidate
    return None


def task_instruction(mbeir, task: str, text: str | None, image: str | None) -> str:
    """The instruction a query of M-BEIR task ``task`` gets in evaluation (the fixed one: its
    first prompt), read from ``mbeir``'s instructions file for the task's dataset and
    modalities; ValueError when the task has no queries there or the query's modality is
    not the task's."""
    from jfe_jax.data.mbeir import parse_task_name

    parse_task_name(task)
    for split in ("test", "val", "train"):
        if task in mbeir.tasks(split):
            query = next(iter(mbeir.iter_queries(split, task)), None)
            if query is not None:
                break
    else:
        raise ValueError(f"task {task} has no queries in {mbeir.root}/query; see jfe eval's tasks")
    given = "image,text" if text and image else ("image" if image else "text")
    if given != query.modality:
        raise ValueError(
            f"task {task} takes {query.modality} queries; this query is {given} "
            "(use --instruction for another kind)"
        )
    return mbeir.instruction_for(query)
