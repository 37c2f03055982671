"""MIRe's model: the towers, the pooling and the score behind one object.

``MIRe.from_pretrained(colbert_dir, clip_dir, pooling=None)`` reads a ColBERTv2 checkpoint in
Hugging Face layout (``config.json``, ``model.safetensors`` or ``pytorch_model.bin`` holding
``bert.*`` and ``linear.weight``, the BERT tokenizer files; a ``.bin`` is read without running
its pickle), a CLIP checkpoint (``CLIPVisionModel`` or
``CLIPModel``, safetensors) and MIRe's pooling weights (a safetensors file named as the
reference's ``QueryGuidedAttentivePooling`` state dict, ``proj.0.weight`` ..., a directory or
one file); without
``pooling`` the pooling is freshly initialised (stage 1 trains it). ``save_pretrained`` writes
the three back in the same layouts, with MIRe's own settings (pooling sizes, mask mode, maximum
lengths) in ``mire_settings.json`` beside the pooling weights, which ``from_pretrained`` reads.

Embeddings (``../shared/MIRE.md`` section 1.5), all vectors L2-normalised with a mask:

* query with an image: ``[16 global; 12 query-guided; Lq text]`` vectors (the 28 visual ones
  only with ``stage="alignment"``); without an image: its text vectors (plain ColBERT); in a
  batch that mixes both, a text-only query's visual vectors are masked out;
* document: its text vectors, masked at padding and punctuation; with an image, the global and
  prompt-guided tokens of that image (the fixed prompt "Can you describe the primary elements in
  this image?" as the query text) are prepended.

``score`` is the MaxSim matrix (``score.maxsim_scores``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jfe_jax.models.mire.mismatch import raise_if_mismatched
from jfe_jax.models.mire.pooling import QueryGuidedAttentivePooling, check_mask_mode
from jfe_jax.models.mire.score import maxsim_scores
from jfe_jax.models.mire.text import (
    BertConfig,
    ColBERTEncoder,
    colbert_from_torch,
    colbert_to_torch,
    token_vectors,
)
from jfe_jax.models.mire.tokens import ColBERTTokenizer
from jfe_jax.models.mire.vision import (
    CLIPImageProcessor,
    CLIPVision,
    CLIPVisionConfig,
    clip_from_torch,
    clip_to_torch,
    mire_visual_features,
)
from jfe_jax.models.safetensors_io import SafetensorsFile, open_checkpoint, save_checkpoint
from jfe_jax.models.torch_pickle import read_torch_state_dict

DOC_IMAGE_PROMPT = "Can you describe the primary elements in this image?"
CONFIG_FILE = "mire_config.json"
# MIRe's own settings (every MIReConfig field but the towers', which their config.json files
# carry), written beside the pooling weights by save_pretrained.
SETTINGS_FILE = "mire_settings.json"
_TOWERS = ("text", "vision")


@dataclasses.dataclass(frozen=True)
class MIReConfig:
    """The towers' architectures and MIRe's settings."""

    text: BertConfig = BertConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    num_tokens: int = 16
    num_heads: int = 12
    query_maxlen: int = 64
    doc_maxlen: int = 384
    mask_mode: str = "consistent"

    def __post_init__(self):
        check_mask_mode(self.mask_mode)


_TINY_BERT = BertConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, dim=128
)
_TINY_CLIP = CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
SIZES: dict[str, MIReConfig] = {
    # Tests and CPU runs.
    "mire-tiny": MIReConfig(text=_TINY_BERT, vision=_TINY_CLIP, num_tokens=4, num_heads=2),
    "mire-small": MIReConfig(
        text=BertConfig(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
        ),
        vision=CLIPVisionConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
        ),
    ),
    # The paper's: BERT-base (colbertv2.0) with CLIP ViT-B/32, or with ViT-L/14-336.
    "mire-base": MIReConfig(),
    "mire-large": MIReConfig(
        vision=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        )
    ),
}


def get_mire_size(name: str) -> MIReConfig:
    if name not in SIZES:
        raise ValueError(f"unknown MIRe size {name!r}; expected one of {', '.join(SIZES)}")
    return SIZES[name]


class MIReModel(nn.Module):
    """The three modules under one parameter tree: ``colbert``, ``clip`` and ``pooling``."""

    config: MIReConfig

    def setup(self):
        c = self.config
        self.colbert = ColBERTEncoder(c.text)
        self.clip = CLIPVision(c.vision)
        self.pooling = QueryGuidedAttentivePooling(
            num_tokens=c.num_tokens,
            num_heads=c.num_heads,
            out_dim=c.text.dim,
            mask_mode=c.mask_mode,
        )

    def text(self, ids, mask):
        """ColBERT projections times the mask, not normalised: ``[B, L, dim]``."""
        return self.colbert(ids, mask) * mask[..., None].astype(jnp.float32)

    def visual(self, pixel_values):
        return mire_visual_features(self.clip(pixel_values)[0])

    def pooled(self, text, visual, mask):
        return self.pooling(text, visual, mask)

    def __call__(self, ids, mask, pixel_values):  # init: every parameter
        text = self.text(ids, mask)
        return self.pooled(text, self.visual(pixel_values), mask)


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


def _init(config: MIReConfig, key: jax.Array, *, only: str | None = None) -> dict:
    """Random parameters of the model (or of its ``only`` submodule's tree)."""
    size = config.vision.image_size
    args = (
        jnp.zeros((1, 4), jnp.int32),
        jnp.ones((1, 4), jnp.int32),
        jnp.zeros((1, 3, size, size)),
    )
    params = MIReModel(config).init(key, *args)
    return params if only is None else {"params": {only: params["params"][only]}}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(model: MIReModel, method: str, params: Any, *args: jax.Array) -> jax.Array:
    """``model``'s ``method`` jitted once per config (models of equal configs share it)."""
    return model.apply(params, *args, method=getattr(MIReModel, method))


class MIRe:
    """MIRe for inference: ``encode_queries``, ``encode_documents`` and ``score`` (module
    docstring). Build with ``from_pretrained`` or ``MIRe(config, params, tokenizer)``."""

    def __init__(self, config: MIReConfig, params: Mapping[str, Any], tokenizer: Any):
        self.config = config
        self.params = params
        self.model = MIReModel(config)
        self.tokens = ColBERTTokenizer(
            tokenizer,
            query_maxlen=config.query_maxlen,
            doc_maxlen=config.doc_maxlen,
            mask_mode=config.mask_mode,
        )
        self.processor = CLIPImageProcessor(
            size=config.vision.image_size, crop_size=config.vision.image_size
        )
        self._text = functools.partial(_apply, self.model, "text")
        self._visual = functools.partial(_apply, self.model, "visual")
        self._pooled = functools.partial(_apply, self.model, "pooled")

    @classmethod
    def init(cls, config: MIReConfig, tokenizer: Any, seed: int = 0) -> MIRe:
        """Random parameters (tests, and stage 1's freshly initialised pooling)."""
        params = jax.jit(functools.partial(_init, config))(jax.random.key(seed))
        return cls(config, nn.meta.unbox(params), tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        colbert_dir: str,
        clip_dir: str,
        pooling: str | None = None,
        *,
        num_tokens: int | None = None,
        num_heads: int | None = None,
        query_maxlen: int | None = None,
        doc_maxlen: int | None = None,
        mask_mode: str | None = None,
        seed: int = 0,
    ) -> MIRe:
        """Reads the three checkpoints (module docstring); ValueError naming the file and every
        missing, extra or mis-shaped tensor.

        MIRe's settings (``num_tokens`` ... ``mask_mode``) come from the ``mire_settings.json``
        that ``save_pretrained`` writes beside the pooling weights; a setting given here that
        differs from the saved one is refused. Without that file (the reference's weights, one
        safetensors file, or no pooling) a setting not given is ``MIReConfig``'s default."""
        from transformers import AutoTokenizer

        text_hf = _read_json(os.path.join(colbert_dir, "config.json"))
        colbert_state = _read_dir(colbert_dir)
        if "linear.weight" not in colbert_state:
            raise ValueError(f"{colbert_dir} has no linear.weight: not a ColBERT checkpoint")
        dim = colbert_state["linear.weight"].shape[0]
        given = dict(
            num_tokens=num_tokens,
            num_heads=num_heads,
            query_maxlen=query_maxlen,
            doc_maxlen=doc_maxlen,
            mask_mode=mask_mode,
        )
        config = MIReConfig(
            text=BertConfig.from_hf(text_hf, dim=dim),
            vision=CLIPVisionConfig.from_hf(_read_json(os.path.join(clip_dir, "config.json"))),
            **_settings(pooling, {k: v for k, v in given.items() if v is not None}),
        )
        tokenizer = AutoTokenizer.from_pretrained(colbert_dir)
        # The towers are read; only the pooling may need initialising (no checkpoint given).
        template = jax.eval_shape(functools.partial(_init, config), jax.random.key(seed))
        params = dict(nn.meta.unbox(template)["params"])
        params["colbert"] = colbert_from_torch(colbert_state, config.text, source=colbert_dir)[
            "params"
        ]
        params["clip"] = clip_from_torch(_read_dir(clip_dir), config.vision, source=clip_dir)[
            "params"
        ]
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
        return cls(config, {"params": params}, tokenizer)

    def save_pretrained(self, directory: str) -> None:
        """``colbert/``, ``clip/`` (safetensors with their config.json; the tokenizer next to
        ColBERT) and ``pooling/`` (with MIRe's settings, ``mire_settings.json``) under
        ``directory``: ``from_pretrained`` reads them back, every config field included."""
        p = self.params["params"]
        save_checkpoint(
            os.path.join(directory, "colbert"), colbert_to_torch({"params": p["colbert"]})
        )
        save_checkpoint(os.path.join(directory, "clip"), clip_to_torch({"params": p["clip"]}))
        text = dataclasses.asdict(self.config.text)
        text.pop("dim")
        with open(os.path.join(directory, "colbert", "config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(text, model_type="bert", hidden_act="gelu"), f, indent=2)
        vision = dataclasses.asdict(self.config.vision)
        with open(os.path.join(directory, "clip", "config.json"), "w", encoding="utf-8") as f:
            json.dump(
                dict(vision, model_type="clip_vision_model", hidden_act="quick_gelu"), f, indent=2
            )
        self.tokens.tokenizer.save_pretrained(os.path.join(directory, "colbert"))
        save_checkpoint(os.path.join(directory, "pooling"), pooling_to_torch(p["pooling"]))
        settings = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if f.name not in _TOWERS
        }
        with open(os.path.join(directory, "pooling", SETTINGS_FILE), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)

    def save_checkpoint(self, directory: str) -> None:
        """The whole model for training: parameters as an Orbax checkpoint (``params/``), the
        config (``mire_config.json``) and the tokenizer; ``from_checkpoint`` restores it."""
        import orbax.checkpoint as ocp

        directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(directory, "params"), self.params, force=True)
        checkpointer.wait_until_finished()
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self.config), f, indent=2)
        self.tokens.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))

    @classmethod
    def from_checkpoint(cls, directory: str, *, shardings: Any = None) -> MIRe:
        """A ``save_checkpoint`` directory back; ``shardings`` (a tree like the parameters')
        restores each array straight into its devices."""
        import orbax.checkpoint as ocp
        from transformers import AutoTokenizer

        directory = os.path.abspath(directory)
        config = _read_json(os.path.join(directory, CONFIG_FILE))
        config = MIReConfig(
            text=BertConfig(**config.pop("text")),
            vision=CLIPVisionConfig(**config.pop("vision")),
            **config,
        )
        template = nn.meta.unbox(
            jax.eval_shape(functools.partial(_init, config), jax.random.key(0))
        )
        if shardings is not None:
            template = jax.tree.map(
                lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), template, shardings
            )
        params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), template)
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
        return cls(config, params, tokenizer)

    # --- embeddings ------------------------------------------------------------------------------

    def _pixels(self, images: Sequence[Any]) -> jax.Array:
        return jnp.asarray(self.processor(list(images)))

    def _visual_tokens(
        self, text: jax.Array, mask: jax.Array, images: Sequence[Any]
    ) -> tuple[jax.Array, np.ndarray]:
        """The pooling's ``[n, T + H, dim]`` tokens (not normalised) and their mask: 1 for an
        item with an image, 0 (zero vectors) for one without (``images[i] is None``), whose
        text alone is then what it is scored by."""
        rows = [i for i, image in enumerate(images) if image is not None]
        visual = self._visual(self.params, self._pixels([images[i] for i in rows]))
        pooled = self._pooled(self.params, text[np.asarray(rows)], visual, mask[np.asarray(rows)])
        if len(rows) == len(images):
            return pooled, np.ones(pooled.shape[:2], np.int32)
        tokens = jnp.zeros((len(images), *pooled.shape[1:]), pooled.dtype)
        tokens_mask = np.zeros((len(images), pooled.shape[1]), np.int32)
        tokens_mask[rows] = 1
        return tokens.at[np.asarray(rows)].set(pooled), tokens_mask

    def encode_queries(
        self, texts: Sequence[str], images: Sequence[Any] | None = None, *, stage: str = "search"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors [n, V, dim], mask [n, V])``: with images, V = tokens + heads + Lq
        (``stage="alignment"``: the visual ones only); without, V = Lq. ``images`` may mix
        images and ``None`` (a text-only query): the text-only queries' visual tokens are
        masked, so every query scores as it would alone."""
        if stage not in ("search", "alignment"):
            raise ValueError(f"stage={stage!r}; expected 'search' or 'alignment'")
        if images is not None and len(images) != len(texts):
            raise ValueError(f"{len(texts)} query texts but {len(images)} images")
        if images is not None and all(image is None for image in images):
            images = None
        if stage == "alignment" and images is not None and None in images:
            raise ValueError(
                f"stage='alignment' embeds image queries only; query {list(images).index(None)} "
                "has no image"
            )
        ids, mask = self.tokens.queries(texts)
        text = self._text(self.params, jnp.asarray(ids), jnp.asarray(mask))
        if images is None:
            return np.asarray(token_vectors(text, jnp.asarray(mask))), mask
        tokens, tokens_mask = self._visual_tokens(text, jnp.asarray(mask), images)
        if stage == "alignment":
            return np.asarray(token_vectors(tokens, jnp.asarray(tokens_mask))), tokens_mask
        vectors = jnp.concatenate([tokens, text], axis=1)
        full = np.concatenate([tokens_mask, mask], axis=1)
        return np.asarray(token_vectors(vectors, jnp.asarray(full))), full

    def encode_documents(
        self, texts: Sequence[str], images: Sequence[Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors [n, V, dim], mask [n, V])``: the text vectors (padding and punctuation
        masked), after the image's global and prompt-guided tokens when images are given
        (masked for a document whose image is ``None``)."""
        if images is not None and len(images) != len(texts):
            raise ValueError(f"{len(texts)} document texts but {len(images)} images")
        ids, attention, keep = self.tokens.documents(texts)
        text = self._text(self.params, jnp.asarray(ids), jnp.asarray(attention))
        vectors, mask = token_vectors(text, jnp.asarray(keep)), keep
        if images is None or all(image is None for image in images):
            return np.asarray(vectors), mask
        p_ids, p_mask = self.tokens.queries([DOC_IMAGE_PROMPT] * len(texts))
        prompt = self._text(self.params, jnp.asarray(p_ids), jnp.asarray(p_mask))
        tokens, tokens_mask = self._visual_tokens(prompt, jnp.asarray(p_mask), images)
        tokens = token_vectors(tokens, jnp.asarray(tokens_mask))
        return (
            np.asarray(jnp.concatenate([tokens, vectors], axis=1)),
            np.concatenate([tokens_mask, mask], axis=1),
        )

    def score(
        self,
        queries: tuple[np.ndarray, np.ndarray],
        documents: tuple[np.ndarray, np.ndarray],
        *,
        doc_chunk: int = 256,
    ) -> np.ndarray:
        """The ``[queries, documents]`` MaxSim matrix of two ``encode_*`` results."""
        (q, q_mask), (d, d_mask) = queries, documents
        return np.asarray(maxsim_scores(q, q_mask, d, d_mask, doc_chunk=doc_chunk))
