"""Processed items -> static-shape model batches.

jit compiles one program per input shape, so batches are padded to a small set of shapes:
the sequence length to the smallest of ``length_buckets`` that fits, and the image patches of
each row to a fixed ``patch_budget``. Anything that does not fit raises; nothing is cut.
``collate_packed`` instead lays several items end to end in a row (``jfe_jax.models.packing``),
so short items waste less of the batch on padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from jfe_jax.data.batch_layout import BatchLayout
from jfe_jax.data.late_fusion import LateItem, late_collate
from jfe_jax.data.processing import ProcessedItem
from jfe_jax.models.batches import EarlyBatch, ModelBatch, PackedBatch
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.image_patches import pixel_values_shape
from jfe_jax.models.inputs import (
    image_runs,
    mrope_position_ids,
    prepare_batch,
    vision_patch_positions,
)
from jfe_jax.models.packing import pack_items, pack_vision
from jfe_jax.train import config_base

if TYPE_CHECKING:  # only the item format's fields are read
    from jfe_jax.data.item_format import ItemFormat

# Without an item format's buckets: Qwen2-VL's inference ones (config_base.QWEN2_VL_DEFAULTS).
_LENGTH_BUCKETS = config_base.QWEN2_VL_DEFAULTS.length_buckets


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
    length_buckets: Sequence[int] = _LENGTH_BUCKETS,
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
    has_image = False
    for row, item in enumerate(items):
        n = len(item.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[row, span] = item.input_ids
        mask[row, span] = 1
        if item.patches is not None:
            if patch_budget <= 0:
                raise ValueError(
                    f"item {row} has an image but the batch has no patch budget "
                    "(data.patch_budget = 0 means text-only data)"
                )
            has_image = True
    if patch_budget <= 0:
        return prepare_batch(config, ids, mask)
    if not has_image:
        return prepare_batch(config, ids, mask).replace(
            pixel_values=np.zeros(
                (len(items), patch_budget, config.vision.patch_dim), dtype=np.float32
            ),
            patch_segment_ids=np.zeros((len(items), patch_budget), dtype=np.int32),
            patch_positions=np.zeros((len(items), patch_budget, 2), dtype=np.int32),
        )
    return _with_patches(items, ids, mask, config=config, patch_budget=patch_budget)


def _with_patches(
    items: Sequence[ProcessedItem],
    ids: np.ndarray,
    mask: np.ndarray,
    *,
    config: ModelConfig,
    patch_budget: int,
) -> EarlyBatch:
    """``prepare_batch(config, ids, mask, all patches, all grids, num_patches=patch_budget)``,
    with each item's patches written once, straight into the preallocated padded arrays.

    prepare_batch takes the reference's flat ``pixel_values``: feeding it meant concatenating
    every item's patches and copying them again into the batch, two passes over about 4 MB
    per 448x448 image (and fresh pages for each). An item's uint8 patches are normalised and
    repeated over time on that one write (``ImagePatches.write_pixel_values``), so no item
    holds float32 patches of its own. The checks are prepare_batch's, per row.
    """
    vcfg = config.vision
    merge = vcfg.spatial_merge_size
    if patch_budget % merge**2:
        raise ValueError(
            f"patch budget {patch_budget} is not a multiple of merge_size**2 = {merge**2}"
        )
    vocab = config.text.vocab_size
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        b, j = np.argwhere(bad)[0]
        raise ValueError(
            f"input_ids[{b}, {j}] = {ids[b, j]} is outside the vocabulary [0, {vocab})"
        )
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"row {int(empty[0])} has no real token (attention_mask is all zero)")
    batch, length = ids.shape
    position_ids = np.empty((batch, 3, length), dtype=np.int32)
    pixel_values = np.zeros((batch, patch_budget, vcfg.patch_dim), dtype=np.float32)
    segments = np.zeros((batch, patch_budget), dtype=np.int32)
    positions = np.zeros((batch, patch_budget, 2), dtype=np.int32)
    for row, item in enumerate(items):
        grids = _item_grids(row, item, ids[row], config)
        if grids.size and int(np.prod(grids, axis=1).sum()) > patch_budget:
            raise ValueError(
                f"row {row} has {item.num_patches} patches but the patch budget is {patch_budget}"
            )
        position_ids[row] = mrope_position_ids(
            ids[row], mask[row], grids, image_token_id=config.image_token_id, merge_size=merge
        )
        cursor = 0
        for k, grid in enumerate(grids):
            n = int(np.prod(grid))
            segments[row, cursor : cursor + n] = k + 1
            positions[row, cursor : cursor + n] = vision_patch_positions(grid, merge)
            cursor += n
        if cursor:
            item.write_pixel_values(pixel_values[row, :cursor])
    return EarlyBatch(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        pixel_values=pixel_values,
        patch_segment_ids=segments,
        patch_positions=positions,
    )


def _item_grids(row: int, item: ProcessedItem, row_ids: np.ndarray, config: ModelConfig):
    """The item's ``image_grid_thw`` as int64 [images, 3], checked against its patches and
    its runs of ``<|image_pad|>`` (ValueError naming the row, as prepare_batch words it)."""
    vcfg = config.vision
    merge = vcfg.spatial_merge_size
    runs = image_runs(row_ids, config.image_token_id)
    if item.patches is None:
        grids = np.zeros((0, 3), dtype=np.int64)
    else:
        grids = np.asarray(item.image_grid_thw).astype(np.int64).reshape(-1, 3)
        shape = pixel_values_shape(item.patches)
        if len(shape) != 2 or shape[1] != vcfg.patch_dim:
            raise ValueError(
                f"row {row}: pixel_values must be [num_patches, {vcfg.patch_dim}] "
                f"(channels*temporal*patch*patch), got shape {shape}"
            )
        for t, h, w in grids:
            if t < 1 or h < merge or w < merge or h % merge or w % merge:
                raise ValueError(
                    f"row {row}: image_grid_thw {[int(t), int(h), int(w)]}: t must be >= 1 and "
                    f"h, w positive multiples of spatial_merge_size {merge}"
                )
        expected = int(np.prod(grids, axis=1).sum())
        if shape[0] != expected:
            raise ValueError(
                f"row {row}: pixel_values has {shape[0]} patches but image_grid_thw says "
                f"{expected} ({len(grids)} images)"
            )
    if len(runs) != len(grids):
        raise ValueError(
            f"row {row} has {len(runs)} runs of <|image_pad|> but {len(grids)} images; each "
            "image needs exactly one run"
        )
    for (start, run_length), grid in zip(runs, grids):
        need = int(np.prod(grid)) // merge**2
        if run_length != need:
            raise ValueError(
                f"row {row}: the <|image_pad|> run at position {start} has {run_length} tokens "
                f"but its image (grid {grid.tolist()}) needs {need}"
            )
    return grids


def collate_packed(
    items: Sequence[ProcessedItem],
    *,
    config: ModelConfig,
    pad_token_id: int,
    length_buckets: Sequence[int] = _LENGTH_BUCKETS,
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
        [it.patches for it in items],
        [it.image_grid_thw for it in items],
        length=length,
        num_patches=patch_budget,
        num_rows=num_rows,
        num_items=num_items,
        row_multiple=row_multiple,
        pad_token_id=pad_token_id,
        chunks=chunks,
    )


def collate_side(
    items: Sequence[ProcessedItem | LateItem],
    *,
    config: ModelConfig,
    pad_token_id: int,
    item_format: ItemFormat,
    layout: BatchLayout,
    patch_budget: int,
    num_rows: int | Sequence[int] | None = None,
    num_items: int | None = None,
    name: str = "side",
) -> ModelBatch:
    """The model batch of one side's items, as ``item_format`` (length buckets, fusion) and
    ``layout`` (packing, vision packing) lay them out, ``patch_budget`` patches per item.

    Late fusion: a ``LateFusionBatch``. Packed: ``collate_packed`` into ``num_rows`` rows
    (default ``layout.packed_rows``) of ``layout.pack_length`` tokens and
    ``layout.pack_items_per_row`` items' budgets, ``num_items`` item slots. Else ``collate``.
    With ``layout.pack_vision`` the images then move into vision rows of ``patch_budget``
    patches (``pack_vision``). ``name`` names the side in errors.
    """

    def early(side_items: list[ProcessedItem], budget: int) -> EarlyBatch:
        return collate(
            side_items,
            config=config,
            pad_token_id=pad_token_id,
            length_buckets=item_format.length_buckets,
            patch_budget=budget,
        )

    if item_format.fusion == "late":
        return late_collate(items, early, patch_budget)
    if item_format.pack:
        rows = layout.packed_rows(len(items)) if num_rows is None else num_rows
        row_patches = patch_budget * layout.pack_items_per_row
        try:
            batch = collate_packed(
                items,
                config=config,
                pad_token_id=pad_token_id,
                length_buckets=item_format.length_buckets,
                patch_budget=row_patches,
                length=layout.pack_length or None,
                num_rows=rows,
                num_items=num_items,
                chunks=layout.chunks(len(items)),
            )
        except ValueError as error:
            raise ValueError(
                f"{name}: {len(items)} items do not pack into {rows} rows of "
                f"{layout.pack_length or 'bucketed'} tokens and {row_patches} patches; lower "
                f"pack_items_per_row or raise pack_length ({error})"
            ) from error
    else:
        batch = early(list(items), patch_budget)
    if layout.pack_vision and patch_budget:
        # Vision rows as long as the largest image a side may hold (its per-item budget):
        # any image fits, and no row's attention spans more than that.
        batch = pack_vision(
            batch,
            patch_budget=patch_budget,
            row_multiple=layout.row_multiple,
            coarse=True,
            block_sizes=layout.pack_vision_blocks,
            num_rows=layout.vision_rows(len(items)),
        )
    return batch
