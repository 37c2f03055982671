"""Sequence packing: several items share one row of the static ``[R, L]`` batch.

An item is one query or candidate: a token sequence with zero or more images. Unpacked, each
item takes a row padded to the batch length and a row's patch budget; packed, items are laid
end to end in a row (first-fit decreasing by length) and their images share the row's budget,
so less of the batch is padding. The model then needs to know where items start and end:

* ``segment_ids [R, L]``: 1..S for the items of a row in the order they sit, 0 for padding;
  the language model attends causally *within* a segment only.
* ``position_ids [R, 3, L]``: M-RoPE positions restarted at each item, exactly as if the item
  were alone in its row (rotary attention only sees position differences within a segment).
* ``patch_segment_ids [R, P]``: one id per image of the row (as unpacked), so the vision tower
  already keeps every image to itself.
* ``pool_index [N, 2]``: (row, position of the last real token) of each item, in item order;
  the encoder gathers its embedding there and returns ``[N, D]``.
* ``item_mask [N]``: 1 for real items, 0 for slots that pad N to a static item count (their
  embeddings come back as zeros).

Everything here is host-side numpy; the shapes R, L, P and N are fixed by the caller so jit
compiles one program per shape. Nothing is truncated: whatever does not fit raises.

``pack_vision`` packs the other way: it moves a batch's images out of the text rows' patch
budgets into vision rows of their own (masked rows, or per-image blocks of one size), and the
merged image tokens are gathered back into the rows by ``image_token_index``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jfe_jax.models.batches import (
    EarlyBatch,
    PackedBatch,
    VisionGroup,
    VisionPackedBatch,
    as_batch,
)
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.image_patches import pixel_values_shape, write_pixel_values
from jfe_jax.models.inputs import image_runs, prepare_batch


def _item_batch(config: ModelConfig, index: int, ids, pixels, grid) -> EarlyBatch:
    """``prepare_batch`` of one item alone (all its checks), with errors naming the item.

    Its ``pixel_values`` are zeros: prepare_batch sees a zero-stride stand-in of the item's
    pixels' shape (pack_items writes the real pixels into the packed rows itself, so an
    item's uint8 patches are normalised once, there).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"item {index}: input_ids must be a non-empty 1-D array, got {ids.shape}")
    if (pixels is None) != (grid is None):
        raise ValueError(f"item {index}: pixel_values and image_grid_thw must be given together")
    num_patches = None
    if grid is not None:
        grid = np.asarray(grid).reshape(-1, 3)
        num_patches = int(np.prod(grid, axis=1).sum())
        if not len(grid) and not np.prod(pixel_values_shape(pixels)):
            pixels, grid, num_patches = None, None, None  # an empty image list: text only
        else:
            pixels = np.broadcast_to(np.float32(0), pixel_values_shape(pixels))
    try:
        return prepare_batch(config, ids[None], None, pixels, grid, num_patches=num_patches)
    except ValueError as err:
        raise ValueError(f"item {index} (checked alone, as row 0): {err}") from None


