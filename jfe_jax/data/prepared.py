"""Prepared training datasets written and read without TensorFlow, at any size.

``jfe_jax.data.tfds_builders`` defines the examples (fields, checks, bad-record policy); this
module writes them. TFDS's own writer is not used: above 1000 MiB of examples its shuffler
spills to bucket files through ``tf.io.gfile``, which needs TensorFlow. Here the examples go,
in the order the builder yields them, into array_record shards, one msgpack map per example,
and the shuffle is an index: ``order.npy`` lists the examples sorted by TFDS's hash of their
key (the order TFDS's writer gives them: deterministic, independent of how the build ran), and
the source reads example ``order[i]`` as its i-th. The grain loader shuffles again per epoch.

Images are not copied into the examples: an image field holds a reference ``[sha256, segment,
row]`` into the data root's ``jfe_jax.data.image_store.ImageStore``, and the source returns
the bytes read from the store. Layout of a prepared version directory::

    train-00000.array_record ...   the examples (RECORDS_PER_SHARD each)
    order.npy                      int64 [n]: the i-th example is row order[i] of the shards
    jfe_dataset.json               fields and their kinds, shard sizes, the image store,
                                   metadata (skipped records), the builder's name and config
    jfe_sources.json, jfe_source_images.gz   what it was built from (prepared_sources)

``jfe_sources.json`` is written last: a directory without it is an interrupted build.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from jfe_jax.data.image_store import ImageStore
from jfe_jax.data.prepared_sources import SOURCES_FILE

DATASET_FILE = "jfe_dataset.json"
ORDER_FILE = "order.npy"
SHARD_PATTERN = "train-{:05d}.array_record"
RECORDS_PER_SHARD = 50_000
FORMAT_VERSION = 1

# Field kinds (what the source returns, as TFDS's data source did for the same fields):
# text -> bytes; int32 -> int; bytes -> bytes; image -> bytes (b"" for none);
# bytes_list -> object array of bytes; image_list -> object array of bytes;
# text_sequence -> list of bytes.
FIELD_KINDS = ("text", "int32", "bytes", "image", "bytes_list", "image_list", "text_sequence")


SPLIT = "train"


def order_key(example_key: str) -> int:
    """The 128-bit hash that orders the examples: TFDS's (md5 of the split name, then the
    key; ``tensorflow_datasets.core.hashing``), so a dataset is read in the order TFDS's own
    writer gave the same examples."""
    return int(hashlib.md5((SPLIT + example_key.replace("\\", "/")).encode()).hexdigest(), 16)


def _plain(value: Any) -> Any:
    """An example's value as msgpack stores it (numpy arrays and scalars to lists and ints)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def is_complete(data_path: str | os.PathLike) -> bool:
    """Whether ``data_path`` holds a finished build of this format."""
    return os.path.isfile(os.path.join(data_path, DATASET_FILE)) and os.path.isfile(
        os.path.join(data_path, SOURCES_FILE)
    )


