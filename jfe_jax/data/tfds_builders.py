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
import contextlib
import dataclasses
import inspect
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jfe_jax.data import prepared
from jfe_jax.data.image_processor import DEFAULT_MAX_IMAGE_PIXELS, decode_opened, open_image
from jfe_jax.data.image_store import ImageEntry, ImageStore, default_store_dir
from jfe_jax.data.mbeir import (
    INSTRUCTIONS_FILE,
    MBEIR,
    TASK_MODALITIES,
    Candidate,
    Query,
    parse_task_name,
)
from jfe_jax.data.prepared_sources import (
    Signature,
    file_signature,
    prepare_lock,
    stale_reason,
    write_sources,
)
from jfe_jax.data.synthetic.pairs import IMAGE_CAPTIONS_FILE, TEXT_TRIPLES_FILE

logger = logging.getLogger(__name__)

FILE_FORMAT = "array_record"
PAIR_KINDS: dict[str, str] = {
    "text_triples": TEXT_TRIPLES_FILE,
    "image_captions": IMAGE_CAPTIONS_FILE,
}
# header: open each image and check its size against max_image_pixels (no pixel decoded);
# full: also decode it (catches truncated data); none: copy the bytes unchecked.
VERIFY_IMAGES = ("header", "full", "none")
NAMED_BAD_RECORDS = 3  # bad records quoted in a failed build's error
# A build that finds this many bad records stops looking (a wrong root, say) and fails.
MAX_BAD_RECORDS = 1000


class BadImageError(ValueError):
    """A record's image is missing, unreadable, too large or (verify_images="full") corrupt."""


def _check_settings(verify_images: str, max_image_pixels: int) -> None:
    if verify_images not in VERIFY_IMAGES:
        raise ValueError(
            f"verify_images {verify_images!r} is unknown, expected one of {VERIFY_IMAGES}"
        )
    if max_image_pixels < 1:
        raise ValueError(f"max_image_pixels is {max_image_pixels}; expected >= 1")


def _text() -> tfds.features.Text:
    return tfds.features.Text()


def _bytes(shape: tuple[int, ...] = ()) -> tfds.features.Tensor:
    """Raw bytes (an encoded image, or a padded list of strings): no TensorFlow decoding."""
    return tfds.features.Tensor(shape=shape, dtype=np.object_)


