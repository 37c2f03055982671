"""``jfe export`` at pool scale: items/s and the host share, before and after, in one run.

An M-BEIR-like candidate pool is written to a temporary directory: text-only candidates
(captions and passages of 5-60 words), image-only candidates and image + text candidates in
about equal parts, the photos deterministic photo-like JPEGs of 640x480 to 1024x768 (quality
90; up to 64 distinct files, cycled). The pool is exported with ``export_embeddings`` at the
2b stage-2 item format (max_pixels 448x448: a 1024-patch budget per row, length buckets
128/256/512), batch 32, for each model size and each of the variants:

  before       workers 0 (items prepared in line, one batch at a time, the device idle
               meanwhile), pack_vision off (every row carries the full patch budget),
               batches in stream order: the export before issue 32 item 5
  packed       workers 0, pack_vision on, length bucketing (bucket window 4 batches)
  after        workers ``default_workers()`` (min(8, CPUs)) preparing ahead of the device,
               pack_vision on, length bucketing: the export's defaults now

Each variant exports the pool once to compile its shapes, then again into a fresh directory,
timed. "host share" is the fraction of that wall time the device waited for the host's next
batch (``StreamTiming.host_share``). The machine's JAX float32 2048x2048 matmul rate is
measured in the same run. On a shared machine absolute times are noisy: compare the rows of
one run.

``measure_export(size, n, workers, pack_vision)`` is the measurement, for other benchmarks.

Usage: python benchmarks/bench_export_pool.py [--items tiny=256,small=96]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from jfe_jax.data.tokenizer import build_tokenizer  # noqa: E402
from jfe_jax.encoder import Encoder  # noqa: E402
from jfe_jax.index.embedder import Item, ItemEmbedder, StreamTiming, default_workers  # noqa: E402
from jfe_jax.index.export import DEFAULT_BUCKET_WINDOW, export_embeddings  # noqa: E402
from jfe_jax.models.sizes import get_size  # noqa: E402
from jfe_jax.train.topology import time_matmul  # noqa: E402

PHOTO_SIZES = ((640, 480), (800, 600), (1024, 768), (768, 1024), (640, 640))
WORDS = (
    "a man woman dog cat red blue green small large two three sitting standing on in the of "
    "near street table field water building car train bird tree white black holding with"
).split()
FORMAT = dict(max_pixels=448 * 448, length_buckets=(128, 256, 512))  # the 2b stage-2 format
BATCH_SIZE = 32
VOCAB = {"tiny": 512, "small": 8192}


def make_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: smooth noise at three scales over a gradient, plus grain."""
    image = np.zeros((height, width, 3), np.float32)
    for scale, amplitude in ((64, 80), (16, 40), (4, 20)):
        small = rng.normal(0, 1, (height // scale + 2, width // scale + 2, 3))
        small = ((small - small.min()) / np.ptp(small) * 255).astype(np.uint8)
        smooth = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        image += (np.asarray(smooth, np.float32) - 128) * (amplitude / 128)
    rows, cols = np.mgrid[0:height, 0:width]
    image += (cols / width * 60 + rows / height * 40 + 100)[..., None]
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


@functools.cache
def make_pool(n: int, seed: int = 0) -> tuple[str, list[tuple[str, Item]], list[str]]:
    """(directory, ``n`` candidate records, their texts): a third text-only, a third
    image-only, a third image + text; the JPEGs in the directory (made once per process)."""
    rng = np.random.default_rng(seed)
    root = tempfile.mkdtemp(prefix="bench_export_pool_")
    photos = []
    for i in range(min(64, max(1, 2 * n // 3))):
        width, height = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        make_photo(rng, width, height).save(os.path.join(root, f"{i}.jpg"), "JPEG", quality=90)
        photos.append(f"{i}.jpg")
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(5, 61))) for _ in range(n)]
    records = []
    for i in range(n):
        kind = rng.integers(3)  # 0 text-only, 1 image-only, 2 image + text
        image = photos[i % len(photos)] if kind else None
        records.append((f"c{i}", Item(text=texts[i] if kind != 1 else None, image=image)))
    return root, records, texts


@functools.cache
def _embedder(size: str, n: int, pack_vision: bool) -> ItemEmbedder:
    root, _, texts = make_pool(n)
    tokenizer = build_tokenizer(texts, VOCAB.get(size, 8192), os.path.join(root, f"tok_{size}"))
    return ItemEmbedder(
        Encoder.init(get_size(size), seed=0),
        tokenizer=tokenizer,
        batch_size=BATCH_SIZE,
        image_root=root,
        pack_vision=pack_vision,
        **FORMAT,
    )


def measure_export(
    size: str, n: int, workers: int, pack_vision: bool, bucket_window: int | None = None
) -> dict[str, Any]:
    """Exports an ``n``-item M-BEIR-like pool (``make_pool``) with the ``size`` model, once to
    compile, then timed; returns items/s, the host share and the timing's parts (seconds).
    ``bucket_window``: default the export's with ``pack_vision``, else stream order."""
    _, records, _ = make_pool(n)
    embedder = _embedder(size, n, pack_vision)
    if bucket_window is None:
        bucket_window = DEFAULT_BUCKET_WINDOW if pack_vision else 0
    out = tempfile.mkdtemp(prefix="bench_export_out_")
    kw = dict(shard_size=n, progress=False, workers=workers, bucket_window=bucket_window)
    export_embeddings(embedder, records, os.path.join(out, "warm"), **kw)  # compiles
    timing = StreamTiming()
    export_embeddings(embedder, records, os.path.join(out, "timed"), timing=timing, **kw)
    return {
        "items_per_s": timing.items / timing.wall_s,
        "host_share": timing.host_share,
        "wall_s": timing.wall_s,
        "host_wait_s": timing.host_wait_s,
        "device_s": timing.device_s,
        "batches": timing.batches,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", default="tiny=256,small=96", help="model sizes and their pool sizes")
    args = ap.parse_args(argv)
    sizes = {size: int(n) for size, n in (part.split("=") for part in args.items.split(","))}

    workers = default_workers()
    variants = {
        "before (workers 0, pack off, stream order)": dict(workers=0, pack_vision=False),
        "packed (workers 0, pack_vision, bucketed)": dict(workers=0, pack_vision=True),
        f"after (workers {workers}, pack_vision, bucketed)": dict(
            workers=workers, pack_vision=True
        ),
    }
    rates = [time_matmul(jax.devices()[0], 2048, 3) / 1e9]
    rows = []
    for size, n in sizes.items():
        results = {name: measure_export(size, n, **kw) for name, kw in variants.items()}
        rates.append(time_matmul(jax.devices()[0], 2048, 3) / 1e9)
        base = next(iter(results.values()))["items_per_s"]
        for name, r in results.items():
            rows.append(
                f"| {size} | {n} | {name} | {r['items_per_s']:.1f} "
                f"| {r['items_per_s'] / base:.2f}x | {100 * r['host_share']:.0f}% "
                f"| {r['wall_s']:.2f} | {r['device_s']:.2f} |"
            )
    print(
        f"export of an M-BEIR-like pool (1/3 text, 1/3 image, 1/3 image + "
        f"text; JPEGs 640x480-1024x768), max_pixels 448x448, batch {BATCH_SIZE}, "
        f"{os.cpu_count()} CPUs, {jax.local_device_count()} device(s); JAX f32 2048x2048 "
        f"matmul {min(rates):.0f}-{max(rates):.0f} GFLOP/s; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    print("| size | items | variant | items/s | vs before | host share | wall, s | device, s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
