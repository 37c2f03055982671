"""Building blocks shared by the vision tower and the language model.

Norms, softmax and rotary angles run in float32 whatever the compute ``dtype``; matmuls run in
``dtype`` on weights stored in ``param_dtype``. ``Linear`` carries an optional LoRA adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfe_jax.models import axes
from jfe_jax.train import config_base

Dtype = Any

# Large finite negative for masked logits: a fully masked row (a padding query) then gives
# uniform weights instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class Linear(nn.Module):
    """``y = x @ kernel (+ bias)`` with kernel ``[in, out]`` and an optional LoRA adapter.

    With ``lora_rank > 0`` it adds ``(alpha / rank) * x @ lora_a @ lora_b``; ``lora_b`` starts
    at zero so a fresh adapter leaves the output unchanged. Freezing the base weights is the
    optimizer's job (see ``jfe_jax.train.optimizer``), the module only holds the parameters.
    """

    features: int
    use_bias: bool = True
    kernel_axes: tuple[str | None, str | None] = (None, None)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 0.0
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            axes.param_init(self.kernel_init, self.kernel_axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.lora_rank > 0:
            lora_a = self.param(
                "lora_a",
                axes.param_init(
                    nn.initializers.normal(1.0 / self.lora_rank),
                    (self.kernel_axes[0], axes.LORA_RANK),
                ),
                (x.shape[-1], self.lora_rank),
                self.param_dtype,
            )
            lora_b = self.param(
                "lora_b",
                axes.param_init(nn.initializers.zeros, (axes.LORA_RANK, self.kernel_axes[1])),
                (self.lora_rank, self.features),
                self.param_dtype,
            )
            scale = self.lora_alpha / self.lora_rank
            y = y + scale * jnp.dot(
                jnp.dot(x, lora_a.astype(self.dtype)), lora_b.astype(self.dtype)
            )
        if self.use_bias:
            bias = self.param(
                "bias",
                axes.param_init(nn.initializers.zeros, (self.kernel_axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalise in float32, cast back, then scale."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            axes.param_init(nn.initializers.ones, (axes.NORM,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (the vision tower's norms, eps 1e-6)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param(
            "scale",
            axes.param_init(nn.initializers.ones, (axes.NORM,)),
            (features,),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            axes.param_init(nn.initializers.zeros, (axes.NORM,)),
            (features,),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x1, x2] -> [-x2, x1]`` over the last axis, as the reference's rotary embedding."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [..., L, heads, head_dim]`` by angles given as ``cos/sin [..., L, head_dim]``.

    Computed in float32 and cast back to ``x.dtype``.
    """
    x32 = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


# Attention implementations (``attention(..., impl=...)``):
#   "einsum": the explicit einsum + float32 softmax below, the reference the tests pin;
#   "dot_product_attention": ``jax.nn.dot_product_attention`` with ``implementation=None``.
# In jax 0.10.2 ``implementation=None`` always lowers to jax's own XLA path (same math: float32
# logits and softmax, -0.7 * float32 max for masked logits, GQA by vmapping over the groups), on
# every backend; its only fused kernel is "cudnn" (NVIDIA GPUs, fp16/bf16 only).
ATTENTION_IMPLS = ("einsum", "dot_product_attention")
# The one in use is ``model.attention_impl`` (declared, with why einsum is the default, in
# jfe_jax/train/config_base.py), an ``EncoderOptions`` field handed down to every layer.