class _NoTensorFlowBuilder(tfds.core.GeneratorBasedBuilder):
    """Base builder: array_record only, a code path that needs no importlib_resources, and
    the bad-record policy and image checks of both builders.

    TFDS 4.9.10 finds a builder's source file through the `importlib_resources` backport,
    which is not installed for Python >= 3.9; the file that defines the class is the same
    answer.
    """

    ROOT_FIELD = "root"  # the config field that names the input root

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
        self._errors: list[ValueError] = []  # bad records found, when not skipping them
        self._skipped_images: list[str] = []  # why each record skipped for its image was bad
        self._image_problems: dict[str, str | None] = {}  # each image checked once
        # Every image file the build looked at (relative to the root), for jfe_sources.json.
        self.source_images: dict[str, Signature] = {}
        # build_dataset's image store entries by relative path: examples then hold store
        # references. None: examples hold the image bytes (TFDS's download_and_prepare).
        self.store_entries: dict[str, ImageEntry] | None = None

    def input_root(self, manual_dir: str | os.PathLike | None) -> Path:
        """The config's root, else the manual_dir; FileNotFoundError naming what was tried."""
        root = getattr(self.builder_config, self.ROOT_FIELD) or manual_dir
        path = Path(os.fspath(root)) if root else None
        if path is None or not path.is_dir():
            raise FileNotFoundError(
                f"{self.name}: input root {path} is not a directory; set "
                "the config's root or pass download_config.manual_dir"
            )
        return path

    def _split_root(self, dl_manager: Any) -> Path:
        """``input_root`` in _split_generators (TFDS's manual_dir must exist when read)."""
        has_root = bool(getattr(self.builder_config, self.ROOT_FIELD))
        return self.input_root(None if has_root else dl_manager.manual_dir)

    def input_files(self, root: Path) -> list[Path]:
        """The files (besides images) that the dataset is built from."""
        raise NotImplementedError

    def image_paths(self, root: Path) -> Iterator[str]:
        """The images (relative to the root, inside it) that the examples will read; a path
        may repeat. Bad records are not reported here: ``examples`` does that."""
        raise NotImplementedError

    def examples(self, root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        """The (key, example) pairs of the train split, read from ``root``."""
        raise NotImplementedError

    IMAGE_FIELDS: tuple[str, ...] = ()  # fields holding one image
    IMAGE_LIST_FIELDS: tuple[str, ...] = ()  # fields holding a padded list of images

    def field_kinds(self) -> dict[str, str]:
        """Each feature's kind for ``jfe_jax.data.prepared`` (FIELD_KINDS)."""
        kinds = {}
        for name, feature in self.info.features.items():
            if isinstance(feature, tfds.features.Text):
                kinds[name] = "text"
            elif isinstance(feature, tfds.features.Sequence):
                kinds[name] = "text_sequence"
            elif isinstance(feature, tfds.features.Scalar):
                kinds[name] = "int32"
            elif feature.shape == ():
                kinds[name] = "image" if name in self.IMAGE_FIELDS else "bytes"
            else:
                kinds[name] = "image_list" if name in self.IMAGE_LIST_FIELDS else "bytes_list"
        return kinds

    def _image_list(self, images: list[Any], length: int) -> Any:
        """A padded [N] image field: bytes (b"" fill), or store references (None fill)."""
        if self.store_entries is None:
            return _padded(images, length)
        return images + [None] * (length - len(images))

    def source_settings(self, root: Path) -> dict[str, Any]:
        """What, besides its input files, decides the dataset's content (jfe_sources.json)."""
        # The root counts as resolved (a relative and an absolute path name the same input).
        skip = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)} | {self.ROOT_FIELD}
        config = self.builder_config
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return {
            "builder": self.name,
            "version": str(self.version),
            "config": config.name,
            "input_root": os.path.realpath(root),
            **{name: value for name, value in fields.items() if name not in skip},
        }

    def _read_image(self, path: Path, relative: str, what: str) -> Any:
        """An image file's bytes (or, from build_dataset, its image store reference), checked
        as the config's verify_images says; BadImageError naming ``what`` (the record) and the
        file."""
        if self.store_entries is not None:
            return self._stored_image(path, relative, what)
        if relative not in self.source_images:  # M-BEIR reads a pool image for many queries
            self.source_images[relative] = file_signature(path)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BadImageError(f"{what}: cannot read image {path}: {error}") from error
        config = self.builder_config
        if config.verify_images != "none":
            if relative not in self._image_problems:
                self._image_problems[relative] = _image_problem(
                    data, f"image {path}", config.max_image_pixels, config.verify_images
                )
            if self._image_problems[relative]:
                raise BadImageError(f"{what}: {self._image_problems[relative]}")
        return data

    def _stored_image(self, path: Path, relative: str, what: str) -> list[Any]:
        """``_read_image`` from the image store: the same checks, on what the store read."""
        entry = self.store_entries.get(relative)
        if relative not in self.source_images:
            self.source_images[relative] = entry.signature if entry else file_signature(path)
        if entry is None:
            raise BadImageError(f"{what}: cannot read image {path}: it is missing or unreadable")
        config = self.builder_config
        if config.verify_images != "none":
            name = f"image {path}"
            if entry.header_error:
                # The store named the file by its absolute path when it read it.
                problem = entry.header_error
            elif entry.width * entry.height > config.max_image_pixels:
                problem = (
                    f"{name} is {entry.width}x{entry.height} = {entry.width * entry.height} "
                    f"pixels; expected at most max_image_pixels={config.max_image_pixels}"
                )
            elif config.verify_images == "full" and entry.decode_error:
                problem = entry.decode_error
            else:
                problem = None
            if problem:
                raise BadImageError(f"{what}: {problem}")
        return entry.ref

    def _bad(self, reason: str, error: ValueError, skip: bool) -> None:
        if not skip:
            # Go on looking, to name how many there are; fail at the end (or at too many).
            self._errors.append(error)
            if len(self._errors) >= MAX_BAD_RECORDS:
                raise self._build_error()
            return
        self._skipped[reason] += 1
        if isinstance(error, BadImageError):
            self._skipped_images.append(str(error))
        self.info.metadata["skipped_records"] = dict(self._skipped)
        logger.warning("skipping bad record: %s", error)

    def _build_error(self) -> ValueError:
        """One error for the bad records found: the first few, and how many."""
        errors = self._errors
        if len(errors) == 1:
            return errors[0]
        count = f"{len(errors)} or more" if len(errors) >= MAX_BAD_RECORDS else len(errors)
        named = "; ".join(str(e) for e in errors[:NAMED_BAD_RECORDS])
        more = len(errors) - NAMED_BAD_RECORDS
        return ValueError(
            f"{self.name}/{self.builder_config.name}: {count} bad records "
            f"(skip_bad_records=True skips them): {named}"
            + (f"; and {more} more" if more > 0 else "")
        )

    def _finish_generation(self) -> None:
        """After the last example: fail for bad records, or record the skipped ones."""
        if self._errors:
            raise self._build_error()
        self.info.metadata["skipped_records"] = dict(self._skipped)
        self.info.metadata["skipped_bad_images"] = len(self._skipped_images)
        if self._skipped_images:
            logger.warning(
                "%s/%s: skipped %d records with bad images: %s",
                self.name,
                self.builder_config.name,
                len(self._skipped_images),
                "; ".join(self._skipped_images[:NAMED_BAD_RECORDS]),
            )

    def _info_with(self, features: dict[str, Any]) -> tfds.core.DatasetInfo:
        metadata = tfds.core.MetadataDict(skipped_records={}, skipped_bad_images=0)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features), metadata=metadata
        )


