"""Reading and writing ``.safetensors`` files (and sharded indexes) with numpy only.

Written here rather than through ``safetensors.numpy`` so that bfloat16 works (via ml_dtypes)
and large files are memory-mapped instead of read whole.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFile:
    """Lazy, memory-mapped view of one ``.safetensors`` file."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > os.path.getsize(path) - 8:
                raise ValueError(f"{path} is not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} has a corrupt safetensors header: {e}") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._data_start = 8 + header_len
        self._map = None
        self._check_extents(os.path.getsize(path) - self._data_start)

    def _check_extents(self, data_bytes: int) -> None:
        """ValueError naming the first tensor whose bytes lie past the end of the file (a cut
        short download or copy) or do not match its shape and dtype."""
        try:
            extents = sorted(
                (int(info["data_offsets"][1]), int(info["data_offsets"][0]), name)
                for name, info in self.header.items()
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{self.path} has a corrupt safetensors header: {e!r}") from e
        for end, begin, name in extents:
            if end > data_bytes:
                raise ValueError(
                    f"{self.path} is truncated: tensor {name} needs data bytes {begin}..{end} "
                    f"but the file holds {max(data_bytes, 0)}; download or copy it again"
                )
            info = self.header[name]
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is not None:
                want = dtype.itemsize * int(np.prod(info.get("shape", []), dtype=np.int64))
                if end - begin != want:
                    raise ValueError(
                        f"{self.path} has a corrupt safetensors header: tensor {name} of shape "
                        f"{info.get('shape')} and dtype {info['dtype']} takes {want} bytes, "
                        f"its offsets span {end - begin}"
                    )

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._map[self._data_start + begin : self._data_start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def open_checkpoint(directory: str) -> dict[str, SafetensorsFile]:
    """Maps every tensor name of a HF directory (single file or sharded index) to its file."""
    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, SafetensorsFile] = {}
        out = {}
        for name, filename in weight_map.items():
            path = os.path.join(directory, filename)
            if filename not in files:
                if not os.path.isfile(path):
                    raise ValueError(f"{index_path} names shard {filename}, which does not exist")
                files[filename] = SafetensorsFile(path)
            if name not in files[filename].header:
                raise ValueError(f"{index_path} puts {name} in {filename}, which does not hold it")
            out[name] = files[filename]
        return out
    if os.path.isfile(single_path):
        st = SafetensorsFile(single_path)
        return {name: st for name in st.keys()}
    raise ValueError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _write_file(path: str, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    names = sorted(tensors)
    for name in names:
        arr = tensors[name]
        if arr.dtype not in _NAMES:
            raise ValueError(f"cannot write tensor {name} of dtype {arr.dtype}")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
    os.replace(tmp, path)


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    shard, size = {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensors[name]
        size += nbytes
    if shard:
        yield shard


def save_checkpoint(
    directory: str, tensors: dict[str, np.ndarray], *, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Writes ``model.safetensors``, or shards and an index when over ``max_shard_bytes``."""
    os.makedirs(directory, exist_ok=True)
    shards = list(_shards(tensors, max_shard_bytes))
    if len(shards) <= 1:
        _write_file(os.path.join(directory, SINGLE_FILE), tensors)
        return [SINGLE_FILE]
    weight_map, filenames = {}, []
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_file(os.path.join(directory, filename), shard)
        weight_map.update({name: filename for name in shard})
        filenames.append(filename)
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return filenames
