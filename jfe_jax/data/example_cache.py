"""Keep encoded training examples in memory across epochs (``data.cache_examples_mb``).

Encoding a record (deserialise it, decode and resize its images, tokenize its texts) is
a pure function of the record and the batcher's settings: the instruction a query gets is
fixed per qid, hard negatives are stored in the record. A run that makes many passes over a
small dataset (the demo's stage 2: about 28 epochs) would encode every record again each
epoch; on 2 CPU cores that is most of the host's time per batch. With a cache, the loader's
source yields cheap references (``LazyRecords``) and the encode step (``CachedEncode``) reads
and encodes a record only the first time its index comes up, then keeps the result while
the cache holds less than its byte limit (items hold their images as uint8 patches, so a
448x448 image costs about 0.6 MB of it). Records that arrive after the cache is full are
encoded every time, so memory stays bounded whatever the dataset's size; bad records
(``skip_bad_records``) are never cached, so they are logged and counted on every pass as
without the cache. Batches are the same, array for array, with or without it.

The cache lives in the process that encodes: with ``worker_count`` worker processes each
keeps its own, up to the limit (budget host memory for ``worker_count`` times it). It is
not part of the iterator's state: a resumed run starts with an empty one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain.python as grain
import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RecordRef:
    """Record ``index`` of ``source``, read only when ``load`` is called."""

    source: Any
    index: int

    def load(self) -> Any:
        return self.source[self.index]


class LazyRecords:
    """A random-access source whose items are ``RecordRef``s into ``source``."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> RecordRef:
        return RecordRef(self.source, int(index))

    def __repr__(self) -> str:
        return f"LazyRecords({self.source!r})"


def example_nbytes(value: Any) -> int:
    """Bytes held by the arrays of an encoded example (dataclasses, lists, arrays).

    Only dataclass fields count, not properties: an item's image is its uint8
    ``ImagePatches`` (``ProcessedItem.patches``), an eighth of the float32 ``pixel_values``
    they stand for (a property, computed when read)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(example_nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return sum(example_nbytes(v) for v in value)
    return 0


class CachedEncode(grain.MapTransform):
    """Grain map: ``RecordRef`` -> encoded example (``batcher.encode_or_skip``), cached.

    Args:
      batcher: a ``ContrastiveBatcher`` (anything with ``encode_or_skip(record)`` and
        ``count_skips(example)``).
      max_bytes: cache limit, counted over the examples' arrays (> 0).
    """

    def __init__(self, batcher: Any, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes}: the cache needs a positive limit")
        self.batcher = batcher
        self.max_bytes = int(max_bytes)
        self._cache: dict[int, Any] = {}
        self.cached_bytes = 0
        self.hits = 0
        self.misses = 0
        self._full = False

    def map(self, element: RecordRef) -> Any:
        cached = self._cache.get(element.index)
        if cached is not None:
            self.hits += 1
            return self.batcher.count_skips(cached)
        self.misses += 1
        example = self.batcher.encode_or_skip(element.load())
        if example is None or self._full:
            return example
        size = example_nbytes(example)
        if self.cached_bytes + size > self.max_bytes:
            self._full = True
            logger.info(
                "example cache full at %d examples (%.1f MiB of %.1f MiB): later records are "
                "encoded on every pass",
                len(self._cache),
                self.cached_bytes / 2**20,
                self.max_bytes / 2**20,
            )
            return example
        # Stored with skipped_before=0; count_skips gives each use its own copy.
        self._cache[element.index] = dataclasses.replace(example, skipped_before=0)
        self.cached_bytes += size
        return example
