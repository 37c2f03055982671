"""Items (text, image, or both, with an optional instruction) -> embeddings, on every device.

``ItemEmbedder`` tokenizes and preprocesses items the same way training did, pads batches to
static shapes (fixed rows, length buckets, a patch budget) and runs the encoder data-parallel
over this host's devices (or, for an encoder loaded on a mesh, with its params in their
FSDP/tensor shards). Each host embeds on its own devices, so exports and evaluations need no
cross-host communication.

``ItemEmbedder.embed_groups`` is the pool-scale path (``jfe export``): items are prepared
(image read, decoded, resized, patchified; text tokenised) by a pool of worker threads while
the device runs the batch before, each window of a group is batched by length (similar token
and patch counts together, so batches pad less), and the rows come back in stream order.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jfe_jax.data.batch_layout import BatchLayout
from jfe_jax.data.collate import collate, collate_side
from jfe_jax.data.item_format import ItemFormat
from jfe_jax.data.late_fusion import LateItem, split_item
from jfe_jax.data.processing import ProcessedItem, encode_item
from jfe_jax.data.tokenizer import load_tokenizer
from jfe_jax.models.axes import LOGICAL_RULES
from jfe_jax.models.batches import EarlyBatch
from jfe_jax.models.fingerprint import hash_json
from jfe_jax.paths import absolute
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.workdir import Workdir

if TYPE_CHECKING:  # the encoder sits above this module (it embeds items with it)
    from jfe_jax.encoder import Encoder

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Item:
    """One thing to embed: a text, an image (path or PIL image), or both."""

    text: str | None = None
    image: Any = None
    instruction: str | None = None


def find_tokenizer(encoder: Encoder) -> str:
    """The tokenizer next to an encoder's weights (HF dir or ``<workdir>/tokenizer``)."""
    source = encoder.source_dir or ""
    for path in (source, Workdir(source).tokenizer):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return path
    raise ValueError(
        f"no tokenizer.json in {source!r} or its tokenizer/ folder; pass tokenizer= explicitly"
    )


