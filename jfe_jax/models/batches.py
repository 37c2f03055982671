"""The typed batches the model and the train step take: one ``flax.struct`` dataclass per kind.

The collate functions make them and the model, the step and the accounting dispatch on their
type (no key tests):

* ``EarlyBatch``: one item per row, image patches (if any) in each row's patch budget
  (``jfe_jax.models.inputs.prepare_batch``, ``jfe_jax.data.collate.collate``).
* ``PackedBatch``: several items per row (``EarlyBatch`` plus ``segment_ids``, ``pool_index``
  and ``item_mask``; ``jfe_jax.models.packing.pack_items``).
* ``VisionPackedBatch``: text rows (an ``EarlyBatch`` or ``PackedBatch`` without pixels) and
  the side's images in vision rows of their own, with the map back
  (``jfe_jax.models.packing.pack_vision``).
* ``LateFusionBatch``: the text and the image parts of each item apart, with presence masks
  (``jfe_jax.data.late_fusion.late_collate``).
* ``TrainBatch``: a contrastive step's sides (query, candidate, hard negatives) and the keys
  that identify duplicates (``jfe_jax.data.pipeline.ContrastiveBatcher.collate``).

Each is a pytree (``jax.jit`` takes it; leaves are arrays, absent optional fields None), read
by attribute (``batch.input_ids``) and changed with ``batch.replace(...)``. It is no mapping:
``as_batch`` types a dict of the former layout where a user hands one (tests, notebooks); the
library passes the typed batches through without looking at keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import struct

Array = Any


@struct.dataclass
class EarlyBatch:
    """One item per row: tokens ``[B, L]``, M-RoPE ``position_ids [B, 3, L]``, and with images
    ``pixel_values [B, P, patch_dim]``, ``patch_segment_ids [B, P]`` (one id per image of the
    row, 0 = padding), ``patch_positions [B, P, 2]``."""

    input_ids: Array
    attention_mask: Array
    position_ids: Array
    pixel_values: Array = None
    patch_segment_ids: Array = None
    patch_positions: Array = None

    @property
    def has_pixels(self) -> bool:
        """Whether the rows carry image patches (a non-empty patch budget)."""
        return self.pixel_values is not None and self.pixel_values.shape[1] > 0

    @property
    def num_items(self) -> int:
        """Items, i.e. embeddings this batch gives."""
        return self.input_ids.shape[0]


@struct.dataclass
class PackedBatch(EarlyBatch):
    """Several items per row (``jfe_jax.models.packing``): ``segment_ids [R, L]`` (1..S per row,
    0 padding), ``pool_index [N, 2]`` (row, last token) of each item, ``item_mask [N]``. All
    three are required (defaults only because the fields follow optional ones; ``as_batch``
    checks a dict, and no check runs in the constructor, which JAX also calls on
    placeholder leaves)."""

    segment_ids: Array = None
    pool_index: Array = None
    item_mask: Array = None
    # Packed for a gradient cache of this many chunks (``packing.pack_items(chunks=)``): item
    # i and its row are both congruent to i's chunk modulo row_chunks. Static (not a leaf).
    row_chunks: int = struct.field(pytree_node=False, default=1)

    @property
    def num_items(self) -> int:
        return self.pool_index.shape[0]


@struct.dataclass
class VisionGroup:
    """Rows of images for the vision tower: ``pixel_values [V, Pv, D]``, ``segment_ids
    [V, Pv]`` (one id per image of the row, 0 padding), ``positions [V, Pv, 2]``."""

    pixel_values: Array
    segment_ids: Array
    positions: Array

    def arrays(self) -> tuple[Array, Array, Array]:
        return self.pixel_values, self.segment_ids, self.positions


_MASKED_KEYS = ("vision_pixel_values", "vision_segment_ids", "vision_positions")


@struct.dataclass
class VisionPackedBatch:
    """Text ``rows`` (no pixels) plus the side's images in vision rows of their own: ``masked``
    rows shared by several images, and per-image ``blocks`` (each a group of rows of one
    image size); ``image_token_index [B, P / merge**2]`` maps each text row's image tokens to
    the tower's outputs flattened in that order (masked rows, then the blocks)."""

    rows: EarlyBatch | PackedBatch
    image_token_index: Array
    masked: VisionGroup | None = None
    blocks: tuple[VisionGroup, ...] = ()

    @property
    def num_items(self) -> int:
        return self.rows.num_items

    def groups(self) -> list[VisionGroup]:
        """The vision row groups in the order of ``image_token_index``."""
        return ([self.masked] if self.masked is not None else []) + list(self.blocks)


# A batch the language model reads image and text of as one sequence.
EarlyFusionBatch = EarlyBatch | PackedBatch | VisionPackedBatch


@struct.dataclass
class LateFusionBatch:
    """The late-fusion baseline's side: each item's ``text`` and ``image`` parts as two model
    batches of the same rows, and ``has_text``/``has_image [B]`` (1.0 where the part exists).
    A part no row has is None (``jfe_jax.data.late_fusion.late_collate``)."""

    text: EarlyFusionBatch | None
    image: EarlyFusionBatch | None
    has_text: Array
    has_image: Array

    @property
    def num_items(self) -> int:
        return self.has_text.shape[0]

    def parts(self) -> list[tuple[EarlyFusionBatch, Array]]:
        """The parts the batch holds, each with its presence mask: (text, has_text) and
        (image, has_image), without a part that is None."""
        pairs = ((self.text, self.has_text), (self.image, self.has_image))
        return [(part, present) for part, present in pairs if part is not None]