def write_examples(
    data_path: str | os.PathLike,
    examples: Iterable[tuple[str, dict[str, Any]]],
    *,
    fields: dict[str, str],
    store: ImageStore,
    description: dict[str, Any],
    metadata: Any,
) -> int:
    """Writes ``(key, example)`` pairs as a prepared dataset in ``data_path`` (which must be
    empty or absent), then ``jfe_dataset.json``; returns the example count.

    ``fields`` maps each field to its kind (FIELD_KINDS); image fields hold store references.
    ``metadata`` is read after the last example (the builder fills it while generating).
    """
    data_path = os.fspath(data_path)
    os.makedirs(data_path, exist_ok=True)
    unknown = {k: v for k, v in fields.items() if v not in FIELD_KINDS}
    if unknown:
        raise ValueError(f"unknown field kinds {unknown}; expected one of {FIELD_KINDS}")
    names = sorted(fields)
    shards: list[int] = []
    keys: list[int] = []
    writer = None
    seen: dict[str, int] = {}
    packer = msgpack.Packer(use_bin_type=True)
    try:
        for key, example in examples:
            if key in seen:
                raise ValueError(f"example key {key!r} occurs twice (examples {seen[key]} and "
                                 f"{len(keys)})")  # fmt: skip
            seen[key] = len(keys)
            if writer is None or shards[-1] == RECORDS_PER_SHARD:
                if writer is not None:
                    writer.close()
                path = os.path.join(data_path, SHARD_PATTERN.format(len(shards)))
                writer = ArrayRecordWriter(path, "group_size:64")
                shards.append(0)
            missing = [n for n in names if n not in example]
            if missing:
                raise ValueError(f"example {key!r} has no field(s) {missing}")
            writer.write(packer.pack([_plain(example[n]) for n in names]))
            shards[-1] += 1
            keys.append(order_key(key))
    finally:
        if writer is not None:
            writer.close()
    order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
    np.save(os.path.join(data_path, ORDER_FILE), order)
    record = {
        "format": FORMAT_VERSION,
        **description,
        "fields": {n: fields[n] for n in names},
        "shards": shards,
        "num_examples": len(keys),
        "image_store": store.directory,
        "metadata": dict(metadata),
    }
    temporary = os.path.join(data_path, DATASET_FILE + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(temporary, os.path.join(data_path, DATASET_FILE))
    return len(keys)


def read_description(data_path: str | os.PathLike) -> dict[str, Any]:
    """The ``jfe_dataset.json`` of a prepared directory; FileNotFoundError naming it."""
    path = os.path.join(data_path, DATASET_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{data_path} holds no prepared dataset (no {DATASET_FILE})"
        ) from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is unreadable: {error}; rebuild the prepared data") from None
    if record.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is format {record.get('format')!r}, this version reads {FORMAT_VERSION}: "
            "rebuild the prepared data"
        )
    return record


class PreparedSource:
    """Random access to a prepared dataset: ``len`` and ``[i]`` -> a dict of the fields,
    typed as TFDS's data source typed them (text as bytes, integers as ints, images
    as their encoded bytes read from the image store). Picklable (grain worker processes).
    """

    def __init__(self, data_path: str | os.PathLike):
        self.data_path = os.fspath(data_path)
        record = read_description(self.data_path)
        self.fields: dict[str, str] = record["fields"]
        self.names = sorted(self.fields)
        self.metadata = record["metadata"]
        self.description = record
        self._starts = np.cumsum([0] + list(record["shards"]))
        self._order = np.load(os.path.join(self.data_path, ORDER_FILE))
        if len(self._order) != record["num_examples"]:
            raise ValueError(
                f"{self.data_path}: {ORDER_FILE} lists {len(self._order)} examples, "
                f"{DATASET_FILE} says {record['num_examples']}; rebuild the prepared data"
            )
        self.store = ImageStore(record["image_store"], workers=0)
        self._readers: dict[int, ArrayRecordReader] = {}

    def __len__(self) -> int:
        return len(self._order)

    def __repr__(self) -> str:
        return f"PreparedSource({self.data_path!r}, {len(self)} examples)"

    def _row(self, row: int) -> list[Any]:
        shard = int(np.searchsorted(self._starts, row, side="right")) - 1
        reader = self._readers.get(shard)
        if reader is None:
            path = os.path.join(self.data_path, SHARD_PATTERN.format(shard))
            reader = self._readers[shard] = ArrayRecordReader(path, "readahead_buffer_size:0")
        data = reader.read([row - int(self._starts[shard])])[0]
        return msgpack.unpackb(data, raw=False)

    def _image(self, ref: Any) -> bytes:
        return self.store.read(ref) if ref else b""  # None or b"": no image

    def _typed(self, kind: str, value: Any) -> Any:
        if kind == "text":
            return value.encode()
        if kind == "int32":
            return int(value)
        if kind == "bytes":
            return value if isinstance(value, bytes) else value.encode()
        if kind == "image":
            return self._image(value)
        if kind == "bytes_list":
            return np.array(
                [v if isinstance(v, bytes) else v.encode() for v in value] or [], dtype=object
            )
        if kind == "image_list":
            return np.array([self._image(v) for v in value] or [], dtype=object)
        return [v.encode() for v in value]  # text_sequence

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        values = self._row(int(self._order[index]))
        return {n: self._typed(self.fields[n], v) for n, v in zip(self.names, values)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state
