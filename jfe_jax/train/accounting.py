"""What a train batch asks of the model, counted on the device for the logged throughput and
padding, so that the host reads nothing from a batch between log steps.

``batch_counts(config, batch)`` is traced inside the trainer's jitted metric-window update:

* the padded totals (token and patch positions, model FLOPs) depend only on the batch's shapes
  and enter the program as constants, worked out once per batch shape when it is traced;
* the real counts (tokens and patches that are not padding, and the FLOPs each item would cost
  alone, unpadded) come from the batch's masks, summed on the device. An item's FLOPs are read
  from a table of ``jfe_jax.models.flops`` over every size it can have (built at trace time), so
  the arithmetic is that module's, not a copy.

The names and meanings are those of ``jfe_jax.models.padding.padding_counts`` (host numpy, the
reference the tests compare with), plus ``step_flops`` (``flops.train_step_flops``, for MFU)
and ``tokens_seen`` (the real tokens of the parts a late-fusion item has, for tokens/s).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jfe_jax.models import flops
from jfe_jax.models.batches import (
    EarlyFusionBatch,
    LateFusionBatch,
    PackedBatch,
    TrainBatch,
    text_rows,
)
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.packing import vision_groups

COUNTS = (
    "tokens",
    "real_tokens",
    "tokens_seen",
    "patches",
    "real_patches",
    "flops",
    "real_flops",
    "step_flops",
)


def batch_counts(config: ModelConfig, batch: TrainBatch) -> dict[str, jax.Array]:
    """The ``COUNTS`` of one global train batch, as float32 scalars; traceable under jit.

    Args:
      config: the model's architecture (FLOPs and the image token).
      batch: a train batch whose values include model batches (``query``, ``candidate``,
        ``hard_negative``): early-fusion, packed, or late-fusion (``text``/``image`` parts).
    """
    totals = dict.fromkeys(COUNTS, jnp.zeros((), jnp.float32))
    for side in batch.sides():
        if isinstance(side, LateFusionBatch):
            parts = side.parts()
        else:
            parts = [(side, None)]
        for part, present in parts:
            for name, value in _model_batch_counts(config, part, present).items():
                totals[name] = totals[name] + value
    totals["step_flops"] = jnp.float32(flops.train_step_flops(config, batch))
    return totals


def _model_batch_counts(
    config: ModelConfig, batch: EarlyFusionBatch, present: jax.Array | None
) -> dict[str, jax.Array]:
    """Counts of one model batch; ``present`` (late fusion) masks the rows whose part is absent
    out of ``tokens_seen`` only, as ``padding_counts`` counts both parts whole."""
    rows_batch = text_rows(batch)
    mask = jnp.asarray(rows_batch.attention_mask) > 0
    rows, length = mask.shape
    real = jnp.sum(mask, axis=1)
    seen = real if present is None else real * (jnp.asarray(present) > 0)
    # An item is a row, or a segment of a packed row; its patches are its image tokens x
    # merge**2, wherever its pixels sit.
    is_image = mask & (jnp.asarray(rows_batch.input_ids) == config.image_token_id)
    merge = config.vision.spatial_merge_size**2
    if isinstance(rows_batch, PackedBatch):
        segments = jnp.where(mask, jnp.asarray(rows_batch.segment_ids), 0)
        item_tokens = _per_segment(segments, mask, length)
        item_patches = merge * _per_segment(segments, is_image, length)
    else:
        item_tokens, item_patches = real, merge * jnp.sum(is_image, axis=1)
    text_table = _table(lambda n: flops.text_forward_flops(config, 1, n), length)
    vision_table = _table(lambda p: flops.vision_forward_flops(config, 1, p), length * merge)
    # The patch rows the vision tower runs on: the text rows' budgets, or pack_vision's rows.
    patch_rows = [segments for _, segments, _ in vision_groups(batch)]
    if rows_batch.has_pixels:
        patch_rows.append(rows_batch.patch_segment_ids)
    return {
        "tokens": jnp.float32(rows * length),
        "real_tokens": jnp.sum(real).astype(jnp.float32),
        "tokens_seen": jnp.sum(seen).astype(jnp.float32),
        "patches": jnp.float32(sum(math.prod(s.shape) for s in patch_rows)),
        "real_patches": sum(
            (jnp.sum(jnp.asarray(s) > 0).astype(jnp.float32) for s in patch_rows),
            jnp.zeros((), jnp.float32),
        ),
        "flops": jnp.float32(flops.batch_forward_flops(config, batch)),
        "real_flops": jnp.sum(text_table[item_tokens]) + jnp.sum(vision_table[item_patches]),
    }


def _per_segment(segments: jax.Array, values: jax.Array, length: int) -> jax.Array:
    """``[rows, length]``: per row, the sum of ``values`` over each segment id 1..length (0 is
    padding and is dropped), as ``np.bincount`` per row would give it."""
    rows = segments.shape[0]
    flat = (segments + (length + 1) * jnp.arange(rows)[:, None]).reshape(-1)
    sums = jax.ops.segment_sum(
        values.astype(jnp.int32).reshape(-1), flat, num_segments=rows * (length + 1)
    )
    return sums.reshape(rows, length + 1)[:, 1:]


def _table(cost, largest: int) -> jax.Array:
    """``cost(n)`` for n = 0..largest (0 costs nothing), float32: built at trace time, a
    constant of the program."""
    return jnp.asarray(np.array([cost(n) if n else 0.0 for n in range(largest + 1)], np.float32))
