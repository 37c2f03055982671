"""Building and reading prepared datasets: ``build_dataset`` (reuse while the sources are
unchanged, one preparer at a time, other hosts waiting on the filesystem) and ``load_source``.
The builders themselves are in ``jfe_jax.data.tfds_builders``; both names are re-exported there.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from jfe_jax.data import prepared
from jfe_jax.data.builder_base import _NoTensorFlowBuilder
from jfe_jax.data.image_store import ImageStore, default_store_dir
from jfe_jax.data.prepared_sources import file_signature, prepare_lock, stale_reason, write_sources

logger = logging.getLogger(__name__)


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
        _write_build(builder, builder_config, root, store, settings, files)
    return builder


def _write_build(
    builder: _NoTensorFlowBuilder,
    builder_config: Any,
    root: Path,
    store: ImageStore,
    settings: dict[str, Any],
    files: dict[str, Any],
) -> None:
    """Writes the builder's images into ``store``, its examples and its sources record."""
    data_path = os.fspath(builder.data_path)
    paths = {p for p in builder.image_paths(root) if _inside(root, p)}
    builder.store_entries = store.ensure(root, paths, decode=builder_config.verify_images == "full")
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
