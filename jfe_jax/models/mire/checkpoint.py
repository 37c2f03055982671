"""MIRe's checkpoints in and out: the three Hugging Face layouts (``read_pretrained``,
``write_pretrained``: ColBERT, CLIP and the pooling as the reference names it, with MIRe's
settings beside the pooling) and the whole model for training (``read_checkpoint``,
``write_checkpoint``: Orbax parameters, the config, the tokenizer). The layouts are described
in ``jfe_jax.models.mire.model``'s docstring; ``MIRe`` calls these."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jfe_jax.models.mire.mismatch import raise_if_mismatched
from jfe_jax.models.mire.network import _TOWERS, MIReConfig, _init
from jfe_jax.models.mire.text import BertConfig, colbert_from_torch, colbert_to_torch
from jfe_jax.models.mire.vision import CLIPVisionConfig, clip_from_torch, clip_to_torch
from jfe_jax.models.safetensors_io import SafetensorsFile, open_checkpoint, save_checkpoint
from jfe_jax.models.torch_pickle import read_torch_state_dict

CONFIG_FILE = "mire_config.json"
# MIRe's own settings (every MIReConfig field but the towers', which their config.json files
# carry), written beside the pooling weights by save_pretrained.
SETTINGS_FILE = "mire_settings.json"


# --- the pooling's checkpoint names --------------------------------------------------------------


def _pooling_key(path: tuple[str, ...]) -> tuple[str, bool]:
    module, leaf = path
    if module[-1].isdigit():  # proj_0 -> proj.0, split_mlp_2 -> split_mlp.2
        base, index = module.rsplit("_", 1)
        module = f"{base}.{index}"
    torch_module = module
    if leaf == "kernel":
        return f"{torch_module}.weight", True
    return f"{torch_module}.{'weight' if leaf == 'scale' else leaf}", False


def pooling_from_torch(
    state: Mapping[str, Any], template: Mapping[str, Any], *, prefix: str = "", source: str = ""
) -> dict:
    """Pooling params (``template``'s tree) from the reference module's state dict names."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(template))
    out, missing, misshaped, used = {}, [], [], set()
    for path, leaf in flat.items():
        key, transpose = _pooling_key(path)
        key = prefix + key
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        value = np.asarray(state[key], np.float32)
        value = value.T if transpose else value
        if value.shape != tuple(leaf.shape):
            misshaped.append(f"{key} {tuple(np.shape(state[key]))}")
            continue
        out[path] = value
    extra = sorted(k for k in state if k.startswith(prefix) and k not in used)
    raise_if_mismatched(
        f"{source or 'pooling weights'} do not match MIRe's pooling", missing, misshaped, extra
    )
    return traverse_util.unflatten_dict(out)


def pooling_to_torch(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for path, value in traverse_util.flatten_dict(nn.meta.unbox(params)).items():
        key, transpose = _pooling_key(path)
        value = np.asarray(value)
        out[prefix + key] = value.T if transpose else value
    return out


TORCH_FILE = "pytorch_model.bin"


def _read_dir(directory: str) -> dict[str, np.ndarray]:
    """A Hugging Face directory's tensors: safetensors (one file or an index), else
    ``pytorch_model.bin`` read without running its pickle (``torch_pickle``)."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory")
    if os.path.isfile(os.path.join(directory, TORCH_FILE)) and not any(
        name.endswith(".safetensors") or name.endswith(".safetensors.index.json")
        for name in os.listdir(directory)
    ):
        return read_torch_state_dict(os.path.join(directory, TORCH_FILE))
    files = open_checkpoint(directory)
    return {name: np.asarray(f.get(name)) for name, f in files.items()}


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; expected a Hugging Face config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _settings(pooling: str | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """MIRe's settings for ``from_pretrained``: those saved beside the pooling weights, with
    ``given`` (the arguments passed) checked against them; ``given`` alone without a saved
    file."""
    path = pooling and os.path.join(pooling, SETTINGS_FILE)
    if not path or not os.path.isfile(path):
        return dict(given)
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    names = {f.name for f in dataclasses.fields(MIReConfig)} - set(_TOWERS)
    unknown = sorted(set(saved) - names)
    if unknown:
        raise ValueError(f"{path} has settings this MIRe does not know: {', '.join(unknown)}")
    differ = [f"{k}={v!r} (saved {saved[k]!r})" for k, v in given.items() if saved.get(k, v) != v]
    if differ:
        raise ValueError(
            f"from_pretrained was given {', '.join(differ)}, not the settings saved in {path}; "
            "leave them out to use the saved ones"
        )
    return {**saved, **given}


def read_pretrained(
    colbert_dir: str, clip_dir: str, pooling: str | None, given: Mapping[str, Any], seed: int
) -> tuple[MIReConfig, dict, Any]:
    """(config, params, tokenizer) of ``MIRe.from_pretrained``; ``given``: the settings passed
    (None where not given)."""
    from transformers import AutoTokenizer

    text_hf = _read_json(os.path.join(colbert_dir, "config.json"))
    colbert_state = _read_dir(colbert_dir)
    if "linear.weight" not in colbert_state:
        raise ValueError(f"{colbert_dir} has no linear.weight: not a ColBERT checkpoint")
    dim = colbert_state["linear.weight"].shape[0]
    config = MIReConfig(
        text=BertConfig.from_hf(text_hf, dim=dim),
        vision=CLIPVisionConfig.from_hf(_read_json(os.path.join(clip_dir, "config.json"))),
        **_settings(pooling, {k: v for k, v in given.items() if v is not None}),
    )
    tokenizer = AutoTokenizer.from_pretrained(colbert_dir)
    # The towers are read; only the pooling may need initialising (no checkpoint given).
    template = jax.eval_shape(functools.partial(_init, config), jax.random.key(seed))
    params = dict(nn.meta.unbox(template)["params"])
    params["colbert"] = colbert_from_torch(colbert_state, config.text, source=colbert_dir)["params"]
    params["clip"] = clip_from_torch(_read_dir(clip_dir), config.vision, source=clip_dir)["params"]
    if pooling is not None:
        if os.path.isdir(pooling):
            state = _read_dir(pooling)
        else:
            st = SafetensorsFile(pooling)
            state = {k: np.asarray(st.get(k)) for k in st.keys()}
        params["pooling"] = pooling_from_torch(state, params["pooling"], source=pooling)
    else:
        init = jax.jit(functools.partial(_init, config, only="pooling"))
        params["pooling"] = nn.meta.unbox(init(jax.random.key(seed)))["params"]["pooling"]
    return config, {"params": params}, tokenizer


def write_pretrained(
    config: MIReConfig, params: Mapping[str, Any], tokenizer: Any, directory: str
) -> None:
    """``MIRe.save_pretrained``: ``colbert/``, ``clip/`` and ``pooling/`` under ``directory``."""
    p = params["params"]
    save_checkpoint(os.path.join(directory, "colbert"), colbert_to_torch({"params": p["colbert"]}))
    save_checkpoint(os.path.join(directory, "clip"), clip_to_torch({"params": p["clip"]}))
    text = dataclasses.asdict(config.text)
    text.pop("dim")
    with open(os.path.join(directory, "colbert", "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(text, model_type="bert", hidden_act="gelu"), f, indent=2)
    vision = dataclasses.asdict(config.vision)
    with open(os.path.join(directory, "clip", "config.json"), "w", encoding="utf-8") as f:
        json.dump(
            dict(vision, model_type="clip_vision_model", hidden_act="quick_gelu"), f, indent=2
        )
    tokenizer.save_pretrained(os.path.join(directory, "colbert"))
    save_checkpoint(os.path.join(directory, "pooling"), pooling_to_torch(p["pooling"]))
    settings = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _TOWERS
    }
    with open(os.path.join(directory, "pooling", SETTINGS_FILE), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)


def write_checkpoint(
    config: MIReConfig, params: Mapping[str, Any], tokenizer: Any, directory: str
) -> None:
    """``MIRe.save_checkpoint``: ``params/`` (Orbax), ``mire_config.json``, ``tokenizer/``."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, "params"), params, force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))


def read_checkpoint(directory: str, shardings: Any = None) -> tuple[MIReConfig, Any, Any]:
    """(config, params, tokenizer) of ``MIRe.from_checkpoint``."""
    import orbax.checkpoint as ocp
    from transformers import AutoTokenizer

    directory = os.path.abspath(directory)
    config = _read_json(os.path.join(directory, CONFIG_FILE))
    config = MIReConfig(
        text=BertConfig(**config.pop("text")),
        vision=CLIPVisionConfig(**config.pop("vision")),
        **config,
    )
    template = nn.meta.unbox(jax.eval_shape(functools.partial(_init, config), jax.random.key(0)))
    if shardings is not None:
        template = jax.tree.map(
            lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), template, shardings
        )
    params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), template)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
    return config, params, tokenizer
