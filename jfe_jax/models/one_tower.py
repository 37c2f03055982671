"""The JFE one-tower encoder: Qwen2-VL reads image and text as one sequence, the last token embeds.

``OneTowerEncoder.apply(variables, batch)`` returns ``(embedding, out)``: the L2-normalised
embedding ``[B, D]`` and a dict of named intermediates (``last_hidden_state``, ``pooled``).
The batch is a typed batch (``jfe_jax.models.batches``), as ``jfe_jax.models.inputs.prepare_batch``
or the data pipeline makes it (``as_batch`` types a dict of the former layout).
A packed batch (``jfe_jax.models.packing``: several items per row, with ``segment_ids``,
``pool_index [N, 2]`` and ``item_mask [N]``) gives ``[N, D]``, one embedding per item in order.
A vision-packed batch (``packing.pack_vision``) runs the tower on its vision rows, group by
group, and gathers each text row's image tokens by ``image_token_index``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfe_jax.models import axes
from jfe_jax.models.batches import (
    EarlyBatch,
    EarlyFusionBatch,
    LateFusionBatch,
    ModelBatch,
    PackedBatch,
    VisionPackedBatch,
    text_rows,
)
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.language import LORA_TARGETS_ALL, LanguageModel
from jfe_jax.models.layers import Linear, check_attention_impl
from jfe_jax.models.vision import VisionTower
from jfe_jax.train import config_base


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """``[B, 2]`` (row, position) of each row's last real token (left or right padding)."""
    batch, length = attention_mask.shape
    positions = jnp.where(attention_mask.astype(bool), jnp.arange(length)[None, :], -1)
    return jnp.stack([jnp.arange(batch), jnp.max(positions, axis=1)], axis=-1)


def pool_at(hidden_states: jax.Array, pool_index: jax.Array) -> jax.Array:
    """Packed pooling: ``hidden_states [R, L, H]`` at ``pool_index [N, 2]`` (row, position)
    -> ``[N, H]``, one vector per item in item order."""
    return hidden_states[pool_index[:, 0], pool_index[:, 1]]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class OneTowerEncoder(nn.Module):
    """Early-fusion retriever over a Qwen2-VL backbone.

    Attributes:
      config: the backbone's architecture.
      options: how it is run and what sits on top (``EncoderOptions``). ``dtype`` is the
        compute dtype of the matmuls (norms, softmax, pooling and the output are float32);
        ``temperature`` is stored as the ``logit_scale`` = log(1 / temperature) param (the
        trainer decides whether it learns).
    """

    config: ModelConfig
    options: EncoderOptions

    def setup(self):
        cfg, options = self.config, self.options
        kw = dict(dtype=_dtype(options.dtype), param_dtype=_dtype(options.param_dtype))
        layout = dict(
            scan_layers=options.scan_layers,
            remat=options.remat,
            attention_impl=options.attention_impl,
        )
        self.vision = VisionTower(cfg.vision, **layout, **kw)
        self.text = LanguageModel(
            cfg.text,
            image_token_id=cfg.image_token_id,
            tie_word_embeddings=cfg.tie_word_embeddings,
            lora_rank=options.lora_rank,
            lora_alpha=options.lora_alpha,
            lora_targets=options.lora_targets,
            **layout,
            **kw,
        )
        if options.projection_dim:
            self.projection = Linear(
                options.projection_dim, use_bias=False, kernel_axes=(axes.EMBED, axes.PROJ), **kw
            )
        self.logit_scale = self.param(
            "logit_scale",
            axes.param_init(nn.initializers.constant(math.log(1.0 / options.temperature)), ()),
            (),
            jnp.float32,
        )

    def image_features(self, batch: EarlyFusionBatch) -> jax.Array | None:
        """The vision tower's merged image tokens ``[B, P // merge**2, H]``; None without images.

        Computed apart, they can be fed back through ``image_features=`` (the train step reuses
        a frozen tower's output across the gradient cache's two passes).
        """
        if isinstance(batch, VisionPackedBatch):  # images in their own rows (pack_vision)
            # One tower call per group of vision rows: the masked rows, and each per-image
            # block group (rows of one image size), whose attention is the image's own.
            width = self.config.vision.out_dim
            flat = jnp.concatenate(
                [self.vision(*group.arrays()).reshape(-1, width) for group in batch.groups()]
            )
            return jnp.take(flat, batch.image_token_index, axis=0)
        if not isinstance(batch, EarlyBatch):
            raise ValueError(f"image_features takes an early-fusion batch, got {type(batch)}")
        if not batch.has_pixels:
            return None
        return self.vision(batch.pixel_values, batch.patch_segment_ids, batch.patch_positions)

    def hidden_states(
        self,
        batch: EarlyFusionBatch,
        image_features: jax.Array | None = None,
        pool_index: jax.Array | None = None,
    ) -> jax.Array:
        """Final-layer hidden states ``[B, L, H]`` of the fused image+text sequence.

        ``image_features``: this batch's ``image_features(batch)``, precomputed; None runs the
        vision tower here. ``pool_index [N, 2]``: only the states at those (row, position)
        tokens, ``[N, H]`` (``LanguageModel(pool_index=)``).
        """
        if image_features is None:
            image_features = self.image_features(batch)
        rows = text_rows(batch)
        return self.text(
            rows.input_ids,
            rows.attention_mask,
            rows.position_ids,
            image_features,
            segment_ids=rows.segment_ids if isinstance(rows, PackedBatch) else None,
            pool_index=pool_index,
        )

    def __call__(
        self,
        batch: ModelBatch,
        image_features: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(embedding [N, D], out)``; ``out`` holds ``pooled`` and, with ``return_hidden``,
        ``last_hidden_state [B, L, H]``. Without it the last layer runs only at the pooled
        tokens (``LanguageModel(pool_index=)``): the same embeddings for less work."""
        if isinstance(batch, LateFusionBatch):
            if image_features is not None:
                raise ValueError("precomputed image_features are for early-fusion batches only")
            return self.late_fusion(batch)
        rows = text_rows(batch)
        if isinstance(rows, PackedBatch):
            pool_index = rows.pool_index
        else:
            pool_index = last_token_index(rows.attention_mask)
        out = {}
        if return_hidden:
            out["last_hidden_state"] = self.hidden_states(batch, image_features)
            pooled = pool_at(out["last_hidden_state"], pool_index)
        else:
            pooled = self.hidden_states(batch, image_features, pool_index)
        out["pooled"] = pooled
        features = self.projection(pooled) if self.options.projection_dim else pooled
        embedding = l2_normalize(features)
        if isinstance(rows, PackedBatch):
            # Slots that only pad N to a static item count embed to zero.
            embedding = jnp.where(rows.item_mask[:, None].astype(bool), embedding, 0.0)
        return embedding, out

    def late_fusion(self, batch: LateFusionBatch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The late-fusion baseline (``jfe_jax.data.late_fusion``): text and image parts
        embedded apart by this same tower, summed where present, renormalised. A part no row
        has (None) is not run; its embedding is absent from the returned dict."""
        fused, out = 0.0, {}
        for name, part, present in (
            ("text", batch.text, batch.has_text),
            ("image", batch.image, batch.has_image),
        ):
            if part is None:
                continue
            out[f"{name}_embedding"], _ = self(part)
            fused = fused + present[:, None] * out[f"{name}_embedding"]
        return l2_normalize(fused), out

    def scale(self) -> jax.Array:
        """``exp(logit_scale)`` = 1 / temperature."""
        return jnp.exp(self.logit_scale)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str | Any) -> Any:
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return name


