"""The Qwen2-VL vision tower: patch embedding, ViT blocks with 2-D rotary positions, 2x2 merger.

Images arrive packed per batch row: ``pixel_values [B, P, patch_dim]`` holds the patches of every
image of row b (in the image processor's merge-block order) followed by padding, and
``patch_segment_ids [B, P]`` says which image of the row each patch belongs to (1, 2, ...; 0 for
padding). Attention stays inside each image, exactly like the reference's ``cu_seqlens``, and the
batch axis shards like any other activation. The rows may also be vision rows
(``packing.pack_vision``): images of many text rows densely packed, or per-image blocks whose
every row is one image, so that the score matrix is that image's own and none is masked.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfe_jax.models import axes
from jfe_jax.models.config import VisionConfig
from jfe_jax.models.layers import (
    LayerNorm,
    Linear,
    apply_rotary,
    attention,
    run_layers,
    stack_layers,
)

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def vision_rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Axial 2-D rotary angles: ``positions [B, P, 2]`` (row, col) -> cos, sin ``[B, P, head_dim]``.

    A quarter of the head's frequencies rotate with the row, a quarter with the column, and the
    half is repeated, as the reference's ``Qwen2VLVisionRotaryEmbedding``.
    """
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, P, 2, head_dim/4]
    freqs = jnp.concatenate([freqs[..., 0, :], freqs[..., 1, :]], axis=-1)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


class VisionBlock(nn.Module):
    """Pre-norm ViT block: LayerNorm -> attention with rotary q/k -> LayerNorm -> MLP."""

    # The encoder's options (``EncoderOptions``), handed down; no defaults of their own.
    config: VisionConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str  # one of layers.ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, length, _ = x.shape
        h = LayerNorm(name="norm1", **kw)(x)
        qkv = Linear(3 * cfg.embed_dim, kernel_axes=(axes.V_EMBED, axes.V_QKV), name="qkv", **kw)(h)
        qkv = qkv.reshape(batch, length, 3, cfg.num_heads, cfg.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        h = attention(q, k, v, mask, dtype=self.dtype, impl=self.attention_impl).reshape(
            batch, length, cfg.embed_dim
        )
        h = Linear(cfg.embed_dim, kernel_axes=(axes.V_QKV, axes.V_EMBED), name="proj", **kw)(h)
        x = x + h
        h = LayerNorm(name="norm2", **kw)(x)
        h = Linear(
            cfg.embed_dim * cfg.mlp_ratio, kernel_axes=(axes.V_EMBED, axes.V_MLP), name="fc1", **kw
        )(h)
        h = quick_gelu(h)
        h = Linear(cfg.embed_dim, kernel_axes=(axes.V_MLP, axes.V_EMBED), name="fc2", **kw)(h)
        x = x + h
        x = axes.constrain(x, (axes.ACT_BATCH, axes.ACT_PATCHES, axes.ACT_EMBED))
        return x, None


class VisionTower(nn.Module):
    """Pixels -> merged image tokens in the LLM width.

    ``__call__(pixel_values [B,P,patch_dim], patch_segment_ids [B,P], patch_positions [B,P,2])``
    returns ``[B, P // merge**2, out_dim]``: the merged token k of row b is the k-th image token
    of that row, in order.
    """

    # The encoder's options (``EncoderOptions``), handed down; no defaults of their own.
    config: VisionConfig
    dtype: Dtype
    param_dtype: Dtype
    scan_layers: bool
    remat: str
    attention_impl: str  # one of layers.ATTENTION_IMPLS

    @nn.compact
    def __call__(self, pixel_values, patch_segment_ids, patch_positions):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, num_patches, _ = pixel_values.shape
        merge = cfg.spatial_merge_size**2
        if num_patches % merge:
            raise ValueError(
                f"patch budget {num_patches} is not a multiple of merge_size**2 = {merge}"
            )
        # The reference's Conv3d has stride == kernel, i.e. one matmul per flattened patch.
        x = Linear(
            cfg.embed_dim,
            use_bias=False,
            kernel_axes=(axes.PATCH, axes.V_EMBED),
            name="patch_embed",
            **kw,
        )(pixel_values)
        x = axes.constrain(x, (axes.ACT_BATCH, axes.ACT_PATCHES, axes.ACT_EMBED))
        cos, sin = vision_rotary(patch_positions, cfg.head_dim, cfg.rope_theta)
        # Padding patches (segment 0) attend among themselves; they are dropped after the merger.
        mask = patch_segment_ids[:, :, None] == patch_segment_ids[:, None, :]
        blocks = stack_layers(
            VisionBlock,
            num_layers=cfg.depth,
            scan=self.scan_layers,
            remat=self.remat,
            broadcast_args=3,
            name_prefix="blocks",
            parent_kwargs=dict(config=cfg, attention_impl=self.attention_impl, **kw),
        )
        x = run_layers(blocks, x, mask, cos, sin)
        # Patch merger: LayerNorm, group each 2x2 block of patches, MLP into the LLM width.
        x = LayerNorm(name="merger_norm", **kw)(x)
        x = x.reshape(batch, num_patches // merge, merge * cfg.embed_dim)
        x = Linear(
            merge * cfg.embed_dim, kernel_axes=(axes.V_EMBED, axes.MERGED), name="merger_fc1", **kw
        )(x)
        x = jax.nn.gelu(x, approximate=False)
        x = Linear(cfg.out_dim, kernel_axes=(axes.MERGED, axes.EMBED), name="merger_fc2", **kw)(x)
        return axes.constrain(x, (axes.ACT_BATCH, axes.ACT_PATCHES, axes.ACT_EMBED))
