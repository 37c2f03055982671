"""Host-side preparation of model inputs from the reference's arrays.

The reference forward takes ``input_ids``, ``attention_mask``, a flat ``pixel_values`` of every
image's patches and ``image_grid_thw``. The Flax model wants static, batch-major arrays that
shard along the batch axis, so this module (numpy, on the host):

* checks that patches, grids and ``<|image_pad|>`` runs agree (never truncating anything);
* packs each row's image patches into ``pixel_values [B, P, patch_dim]`` with segment ids and
  2-D rotary positions;
* computes M-RoPE ``position_ids [B, 3, L]`` exactly as transformers' ``get_rope_index``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from jfe_jax.models.batches import EarlyBatch
from jfe_jax.models.config import ModelConfig


def vision_patch_positions(grid_thw: Sequence[int], merge_size: int) -> np.ndarray:
    """(row, col) of every patch of one image, in the merge-block order of ``pixel_values``
    (read-only: one array per grid, shared by every batch)."""
    t, h, w = (int(x) for x in grid_thw)
    return _patch_positions(t, h, w, int(merge_size))


# The collate of every training batch asks for these for each of its images: a few distinct
# grids, computed once (about 5 ms of host work per demo batch of 32, against a ~170 ms step).
@functools.lru_cache(maxsize=4096)
def _patch_positions(t: int, h: int, w: int, merge_size: int) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge_size, merge_size, w // merge_size, merge_size)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    positions = np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int32)
    positions.flags.writeable = False
    return positions


@functools.lru_cache(maxsize=4096)
def _llm_grid_offsets(t: int, h: int, w: int) -> np.ndarray:
    """``[3, t*h*w]`` (temporal, height, width) offsets of an image's merged tokens
    (read-only)."""
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    offsets = np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
    offsets.flags.writeable = False
    return offsets


def image_runs(row_ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``image_token_id`` in a 1-D token array."""
    is_image = np.concatenate([[False], row_ids == image_token_id, [False]])
    edges = np.flatnonzero(is_image[1:] != is_image[:-1])
    return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2])]


def mrope_position_ids(
    row_ids: np.ndarray,
    row_mask: np.ndarray,
    grids: Sequence[Sequence[int]],
    *,
    image_token_id: int,
    merge_size: int,
) -> np.ndarray:
    """M-RoPE positions ``[3, L]`` of one row, as transformers' ``Qwen2VLModel.get_rope_index``.

    Text advances all three streams by one per token; an image of llm grid (t, h, w) takes
    temporal/height/width positions ``start + (ti, hi, wi)`` and moves the next start by
    ``max(h, w)``. Padding positions get 1 (the reference's fill; they are masked anyway).
    """
    length = row_ids.shape[0]
    positions = np.ones((3, length), dtype=np.int64)
    real = np.flatnonzero(row_mask)
    ids = row_ids[real]
    runs = image_runs(ids, image_token_id)
    if len(runs) != len(grids):
        raise AssertionError("caller must check image runs against grids")
    out = np.empty((3, ids.shape[0]), dtype=np.int64)
    current, cursor = 0, 0
    for (start, run_length), grid in zip(runs, grids):
        text_len = start - cursor
        out[:, cursor:start] = current + np.arange(text_len)
        current += text_len
        t, h, w = int(grid[0]), int(grid[1]) // merge_size, int(grid[2]) // merge_size
        out[:, start : start + run_length] = current + _llm_grid_offsets(t, h, w)
        current += max(h, w)
        cursor = start + run_length
    out[:, cursor:] = current + np.arange(ids.shape[0] - cursor)
    positions[:, real] = out
    return positions


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prepare_batch(
    config: ModelConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    *,
    num_patches: int | None = None,
    patch_multiple: int = 4,
) -> EarlyBatch:
    """Checks the reference-style arrays and returns the model's batch (``EarlyBatch``).

    Args:
      config: the model's architecture (token ids, vision geometry).
      input_ids: ``[B, L]`` token ids, with one run of ``<|image_pad|>`` per image.
      attention_mask: ``[B, L]``; 1 for real tokens (left or right padding); all ones if None.
      pixel_values: ``[N, patch_dim]``, every image's patches in batch order, as the image
        processor emits them.
      image_grid_thw: ``[num_images, 3]``; images are assigned to ``<|image_pad|>`` runs in
        row-major order, like the reference.
      num_patches: the per-row patch budget P; by default the largest row rounded up to
        ``patch_multiple``. A row that needs more than P raises (nothing is truncated).

    Returns:
      ``input_ids``, ``attention_mask`` ``[B, L]`` int32, ``position_ids`` ``[B, 3, L]`` int32,
      and for batches with images ``pixel_values [B, P, patch_dim]`` float32,
      ``patch_segment_ids [B, P]`` and ``patch_positions [B, P, 2]`` int32.

    Raises:
      ValueError: naming the disagreement.
    """
    merge = config.vision.spatial_merge_size
    input_ids, attention_mask = _check_tokens(config, input_ids, attention_mask)
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw must be given together")
    grids = np.zeros((0, 3), dtype=np.int64)
    if image_grid_thw is not None:
        pixel_values, grids = _check_images(config, pixel_values, image_grid_thw)
    row_images = _assign_images(config, input_ids, grids)
    position_ids = np.stack(
        [
            mrope_position_ids(
                input_ids[b],
                attention_mask[b],
                [grids[i] for i in row_images[b]],
                image_token_id=config.image_token_id,
                merge_size=merge,
            )
            for b in range(input_ids.shape[0])
        ]
    )
    out = EarlyBatch(
        input_ids=input_ids.astype(np.int32),
        attention_mask=attention_mask.astype(np.int32),
        position_ids=position_ids.astype(np.int32),
    )
    if image_grid_thw is None:
        return out
    packed, segments, patch_positions = _pack_row_patches(
        config, pixel_values, grids, row_images, num_patches, patch_multiple
    )
    return out.replace(
        pixel_values=packed, patch_segment_ids=segments, patch_positions=patch_positions
    )


