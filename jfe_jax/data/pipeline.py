"""grain pipelines for contrastive training: records -> static-shape per-host batches.

A loader (``jfe_jax.data.loader.make_train_loader``) reads a random-access source
(``tfds_builders.load_source``), keeps this host's shard, shuffles with a seed, and turns
records into batches with a ``ContrastiveBatcher``'s three grain operations:
encode each record (``ContrastiveBatcher.encode``), drop the records that failed when
``skip_bad_records`` is on, and collate ``global_batch_size // shard_count`` of them.

The batch is a ``TrainBatch`` (``jfe_jax.models.batches``; B = per-host batch size,
H = ``num_hard_negatives``)::

    query              model batch (an EarlyBatch, see jfe_jax.data.collate): input_ids,
                       attention_mask [B, L], position_ids [B, 3, L], and with a patch budget
                       pixel_values [B, P, D], patch_segment_ids [B, P], patch_positions [B, P, 2]
    candidate          model batch, B rows; row i is query i's positive
    hard_negative      model batch, B * H rows, query-major (row i * H + h); only H > 0
    query_key          int32 [B]     31-bit hash of the qid (pairs: of the query text)
    candidate_key      int32 [B]     31-bit hash of the did (pairs: of the text or image bytes)
    hard_negative_key  int32 [B, H]  the same hash of each hard negative
    hard_negative_count int32 [B]    real hard negatives of the row (the rest are fillers)
    skipped_records    int32 [B]     bad records skipped, in this row's worker, since the
                                     previous kept row; summed over batches = records skipped

Equal keys mark the same query or candidate, so the loss can mask false negatives
(``contrastive_loss(query_ids=, cand_ids=, hard_negative_ids=)``). A query with fewer than H
hard negatives repeats its own; one with none uses its positive, whose key equals its
candidate_key, so the loss masks it for that query.

Static shapes: L is the smallest of ``length_buckets`` that fits the longest row of a side,
P the side's patch budget, so jit compiles at most len(length_buckets) programs per side.

Packed (``ItemFormat.pack``, early fusion only): each side is instead a ``PackedBatch``
(``jfe_jax.data.collate.collate_packed``) of one static shape: ``ceil(items /
pack_items_per_row)`` rows rounded up to ``row_multiple``, of ``pack_length`` tokens
(default the largest length bucket) and ``pack_items_per_row`` times the side's patch budget,
with ``segment_ids``, ``pool_index [N, 2]`` (host-local rows) and ``item_mask [N]``, N being
exactly the side's items (B, or B * H), so the model returns one embedding per item in the
order above. Items that do not fit in those rows raise; nothing is cut. With
``chunk_items`` (the gradient cache's chunk on this host) a side of N items is packed in
N / chunk_items chunks (``pack_items(chunks=)``: chunk k's items k, k + C, ... in rows k,
k + C, ...; rows rounded up to ``row_multiple`` times the chunks), so the cache's
strided chunks hold whole packed rows, split evenly over the shards.

Vision-packed (``pack_vision=True``, early fusion only; with or without ``pack``): a side's
images leave its text rows' patch budgets for vision rows of their own
(``jfe_jax.models.packing.pack_vision``), a ``VisionPackedBatch``: its ``masked`` vision rows
``[V, P, D]`` hold them densely, P being the side's patch budget per item, its text ``rows``
have no pixels, and ``image_token_index [R, P_row / 4]`` maps each text row's image tokens to
the tower's outputs. Images whose patch count is in ``pack_vision_blocks`` get per-image
``blocks`` instead. V (and each block
group's rows) is as many rows as the images need, rounded by ``coarse_row_count`` and to
``row_multiple``: a few shapes, as with the length buckets. A side without images has no
pixels at all. With ``pack_vision_row_fraction`` > 0, V is fixed instead (that fraction of
the side's items, rounded up to ``row_multiple``, empty rows included): one shape, the
same on every host, which is what training on several hosts needs.

What the kinds read: "mbeir" (``MbeirTrainPairs``): query = instruction + query text/image,
candidate = positive, hard negatives = ``negative_*``; "text_triples": query = sentence,
candidate = positive, hard negative = hard_negative (H <= 1); "image_captions": query =
caption (text only), candidate = image (H = 0). Only "mbeir" gets an instruction (stage 2);
stage-1 pairs get none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain.python as grain
import numpy as np
from PIL import Image
from transformers import PreTrainedTokenizerBase

from jfe_jax.data.batch_layout import BatchLayout
from jfe_jax.data.collate import collate_side
from jfe_jax.data.example_cache import CachedEncode
from jfe_jax.data.image_processor import ImageProcessor, decode_opened, open_image
from jfe_jax.data.item_format import ItemFormat
from jfe_jax.data.late_fusion import LateItem, split_item
from jfe_jax.data.mbeir import TASK_MODALITIES, Instructions, instruction_index
from jfe_jax.data.processing import ProcessedItem, encode_item
from jfe_jax.models.batches import ModelBatch, TrainBatch
from jfe_jax.models.config import ModelConfig
from jfe_jax.train import config_base

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("mbeir", "text_triples", "image_captions")
MAX_HARD_NEGATIVES = {"text_triples": 1, "image_captions": 0}


def stable_key(value: str | bytes) -> int:
    """A 31-bit hash that is the same in every process and run (Python's hash() is not)."""
    data = value.encode() if isinstance(value, str) else value
    return int.from_bytes(hashlib.sha256(data).digest()[:4], "big") & 0x7FFFFFFF


def _str(value: Any) -> str:
    """A text field as str (TFDS sources return bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_image(data: bytes, max_image_pixels: int, name: str) -> Image.Image:
    """Encoded image bytes -> PIL image with EXIF orientation applied; ValueError naming
    ``name`` for corrupt data or an image over ``max_image_pixels`` (checked before decoding)."""
    image = open_image(io.BytesIO(data), max_image_pixels=max_image_pixels, name=name)
    return decode_opened(image, name)


@dataclasses.dataclass(frozen=True)
class _Side:
    """One item of a record, still raw."""

    text: str | None
    image: bytes | None
    key: str
    image_path: str = ""  # the image file, relative to the data root, for error messages


def _text_side(record: Mapping[str, Any], field: str) -> _Side:
    text = _str(record[field])
    return _Side(text, None, "text:" + text)


@dataclasses.dataclass
class EncodedExample:
    """One record's processed items, before batching."""

    query: ProcessedItem
    candidate: ProcessedItem
    hard_negatives: list[ProcessedItem]  # exactly num_hard_negatives, fillers included
    query_key: int
    candidate_key: int
    hard_negative_keys: list[int]
    hard_negative_count: int  # real ones among hard_negatives
    skipped_before: int = 0  # bad records skipped (this process) since the previous example


class ContrastiveBatcher:
    """Record -> ``EncodedExample`` (``encode``), examples -> ``TrainBatch`` (``collate``).

    Args:
      tokenizer, model_config: as for ``encode_item`` and ``collate``.
      item_format: what an item becomes (prompt, length buckets, max length, truncation,
        patch budgets, image preprocessing, fusion); the kind decides which sides use the
        budgets: "mbeir" both, "image_captions" the candidates', "text_triples" none.
      layout: how a side's items become rows (``BatchLayout``: packing, vision packing).
      kind: "mbeir", "text_triples" or "image_captions" (module docstring).
      instructions: for "mbeir", an ``Instructions`` table to use instead of the prompts
        stored in each record.
      instruction_mode, instruction_seed: which alternative prompt a query gets: "fixed" (the
        first) or "seeded" (``mbeir.instruction_index``): the same for a qid in every epoch.
      num_hard_negatives: H, hard negatives per query.
      skip_bad_records: log and count bad records (see ``encode_or_skip``) instead of raising.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model_config: ModelConfig,
        item_format: ItemFormat,
        layout: BatchLayout,
        *,
        kind: str,
        instructions: Instructions | None = None,
        instruction_mode: str,
        instruction_seed: int,
        num_hard_negatives: int,
        skip_bad_records: bool,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is unknown, expected one of {KINDS}")
        limit = MAX_HARD_NEGATIVES.get(kind)
        if num_hard_negatives < 0 or (limit is not None and num_hard_negatives > limit):
            raise ValueError(
                f"num_hard_negatives={num_hard_negatives} for kind {kind!r}; "
                f"expected 0..{limit if limit is not None else 'N'}"
            )
        layout.check_format(item_format)
        instruction_index("", 1, instruction_mode)  # validates the mode
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.item_format = item_format
        self.layout = layout
        self.image_processor = item_format.image_processor()
        self.kind = kind
        self.instructions = instructions
        self.instruction_mode = instruction_mode
        self.instruction_seed = instruction_seed
        self.num_hard_negatives = num_hard_negatives
        self.skip_bad_records = skip_bad_records
        # Stage-1 queries are texts (captions, sentences); text triples hold no image at all.
        self.query_patch_budget = item_format.query_patch_budget if kind == "mbeir" else 0
        self.candidate_patch_budget = (
            0 if kind == "text_triples" else item_format.candidate_patch_budget
        )
        if kind == "image_captions" and self.candidate_patch_budget <= 0:
            raise ValueError(
                "image_captions candidates are images; candidate_patch_budget must be > 0"
            )
        # Per process: with worker processes each worker counts its own records.
        self.bad_records = 0
        self._pending_skips = 0

    @classmethod
    def from_options(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: ImageProcessor,
        model_config: ModelConfig,
        **options: Any,
    ) -> ContrastiveBatcher:
        """A batcher from flat keywords (tests and benchmarks): ``ItemFormat`` fields (with
        ``image_processor``'s settings), ``BatchLayout`` fields (``pack_row_multiple`` and
        ``pack_chunk_items`` for ``row_multiple`` and ``chunk_items``) and ``__init__``'s.
        Missing format fields take ``ItemFormat``'s defaults, but the patch budgets (0: text
        only); missing others the training config's (``config_base.DEFAULTS``), but
        ``kind`` ("mbeir"), one row shard and no chunks."""
        d = config_base.DEFAULTS.data
        format_names = {f.name for f in dataclasses.fields(ItemFormat)}
        fields = {k: options.pop(k) for k in list(options) if k in format_names}
        fields = {"query_patch_budget": 0, "candidate_patch_budget": 0, **fields}
        item_format = ItemFormat.for_processor(image_processor, **fields)
        renamed = {"pack_row_multiple": "row_multiple", "pack_chunk_items": "chunk_items"}
        layout_names = {f.name for f in dataclasses.fields(BatchLayout)}
        given = {renamed.get(k, k): options.pop(k) for k in list(options) if k in renamed}
        given.update({k: options.pop(k) for k in list(options) if k in layout_names})
        layout = {name: d[name] for name in layout_names if name in d}
        layout = {**layout, "row_multiple": 1, "chunk_items": 0}
        layout.update(given)
        layout["pack_length"] = layout["pack_length"] or item_format.length_buckets[-1]
        init = dict(
            kind="mbeir",
            instruction_mode=d.instruction_mode,
            instruction_seed=config_base.DEFAULTS.seed,
            num_hard_negatives=d.num_hard_negatives,
            skip_bad_records=d.skip_bad_records,
        )
        return cls(
            tokenizer, model_config, item_format, BatchLayout(**layout), **{**init, **options}
        )

    # --- records -> raw sides -----------------------------------------------------------------

    def _record_id(self, record: Mapping[str, Any]) -> str:
        for field in ("example_id", "id", "qid"):
            if field in record:
                return _str(record[field])
        return "<record without id>"

    def instruction(self, record: Mapping[str, Any]) -> str:
        """The instruction of an "mbeir" record's query (deterministic; see class args)."""
        qid = _str(record["qid"])
        if self.instructions is not None:
            cand_modality = TASK_MODALITIES[int(record["task_id"])][1]
            prompts = self.instructions.prompts_for(
                int(record["dataset_id"]), _str(record["query_modality"]), cand_modality
            )
        else:
            prompts = [_str(p) for p in record["instructions"]]
            if not prompts:
                raise ValueError(f"query {qid} has no stored instructions; pass instructions=")
        return prompts[
            instruction_index(qid, len(prompts), self.instruction_mode, self.instruction_seed)
        ]

    def _sides(self, record: Mapping[str, Any]) -> tuple[_Side, _Side, list[_Side]]:
        """(query, positive, hard negatives) of a record, before any decoding."""
        if self.kind == "text_triples":
            sentence, positive, negative = (
                _text_side(record, f) for f in ("sentence", "positive", "hard_negative")
            )
            return sentence, positive, [negative]
        if self.kind == "image_captions":
            image = bytes(record["image"])
            image_key = "image:" + hashlib.sha256(image).hexdigest()
            path = _str(record.get("image_path", ""))
            return _text_side(record, "caption"), _Side(None, image, image_key, path), []

        def side(text: Any, image: Any, key: str, path: Any) -> _Side:
            return _Side(_str(text) or None, bytes(image) or None, key, _str(path))

        # Datasets prepared before version 1.1.0 store no negative image paths.
        negative_paths = record.get("negative_image_paths", [b""] * len(record["negative_dids"]))
        negatives = [
            side(record["negative_texts"][i], record["negative_images"][i],
                 "did:" + _str(record["negative_dids"][i]), negative_paths[i])
            for i in range(int(record["num_negatives"]))
        ]  # fmt: skip
        query = side(
            record["query_text"],
            record["query_image"],
            "qid:" + _str(record["qid"]),
            record.get("query_image_path", ""),
        )
        positive = side(
            record["positive_text"],
            record["positive_image"],
            "did:" + _str(record["positive_did"]),
            record.get("positive_image_path", ""),
        )
        return query, positive, negatives

    # --- encoding -----------------------------------------------------------------------------

    def _encode_side(
        self, side: _Side, instruction: str | None, budget: int, what: str
    ) -> ProcessedItem | LateItem:
        image = None
        if side.image is not None:
            name = f"{what} image {side.image_path}" if side.image_path else f"{what} image"
            image = decode_image(side.image, self.image_processor.max_image_pixels, name)

        def encode(*, text, image, instruction):
            return encode_item(
                self.tokenizer,
                self.image_processor,
                text=text,
                image=image,
                instruction=instruction,
                prompt=self.item_format.prompt,
                max_length=self.item_format.max_length,
                truncate_text=self.item_format.truncate_text,
            )

        if self.item_format.fusion == "late":
            return split_item(encode, text=side.text, image=image, instruction=instruction)
        item = encode(text=side.text, image=image, instruction=instruction)
        if item.num_patches > budget:  # (pixel_values would normalise the patches again)
            raise ValueError(
                f"{what} image has {item.num_patches} patches but the patch "
                f"budget is {budget}; raise the budget or lower max_pixels"
            )
        return item

    def check_layout(self, record: Mapping[str, Any]) -> None:
        """ValueError when the settings do not fit the dataset (never a skippable record)."""
        if self.kind == "mbeir" and self.num_hard_negatives > len(record["negative_dids"]):
            raise ValueError(
                f"num_hard_negatives={self.num_hard_negatives} but the dataset stores at most "
                f"{len(record['negative_dids'])} per query (its max_hard_negatives)"
            )

    def encode(self, record: Mapping[str, Any]) -> EncodedExample:
        """Processes one record; ValueError naming the record when anything in it is bad."""
        self.check_layout(record)
        record_id = self._record_id(record)
        if record.get("source"):  # "file:line" of the input record (datasets from 1.1.0 on)
            record_id = f"{record_id} ({_str(record['source'])})"
        try:
            query, positive, negatives = self._sides(record)
            instruction = self.instruction(record) if self.kind == "mbeir" else None
            query_item = self._encode_side(query, instruction, self.query_patch_budget, "query")
            candidate_item = self._encode_side(
                positive, None, self.candidate_patch_budget, "positive"
            )
            negative_items = [
                self._encode_side(n, None, self.candidate_patch_budget, f"hard negative {i}")
                for i, n in enumerate(negatives[: self.num_hard_negatives])
            ]
        except (ValueError, KeyError, IndexError) as error:
            raise ValueError(f"record {record_id}: {error}") from error
        real = len(negative_items)
        keys = [stable_key(n.key) for n in negatives[:real]]
        if real == 0 and self.num_hard_negatives:
            negative_items, keys = [candidate_item], [stable_key(positive.key)]
        # Fill the H slots by cycling the real ones (or the positive).
        fill = range(self.num_hard_negatives)
        return EncodedExample(
            query=query_item,
            candidate=candidate_item,
            hard_negatives=[negative_items[i % len(negative_items)] for i in fill],
            query_key=stable_key(query.key),
            candidate_key=stable_key(positive.key),
            hard_negative_keys=[keys[i % len(keys)] for i in fill],
            hard_negative_count=real,
        )

    def encode_or_skip(self, record: Mapping[str, Any]) -> EncodedExample | None:
        """``encode``, or with skip_bad_records, None for a bad record (logged, counted in
        ``bad_records``, and reported by the next kept example's ``skipped_before``)."""
        self.check_layout(record)
        try:
            example = self.encode(record)
        except ValueError as error:
            if not self.skip_bad_records:
                raise
            self.bad_records += 1
            self._pending_skips += 1
            logger.warning(
                "skipping bad record (%d so far in this process): %s", self.bad_records, error
            )
            return None
        return self.count_skips(example)

    def count_skips(self, example: EncodedExample) -> EncodedExample:
        """A copy of ``example`` reporting the records skipped since the previous one."""
        example = dataclasses.replace(example, skipped_before=self._pending_skips)
        self._pending_skips = 0
        return example

    # --- batching -----------------------------------------------------------------------------

    def _collate(self, items: list, patch_budget: int, side: str) -> ModelBatch:
        return collate_side(
            items,
            config=self.model_config,
            pad_token_id=self.tokenizer.pad_token_id,
            item_format=self.item_format,
            layout=self.layout,
            patch_budget=patch_budget,
            name=side,
        )

    def vision_rows(self, num_items: int) -> int | None:
        """The fixed vision rows of a side of ``num_items`` items (``BatchLayout.vision_rows``)."""
        return self.layout.vision_rows(num_items)

    def collate(self, examples: Sequence[EncodedExample]) -> TrainBatch:
        """Examples -> the train batch of the module docstring."""
        hard_negative = None
        if self.num_hard_negatives:
            hard_negative = self._collate(
                [item for e in examples for item in e.hard_negatives],
                self.candidate_patch_budget,
                "hard_negative",
            )
        return TrainBatch(
            query=self._collate([e.query for e in examples], self.query_patch_budget, "query"),
            candidate=self._collate(
                [e.candidate for e in examples], self.candidate_patch_budget, "candidate"
            ),
            query_key=np.array([e.query_key for e in examples], np.int32),
            candidate_key=np.array([e.candidate_key for e in examples], np.int32),
            hard_negative=hard_negative,
            hard_negative_key=np.array([e.hard_negative_keys for e in examples], np.int32).reshape(
                len(examples), self.num_hard_negatives
            ),
            hard_negative_count=np.array([e.hard_negative_count for e in examples], np.int32),
            skipped_records=np.array([e.skipped_before for e in examples], np.int32),
        )

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> TrainBatch:
        """Encodes and collates records (raises on a bad one): the batch without grain."""
        return self.collate([self.encode(r) for r in records])

    def operations(self, batch_size: int, drop_remainder: bool, cache_bytes: int = 0) -> list[Any]:
        """The grain operations: encode, drop skipped records, batch. With ``cache_bytes``
        the source must be a ``LazyRecords`` and encoded examples are kept in memory
        (``jfe_jax.data.example_cache``)."""
        return [
            CachedEncode(self, cache_bytes) if cache_bytes else _EncodeRecords(self),
            _DropSkipped(),
            grain.Batch(batch_size, drop_remainder=drop_remainder, batch_fn=self.collate),
        ]


class _EncodeRecords(grain.MapTransform):
    def __init__(self, batcher: ContrastiveBatcher):
        self.batcher = batcher

    def map(self, element: Mapping[str, Any]) -> EncodedExample | None:
        return self.batcher.encode_or_skip(element)


class _DropSkipped(grain.FilterTransform):
    def filter(self, element: Any) -> bool:
        return element is not None
