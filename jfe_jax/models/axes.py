"""Logical axis names and the one table that maps them to mesh axes.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``) and the
main activations are annotated with ``constrain``. ``LOGICAL_RULES`` maps those names to the
mesh axes ``data``, ``fsdp`` and ``tensor``; changing a sharding strategy means changing this
table, not the modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"  # LLM width
MLP = "mlp"  # LLM feed-forward width
Q_HEADS = "q_heads"  # heads * head_dim of queries / attention output
KV_HEADS = "kv_heads"  # kv_heads * head_dim of keys and values
LAYERS = "layers"  # the stacked-layer axis of scanned parameters
NORM = "norm"  # scale/bias vectors of norms
V_EMBED = "vision_embed"  # vision tower width
V_MLP = "vision_mlp"
V_QKV = "vision_qkv"
PATCH = "patch"  # flattened (channels, temporal, patch, patch) input of the patch embedding
MERGED = "merged"  # vision width * merge_size**2 in the patch merger
LORA_RANK = "lora_rank"
PROJ = "projection"
PROJ_OUT = "projection_out"  # the output side of a square projection (MIRe's 128 -> 128)

# Activation axes.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_MLP = "activation_mlp"
ACT_PATCHES = "activation_patches"

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters: FSDP over the model width, tensor parallelism over heads / mlp / vocab
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (Q_HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (LAYERS, None),
    (NORM, None),
    (V_EMBED, "fsdp"),
    (V_MLP, "tensor"),
    (V_QKV, "tensor"),
    (PATCH, None),
    (MERGED, "tensor"),
    (LORA_RANK, None),
    (PROJ, None),
    (PROJ_OUT, None),
    # activations: batch over every data-parallel axis
    (ACT_BATCH, ("data", "fsdp")),
    (ACT_LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_PATCHES, None),
)


def param_init(init: nn.initializers.Initializer, names: Sequence[str | None]):
    """Wraps an initializer so the parameter carries logical axis ``names``."""
    return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh and rules context."""
    return nn.with_logical_constraint(x, tuple(names))
