"""A small synthetic benchmark and tiny Hugging Face models beside it, for the CLI tests."""

from __future__ import annotations

import os
import shutil

from jfe_jax.data.item_format import ItemFormat
from jfe_jax.data.synthetic import SyntheticConfig, generate
from jfe_jax.encoder import Encoder
from jfe_jax.models.sizes import get_size


def small_synthetic(tasks: tuple[str, ...], **counts) -> SyntheticConfig:
    """A few queries per task and a few pairs (``counts`` overrides any of them)."""
    fields = dict(
        train_queries_per_task=4,
        val_queries_per_task=2,
        test_queries_per_task=6,
        num_text_triples=8,
        num_image_captions=8,
    )
    fields.update(counts)
    return SyntheticConfig(tasks=tuple(tasks), **fields)


def make_bench(root: str | os.PathLike, config: SyntheticConfig) -> str:
    """Generates ``config`` (with its tokenizer) into ``root``; returns the path."""
    generate(str(root), config, progress=False)
    return str(root)


def tiny_model(directory: str | os.PathLike, bench: str | os.PathLike, seed: int, **size) -> str:
    """A randomly initialised ``tiny`` model (``size`` replaces config fields) saved in Hugging
    Face format with the benchmark's tokenizer and a small item format; returns the directory."""
    directory = str(directory)
    encoder = Encoder.init(get_size("tiny").replace(**size), seed=seed)
    # Images of at most 112x112 pixels: a 64-patch budget keeps the CLI tests fast.
    encoder.save_pretrained(
        directory, item_format=ItemFormat.for_vision(encoder.config.vision, max_pixels=112 * 112)
    )
    tokenizer = os.path.join(str(bench), "tokenizer")
    for name in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, name), directory)
    return directory