def check_attention_impl(name: str) -> None:
    """ValueError unless ``name`` is one of ``ATTENTION_IMPLS``."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {name!r}; expected one of {ATTENTION_IMPLS}")


def causal_query_blocks(length: int) -> int:
    """How many query blocks causal attention splits a row of ``length`` tokens into.

    Block i of n sees only the keys up to its own end, so the masked upper triangle is skipped
    except within the diagonal blocks: the work is (n + 1) / 2n of full attention. Blocks stay
    at least 32 queries long (smaller ones run slower on CPU than they save); at most 4.
    """
    for blocks in (4, 2):
        if length % blocks == 0 and length // blocks >= 32:
            return blocks
    return 1


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    *,
    dtype: Dtype,
    impl: str = config_base.DEFAULTS.model.attention_impl,
    causal: bool = False,
) -> jax.Array:
    """Masked softmax attention with grouped-query heads.

    A query whose keys are all masked (a padding position) gets uniform weights, never NaN, so
    padding rows stay finite and their zero cotangents cannot turn into NaN gradients.

    With ``causal=True`` the caller promises that ``mask`` hides every key after its query
    (``mask[b, q, k]`` False for ``k > q``, as a causal mask with padding or segments does).
    The queries then run in ``causal_query_blocks(Lq)`` blocks, block i attending only to the
    keys before its end: the same outputs for every query with a visible key (the skipped
    weights are exactly zero), about 40% less work for 4 blocks. A fully masked query (a
    padding position) then spreads its weights over its block's keys instead of all keys.

    Args:
      query: ``[B, Lq, H, D]``.
      key, value: ``[B, Lk, Hkv, D]`` with ``H`` a multiple of ``Hkv``.
      mask: boolean, ``[B, Lq, Lk]`` or broadcastable to it (``[B, 1, Lk]`` for key padding),
        True where a query may attend to a key.
      dtype: compute dtype of the two matmuls; logits and softmax are float32.
      impl: one of ``ATTENTION_IMPLS``.

    Returns:
      ``[B, Lq, H, D]`` in ``dtype``.
    """
    check_attention_impl(impl)
    if mask.dtype != jnp.bool_ or mask.ndim != 3:
        raise ValueError(
            f"attention mask must be boolean [B, Lq, Lk] (or broadcastable to it), got "
            f"{mask.dtype} {mask.shape}"
        )
    run = _jax_nn_attention if impl == "dot_product_attention" else _einsum_attention
    q_len = query.shape[1]
    if causal and key.shape[1] != q_len:
        raise ValueError(f"causal attention needs Lq == Lk, got {q_len} and {key.shape[1]}")
    blocks = causal_query_blocks(q_len) if causal else 1
    if blocks == 1:
        return run(query, key, value, mask, dtype=dtype)
    mask = jnp.broadcast_to(mask, (query.shape[0], q_len, q_len))
    size = q_len // blocks
    outs = []
    for i in range(blocks):
        rows, end = slice(i * size, (i + 1) * size), (i + 1) * size
        outs.append(
            run(query[:, rows], key[:, :end], value[:, :end], mask[:, rows, :end], dtype=dtype)
        )
    return jnp.concatenate(outs, axis=1)


def _einsum_attention(query, key, value, mask, *, dtype):
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = heads // kv_heads
    query = query.reshape(batch, q_len, kv_heads, groups, head_dim).astype(dtype)
    logits = jnp.einsum(
        "bqhgd,bkhd->bhgqk", query, key.astype(dtype), preferred_element_type=jnp.float32
    )
    logits = logits * (head_dim**-0.5)
    logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
    # The float32 softmax, normalised after the weighted sum (as flash attention does): the
    # exponentials are computed once, and the division acts on [Lq, D], not on [Lq, Lk].
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnormalized = jnp.exp(logits - peak)
    total = jnp.sum(unnormalized, axis=-1)  # [b, h, g, q]
    out = jnp.einsum(
        "bhgqk,bkhd->bqhgd",
        unnormalized.astype(dtype),
        value.astype(dtype),
        preferred_element_type=jnp.float32,
    )
    out = out / jnp.transpose(total, (0, 3, 1, 2))[..., None]
    return out.astype(dtype).reshape(batch, q_len, heads, head_dim)


def _jax_nn_attention(query, key, value, mask, *, dtype):
    # jax.nn wants q, k, v of one dtype and a 4-D mask broadcastable to [B, H, Lq, Lk]; a
    # single head axis of 1 is broadcast over the GQA groups without copying per head. For
    # bfloat16 it computes logits in float32 (BF16_BF16_F32 dot), softmax in float32, and the
    # weights-times-values matmul in bfloat16, as the einsum path does.
    return jax.nn.dot_product_attention(
        query.astype(dtype),
        key.astype(dtype),
        value.astype(dtype),
        mask=mask[:, None],
        implementation=None,
    )


def remat_policy(name: str):
    """A ``jax.checkpoint`` policy by name: none, full, dots, dots_no_batch."""
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }
    if name not in policies:
        raise ValueError(
            f"unknown remat policy {name!r}; expected 'none' or one of {sorted(policies)}"
        )
    return policies[name]


def stack_layers(
    layer_cls: type[nn.Module],
    *,
    num_layers: int,
    scan: bool,
    remat: str,
    broadcast_args: int,
    name_prefix: str | None,
    parent_kwargs: dict,
) -> Sequence[nn.Module] | nn.Module:
    """Builds ``num_layers`` layers, scanned (params stacked on a 'layers' axis) or unrolled.

    A layer is called as ``layer(carry, *broadcast) -> (carry, None)``. Pass ``name_prefix=None``
    from ``setup`` (Flax names attributes itself: ``layers`` or ``layers_0, layers_1, ...``).
    """

    def named(suffix: str) -> dict:
        return {} if name_prefix is None else {"name": name_prefix + suffix}

    cls = layer_cls
    if remat != "none":
        cls = nn.remat(cls, policy=remat_policy(remat), prevent_cse=not scan)
    if scan:
        scanned = nn.scan(
            cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * broadcast_args,
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: axes.LAYERS},
        )
        return scanned(**named(""), **parent_kwargs)
    return [cls(**named(f"_{i}"), **parent_kwargs) for i in range(num_layers)]


def run_layers(layers, carry, *args):
    """Runs what ``stack_layers`` built."""
    if isinstance(layers, (list, tuple)):
        for layer in layers:
            carry, _ = layer(carry, *args)
        return carry
    carry, _ = layers(carry, *args)
    return carry
