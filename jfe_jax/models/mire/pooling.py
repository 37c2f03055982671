"""MIRe's query-guided attentive pooling (QGAP): the "fusion-free modality interaction".

MIRe (Ju, Kim and Lee, ACL 2025) keeps text and image in separate towers. The text query's
ColBERT token vectors read the image through this module and nothing flows back into the
visual features; its outputs are visual tokens prepended to the query's text vectors
(MIRe paper, "fusion-free modality interaction"; reference ``retrievers/mire.py``, class
``QueryGuidedAttentivePooling``):

1. Global tokens: ``split_mlp`` (Linear d_v -> T*d/2, tanh, Linear -> T*d) on the image's class
   token, reshaped to ``[B, T, d]`` (T = 16, d = 128). The text is not involved.
2. Query-guided tokens: the patches go through ``proj`` (LayerNorm eps 1e-5, Linear
   d_v -> 2*H*d, exact-erf GELU), then ``k_state`` and ``v_state`` (Linear 2*H*d -> H*d, no
   bias) give H heads of keys and values. The queries are the text token vectors themselves,
   the same for every head (no query projection); scores ``Q K^T / sqrt(d)``, a masked text
   row filled with -9999 along the whole row, softmax over the patches, ``O = A V``. Each head
   averages its rows over the text positions, then ``o_proj`` (LayerNorm eps 1e-5, Linear
   d -> d): one token per head (H = 12).
3. Output ``[B, T + H, d]``: global tokens, then query-guided tokens. Not normalised here.

The averaging in step 2 is where the reference's training and evaluation differ (its pooling
in ``retrievers/mire.py``): the reference sums *every* text row, masked ones included (each
contributes the mean of V, since its softmax is uniform), and divides by the number of valid
rows. In training no row is masked (the ``[MASK]`` augmentation positions count as valid), so
only evaluation is affected. ``mask_mode`` makes that explicit:

* ``"consistent"`` (default): only valid rows are summed, so the pooled vector is the mean over
  the query's real tokens whatever the padding.
* ``"reference_eval"`` and ``"reference_train"``: the reference's formula, masked rows summed.

Parameter names follow the PyTorch modules (``proj_0`` is ``proj.0``, ...), so converted
weights map one to one. Every Linear is Xavier-uniform with zero bias, every LayerNorm
(1, 0), as in the reference's ``_init_weights``.
"""

from __future__ import annotations

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfe_jax.models.axes import NORM, PROJ, PROJ_OUT, V_EMBED, V_MLP, param_init

MaskMode = Literal["consistent", "reference_eval", "reference_train"]
MASK_MODES: tuple[str, ...] = ("consistent", "reference_eval", "reference_train")
# The reference fills masked score rows (and masked document positions, in MaxSim) with this.
MASK_FILL = -9999.0


def check_mask_mode(mask_mode: str) -> None:
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode={mask_mode!r}; expected one of {', '.join(MASK_MODES)}")


