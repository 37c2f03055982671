"""The dict layout the typed batches replaced, for tests of the ``as_batch`` boundary."""

from __future__ import annotations

import dataclasses
from typing import Any

from jfe_jax.models.batches import VisionPackedBatch


def as_dict(batch: Any) -> dict[str, Any]:
    """A typed model batch as the dict it replaced: its fields that are not None, a
    vision-packed batch's flat (its text rows' keys, ``vision_*`` for the masked rows)."""
    if isinstance(batch, VisionPackedBatch):
        out = as_dict(batch.rows)
        if batch.masked is not None:
            out["vision_pixel_values"] = batch.masked.pixel_values
            out["vision_segment_ids"] = batch.masked.segment_ids
            out["vision_positions"] = batch.masked.positions
        if batch.blocks:
            out["vision_blocks"] = batch.blocks
        return out | {"image_token_index": batch.image_token_index}
    return {
        f.name: getattr(batch, f.name)
        for f in dataclasses.fields(batch)
        if f.metadata.get("pytree_node", True) and getattr(batch, f.name) is not None
    }
