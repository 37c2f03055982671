"""Encoder throughput on CPU: the JAX one-tower encoder against transformers' PyTorch Qwen2-VL.

Both models hold the SAME float32 weights: a randomly initialised ``small`` encoder is saved
with ``Encoder.save_pretrained`` and loaded with ``Qwen2VLForConditionalGeneration
.from_pretrained``. Both embed the same batch (text-only rows and image+text rows with images
of several sizes, right padding): PyTorch runs ``model.model`` (sdpa attention, the vision
tower on the flat list of patches) under ``torch.inference_mode`` with one thread per core,
then pools the last real token and L2-normalises; JAX runs ``Encoder.embed``.

Rows of the table:
  JAX forward (<impl>)      the jitted forward on the batch as ``Encoder.prepare`` lays it out
                            (every text row with its own patch budget), once per attention
                            implementation
  JAX forward, vision packed  the text rows as they are, the images laid densely into their
                            own vision rows (``pack_vision``, coarse row count), per impl
  JAX forward, packed       the same items packed several to a row (``--pack-length`` tokens,
                            the same patch budget per row; ``jfe_jax.models.packing``), jitted
                            forward on the packed batch; its padding is printed too
  JAX Encoder.embed         the user-facing call, host-side checks and packing included: by
                            default with ``pack_vision``, and with ``pack_vision=False``
  PyTorch                   model.model + pooling + normalisation

Every JAX row embeds with the last decoder layer run only at the pooled tokens (what
``OneTowerEncoder`` does unless hidden states are asked for); PyTorch's ``model.model`` returns
all final hidden states.

Throughputs are the best of --repeats timed calls after --warmup calls, the implementations
taking turns; the machine is shared, so the load average is printed with the table. The
embeddings of every JAX row are checked against PyTorch's (minimum cosine over the batch, which
must be >= 0.9999).

Usage: python benchmarks/bench_encoder.py --batch 32 --length 128 --repeats 7
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from hf_reference import make_inputs  # noqa: E402

from jfe_jax.encoder import Encoder  # noqa: E402
from jfe_jax.models import layers  # noqa: E402
from jfe_jax.models.packing import items_from_rows, pack_items, pack_vision  # noqa: E402
from jfe_jax.models.padding import padding_report  # noqa: E402
from jfe_jax.models.sizes import get_size  # noqa: E402

COSINE_MIN = 0.9999
# Image grids (t, h, w) in patches; each merges to h*w/4 tokens (16, 24, 36, 64).
IMAGE_GRIDS = [(8, 8), (8, 12), (12, 12), (16, 16)]


def batch_rows(batch: int, length: int) -> list[list]:
    """Half text-only rows, half image+text rows, every row close to ``length`` tokens."""
    rows = []
    for i in range(batch):
        if i % 2 == 0:
            rows.append([length - 4 * (i % 5)])  # 112..128 text tokens
        else:
            h, w = IMAGE_GRIDS[(i // 2) % len(IMAGE_GRIDS)]
            image_tokens = h * w // 4 + 2  # + <|vision_start|>, <|vision_end|>
            text = length - image_tokens - 4 * (i % 3)
            rows.append([text // 3, (h, w), text - text // 3])
    return rows


def interleaved_best_times(calls: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Best wall time of each call and its last result; calls take turns, so a change in the
    machine's load hits them all alike rather than whichever ran during it."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    best = dict.fromkeys(calls, float("inf"))
    results = {}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name] = call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def torch_embed(model, ids, mask, pixels, grid):
    """Last-real-token final hidden states, L2-normalised, from the PyTorch reference."""
    kwargs = dict(
        input_ids=torch.as_tensor(ids),
        attention_mask=torch.as_tensor(mask),
        mm_token_type_ids=torch.as_tensor((ids == model.config.image_token_id).astype(np.int64)),
        pixel_values=torch.as_tensor(pixels),
        image_grid_thw=torch.as_tensor(grid),
    )
    hidden = model.model(**kwargs).last_hidden_state
    last = kwargs["attention_mask"].sum(dim=1) - 1  # right padding
    pooled = hidden[torch.arange(hidden.shape[0]), last]
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--pack-length", type=int, default=0, help="packed row length (default 2 x --length)"
    )
    args = parser.parse_args()

    from transformers import Qwen2VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    config = get_size(args.size)
    encoder = Encoder.init(config, seed=0)
    ids, mask, pixels, grid = make_inputs(config, batch_rows(args.batch, args.length), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        encoder.save_pretrained(tmp)
        model = Qwen2VLForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()

    prepared = encoder.prepare(ids, mask, pixels, grid)
    report = padding_report(prepared, config)
    print(
        f"{args.size} encoder, {encoder.num_params() / 1e6:.1f}M params; batch {ids.shape[0]} "
        f"x {ids.shape[1]} tokens, {len(grid)} images ({pixels.shape[0]} patches), JAX patch "
        f"budget {prepared.pixel_values.shape[1]}/row; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, torch {torch.__version__} with {args.threads} threads"
    )
    print("padding of the JAX batch: " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
    budget = prepared.pixel_values.shape[1]
    packed = pack_items(
        config,
        *items_from_rows(config, ids, mask, pixels, grid),
        length=args.pack_length or 2 * ids.shape[1],
        num_patches=budget,
    )
    print(
        f"packed: {packed['input_ids'].shape[0]} rows x {packed['input_ids'].shape[1]} tokens, "
        f"patch budget {budget}/row; padding: "
        + ", ".join(f"{k} {v:.3f}" for k, v in padding_report(packed, config).items())
    )

    vision_packed = pack_vision(prepared, coarse=True)  # as Encoder.embed does
    print(
        f"vision packed: the {len(grid)} images in {vision_packed['vision_pixel_values'].shape[0]}"
        f" vision rows of {budget} patches (instead of {ids.shape[0]} text rows)"
    )
    candidates = {}  # name -> a call returning [B, D] embeddings
    for impl in layers.ATTENTION_IMPLS:
        # A fresh jit per implementation, its module built with that implementation.
        module = dataclasses.replace(encoder.options, attention_impl=impl).module(encoder.config)
        forward = jax.jit(lambda params, batch, m=module: m.apply({"params": params}, batch)[0])
        forward(encoder.params, prepared)
        forward(encoder.params, vision_packed)
        candidates[f"JAX forward ({impl})"] = lambda f=forward: np.asarray(
            f(encoder.params, prepared)
        )
        candidates[f"JAX forward, vision packed ({impl})"] = lambda f=forward: np.asarray(
            f(encoder.params, vision_packed)
        )
    packed_forward = jax.jit(
        lambda params, batch: encoder.module.apply({"params": params}, batch)[0]
    )
    candidates["JAX forward, packed (einsum)"] = lambda: np.asarray(
        packed_forward(encoder.params, packed)
    )
    candidates["JAX Encoder.embed (einsum)"] = lambda: encoder.embed(ids, mask, pixels, grid)
    candidates["JAX Encoder.embed(pack_vision=False) (einsum)"] = lambda: encoder.embed(
        ids, mask, pixels, grid, pack_vision=False
    )
    torch_name = "PyTorch (transformers, sdpa)"
    candidates[torch_name] = lambda: torch_embed(model, ids, mask, pixels, grid)
    with torch.inference_mode():
        seconds, outputs = interleaved_best_times(candidates, args.warmup, args.repeats)
    ref = outputs[torch_name]
    torch_rate = args.batch / seconds[torch_name]
    load = os.getloadavg()
    print(
        f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores "
        f"(1, 5, 15 min, read after the timings)"
    )
    print(f"best of {args.repeats} after {args.warmup} warm-up calls\n")
    print("| implementation | ms/batch | embeddings/s | x PyTorch | max (1 - cosine) vs PyTorch |")
    print("|---|---:|---:|---:|---:|")
    failed = False
    for name, emb in outputs.items():
        cosine = float(np.min(np.sum(emb * ref, axis=-1)))
        failed |= cosine < COSINE_MIN
        rate = args.batch / seconds[name]
        print(
            f"| {name} | {1e3 * seconds[name]:.0f} | {rate:.1f} | {rate / torch_rate:.2f} "
            f"| {1 - cosine:.1e} |"
        )
    if failed:
        sys.exit(f"embeddings disagree with PyTorch (cosine < {COSINE_MIN})")


if __name__ == "__main__":
    main()
