"""Items for the late-fusion baseline: text and image encoded separately, fused at the top.

UniIR's score-fusion (CLIP-SF) embeds an item's text and its image separately and adds the
two embeddings. The baseline here does the same with the JFE tower itself, so both systems
have the same parameters, data and budget and differ only in where the modalities meet:

* the text part is the instruction (queries) and the text, without the image;
* the image part is the image alone;
* the embedding is ``normalize(has_text * e_text + has_image * e_image)``.

A model batch for late fusion is a ``LateFusionBatch`` (``text`` and ``image`` model batches,
``has_text``/``has_image [B]``); ``OneTowerEncoder`` recognises it by its type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jfe_jax.data.processing import ProcessedItem
from jfe_jax.models.batches import LateFusionBatch

FUSIONS = ("early", "late")


@dataclasses.dataclass(frozen=True)
class LateItem:
    """The separately processed parts of one item (at least one is present)."""

    text: ProcessedItem | None
    image: ProcessedItem | None


def split_item(
    encode: Callable[..., ProcessedItem],
    *,
    text: str | None,
    image: Any,
    instruction: str | None,
) -> LateItem:
    """Processes the text part (instruction + text) and the image part of an item apart.

    ``encode(text=..., image=..., instruction=...)`` is the early-fusion item encoder.
    """
    has_text = bool(text and text.strip())
    text_part = None
    if has_text or (instruction and instruction.strip()):
        # An image-only query with an instruction keeps the instruction as its text, as UniIR.
        text_part = encode(
            text=text if has_text else instruction,
            image=None,
            instruction=instruction if has_text else None,
        )
    image_part = encode(text=None, image=image, instruction=None) if image is not None else None
    if text_part is None and image_part is None:
        raise ValueError("item has neither text nor image; expected at least one")
    return LateItem(text_part, image_part)


def late_collate(
    items: Sequence[LateItem], collate: Callable[[list[ProcessedItem], int], Any], budget: int
) -> LateFusionBatch:
    """Collates the text parts and the image parts into two batches plus presence masks.

    A part that no item has is None: the tower does not run on it, so a side of text-only
    queries or an image-only pool costs one pass, not two. A part that only some items lack is
    filled with the item's other part (same shapes for every row) and masked out by
    ``has_text``/``has_image``. Either way the embeddings are the same; the batch's structure
    (which parts it has) then varies with its items as its length bucket does, one compiled
    program per kind, and on several hosts every host's share must have the same parts.
    """
    texts = [it.text if it.text is not None else it.image for it in items]
    images = [it.image if it.image is not None else it.text for it in items]
    any_text = any(it.text is not None for it in items)
    any_image = any(it.image is not None for it in items)
    return LateFusionBatch(
        text=collate(texts, budget) if any_text else None,
        image=collate(images, budget) if any_image else None,
        has_text=np.array([it.text is not None for it in items], np.float32),
        has_image=np.array([it.image is not None for it in items], np.float32),
    )
