"""Content hashes that name a model's weights, an item format or a source file.

A fingerprint says *what* computed an embedding, never *where* it was read from: it hashes
file contents under names relative to the model's directory (so a moved or copied model keeps
its fingerprint), or the parameter arrays themselves for a model built in memory. Caches of
embeddings and indexes are reused only under the same fingerprint (``jfe_jax.index.identity``).

- a ``jfe train`` workdir: the files of ``checkpoints/<step>/state``, names relative to that
  folder, plus the step. Its metadata and manifests are hashed whole; its data files (Orbax
  OCDBT, named afresh at every save and listed by the manifests) by name and size, so a 7B
  checkpoint's tens of GB are not read twice for every export;
- a Hugging Face / ``save_pretrained`` directory: ``*.safetensors``, ``config.json`` and
  ``jfe_encoder.json``;
- an encoder built in memory: every parameter's path, dtype, shape and bytes.

Files are streamed in 1 MiB chunks, several at a time (hashlib releases the GIL), so a
checkpoint of tens of GB is hashed at disk speed without being held in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from etils import epath

CHUNK_BYTES = 1 << 20
CHECKPOINT_CONTENTS_UP_TO = 1 << 20  # larger checkpoint files: name and size only
SHORT = 12  # hex digits shown to users
HF_WEIGHT_FILES = ("config.json", "jfe_encoder.json")  # besides every *.safetensors


def _new():
    return hashlib.blake2b(digest_size=32)


def short(fingerprint: str | None) -> str:
    """The first hex digits of a fingerprint, for messages ("none" when there is none)."""
    return fingerprint[:SHORT] if fingerprint else "none"


def hash_json(value: Any) -> str:
    """Hex digest of a JSON-serialisable value, independent of dict order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = _new()
    digest.update(text.encode("utf-8"))
    return digest.hexdigest()


def hash_file(path: str | os.PathLike) -> str:
    """Hex digest of a file's contents (local or ``gs://``), streamed in 1 MiB chunks."""
    digest = _new()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(
    root: str | os.PathLike,
    names: Iterable[str],
    *,
    threads: int = 8,
    contents_up_to: int | None = None,
) -> str:
    """Hex digest of the named files under ``root``: each relative name with its contents.

    Files over ``contents_up_to`` bytes contribute their name and size instead of their
    contents: for stores whose data files get a fresh unique name at every write (Orbax's
    OCDBT ``d/<random hex>``), whose small manifests list those names.
    """
    root = epath.Path(root)
    names = sorted(names)

    def digest(name: str) -> str:
        path = root / name
        if contents_up_to is not None:
            size = path.stat().length
            if size > contents_up_to:
                return f"size:{size}"
        return hash_file(path)

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
        digests = list(pool.map(digest, names))
    return hash_json([[name, value] for name, value in zip(names, digests)])


def _tree_names(root: epath.Path, prefix: str = "") -> list[str]:
    names = []
    for child in root.iterdir():
        name = f"{prefix}{child.name}"
        names += _tree_names(child, name + "/") if child.is_dir() else [name]
    return names


def hash_tree(root: str | os.PathLike, *, contents_up_to: int | None = None) -> str:
    """Hex digest of every file under ``root`` (relative posix names and contents; see
    ``hash_files`` for ``contents_up_to``)."""
    root = epath.Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory; expected files to fingerprint")
    return hash_files(root, _tree_names(root), contents_up_to=contents_up_to)


def hash_hf_weights(directory: str | os.PathLike) -> str:
    """Hex digest of a Hugging Face directory's weights: *.safetensors, config.json and
    jfe_encoder.json (tokenizer and other side files are not the model)."""
    names = [
        name
        for name in os.listdir(directory)
        if name.endswith(".safetensors") or name in HF_WEIGHT_FILES
    ]
    if not any(name.endswith(".safetensors") for name in names):
        raise ValueError(f"{directory} holds no *.safetensors; expected a model's weights")
    return hash_files(directory, names)


def hash_params(params: Mapping[str, Any]) -> str:
    """Hex digest of a parameter tree: each leaf's path, dtype, shape and bytes, by path."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    digest = _new()
    named = {jax.tree_util.keystr(path): leaf for path, leaf in leaves}
    for name in sorted(named):
        leaf = named[name]
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{name}|{array.dtype.name}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
