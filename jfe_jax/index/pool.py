"""Reading a ``jfe export`` (a pool or a query set) shard by shard, never two copies of it.

`open_export` checks an export without reading its embeddings: the hosts' metadata agree,
every shard is there, made under the export's identity, and its files have the sizes (and
the ids and identity the hashes) its ``manifest.json`` recorded (``jfe_jax.index.integrity``
says what is hashed when). Its `ExportReader` then reads any run of rows straight from the
shards' ``embeddings.npy`` into a caller's array:

- `load_embeddings` reads them into one preallocated [n, D] array: host memory is the pool
  once (the old loader held the shards and their concatenation, twice the pool);
- `load_exact_index` reads each device's rows into that device's block and places it, so the
  host holds one device's block at a time (on a CPU backend, where the devices' memory is the
  host's, the peak is the pool plus one device's block).

Shards written before manifests (no ``manifest.json``) are read with size checks only (each
``embeddings.npy`` header's shape against the file's size and the shard's ids), with one
WARNING per export: a rerun of ``jfe export`` reuses such shards, so refusing them would
leave no way forward but deleting the export.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np

from jfe_jax.index import integrity
from jfe_jax.index.exact import ExactIndex
from jfe_jax.index.identity import EXPORT_KEYS, mismatch
from jfe_jax.index.layout import IDENTITY_FILE, SHARD_PATTERN

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.json"
SHARD_FILES = (EMBEDDINGS_FILE, IDS_FILE, IDENTITY_FILE)  # what a shard's manifest records
# .npy header readers by format version (3.0, utf-8 headers, reads as 2.0 for ASCII ones).
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0}


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Where one shard's rows are: in ``path`` from byte ``data_offset``, row-major float32."""

    path: str  # the shard's embeddings.npy
    first_row: int  # its first row in the export
    num_rows: int
    data_offset: int  # bytes of the .npy header


@dataclasses.dataclass(frozen=True)
class ExportReader:
    """A checked export: its metadata, ids in row order, and its shards' layout on disk."""

    directory: str
    metadata: dict[str, Any]  # host 0's metadata-host*.json
    ids: list[str]
    shards: tuple[ShardLayout, ...]
    dim: int

    @property
    def num_rows(self) -> int:
        """Rows (items) in the export."""
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes of its float32 embeddings."""
        return self.num_rows * self.dim * 4

    def read_rows(self, start: int, out: np.ndarray) -> None:
        """Fills ``out`` (float32 [m, dim], C-contiguous) with rows [start, start + m)."""
        if out.dtype != np.float32 or out.ndim != 2 or out.shape[1] != self.dim:
            raise ValueError(f"out must be float32 [rows, {self.dim}], got {out.dtype} {out.shape}")
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        stop = start + out.shape[0]
        if start < 0 or stop > self.num_rows:
            raise ValueError(f"rows [{start}, {stop}) are outside the export's {self.num_rows}")
        row_bytes = 4 * self.dim
        position = bisect.bisect_right([s.first_row for s in self.shards], start) - 1
        row = start
        while row < stop:
            shard = self.shards[position]
            upto = min(stop, shard.first_row + shard.num_rows)
            target = memoryview(out[row - start : upto - start]).cast("B")
            with open(shard.path, "rb", buffering=0) as f:
                f.seek(shard.data_offset + (row - shard.first_row) * row_bytes)
                done = 0
                while done < len(target):
                    count = f.readinto(target[done:])
                    if not count:
                        raise integrity.IntegrityError(
                            f"{shard.path} ended while reading row {row + done // row_bytes} "
                            "(changed since the export was opened)"
                        )
                    done += count
            row, position = upto, position + 1


def _npy_layout(path: str, first_row: int, dim: int, rebuild: str) -> ShardLayout:
    """A shard's layout from its .npy header; IntegrityError unless it holds float32 rows of
    ``dim`` and its size is what the header's shape needs."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = _NPY_HEADER_READERS.get(version, np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, EOFError) as error:
        raise integrity.IntegrityError(f"{path} is not a .npy file ({error}); {rebuild}") from None
    if dtype != np.float32 or fortran_order or len(shape) != 2 or shape[1] != dim:
        kind = f"{'Fortran-order ' if fortran_order else ''}{dtype} {shape}"
        raise integrity.IntegrityError(f"{path} holds {kind}, expected float32 [rows, {dim}]")
    expected, size = offset + shape[0] * dim * 4, os.path.getsize(path)
    if size != expected:
        raise integrity.IntegrityError(
            f"{path} is {size} bytes but its header's shape {shape} needs {expected} "
            f"({'truncated' if size < expected else 'trailing bytes'}); {rebuild}"
        )
    return ShardLayout(path, first_row, int(shape[0]), offset)


def _read_metadata(out_dir: str) -> dict[str, Any]:
    """Host 0's metadata, after checking every host's agrees on what the export is."""
    if not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is not an export directory")
    metas = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("metadata-host") and name.endswith(".json"):
            with open(os.path.join(out_dir, name), encoding="utf-8") as f:
                metas.append(json.load(f))
    if not metas:
        raise ValueError(f"{out_dir} has no metadata-host*.json: the export did not finish")
    first = metas[0]
    if not first.get("model_fingerprint"):
        raise ValueError(
            f"export {out_dir} has no model fingerprint (made by an older jfe-jax), so nothing "
            "says which model made it; rerun jfe export into it to rebuild it"
        )
    for key in ("dim", "total_items", *EXPORT_KEYS):
        values = {json.dumps(m.get(key)) for m in metas}
        if len(values) > 1:
            raise ValueError(f"the hosts of {out_dir} disagree on {key}: {sorted(values)}")
    return first


