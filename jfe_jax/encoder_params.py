"""The one-tower encoder's params: made under jit (``init_params``), placed in their shards
(``param_shardings``, ``place_params``), and split into the Hugging Face backbone
(``BACKBONE``) and the extras no HF checkpoint has (``is_extra``: the head and the LoRA
adapters), whose head ``Encoder.save_pretrained`` writes beside the HF files (``HEAD_FILE``:
``write_head``, ``read_head``).

``jfe_jax.encoder.Encoder`` loads, places and saves its params with these.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jfe_jax.models.inputs import dummy_batch
from jfe_jax.models.one_tower import OneTowerEncoder
from jfe_jax.models.safetensors_io import SafetensorsFile, _write_file

HEAD_FILE = "jfe_head.safetensors"  # params outside the HF backbone: logit_scale, projection
BACKBONE = ("vision", "text")


def init_params(module: OneTowerEncoder, rng: jax.Array, *, keep=None, shardings=None):
    """Initialises (unboxed) params under jit; ``keep(path_tuple) -> bool`` selects leaves.

    Parameters that are not returned are dead code to XLA, so initialising only the head and
    the LoRA adapters of a 7B model costs next to nothing. ``shardings`` (a tree over all the
    params, as ``param_shardings``): each param is created in its shards.
    """
    batch = dummy_batch(module.config)

    def select(tree):
        if keep is None:
            return tree
        flat = traverse_util.flatten_dict(tree)
        return traverse_util.unflatten_dict({k: v for k, v in flat.items() if keep(k)})

    def init(rng):
        return select(nn.meta.unbox(module.init(rng, batch)["params"]))

    out_shardings = None if shardings is None else select(dict(shardings))
    return jax.jit(init, out_shardings=out_shardings)(rng)


def param_shardings(module: OneTowerEncoder, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Where each param of ``module`` lives (a tree of shardings with the params' structure):
    over ``mesh`` by the logical axis rules, or without a mesh whole on the first local device."""
    boxed = jax.eval_shape(
        lambda: module.init(jax.random.key(0), dummy_batch(module.config))["params"]
    )
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree_util.tree_map(lambda _: device, nn.meta.unbox(boxed))
    from jfe_jax.train.mesh import logical_shardings

    return logical_shardings(boxed, mesh)


def place_params(params: Mapping[str, Any], shardings: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` moved leaf by leaf into ``shardings`` (a no-op for a leaf already there)."""
    flat_shardings = traverse_util.flatten_dict(dict(shardings))
    placed = {}
    for path, value in traverse_util.flatten_dict(dict(params)).items():
        if path not in flat_shardings:
            raise ValueError(
                f"params has {'/'.join(path)}, which a model with these options does not"
            )
        placed[path] = jax.device_put(value, flat_shardings[path])
    return traverse_util.unflatten_dict(placed)


def is_extra(path: tuple[str, ...]) -> bool:
    """Params a Hugging Face checkpoint does not have: the head and LoRA adapters."""
    return path[0] not in BACKBONE or path[-1] in ("lora_a", "lora_b")


def read_head(
    directory: str, shardings: Mapping[str, Any], *, projection_dim: int
) -> dict[tuple[str, ...], jax.Array]:
    """The head params in ``directory``'s ``HEAD_FILE`` (none if it has no such file), flat
    (by path tuple), each put into its place in ``shardings``; ``projection_dim``: the
    option's value, named when the file holds a param the model does not have."""
    head_path = os.path.join(directory, HEAD_FILE)
    params = {}
    if os.path.isfile(head_path):
        head = SafetensorsFile(head_path)
        flat_shardings = traverse_util.flatten_dict(shardings)
        for name in head.keys():
            key = tuple(name.split("/"))
            if key not in flat_shardings:
                raise ValueError(
                    f"{head_path} holds {name}, which a model with these options does not "
                    f"have (projection_dim={projection_dim})"
                )
            params[key] = jax.device_put(np.asarray(head.get(name)), flat_shardings[key])
    return params


def write_head(directory: str, params: Mapping[str, Any]) -> None:
    """Writes the params outside ``BACKBONE`` (host arrays) to ``directory``'s ``HEAD_FILE``,
    as float32."""
    head = {k: v for k, v in params.items() if k not in BACKBONE}
    flat = traverse_util.flatten_dict(head, sep="/")
    _write_file(
        os.path.join(directory, HEAD_FILE),
        {k: np.asarray(v, dtype=np.float32) for k, v in flat.items()},
    )
