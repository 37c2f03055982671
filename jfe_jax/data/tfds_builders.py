"""TFDS builders for the contrastive training data, written and read without TensorFlow.

Two builders, both array_record only (TFDS needs TensorFlow for tfrecord and for decoding
numpy image features, so images are stored as their encoded file bytes):

``MbeirTrainPairs``: one example per (query, positive candidate) of an M-BEIR query split,
with up to ``max_hard_negatives`` hard negatives from the query's ``neg_cand_list``. Fields
(text fields are ``""`` and image fields ``b""`` when absent)::

    example_id         str    "<qid>|<did>|<n>", n counting repeats (union_up_train repeats
                              queries to upsample small tasks)
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
    negative_dids / negative_texts / negative_images / negative_modalities   [N], padded

``PairData``: stage-1 pairs, one config per kind. jsonl input, one object per line (the
synthetic generator writes these; real NLI / caption data must be converted to it)::

    text_triples    {"id": str, "sentence": str, "positive": str, "hard_negative": str}
    image_captions  {"id": str, "image_path": str (relative to the root), "caption": str}

and examples with the same fields, plus ``image`` (bytes) for image_captions.

Where the input is: the builder config's root (``mbeir_root`` / ``root``), or else TFDS's
``manual_dir`` (``download_config=tfds.download.DownloadConfig(manual_dir=ROOT)``, which is
what ``build_dataset(..., manual_dir=ROOT)`` passes). Bad input records (malformed JSON, a
positive or negative missing from the pool, a missing image file, an empty text) raise a
ValueError naming the file and line; with ``skip_bad_records=True`` they are logged, skipped
and counted in ``builder.info.metadata["skipped_records"]`` ({reason or file: count}).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jfe_jax.data.mbeir import MBEIR, TASK_MODALITIES, Candidate, parse_task_name
from jfe_jax.data.synthetic.pairs import IMAGE_CAPTIONS_FILE, TEXT_TRIPLES_FILE

logger = logging.getLogger(__name__)

FILE_FORMAT = "array_record"
PAIR_KINDS: dict[str, str] = {
    "text_triples": TEXT_TRIPLES_FILE,
    "image_captions": IMAGE_CAPTIONS_FILE,
}


def _text() -> tfds.features.Text:
    return tfds.features.Text()


def _bytes(shape: tuple[int, ...] = ()) -> tfds.features.Tensor:
    """Raw bytes (an encoded image, or a padded list of strings): no TensorFlow decoding."""
    return tfds.features.Tensor(shape=shape, dtype=np.object_)


class _NoTensorFlowBuilder(tfds.core.GeneratorBasedBuilder):
    """Base builder: array_record only, and a code path that needs no importlib_resources.

    TFDS 4.9.10 finds a builder's source file through the `importlib_resources` backport,
    which is not installed for Python >= 3.9; the file that defines the class is the same
    answer.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    def __init__(self, **kwargs: Any):
        file_format = kwargs.setdefault("file_format", FILE_FORMAT)
        if str(file_format) != FILE_FORMAT:
            raise ValueError(
                f"{type(self).__name__} writes file_format={FILE_FORMAT!r} only "
                f"(other formats need TensorFlow), got {file_format!r}"
            )
        super().__init__(**kwargs)
        self._skipped: collections.Counter[str] = collections.Counter()

    def _input_root(self, root: str | None, dl_manager: Any) -> Path:
        """The config's root, else the manual_dir; FileNotFoundError naming what was tried."""
        path = Path(root) if root else Path(os.fspath(dl_manager.manual_dir))
        if not path.is_dir():
            raise FileNotFoundError(
                f"{self.name}: input root {path} is not a directory; set "
                "the config's root or pass download_config.manual_dir"
            )
        return path

    def _bad(self, reason: str, error: ValueError, skip: bool) -> None:
        if not skip:
            raise error
        self._skipped[reason] += 1
        self.info.metadata["skipped_records"] = dict(self._skipped)
        logger.warning("skipping bad record: %s", error)

    def _info_with(self, features: dict[str, Any]) -> tfds.core.DatasetInfo:
        metadata = tfds.core.MetadataDict(skipped_records={})
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features), metadata=metadata
        )


def _padded(values: list[bytes], length: int) -> np.ndarray:
    """A fixed-length object array of bytes, filled with b"" (what a [N] bytes feature takes)."""
    return np.array(values + [b""] * (length - len(values)), dtype=object)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"{what}: cannot read image {path}: {error}") from error


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

    def __post_init__(self):
        if self.max_hard_negatives < 0:
            raise ValueError(f"max_hard_negatives is {self.max_hard_negatives}; expected >= 0")
        if self.task is not None:
            parse_task_name(self.task)
        if not self.name:
            self.name = f"{self.task or self.query_split}_neg{self.max_hard_negatives}"