class ItemEmbedder:
    """Embeds ``Item``s with an ``Encoder``, ``batch_size`` rows at a time on all local devices.

    Build one with ``jfe_jax.encoder.embedder_for(model)``: it reads the model's item format. Direct
    construction is for tests and for formats made in code.

    Args:
      encoder: the model.
      item_format: prompt, static shapes (length buckets; every row padded to
        ``item_format.patch_budget`` patches, the larger of the query and candidate budgets),
        image preprocessing, fusion and packing; longer items raise unless the format
        truncates text. Default: ``ItemFormat`` with the encoder's patch sizes.
      tokenizer: a tokenizer or its directory; default: the one next to the encoder.
      batch_size: rows per call, rounded up to a multiple of the local device count.
      image_root: directory image paths are relative to (and must stay inside).
        Params: with an encoder loaded on a mesh (``Encoder.from_pretrained(mesh=)``, one
        host's devices) they stay in their shards and rows split over its batch axes
        (``data`` x ``fsdp``), so a model too large for one device embeds; otherwise every
        local device holds a replicated copy and rows split over all of them.
      pack_vision: run the vision tower on the batch's images laid densely into their own
        rows (``jfe_jax.models.packing.pack_vision``; row count coarse, then a multiple of the
        local device count) instead of on every row's patch budget: same embeddings (to float
        rounding; not part of the item format), less vision work when many items have no or
        small images, and none at all for a batch without images. Combines with ``pack``.
        Default (None): on for early fusion; late fusion cannot pack (True raises).
      **fields: ``ItemFormat`` fields that replace the format's (e.g. ``prompt``,
        ``max_pixels``; ``patch_budget`` sets both budgets). ``pack`` lays several items end
        to end in each row (``jfe_jax.models.packing``): same embeddings, less padding. Rows
        are the fewest that fit, rounded up to the local device count times a power of two
        (a few compiled shapes per length bucket); each row keeps ``patch_budget`` patches,
        shared by its items' images. Early fusion only.
    """

    def __init__(
        self,
        encoder: Encoder,
        item_format: ItemFormat | None = None,
        *,
        tokenizer: Any = None,
        batch_size: int = 32,
        image_root: str | None = None,
        pack_vision: bool | None = None,
        **fields: Any,
    ):
        vision = encoder.config.vision
        if "patch_budget" in fields:
            budget = fields.pop("patch_budget") or None  # None or 0: derived from max_pixels
            fields.update(query_patch_budget=budget, candidate_patch_budget=budget)
        if item_format is None:
            item_format = ItemFormat.for_vision(vision, **fields)
        elif fields:
            item_format = dataclasses.replace(item_format, **fields)
        item_format.check_vision(vision)
        if pack_vision is None:
            pack_vision = item_format.fusion == "early"
        self.format = item_format
        self.pack_vision = pack_vision
        self.encoder = encoder
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer or find_tokenizer(encoder))
        self.tokenizer = tokenizer
        self.image_processor = item_format.image_processor()
        self.image_root = absolute(image_root)
        if encoder.mesh is not None:
            # The encoder's params stay in their shards (FSDP / tensor); rows split over the
            # mesh's batch axes, as in training.
            mesh = encoder.mesh
            if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
                raise ValueError(
                    "ItemEmbedder embeds on this host's devices only (each host exports its own "
                    f"shards), but the encoder's mesh {dict(mesh.shape)} spans several "
                    "processes; load the encoder on a mesh of this host's devices "
                    "(jfe_jax.train.mesh.make_mesh(..., devices=jax.local_devices()))"
                )
            shards = mesh_lib.data_parallel_size(mesh)
            self._rows = mesh_lib.batch_sharding(mesh)
            self._params = encoder.params
        else:
            devices = jax.local_devices()
            mesh = jax.sharding.Mesh(np.array(devices), ("data",))
            shards = len(devices)
            self._rows = NamedSharding(mesh, PartitionSpec("data"))
            self._params = jax.device_put(encoder.params, NamedSharding(mesh, PartitionSpec()))
        self.mesh = mesh
        replicated = NamedSharding(mesh, PartitionSpec())
        self._num_devices = shards  # row shards: batch and packed row counts divide by it
        # Packed rows come from _row_buckets, each keeping patch_budget patches; rows of text
        # and vision split over the row shards.
        self.layout = BatchLayout(
            pack_items_per_row=1,
            pack_length=0,
            row_multiple=shards,
            pack_vision=pack_vision,
            pack_vision_blocks=(),
            pack_vision_row_fraction=0.0,
            chunk_items=0,
        )
        self.layout.check_format(item_format)
        self.batch_size = -(-batch_size // shards) * shards
        # Packed row counts: shards x 1, 2, 4, ... up to one row per item.
        self._row_buckets = sorted(
            {min(shards << k, self.batch_size) for k in range(self.batch_size.bit_length())}
        )
        module = encoder.module
        self._embed = jax.jit(
            lambda params, batch: module.apply({"params": params}, batch)[0],
            out_shardings=replicated,
        )
        pad_id = tokenizer.pad_token_id
        self.pad_token_id = pad_id if pad_id is not None else 0

    # The format's settings under the names the rest of the package uses.
    prompt = property(lambda self: self.format.prompt)
    length_buckets = property(lambda self: self.format.length_buckets)
    patch_budget = property(lambda self: self.format.patch_budget)
    fusion = property(lambda self: self.format.fusion)
    pack = property(lambda self: self.format.pack)

    @property
    def dim(self) -> int:
        return self.encoder.options.projection_dim or self.encoder.config.text.hidden_size

    @functools.cached_property
    def item_format(self) -> dict[str, Any]:
        """What the encoder is fed for an item, besides the item: the format's fields that
        change embeddings (``ItemFormat.identity``) and the tokenizer's hash. Embeddings made
        under another item format are not interchangeable. ``pack``/``pack_vision`` give the
        same embeddings, so they are left out."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        vocab = (
            backend.to_str() if backend is not None else sorted(self.tokenizer.get_vocab().items())
        )
        return {**self.format.identity(), "tokenizer": hash_json(vocab)}

    @functools.cached_property
    def item_format_hash(self) -> str:
        """Hex digest of ``item_format``."""
        return hash_json(self.item_format)

    def _encode(self, *, text, image, instruction) -> ProcessedItem:
        return encode_item(
            self.tokenizer,
            self.image_processor,
            text=text,
            image=image,
            instruction=instruction,
            prompt=self.prompt,
            max_length=self.format.max_length,
            truncate_text=self.format.truncate_text,
            image_root=self.image_root,
        )

    def process(self, item: Item) -> ProcessedItem | LateItem:
        if self.fusion == "late":
            return split_item(
                self._encode, text=item.text, image=item.image, instruction=item.instruction
            )
        return self._encode(text=item.text, image=item.image, instruction=item.instruction)

    def _collate(self, items: list[ProcessedItem], patch_budget: int) -> EarlyBatch:
        """An early-fusion batch of ``items`` at this format's length buckets (what
        ``collate_side`` makes of each part of late-fusion items)."""
        return collate(
            items,
            config=self.encoder.config,
            pad_token_id=self.pad_token_id,
            length_buckets=self.length_buckets,
            patch_budget=patch_budget,
        )

    def embed_processed(self, items: Sequence[ProcessedItem | LateItem]) -> np.ndarray:
        """Embeddings ``[len(items), D]`` of at most ``batch_size`` processed items."""
        return self.run_host_batch(self.host_batch(items), len(items))

    def host_batch(self, items: Sequence[ProcessedItem | LateItem]) -> Any:
        """The model batch of at most ``batch_size`` processed items, in host memory: padded
        to this embedder's static shapes (and with ``pack_vision`` its images moved into
        vision rows). ``run_host_batch`` embeds it."""
        if not 0 < len(items) <= self.batch_size:
            raise ValueError(f"expected 1..{self.batch_size} items, got {len(items)}")
        if self.pack:
            # Item slots pad to batch_size (item_mask 0), so the output shape is static too.
            shape = dict(num_rows=self._row_buckets, num_items=self.batch_size)
        else:
            # Pad with copies of the first item: static shapes, rows dropped afterwards.
            items, shape = list(items) + [items[0]] * (self.batch_size - len(items)), {}
        return collate_side(
            items,
            config=self.encoder.config,
            pad_token_id=self.pad_token_id,
            item_format=self.format,
            layout=self.layout,
            patch_budget=self.patch_budget,
            name="batch",
            **shape,
        )

    def run_host_batch(self, batch: Any, num_items: int) -> np.ndarray:
        """Embeddings ``[num_items, D]`` of a ``host_batch`` (its first ``num_items`` rows)."""
        batch = jax.device_put(batch, self._rows)
        if self.encoder.mesh is None:  # replicated params over a plain ("data",) mesh
            return np.asarray(self._embed(self._params, batch))[:num_items]
        # The model's activation constraints, as in training (its mesh has the rules' axes).
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return np.asarray(self._embed(self._params, batch))[:num_items]

    def embed_groups(
        self,
        groups: Iterable[tuple[Any, Sequence[Item]]],
        *,
        workers: int = 0,
        bucket_window: int = 0,
        timing: StreamTiming | None = None,
        on_rows: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[Any, np.ndarray]]:
        """Embeds ``(key, items)`` groups (an export's shards); yields ``(key, [n, D])`` per
        group, in the groups' order, rows in the items' order.

        ``workers`` > 0: that many threads prepare items (``process``) and one more lays them
        into batches, ahead of the device, bounded to the window being batched and the next
        one (at least two batches) plus two ready batches; 0: each batch is prepared in line,
        then run. ``bucket_window`` > 1: each group is cut into windows of that many batches
        whose items are sorted by token count and patch count before they are cut into
        batches (less padding); a window never spans two groups, so a group's embeddings do
        not depend on its neighbours (a resumed export rebuilds a shard bit for bit). 0 or 1:
        batches in stream order. The same settings give the same batches whatever
        ``workers`` is, so the same embeddings bit for bit. An item that fails raises its
        error, the first in stream order. ``timing`` is filled as the stream runs;
        ``on_rows(n)`` is called after each batch.
        """
        if workers < 0:
            raise ValueError(f"workers is {workers}; expected >= 0 (0: prepare items in line)")
        timing = timing if timing is not None else StreamTiming()
        started = time.perf_counter()
        batches = self._batches(groups, workers, bucket_window)
        current, out, filled = None, None, 0  # the group being filled: batches come in order
        try:
            for key, size, positions, batch in _timed(batches, timing):
                start = time.perf_counter()
                rows = self.run_host_batch(batch, len(positions))
                timing.device_s += time.perf_counter() - start
                timing.items += len(positions)
                timing.batches += 1
                if out is None or key != current:
                    current, out, filled = key, np.zeros((size, self.dim), np.float32), 0
                out[positions] = rows
                filled += len(positions)
                if on_rows is not None:
                    on_rows(len(positions))
                if filled == size:
                    timing.wall_s = time.perf_counter() - started
                    yield key, out
                    out = None
        finally:
            batches.close()  # stops the producer thread and the workers
            timing.wall_s = time.perf_counter() - started

    def _batches(
        self, groups: Iterable[tuple[Any, Sequence[Item]]], workers: int, bucket_window: int
    ) -> Iterator[tuple[Any, int, list[int], Any]]:
        """``(key, group size, positions in the group, host batch)``: in line (``workers``
        0), or from a producer thread feeding a bounded queue."""
        window = self.batch_size * max(1, bucket_window)
        if not workers:
            yield from self._plan(groups, _Deferred, window, bucket_window > 1, ahead=0)
            return
        pool = ThreadPoolExecutor(workers, thread_name_prefix="jfe-prepare")
        ready: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(entry: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(entry, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce() -> None:
            try:
                ahead = max(1, -(-2 * self.batch_size // window))
                for entry in self._plan(groups, pool.submit, window, bucket_window > 1, ahead):
                    if not put(entry):
                        return
                put(_END)
            except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread
                put(_Failed(err))

        producer = threading.Thread(target=produce, name="jfe-batcher", daemon=True)
        producer.start()
        try:
            while True:
                entry = ready.get()
                if entry is _END:
                    return
                if isinstance(entry, _Failed):
                    raise entry.error
                yield entry
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            producer.join()

    def _plan(
        self,
        groups: Iterable[tuple[Any, Sequence[Item]]],
        submit: Callable[..., Any],
        window: int,
        bucket: bool,
        ahead: int,
    ) -> Iterator[tuple[Any, int, list[int], Any]]:
        """The batches of each group's windows; ``submit(process, item)`` starts an item's
        preparation, ``ahead`` windows before the one being batched."""
        windows = (
            (
                key,
                len(items),
                start,
                [submit(self.process, item) for item in items[start : start + window]],
            )
            for key, items in ((key, list(items)) for key, items in groups)
            for start in range(0, len(items), window)
        )
        started = collections.deque()
        for entry in windows:
            started.append(entry)
            if len(started) <= ahead:
                continue
            yield from self._window_batches(*started.popleft(), bucket)
        while started:
            yield from self._window_batches(*started.popleft(), bucket)

    def _window_batches(
        self, key: Any, size: int, start: int, futures: list[Any], bucket: bool
    ) -> Iterator[tuple[Any, int, list[int], Any]]:
        items = [future.result() for future in futures]  # the first failure in stream order
        order = list(range(len(items)))
        if bucket:
            order.sort(key=lambda i: _length_key(items[i]))
        for first in range(0, len(order), self.batch_size):
            chosen = order[first : first + self.batch_size]
            batch = self.host_batch([items[i] for i in chosen])
            yield key, size, [start + i for i in chosen], batch

    def embed(self, items: Iterable[Item]) -> np.ndarray:
        """Embeddings ``[n, D]`` (float32, unit norm) of any number of items, in order."""
        out, chunk = [], []
        for item in items:
            chunk.append(self.process(item))
            if len(chunk) == self.batch_size:
                out.append(self.embed_processed(chunk))
                chunk = []
        if chunk:
            out.append(self.embed_processed(chunk))
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(out)


def default_workers() -> int:
    """Item-preparation threads of an export by default: one per CPU core, at most 8."""
    return min(8, os.cpu_count() or 1)


@dataclasses.dataclass
class StreamTiming:
    """Where an ``ItemEmbedder.embed_groups`` run spent its wall time."""

    items: int = 0  # items embedded
    batches: int = 0  # device calls
    wall_s: float = 0.0  # from the first request to the last group's rows
    host_wait_s: float = 0.0  # waiting for the host's next batch: the device idle
    device_s: float = 0.0  # in the device calls (transfer, run, copy back)

    @property
    def host_share(self) -> float:
        """The fraction of the wall time the device waited on the host."""
        return self.host_wait_s / self.wall_s if self.wall_s else 0.0


class _Deferred:
    """A future run when its result is asked for: the in-line path's preparation."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self._call = functools.partial(fn, *args)

    def result(self) -> Any:
        return self._call()


_END = object()  # the producer's last queue entry


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException  # raised by the producer; re-raised by the consumer


def _length_key(item: ProcessedItem | LateItem) -> tuple[int, int]:
    """Sort key of length bucketing: token count, then image patch count."""
    parts = (item.text, item.image) if isinstance(item, LateItem) else (item,)
    parts = [part for part in parts if part is not None]
    tokens = sum(len(part.input_ids) for part in parts)
    patches = sum(part.num_patches for part in parts)
    return tokens, patches


def _timed(batches: Iterator[Any], timing: StreamTiming) -> Iterator[Any]:
    """``batches``, adding the time spent waiting for each to ``timing.host_wait_s``."""
    while True:
        start = time.perf_counter()
        try:
            entry = next(batches)
        except StopIteration:
            return
        finally:
            timing.host_wait_s += time.perf_counter() - start
        yield entry
