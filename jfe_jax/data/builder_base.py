"""What both TFDS builders of ``jfe_jax.data.tfds_builders`` share: array_record only, the
bad-record policy (fail naming the first few, or skip and count), the image checks (header,
full decode, the pixel cap), either on the bytes (TFDS's ``download_and_prepare``) or on what
the image store read (``build_dataset``), and the field kinds ``jfe_jax.data.prepared`` writes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jfe_jax.data.image_processor import decode_opened, open_image
from jfe_jax.data.image_store import ImageEntry
from jfe_jax.data.prepared_sources import Signature, file_signature

logger = logging.getLogger(__name__)

FILE_FORMAT = "array_record"
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