class MbeirTrainPairs(_NoTensorFlowBuilder):
    """M-BEIR (query, positive, hard negatives) examples; fields in the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Set MbeirTrainConfig.mbeir_root, or pass manual_dir=<the M-BEIR root> (the folder "
        "holding query/, cand_pool/, instructions/ and mbeir_images/)."
    )
    CONFIG_CLASS = MbeirTrainConfig

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
                "negative_modalities": _bytes((n,)),
            }
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        config = self.builder_config
        reader = MBEIR(
            self._input_root(config.mbeir_root, dl_manager),
            skip_bad_records=config.skip_bad_records,
        )
        pool_split = "val" if "val" in config.query_split else "train"
        pool_path = config.pool or reader.global_pool_path(pool_split)
        return {"train": self._generate_examples(reader, pool_path)}

    def _item(self, reader: MBEIR, candidate: Candidate) -> dict[str, Any]:
        image = b""
        if candidate.image_path is not None:
            image = _read_bytes(reader.image_file(candidate), f"candidate {candidate.did}")
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
                query_image = b""
                if query.image_path is not None:
                    query_image = _read_bytes(reader.image_file(query), f"query {query.qid}")
                missing = [d for d in query.pos_cand_list + query.neg_cand_list if d not in pool]
                if missing:
                    raise ValueError(
                        f"{query.source}: query {query.qid} names candidates "
                        f"{missing} that are not in the pool {pool_path}"
                    )
                negatives = [
                    self._item(reader, pool[d])
                    for d in query.neg_cand_list[: config.max_hard_negatives]
                ]
                positives = [self._item(reader, pool[d]) for d in query.pos_cand_list]
            except ValueError as error:
                self._bad(query.source.rsplit(":", 1)[0], error, config.skip_bad_records)
                continue
            n = config.max_hard_negatives
            shared = {
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
                "negative_images": _padded([x["image"] for x in negatives], n),
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
        self.info.metadata["skipped_records"] = dict(self._skipped)


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

    def __post_init__(self):
        if self.kind not in PAIR_KINDS:
            raise ValueError(
                f"PairDataConfig.kind {self.kind!r} is unknown, expected one of "
                f"{sorted(PAIR_KINDS)}"
            )
        self.name = self.name or self.kind


_PAIR_TEXT_FIELDS = {
    "text_triples": ("sentence", "positive", "hard_negative"),
    "image_captions": ("caption", "image_path"),
}


class PairData(_NoTensorFlowBuilder):
    """Stage-1 text triples or image-caption pairs; schema in the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Set PairDataConfig.root, or pass manual_dir=<folder holding pairs/*.jsonl and the "
        "images they name>."
    )
    CONFIG_CLASS = PairDataConfig

    def _info(self) -> tfds.core.DatasetInfo:
        kind = self.builder_config.kind
        features: dict[str, Any] = {"id": _text()}
        features.update({field: _text() for field in _PAIR_TEXT_FIELDS[kind]})
        if kind == "image_captions":
            features["image"] = _bytes()
        return self._info_with(features)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        config = self.builder_config
        root = self._input_root(config.root, dl_manager)
        path = root / (config.file or PAIR_KINDS[config.kind])
        if not path.is_file():
            raise FileNotFoundError(f"{config.kind} file {path} does not exist")
        return {"train": self._generate_examples(root, path)}

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
        example = {"id": record_id}
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
            example["image"] = _read_bytes(Path(image), f"{where}: record {record_id}")
        seen[record_id] = where
        return example

    def _generate_examples(self, root: Path, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        seen: dict[str, str] = {}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path.name}:{lineno}"
                try:
                    example = self._parse(root, line, where, seen)
                except ValueError as error:
                    self._bad(path.name, error, self.builder_config.skip_bad_records)
                    continue
                yield example["id"], example


# ---------------------------------------------------------------------------------------------
# Building and reading
# ---------------------------------------------------------------------------------------------


def build_dataset(
    builder_cls: type[_NoTensorFlowBuilder],
    data_dir: str | os.PathLike,
    *,
    manual_dir: str | os.PathLike | None = None,
    **config: Any,
) -> tfds.core.DatasetBuilder:
    """Prepares a dataset (array_record, no TensorFlow) under data_dir and returns its builder.

    ``config`` holds the builder config's fields (``MbeirTrainConfig`` or ``PairDataConfig``,
    e.g. ``mbeir_root=..., query_split="union_train", max_hard_negatives=4``); ``manual_dir``
    is the input root when the config names none. A dataset already prepared under the
    same name and version is reused, not rebuilt.
    """
    builder = builder_cls(data_dir=os.fspath(data_dir), config=builder_cls.CONFIG_CLASS(**config))
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir is not None else None
    )
    builder.download_and_prepare(download_config=download_config)
    return builder


def load_source(builder: tfds.core.DatasetBuilder | str | os.PathLike, split: str = "train") -> Any:
    """A random-access data source (len, [i] -> dict of numpy/bytes) over a prepared split.

    ``builder`` is a prepared builder, or the directory of one prepared version
    (``<data_dir>/<builder name>/<config name>/<version>``), read without the config.
    Text fields come back as bytes, integer fields as numpy scalars.
    """
    if not isinstance(builder, tfds.core.DatasetBuilder):
        directory = epath.Path(os.fspath(builder))
        if not (directory / "dataset_info.json").exists():
            raise FileNotFoundError(
                f"{directory} holds no prepared dataset (no "
                "dataset_info.json); expected <data_dir>/<name>/<config>/"
                "<version>"
            )
        builder = tfds.builder_from_directory(directory)
    if split not in builder.info.splits:
        raise ValueError(
            f"{builder.name} has no split {split!r}; it has {sorted(builder.info.splits)}"
        )
    return builder.as_data_source(split)
