"""MIRe's text tower: ColBERTv2, a BERT encoder and a linear head, in Flax linen.

BERT as transformers' ``BertModel`` computes it (``modeling_bert.py``): word +
learned absolute position + token type embeddings, LayerNorm, then post-LayerNorm encoder
layers (self-attention with biases, residual, LayerNorm; exact-erf GELU feed-forward, residual,
LayerNorm), LayerNorm eps from the config (1e-12 for BERT-base). Padded keys get the dtype's
lowest value added to their scores, as ``BertModel``'s extended attention mask does. No
dropout: inference and the deterministic parts of training only.

The ColBERT head is a Linear ``hidden -> dim`` without bias (``HF_ColBERT.linear``, dim 128).
``ColBERTEncoder`` returns the head's token vectors before normalisation (MIRe's pooling reads
those, times the mask); ``token_vectors`` multiplies by a mask and L2-normalises, as ColBERT's
query and document encoders do.

Parameters are laid out as the Hugging Face checkpoint names them (``bert.encoder.layer.0.
attention.self.query.weight`` is ``bert/encoder/layer_0/attention/self/query/kernel``), so
``colbert_from_torch`` maps a ``HF_ColBERT`` state dict one to one and lists every missing,
extra or mis-shaped tensor in one error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jfe_jax.models.axes import EMBED, MLP, NORM, PROJ, Q_HEADS, VOCAB, param_init
from jfe_jax.models.mire.mismatch import raise_if_mismatched

# Position and token-type tables are small and their row counts (2 token types) need not
# divide a mesh axis: only the word embeddings shard their rows (PROJ maps to no mesh axis).


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a transformers ``BertConfig`` that BERT's forward reads, plus ColBERT's
    head width ``dim``. Defaults: BERT-base uncased with the 128-wide head (colbertv2.0)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    dim: int = 128

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], dim: int = 128) -> BertConfig:
        """From a ``config.json`` dict (or ``BertConfig.to_dict()``); unknown keys ignored.
        BERT's GELU must be the exact one ("gelu")."""
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"hidden_act={act!r}; ColBERT's BERT uses the exact GELU ('gelu')")
        names = {f.name for f in dataclasses.fields(cls)} - {"dim"}
        return cls(**{k: hf[k] for k in names if k in hf}, dim=dim)


def _dense(
    features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype, name: str
) -> nn.Dense:
    return nn.Dense(
        features,
        name=name,
        use_bias=use_bias,
        dtype=dtype,
        precision=jax.lax.Precision.HIGHEST,
        kernel_init=param_init(nn.initializers.normal(0.02), axes),
        bias_init=param_init(nn.initializers.zeros_init(), (axes[1],)),
    )


def _layer_norm(eps: float, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        scale_init=param_init(nn.initializers.ones_init(), (NORM,)),
        bias_init=param_init(nn.initializers.zeros_init(), (NORM,)),
        name="LayerNorm",
    )


def _embed(num: int, features: int, dtype, name: str, table_axis: str = VOCAB) -> nn.Embed:
    return nn.Embed(
        num,
        features,
        name=name,
        dtype=dtype,
        embedding_init=param_init(nn.initializers.normal(0.02), (table_axis, EMBED)),
    )


class _Self(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        heads, width = c.num_attention_heads, c.hidden_size // c.num_attention_heads

        q = _dense(c.hidden_size, (EMBED, Q_HEADS), dtype=self.dtype, name="query")(x)
        k = _dense(c.hidden_size, (EMBED, Q_HEADS), dtype=self.dtype, name="key")(x)
        v = _dense(c.hidden_size, (EMBED, Q_HEADS), dtype=self.dtype, name="value")(x)
        shape = x.shape[:2] + (heads, width)
        q, k, v = (t.reshape(shape) for t in (q, k, v))
        hi = jax.lax.Precision.HIGHEST
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi) / np.sqrt(width)
        probs = jax.nn.softmax((scores + bias).astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=hi)
        return out.reshape(x.shape)


class _Attention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        y = _Self(c, self.dtype, name="self")(x, bias)
        return _Output(c, self.dtype, name="output")(y, x)  # BertSelfOutput


class _Output(nn.Module):
    """BertSelfOutput / BertOutput: dense, residual, LayerNorm (post-LN)."""

    config: BertConfig
    dtype: Any = jnp.float32
    inner: bool = False  # BertOutput reads the feed-forward width

    @nn.compact
    def __call__(self, y, residual):
        c = self.config
        axes = (MLP, EMBED) if self.inner else (Q_HEADS, EMBED)
        y = _dense(c.hidden_size, axes, dtype=self.dtype, name="dense")(y)
        return _layer_norm(c.layer_norm_eps, self.dtype)(y + residual)


class _Layer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        x = _Attention(c, self.dtype, name="attention")(x, bias)
        h = _Intermediate(c, self.dtype, name="intermediate")(x)
        return _Output(c, self.dtype, inner=True, name="output")(h, x)


