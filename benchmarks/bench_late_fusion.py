"""Late-fusion train step: a part no item has left out (what late_collate builds) against the
same batch with that part filled and masked (what it built before), side by side.

Late fusion embeds an item's text and its image in separate tower passes. A side whose items
all lack one part (stage 1's text-only captions and image-only candidates; M-BEIR's text-only
queries and image-only pools) used to run the tower on a filler copy of the other part and
mask it out: twice the work for the same embeddings. The batch here is stage 1's shape: B
text-only queries of the demo's caption length, B image-only candidates of the demo's image
size (56x56 pixels: 4 merged tokens, 16 patches), the `tiny` model, the demo's step options
(grad cache off, symmetric loss). Each round times one step of each variant after the
machine's float32 2048x2048 matmul; the table gives the best step of the rounds.

Usage: python benchmarks/bench_late_fusion.py [--batch 32] [--size tiny] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from jfe_jax.data.late_fusion import late_collate  # noqa: E402
from jfe_jax.data.tokenizer import build_tokenizer  # noqa: E402
from jfe_jax.encoder import Encoder  # noqa: E402
from jfe_jax.index.embedder import Item, ItemEmbedder  # noqa: E402
from jfe_jax.models.batches import TrainBatch  # noqa: E402
from jfe_jax.models.flops import train_step_flops  # noqa: E402
from jfe_jax.models.sizes import get_size  # noqa: E402
from jfe_jax.train.step import TrainState, make_loss_and_grad  # noqa: E402
from jfe_jax.train.topology import time_matmul  # noqa: E402

WORDS = "a red green blue small large circle square triangle on the left right of above".split()


def _filled(side):
    (part, _), *_ = side.parts()
    return side.replace(text=part, image=part)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    root = tempfile.mkdtemp(prefix="bench_late_")
    for i in range(args.batch):
        image = rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(root, f"{i}.png"))
    captions = [" ".join(rng.choice(WORDS, 12)) for _ in range(args.batch)]
    tokenizer = build_tokenizer(captions * 4, 512)
    encoder = Encoder.init(get_size(args.size), seed=0)
    late = ItemEmbedder(
        encoder,
        tokenizer=tokenizer,
        batch_size=args.batch,
        length_buckets=(32, 64, 128),
        max_pixels=56 * 56,
        image_root=root,
        fusion="late",
    )
    queries = [late.process(Item(text=c)) for c in captions]
    candidates = [late.process(Item(image=f"{i}.png")) for i in range(args.batch)]
    batch = TrainBatch(
        query=late_collate(queries, late._collate, late.patch_budget),
        candidate=late_collate(candidates, late._collate, late.patch_budget),
        query_key=np.arange(args.batch, dtype=np.int32),
        candidate_key=np.arange(args.batch, dtype=np.int32),
    )
    variants = {
        "part left out": batch,
        "part filled, masked": batch.replace(
            query=_filled(batch.query), candidate=_filled(batch.candidate)
        ),
    }
    state = TrainState(
        step=jnp.zeros((), jnp.int32), trainable=encoder.params, frozen={}, opt_state=None
    )
    step = jax.jit(
        make_loss_and_grad(
            encoder.module,
            learn_temperature=False,
            symmetric=True,
            mask_false_negatives=True,
            grad_cache_chunk=0,
        )
    )
    losses = {}
    for name, b in variants.items():  # compile and warm up
        (loss, _), _ = jax.block_until_ready(step(state, b))
        losses[name] = float(loss)
    best = dict.fromkeys(variants, float("inf"))
    rates = []
    for _ in range(args.repeats):
        rates.append(time_matmul(jax.devices()[0], 2048, 3) / 1e9)
        for name, b in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(step(state, b))
            best[name] = min(best[name], time.perf_counter() - start)

    config = encoder.config
    print(
        f"late-fusion train step, {args.size}, B={args.batch} (text-only queries, image-only "
        f"candidates); JAX f32 2048x2048 matmul {max(rates):.0f} GFLOP/s (best of "
        f"{args.repeats}), load average {os.getloadavg()[0]:.2f}"
    )
    print("| variant | model GFLOP per step | step, ms (best) | loss |")
    print("|---|---|---|---|")
    for name, b in variants.items():
        gflop = train_step_flops(config, b) / 1e9
        print(f"| {name} | {gflop:.2f} | {1e3 * best[name]:.1f} | {losses[name]:.6f} |")
    first, second = best.values()
    print(f"speed-up: {second / first:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
