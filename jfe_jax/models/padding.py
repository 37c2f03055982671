"""How much of a batch is padding, and what share of the model's work goes to it.

Static shapes mean padding: text rows are padded to the batch length, image patches to the
row's patch budget. ``padding_report`` counts it from the batch's own masks (host-side numpy,
no model run; give it the host-local batch, before it becomes a global multi-host array), for
benchmarks and the trainer's logs:

* ``token_padding``, ``patch_padding``: fraction of token / patch positions that are padding.
  Every per-position matmul (projections, MLPs) does the same work on them, so these are also
  the shares of the text's and the vision tower's matmul FLOPs spent on padding.
* ``text_attention_padding``, ``vision_attention_padding``: fraction of the score-matrix
  entries (query x key pairs, as computed) whose query or key is padding. Attention FLOPs are
  proportional to these entries.
* ``vision_attention_cross_image``: fraction of a row's patch pairs that join two different
  real images; computed, then masked out (packing waste, not padding).
* the patch counts are of the rows the vision tower runs on: the text rows' patch budgets,
  or for a ``pack_vision`` batch its vision rows (masked rows and per-image blocks), which
  hold no text-only row's budget.
* for packed batches (``segment_ids``, see ``jfe_jax.models.packing``):
  ``text_attention_cross_item``, the same for token pairs that join two different items.
* with ``config``: ``flops_padding``, the share of the forward model FLOPs (counted as
  ``jfe_jax.models.flops`` counts them for MFU) that the padding costs, i.e.
  ``1 - FLOPs(every item at its own unpadded size) / FLOPs(the padded batch)``; an item is a
  row, or a segment of a packed row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jfe_jax.models import flops
from jfe_jax.models.batches import (
    EarlyBatch,
    EarlyFusionBatch,
    LateFusionBatch,
    ModelBatch,
    PackedBatch,
    TrainBatch,
    VisionPackedBatch,
    as_batch,
    text_rows,
)
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.packing import vision_groups

_COUNTS = (
    "tokens",
    "real_tokens",
    "text_pairs",
    "real_text_pairs",
    "same_item_pairs",
    "packed_rows",
    "patches",
    "real_patches",
    "vision_pairs",
    "real_vision_pairs",
    "same_image_pairs",
    "flops",
    "real_flops",
)


def _model_batch_counts(batch: EarlyFusionBatch, config: ModelConfig | None) -> dict[str, int]:
    """Integer counts (and FLOPs) of one early-fusion model batch."""
    rows_batch = text_rows(batch)
    packed = isinstance(rows_batch, PackedBatch)
    mask = np.asarray(rows_batch.attention_mask).astype(bool)
    rows, length = mask.shape
    real = mask.sum(axis=1).astype(np.int64)
    # Tokens of each item: a row, or each segment of a packed row.
    if packed:
        segments = np.where(mask, np.asarray(rows_batch.segment_ids), 0)
        item_sizes = np.concatenate([np.bincount(row)[1:] for row in segments]).astype(np.int64)
        item_sizes = item_sizes[item_sizes > 0]
    else:
        item_sizes = real
    counts = dict.fromkeys(_COUNTS, 0)
    counts.update(
        tokens=rows * length,
        real_tokens=int(real.sum()),
        text_pairs=rows * length * length,
        real_text_pairs=int(np.sum(real * real)),
        same_item_pairs=int(np.sum(item_sizes * item_sizes)),
        packed_rows=rows if packed else 0,
    )
    patch_rows = [np.asarray(segments) for _, segments, _ in vision_groups(batch)]
    if rows_batch.has_pixels:
        patch_rows.append(np.asarray(rows_batch.patch_segment_ids))
    for segments in patch_rows:  # [n, p]: text rows' budgets, or vision rows (pack_vision)
        n, budget = segments.shape
        real_per_row = (segments > 0).sum(axis=1).astype(np.int64)
        same_image = sum(
            int(np.sum(np.bincount(row[row > 0]).astype(np.int64) ** 2)) for row in segments
        )
        counts["patches"] += n * budget
        counts["real_patches"] += int(real_per_row.sum())
        counts["vision_pairs"] += n * budget * budget
        counts["real_vision_pairs"] += int(np.sum(real_per_row * real_per_row))
        counts["same_image_pairs"] += same_image
    if config is not None:
        counts["flops"] = flops.batch_forward_flops(config, batch)
        # What each item would cost alone, unpadded: its real tokens and real patches.
        item_patches = _item_patches(rows_batch, config)
        real_flops = sum(flops.text_forward_flops(config, 1, int(n)) for n in item_sizes)
        real_flops += sum(flops.vision_forward_flops(config, 1, int(p)) for p in item_patches if p)
        counts["real_flops"] = real_flops
    return counts


def _item_patches(batch: EarlyBatch, config: ModelConfig) -> np.ndarray:
    """Image patches of every item (a row, or a segment of a packed row): its
    ``<|image_pad|>`` tokens x merge**2, wherever its pixels sit."""
    is_image = np.asarray(batch.input_ids) == config.image_token_id
    is_image &= np.asarray(batch.attention_mask).astype(bool)
    merge = config.vision.spatial_merge_size**2
    if not isinstance(batch, PackedBatch):
        return is_image.sum(axis=1).astype(np.int64) * merge
    segments = np.asarray(batch.segment_ids)
    per_row = [
        np.bincount(seg[img], minlength=seg.max() + 1)[1:] for seg, img in zip(segments, is_image)
    ]
    return np.concatenate(per_row).astype(np.int64) * merge


def padding_counts(
    batch: ModelBatch | TrainBatch | Mapping[str, Any], config: ModelConfig | None = None
) -> dict[str, int]:
    """The raw counts behind ``padding_report``, summed over every model batch in ``batch``.

    ``batch`` is a model batch (early, packed or vision-packed), a late-fusion batch (its
    ``text`` and ``image`` parts), or a train batch (its sides); or a dict of their former
    layout (``batches.as_batch`` types it).
    """
    return _counts(as_batch(batch), config)


def _counts(batch: ModelBatch | TrainBatch, config: ModelConfig | None) -> dict[str, int]:
    if isinstance(batch, (EarlyBatch, VisionPackedBatch)):
        return _model_batch_counts(batch, config)
    if isinstance(batch, LateFusionBatch):
        parts = [part for part, _ in batch.parts()]
    else:
        parts = batch.sides()
    totals = dict.fromkeys(_COUNTS, 0)
    for part in parts:
        for name, value in _counts(part, config).items():
            totals[name] += value
    return totals


def _fraction(waste: float, total: float) -> float:
    return float(waste / total) if total else 0.0


def padding_report(
    model_batch: ModelBatch | TrainBatch | Mapping[str, Any], config: ModelConfig | None = None
) -> dict[str, float]:
    """Padding fractions of a batch (see the module docstring for each key).

    Args:
      model_batch: a model batch, late-fusion batch or train batch, or a dict of their former
        layout (see ``padding_counts``).
      config: the model's architecture; when given, ``flops_padding`` is added.

    Returns:
      ``token_padding``, ``text_attention_padding``, ``text_attention_cross_item`` for packed
      batches, and for batches with patches
      ``patch_padding``, ``vision_attention_padding``, ``vision_attention_cross_image``, all
      in [0, 1]; ``flops_padding`` with a config.
    """
    c = padding_counts(model_batch, config)
    report = {
        "token_padding": _fraction(c["tokens"] - c["real_tokens"], c["tokens"]),
        "text_attention_padding": _fraction(
            c["text_pairs"] - c["real_text_pairs"], c["text_pairs"]
        ),
    }
    if c["packed_rows"]:
        report["text_attention_cross_item"] = _fraction(
            c["real_text_pairs"] - c["same_item_pairs"], c["text_pairs"]
        )
    if c["patches"]:
        report.update(
            patch_padding=_fraction(c["patches"] - c["real_patches"], c["patches"]),
            vision_attention_padding=_fraction(
                c["vision_pairs"] - c["real_vision_pairs"], c["vision_pairs"]
            ),
            vision_attention_cross_image=_fraction(
                c["real_vision_pairs"] - c["same_image_pairs"], c["vision_pairs"]
            ),
        )
    if config is not None:
        report["flops_padding"] = _fraction(c["flops"] - c["real_flops"], c["flops"])
    return report


def padding_fractions(counts: dict[str, int]) -> dict[str, float]:
    """Padding shares logged with the metrics (see ``jfe_jax.models.padding``): of the token
    positions, of the image-patch positions, and of the forward model FLOPs."""
    out = {}
    for name, total, real in (
        ("token_padding", "tokens", "real_tokens"),
        ("patch_padding", "patches", "real_patches"),
        ("flops_padding", "flops", "real_flops"),
    ):
        if counts.get(total):
            out[name] = 1.0 - counts[real] / counts[total]
    return out
