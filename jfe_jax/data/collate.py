"""Processed items -> static-shape model batches.

jit compiles one program per input shape, so batches are padded to a small set of shapes:
the sequence length to the smallest of ``length_buckets`` that fits, and the image patches of
each row to a fixed ``patch_budget``. Anything that does not fit raises; nothing is cut.
``collate_packed`` instead lays several items end to end in a row (``jfe_jax.models.packing``),
so short items waste less of the batch on padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jfe_jax.data.processing import ProcessedItem
from jfe_jax.models.batches import EarlyBatch, PackedBatch
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.inputs import prepare_batch
from jfe_jax.models.packing import pack_items

DEFAULT_LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048)


def pick_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    raise ValueError(
        f"a sequence of {length} tokens is longer than the largest length bucket "
        f"{max(buckets)}; raise data.max_length / data.length_buckets or shorten the text"
    )


def collate(
    items: Sequence[ProcessedItem],
    *,
    config: ModelConfig,
    pad_token_id: int,
    length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
    patch_budget: int = 0,
    padding_side: str = "right",
) -> EarlyBatch:
    """Pads ``items`` into the model's batch (an ``EarlyBatch``, see ``prepare_batch``).

    Args:
      items: processed items, with or without images.
      config: the model's architecture.
      pad_token_id: id written at padding positions (masked out).
      length_buckets: allowed padded lengths.
      patch_budget: image patches per row; > 0 always emits pixel arrays of that size (so
        text-only and image batches share one shape), 0 emits none and rejects images.
      padding_side: "right" or "left".
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not items:
        raise ValueError("cannot collate an empty list of items")
    length = pick_length(max(len(it.input_ids) for it in items), length_buckets)
    ids = np.full((len(items), length), pad_token_id, dtype=np.int32)
    mask = np.zeros((len(items), length), dtype=np.int32)
    pixels, grids = [], []
    for row, item in enumerate(items):
        n = len(item.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[row, span] = item.input_ids
        mask[row, span] = 1
        if item.pixel_values is not None:
            if patch_budget <= 0:
                raise ValueError(
                    f"item {row} has an image but the batch has no patch budget "
                    "(data.patch_budget = 0 means text-only data)"
                )
            pixels.append(item.pixel_values)
            grids.append(np.asarray(item.image_grid_thw).reshape(-1, 3))
    if patch_budget <= 0:
        return prepare_batch(config, ids, mask)
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


def collate_packed(
    items: Sequence[ProcessedItem],
    *,
    config: ModelConfig,
    pad_token_id: int,
    length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
    patch_budget: int = 0,
    length: int | None = None,
    num_rows: int | Sequence[int] | None = None,
    num_items: int | None = None,
    row_multiple: int = 1,
    chunks: int = 1,
) -> PackedBatch:
    """Packs ``items`` several to a row into a packed model batch (see ``pack_items``).

    Args:
      items: processed items, with or without images.
      config: the model's architecture.
      pad_token_id: id written at padding positions (masked out).
      length_buckets: the row length is the smallest bucket that holds the longest item...
      length: ...unless given here (a longer row packs more items per row).
      patch_budget: image patches per row, shared by the row's items; > 0 always emits pixel
        arrays, 0 emits none and rejects images.
      num_rows: rows R, or allowed row counts (the smallest that fits); None: as few as fit,
        rounded up to ``row_multiple`` (the data-parallel size, so rows shard evenly).
      num_items: item slots N (>= len(items)); the extra slots have ``item_mask`` 0.
      chunks: pack for a gradient cache of this many chunks (``pack_items``).

    Returns:
      The packed batch: ``[R, L]`` token arrays with ``segment_ids``, ``position_ids
      [R, 3, L]``, ``pool_index [N, 2]``, ``item_mask [N]`` and the ``[R, P]`` patch arrays.
    """
    if not items:
        raise ValueError("cannot collate an empty list of items")
    if length is None:
        length = pick_length(max(len(it.input_ids) for it in items), length_buckets)
    return pack_items(
        config,
        [np.asarray(it.input_ids) for it in items],
        [it.pixel_values for it in items],
        [it.image_grid_thw for it in items],
        length=length,
        num_patches=patch_budget,
        num_rows=num_rows,
        num_items=num_items,
        row_multiple=row_multiple,
        pad_token_id=pad_token_id,
        chunks=chunks,
    )
