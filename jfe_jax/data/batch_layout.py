"""The batch layout: how processed items become a side's rows (packing, vision packing).

An ``ItemFormat`` (``jfe_jax.data.item_format``) says what one item becomes; a ``BatchLayout``
says how a side's items are laid into rows. Training makes one from its config
(``jfe_jax.train.setup.batch_layout``) for ``ContrastiveBatcher``; ``ItemEmbedder`` makes
its own. Both collate with ``jfe_jax.data.collate.collate_side``. No field changes an
embedding: a layout is never saved with a model. Whether a side is packed at all is the item
format's ``pack`` (declared once, there); the fields below say how.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the item format sits beside this module; only its fields are read
    from jfe_jax.data.item_format import ItemFormat


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How a side's items are laid into rows (the options of ``config.data`` of the same
    names, resolved by ``jfe_jax.train.setup.batch_layout``)."""

    # With the item format's pack: rows per side = ceil(items / this), and each row holds
    # this many items' patch budgets. An embedder, which picks its rows from buckets, keeps 1.
    pack_items_per_row: int
    pack_length: int  # tokens per packed row; 0: the smallest length bucket that fits
    row_multiple: int  # packed rows and vision rows per side round up to a multiple of this
    pack_vision: bool  # images in vision rows of their own (early fusion only)
    pack_vision_blocks: tuple[int, ...]  # image patch counts that get per-image blocks
    # > 0: each side's vision rows fixed at this fraction of its items; 0: as each batch needs
    pack_vision_row_fraction: float
    chunk_items: int  # with pack: pack each side in chunks of this many items; 0: one packing

    def __post_init__(self):
        blocks = tuple(int(p) for p in self.pack_vision_blocks)
        object.__setattr__(self, "pack_vision_blocks", blocks)
        object.__setattr__(self, "pack_vision_row_fraction", float(self.pack_vision_row_fraction))
        if self.row_multiple < 1:
            raise ValueError(f"pack_row_multiple={self.row_multiple} must be >= 1")
        if not 0.0 <= self.pack_vision_row_fraction <= 1.0:
            raise ValueError(
                f"pack_vision_row_fraction={self.pack_vision_row_fraction}: expected 0 (rows as "
                "each batch needs) or a fraction of a side's items in (0, 1]"
            )
        if self.pack_vision_row_fraction and self.pack_vision_blocks:
            raise ValueError(
                f"pack_vision_row_fraction={self.pack_vision_row_fraction} fixes the vision "
                f"rows; per-image blocks (pack_vision_blocks={self.pack_vision_blocks}) would "
                "not keep one shape: use one of the two"
            )
        if self.chunk_items < 0:
            raise ValueError(f"pack_chunk_items must be >= 0, got {self.chunk_items}")

    def check_format(self, item_format: ItemFormat) -> None:
        """ValueError unless this layout can lay out items of ``item_format`` (packed when its
        ``pack`` is set; the format itself refuses pack with late fusion)."""
        if item_format.pack and (self.pack_items_per_row < 1 or self.pack_length < 0):
            raise ValueError(
                f"pack_items_per_row={self.pack_items_per_row} must be >= 1 and "
                f"pack_length={self.pack_length} >= 0"
            )
        if self.pack_vision and item_format.fusion != "early":
            raise ValueError(
                f"pack_vision=True packs early-fusion images only, got "
                f"fusion={item_format.fusion!r}"
            )
        merge = item_format.merge_size**2
        if any(p <= 0 or p % merge for p in self.pack_vision_blocks):
            raise ValueError(
                f"pack_vision_blocks={self.pack_vision_blocks}: each must be a positive "
                f"multiple of merge_size**2 = {merge} (an image's patch count)"
            )
        if item_format.pack and self.pack_length and self.pack_length < item_format.max_length:
            raise ValueError(
                f"pack_length={self.pack_length} is shorter than max_length="
                f"{item_format.max_length}: an item of max_length tokens would not fit in a "
                "packed row"
            )

    def chunks(self, num_items: int) -> int:
        """Gradient-cache chunks a packed side of ``num_items`` items is packed in."""
        if not self.chunk_items:
            return 1
        if num_items % self.chunk_items:
            raise ValueError(
                f"{num_items} items of a side do not split into gradient-cache chunks of "
                f"{self.chunk_items} (pack_chunk_items)"
            )
        return num_items // self.chunk_items

    def packed_rows(self, num_items: int) -> int:
        """Rows of a packed side of ``num_items`` items (the same for every batch)."""
        rows = -(-num_items // self.pack_items_per_row)
        # In chunks: every chunk's rows split evenly over the shards too (the cache's strided
        # chunks then keep every device busy).
        multiple = self.row_multiple * self.chunks(num_items)
        return -(-rows // multiple) * multiple

    def vision_rows(self, num_items: int) -> int | None:
        """The fixed vision rows of a side of ``num_items`` items (pack_vision_row_fraction),
        or None: as many as each batch needs."""
        if not self.pack_vision_row_fraction:
            return None
        rows = max(1, math.ceil(self.pack_vision_row_fraction * num_items))
        return -(-rows // self.row_multiple) * self.row_multiple