@contextlib.contextmanager
def _quiet(log: logging.Logger) -> Iterator[None]:
    """Silences ``log`` below ERROR for the block (a first pass that re-reads the inputs)."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _image_problem(data: bytes, name: str, max_image_pixels: int, verify: str) -> str | None:
    """Why encoded image bytes would fail training, or None: the ImageProcessor's header and
    size check, and with verify="full" a complete decode."""
    try:
        image = open_image(io.BytesIO(data), max_image_pixels=max_image_pixels, name=name)
        if verify == "full":
            decode_opened(image, name)
        else:
            image.close()
    except ValueError as error:
        return str(error)
    return None


def _padded(values: list[bytes], length: int) -> np.ndarray:
    """A fixed-length object array of bytes, filled with b"" (what a [N] bytes feature takes)."""
    return np.array(values + [b""] * (length - len(values)), dtype=object)


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


# ---------------------------------------------------------------------------------------------
# Building and reading
# ---------------------------------------------------------------------------------------------


class PrepareTimeoutError(TimeoutError):
    """Another host did not finish preparing a dataset within the wait allowed."""


def _inside(root: Path, relative: str) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    return os.path.commonpath([real_root, real]) == real_root


def build_dataset(
    builder_cls: type[_NoTensorFlowBuilder],
    data_dir: str | os.PathLike,
    *,
    manual_dir: str | os.PathLike | None = None,
    check_sources: bool = True,
    image_store: str | os.PathLike | None = None,
    workers: int | None = None,
    wait_for_host: int | None = None,
    wait_seconds: float = 6 * 3600,
    **config: Any,
) -> tfds.core.DatasetBuilder:
    """Prepares a dataset under data_dir (no TensorFlow at any size) and returns its builder.

    ``config`` holds the builder config's fields (``MbeirTrainConfig`` or ``PairDataConfig``,
    e.g. ``mbeir_root=..., query_split="union_train", max_hard_negatives=4``); ``manual_dir``
    is the input root when the config names none. The examples are written by
    ``jfe_jax.data.prepared`` (array_record shards, an index for the shuffle), their images
    once into the root's ``ImageStore`` (``image_store``: its folder, default
    ``default_store_dir(root)``; read by ``workers`` processes, default every core).

    A dataset already prepared under the same name and version is reused while its sources
    are unchanged (the config, the input files and every image it read; see
    ``jfe_jax.data.prepared_sources``); otherwise it is removed and rebuilt, saying why in an
    INFO log line. ``check_sources=False`` reuses a prepared dataset without stating its
    images. One process prepares at a time: a second one waits for the lock in data_dir, then
    reuses what the first prepared.

    ``wait_for_host=H`` (several hosts, data_dir shared): do not build, wait on the filesystem
    for host H to finish a build with these settings and input files, at most
    ``wait_seconds``; then PrepareTimeoutError names the dataset and what to check.
    """
    data_dir = os.fspath(data_dir)
    builder_config = builder_cls.CONFIG_CLASS(**config)
    if wait_for_host is not None:
        return _wait_for_build(builder_cls, data_dir, builder_config, manual_dir,
                               wait_for_host, wait_seconds)  # fmt: skip
    with prepare_lock(data_dir):
        builder = builder_cls(data_dir=data_dir, config=builder_config)
        root = builder.input_root(manual_dir or Path(data_dir, "downloads", "manual"))
        settings = builder.source_settings(root)
        files = {os.fspath(path): file_signature(path) for path in builder.input_files(root)}
        data_path = os.fspath(builder.data_path)
        if prepared.is_complete(data_path):
            reason = stale_reason(
                builder.data_path, settings, files, root, check_images=check_sources
            )
            if reason is None:
                _reuse(builder, data_path)
                return builder
            logger.info("rebuilding the prepared dataset %s: %s", data_path, reason)
        if os.path.exists(data_path):
            shutil.rmtree(data_path)  # stale, interrupted, or an older (TFDS-written) build
        store = ImageStore(image_store or default_store_dir(root), workers=workers)
        paths = {p for p in builder.image_paths(root) if _inside(root, p)}
        builder.store_entries = store.ensure(
            root, paths, decode=builder_config.verify_images == "full"
        )
        started = time.perf_counter()
        count = prepared.write_examples(
            data_path,
            builder.examples(root),
            fields=builder.field_kinds(),
            store=store,
            description={
                "builder": builder.name,
                "config": builder_config.name,
                "version": str(builder.version),
            },  # fmt: skip
            metadata=builder.info.metadata,
        )
        write_sources(builder.data_path, settings, files, builder.source_images)
        logger.info(
            "prepared %s: %d examples in %.1f s (%d images in the store %s)",
            data_path,
            count,
            time.perf_counter() - started,
            len(builder.store_entries),
            store.directory,
        )
    return builder


def _reuse(builder: _NoTensorFlowBuilder, data_path: str) -> None:
    """A reused build's metadata (skipped records) on the builder, as after building."""
    builder.info.metadata.update(prepared.read_description(data_path)["metadata"])