def _pick_rows(needed: int, num_rows: int | Sequence[int] | None, row_multiple: int) -> int:
    if num_rows is None:
        return -(-needed // row_multiple) * row_multiple
    if isinstance(num_rows, int):
        return num_rows
    fitting = [r for r in sorted(num_rows) if r >= needed]
    if not fitting:
        raise ValueError(
            f"the items need {needed} packed rows but the largest row bucket is {max(num_rows)}"
        )
    return fitting[0]


def pack_items(
    config: ModelConfig,
    input_ids: Sequence[np.ndarray],
    pixel_values: Sequence[np.ndarray | None] | None = None,
    image_grid_thw: Sequence[np.ndarray | None] | None = None,
    *,
    length: int,
    num_patches: int = 0,
    num_rows: int | Sequence[int] | None = None,
    num_items: int | None = None,
    row_multiple: int = 1,
    pad_token_id: int = 0,
    chunks: int = 1,
) -> PackedBatch:
    """Packs N items into R rows of ``length`` tokens and returns the packed model batch.

    Args:
      config: the model's architecture (token ids, vision geometry).
      input_ids: per item, its token ids ``[n_i]`` (no padding), with one ``<|image_pad|>``
        run per image.
      pixel_values: per item, ``[patches_i, patch_dim]`` (all its images, in order) or None;
        or the item's uint8 ``ImagePatches``, normalised as they are written into the rows.
      image_grid_thw: per item, ``[images_i, 3]`` or None.
      length: L, tokens per row.
      num_patches: P, image patches per row, shared by the images of the row's items; > 0
        always emits pixel arrays (so text-only and image batches share one shape), 0 rejects
        images.
      num_rows: R as a number; or a list of allowed row counts (the smallest that fits is
        taken); None: as few rows as fit, rounded up to ``row_multiple``.
      num_items: N, item slots (>= the number of items); default: the number of items.
      row_multiple: see ``num_rows``.
      pad_token_id: id written at padding positions (masked out).
      chunks: C > 1 packs for gradient caching (``jfe_jax.train.grad_cache``), whose chunk k
        takes items k, k + C, ... and rows k, k + C, ...: item slot i is packed among the
        slots of its chunk (i mod C) into that chunk's rows, so every chunk holds its items
        whole. N and R (an int here) must be multiples of C; the batch records C
        (``row_chunks``).

    Returns:
      ``input_ids``, ``attention_mask``, ``segment_ids`` ``[R, L]`` int32, ``position_ids``
      ``[R, 3, L]`` int32, ``pool_index [N, 2]`` int32, ``item_mask [N]`` int32, and with
      ``num_patches > 0`` ``pixel_values [R, P, patch_dim]`` float32, ``patch_segment_ids
      [R, P]`` and ``patch_positions [R, P, 2]`` int32.

    Raises:
      ValueError: an item is malformed, longer than L, has more patches than P, or the items
        do not fit in R rows or N slots; the message names the item and the numbers.
    """
    count = len(input_ids)
    pixel_values = [None] * count if pixel_values is None else list(pixel_values)
    image_grid_thw = [None] * count if image_grid_thw is None else list(image_grid_thw)
    if count == 0:
        raise ValueError("cannot pack an empty list of items")
    if len(pixel_values) != count or len(image_grid_thw) != count:
        raise ValueError(
            f"{count} items of input_ids but {len(pixel_values)} of pixel_values and "
            f"{len(image_grid_thw)} of image_grid_thw"
        )
    if length < 1 or num_patches < 0:
        raise ValueError(f"length must be >= 1 and num_patches >= 0, got {length}, {num_patches}")
    merge = config.vision.spatial_merge_size
    if num_patches % merge**2:
        raise ValueError(
            f"patch budget {num_patches} is not a multiple of merge_size**2 = {merge**2}"
        )
    num_items = count if num_items is None else num_items
    if count > num_items:
        raise ValueError(f"{count} items do not fit in {num_items} item slots (num_items)")
    if row_multiple < 1:
        raise ValueError(f"row_multiple must be >= 1, got {row_multiple}")
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    if chunks > 1 and (num_items % chunks or not isinstance(num_rows, int) or num_rows % chunks):
        raise ValueError(
            f"packing in {chunks} chunks needs item slots (num_items={num_items}) and a fixed "
            f"row count (num_rows={num_rows}) that are multiples of {chunks}"
        )

    alone = [
        _item_batch(config, i, ids, pix, grid)
        for i, (ids, pix, grid) in enumerate(zip(input_ids, pixel_values, image_grid_thw))
    ]
    sizes = [b.input_ids.shape[1] for b in alone]
    patches = [int((b.patch_segment_ids > 0).sum()) if b.has_pixels else 0 for b in alone]
    for i, (n, p) in enumerate(zip(sizes, patches)):
        if n > length:
            raise ValueError(f"item {i} has {n} tokens but a packed row holds {length} (length)")
        if p > num_patches:
            raise ValueError(
                f"item {i} has {p} image patches but a packed row's patch budget is "
                f"{num_patches} (num_patches)"
            )

    if chunks == 1:
        rows = _fit_rows(
            range(count), sizes, patches, length, num_patches, num_rows, "the {count} items"
        )
        total_rows = _pick_rows(len(rows), num_rows, row_multiple)
    else:  # chunk k's rows are k, k + C, ...: local row j is row j * C + k
        total_rows = num_rows
        rows = [[] for _ in range(total_rows)]
        for k in range(chunks):
            local = _fit_rows(
                range(k, count, chunks),
                sizes,
                patches,
                length,
                num_patches,
                total_rows // chunks,
                f"chunk {k} of {chunks}: its {{count}} items",
            )
            for j, members in enumerate(local):
                rows[j * chunks + k] = members

    out = {
        "input_ids": np.full((total_rows, length), pad_token_id, np.int32),
        "attention_mask": np.zeros((total_rows, length), np.int32),
        "segment_ids": np.zeros((total_rows, length), np.int32),
        "position_ids": np.ones((total_rows, 3, length), np.int32),
        "pool_index": np.zeros((num_items, 2), np.int32),
        "item_mask": np.zeros(num_items, np.int32),
    }
    if num_patches:
        patch_dim = config.vision.patch_dim
        out["pixel_values"] = np.zeros((total_rows, num_patches, patch_dim), np.float32)
        out["patch_segment_ids"] = np.zeros((total_rows, num_patches), np.int32)
        out["patch_positions"] = np.zeros((total_rows, num_patches, 2), np.int32)
    for r, members in enumerate(rows):
        cursor, patch_cursor, images = 0, 0, 0
        for segment, i in enumerate(members, start=1):
            item, n, p = alone[i], sizes[i], patches[i]
            span = slice(cursor, cursor + n)
            out["input_ids"][r, span] = item.input_ids[0]
            out["attention_mask"][r, span] = 1
            out["segment_ids"][r, span] = segment
            out["position_ids"][r, :, span] = item.position_ids[0]
            out["pool_index"][i] = (r, cursor + n - 1)
            out["item_mask"][i] = 1
            if p:
                pspan = slice(patch_cursor, patch_cursor + p)
                item_segments = item.patch_segment_ids[0, :p]
                write_pixel_values(pixel_values[i], out["pixel_values"][r, pspan])
                out["patch_segment_ids"][r, pspan] = item_segments + images
                out["patch_positions"][r, pspan] = item.patch_positions[0, :p]
                images += int(item_segments.max())
            cursor += n
            patch_cursor += p
    return PackedBatch(**out, row_chunks=chunks)


def _fit_rows(
    indices: Sequence[int],
    sizes: Sequence[int],
    patches: Sequence[int],
    length: int,
    num_patches: int,
    num_rows: int | Sequence[int] | None,
    what: str,
) -> list[list[int]]:
    """First-fit decreasing by length (then patches): each item of ``indices`` goes to the
    first row it fits; at most ``num_rows`` rows when that is an int. ``what`` names the
    items in the error (``{count}`` is filled in)."""
    indices = list(indices)
    max_rows = num_rows if isinstance(num_rows, int) else None
    rows: list[list[int]] = []
    used_tokens: list[int] = []
    used_patches: list[int] = []
    for i in sorted(indices, key=lambda i: (-sizes[i], -patches[i], i)):
        row = next(
            (
                r
                for r in range(len(rows))
                if used_tokens[r] + sizes[i] <= length
                and used_patches[r] + patches[i] <= num_patches
            ),
            None,
        )
        if row is None:
            if max_rows is not None and len(rows) == max_rows:
                tokens = sum(sizes[j] for j in indices)
                total_patches = sum(patches[j] for j in indices)
                raise ValueError(
                    f"item {i} ({sizes[i]} tokens, {patches[i]} patches) does not fit: "
                    f"{what.format(count=len(indices))} ({tokens} tokens, {total_patches} "
                    f"patches) need more than {max_rows} rows of {length} tokens and "
                    f"{num_patches} patches (num_rows)"
                )
            rows.append([])
            used_tokens.append(0)
            used_patches.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        used_tokens[row] += sizes[i]
        used_patches[row] += patches[i]
    return rows


def items_from_rows(
    config: ModelConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray | None], list[np.ndarray | None]]:
    """Splits reference-style arrays (one item per row, ``prepare_batch``'s arguments) into
    ``pack_items``' per-item lists: real tokens, the row's patches and its grids (or None)."""
    input_ids = np.asarray(input_ids)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    ids = [row[m.astype(bool)] for row, m in zip(input_ids, mask)]
    if image_grid_thw is None:
        return ids, [None] * len(ids), [None] * len(ids)
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    offsets = np.concatenate([[0], np.cumsum(np.prod(grids, axis=1))])
    pixels_out: list[np.ndarray | None] = []
    grids_out: list[np.ndarray | None] = []
    image = 0
    for row in ids:
        k = len(image_runs(row, config.image_token_id))
        if k == 0:
            pixels_out.append(None)
            grids_out.append(None)
            continue
        if image + k > len(grids):
            raise ValueError(f"input_ids has more <|image_pad|> runs than the {len(grids)} grids")
        pixels_out.append(np.asarray(pixel_values)[offsets[image] : offsets[image + k]])
        grids_out.append(grids[image : image + k])
        image += k
    return ids, pixels_out, grids_out


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
    batch: EarlyBatch | Mapping[str, Any],
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
    if num_rows is not None:
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
    batch = as_batch(batch)
    if not isinstance(batch, EarlyBatch):
        raise ValueError(
            f"pack_vision takes an early-fusion batch (EarlyBatch or PackedBatch) with its images "
            f"in the rows' patch budgets, got {type(batch).__name__}"
        )
    if not batch.has_pixels:
        return batch
    pixels = np.asarray(batch.pixel_values)
    segments = np.asarray(batch.patch_segment_ids)
    positions = np.asarray(batch.patch_positions)
    rows, budget, dim = pixels.shape
    vision_budget = budget if patch_budget is None else int(patch_budget)
    if vision_budget <= 0 or vision_budget % MERGED_PATCHES:
        raise ValueError(
            f"patch_budget {vision_budget} must be a positive multiple of {MERGED_PATCHES}"
        )
    if any(p <= 0 or p % MERGED_PATCHES for p in block_sizes):
        raise ValueError(
            f"block_sizes {tuple(block_sizes)} must be positive multiples of {MERGED_PATCHES}"
        )
    images = []  # (patches, text row, start in the row)
    for b in range(rows):
        row = segments[b]
        for k in range(1, int(row.max(initial=0)) + 1):
            where = np.flatnonzero(row == k)
            if where.size:
                images.append((int(where.size), b, int(where[0])))
    out = batch.replace(pixel_values=None, patch_segment_ids=None, patch_positions=None)
    if not images and num_rows is None:
        return out
    in_rows = [i for i, (n, _, _) in enumerate(images) if n not in block_sizes]
    if any(images[i][0] > vision_budget for i in in_rows):
        n = max(images[i][0] for i in in_rows)
        raise ValueError(f"an image of {n} patches does not fit a vision row of {vision_budget}")

    def row_count(needed: int) -> int:
        count = coarse_row_count(needed) if coarse else max(1, needed)
        return -(-count // row_multiple) * row_multiple

    # Groups: (row length, the images in it, (row, offset) of each). Masked rows come first.
    groups = []
    if in_rows or num_rows is not None:
        placed, needed = _first_fit([images[i][0] for i in in_rows], vision_budget)
        if num_rows is not None and needed > num_rows:
            raise ValueError(
                f"the batch's {len(in_rows)} images ({sum(images[i][0] for i in in_rows)} "
                f"patches) need {needed} vision rows of {vision_budget} patches but the fixed "
                f"count is {num_rows} (data.pack_vision_row_fraction: raise it)"
            )
        groups.append(
            (
                vision_budget,
                in_rows,
                placed,
                num_rows if num_rows is not None else row_count(needed),
            )
        )
    for p in sorted(set(block_sizes)):
        members = [i for i, (n, _, _) in enumerate(images) if n == p]
        if members:
            placed = [(r, 0) for r in range(len(members))]
            groups.append((p, members, placed, row_count(len(members))))
    index = np.zeros((rows, budget // MERGED_PATCHES), dtype=np.int32)
    arrays, base = [], 0  # base: the group's first position among the flattened outputs
    for length, members, placed, num_rows in groups:
        v_pixels = np.zeros((num_rows, length, dim), dtype=pixels.dtype)
        v_segments = np.zeros((num_rows, length), dtype=np.int32)
        v_positions = np.zeros((num_rows, length, 2), dtype=np.int32)
        images_in_row = [0] * num_rows
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
        base += num_rows * length // MERGED_PATCHES
    masked = VisionGroup(*arrays.pop(0)) if in_rows or num_rows is not None else None
    return VisionPackedBatch(
        rows=out,
        image_token_index=index,
        masked=masked,
        blocks=tuple(VisionGroup(*group) for group in arrays),
    )


def vision_groups(batch: Any) -> list[tuple[Any, Any, Any]]:
    """``(pixel_values, segment_ids, positions)`` of each group of vision rows of a
    ``pack_vision`` batch, in the order of ``image_token_index``: masked rows, then blocks;
    none for any other batch."""
    if not isinstance(batch, VisionPackedBatch):
        return []
    return [group.arrays() for group in batch.groups()]
