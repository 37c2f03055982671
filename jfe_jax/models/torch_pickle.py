"""Reading a PyTorch ``state_dict`` file (``pytorch_model.bin``) without PyTorch and without
running its pickle.

``torch.save`` writes a zip archive: ``<name>/data.pkl`` pickles the dict, whose tensors are
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` calls over persistent
storage ids ``('storage', torch.FloatStorage, key, location, numel)``, and each storage's bytes
are the member ``<name>/data/<key>``. This unpickler resolves only those names (and
``collections.OrderedDict``) and refuses every other global, so a file that would run code on
``torch.load`` raises instead. The legacy (non-zip, before PyTorch 1.6) format is refused.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype(np.bool_),
}


class _Storage:
    def __init__(self, name: str):
        self.dtype = _STORAGES[name]


def _rebuild_tensor(storage, offset, size, stride, *_unused) -> np.ndarray:
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[offset], copy=True)
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view, copy=True)


def _rebuild_parameter(data, *_unused):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _Storage(name)
        raise pickle.UnpicklingError(
            f"{self.path} refers to {module}.{name}, which a tensor state dict does not need; "
            "refusing to load it (it could run code)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self.path}: unexpected persistent id {pid!r}")
        _, storage, key, _location, numel = pid
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"{self.path}: storage {storage!r} is not a tensor type")
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        return np.frombuffer(raw, dtype=storage.dtype, count=numel)


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """``{name: array}`` of a ``torch.save``d state dict (module docstring); ValueError naming
    ``path`` for a legacy, corrupt or code-carrying file."""
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a zip-format PyTorch file (the legacy format before PyTorch 1.6 is "
            "not read; convert it to safetensors)"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path} holds {len(pickles)} data.pkl members; expected one")
        prefix = pickles[0][: -len("/data.pkl")]
        with archive.open(pickles[0]) as f:
            try:
                state = _Unpickler(f, archive, prefix, path).load()
            except (pickle.UnpicklingError, KeyError, EOFError) as err:
                raise ValueError(f"{path} cannot be read as a tensor state dict: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors")
    return dict(state)
