"""This host's grain loader (shard, seeded shuffle, transform, fixed per-host batches) and
its resumable position. The transform is usually a ``jfe_jax.data.pipeline.ContrastiveBatcher``,
whose grain operations encode, drop skipped records and collate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain.python as grain
from absl import flags

from jfe_jax.data.example_cache import LazyRecords
from jfe_jax.data.pipeline import ContrastiveBatcher


class _Apply(grain.MapTransform):
    def __init__(self, function: Callable[[Any], Any]):
        self.function = function

    def map(self, element: Any) -> Any:
        return self.function(element)


def _host_share(
    num_records: int,
    global_batch_size: int,
    shard_index: int | None,
    shard_count: int | None,
    drop_remainder: bool,
) -> tuple[grain.ShardOptions, int]:
    """(this host's shard of the records, its per-host batch size), checked: the global batch
    splits evenly over the hosts and, with ``drop_remainder``, a shard holds one batch."""
    if shard_index is None or shard_count is None:
        import jax  # here, so that worker processes need not import it

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple "
            f"of shard_count={shard_count} (each host takes an equal share)"
        )
    batch_size = global_batch_size // shard_count
    shard_options = grain.ShardOptions(shard_index, shard_count, drop_remainder=drop_remainder)
    shard_size = num_records // shard_count
    if drop_remainder and shard_size < batch_size:
        raise ValueError(
            f"each shard holds {shard_size} of {num_records} records, fewer than "
            f"one per-host batch of {batch_size}"
        )
    return shard_options, batch_size


def _operations(
    source: Any,
    transform: ContrastiveBatcher | Callable[[Any], Any],
    batch_size: int,
    drop_remainder: bool,
    cache_bytes: int,
) -> tuple[Any, list]:
    """(the source to read, maybe lazily for the example cache; grain's operations on it)."""
    if cache_bytes < 0:
        raise ValueError(f"cache_bytes={cache_bytes}: expected >= 0 (0: no cache)")
    if hasattr(transform, "operations"):
        operations = transform.operations(batch_size, drop_remainder, cache_bytes)
        if cache_bytes:
            source = LazyRecords(source)
    elif cache_bytes:
        raise ValueError("cache_bytes needs a ContrastiveBatcher transform (it caches encoding)")
    else:
        operations = [_Apply(transform), grain.Batch(batch_size, drop_remainder=drop_remainder)]
    return source, operations


def make_train_loader(
    source: Any,
    *,
    transform: ContrastiveBatcher | Callable[[Any], Any],
    global_batch_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    seed: int = 0,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    drop_remainder: bool = True,
    shuffle: bool = True,
    read_options: grain.ReadOptions | None = None,
    cache_bytes: int = 0,
) -> grain.DataLoader:
    """This host's loader: shard, seeded shuffle, transform, fixed per-host batches.

    Args:
      source: random-access records (``tfds_builders.load_source``; anything with len and
        [i]). It must pickle when worker_count > 0.
      transform: a ``ContrastiveBatcher``, or a function of one record whose outputs are
        stacked by grain's default batching.
      global_batch_size: rows over all hosts; each host gets global_batch_size // shard_count.
      shard_index, shard_count: this host's shard (default jax.process_index() and
        jax.process_count()). Shards are contiguous ranges of the source, which TFDS already
        shuffled at write time.
      seed: shuffling seed (a new order each epoch, the same for every run with this seed).
      num_epochs: passes over the shard; None repeats forever.
      worker_count: worker processes (0: transform in this process).
      drop_remainder: equal shards and no short last batch, which keeps every host stepping
        together and shapes static; False (to see every record once) gives uneven shards.
      cache_bytes: with a ``ContrastiveBatcher``, keep up to this many bytes of encoded
        examples in memory across epochs (``jfe_jax.data.example_cache``); 0: none.

    The iterator's state (``iterator_state``/``restore_iterator``, or Orbax with
    ``grain.PyGrainCheckpointSave(it)``/``PyGrainCheckpointRestore(it)``) resumes at the next
    batch; restore with the same source, seed, shards, batch size and worker_count.
    """
    shard_options, batch_size = _host_share(
        len(source), global_batch_size, shard_index, shard_count, drop_remainder
    )
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain 0.2.18 reads an absl flag in its workers and fails when flags were never
        # parsed (scripts and notebooks without absl.app; google/grain#1355): use defaults.
        flags.FLAGS.mark_as_parsed()
    source, operations = _operations(source, transform, batch_size, drop_remainder, cache_bytes)
    sampler = grain.IndexSampler(
        len(source), shard_options=shard_options, shuffle=shuffle, num_epochs=num_epochs, seed=seed
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard_options,
        read_options=read_options,
    )


def iterator_state(iterator: grain.PyGrainDatasetIterator) -> bytes:
    """The position of a loader's iterator, as JSON bytes (small; save it with the model)."""
    return iterator.get_state()


def restore_iterator(loader: grain.DataLoader, state: bytes) -> grain.PyGrainDatasetIterator:
    """A new iterator over ``loader`` that continues right after the batch ``state`` was
    taken at."""
    iterator = iter(loader)
    iterator.set_state(state)
    return iterator
