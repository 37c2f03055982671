"""Items (text, image, or both, with an optional instruction) -> embeddings, on every device.

``ItemEmbedder`` tokenizes and preprocesses items the same way training did, pads batches to
static shapes (fixed rows, length buckets, a patch budget) and runs the encoder data-parallel
over this host's devices. Each host embeds on its own devices, so exports and evaluations
need no cross-host communication.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jfe_jax.data.collate import DEFAULT_LENGTH_BUCKETS, collate, collate_packed
from jfe_jax.data.image_processor import ImageProcessor
from jfe_jax.data.late_fusion import FUSIONS, LateItem, late_collate, split_item
from jfe_jax.data.processing import DEFAULT_EMBED_PROMPT, ProcessedItem, encode_item
from jfe_jax.data.tokenizer import load_tokenizer
from jfe_jax.encoder import Encoder
from jfe_jax.models.fingerprint import hash_json
from jfe_jax.models.packing import pack_vision
from jfe_jax.paths import absolute


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

    Args:
      encoder: the model.
      tokenizer: a tokenizer or its directory; default: the one next to the encoder.
      image_processor: default: Qwen2-VL's with ``max_pixels``/``min_pixels``.
      prompt: the embedding prompt after each item (the one used in training).
      batch_size: rows per call, rounded up to a multiple of the local device count.
      length_buckets, patch_budget: static shapes (longer items raise; nothing is cut).
      image_root: directory image paths are relative to (and must stay inside).
      pack: lay several items end to end in each row (``jfe_jax.models.packing``): same
        embeddings, less padding. Rows are the fewest that fit, rounded up to the local device
        count times a power of two (a few compiled shapes per length bucket); each row keeps
        ``patch_budget`` patches, shared by its items' images. Early fusion only.
      pack_vision: run the vision tower on the batch's images laid densely into their own
        rows (``jfe_jax.models.packing.pack_vision``; row count coarse, then a multiple of the
        local device count) instead of on every row's patch budget: same embeddings, less
        vision work when many items have no or small images. Early fusion only; combines
        with ``pack``.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        tokenizer: Any = None,
        image_processor: ImageProcessor | None = None,
        prompt: str = DEFAULT_EMBED_PROMPT,
        batch_size: int = 32,
        length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
        patch_budget: int | None = None,
        max_pixels: int = 112 * 112,
        min_pixels: int = 56 * 56,
        image_root: str | None = None,
        fusion: str = "early",
        pack: bool = False,
        pack_vision: bool = False,
    ):
        if fusion not in FUSIONS:
            raise ValueError(f"fusion {fusion!r} is unknown, expected one of {FUSIONS}")
        if pack and fusion != "early":
            raise ValueError(f"pack=True packs early-fusion items; fusion is {fusion!r}")
        if pack_vision and fusion != "early":
            raise ValueError(f"pack_vision=True packs early-fusion images; fusion is {fusion!r}")
        self.pack = pack
        self.pack_vision = pack_vision
        self.fusion = fusion
        self.encoder = encoder
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer or find_tokenizer(encoder))
        self.tokenizer = tokenizer
        vision = encoder.config.vision
        self.image_processor = image_processor or ImageProcessor(
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
        )
        self.prompt = prompt
        self.length_buckets = tuple(length_buckets)
        side = self.image_processor.max_pixels // (vision.patch_size**2)
        self.patch_budget = patch_budget or max(16, -(-side // 16) * 16)
        self.image_root = absolute(image_root)
        devices = jax.local_devices()
        self._num_devices = len(devices)
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        # Packed row counts: devices x 1, 2, 4, ... up to one row per item.
        self._row_buckets = sorted(
            {min(len(devices) << k, self.batch_size) for k in range(self.batch_size.bit_length())}
        )
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        self._rows = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())
        self._params = jax.device_put(encoder.params, replicated)
        module = encoder.module
        self._embed = jax.jit(
            lambda params, batch: module.apply({"params": params}, batch)[0],
            out_shardings=replicated,
        )
        pad_id = tokenizer.pad_token_id
        self.pad_token_id = pad_id if pad_id is not None else 0

    @property
    def dim(self) -> int:
        return self.encoder.options.projection_dim or self.encoder.config.text.hidden_size

    @functools.cached_property
    def item_format(self) -> dict[str, Any]:
        """What the encoder is fed for an item, besides the item: prompt, static shapes, image
        preprocessing, fusion and the tokenizer's hash. Embeddings made under another item
        format are not interchangeable. ``pack``/``pack_vision`` give the same embeddings,
        so they are left out."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        vocab = (
            backend.to_str() if backend is not None else sorted(self.tokenizer.get_vocab().items())
        )
        return {
            "prompt": self.prompt,
            "length_buckets": list(self.length_buckets),
            "patch_budget": self.patch_budget,
            "image_processor": dataclasses.asdict(self.image_processor),
            "fusion": self.fusion,
            "tokenizer": hash_json(vocab),
        }

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
            max_length=max(self.length_buckets),
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
    """An ``ItemEmbedder`` with the settings a model was trained with.

    For a ``jfe train`` workdir, the prompt, length buckets, patch budget, image pixel limits
    and fusion come from its config.json; for a Hugging Face directory the defaults apply.
    ``overrides`` (e.g. ``batch_size``, ``image_root``) win.
    """
    encoder = model if isinstance(model, Encoder) else Encoder.from_pretrained(model)
    settings: dict[str, Any] = {}
    config_path = os.path.join(encoder.source_dir or "", "config.json")
    if encoder.step is not None and os.path.isfile(config_path):
        import json

        with open(config_path, encoding="utf-8") as f:
            run = json.load(f)
        d = run["data"]
        settings = dict(
            prompt=d["prompt"],
            length_buckets=tuple(d["length_buckets"]),
            patch_budget=max(d["query_patch_budget"], d["candidate_patch_budget"]) or None,
            max_pixels=d["image_max_pixels"],
            min_pixels=d["image_min_pixels"],
            fusion=run["model"].get("fusion", "early"),
        )
    settings.update(overrides)
    return ItemEmbedder(encoder, **settings)