ModelBatch = EarlyBatch | PackedBatch | VisionPackedBatch | LateFusionBatch
SIDES = ("query", "candidate", "hard_negative")


@struct.dataclass
class TrainBatch:
    """One contrastive step: ``query`` and ``candidate`` (row i of each a positive pair), the
    optional ``hard_negative`` side (B*H items), and int32 keys identifying duplicates:
    ``query_key``, ``candidate_key [B]``, ``hard_negative_key [B, H]``; the data pipeline's
    ``hard_negative_count`` (real ones among H) and ``skipped_records [B]``."""

    query: ModelBatch
    candidate: ModelBatch
    query_key: Array = None
    candidate_key: Array = None
    hard_negative: ModelBatch | None = None
    hard_negative_key: Array = None
    hard_negative_count: Array = None
    skipped_records: Array = None

    def named_sides(self) -> dict[str, ModelBatch]:
        """The model batches by name: query, candidate and (if any) hard_negative."""
        return {name: getattr(self, name) for name in SIDES if getattr(self, name) is not None}

    def sides(self) -> list[ModelBatch]:
        """The model batches in that order."""
        return list(self.named_sides().values())


def text_rows(batch: ModelBatch) -> EarlyBatch | PackedBatch:
    """The part of an early-fusion batch that runs through the language model: the batch
    itself, or a vision-packed batch's text rows."""
    return batch.rows if isinstance(batch, VisionPackedBatch) else batch


def is_packed(batch: ModelBatch) -> bool:
    """Whether an early-fusion batch holds several items per row."""
    return isinstance(text_rows(batch), PackedBatch)


def _model_batch(value: Mapping[str, Any]) -> ModelBatch:
    if isinstance(value, (EarlyBatch, VisionPackedBatch, LateFusionBatch)):
        return value
    keys = set(value)
    if "has_text" in keys:
        return LateFusionBatch(
            text=None if value["text"] is None else _model_batch(value["text"]),
            image=None if value["image"] is None else _model_batch(value["image"]),
            has_text=value["has_text"],
            has_image=value["has_image"],
        )
    if "image_token_index" in keys:
        rows = _model_batch(
            {
                k: v
                for k, v in value.items()
                if k not in (*_MASKED_KEYS, "vision_blocks", "image_token_index")
            }
        )
        masked = None
        if "vision_pixel_values" in keys:
            masked = VisionGroup(*(value[k] for k in _MASKED_KEYS))
        blocks = tuple(
            b if isinstance(b, VisionGroup) else VisionGroup(**b)
            for b in value.get("vision_blocks", ())
        )
        return VisionPackedBatch(rows, value["image_token_index"], masked, blocks)
    fields = {k: value[k] for k in keys}
    unknown = sorted(keys - {f.name for f in dataclasses.fields(PackedBatch)})
    if unknown or not {"input_ids", "attention_mask", "position_ids"} <= keys:
        raise ValueError(
            f"no model batch found: keys {sorted(keys)}"
            + (f", of which {unknown} are no batch field" if unknown else "")
            + " (expected input_ids, attention_mask, position_ids and optional pixel, packing "
            "or vision-row keys; or a train batch's query and candidate)"
        )
    if "pool_index" in keys or "segment_ids" in keys:
        if not {"segment_ids", "pool_index"} <= keys:
            raise ValueError("a packed batch needs both segment_ids and pool_index")
        fields.setdefault("item_mask", _ones_like_items(value["pool_index"]))
        return PackedBatch(**fields)
    return EarlyBatch(**fields)


def _ones_like_items(pool_index: Array) -> Array:
    import jax.numpy as jnp
    import numpy as np

    if isinstance(pool_index, np.ndarray):
        return np.ones(pool_index.shape[0], np.int32)
    return jnp.ones(pool_index.shape[0], jnp.int32)


def as_batch(value: ModelBatch | TrainBatch | Mapping[str, Any]) -> ModelBatch | TrainBatch:
    """A typed batch from a typed batch (returned as is) or the dict layout it replaced: a
    model batch (early, packed, vision-packed, late fusion) or a train batch (``query``,
    ``candidate``, ...). Raises ValueError naming the keys when it is neither.

    For the boundaries where a user hands a dict (``padding_report``, tests, notebooks); the
    library itself passes typed batches and never calls this."""
    if isinstance(value, (TrainBatch, EarlyBatch, VisionPackedBatch, LateFusionBatch)):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a batch (a typed batch or a dict), got {type(value).__name__}")
    if "query" in value:
        fields = dict(value)
        unknown = set(fields) - {f.name for f in dataclasses.fields(TrainBatch)}
        if unknown:
            raise ValueError(f"unknown train batch keys {sorted(unknown)}")
        for name in SIDES:
            if fields.get(name) is not None:
                fields[name] = _model_batch(fields[name])
        return TrainBatch(**fields)
    return _model_batch(value)
