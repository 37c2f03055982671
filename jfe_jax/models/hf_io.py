"""Hugging Face Qwen2-VL checkpoints <-> Flax params, through one explicit name map.

``hf_name_map(config)`` lists every tensor of the reference checkpoint with the Flax path it
fills and how it is transformed (torch ``Linear`` weights are ``[out, in]``, ours ``[in, out]``;
the Conv3d patch embedding becomes one matmul). Loading checks the map both ways: every tensor
used, every parameter filled, every shape right, or a ValueError listing what is not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jfe_jax.models.config import ModelConfig
from jfe_jax.models.safetensors_io import open_checkpoint, save_checkpoint

# transformers 5 names modules model.language_model.* and model.visual.* in memory but saves
# (like the original checkpoints) model.* and visual.*; both spellings are read.
_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))

# Files copied along with the weights when present.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: its HF name, the Flax path, the layer index, the transform."""

    hf_name: str
    path: tuple[str, ...]  # path below params, with the unrolled layer name (layers_3)
    stack: str | None  # name of the scanned collection ('layers', 'blocks') or None
    layer: int | None
    kind: str  # 'copy', 'linear' (transpose), 'patch' (Conv3d kernel)


def hf_name_map(config: ModelConfig) -> list[Entry]:
    """Every tensor of a Qwen2-VL checkpoint and where it goes."""
    entries: list[Entry] = []

    def add(hf_name, path, kind, stack=None, layer=None):
        entries.append(Entry(hf_name, tuple(path), stack, layer, kind))

    add("model.embed_tokens.weight", ("text", "embed_tokens", "embedding"), "copy")
    for i in range(config.text.num_layers):
        hf, fl = f"model.layers.{i}.", ("text", f"layers_{i}")
        kw = dict(stack="layers", layer=i)
        add(hf + "input_layernorm.weight", fl + ("input_layernorm", "scale"), "copy", **kw)
        add(
            hf + "post_attention_layernorm.weight",
            fl + ("post_attention_layernorm", "scale"),
            "copy",
            **kw,
        )
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            add(hf + f"self_attn.{proj}.weight", fl + (proj, "kernel"), "linear", **kw)
            if proj != "o_proj":
                add(hf + f"self_attn.{proj}.bias", fl + (proj, "bias"), "copy", **kw)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            add(hf + f"mlp.{proj}.weight", fl + (proj, "kernel"), "linear", **kw)
    add("model.norm.weight", ("text", "norm", "scale"), "copy")
    if not config.tie_word_embeddings:
        add("lm_head.weight", ("text", "lm_head", "kernel"), "linear")

    add("visual.patch_embed.proj.weight", ("vision", "patch_embed", "kernel"), "patch")
    for i in range(config.vision.depth):
        hf, fl = f"visual.blocks.{i}.", ("vision", f"blocks_{i}")
        kw = dict(stack="blocks", layer=i)
        for norm in ("norm1", "norm2"):
            add(hf + f"{norm}.weight", fl + (norm, "scale"), "copy", **kw)
            add(hf + f"{norm}.bias", fl + (norm, "bias"), "copy", **kw)
        for hf_mod, fl_mod in (
            ("attn.qkv", "qkv"),
            ("attn.proj", "proj"),
            ("mlp.fc1", "fc1"),
            ("mlp.fc2", "fc2"),
        ):
            add(hf + f"{hf_mod}.weight", fl + (fl_mod, "kernel"), "linear", **kw)
            add(hf + f"{hf_mod}.bias", fl + (fl_mod, "bias"), "copy", **kw)
    add("visual.merger.ln_q.weight", ("vision", "merger_norm", "scale"), "copy")
    add("visual.merger.ln_q.bias", ("vision", "merger_norm", "bias"), "copy")
    for hf_i, fl_mod in (("0", "merger_fc1"), ("2", "merger_fc2")):
        add(f"visual.merger.mlp.{hf_i}.weight", ("vision", fl_mod, "kernel"), "linear")
        add(f"visual.merger.mlp.{hf_i}.bias", ("vision", fl_mod, "bias"), "copy")
    return entries


