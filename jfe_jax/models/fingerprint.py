"""Content hashes that name a model's weights, an item format or a source file.

A model fingerprint says *what* computed an embedding, never *where* it was read from or in
which file format: it hashes the parameters' values in one canonical layout
(``hash_canonical_params``), so a ``jfe train`` workdir and the directory ``jfe convert`` (or
``Encoder.save_pretrained``) writes from it have the same fingerprint, and a moved or copied
model keeps it. The canonical layout is the unscanned Flax one: every layer its own tensor
(``text/layers_3/q_proj/kernel``, whatever ``scan_layers``), LoRA adapters merged into their
kernels as ``save_pretrained`` merges them, every value as float32 (a bfloat16 weight and its
exact float32 copy compute the same). A weight saved in a lower precision (``jfe convert
--dtype bfloat16``) is another model.

Hashing the values reads the whole model once, so the result is stored beside the weights
(``FINGERPRINT_FILE``: in ``checkpoints/<step>/`` of a workdir, in a Hugging Face directory)
under a key of what it was computed from, read back when the key still matches (the
checkpoint's manifests, or the weight files' names, sizes and times, and the load options),
and written when the folder is writable.

Fingerprints of this form start with ``FORM`` ("w2-"). Older jfe-jax hashed the weight files
(bare hex): exports and indexes that carry one cannot be matched to a model and are rebuilt
(``is_current_form``).

Other hashes here: files streamed in 1 MiB chunks, several at a time (hashlib releases the
GIL), and JSON values independent of dict order.
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
from flax import traverse_util

from jfe_jax.workdir import FINGERPRINT_FILE

CHUNK_BYTES = 1 << 20
CHECKPOINT_CONTENTS_UP_TO = 1 << 20  # larger checkpoint files: name and size only
SHORT = 12  # hex digits shown to users
HF_WEIGHT_FILES = ("config.json", "jfe_encoder.json")  # besides every *.safetensors
FORM = "w2"  # prefix of this fingerprint form; older jfe-jax wrote bare hex (of the files)
_STACKS = ("layers", "blocks")  # scan_layers' stacked collections of the text and vision towers


def _new():
    return hashlib.blake2b(digest_size=32)


def short(fingerprint: str | None) -> str:
    """The first hex digits of a fingerprint (after its form prefix, kept), for messages
    ("none" when there is none)."""
    if not fingerprint:
        return "none"
    form, sep, digits = fingerprint.partition("-")
    return f"{form}-{digits[:SHORT]}" if sep else fingerprint[:SHORT]


def is_current_form(fingerprint: str | None) -> bool:
    """Whether ``fingerprint`` is of this jfe-jax's form (a hash of the parameters' values);
    an older one (a hash of the weight files) names the same model differently."""
    return bool(fingerprint) and fingerprint.startswith(FORM + "-")


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


def hf_files_key(directory: str | os.PathLike) -> str:
    """Hex digest of the name, size and modification time of a Hugging Face directory's
    weight files (*.safetensors, config.json, jfe_encoder.json): whether the fingerprint
    stored there still describes them, without reading them."""
    names = sorted(
        name
        for name in os.listdir(directory)
        if name.endswith(".safetensors") or name in HF_WEIGHT_FILES
    )
    if not any(name.endswith(".safetensors") for name in names):
        raise ValueError(f"{directory} holds no *.safetensors; expected a model's weights")
    stats = [os.stat(os.path.join(directory, name)) for name in names]
    return hash_json([[n, s.st_size, s.st_mtime_ns] for n, s in zip(names, stats)])


def _on_host(leaf: Any) -> np.ndarray:
    """A parameter as one numpy array (gathered from every host when it spans several)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(jax.device_get(leaf))


def _hash_tensor(name: str, value: np.ndarray) -> str:
    array = np.ascontiguousarray(value, dtype="<f4")
    digest = _new()
    digest.update(f"{name}|{list(array.shape)}\n".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def hash_canonical_params(params: Mapping[str, Any], *, lora_alpha: float) -> str:
    """Hex digest of a model's parameters in the canonical layout (see the module docstring):
    layers unstacked, LoRA merged (``merged_lora_kernel``, as ``save_pretrained`` does), float32
    values; the same for the params of a workdir and of the directory converted from it.
    One parameter is on the host at a time."""
    from jfe_jax.models.hf_io import merged_lora_kernel

    flat = traverse_util.flatten_dict(dict(params))
    digests = {}
    for path, leaf in flat.items():
        if path[-1] in ("lora_a", "lora_b"):
            continue  # merged into their kernel
        module = path[:-1]
        lora = path[-1] == "kernel" and (*module, "lora_a") in flat
        value = _on_host(leaf)
        a, b = (_on_host(flat[(*module, x)]) for x in ("lora_a", "lora_b")) if lora else (0, 0)
        stacked = len(path) > 2 and path[0] in ("text", "vision") and path[1] in _STACKS
        for layer in range(value.shape[0]) if stacked else [None]:
            name, tensor = path, value
            if layer is not None:
                name = (path[0], f"{path[1]}_{layer}", *path[2:])
                tensor = value[layer]
            if lora:
                adapters = (a, b) if layer is None else (a[layer], b[layer])
                tensor = merged_lora_kernel(
                    {"kernel": tensor, "lora_a": adapters[0], "lora_b": adapters[1]}, lora_alpha
                )
            digests["/".join(name)] = _hash_tensor("/".join(name), tensor)
    return hash_json(digests)


def read_stored(directory: str | os.PathLike, key: str) -> str | None:
    """The fingerprint stored in ``directory``'s ``FINGERPRINT_FILE`` under ``key``, or None
    (no file, another key, an unreadable file: computed again)."""
    path = epath.Path(directory) / FINGERPRINT_FILE
    try:
        stored = json.loads(path.read_text())
        value = stored["fingerprints"].get(key)
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return value if is_current_form(value) else None


def write_stored(directory: str | os.PathLike, key: str, fingerprint: str) -> bool:
    """Stores ``fingerprint`` under ``key`` in ``directory``'s ``FINGERPRINT_FILE`` (renamed
    into place; the last few keys kept); False when the folder is not writable."""
    path = epath.Path(directory) / FINGERPRINT_FILE
    try:
        stored = json.loads(path.read_text())["fingerprints"]
    except (OSError, ValueError, KeyError, TypeError):
        stored = {}
    stored = {k: v for k, v in list(stored.items())[-7:] if k != key}
    stored[key] = fingerprint
    text = json.dumps({"format": "jfe-jax model fingerprint", "fingerprints": stored}, indent=1)
    tmp = epath.Path(directory) / f"{FINGERPRINT_FILE}.tmp{os.getpid()}"
    try:
        tmp.write_text(text + "\n")
        tmp.replace(path)
    except OSError:
        return False
    return True
