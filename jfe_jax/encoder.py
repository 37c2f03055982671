"""``Encoder``: the user-facing one-tower model (load, run, save).

    enc = Encoder.from_pretrained("/path/to/Qwen2-VL-2B-Instruct")
    emb = enc.encode(texts=["a dog on a beach"])         # [1, D], unit norm
    emb = enc.encode(images=["dog.jpg"], texts=["What breed is it?"],
                     instruction="Retrieve the answer to the question about the image.")
    hidden = enc.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw)
    emb = enc.embed(input_ids, attention_mask, pixel_values, image_grid_thw)
    enc.save_pretrained("/path/to/out")  # transformers loads it

``encode`` takes items (texts, images, or image + text pairs) and feeds them in the item
format the model was trained with (``embedder_for``). The array
arguments of ``hidden_states`` and ``embed`` are exactly those of transformers' Qwen2-VL
forward; outputs are numpy. Its params are made, placed and split into the Hugging Face
backbone and our head by ``jfe_jax.encoder_params``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from jfe_jax.data.image_processor import PREPROCESSOR_CONFIG
from jfe_jax.data.item_format import ItemFormat
from jfe_jax.encoder_params import (
    BACKBONE,
    init_params,
    is_extra,
    param_shardings,
    place_params,
    read_head,
    write_head,
)
from jfe_jax.models import fingerprint as fingerprint_lib
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.hf_io import copy_side_files, load_hf_params, save_hf_checkpoint
from jfe_jax.models.inputs import prepare_batch
from jfe_jax.models.one_tower import EncoderOptions, _dtype
from jfe_jax.paths import absolute
from jfe_jax.workdir import Workdir, is_workdir

if TYPE_CHECKING:
    from jfe_jax.index.embedder import ItemEmbedder

log = logging.getLogger(__name__)

ENCODER_FILE = "jfe_encoder.json"  # our options, next to the HF files

# Options that do not change what the model computes, left out of its fingerprint.
_LAYOUT_OPTIONS = EncoderOptions.layout_fields()
# ... and those whose effect the fingerprint sees in the canonical weights (LoRA merged,
# values as float32), so that a workdir and its converted directory agree.
_WEIGHT_OPTIONS = (*_LAYOUT_OPTIONS, "param_dtype", "lora_rank", "lora_alpha", "lora_targets")


class _SignedJit:
    """A jitted function that records each call's (name, argument shapes and dtypes) in a set:
    what JAX traces once per signature, counted without a side effect inside the trace."""

    def __init__(self, function: Any, name: str, signatures: set[Any]):
        self.function, self.name, self.signatures = function, name, signatures

    def __call__(self, *args: Any) -> Any:
        leaves, tree = jax.tree_util.tree_flatten(args)
        shapes = tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)
        self.signatures.add((self.name, tree, shapes))
        return self.function(*args)


def _write_preprocessor_config(directory: str, item_format: ItemFormat) -> None:
    """``preprocessor_config.json`` with the format's image settings, over the keys of one
    copied from the source (e.g. ``processor_class``), which are kept."""
    path = os.path.join(directory, PREPROCESSOR_CONFIG)
    settings = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    settings.update(item_format.image_processor().to_hf_dict())
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
        f.write("\n")


class Encoder:
    """A one-tower JFE encoder: Flax module + params + the jitted forward."""

    def __init__(
        self,
        config: ModelConfig,
        params: Mapping[str, Any],
        options: EncoderOptions = EncoderOptions(),
        *,
        source_dir: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.config = config.validate()
        self.options = options
        self.module = options.module(config)
        # With a mesh, the params live in their shards over it (by the logical axis rules).
        self.mesh = mesh
        if mesh is not None:
            params = place_params(params, param_shardings(self.module, mesh))
        self.params = params
        self.source_dir = source_dir
        self.step: int | None = None  # training step of a checkpoint loaded from a workdir
        # (params, kind, path) of the files the params were loaded from; set by the loaders.
        self._loaded_from: tuple[Any, str, str] | None = None
        self._fingerprint: tuple[Any, str] | None = None  # (params it describes, fingerprint)
        self._embedders: dict[Any, Any] = {}  # encode's ItemEmbedders, by (params, options)

        def embed(params, batch):
            return self.module.apply({"params": params}, batch)[0]

        def hidden(params, batch):
            _, out = self.module.apply({"params": params}, batch, return_hidden=True)
            return out["last_hidden_state"].astype(jnp.float32)

        # Two programs: the embedding one skips the final layer's unpooled positions.
        self._signatures: set[Any] = set()
        self._embed = _SignedJit(jax.jit(embed), "embed", self._signatures)
        self._hidden = _SignedJit(jax.jit(hidden), "hidden", self._signatures)

    @property
    def trace_count(self) -> int:
        """Traces of the forward so far: one per input shape and output kind (the distinct
        argument shapes and dtypes each program was called with, recorded at the call, outside
        the traced code; the jit caches hold more entries, e.g. one per input placement)."""
        return len(self._signatures)

    # ------------------------------------------------------------------ construction

    @classmethod
    def init(cls, config: ModelConfig, options: EncoderOptions = EncoderOptions(), seed: int = 0):
        """A randomly initialised encoder (tests, training from scratch)."""
        module = options.module(config.validate())
        return cls(config, init_params(module, jax.random.key(seed)), options)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        options: EncoderOptions | None = None,
        *,
        mesh: jax.sharding.Mesh | None = None,
        **overrides,
    ) -> Encoder:
        """Loads a Hugging Face Qwen2-VL directory (config.json + safetensors, one file or
        shards with an index), or a training workdir (``from_workdir``).

        Options come from ``options``, else from the directory's ``jfe_encoder.json`` when it
        was written by ``save_pretrained``, else the defaults; keyword ``overrides`` replace
        single fields (e.g. ``dtype="bfloat16"``, ``lora_rank=64``). ``mesh``: the params go
        into their shards over it (logical axis rules), each device's slices read from the
        memory-mapped files; without one, the whole model goes to the first local device.
        Either way the weights are read one tensor at a time, never the model on the host.
        """
        path = absolute(path)
        if not os.path.isdir(path):
            raise ValueError(f"{path} is not a directory")
        if is_workdir(path):
            return cls.from_workdir(path, options, mesh=mesh, **overrides)
        config = ModelConfig.from_pretrained(path)
        if options is None:
            options = EncoderOptions()
            saved = os.path.join(path, ENCODER_FILE)
            if os.path.isfile(saved):
                with open(saved, encoding="utf-8") as f:
                    fields = json.load(f)["options"]
                fields["lora_targets"] = tuple(fields["lora_targets"])
                # save_pretrained merged LoRA into the backbone: start without adapters.
                fields.update(lora_rank=0, lora_alpha=0.0)
                options = EncoderOptions(**fields)
        options = dataclasses.replace(options, **overrides)
        module = options.module(config)
        shardings = param_shardings(module, mesh)
        backbone = load_hf_params(
            path,
            config,
            scan_layers=options.scan_layers,
            dtype=_dtype(options.param_dtype),
            shardings=shardings,
        )
        params = traverse_util.flatten_dict(backbone)
        extras = init_params(module, jax.random.key(0), keep=is_extra, shardings=shardings)
        params.update(traverse_util.flatten_dict(extras))
        params.update(read_head(path, shardings, projection_dim=options.projection_dim))
        params = traverse_util.unflatten_dict(params)
        encoder = cls(config, params, options, source_dir=path, mesh=mesh)
        encoder._loaded_from = (encoder.params, "hf", path)
        return encoder

    @classmethod
    def from_workdir(
        cls,
        workdir: str,
        options: EncoderOptions | None = None,
        step: int | None = None,
        *,
        mesh: jax.sharding.Mesh | None = None,
        **overrides,
    ) -> Encoder:
        """Loads the params of the latest (or ``step``) checkpoint of a ``jfe train`` workdir;
        the optimizer state is not read. ``mesh``: each param is restored straight into its
        shards over it (logical axis rules); without one, whole onto the first local device."""
        import ml_collections

        from jfe_jax.train.checkpoint import load_model_config, read_run_config, restore_params
        from jfe_jax.train.setup import encoder_options

        workdir = absolute(workdir)
        config = load_model_config(workdir)
        if options is None:
            options = encoder_options(ml_collections.ConfigDict(read_run_config(workdir)))
        options = dataclasses.replace(options, **overrides)
        shardings = None if mesh is None else param_shardings(options.module(config), mesh)
        params, step = restore_params(workdir, step, sharding=shardings)
        encoder = cls(config, params, options, source_dir=workdir, mesh=mesh)
        encoder.step = step
        encoder._loaded_from = (encoder.params, "workdir", workdir)
        return encoder

    @property
    def fingerprint(self) -> str:
        """Content hash of what this encoder computes (``jfe_jax.models.fingerprint``).

        Its parameters' values in one canonical layout (layers unstacked, LoRA merged, float32)
        plus its architecture and the options that change its outputs: a workdir and the
        directory converted from it (``save_pretrained``) have the same one, a moved or copied
        model keeps it, more training or a lower-precision copy changes it. Read from the
        ``jfe_fingerprint.json`` beside the weights loaded, else computed (one read of the
        params) and stored there; cached (recomputed if ``params`` is replaced).
        """
        if self._fingerprint is None or self._fingerprint[0] is not self.params:
            loaded = self._loaded_from
            _, kind, path = loaded if loaded and loaded[0] is self.params else (None, "params", "")
            options = dataclasses.asdict(self.options)
            load_options = {k: v for k, v in options.items() if k not in _LAYOUT_OPTIONS}
            store, key, value = None, None, None
            if kind == "workdir":
                store = Workdir(path).step_dir(self.step)
                files = fingerprint_lib.hash_tree(
                    os.path.join(store, "state"),
                    contents_up_to=fingerprint_lib.CHECKPOINT_CONTENTS_UP_TO,
                )
            elif kind == "hf":
                store, files = path, fingerprint_lib.hf_files_key(path)
            if store is not None:
                # What the in-memory params were made from: the files and how they were read.
                key = fingerprint_lib.hash_json({"kind": kind, "files": files, **load_options})
                value = fingerprint_lib.read_stored(store, key)
            if value is None:
                identity = {
                    "weights": fingerprint_lib.hash_canonical_params(
                        self.params, lora_alpha=self.options.lora_alpha
                    ),
                    "config": self.config.to_hf_dict(),
                    "options": {k: v for k, v in options.items() if k not in _WEIGHT_OPTIONS},
                }
                value = f"{fingerprint_lib.FORM}-{fingerprint_lib.hash_json(identity)}"
                if store is not None and jax.process_index() == 0:
                    fingerprint_lib.write_stored(store, key, value)
            self._fingerprint = (self.params, value)
        return self._fingerprint[1]

    def save_pretrained(
        self, path: str, *, dtype: str = "float32", item_format: ItemFormat | None = None
    ) -> ItemFormat:
        """Writes a Hugging Face directory (LoRA merged) plus our head params and options, the
        tokenizer files, the item format (``jfe_item_format.json``) and a
        ``preprocessor_config.json`` with its pixel limits: transformers' ``AutoProcessor``
        and the model class load the result, and ``embedder_for`` feeds it what it was
        trained on. ``item_format``: default, the one of the directory loaded from
        (``ItemFormat.of_model``). Returns the format written."""
        path = absolute(path)
        if item_format is None:
            item_format = (
                ItemFormat.of_model(self.source_dir, self.config.vision)[0]
                if self.source_dir
                else ItemFormat.for_vision(self.config.vision)
            )
        item_format.check_vision(self.config.vision)
        host = jax.device_get(self.params)
        save_hf_checkpoint(
            path,
            {k: host[k] for k in BACKBONE},
            self.config,
            lora_alpha=self.options.lora_alpha,
            dtype=np.dtype(_dtype(dtype)),
            side_files_from=self.source_dir,
        )
        if self.source_dir:  # a training workdir keeps its tokenizer in tokenizer/
            copy_side_files(Workdir(self.source_dir).tokenizer, path)
        item_format.save(path)
        _write_preprocessor_config(path, item_format)
        write_head(path, host)
        fields = dataclasses.asdict(self.options)
        fields["lora_targets"] = list(fields["lora_targets"])
        with open(os.path.join(path, ENCODER_FILE), "w", encoding="utf-8") as f:
            json.dump({"format": "jfe-jax encoder", "options": fields}, f, indent=2)
        return item_format

    # ------------------------------------------------------------------ running

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        """Checks reference-style arrays and packs them; patch budget rounded to a power of two."""
        batch = prepare_batch(self.config, input_ids, attention_mask, pixel_values, image_grid_thw)
        if batch.pixel_values is not None:
            needed = batch.pixel_values.shape[1]
            budget = max(16, 2 ** math.ceil(math.log2(needed)))
            batch = prepare_batch(
                self.config,
                input_ids,
                attention_mask,
                pixel_values,
                image_grid_thw,
                num_patches=budget,
            )
        return batch

    def hidden_states(
        self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None
    ) -> np.ndarray:
        """Final-layer hidden states ``[B, L, H]`` as float32 numpy."""
        batch = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw)
        return np.asarray(self._hidden(self.params, batch))

    def embed(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        *,
        pack_vision: bool = True,
    ) -> np.ndarray:
        """Pooled (last real token), optionally projected, L2-normalised embeddings ``[B, D]``.

        ``pack_vision`` (default): run the vision tower on the batch's images laid densely into
        their own rows (``jfe_jax.models.packing.pack_vision``; the row count rounded up by
        ``coarse_row_count``, so a few shapes compile) instead of on every text row's patch
        budget; the same embeddings (tested to 2e-5) for less work. False runs the batch as
        ``prepare`` lays it out.
        """
        batch = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw)
        if pack_vision:
            from jfe_jax.models.packing import pack_vision as pack

            batch = pack(batch, coarse=True)
        return np.asarray(self._embed(self.params, batch))

    def encode(
        self,
        texts: str | Sequence[str] | None = None,
        images: Any = None,
        instruction: str | Sequence[str | None] | None = None,
        *,
        batch_size: int = 32,
        **options: Any,
    ) -> np.ndarray:
        """Embeddings ``[n, D]`` (float32, unit norm) of ``n`` items, in order.

        ``texts``: a list of strings; ``images``: a list of PIL images, uint8 arrays (H, W, C)
        or image file paths. Give one of them for text-only or image-only items, or both, of
        the same length, for image + text pairs (e.g. an image and a question about it).
        ``instruction``: the task instruction prefixed to every item (a string), or one per
        item (a list; None for none), as in stage-2 training's queries. A single string, image
        or path is taken as a list of one.

        Items are laid out in the item format the model was trained with (its
        ``jfe_item_format.json``, a workdir's training config, or its
        ``preprocessor_config.json``; see ``embedder_for``), and run data-parallel on this
        host's devices, ``batch_size`` at a time. ``options``: ``embedder_for`` overrides
        (``image_root``, ``pack_vision``, ``tokenizer``: a directory with tokenizer.json, needed
        by an encoder built in memory; ``ItemFormat`` fields such as ``prompt``). The same
        as ``embedder_for(encoder, ...).embed([Item(text, image, instruction), ...])``.
        """
        from jfe_jax.index.embedder import Item

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not self.source_dir and options.get("tokenizer") is None:
            raise ValueError(
                "this encoder was built in memory (Encoder.init or Encoder(config, params)), so "
                "it has no tokenizer beside its weights: pass encode(..., tokenizer=DIR) with a "
                "directory holding tokenizer.json (e.g. the Qwen2-VL checkpoint's), or load the "
                "model with Encoder.from_pretrained(DIR)"
            )
        texts = _as_list(texts, "texts", lambda x: isinstance(x, str))
        images = _as_list(images, "images", _is_one_image)
        if texts is None and images is None:
            raise ValueError("encode needs texts=[...], images=[...] or both")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(
                f"got {len(texts)} texts and {len(images)} images; image + text pairs need "
                "lists of the same length (or pass only one of them)"
            )
        n = len(texts if texts is not None else images)
        if n == 0:
            raise ValueError("encode got empty lists; expected at least one text or image")
        if instruction is None or isinstance(instruction, str):
            instructions = [instruction] * n
        else:
            instructions = list(instruction)
            if len(instructions) != n:
                raise ValueError(
                    f"got {len(instructions)} instructions for {n} items; pass one string "
                    "for all, or a list with one per item"
                )
        key = (id(self.params), batch_size, tuple(sorted((k, repr(v)) for k, v in options.items())))
        cached = self._embedders.get(key)
        if cached is None or cached[0] is not self.params:
            self._embedders.clear()  # one live embedder: each holds a copy of the params
            cached = (self.params, embedder_for(self, batch_size=batch_size, **options))
            self._embedders[key] = cached
        items = [
            Item(
                texts[i] if texts is not None else None,
                images[i] if images is not None else None,
                instructions[i],
            )
            for i in range(n)
        ]
        return cached[1].embed(items)

    def num_params(self, backbone_only: bool = True) -> int:
        tree = {k: self.params[k] for k in BACKBONE} if backbone_only else self.params
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _is_one_image(value: Any) -> bool:
    """A single image rather than a list of them: a PIL image, a path, an (H, W[, C]) array."""
    if isinstance(value, np.ndarray):
        return value.ndim in (2, 3)
    return isinstance(value, str | os.PathLike | Image.Image)


def _as_list(value: Any, name: str, is_one) -> list | None:
    """``value`` as a list (a single item wrapped); ValueError for what is not a sequence."""
    if value is None:
        return None
    if is_one(value):
        return [value]
    if isinstance(value, np.ndarray) and value.ndim == 4:
        return list(value)  # a stack of same-size images
    if not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list; got {type(value).__name__}")
    return list(value)


def embedder_for(model: str | Encoder, **overrides: Any) -> ItemEmbedder:
    """The one way to get an ``ItemEmbedder`` for a model: with the item format it was trained
    with (``ItemFormat.of_model``: its ``jfe_item_format.json``, else a workdir's config.json,
    else its ``preprocessor_config.json``, else Qwen2-VL's defaults), logged in one line.

    ``overrides``: embedder options (``batch_size``, ``image_root``, ``tokenizer``,
    ``pack_vision``) and ``ItemFormat`` fields (e.g. ``prompt``, ``pack``), which win.
    ``mesh`` (with a model path): load the params into their shards over this host's mesh
    (``Encoder.from_pretrained(mesh=)``) instead of a replicated copy on every device.
    """
    from jfe_jax.index.embedder import ItemEmbedder  # the item pipeline, on first use

    mesh = overrides.pop("mesh", None)
    if isinstance(model, Encoder):
        if mesh is not None:
            raise ValueError("mesh= applies to a model path; an Encoder keeps its own mesh")
        encoder = model
    else:
        encoder = Encoder.from_pretrained(model, mesh=mesh)
    if encoder.source_dir:
        item_format, origin = ItemFormat.of_model(encoder.source_dir, encoder.config.vision)
    else:
        item_format, origin = ItemFormat.for_vision(encoder.config.vision), "defaults (no files)"
    changed = sorted(set(overrides) & {f.name for f in dataclasses.fields(ItemFormat)})
    embedder = ItemEmbedder(encoder, item_format, **overrides)
    log.info(
        "item format from %s%s: %s",
        origin,
        f", with {', '.join(changed)} overridden" if changed else "",
        embedder.format.describe(),
    )
    return embedder
