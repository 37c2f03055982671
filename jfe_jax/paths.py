"""User-given paths, made absolute once where they enter the library.

Orbax refuses relative checkpoint paths, and a relative root joined to paths already under it
names the wrong file (``data/data/cand_pool/...``). Every public entry point that takes a
path (``train``, ``run_demo``, ``Encoder.from_pretrained``, ``MBEIR``, exports, indexes,
evaluation, the ``jfe`` command) passes it through ``absolute`` first, so relative paths
mean what they mean in the caller's working directory, and nothing deeper depends on it.
Remote paths (``gs://...`` and other URLs, read through ``etils.epath``) are left as they are.
"""

from __future__ import annotations

import os
from typing import Any

# Config fields that hold paths (relative to the directory the command runs in).
CONFIG_PATH_FIELDS = (
    ("model", "init_from"),
    ("data", "root"),
    ("data", "tokenizer"),
    ("data", "tfds_dir"),
    ("data", "image_store"),
)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``gs://bucket/...``), which is absolute by nature."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike | None) -> Any:
    """``path`` as an absolute local path (``~`` expanded); URLs, None and "" unchanged."""
    if path is None:
        return None
    path = os.fspath(path)
    if not path or is_remote(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def absolute_config_paths(config: Any) -> Any:
    """A copy of a training config with its path fields made absolute (see CONFIG_PATH_FIELDS).

    The copy keeps the original's lock, so a later override of a missing key still fails.
    """
    config = config.copy_and_resolve_references()
    for section, name in CONFIG_PATH_FIELDS:
        if section in config and name in config[section]:
            config[section][name] = absolute(config[section][name])
    return config