def _to_flax(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "patch":
        return array.reshape(array.shape[0], -1).T
    return array


def _to_hf(kind: str, array: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(array.T)
    if kind == "patch":
        return np.ascontiguousarray(array.T).reshape(hf_shape)
    return np.ascontiguousarray(array)


def _expected_hf_shape(entry: Entry, config: ModelConfig) -> tuple[int, ...]:
    t, v = config.text, config.vision
    kv = t.num_kv_heads * t.head_dim
    merged = v.embed_dim * v.spatial_merge_size**2
    leaf = entry.path[-2:]
    shapes = {
        ("embed_tokens", "embedding"): (t.vocab_size, t.hidden_size),
        ("input_layernorm", "scale"): (t.hidden_size,),
        ("post_attention_layernorm", "scale"): (t.hidden_size,),
        ("q_proj", "kernel"): (t.hidden_size, t.hidden_size),
        ("q_proj", "bias"): (t.hidden_size,),
        ("k_proj", "kernel"): (kv, t.hidden_size),
        ("k_proj", "bias"): (kv,),
        ("v_proj", "kernel"): (kv, t.hidden_size),
        ("v_proj", "bias"): (kv,),
        ("o_proj", "kernel"): (t.hidden_size, t.hidden_size),
        ("gate_proj", "kernel"): (t.intermediate_size, t.hidden_size),
        ("up_proj", "kernel"): (t.intermediate_size, t.hidden_size),
        ("down_proj", "kernel"): (t.hidden_size, t.intermediate_size),
        ("norm", "scale"): (t.hidden_size,),
        ("lm_head", "kernel"): (t.vocab_size, t.hidden_size),
        ("patch_embed", "kernel"): (
            v.embed_dim,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ),
        ("norm1", "scale"): (v.embed_dim,),
        ("norm1", "bias"): (v.embed_dim,),
        ("norm2", "scale"): (v.embed_dim,),
        ("norm2", "bias"): (v.embed_dim,),
        ("qkv", "kernel"): (3 * v.embed_dim, v.embed_dim),
        ("qkv", "bias"): (3 * v.embed_dim,),
        ("proj", "kernel"): (v.embed_dim, v.embed_dim),
        ("proj", "bias"): (v.embed_dim,),
        ("fc1", "kernel"): (v.embed_dim * v.mlp_ratio, v.embed_dim),
        ("fc1", "bias"): (v.embed_dim * v.mlp_ratio,),
        ("fc2", "kernel"): (v.embed_dim, v.embed_dim * v.mlp_ratio),
        ("fc2", "bias"): (v.embed_dim,),
        ("merger_norm", "scale"): (v.embed_dim,),
        ("merger_norm", "bias"): (v.embed_dim,),
        ("merger_fc1", "kernel"): (merged, merged),
        ("merger_fc1", "bias"): (merged,),
        ("merger_fc2", "kernel"): (v.out_dim, merged),
        ("merger_fc2", "bias"): (v.out_dim,),
    }
    return shapes[leaf]


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _canonical(name: str) -> str:
    for old, new in _ALIASES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _flax_shape(entry: Entry, config: ModelConfig) -> tuple[int, ...]:
    hf_shape = _expected_hf_shape(entry, config)
    if entry.kind == "linear":
        return hf_shape[::-1]
    if entry.kind == "patch":
        return (math.prod(hf_shape[1:]), hf_shape[0])
    return hf_shape


def _param_entries(config: ModelConfig, scan_layers: bool) -> dict[tuple[str, ...], list[Entry]]:
    """Flax path -> the checkpoint tensors that fill it: one, or every layer's in layer order
    for a parameter stacked by ``scan_layers``."""
    plan: dict[tuple[str, ...], list[Entry]] = {}
    for e in hf_name_map(config):
        path = e.path
        if scan_layers and e.stack is not None:
            # ('text', 'layers_3', 'q_proj', 'kernel') -> ('text', 'layers', 'q_proj', 'kernel')
            path = e.path[:1] + (e.stack,) + e.path[2:]
        plan.setdefault(path, []).append(e)
    return plan


def _is_stacked(entries: list[Entry], scan_layers: bool) -> bool:
    return scan_layers and entries[0].stack is not None


def backbone_shapes(
    config: ModelConfig, *, scan_layers: bool
) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax path -> shape of every backbone parameter a Hugging Face checkpoint fills (layers
    stacked on a leading axis when ``scan_layers``); from the config alone, nothing is read."""
    shapes = {}
    for path, entries in _param_entries(config, scan_layers).items():
        shape = _flax_shape(entries[0], config)
        shapes[path] = (len(entries), *shape) if _is_stacked(entries, scan_layers) else shape
    return shapes


def _check_tensors(directory: str, files: Mapping[str, Any], config: ModelConfig) -> dict:
    """HF name -> the name stored in ``files``; ValueError listing every missing, unexpected
    or mis-shaped tensor."""
    available = {_canonical(name): name for name in files}
    entries = hf_name_map(config)
    wanted = {e.hf_name for e in entries}
    missing = sorted(wanted - set(available))
    extra = set(available) - wanted
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        extra.discard("lm_head.weight")  # a tied head saved anyway: it equals embed_tokens
    bad_shapes = []
    for e in entries:
        if e.hf_name in available:
            got = files[available[e.hf_name]].shape(available[e.hf_name])
            want = _expected_hf_shape(e, config)
            if got != want:
                bad_shapes.append(f"{e.hf_name}: {list(got)} (expected {list(want)})")
    if missing or extra or bad_shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {', '.join(missing[:20])}")
        if extra:
            parts.append(f"{len(extra)} unexpected: {', '.join(sorted(extra)[:20])}")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} mis-shaped: {'; '.join(bad_shapes[:20])}")
        raise ValueError(f"checkpoint {directory} does not match its config: " + " | ".join(parts))
    return available


def _slice_reader(views: list[np.ndarray], stacked: bool, dtype: Any):
    """``index -> array``: one parameter's slice ``index``, copied out of the memory-mapped
    ``views`` (one per stacked layer) and cast to ``dtype``; only the slice is ever read."""

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return np.array(views[0][index], dtype=dtype, order="C")
        layers = views[index[0]]
        out = np.empty((len(layers), *views[0][index[1:]].shape), dtype=dtype)
        for i, view in enumerate(layers):
            out[i] = view[index[1:]]  # casts while copying: no second copy of the slice
        return out

    return read


def load_hf_params(
    directory: str,
    config: ModelConfig,
    *,
    scan_layers: bool,
    dtype: Any,
    shardings: Any = None,
) -> dict[str, Any]:
    """Reads the backbone params (``{'vision': ..., 'text': ...}``) of a HF Qwen2-VL directory
    (``model.safetensors``, or shards named by ``model.safetensors.index.json``).

    ``shardings``: None returns whole numpy arrays (the model on the host). A ``Sharding``, or
    a nested dict of them over the parameter paths (the model's, head included: extra keys are
    ignored), returns ``jax.Array``s placed there: each device's slice is read from the
    memory-mapped files and cast on its own, one parameter at a time, so neither the host nor
    a device ever holds more than its shards plus one tensor.

    Raises:
      ValueError: listing missing, unexpected and mis-shaped tensors (all of them at once), or
        naming a parameter ``shardings`` has no place for.
    """
    files = open_checkpoint(directory)
    available = _check_tensors(directory, files, config)
    flat_shardings = None
    if shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
        flat_shardings = traverse_util.flatten_dict(dict(shardings))
    shapes = backbone_shapes(config, scan_layers=scan_layers)
    params: dict[str, Any] = {}
    for path, entries in _param_entries(config, scan_layers).items():
        # Views of the mapped files (transposed or reshaped, still views): nothing read yet.
        views = [
            _to_flax(e.kind, files[available[e.hf_name]].get(available[e.hf_name])) for e in entries
        ]
        read = _slice_reader(views, _is_stacked(entries, scan_layers), dtype)
        shape = shapes[path]
        if shardings is None:
            value = read(tuple(slice(None) for _ in shape))
        else:
            sharding = shardings if flat_shardings is None else flat_shardings.get(path)
            if sharding is None:
                raise ValueError(
                    f"shardings has no entry for parameter {'/'.join(path)} of {directory}"
                )
            value = jax.make_array_from_callback(shape, sharding, read)
        _set(params, path, value)
    return params


def merged_lora_kernel(module_params: Mapping[str, Any], lora_alpha: float) -> np.ndarray:
    """``kernel + (alpha / rank) * lora_a @ lora_b`` (or the kernel when there is no adapter)."""
    kernel = np.asarray(module_params["kernel"], dtype=np.float32)
    if "lora_a" not in module_params:
        return kernel
    a = np.asarray(module_params["lora_a"], dtype=np.float32)
    b = np.asarray(module_params["lora_b"], dtype=np.float32)
    rank = a.shape[-1]
    return kernel + (lora_alpha / rank) * np.matmul(a, b)


def export_hf_tensors(
    params: Mapping[str, Any],
    config: ModelConfig,
    *,
    lora_alpha: float = 0.0,
    dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
    """Backbone params (scanned or not; LoRA merged) -> HF tensor dict."""
    scanned = "layers" in params["text"]
    tensors = {}
    for e in hf_name_map(config):
        path, layer = e.path, None
        if scanned and e.stack is not None:
            path, layer = e.path[:1] + (e.stack,) + e.path[2:], e.layer
        module = _get(params, path[:-1])
        if path[-1] == "kernel":
            if layer is not None:
                module = {k: np.asarray(v)[layer] for k, v in module.items()}
            value = merged_lora_kernel(module, lora_alpha)
        else:
            value = np.asarray(module[path[-1]])
            if layer is not None:
                value = value[layer]
        hf_shape = _expected_hf_shape(e, config)
        tensors[e.hf_name] = _to_hf(e.kind, np.asarray(value, dtype=np.float32), hf_shape).astype(
            dtype
        )
    return tensors


def save_hf_checkpoint(
    directory: str,
    params: Mapping[str, Any],
    config: ModelConfig,
    *,
    lora_alpha: float = 0.0,
    dtype: Any = np.float32,
    side_files_from: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes config.json + safetensors that transformers' Qwen2VLForConditionalGeneration loads."""
    os.makedirs(directory, exist_ok=True)
    tensors = export_hf_tensors(params, config, lora_alpha=lora_alpha, dtype=dtype)
    save_checkpoint(directory, tensors, max_shard_bytes=max_shard_bytes)
    hf_config = config.to_hf_dict()
    hf_config["dtype"] = np.dtype(dtype).name
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    if side_files_from:
        copy_side_files(side_files_from, directory)


def copy_side_files(source: str, directory: str) -> list[str]:
    """Copies the ``SIDE_FILES`` (tokenizer, processor, generation settings) that ``source``
    has into ``directory``; returns their names."""
    copied = []
    if os.path.abspath(source) != os.path.abspath(directory):
        for name in SIDE_FILES:
            src = os.path.join(source, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(directory, name))
                copied.append(name)
    return copied
