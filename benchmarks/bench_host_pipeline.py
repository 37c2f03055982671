"""Stage-2 host pipeline at M-BEIR image sizes: examples/s per process and where the time goes.

Writes deterministic photo-like JPEGs of 640x480 to 1024x768 (smooth noise at a few scales over
a gradient, quality 90: about 80-200 KB each) to a temporary directory and builds M-BEIR train
records from them: query = instruction + caption (text), positive = photo + caption. Each
record runs through the project's ``ContrastiveBatcher`` at the 2b stage-2 item format
(``configs/stage2_2b.py``: max_pixels 448x448, patch budgets 1024, length buckets 128/256/512),
one process, no grain: ``encode`` of every record (decode JPEG, smart-resize, patchify,
tokenise; the baseline rescales and normalises there too), then ``collate`` into padded
batches (where the current code normalises). The tokenizer is the
offline BPE (8192 ids); the model config is the 2b one with that vocabulary.

Two implementations run side by side in one process, alternating round by round:

  current   the library as it is: items keep uint8 patches (``ImagePatches``, no temporal
            repeat) and collate normalises and repeats them straight into the padded batch
  baseline  the code before issue 32 item 4 (kept below): rescale in float64, patchify of the
            float image with the temporal repeat, collate by concatenating every image's
            patches and copying them into the padded batch (``prepare_batch``)

The per-stage profile wraps the stage functions with timers (the baseline's stages are the
same functions of its own code), each stage's time exclusive of the timed stages it calls
(the current normalise runs inside collate, and wherever an item's ``pixel_values`` is
read); "other" is the rest (record handling, checks, keys). The
machine's JAX float32 2048x2048 matmul rate is printed beside the timings: on a shared 2-core
machine absolute times are noisy, the ratio of the two rows of one run is what counts.

Usage: python benchmarks/bench_host_pipeline.py [--examples 64] [--batch-size 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from jfe_jax.data import collate as collate_lib  # noqa: E402
from jfe_jax.data import pipeline, processing  # noqa: E402
from jfe_jax.data.image_processor import ImageProcessor, smart_resize, to_rgb  # noqa: E402
from jfe_jax.data.pipeline import ContrastiveBatcher  # noqa: E402
from jfe_jax.data.processing import ProcessedItem  # noqa: E402
from jfe_jax.data.tokenizer import build_tokenizer  # noqa: E402
from jfe_jax.models.batches import EarlyBatch  # noqa: E402
from jfe_jax.models.config import ModelConfig  # noqa: E402
from jfe_jax.models.image_patches import ImagePatches  # noqa: E402
from jfe_jax.models.inputs import prepare_batch  # noqa: E402
from jfe_jax.models.sizes import get_size, special_token_ids  # noqa: E402
from jfe_jax.train.config_base import stage2_config  # noqa: E402
from jfe_jax.train.topology import time_matmul  # noqa: E402

STAGES = ("decode", "resize", "rescale+normalise", "patchify", "tokenise", "collate", "other")
PHOTO_SIZES = ((640, 480), (800, 600), (1024, 768), (768, 1024), (480, 640))
VOCAB_SIZE = 8192
INSTRUCTIONS = ["Retrieve an image that matches the given caption."]


# --- data --------------------------------------------------------------------------------------


def make_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: smooth noise at four scales over a gradient, plus grain."""
    image = np.zeros((height, width, 3), np.float32)
    for scale, amplitude in ((64, 80), (16, 40), (4, 20), (2, 10)):
        small = rng.normal(0, 1, (height // scale + 2, width // scale + 2, 3))
        small = ((small - small.min()) / np.ptp(small) * 255).astype(np.uint8)
        smooth = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        image += (np.asarray(smooth, np.float32) - 128) * (amplitude / 128)
    rows, cols = np.mgrid[0:height, 0:width]
    image += (cols / width * 60 + rows / height * 40 + 100)[..., None]
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def vocabulary(seed: int = 0) -> list[str]:
    """3000 random lowercase words: enough text for the 8192-id BPE to learn all its merges
    (few unused ids means few added tokens, as in Qwen2's tokenizer; thousands of reserved
    fillers would make every ``added_tokens_decoder`` look-up cost milliseconds)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(3000)]


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Sentences of ``vocabulary`` words to train the offline tokenizer on."""
    rng = np.random.default_rng(seed)
    words = vocabulary(seed)
    return [" ".join(rng.choice(words, 12)) for _ in range(3000)]


def make_records(directory: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` M-BEIR train records (text query, photo + caption positive); JPEGs in
    ``directory`` (``n // 4`` distinct photos at most, cycled: generating them is slow)."""
    rng = np.random.default_rng(seed)
    photos = []
    for i in range(min(n, max(4, n // 4))):
        width, height = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        path = os.path.join(directory, f"{i}.jpg")
        make_photo(rng, width, height).save(path, "JPEG", quality=90)
        with open(path, "rb") as f:
            photos.append(f.read())
    words = vocabulary(seed)
    records = []
    for i in range(n):
        caption = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
        records.append(
            dict(
                qid=f"9:{i}",
                query_text=caption(14),
                query_image=b"",
                positive_did=f"9:{i}",
                positive_text=caption(10),
                positive_image=photos[i % len(photos)],
                negative_dids=[],
                negative_texts=[],
                negative_images=[],
                num_negatives=0,
                instructions=INSTRUCTIONS,
            )
        )
    return records


def model_config() -> ModelConfig:
    """The 2b architecture with the offline tokenizer's vocabulary."""
    config = get_size("2b")
    text = dataclasses.replace(config.text, vocab_size=VOCAB_SIZE)
    return config.replace(text=text, **special_token_ids(VOCAB_SIZE))


def stage2_2b_batcher(tokenizer, *, baseline: bool = False) -> ContrastiveBatcher:
    """A ``ContrastiveBatcher`` at the 2b stage-2 item format (the baseline's, or today's)."""
    d = stage2_config("2b").data
    processor_class = BaselineImageProcessor if baseline else ImageProcessor
    batcher_class = BaselineBatcher if baseline else ContrastiveBatcher
    processor = processor_class(min_pixels=d.image_min_pixels, max_pixels=d.image_max_pixels)
    batcher = batcher_class.from_options(
        tokenizer,
        processor,
        model_config(),
        kind="mbeir",
        length_buckets=tuple(d.length_buckets),
        max_length=d.max_length,
        truncate_text=d.truncate_text,
        query_patch_budget=d.query_patch_budget,
        candidate_patch_budget=d.candidate_patch_budget,
        num_hard_negatives=d.num_hard_negatives,
    )
    batcher.image_processor = processor  # the format's would be a plain ImageProcessor
    return batcher


# --- the baseline: the code before issue 32 item 4 ------------------------------------------------


class BaselineImageProcessor(ImageProcessor):
    """``ImageProcessor.process_one`` as it was: float64 rescale, float patchify. encode_item
    calls ``process_patches``: here it returns the float32 pixel values, which an item takes
    as its patches (as items held them before)."""

    def process_patches(self, image, *, root=None, name="image"):
        return self.process_one(image, root=root, name=name)

    def process_one(self, image, *, root=None, name="image"):
        height, width = image.height, image.width
        new_height, new_width = smart_resize(
            height, width, self.factor, self.min_pixels, self.max_pixels
        )
        resized = self.baseline_resize(image, new_height, new_width)
        pixels = self.baseline_normalize(resized)
        return self.baseline_patchify(pixels.transpose(2, 0, 1))

    def baseline_resize(self, image, new_height, new_width):
        rgb = to_rgb(image)
        return Image.fromarray(rgb).resize((new_width, new_height), Image.Resampling.BICUBIC)

    def baseline_normalize(self, resized):
        pixels = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return (pixels - mean) / std

    def baseline_patchify(self, image):
        channels, height, width = image.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        blocks = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)
        frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
        patches = frames.reshape(grid_h * grid_w, channels * t * p * p)
        return np.ascontiguousarray(patches), np.array([1, grid_h, grid_w], dtype=np.int64)


def baseline_collate(
    items: Sequence[ProcessedItem],
    *,
    config: ModelConfig,
    pad_token_id: int,
    length_buckets: Sequence[int],
    patch_budget: int,
) -> EarlyBatch:
    """``collate`` as it was (right padding): concatenate, then ``prepare_batch`` copies."""
    length = collate_lib.pick_length(max(len(it.input_ids) for it in items), length_buckets)
    ids = np.full((len(items), length), pad_token_id, dtype=np.int32)
    mask = np.zeros((len(items), length), dtype=np.int32)
    pixels, grids = [], []
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = item.input_ids
        mask[row, :n] = 1
        if item.pixel_values is not None:
            pixels.append(item.pixel_values)
            grids.append(np.asarray(item.image_grid_thw).reshape(-1, 3))
    if not grids:
        return prepare_batch(config, ids, mask).replace(
            pixel_values=np.zeros(
                (len(items), patch_budget, config.vision.patch_dim), dtype=np.float32
            ),
            patch_segment_ids=np.zeros((len(items), patch_budget), dtype=np.int32),
            patch_positions=np.zeros((len(items), patch_budget, 2), dtype=np.int32),
        )
    return prepare_batch(
        config,
        ids,
        mask,
        np.concatenate(pixels),
        np.concatenate(grids),
        num_patches=patch_budget,
    )


class BaselineBatcher(ContrastiveBatcher):
    """The batcher with the baseline's collate."""

    def _collate(self, items, patch_budget, side):
        return baseline_collate(
            items,
            config=self.model_config,
            pad_token_id=self.tokenizer.pad_token_id,
            length_buckets=self.item_format.length_buckets,
            patch_budget=patch_budget,
        )


# --- timing ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _timed(
    owner: Any, name: str, stage: str, totals: dict[str, float], active: list[float]
) -> Iterator[None]:
    """Within the block, calls of ``owner.name`` add their wall time to ``totals[stage]``,
    less the time of timed calls nested in them. ``active`` is shared by all the timers: the
    nested time of each timed call in progress."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        active.append(0.0)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            totals[stage] += elapsed - active.pop()
            if active:
                active[-1] += elapsed

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _stage_timers(batcher: ContrastiveBatcher, totals: dict[str, float]) -> contextlib.ExitStack:
    """Timers on the stage functions of ``batcher``'s implementation, each exclusive of the
    timed stages it calls."""
    stack = contextlib.ExitStack()
    active: list[float] = []
    processor = batcher.image_processor  # a frozen dataclass: its class is wrapped
    stack.enter_context(_timed(pipeline, "decode_image", "decode", totals, active))
    stack.enter_context(_timed(processing, "_tokenize", "tokenise", totals, active))
    stack.enter_context(_timed(batcher, "collate", "collate", totals, active))
    if isinstance(processor, BaselineImageProcessor):
        owners = [type(processor)] * 3
        names = ("baseline_resize", "baseline_normalize", "baseline_patchify")
    else:
        owners = [type(processor), ImagePatches, type(processor)]
        names = ("resize", "write_pixel_values", "patchify_uint8")
    for owner, name, stage in zip(owners, names, ("resize", "rescale+normalise", "patchify")):
        stack.enter_context(_timed(owner, name, stage, totals, active))
    return stack


def _run(batcher: ContrastiveBatcher, records: list[dict], batch_size: int) -> None:
    """Encodes every record and collates them in batches of ``batch_size``; each batch is
    dropped before the next is made, as a training loop does once it is on the devices."""
    for start in range(0, len(records) - batch_size + 1, batch_size):
        batch = batcher.collate([batcher.encode(r) for r in records[start : start + batch_size]])
        del batch


def profile_host_pipeline(
    n: int = 64,
    *,
    batch_size: int = 32,
    rounds: int = 5,
    seed: int = 0,
    baseline: bool = True,
    records: list[dict] | None = None,
) -> dict[str, dict[str, Any]]:
    """Times the stage-2 host pipeline at the 2b item format on ``n`` M-BEIR-sized photos.

    Returns ``{implementation: {"examples_per_s", "ms_per_example": {stage: ms}}}`` for
    "current" (and "baseline" when asked): medians over ``rounds`` rounds, the two
    implementations alternating within each round; plus ``"examples"`` (per round) and
    ``"matmul_gflops"`` (JAX f32 2048x2048, best over the rounds).
    """
    if records is None:
        with tempfile.TemporaryDirectory(prefix="bench_host_") as directory:
            records = make_records(directory, n, seed)
    tokenizer = build_tokenizer(tokenizer_corpus(seed), VOCAB_SIZE)
    batchers = {"current": stage2_2b_batcher(tokenizer)}
    if baseline:
        batchers["baseline"] = stage2_2b_batcher(tokenizer, baseline=True)
    batch_size = min(batch_size, len(records))
    examples = len(records) // batch_size * batch_size
    for batcher in batchers.values():  # warm up (lazy imports, caches)
        _run(batcher, records[:batch_size], batch_size)
    seconds = {name: [] for name in batchers}
    stage_seconds = {name: {stage: [] for stage in STAGES} for name in batchers}
    rates = []
    for _ in range(rounds):
        rates.append(time_matmul(jax.devices()[0], 2048, 3) / 1e9)
        for name, batcher in batchers.items():  # alternating, so both see the same load
            totals = dict.fromkeys(STAGES, 0.0)
            with _stage_timers(batcher, totals):
                start = time.perf_counter()
                _run(batcher, records, batch_size)
                total = time.perf_counter() - start
            totals["other"] = total - sum(v for k, v in totals.items() if k != "other")
            seconds[name].append(total)
            for stage, value in totals.items():
                stage_seconds[name][stage].append(value)
    results: dict[str, Any] = {"matmul_gflops": max(rates), "examples": examples}
    for name in batchers:
        results[name] = {
            "examples_per_s": examples / float(np.median(seconds[name])),
            "ms_per_example": {
                stage: 1e3 * float(np.median(values)) / examples
                for stage, values in stage_seconds[name].items()
            },
        }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--against",
        metavar="TREE",
        help="also time the whole pipeline of another checkout of the package (for instance"
        " `git worktree add /tmp/old 7b83e95^`, the code before issue 32 item 4) against this"
        " one, each in its own process (host_pipeline_worker.py), alternating round by round",
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_host_") as directory:
        records = make_records(directory, args.examples, args.seed)
        sizes = sorted({len(r["positive_image"]) // 1024 for r in records})
    floor = decode_resize_floor(records)
    results = profile_host_pipeline(batch_size=args.batch_size, rounds=args.rounds, records=records)
    print(
        f"stage-2 host pipeline, 2b item format, {results['examples']} examples (JPEGs 640x480 to "
        f"1024x768, {sizes[0]}-{sizes[-1]} KB), batch {args.batch_size}, one process; JAX f32 "
        f"2048x2048 matmul {results['matmul_gflops']:.0f} GFLOP/s, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    header = " | ".join(f"{s}, ms (%)" for s in STAGES)
    print(f"| implementation | examples/s (median of {args.rounds}) | {header} |")
    print("|---|---|" + "---|" * len(STAGES))
    for name in ("baseline", "current"):
        row = results[name]
        stages = row["ms_per_example"]
        total = sum(stages.values())
        cells = " | ".join(f"{stages[s]:.2f} ({100 * stages[s] / total:.0f}%)" for s in STAGES)
        print(f"| {name} | {row['examples_per_s']:.1f} | {cells} |")
    speedup = results["current"]["examples_per_s"] / results["baseline"]["examples_per_s"]
    print(f"speed-up: {speedup:.2f}x")
    baseline_ms = sum(results["baseline"]["ms_per_example"].values())
    print(
        f"decode + resize alone (PIL, the same images, best of 3): {floor:.2f} ms per example;"
        f" no pipeline that keeps transformers' pixels beats {baseline_ms / floor:.2f}x the"
        " baseline of this run"
    )
    if args.against:
        print()
        print_against(records, args.against, args.rounds, args.batch_size)
    return 0


def decode_resize_floor(records: list[dict]) -> float:
    """Milliseconds per example of the JPEG decode and the PIL bicubic resize alone, the two
    stages whose results must equal transformers' (best of three passes)."""
    import io

    d = stage2_config("2b").data
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for record in records:
            image = Image.open(io.BytesIO(record["positive_image"]))
            image.load()
            height, width = smart_resize(
                image.height, image.width, 28, d.image_min_pixels, d.image_max_pixels
            )
            image.resize((width, height), Image.Resampling.BICUBIC)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / len(records)


def print_against(records: list[dict], tree: str, rounds: int, batch_size: int) -> None:
    """Times the whole pipeline of this checkout and of ``tree`` in separate processes."""
    import json
    import pickle
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_pipeline_worker.py")
    trees = {"this checkout": here, os.path.abspath(tree): os.path.abspath(tree)}
    with tempfile.TemporaryDirectory(prefix="bench_host_against_") as directory:
        path = os.path.join(directory, "records.pkl")
        with open(path, "wb") as f:
            data = dict(records=records, corpus=tokenizer_corpus(0), vocab_size=VOCAB_SIZE)
            pickle.dump(data, f)
        rates: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(rounds):
            for name, root in trees.items():
                env = dict(os.environ, PYTHONPATH=root)
                command = [sys.executable, worker, path, "--passes", "1"]
                command += ["--batch-size", str(batch_size)]
                out = subprocess.run(command, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{name}: the worker failed:\n{out.stderr[-2000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                if os.path.realpath(result["package"]) != os.path.realpath(
                    os.path.join(root, "jfe_jax")
                ):
                    raise SystemExit(f"{name}: imported {result['package']}, not {root}")
                rates[name].append(result["examples"] / min(result["seconds"]))
    print(
        f"whole pipeline, one process each, median of {rounds} rounds (load average"
        f" {os.getloadavg()[0]:.2f}):"
    )
    print("| package | examples/s | x the other |")
    print("|---|---|---|")
    medians = {name: float(np.median(values)) for name, values in rates.items()}
    (a, ra), (b, rb) = medians.items()
    print(f"| {a} | {ra:.1f} | {ra / rb:.2f}x |")
    print(f"| {b} | {rb:.1f} | {rb / ra:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
