"""Items (text, image, or both, with an optional instruction) -> embeddings, on every device.

``ItemEmbedder`` tokenizes and preprocesses items the same way training did, pads batches to
static shapes (fixed rows, length buckets, a patch budget) and runs the encoder data-parallel
over this host's devices (or, for an encoder loaded on a mesh, with its params in their
FSDP/tensor shards). Each host embeds on its own devices, so exports and evaluations need no
cross-host communication.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jfe_jax.data.collate import collate, collate_packed
from jfe_jax.data.item_format import ItemFormat
from jfe_jax.data.late_fusion import LateItem, late_collate, split_item
from jfe_jax.data.processing import ProcessedItem, encode_item
from jfe_jax.data.tokenizer import load_tokenizer
from jfe_jax.encoder import Encoder
from jfe_jax.models.axes import LOGICAL_RULES
from jfe_jax.models.fingerprint import hash_json
from jfe_jax.models.packing import pack_vision
from jfe_jax.paths import absolute
from jfe_jax.train import mesh as mesh_lib

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
    for path in (source, os.path.join(source, "tokenizer")):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return path
    raise ValueError(
        f"no tokenizer.json in {source!r} or its tokenizer/ folder; pass tokenizer= explicitly"
    )


class ItemEmbedder:
    """Embeds ``Item``s with an ``Encoder``, ``batch_size`` rows at a time on all local devices.

    Build one with ``embedder_for(model)``: it reads the model's item format. Direct
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
        local device count) instead of on every row's patch budget: same embeddings, less
        vision work when many items have no or small images. Early fusion only; combines
        with ``pack``.
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
        pack_vision: bool = False,
        **fields: Any,
    ):
        vision = encoder.config.vision
        if "patch_budget" in fields:
            budget = fields.pop("patch_budget") or 0
            fields.update(query_patch_budget=budget, candidate_patch_budget=budget)
        if item_format is None:
            item_format = ItemFormat.for_vision(vision, **fields)
        elif fields:
            item_format = dataclasses.replace(item_format, **fields)
        item_format.check_vision(vision)
        if pack_vision and item_format.fusion != "early":
            raise ValueError(
                f"pack_vision=True packs early-fusion images; fusion is {item_format.fusion!r}"
            )
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

    def _collate(self, items: list[ProcessedItem], patch_budget: int) -> dict[str, np.ndarray]:
        return collate(
            items,
            config=self.encoder.config,
            pad_token_id=self.pad_token_id,
            length_buckets=self.length_buckets,
            patch_budget=patch_budget,
        )

    def embed_processed(self, items: Sequence[ProcessedItem | LateItem]) -> np.ndarray:
        """Embeddings ``[len(items), D]`` of at most ``batch_size`` processed items."""
        if not 0 < len(items) <= self.batch_size:
            raise ValueError(f"expected 1..{self.batch_size} items, got {len(items)}")
        if self.pack:
            # Item slots pad to batch_size (item_mask 0), so the output shape is static too.
            batch = collate_packed(
                list(items),
                config=self.encoder.config,
                pad_token_id=self.pad_token_id,
                length_buckets=self.length_buckets,
                patch_budget=self.patch_budget,
                num_rows=self._row_buckets,
                num_items=self.batch_size,
            )
            return self._run(batch)[: len(items)]
        # Pad with copies of the first item: static shapes, rows dropped afterwards.
        padded = list(items) + [items[0]] * (self.batch_size - len(items))
        if self.fusion == "late":
            batch = late_collate(padded, self._collate, self.patch_budget)
        else:
            batch = self._collate(padded, self.patch_budget)
        return self._run(batch)[: len(items)]

    def _run(self, batch: dict[str, Any]) -> np.ndarray:
        if self.pack_vision:
            batch = pack_vision(batch, coarse=True, row_multiple=self._num_devices)
        batch = jax.device_put(batch, self._rows)
        if self.encoder.mesh is None:  # replicated params over a plain ("data",) mesh
            return np.asarray(self._embed(self._params, batch))
        # The model's activation constraints, as in training (its mesh has the rules' axes).
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return np.asarray(self._embed(self._params, batch))

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


def embedder_for(model: str | Encoder, **overrides: Any) -> ItemEmbedder:
    """The one way to get an ``ItemEmbedder`` for a model: with the item format it was trained
    with (``ItemFormat.of_model``: its ``jfe_item_format.json``, else a workdir's config.json,
    else its ``preprocessor_config.json``, else Qwen2-VL's defaults), logged in one line.

    ``overrides``: embedder options (``batch_size``, ``image_root``, ``tokenizer``,
    ``pack_vision``) and ``ItemFormat`` fields (e.g. ``prompt``, ``pack``), which win.
    ``mesh`` (with a model path): load the params into their shards over this host's mesh
    (``Encoder.from_pretrained(mesh=)``) instead of a replicated copy on every device.
    """
    mesh = overrides.pop("mesh", None)
    if isinstance(model, Encoder):
        if mesh is not None:
            raise ValueError("mesh= applies to a model path; an Encoder keeps its own mesh")
        encoder = model
    else:
        encoder = Encoder.from_pretrained(model, mesh=mesh)
    if encoder.source_dir:
        item_format, origin = ItemFormat.of_model(encoder.source_dir, encoder.config.vision)
    else:
        item_format, origin = ItemFormat.for_vision(encoder.config.vision), "defaults (no files)"
    changed = sorted(set(overrides) & {f.name for f in dataclasses.fields(ItemFormat)})
    embedder = ItemEmbedder(encoder, item_format, **overrides)
    log.info(
        "item format from %s%s: %s",
        origin,
        f", with {', '.join(changed)} overridden" if changed else "",
        embedder.format.describe(),
    )
    return embedder
