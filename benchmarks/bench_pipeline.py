"""Host data pipeline throughput: records -> static-shape contrastive batches, on this CPU.

Generates the default synthetic M-BEIR (coloured-shape PNGs of 56-112 px), prepares the three
TFDS datasets (array_record, no TensorFlow), and times the grain loader of
jfe_jax.data.pipeline for each dataset kind and worker count: records are read, images decoded
(PIL), resized and patchified (Qwen2-VL processing), texts tokenized with the chat layout,
and rows padded into per-host batches. Two tables:

  loader   examples/s (query-positive rows) and items/s (every encoded query, candidate
           and hard negative) in steady state, after the first batch; and the time to
           that first batch (worker start-up included)
  stages   one process, no grain: record reads, encoding (decode + resize + tokenize) and
           collation timed separately

The tokenizer is the offline BPE with the tiny model's 512 ids; the model config only
fixes the patch size. Nothing here runs a model.

Usage: python benchmarks/bench_pipeline.py --batch-size 32 --batches 20 --workers 0,1,2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from jfe_jax.data.image_processor import ImageProcessor
from jfe_jax.data.loader import make_train_loader
from jfe_jax.data.pipeline import ContrastiveBatcher
from jfe_jax.data.synthetic import SyntheticConfig, corpus_texts, generate
from jfe_jax.data.tfds_builders import MbeirTrainPairs, PairData, build_dataset, load_source
from jfe_jax.data.tokenizer import build_tokenizer
from jfe_jax.models.sizes import get_size

PATCHES = 64  # the largest synthetic image, 112 x 112, is 8 x 8 patches
KINDS = {  # kind -> transform options
    "mbeir": dict(num_hard_negatives=2, query_patch_budget=PATCHES,
                  candidate_patch_budget=PATCHES),
    "text_triples": dict(num_hard_negatives=1),
    "image_captions": dict(candidate_patch_budget=PATCHES),
}  # fmt: skip


def prepare(workdir: Path) -> dict:
    """The synthetic benchmark, its three prepared sources, and a tokenizer."""
    root = workdir / "mbeir"
    if not root.exists():
        generate(root, SyntheticConfig(), progress=False)
    data_dir = workdir / "tfds"
    sources = {
        "mbeir": load_source(
            build_dataset(MbeirTrainPairs, data_dir, mbeir_root=str(root), max_hard_negatives=2)
        ),
        "text_triples": load_source(
            build_dataset(PairData, data_dir, root=str(root), kind="text_triples")
        ),
        "image_captions": load_source(
            build_dataset(PairData, data_dir, root=str(root), kind="image_captions")
        ),
    }
    tokenizer = build_tokenizer(list(corpus_texts(root)), 512)
    return {"sources": sources, "tokenizer": tokenizer}


def transform_for(kind: str, tokenizer):
    """The batcher the benchmark uses for a dataset kind."""
    return ContrastiveBatcher.from_options(
        tokenizer,
        ImageProcessor(),
        get_size("tiny"),
        kind=kind,
        length_buckets=(64, 128, 256),
        **KINDS[kind],
    )


def time_loader(source, transform, batch_size: int, batches: int, workers: int) -> dict:
    """Steady-state rate over `batches` batches after the first, and time to the first."""
    loader = make_train_loader(
        source,
        transform=transform,
        global_batch_size=batch_size,
        shard_index=0,
        shard_count=1,
        seed=0,
        worker_count=workers,
    )
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator
    rows = batches * batch_size
    items = rows * (2 + transform.num_hard_negatives)
    return {"first": first, "examples": rows / seconds, "items": items / seconds}


def time_stages(source, transform, batch_size: int, batches: int) -> dict:
    """Per-stage rates in this process: read, encode, collate (examples/s each)."""
    count = min(len(source), batch_size * batches)
    start = time.perf_counter()
    records = [source[i] for i in range(count)]
    read = count / (time.perf_counter() - start)
    start = time.perf_counter()
    examples = [transform.encode(record) for record in records]
    encode = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for offset in range(0, count - batch_size + 1, batch_size):
        transform.collate(examples[offset : offset + batch_size])
    collate = (count // batch_size * batch_size) / (time.perf_counter() - start)
    return {"read": read, "encode": encode, "collate": collate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run")
    parser.add_argument("--workers", default="0,1,2", help="worker counts, comma separated")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        setup = prepare(workdir)
        sources, tokenizer = setup["sources"], setup["tokenizer"]
        print(
            f"cores: {os.cpu_count()}, batch size {args.batch_size}, {args.batches} timed "
            "batches per run, images 56-112 px (<= 64 patches)"
        )
        print("\nloader (grain DataLoader, steady state after the first batch)")
        print("| dataset | records | workers | examples/s | items/s | first batch (s) |")
        print("|---|---|---|---|---|---|")
        for kind, source in sources.items():
            transform = transform_for(kind, tokenizer)
            for count in workers:
                result = time_loader(source, transform, args.batch_size, args.batches, count)
                print(
                    f"| {kind} | {len(source)} | {count} | {result['examples']:.0f} | "
                    f"{result['items']:.0f} | {result['first']:.1f} |",
                    flush=True,
                )
        print("\nstages (one process, examples/s)")
        print("| dataset | read | encode (decode+resize+tokenize) | collate |")
        print("|---|---|---|---|")
        for kind, source in sources.items():
            result = time_stages(
                source, transform_for(kind, tokenizer), args.batch_size, args.batches
            )
            print(
                f"| {kind} | {result['read']:.0f} | {result['encode']:.0f} | "
                f"{result['collate']:.0f} |"
            )


if __name__ == "__main__":
    main()
