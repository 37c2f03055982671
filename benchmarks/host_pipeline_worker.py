"""One process of ``bench_host_pipeline.py --against TREE``: the stage-2 host pipeline of
whichever jfe_jax is first on ``sys.path``, timed end to end.

It imports only names every version of the package since the stage-2 batcher has (the
batcher, the image processor, the offline tokenizer, the 2b stage-2 config), so the same
script times today's library and an older checkout of it (``PYTHONPATH=<checkout>``) on the
same records: ``ContrastiveBatcher.encode`` of every record, then ``collate`` in batches, one
process, no grain, as ``bench_host_pipeline.py`` times its two rows. Prints one JSON line:
``{"package": <path of the jfe_jax imported>, "seconds": [per pass], "examples": n}``.

Usage (by bench_host_pipeline.py): python host_pipeline_worker.py RECORDS.pkl --passes 3
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import pickle
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def stage2_2b_batcher(tokenizer, vocab_size: int):
    """A ``ContrastiveBatcher`` at the 2b stage-2 item format, made through the constructor
    this version of the package has."""
    from jfe_jax.data.image_processor import ImageProcessor
    from jfe_jax.data.pipeline import ContrastiveBatcher
    from jfe_jax.models.sizes import get_size, special_token_ids
    from jfe_jax.train.config_base import stage2_config

    config = get_size("2b")
    text = dataclasses.replace(config.text, vocab_size=vocab_size)
    model_config = config.replace(text=text, **special_token_ids(vocab_size))
    d = stage2_config("2b").data
    params = inspect.signature(ContrastiveBatcher.__init__).parameters
    if "image_processor" in params:  # the constructor that takes the options one by one
        processor = ImageProcessor(min_pixels=d.image_min_pixels, max_pixels=d.image_max_pixels)
        return ContrastiveBatcher(
            tokenizer,
            processor,
            model_config,
            kind="mbeir",
            length_buckets=tuple(d.length_buckets),
            max_length=d.max_length,
            truncate_text=d.truncate_text,
            query_patch_budget=d.query_patch_budget,
            candidate_patch_budget=d.candidate_patch_budget,
            num_hard_negatives=d.num_hard_negatives,
        )
    # Today's typed constructor: the benchmark's own builder, which follows the library.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_host_pipeline import stage2_2b_batcher as current_batcher

    return current_batcher(tokenizer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    import jfe_jax
    from jfe_jax.data.tokenizer import build_tokenizer

    with open(args.records, "rb") as f:
        data = pickle.load(f)
    records, corpus, vocab_size = data["records"], data["corpus"], data["vocab_size"]
    batcher = stage2_2b_batcher(build_tokenizer(corpus, vocab_size), vocab_size)
    size = min(args.batch_size, len(records))

    def one_pass(rows):
        for start in range(0, len(rows) - size + 1, size):
            batch = batcher.collate([batcher.encode(r) for r in rows[start : start + size]])
            del batch

    one_pass(records[:size])  # warm up (lazy imports, caches)
    seconds = []
    for _ in range(args.passes):
        start = time.perf_counter()
        one_pass(records)
        seconds.append(time.perf_counter() - start)
    examples = len(records) // size * size
    print(
        json.dumps(
            {"package": os.path.dirname(jfe_jax.__file__), "seconds": seconds, "examples": examples}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