def _check_tokens(
    config: ModelConfig, input_ids: np.ndarray, attention_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` as arrays (the mask all ones if None), checked: ``[B, L]``
    integer ids in the vocabulary, a 0/1 mask with a real token in every row, and no
    ``<|image_pad|>`` at a padding position.

    Raises:
      ValueError: naming the row (and position) that is wrong.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    attention_mask = np.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
        )
    if not np.isin(attention_mask, (0, 1)).all():
        raise ValueError("attention_mask must contain only 0 and 1")
    vocab = config.text.vocab_size
    bad = (input_ids < 0) | (input_ids >= vocab)
    if bad.any():
        b, j = np.argwhere(bad)[0]
        raise ValueError(
            f"input_ids[{b}, {j}] = {input_ids[b, j]} is outside the vocabulary [0, {vocab})"
        )
    empty = np.flatnonzero(attention_mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"row {int(empty[0])} has no real token (attention_mask is all zero)")
    is_image = input_ids == config.image_token_id
    if (is_image & (attention_mask == 0)).any():
        b = int(np.argwhere(is_image & (attention_mask == 0))[0][0])
        raise ValueError(f"row {b} has <|image_pad|> tokens at padding positions")
    return input_ids, attention_mask


def _check_images(
    config: ModelConfig, pixel_values: np.ndarray, image_grid_thw: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_values float32 [N, patch_dim], grids int64 [num_images, 3])``, checked: every
    grid a whole number of merge blocks, and as many patches as the grids say.

    Raises:
      ValueError: naming the grid or the counts that disagree.
    """
    vcfg = config.vision
    merge = vcfg.spatial_merge_size
    grids = np.asarray(image_grid_thw).astype(np.int64).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    if pixel_values.ndim != 2 or pixel_values.shape[1] != vcfg.patch_dim:
        raise ValueError(
            f"pixel_values must be [num_patches, {vcfg.patch_dim}] "
            f"(channels*temporal*patch*patch), got shape {pixel_values.shape}"
        )
    for i, (t, h, w) in enumerate(grids):
        if t < 1 or h < merge or w < merge or h % merge or w % merge:
            raise ValueError(
                f"image_grid_thw[{i}] = {[int(t), int(h), int(w)]}: t must be >= 1 and h, w "
                f"positive multiples of spatial_merge_size {merge}"
            )
    expected = int(np.prod(grids, axis=1).sum())
    if pixel_values.shape[0] != expected:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw says "
            f"{expected} ({len(grids)} images)"
        )
    return pixel_values, grids


def _assign_images(
    config: ModelConfig, input_ids: np.ndarray, grids: np.ndarray
) -> list[list[int]]:
    """Per row, the indices of its images: images go to the runs of ``<|image_pad|>`` in
    row-major order, one run per image, as in the reference.

    Raises:
      ValueError: the runs and the images disagree in number, or a run's length is not its
        image's merged token count.
    """
    merge = config.vision.spatial_merge_size
    tokens_per_image = np.prod(grids, axis=1) // merge**2
    runs_per_row = [image_runs(row, config.image_token_id) for row in input_ids]
    num_runs = sum(len(r) for r in runs_per_row)
    if num_runs != len(grids):
        num_tokens = int((input_ids == config.image_token_id).sum())
        raise ValueError(
            f"input_ids has {num_tokens} <|image_pad|> tokens in {num_runs} runs but "
            f"{len(grids)} images were given (image_grid_thw); each image needs exactly one run"
        )
    row_images: list[list[int]] = []
    next_image = 0
    for b, runs in enumerate(runs_per_row):
        row_images.append([])
        for start, run_length in runs:
            need = int(tokens_per_image[next_image])
            if run_length != need:
                raise ValueError(
                    f"row {b}: the <|image_pad|> run at position {start} has {run_length} tokens "
                    f"but image {next_image} (grid {grids[next_image].tolist()}) needs {need}"
                )
            row_images[b].append(next_image)
            next_image += 1
    return row_images


def _pack_row_patches(
    config: ModelConfig,
    pixel_values: np.ndarray,
    grids: np.ndarray,
    row_images: list[list[int]],
    num_patches: int | None,
    patch_multiple: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pixel_values [B, P, patch_dim], patch_segment_ids [B, P], patch_positions [B, P, 2])``:
    each row's images' patches side by side in a budget of P (``num_patches``, or the largest
    row rounded up to ``patch_multiple``), segment k + 1 for the row's image k.

    Raises:
      ValueError: the budget is not whole merge blocks, or a row needs more than it.
    """
    vcfg = config.vision
    merge = vcfg.spatial_merge_size
    batch = len(row_images)
    offsets = np.concatenate([[0], np.cumsum(np.prod(grids, axis=1))])
    row_patches = [int(sum(np.prod(grids[i]) for i in imgs)) for imgs in row_images]
    multiple = max(patch_multiple, merge**2)
    budget = (
        num_patches if num_patches is not None else round_up(max(max(row_patches), 1), multiple)
    )
    if budget % merge**2:
        raise ValueError(f"patch budget {budget} is not a multiple of merge_size**2 = {merge**2}")
    if max(row_patches) > budget:
        b = int(np.argmax(row_patches))
        raise ValueError(f"row {b} has {row_patches[b]} patches but the patch budget is {budget}")
    packed = np.zeros((batch, budget, vcfg.patch_dim), dtype=np.float32)
    segments = np.zeros((batch, budget), dtype=np.int32)
    patch_positions = np.zeros((batch, budget, 2), dtype=np.int32)
    for b, imgs in enumerate(row_images):
        cursor = 0
        for k, i in enumerate(imgs):
            n = int(np.prod(grids[i]))
            packed[b, cursor : cursor + n] = pixel_values[offsets[i] : offsets[i] + n]
            segments[b, cursor : cursor + n] = k + 1
            patch_positions[b, cursor : cursor + n] = vision_patch_positions(grids[i], merge)
            cursor += n
    return packed, segments, patch_positions


def dummy_batch(config: ModelConfig, batch: int = 1, length: int = 8) -> EarlyBatch:
    """A smallest valid batch with one image, for init and shape inference."""
    merge = config.vision.spatial_merge_size
    ids = np.zeros((batch, length), dtype=np.int32)
    ids[:, 1] = config.image_token_id
    grids = np.array([[1, merge, merge]] * batch)
    pixels = np.zeros((batch * merge * merge, config.vision.patch_dim), dtype=np.float32)
    return prepare_batch(config, ids, None, pixels, grids)
