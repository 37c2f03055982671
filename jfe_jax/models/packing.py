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
merged image tokens are gathered back into the rows by ``image_token_index``. It lives in
``vision_packing`` and is importable from here, as are ``vision_groups``,
``coarse_row_count`` and ``MERGED_PATCHES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jfe_jax.models.batches import EarlyBatch, PackedBatch
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.image_patches import pixel_values_shape, write_pixel_values
from jfe_jax.models.inputs import image_runs, prepare_batch
from jfe_jax.models.vision_packing import (  # noqa: F401  (re-exported: callers import them here)
    MERGED_PATCHES,
    coarse_row_count,
    pack_vision,
    vision_groups,
)


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
    num_items = count if num_items is None else num_items
    _check_pack_options(
        config,
        count,
        len(pixel_values),
        len(image_grid_thw),
        length=length,
        num_patches=num_patches,
        num_rows=num_rows,
        num_items=num_items,
        row_multiple=row_multiple,
        chunks=chunks,
    )
    alone, sizes, patches = _measure_items(
        config, input_ids, pixel_values, image_grid_thw, length, num_patches
    )
    rows = _item_rows(sizes, patches, length, num_patches, num_rows, row_multiple, chunks)
    out = _empty_rows(config, len(rows), length, num_patches, num_items, pad_token_id)
    _write_item_rows(out, alone, sizes, patches, pixel_values, rows)
    return PackedBatch(**out, row_chunks=chunks)


def _measure_items(
    config: ModelConfig,
    input_ids: Sequence[np.ndarray],
    pixel_values: Sequence[Any],
    image_grid_thw: Sequence[Any],
    length: int,
    num_patches: int,
) -> tuple[list[EarlyBatch], list[int], list[int]]:
    """Each item checked alone (``_item_batch``), its tokens and its image patches.

    Raises:
      ValueError: an item is malformed, longer than a row or has more patches than its budget.
    """
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
    return alone, sizes, patches


def _check_pack_options(
    config: ModelConfig,
    count: int,
    num_pixel_values: int,
    num_grids: int,
    *,
    length: int,
    num_patches: int,
    num_rows: int | Sequence[int] | None,
    num_items: int,
    row_multiple: int,
    chunks: int,
) -> None:
    """``pack_items``' arguments, checked before any item is: one entry per item in every
    list, sizes in range, and the chunks' counts whole.

    Raises:
      ValueError: naming the argument and the numbers.
    """
    if count == 0:
        raise ValueError("cannot pack an empty list of items")
    if num_pixel_values != count or num_grids != count:
        raise ValueError(
            f"{count} items of input_ids but {num_pixel_values} of pixel_values and "
            f"{num_grids} of image_grid_thw"
        )
    if length < 1 or num_patches < 0:
        raise ValueError(f"length must be >= 1 and num_patches >= 0, got {length}, {num_patches}")
    merge = config.vision.spatial_merge_size
    if num_patches % merge**2:
        raise ValueError(
            f"patch budget {num_patches} is not a multiple of merge_size**2 = {merge**2}"
        )
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


def _item_rows(
    sizes: Sequence[int],
    patches: Sequence[int],
    length: int,
    num_patches: int,
    num_rows: int | Sequence[int] | None,
    row_multiple: int,
    chunks: int,
) -> list[list[int]]:
    """The items of each of the R packed rows (R the length of the list; empty rows pad it):
    all items first-fit into the rows, or with ``chunks`` C > 1 chunk k's items into its rows
    k, k + C, ... (local row j is row j * C + k)."""
    count = len(sizes)
    if chunks == 1:
        rows = _fit_rows(
            range(count), sizes, patches, length, num_patches, num_rows, "the {count} items"
        )
        total_rows = _pick_rows(len(rows), num_rows, row_multiple)
        return rows + [[] for _ in range(total_rows - len(rows))]
    rows = [[] for _ in range(num_rows)]
    for k in range(chunks):
        local = _fit_rows(
            range(k, count, chunks),
            sizes,
            patches,
            length,
            num_patches,
            num_rows // chunks,
            f"chunk {k} of {chunks}: its {{count}} items",
        )
        for j, members in enumerate(local):
            rows[j * chunks + k] = members
    return rows


def _empty_rows(
    config: ModelConfig,
    total_rows: int,
    length: int,
    num_patches: int,
    num_items: int,
    pad_token_id: int,
) -> dict[str, np.ndarray]:
    """``PackedBatch``'s arrays for R rows and N item slots, all padding (pixel arrays only
    with a patch budget)."""
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
    return out


def _write_item_rows(
    out: dict[str, np.ndarray],
    alone: Sequence[EarlyBatch],
    sizes: Sequence[int],
    patches: Sequence[int],
    pixel_values: Sequence[Any],
    rows: Sequence[Sequence[int]],
) -> None:
    """Writes each row's items into ``out`` (``_empty_rows``) end to end: the items as
    ``_item_batch`` made them (``alone``, of ``sizes`` tokens and ``patches`` patches),
    segment s for a row's s-th item, positions as alone, the pixels normalised into the row's
    patch budget."""
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