class _Intermediate(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = _dense(c.intermediate_size, (EMBED, MLP), dtype=self.dtype, name="dense")(x)
        return nn.gelu(h, approximate=False)


class _Embeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        c = self.config
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            _embed(c.vocab_size, c.hidden_size, self.dtype, name="word_embeddings")(input_ids)
            + _embed(
                c.max_position_embeddings, c.hidden_size, self.dtype, "position_embeddings", PROJ
            )(positions)
            + _embed(c.type_vocab_size, c.hidden_size, self.dtype, "token_type_embeddings", PROJ)(
                token_type_ids
            )
        )
        return _layer_norm(c.layer_norm_eps, self.dtype)(x)


class _Encoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        for i in range(self.config.num_hidden_layers):
            x = _Layer(self.config, self.dtype, name=f"layer_{i}")(x, bias)
        return x


class Bert(nn.Module):
    """``BertModel``'s last hidden state (no pooler): ``[B, L]`` ids and mask -> ``[B, L, H]``."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        c = self.config
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{c.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = _Embeddings(c, self.dtype, name="embeddings")(input_ids, token_type_ids)
        # BertModel's extended attention mask: (1 - mask) * lowest, added to every head's scores.
        lowest = jnp.finfo(jnp.float32).min
        bias = (1.0 - attention_mask.astype(jnp.float32))[:, None, None, :] * lowest
        return _Encoder(c, self.dtype, name="encoder")(x, bias)


class ColBERTEncoder(nn.Module):
    """BERT + ColBERT's linear head: ``[B, L, dim]`` token vectors, not normalised."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        hidden = Bert(self.config, self.dtype, name="bert")(
            input_ids, attention_mask, token_type_ids
        )
        return _dense(
            self.config.dim, (EMBED, PROJ), use_bias=False, dtype=self.dtype, name="linear"
        )(hidden)


def token_vectors(vectors: jax.Array, mask: jax.Array) -> jax.Array:
    """ColBERT's output: vectors times ``mask`` ([B, L], 0 drops a position), L2-normalised
    (``F.normalize``: a zero vector stays zero)."""
    vectors = vectors * mask[..., None].astype(vectors.dtype)
    norm = jnp.sqrt(jnp.sum(jnp.square(vectors), axis=-1, keepdims=True))
    return vectors / jnp.maximum(norm, 1e-12)


# --- checkpoints --------------------------------------------------------------------------------


def _hf_key(path: tuple[str, ...]) -> tuple[str, str]:
    """Flax param path -> (Hugging Face key, kind of conversion)."""
    *modules, leaf = path
    name = ".".join(m.replace("layer_", "layer.") if m.startswith("layer_") else m for m in modules)
    if leaf == "kernel":
        return f"{name}.weight", "linear"
    if leaf == "embedding":
        return f"{name}.weight", "copy"
    if leaf == "scale":
        return f"{name}.weight", "copy"
    return f"{name}.{leaf}", "copy"


def colbert_from_torch(
    state: Mapping[str, Any], config: BertConfig, *, source: str = "checkpoint"
) -> dict:
    """Flax params of ``ColBERTEncoder`` from a ``HF_ColBERT`` state dict (``bert.*`` and
    ``linear.weight``; arrays or tensors). Every tensor must be used and every param filled:
    ValueError listing what is missing, extra or mis-shaped otherwise. The pooler, which
    ColBERT never reads, may be present."""
    shapes = jax.eval_shape(
        ColBERTEncoder(config).init,
        jax.random.key(0),
        jnp.zeros((1, 2), jnp.int32),
        jnp.ones((1, 2), jnp.int32),
    )
    flat = traverse_util.flatten_dict(nn.meta.unbox(shapes)["params"])
    arrays = {
        k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        for k, v in state.items()
    }
    # Never read by ColBERT: the pooler, and the index buffers some transformers versions save.
    ignored = {
        k
        for k in arrays
        if k.startswith("bert.pooler.")
        or k in ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
    }
    missing, misshaped, out = [], [], {}
    used = set()
    for path, leaf in flat.items():
        key, kind = _hf_key(path)
        if key not in arrays:
            missing.append(key)
            continue
        used.add(key)
        value = arrays[key].T if kind == "linear" else arrays[key]
        if value.shape != leaf.shape:
            want = leaf.shape[::-1] if kind == "linear" else leaf.shape
            misshaped.append(f"{key} {tuple(arrays[key].shape)} (expected {tuple(want)})")
            continue
        out[path] = value.astype(np.float32)
    extra = sorted(set(arrays) - used - ignored)
    raise_if_mismatched(
        f"{source} does not match a ColBERT of this config", missing, misshaped, extra
    )
    return {"params": traverse_util.unflatten_dict(out)}


def colbert_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of ``colbert_from_torch``: ``HF_ColBERT`` state dict names -> numpy arrays."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params)["params"])
    out = {}
    for path, value in flat.items():
        key, kind = _hf_key(path)
        value = np.asarray(value)
        out[key] = value.T if kind == "linear" else value
    return out