def _linear(
    features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype, param_dtype
) -> nn.Dense:
    """torch.nn.Linear: Xavier-uniform kernel ``[in, out]``, zero bias, logical axis names."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=param_init(nn.initializers.xavier_uniform(), axes),
        bias_init=param_init(nn.initializers.zeros_init(), (axes[1],)),
        dtype=dtype,
        param_dtype=param_dtype,
        precision=jax.lax.Precision.HIGHEST,
    )


def _layer_norm(*, dtype, param_dtype) -> nn.LayerNorm:
    """torch.nn.LayerNorm with its default eps (1e-5; Flax's default is 1e-6)."""
    return nn.LayerNorm(
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=param_init(nn.initializers.ones_init(), (NORM,)),
        bias_init=param_init(nn.initializers.zeros_init(), (NORM,)),
    )


class QueryGuidedAttentivePooling(nn.Module):
    """QGAP (module docstring). Call with the text vectors ``[B, L, d]`` (the ColBERT
    projections times the mask, not normalised), the visual features ``[B, 1 + S, d_v]``
    (class token, then patches) and the text mask ``[B, L]``; returns ``[B, T + H, d]``."""

    num_tokens: int = 16  # T global tokens
    num_heads: int = 12  # H query-guided tokens (every paper config; the class default is 8)
    out_dim: int = 128  # d, the ColBERT width
    mask_mode: MaskMode = "consistent"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        check_mask_mode(self.mask_mode)
        if self.num_tokens * self.out_dim % 2:
            raise ValueError(
                f"num_tokens * out_dim = {self.num_tokens * self.out_dim} must be even "
                "(split_mlp's hidden width is half of it)"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = self.num_heads * self.out_dim
        self.proj_0 = _layer_norm(**kw)
        self.proj_1 = _linear(2 * width, (V_EMBED, V_MLP), **kw)
        self.k_state = _linear(width, (V_MLP, PROJ), use_bias=False, **kw)
        self.v_state = _linear(width, (V_MLP, PROJ), use_bias=False, **kw)
        self.o_proj_0 = _layer_norm(**kw)
        self.o_proj_1 = _linear(self.out_dim, (PROJ, PROJ_OUT), **kw)
        half = self.num_tokens * self.out_dim // 2
        self.split_mlp_0 = _linear(half, (V_EMBED, PROJ), **kw)
        self.split_mlp_2 = _linear(2 * half, (PROJ, PROJ_OUT), **kw)

    def global_tokens(self, cls: jax.Array) -> jax.Array:
        """``[B, d_v]`` class tokens -> ``[B, T, d]`` global tokens."""
        hidden = jnp.tanh(self.split_mlp_0(cls))
        return self.split_mlp_2(hidden).reshape(cls.shape[0], self.num_tokens, self.out_dim)

    def query_guided_tokens(
        self, text: jax.Array, patches: jax.Array, text_mask: jax.Array
    ) -> jax.Array:
        """``[B, L, d]`` text vectors, ``[B, S, d_v]`` patches, ``[B, L]`` mask -> ``[B, H, d]``."""
        batch, num_patches, _ = patches.shape
        heads, dim = self.num_heads, self.out_dim
        hidden = nn.gelu(self.proj_1(self.proj_0(patches)), approximate=False)
        keys = self.k_state(hidden).reshape(batch, num_patches, heads, dim)
        values = self.v_state(hidden).reshape(batch, num_patches, heads, dim)
        hi = jax.lax.Precision.HIGHEST
        # The same text vector queries every head: scores [B, H, L, S].
        scores = jnp.einsum("bld,bshd->bhls", text, keys, precision=hi) / math.sqrt(dim)
        valid = text_mask.astype(bool)[:, None, :, None]
        scores = jnp.where(valid, scores, MASK_FILL)
        attention = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(values.dtype)
        rows = jnp.einsum("bhls,bshd->bhld", attention, values, precision=hi)
        mask = text_mask.astype(rows.dtype)
        if self.mask_mode == "consistent":
            rows = rows * mask[:, None, :, None]
        pooled = rows.sum(axis=2) / (mask.sum(axis=1)[:, None, None] + 1e-15)
        return self.o_proj_1(self.o_proj_0(pooled))

    def __call__(self, text: jax.Array, visual: jax.Array, text_mask: jax.Array) -> jax.Array:
        if text.shape[-1] != self.out_dim:
            raise ValueError(f"text vectors have width {text.shape[-1]}; expected {self.out_dim}")
        if visual.shape[1] < 2:
            raise ValueError(
                f"visual features have {visual.shape[1]} positions; expected the class token "
                "and at least one patch"
            )
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"text_mask {text_mask.shape} does not match text {text.shape[:2]}")
        global_tokens = self.global_tokens(visual[:, 0])
        guided = self.query_guided_tokens(text, visual[:, 1:], text_mask)
        return jnp.concatenate([global_tokens, guided.astype(global_tokens.dtype)], axis=1)