_DEFAULTS = config_base.DEFAULTS.model
# A layout option changes how the model runs or is stored, not what it computes: the
# fingerprint leaves it out (temperature only seeds logit_scale, a param the fingerprint hashes).
_LAYOUT = {"layout": True}


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
    """How the backbone is run and what sits on top of it (``OneTowerEncoder``).

    Each field is the training config's ``model.<name>``, declared and commented in
    ``jfe_jax.train.config_base``, whose value is its default here. Fields with
    ``metadata["layout"]`` do not change what the model computes.
    """

    dtype: str = _DEFAULTS.dtype
    param_dtype: str = _DEFAULTS.param_dtype
    scan_layers: bool = dataclasses.field(default=_DEFAULTS.scan_layers, metadata=_LAYOUT)
    remat: str = dataclasses.field(default=_DEFAULTS.remat, metadata=_LAYOUT)
    lora_rank: int = _DEFAULTS.lora_rank
    lora_alpha: float = _DEFAULTS.lora_alpha
    lora_targets: tuple[str, ...] = _DEFAULTS.lora_targets
    projection_dim: int = _DEFAULTS.projection_dim
    temperature: float = dataclasses.field(default=_DEFAULTS.temperature, metadata=_LAYOUT)
    attention_impl: str = dataclasses.field(default=_DEFAULTS.attention_impl, metadata=_LAYOUT)

    def __post_init__(self):
        # A list (from JSON) becomes a tuple: the options are hashed as a module field.
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        unknown = set(self.lora_targets) - set(LORA_TARGETS_ALL)
        if unknown:
            raise ValueError(
                f"unknown LoRA targets {sorted(unknown)}; expected some of {list(LORA_TARGETS_ALL)}"
            )
        check_attention_impl(self.attention_impl)

    @classmethod
    def from_config(cls, model_cfg: Any) -> EncoderOptions:
        """The options of a training config's ``model`` section (a ConfigDict or a mapping).
        A field the section lacks (a run config saved before the field existed) takes its
        default, which that run ran."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: model_cfg[name] for name in names if name in model_cfg})

    @classmethod
    def layout_fields(cls) -> tuple[str, ...]:
        """The fields that do not change what the model computes (``metadata["layout"]``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("layout"))

    def module(self, config: ModelConfig) -> OneTowerEncoder:
        """The encoder module of architecture ``config`` run with these options."""
        return OneTowerEncoder(config, self)
