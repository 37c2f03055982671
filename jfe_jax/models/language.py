"""The Qwen2 decoder of Qwen2-VL with multimodal rotary position embedding (M-RoPE).

Image tokens from the vision tower replace the embeddings of the ``<|image_pad|>`` tokens,
then every layer sees text and image together (early fusion).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfe_jax.models import axes
from jfe_jax.models.config import TextConfig
from jfe_jax.models.layers import (
    Linear,
    RMSNorm,
    apply_rotary,
    attention,
    run_layers,
    stack_layers,
)

Dtype = Any

LORA_TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def mrope(position_ids: jax.Array, config: TextConfig) -> tuple[jax.Array, jax.Array]:
    """M-RoPE angles: ``position_ids [3, B, L]`` (temporal, height, width) -> ``[B, L, D]``.

    The head's frequencies are split into ``mrope_section`` chunks; chunk i rotates with
    position stream i % 3, then the half is repeated.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, D/2]
    chunks, start = [], 0
    for i, size in enumerate(config.mrope_section):
        chunks.append(freqs[i % 3, ..., start : start + size])
        start += size
    freqs = jnp.concatenate(chunks, axis=-1)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: RMSNorm -> GQA attention (q/k/v bias) -> RMSNorm -> SwiGLU."""

    # The encoder's options (``EncoderOptions``), handed down; no defaults of their own.
    config: TextConfig
    dtype: Dtype
    param_dtype: Dtype
    lora_rank: int
    lora_alpha: float
    lora_targets: tuple[str, ...]
    attention_impl: str  # one of layers.ATTENTION_IMPLS

    def _linear(self, name, features, kernel_axes, use_bias):
        lora = name in self.lora_targets
        return Linear(
            features,
            use_bias=use_bias,
            kernel_axes=kernel_axes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            lora_rank=self.lora_rank if lora else 0,
            lora_alpha=self.lora_alpha,
            name=name,
        )

    @nn.compact
    def __call__(self, x, mask, cos, sin, query_points=None):
        """``x [B, L, H] -> ([B, L, H], None)``.

        ``query_points [N, 2]`` (row, position): the layer's output only at those tokens,
        ``[N, 1, H]``. Keys and values still come from every token of the rows; the queries,
        the output projection and the MLP run only at the N points. The last layer of an
        encoder that pools one token per item needs no more (``LanguageModel(pool_index=)``).
        """
        cfg = self.config
        norm_kw = dict(eps=cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(name="input_layernorm", **norm_kw)(x)
        h_q, cos_q, sin_q, mask_q, residual = h, cos, sin, mask, x
        if query_points is not None:
            rows, positions = query_points[:, 0], query_points[:, 1]
            h_q, residual = h[rows, positions][:, None], x[rows, positions][:, None]
            cos_q, sin_q = cos[rows, positions][:, None], sin[rows, positions][:, None]
            mask_q = mask[rows, positions][:, None]
        batch, length, _ = h_q.shape
        q = self._linear("q_proj", cfg.num_heads * cfg.head_dim, (axes.EMBED, axes.Q_HEADS), True)(
            h_q
        )
        k = self._linear(
            "k_proj", cfg.num_kv_heads * cfg.head_dim, (axes.EMBED, axes.KV_HEADS), True
        )(h)
        v = self._linear(
            "v_proj", cfg.num_kv_heads * cfg.head_dim, (axes.EMBED, axes.KV_HEADS), True
        )(h)
        q = q.reshape(batch, length, cfg.num_heads, cfg.head_dim)
        k = k.reshape(*x.shape[:2], cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(*x.shape[:2], cfg.num_kv_heads, cfg.head_dim)
        q = axes.constrain(q, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, None))
        q, k = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos, sin)
        if query_points is not None:
            k, v = k[rows], v[rows]
        h = attention(
            q, k, v, mask_q, dtype=self.dtype, impl=self.attention_impl, causal=query_points is None
        )
        h = h.reshape(batch, length, -1)
        h = self._linear("o_proj", cfg.hidden_size, (axes.Q_HEADS, axes.EMBED), False)(h)
        x = residual + h
        h = RMSNorm(name="post_attention_layernorm", **norm_kw)(x)
        gate = self._linear("gate_proj", cfg.intermediate_size, (axes.EMBED, axes.MLP), False)(h)
        up = self._linear("up_proj", cfg.intermediate_size, (axes.EMBED, axes.MLP), False)(h)
        h = jax.nn.silu(gate) * up
        h = axes.constrain(h, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
        h = self._linear("down_proj", cfg.hidden_size, (axes.MLP, axes.EMBED), False)(h)
        x = x + h
        x = axes.constrain(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
        return x, None


class LanguageModel(nn.Module):
    """Token embedding, image-token placement, decoder stack and final RMSNorm."""

    config: TextConfig
    image_token_id: int
    tie_word_embeddings: bool
    # The encoder's options (``EncoderOptions``), handed down; no defaults of their own.
    dtype: Dtype
    param_dtype: Dtype
    scan_layers: bool
    remat: str
    lora_rank: int
    lora_alpha: float
    lora_targets: tuple[str, ...]
    attention_impl: str  # one of layers.ATTENTION_IMPLS

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=axes.param_init(nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.layers = stack_layers(
            DecoderLayer,
            num_layers=cfg.num_layers,
            scan=self.scan_layers,
            remat=self.remat,
            broadcast_args=3,
            name_prefix=None,
            parent_kwargs=dict(
                config=cfg,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                lora_rank=self.lora_rank,
                lora_alpha=self.lora_alpha,
                lora_targets=self.lora_targets,
                attention_impl=self.attention_impl,
            ),
        )
        self.norm = RMSNorm(eps=cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        if not self.tie_word_embeddings:
            # Unused by the encoder; kept so checkpoints round-trip to Hugging Face unchanged.
            self.lm_head = Linear(
                cfg.vocab_size,
                use_bias=False,
                kernel_axes=(axes.EMBED, axes.VOCAB),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )

    def __call__(
        self,
        input_ids,
        attention_mask,
        position_ids,
        image_features=None,
        segment_ids=None,
        pool_index=None,
    ):
        """Final-layer hidden states ``[B, L, H]`` (after the final norm).

        Args:
          input_ids: ``[B, L]`` int.
          attention_mask: ``[B, L]``, 1 for real tokens, 0 for padding (left or right).
          position_ids: ``[B, 3, L]`` M-RoPE positions (``jfe_jax.models.inputs``).
          image_features: ``[B, K, H]`` merged image tokens; the j-th ``<|image_pad|>`` of row b
            takes ``image_features[b, j]``.
          segment_ids: ``[B, L]`` for packed rows (``jfe_jax.models.packing``): tokens attend
            only within their own segment; None: the whole row is one sequence.
          pool_index: ``[N, 2]`` (row, position): return only the final hidden states at these
            tokens, ``[N, H]``. With unrolled layers the last layer then runs its queries and
            MLP only there (the same numbers, less work: the pooled embedding needs no other
            final-layer position); scanned layers run in full and are gathered.
        """
        x = self.embed_tokens(input_ids)
        if image_features is not None:
            is_image = input_ids == self.image_token_id
            index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
            placed = jnp.take_along_axis(image_features, index[..., None], axis=1)
            x = jnp.where(is_image[..., None], placed.astype(x.dtype), x)
        x = axes.constrain(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
        valid = attention_mask.astype(bool)
        length = input_ids.shape[1]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        mask = causal[None] & valid[:, None, :]
        if segment_ids is not None:
            mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        cos, sin = mrope(jnp.swapaxes(position_ids, 0, 1), self.config)
        if pool_index is not None and isinstance(self.layers, (list, tuple)):
            x = run_layers(self.layers[:-1], x, mask, cos, sin)
            x, _ = self.layers[-1](x, mask, cos, sin, pool_index)
            x = self.norm(x[:, 0])
        else:
            x = run_layers(self.layers, x, mask, cos, sin)
            if pool_index is not None:
                x = x[pool_index[:, 0], pool_index[:, 1]]
            x = self.norm(x)
        if self.is_initializing() and not self.tie_word_embeddings:
            self.lm_head(x[..., :1, :])  # create the (unused) head's params at init
        return x

    def logits(self, hidden_states):
        """Next-token logits (not used for retrieval; available for checks and generation)."""
        if self.tie_word_embeddings:
            return self.embed_tokens.attend(hidden_states)
        return self.lm_head(hidden_states)
