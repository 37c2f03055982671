"""Vision packing: a batch's images moved out of the text rows' patch budgets into vision rows
of their own, so the vision tower runs on densely filled rows instead of every text row's
budget (most of it padding for text-only rows and small images).

``pack_vision`` lays the images into masked rows shared by several images, or per-image blocks
of one size, and ``image_token_index`` gathers the merged image tokens back into the text rows
(``batches.VisionPackedBatch``). Host-side numpy, like ``packing.pack_items``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jfe_jax.models.batches import EarlyBatch, ModelBatch, VisionGroup, VisionPackedBatch

Image = tuple[int, int, int]  # (patches, text row, start in the row)
# (row length, the images in it, (row, offset) of each, row count)
Group = tuple[int, list[int], list[tuple[int, int]], int]


def coarse_row_count(needed: int) -> int:
    """``needed`` rounded up to three significant bits: 1-8 as they are, then 10, 12, 14, 16,
    20, 24, 28, 32, 40, ... Four sizes per doubling bound the number of compiled shapes while
    adding less than a quarter of padding rows (9 -> 10, 17 -> 20)."""
    step = 1 << max(0, int(needed).bit_length() - 3)
    return max(1, -(-int(needed) // step) * step)


MERGED_PATCHES = 4  # merge_size**2: the vision tower merges each 2x2 block of consecutive patches


def _first_fit(sizes: Sequence[int], budget: int) -> tuple[list[tuple[int, int]], int]:
    """First-fit decreasing: (row, offset) of each size in rows of ``budget``, and the rows."""
    fill: list[int] = []
    placed: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        row = next((r for r, used in enumerate(fill) if used + sizes[i] <= budget), None)
        if row is None:
            fill.append(0)
            row = len(fill) - 1
        placed[i] = (row, fill[row])
        fill[row] += sizes[i]
    return placed, len(fill)


def pack_vision(
    batch: EarlyBatch,
    *,
    patch_budget: int | None = None,
    row_multiple: int = 1,
    coarse: bool = False,
    block_sizes: Sequence[int] = (),
    num_rows: int | None = None,
) -> EarlyBatch | VisionPackedBatch:
    """Moves a batch's images into their own densely filled rows for the vision tower.

    A model batch keeps each text row's images in that row's patch budget P, so text-only rows
    and small images leave most of ``pixel_values [B, P, D]`` as padding, and the vision tower
    runs on all of it. This lays every image of the batch into vision rows and adds the map
    back; the text keys are kept, the per-row pixel keys dropped (all of them when the batch
    has no image at all: the tower then does not run).

    * Images whose patch count is in ``block_sizes`` get per-image blocks: the images of p
      patches form a group of rows of exactly p patches, one image a row, so the tower's
      attention computes only each image's own p x p scores. ``vision_blocks`` holds the
      groups (ascending p), each a dict of ``pixel_values [n, p, D]``, ``segment_ids [n, p]``
      and ``positions [n, p, 2]``.
    * The other images share masked rows of ``patch_budget`` patches (default P; first-fit
      decreasing by size): ``vision_pixel_values [V, Pv, D]``, ``vision_segment_ids [V, Pv]``
      (one id per image of the vision row, 0 = padding), ``vision_positions [V, Pv, 2]``.
      Each row's attention computes all Pv x Pv scores and masks those joining two images.
    * ``image_token_index [B, P / merge**2]``: for the j-th merged image token of text row b,
      its index among the tower's outputs flattened and concatenated in this order: the masked
      rows, then each block group (0 where the row has no j-th image token; never read).

    Trade-off: a block group costs one compiled shape per (p, n) and leaves no image sharing
    a row, so it suits data with a few recurring image sizes (resized corpora, the capped
    size most photos hit); masked rows keep one shape for any mix of sizes and waste at most
    Pv**2 - sum(p_i**2) scores per row. The embeddings are the same either way (every image
    attends only to itself). Row counts are rounded up to ``coarse_row_count`` with
    ``coarse`` (few shapes for a jitted caller), then to a multiple of ``row_multiple`` (the
    device count, for vision rows sharded over devices).

    ``num_rows`` fixes the masked rows' count instead (one shape for every batch; several hosts
    must each feed the same count): a batch whose images need more raises, naming both
    numbers; images of ``block_sizes`` are then not allowed (a block group's count would vary),
    and a batch without any image still gets its ``num_rows`` empty rows.
    """
    _check_row_options(num_rows, row_multiple, block_sizes)
    if not isinstance(batch, EarlyBatch):
        raise ValueError(
            f"pack_vision takes an early-fusion batch (EarlyBatch or PackedBatch) with its images "
            f"in the rows' patch budgets, got {type(batch).__name__}"
        )
    if not batch.has_pixels:
        return batch
    pixels = np.asarray(batch.pixel_values)
    segments = np.asarray(batch.patch_segment_ids)
    vision_budget = pixels.shape[1] if patch_budget is None else int(patch_budget)
    if vision_budget <= 0 or vision_budget % MERGED_PATCHES:
        raise ValueError(
            f"patch_budget {vision_budget} must be a positive multiple of {MERGED_PATCHES}"
        )
    if any(p <= 0 or p % MERGED_PATCHES for p in block_sizes):
        raise ValueError(
            f"block_sizes {tuple(block_sizes)} must be positive multiples of {MERGED_PATCHES}"
        )
    images = _row_images(segments)
    out = batch.replace(pixel_values=None, patch_segment_ids=None, patch_positions=None)
    if not images and num_rows is None:
        return out
    masked, blocks = _vision_row_groups(
        images, vision_budget, block_sizes, num_rows, coarse=coarse, row_multiple=row_multiple
    )
    groups = ([masked] if masked is not None else []) + blocks
    index, arrays = _write_vision_rows(groups, images, pixels, np.asarray(batch.patch_positions))
    return VisionPackedBatch(
        rows=out,
        image_token_index=index,
        masked=VisionGroup(*arrays.pop(0)) if masked is not None else None,
        blocks=tuple(VisionGroup(*group) for group in arrays),
    )


def _check_row_options(num_rows: int | None, row_multiple: int, block_sizes: Sequence[int]) -> None:
    """A fixed vision row count must be positive, a multiple of ``row_multiple``, and come
    without per-image blocks.

    Raises:
      ValueError: naming the numbers.
    """
    if num_rows is None:
        return
    if num_rows < 1 or num_rows % row_multiple:
        raise ValueError(
            f"num_rows={num_rows} vision rows must be >= 1 and a multiple of "
            f"row_multiple={row_multiple}"
        )
    if block_sizes:
        raise ValueError(
            f"a fixed vision row count (num_rows={num_rows}) takes no per-image blocks "
            f"(block_sizes={tuple(block_sizes)}): a block group's row count follows the batch"
        )


def _row_images(segments: np.ndarray) -> list[Image]:
    """``(patches, text row, start in the row)`` of every image of ``patch_segment_ids [B, P]``,
    in row order, then segment order."""
    images = []
    for b in range(segments.shape[0]):
        row = segments[b]
        for k in range(1, int(row.max(initial=0)) + 1):
            where = np.flatnonzero(row == k)
            if where.size:
                images.append((int(where.size), b, int(where[0])))
    return images


def _vision_row_groups(
    images: Sequence[Image],
    vision_budget: int,
    block_sizes: Sequence[int],
    num_rows: int | None,
    *,
    coarse: bool,
    row_multiple: int,
) -> tuple[Group | None, list[Group]]:
    """The groups of vision rows and where each image sits: the masked rows of
    ``vision_budget`` patches (the images not of ``block_sizes``, first-fit decreasing; None
    when there are none and no fixed ``num_rows`` asks for them), and one group per block
    size present (ascending), an image a row.

    Raises:
      ValueError: an image does not fit a masked row, or the images need more masked rows
        than ``num_rows``.
    """
    in_rows = [i for i, (n, _, _) in enumerate(images) if n not in block_sizes]
    if any(images[i][0] > vision_budget for i in in_rows):
        n = max(images[i][0] for i in in_rows)
        raise ValueError(f"an image of {n} patches does not fit a vision row of {vision_budget}")

    def row_count(needed: int) -> int:
        count = coarse_row_count(needed) if coarse else max(1, needed)
        return -(-count // row_multiple) * row_multiple

    masked = None
    if in_rows or num_rows is not None:
        placed, needed = _first_fit([images[i][0] for i in in_rows], vision_budget)
        if num_rows is not None and needed > num_rows:
            raise ValueError(
                f"the batch's {len(in_rows)} images ({sum(images[i][0] for i in in_rows)} "
                f"patches) need {needed} vision rows of {vision_budget} patches but the fixed "
                f"count is {num_rows} (data.pack_vision_row_fraction: raise it)"
            )
        count = num_rows if num_rows is not None else row_count(needed)
        masked = (vision_budget, in_rows, placed, count)
    blocks = []
    for p in sorted(set(block_sizes)):
        members = [i for i, (n, _, _) in enumerate(images) if n == p]
        if members:
            placed = [(r, 0) for r in range(len(members))]
            blocks.append((p, members, placed, row_count(len(members))))
    return masked, blocks


def _write_vision_rows(
    groups: Sequence[Group],
    images: Sequence[Image],
    pixels: np.ndarray,
    positions: np.ndarray,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """``image_token_index [B, P / merge**2]`` and each group's ``(pixel_values, segment_ids,
    positions)``: the images' patches copied from the text rows into their vision rows, and
    each merged image token mapped to its place among the groups' outputs, flattened and
    concatenated in group order."""
    rows, budget, dim = pixels.shape
    index = np.zeros((rows, budget // MERGED_PATCHES), dtype=np.int32)
    arrays, base = [], 0  # base: the group's first position among the flattened outputs
    for length, members, placed, count in groups:
        v_pixels = np.zeros((count, length, dim), dtype=pixels.dtype)
        v_segments = np.zeros((count, length), dtype=np.int32)
        v_positions = np.zeros((count, length, 2), dtype=np.int32)
        images_in_row = [0] * count
        for i, (v, offset) in zip(members, placed):
            n, b, start = images[i]
            images_in_row[v] += 1
            v_pixels[v, offset : offset + n] = pixels[b, start : start + n]
            v_segments[v, offset : offset + n] = images_in_row[v]
            v_positions[v, offset : offset + n] = positions[b, start : start + n]
            tokens = np.arange(n // MERGED_PATCHES)
            index[b, start // MERGED_PATCHES + tokens] = (
                base + (v * length + offset) // MERGED_PATCHES + tokens
            )
        arrays.append((v_pixels, v_segments, v_positions))
        base += count * length // MERGED_PATCHES
    return index, arrays


def vision_groups(batch: ModelBatch) -> list[tuple[Any, Any, Any]]:
    """``(pixel_values, segment_ids, positions)`` of each group of vision rows of a
    ``pack_vision`` batch, in the order of ``image_token_index``: masked rows, then blocks;
    none for any other batch."""
    if not isinstance(batch, VisionPackedBatch):
        return []
    return [group.arrays() for group in batch.groups()]