def open_export(out_dir: str, *, hash_embeddings: bool | None = None) -> ExportReader:
    """Checks the export in ``out_dir`` and returns its reader (the embeddings not yet read).

    ``hash_embeddings``: check the embeddings' hashes too (reads them once); default: when
    they are at most ``integrity.HASH_EMBEDDINGS_UP_TO`` bytes. Sizes, ids and identities
    are always checked.

    Raises:
      ValueError: no metadata, metadata without a model fingerprint (an older export), hosts
        that disagree, or a missing shard or one made under another identity (named).
      IntegrityError (a ValueError): a shard file truncated, missing or modified (named).
    """
    metadata = _read_metadata(out_dir)
    dim, num_shards = metadata["dim"], metadata["num_shards"]
    ids, shards, embedding_records, legacy = [], [], {}, []
    for shard in range(num_shards):
        name = SHARD_PATTERN.format(shard)
        path = os.path.join(out_dir, name)
        rebuild = f"remove {path} and rerun jfe export to rebuild it"
        if not os.path.isfile(os.path.join(path, IDS_FILE)):
            raise ValueError(
                f"export {out_dir} is missing shard {name} of {num_shards} (a host did not "
                "finish; rerun the export to resume)"
            )
        records = integrity.read_manifest(path)
        if records is None:
            legacy.append(name)
            records = {}
        else:
            for file in SHARD_FILES:
                if file not in records:
                    raise integrity.IntegrityError(
                        f"{path}/{integrity.MANIFEST_FILE} records no {file}; {rebuild}"
                    )
            for file in SHARD_FILES:
                integrity.check_size(os.path.join(path, file), records[file], rebuild=rebuild)
            embedding_records[f"{name}/{EMBEDDINGS_FILE}"] = records[EMBEDDINGS_FILE]
        identity = _read_json(
            os.path.join(path, IDENTITY_FILE), records.get(IDENTITY_FILE), rebuild
        )
        what = mismatch(identity, metadata, this="its metadata says")
        if what:
            raise ValueError(
                f"export {out_dir}: {name} was made {what}; rerun the export to rebuild it"
            )
        shard_ids = _read_json(os.path.join(path, IDS_FILE), records.get(IDS_FILE), rebuild)
        layout = _npy_layout(os.path.join(path, EMBEDDINGS_FILE), len(ids), dim, rebuild)
        if not isinstance(shard_ids, list) or len(shard_ids) != layout.num_rows:
            count = len(shard_ids) if isinstance(shard_ids, list) else "no list of"
            raise integrity.IntegrityError(
                f"{path} holds {layout.num_rows} embeddings and {count} ids; {rebuild}"
            )
        ids.extend(shard_ids)
        shards.append(layout)
    if len(ids) != metadata["total_items"]:
        raise ValueError(
            f"export {out_dir} holds {len(ids)} x {dim} embeddings, metadata says "
            f"{metadata['total_items']} x {dim}"
        )
    if legacy:
        log.warning(
            "export %s: %d shard(s) (%s, ...) were written before shard manifests; their files "
            "are checked for size only",
            out_dir,
            len(legacy),
            legacy[0],
        )
    reader = ExportReader(out_dir, metadata, ids, tuple(shards), dim)
    if hash_embeddings is None:
        hash_embeddings = reader.nbytes <= integrity.HASH_EMBEDDINGS_UP_TO
    if hash_embeddings and embedding_records:
        integrity.check_files(
            out_dir, embedding_records, rebuild="remove that shard and rerun jfe export"
        )
    return reader


def _read_json(path: str, record: dict[str, Any] | None, rebuild: str) -> Any:
    """A shard's JSON file, checked against its manifest record when it has one."""
    if record is None:
        with open(path, "rb") as f:
            data = f.read()
    else:
        data = integrity.read_checked(path, record, rebuild=rebuild)
    try:
        return json.loads(data)
    except ValueError:
        return None


def load_embeddings(
    out_dir: str, *, hash_embeddings: bool | None = None
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """All shards of an export, in stream order: (embeddings float32 [n, D], ids, metadata),
    read shard by shard into one preallocated array. Raises as `open_export` does."""
    reader = open_export(out_dir, hash_embeddings=hash_embeddings)
    embeddings = np.empty((reader.num_rows, reader.dim), np.float32)
    reader.read_rows(0, embeddings)
    return embeddings, reader.ids, reader.metadata


def load_exact_index(
    out_dir: str,
    *,
    mesh=None,
    max_bytes_per_device: int | None = None,
    hash_embeddings: bool | None = None,
) -> tuple[ExactIndex, list[str], dict[str, Any]]:
    """(an `ExactIndex` over an export's embeddings, its ids, its metadata): the rows go from
    the shards into each device's block, with no full host copy (a streamed index, too large
    for the devices, holds one unpadded host copy). Raises as `open_export` does."""
    reader = open_export(out_dir, hash_embeddings=hash_embeddings)
    index = ExactIndex.from_rows(
        reader.read_rows,
        reader.num_rows,
        reader.dim,
        mesh=mesh,
        max_bytes_per_device=max_bytes_per_device,
    )
    return index, reader.ids, reader.metadata