def _wait_for_build(
    builder_cls: type[_NoTensorFlowBuilder],
    data_dir: str,
    builder_config: Any,
    manual_dir: Any,
    host: int,
    wait_seconds: float,
) -> tfds.core.DatasetBuilder:
    """``build_dataset(wait_for_host=...)``: polls the filesystem, never a device collective."""
    builder = builder_cls(data_dir=data_dir, config=builder_config)
    root = builder.input_root(manual_dir or Path(data_dir, "downloads", "manual"))
    settings = builder.source_settings(root)
    data_path = os.fspath(builder.data_path)
    started = time.monotonic()
    delay, reason = 0.2, ""
    while True:
        if prepared.is_complete(data_path):
            files = {os.fspath(p): file_signature(p) for p in builder.input_files(root)}
            reason = stale_reason(builder.data_path, settings, files, root, check_images=False)
            if reason is None:
                _reuse(builder, data_path)
                return builder
        waited = time.monotonic() - started
        if waited >= wait_seconds:
            raise PrepareTimeoutError(
                f"waited {waited:.0f} s for host {host} to prepare {data_path}"
                + (f" (what is there: {reason})" if reason else " (nothing there yet)")
                + "; check that host's log, that data.tfds_dir is a folder every host shares, "
                "or raise data.prepare_wait_s"
            )
        time.sleep(min(delay, max(wait_seconds - waited, 0.01)))
        delay = min(delay * 1.5, 10.0)


def load_source(builder: tfds.core.DatasetBuilder | str | os.PathLike, split: str = "train") -> Any:
    """A random-access data source (len, [i] -> dict of numpy/bytes) over a prepared split.

    ``builder`` is a builder ``build_dataset`` returned, or the directory of one prepared
    version (``<data_dir>/<builder name>/<config name>/<version>``), read without the config.
    Text fields come back as bytes, integer fields as numpy scalars, images as their encoded
    bytes. A directory prepared by TFDS itself (``download_and_prepare``: dataset_info.json,
    images inside the examples) is read through TFDS.
    """
    directory = os.fspath(builder.data_path if hasattr(builder, "data_path") else builder)
    if split != "train":
        raise ValueError(f"prepared datasets have one split, 'train'; got {split!r}")
    if prepared.is_complete(directory):
        return prepared.PreparedSource(directory)
    if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
        raise FileNotFoundError(
            f"{directory} holds no prepared dataset (no {prepared.DATASET_FILE}); expected "
            "<data_dir>/<name>/<config>/<version>"
        )
    legacy = tfds.builder_from_directory(epath.Path(directory))
    return legacy.as_data_source(split)
