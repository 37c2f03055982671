"""TFDS builders for the contrastive training data, written and read without TensorFlow.

Two builders, both array_record only (TFDS needs TensorFlow for tfrecord and for decoding
numpy image features, so images are stored as their encoded file bytes):

``MbeirTrainPairs``: one example per (query, positive candidate) of an M-BEIR query split,
with up to ``max_hard_negatives`` hard negatives from the query's ``neg_cand_list``. Fields
(text fields are ``""`` and image fields ``b""`` when absent)::

    example_id         str    "<qid>|<did>|<n>", n counting repeats (union_up_train repeats
                              queries to upsample small tasks)
    source             str    "<query file>:<line>", relative to the root
    qid                str    "<dataset_id>:<n>"
    query_text         str
    query_image        bytes  the encoded image file (PNG/JPEG/...), read from the root
    query_image_path   str    relative to the M-BEIR root
    query_modality     str    "text" | "image" | "image,text"
    task_id            int32
    dataset_id         int32
    instructions       [str]  every alternative prompt of the query's instruction key
                              (dataset id, query modality, candidate modality), in TSV column
                              order; the pipeline picks one deterministically (see
                              jfe_jax.data.mbeir.instruction_index)
    positive_did / positive_text / positive_image / positive_image_path / positive_modality
    num_negatives      int32  how many of the N slots below are filled (N = max_hard_negatives)
    negative_dids / negative_texts / negative_images / negative_image_paths /
    negative_modalities   [N], padded

``PairData``: stage-1 pairs, one config per kind. jsonl input, one object per line (the
synthetic generator writes these; real NLI / caption data must be converted to it)::

    text_triples    {"id": str, "sentence": str, "positive": str, "hard_negative": str}
    image_captions  {"id": str, "image_path": str (relative to the root), "caption": str}

and examples with the same fields, plus ``source`` ("pairs/<kind>.jsonl:<line>") and, for
image_captions, ``image`` (bytes).

Where the input is: the builder config's root (``mbeir_root`` / ``root``), or else TFDS's
``manual_dir`` (``download_config=tfds.download.DownloadConfig(manual_dir=ROOT)``, which is
what ``build_dataset(..., manual_dir=ROOT)`` passes).

Bad input records (malformed JSON, a positive or negative missing from the pool, an empty
text, a bad image) fail the build with one ValueError naming the file and line of each of the
first few and how many there are; with ``skip_bad_records=True`` they are logged, skipped and
counted in ``builder.info.metadata["skipped_records"]`` ({reason or file: count}), those with a
bad image also in ``metadata["skipped_bad_images"]``. An image is bad when it is missing, when
its header is unreadable or claims more than ``max_image_pixels`` pixels (the
``ImageProcessor`` decompression-bomb cap, checked before any pixel is decoded), and, with
``verify_images="full"``, when its data does not decode (a truncated file).

``build_dataset`` reuses a prepared dataset only while its sources are unchanged (settings,
input files, every image read: see ``jfe_jax.data.prepared_sources``), else rebuilds it, and
lets one process prepare at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jfe_jax.data.builder_base import (  # noqa: F401  (re-exported)
    MAX_BAD_RECORDS,
    NAMED_BAD_RECORDS,
    VERIFY_IMAGES,
    BadImageError,
    _bytes,
    _check_settings,
    _NoTensorFlowBuilder,
    _padded,
    _quiet,
    _text,
)
from jfe_jax.data.image_processor import DEFAULT_MAX_IMAGE_PIXELS
from jfe_jax.data.mbeir import (
    INSTRUCTIONS_FILE,
    MBEIR,
    TASK_MODALITIES,
    Candidate,
    Query,
    parse_task_name,
)
from jfe_jax.data.prepare import (  # noqa: F401  (re-exported: the builders' entry points)
    PrepareTimeoutError,
    build_dataset,
    load_source,
)
from jfe_jax.data.prepared_sources import file_signature
from jfe_jax.data.synthetic.pairs import IMAGE_CAPTIONS_FILE, TEXT_TRIPLES_FILE

logger = logging.getLogger(__name__)

PAIR_KINDS: dict[str, str] = {
    "text_triples": TEXT_TRIPLES_FILE,
    "image_captions": IMAGE_CAPTIONS_FILE,
}


# ---------------------------------------------------------------------------------------------
# M-BEIR training pairs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class MbeirTrainConfig(tfds.core.BuilderConfig):
    """Which M-BEIR queries to turn into training pairs. An empty name is derived."""

    name: str = ""
    mbeir_root: str | None = None  # the M-BEIR root; None: TFDS's manual_dir
    query_split: str = "union_train"  # a folder under query/
    task: str | None = None  # one task ("mscoco_task0"); None: every query file of the split
    pool: str | None = None  # pool jsonl (relative to the root); None: the split's union pool
    max_hard_negatives: int = 4  # N, the fixed length of the negative_* fields
    skip_bad_records: bool = False  # log and count bad records instead of raising
    verify_images: str = "header"  # header | full | none (see VERIFY_IMAGES)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # the ImageProcessor's cap

    def __post_init__(self):
        if self.max_hard_negatives < 0:
            raise ValueError(f"max_hard_negatives is {self.max_hard_negatives}; expected >= 0")
        _check_settings(self.verify_images, self.max_image_pixels)
        if self.task is not None:
            parse_task_name(self.task)
        if not self.name:
            self.name = f"{self.task or self.query_split}_neg{self.max_hard_negatives}"


class MbeirTrainPairs(_NoTensorFlowBuilder):
    """M-BEIR (query, positive, hard negatives) examples; fields in the module docstring."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First version.",
        "1.1.0": "source and negative_image_paths fields; images checked when built.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Set MbeirTrainConfig.mbeir_root, or pass manual_dir=<the M-BEIR root> (the folder "
        "holding query/, cand_pool/, instructions/ and mbeir_images/)."
    )
    CONFIG_CLASS = MbeirTrainConfig
    ROOT_FIELD = "mbeir_root"
    IMAGE_FIELDS = ("query_image", "positive_image")
    IMAGE_LIST_FIELDS = ("negative_images",)

    def _info(self) -> tfds.core.DatasetInfo:
        n = self.builder_config.max_hard_negatives
        item = {
            "did": _text(),
            "text": _text(),
            "image": _bytes(),
            "image_path": _text(),
            "modality": _text(),
        }
        return self._info_with(
            {
                "example_id": _text(),
                "source": _text(),
                "qid": _text(),
                "query_text": _text(),
                "query_image": _bytes(),
                "query_image_path": _text(),
                "query_modality": _text(),
                "task_id": tfds.features.Scalar(dtype=np.int32),
                "dataset_id": tfds.features.Scalar(dtype=np.int32),
                "instructions": tfds.features.Sequence(_text()),
                **{f"positive_{k}": v for k, v in item.items()},
                "num_negatives": tfds.features.Scalar(dtype=np.int32),
                "negative_dids": _bytes((n,)),
                "negative_texts": _bytes((n,)),
                "negative_images": _bytes((n,)),
                "negative_image_paths": _bytes((n,)),
                "negative_modalities": _bytes((n,)),
            }
        )

    def _pool_path(self, reader: MBEIR) -> Path:
        config = self.builder_config
        pool_split = "val" if "val" in config.query_split else "train"
        return reader.root / config.pool if config.pool else reader.global_pool_path(pool_split)

    def input_files(self, root: Path) -> list[Path]:
        config = self.builder_config
        reader = MBEIR(root)
        if config.task is None:
            queries = reader.query_files(config.query_split)
        else:
            queries = [reader.query_path(config.query_split, config.task)]
        return [*queries, self._pool_path(reader), reader.root / INSTRUCTIONS_FILE]

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {"train": self.examples(self._split_root(dl_manager))}

    def examples(self, root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        reader = MBEIR(root, skip_bad_records=self.builder_config.skip_bad_records)
        return self._generate_examples(reader, self._pool_path(reader))

    def image_paths(self, root: Path) -> Iterator[str]:
        config = self.builder_config
        with _quiet(logging.getLogger("jfe_jax.data.mbeir")):  # examples() reports them
            reader = MBEIR(root, skip_bad_records=True)
            try:
                pool = reader.read_pool(self._pool_path(reader))
                queries = list(reader.iter_queries(config.query_split, config.task))
            except (OSError, ValueError):
                return
        for query in queries:
            records = [query] + [
                pool[d]
                for d in query.pos_cand_list + query.neg_cand_list[: config.max_hard_negatives]
                if d in pool
            ]
            for record in records:
                if record.image_path is not None:
                    yield record.image_path

    def _image(self, reader: MBEIR, record: Query | Candidate, what: str, prefix="") -> bytes:
        """The record's image bytes (b"" when it has none), checked; BadImageError naming
        ``what``, or for a missing file ``prefix`` and the record's own file and line."""
        if record.image_path is None:
            return b""
        try:
            path = reader.image_file(record)
        except ValueError as error:  # outside the root, or missing
            if record.image_path not in self.source_images:  # stat each image once
                self.source_images[record.image_path] = file_signature(
                    reader.root / record.image_path
                )
            raise BadImageError(f"{prefix}{error}") from None
        return self._read_image(path, record.image_path, what)

    def _item(self, reader: MBEIR, candidate: Candidate, query: Query) -> dict[str, Any]:
        prefix = f"{query.source}: query {query.qid}: "
        what = f"{prefix}candidate {candidate.did} ({candidate.source})"
        image = self._image(reader, candidate, what, prefix)
        return {
            "did": candidate.did,
            "text": candidate.text or "",
            "image": image,
            "image_path": candidate.image_path or "",
            "modality": candidate.modality,
        }

    def _generate_examples(
        self, reader: MBEIR, pool_path: str | os.PathLike
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config
        pool = reader.read_pool(pool_path)
        instructions = reader.instructions()
        repeats: collections.Counter[str] = collections.Counter()
        for query in reader.iter_queries(config.query_split, config.task):
            try:
                prompts = instructions.prompts_for(
                    query.dataset_id, query.modality, TASK_MODALITIES[query.task_id][1]
                )
                query_image = self._image(reader, query, f"{query.source}: query {query.qid}")
                missing = [d for d in query.pos_cand_list + query.neg_cand_list if d not in pool]
                if missing:
                    raise ValueError(
                        f"{query.source}: query {query.qid} names candidates "
                        f"{missing} that are not in the pool {pool_path}"
                    )
                negatives = [
                    self._item(reader, pool[d], query)
                    for d in query.neg_cand_list[: config.max_hard_negatives]
                ]
                positives = [self._item(reader, pool[d], query) for d in query.pos_cand_list]
            except ValueError as error:
                self._bad(query.source.rsplit(":", 1)[0], error, config.skip_bad_records)
                continue
            n = config.max_hard_negatives
            shared = {
                "source": query.source,
                "qid": query.qid,
                "query_text": query.text or "",
                "query_image": query_image,
                "query_image_path": query.image_path or "",
                "query_modality": query.modality,
                "task_id": query.task_id,
                "dataset_id": query.dataset_id,
                "instructions": list(prompts),
                "num_negatives": len(negatives),
                "negative_dids": _padded([x["did"].encode() for x in negatives], n),
                "negative_texts": _padded([x["text"].encode() for x in negatives], n),
                "negative_images": self._image_list([x["image"] for x in negatives], n),
                "negative_image_paths": _padded([x["image_path"].encode() for x in negatives], n),
                "negative_modalities": _padded([x["modality"].encode() for x in negatives], n),
            }
            for positive in positives:
                pair = f"{query.qid}|{positive['did']}"
                example_id = f"{pair}|{repeats[pair]}"
                repeats[pair] += 1
                yield (
                    example_id,
                    {
                        **shared,
                        "example_id": example_id,
                        **{f"positive_{k}": v for k, v in positive.items()},
                    },
                )
        # The reader's own skips (malformed lines, duplicate dids) count too.
        for source, count in reader.bad_records.items():
            self._skipped[source] += count
        self._finish_generation()


# ---------------------------------------------------------------------------------------------
# Stage-1 pairs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PairDataConfig(tfds.core.BuilderConfig):
    """Which pair file to read. The name defaults to the kind."""

    name: str = ""
    kind: str = "text_triples"  # "text_triples" | "image_captions"
    root: str | None = None  # folder that holds the file and the images; None: manual_dir
    file: str | None = None  # the jsonl, relative to root; None: pairs/<kind>.jsonl
    skip_bad_records: bool = False  # log and count bad records instead of raising
    verify_images: str = "header"  # header | full | none (see VERIFY_IMAGES)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # the ImageProcessor's cap

    def __post_init__(self):
        if self.kind not in PAIR_KINDS:
            raise ValueError(
                f"PairDataConfig.kind {self.kind!r} is unknown, expected one of "
                f"{sorted(PAIR_KINDS)}"
            )
        _check_settings(self.verify_images, self.max_image_pixels)
        self.name = self.name or self.kind


_PAIR_TEXT_FIELDS = {
    "text_triples": ("sentence", "positive", "hard_negative"),
    "image_captions": ("caption", "image_path"),
}


class PairData(_NoTensorFlowBuilder):
    """Stage-1 text triples or image-caption pairs; schema in the module docstring."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First version.", "1.1.0": "source field; images checked."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Set PairDataConfig.root, or pass manual_dir=<folder holding pairs/*.jsonl and the "
        "images they name>."
    )
    CONFIG_CLASS = PairDataConfig
    IMAGE_FIELDS = ("image",)

    def _info(self) -> tfds.core.DatasetInfo:
        kind = self.builder_config.kind
        features: dict[str, Any] = {"id": _text(), "source": _text()}
        features.update({field: _text() for field in _PAIR_TEXT_FIELDS[kind]})
        if kind == "image_captions":
            features["image"] = _bytes()
        return self._info_with(features)

    def input_files(self, root: Path) -> list[Path]:
        config = self.builder_config
        return [root / (config.file or PAIR_KINDS[config.kind])]

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {"train": self.examples(self._split_root(dl_manager))}

    def examples(self, root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        (path,) = self.input_files(root)
        if not path.is_file():
            raise FileNotFoundError(f"{self.builder_config.kind} file {path} does not exist")
        return self._generate_examples(root, path)

    def image_paths(self, root: Path) -> Iterator[str]:
        if self.builder_config.kind != "image_captions":
            return
        (path,) = self.input_files(root)
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    image_path = json.loads(line).get("image_path")
                except (ValueError, AttributeError):
                    continue
                if isinstance(image_path, str) and image_path:
                    yield image_path

    def _parse(self, root: Path, line: str, where: str, seen: dict[str, str]) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: malformed JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        record_id = record.get("id")
        if not isinstance(record_id, str) or not record_id:
            raise ValueError(f"{where}: id {record_id!r} must be a non-empty string")
        if record_id in seen:
            raise ValueError(f"{where}: id {record_id!r} already appeared at {seen[record_id]}")
        example = {"id": record_id, "source": where}
        for field in _PAIR_TEXT_FIELDS[self.builder_config.kind]:
            value = record.get(field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{where}: record {record_id} has an empty or missing "
                    f"{field!r}; expected a non-empty string"
                )
            example[field] = value
        if "image_path" in example:
            real_root = os.path.realpath(root)
            image = os.path.realpath(root / example["image_path"])
            if os.path.commonpath([real_root, image]) != real_root:
                raise ValueError(
                    f"{where}: record {record_id} image_path "
                    f"{example['image_path']!r} resolves outside {root}"
                )
            example["image"] = self._read_image(
                Path(image), example["image_path"], f"{where}: record {record_id}"
            )
        seen[record_id] = where
        return example

    def _generate_examples(self, root: Path, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        seen: dict[str, str] = {}
        relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{relative}:{lineno}"
                try:
                    example = self._parse(root, line, where, seen)
                except ValueError as error:
                    self._bad(path.name, error, self.builder_config.skip_bad_records)
                    continue
                yield example["id"], example
        self._finish_generation()
