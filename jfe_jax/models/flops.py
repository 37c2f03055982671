"""Model FLOPs from the architecture config and a batch's padded shapes.

Model FLOPs count what the padded batch asks of the model (matmuls of every layer, the full
attention score matrix as computed, forward + backward = 3 x forward), not what a particular
implementation spends: gradient-cache re-forwards and rematerialisation are excluded, so MFU is
comparable across those settings. The vision tower counts the rows it actually runs on: a
``pack_vision`` batch's vision rows (fewer than the text rows' patch budgets), not the text
rows' budgets.

That 3 x forward convention (``train_step_flops``, the "6N" rule) also credits gradients nobody
needs when parts are frozen, and work an embedding does not need. ``train_step_required_flops``
counts what a step cannot avoid: a frozen vision tower runs forward only (1x); a decoder with
frozen base weights needs their forward and the activation gradients (2x), the attention
scores 3x and trained adapters 3x; causal attention only as its query blocks compute it; and
the last decoder layer only at the pooled tokens (plus its keys and values everywhere), as the
unrolled model runs it. MFU at that count is the stricter figure; the trainer logs the
convention's.
"""

from __future__ import annotations

from collections.abc import Sequence

from jfe_jax.models.batches import (
    EarlyBatch,
    EarlyFusionBatch,
    LateFusionBatch,
    ModelBatch,
    TrainBatch,
    text_rows,
)
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.packing import vision_groups


def text_forward_flops(config: ModelConfig, rows: int, length: int) -> float:
    """Matmul FLOPs of the decoder on ``rows`` sequences of ``length`` tokens (no lm_head)."""
    t = config.text
    per_token = sum(2 * i * o for i, o in _projection_shapes(config).values())
    attention = 2 * 2 * length * t.hidden_size  # scores and weighted values, per token
    return float(rows * length * t.num_layers * (per_token + attention))


def vision_forward_flops(config: ModelConfig, rows: int, patches: int) -> float:
    """Matmul FLOPs of the vision tower on ``rows`` rows of ``patches`` patches each."""
    v = config.vision
    merge = v.spatial_merge_size**2
    per_patch = 2 * (
        v.patch_dim * v.embed_dim * 0  # counted below, once (outside the blocks)
        + v.embed_dim * 3 * v.embed_dim
        + v.embed_dim * v.embed_dim
        + 2 * v.embed_dim * v.embed_dim * v.mlp_ratio
    )
    attention = 2 * 2 * patches * v.embed_dim
    blocks = rows * patches * v.depth * (per_patch + attention)
    embed = 2 * rows * patches * v.patch_dim * v.embed_dim
    merger = (
        2
        * rows
        * (patches // merge)
        * ((merge * v.embed_dim) ** 2 + merge * v.embed_dim * v.out_dim)
    )
    return float(blocks + embed + merger)


def batch_vision_flops(config: ModelConfig, model_batch: EarlyFusionBatch) -> float:
    """Forward FLOPs of the vision tower on one early-fusion model batch: its ``[B, P]``
    patch rows, or with ``pack_vision`` its vision rows (each group at its own row length)."""
    rows = [segments.shape for _, segments, _ in vision_groups(model_batch)]
    if isinstance(model_batch, EarlyBatch) and model_batch.pixel_values is not None:
        rows.append(model_batch.pixel_values.shape[:2])
    return sum(vision_forward_flops(config, n, p) for n, p in rows if p)


def batch_forward_flops(config: ModelConfig, model_batch: ModelBatch) -> float:
    """Forward FLOPs of one model batch (shapes only; late-fusion batches: the parts held)."""
    if isinstance(model_batch, LateFusionBatch):
        return sum(batch_forward_flops(config, part) for part, _ in model_batch.parts())
    rows, length = text_rows(model_batch).input_ids.shape
    return text_forward_flops(config, rows, length) + batch_vision_flops(config, model_batch)


def train_step_flops(config: ModelConfig, batch: TrainBatch) -> float:
    """Model FLOPs of one contrastive step (every side, forward + backward = 3x forward)."""
    return 3.0 * sum(batch_forward_flops(config, side) for side in batch.sides())


def _projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each decoder projection (q, k, v, o, gate, up, down)."""
    t = config.text
    kv = t.num_kv_heads * t.head_dim
    return {
        "q_proj": (t.hidden_size, t.hidden_size),
        "k_proj": (t.hidden_size, kv),
        "v_proj": (t.hidden_size, kv),
        "o_proj": (t.hidden_size, t.hidden_size),
        "gate_proj": (t.hidden_size, t.intermediate_size),
        "up_proj": (t.hidden_size, t.intermediate_size),
        "down_proj": (t.intermediate_size, t.hidden_size),
    }


def _decoder_required(
    config: ModelConfig, rows: int, length: int, pooled: int, lora_rank: int, targets
) -> tuple[float, float, float]:
    """Forward FLOPs (projections, attention scores, LoRA adapters) the decoder cannot skip
    when only ``pooled`` tokens' final states are used: every layer but the last in full,
    with causal attention in query blocks (``layers.causal_query_blocks``); the last layer's
    keys and values at every token, the rest of it at the pooled tokens only."""
    from jfe_jax.models.layers import causal_query_blocks

    t = config.text
    shapes = _projection_shapes(config)
    tokens = rows * length

    def dense(names, n):
        return float(n * sum(2 * i * o for i, o in (shapes[k] for k in names)))

    def lora(names, n):
        return float(n * sum(2 * lora_rank * sum(shapes[k]) for k in names if k in targets))

    kv_names = ("k_proj", "v_proj")
    rest = tuple(k for k in shapes if k not in kv_names)
    blocks = causal_query_blocks(length)
    causal = (blocks + 1) / (2 * blocks)  # share of the score matrix the blocks compute
    per_token_scores = 2 * 2 * length * t.hidden_size
    layers_before = t.num_layers - 1
    projections = layers_before * dense(shapes, tokens) + dense(kv_names, tokens)
    projections += dense(rest, pooled)
    scores = layers_before * tokens * per_token_scores * causal + pooled * per_token_scores
    adapters = layers_before * lora(shapes, tokens) + lora(kv_names, tokens) + lora(rest, pooled)
    return projections, scores, adapters


def batch_required_flops(
    config: ModelConfig,
    model_batch: ModelBatch,
    *,
    trainable: str,
    lora_rank: int,
    lora_targets: Sequence[str],
) -> float:
    """FLOPs one training pass over a model batch cannot avoid (``train_step_required_flops``)."""
    if trainable not in ("full", "freeze_vision", "lora"):
        raise ValueError(
            f"unknown trainable mode {trainable!r}; expected full, freeze_vision, lora"
        )
    if isinstance(model_batch, LateFusionBatch):
        return sum(
            batch_required_flops(
                config, part, trainable=trainable, lora_rank=lora_rank, lora_targets=lora_targets
            )
            for part, _ in model_batch.parts()
        )
    rows, length = text_rows(model_batch).input_ids.shape
    pooled = model_batch.num_items
    projections, scores, adapters = _decoder_required(
        config, rows, length, pooled, lora_rank, tuple(lora_targets)
    )
    # Base weights: forward + input gradient, + weight gradient when trained. The attention
    # scores carry no weights; their backward (dQ, dK, dV, dP) is 2x their forward.
    flops = (3.0 if trainable != "lora" else 2.0) * projections + 3.0 * scores + 3.0 * adapters
    vision = batch_vision_flops(config, model_batch)
    return flops + (3.0 if trainable == "full" else 1.0) * vision


def train_step_required_flops(
    config: ModelConfig,
    batch: TrainBatch,
    *,
    trainable: str,
    lora_rank: int,
    lora_targets: Sequence[str],
) -> float:
    """FLOPs of one contrastive step that the trained parts make necessary, every side.

    ``trainable`` is the optimizer's mode (``full``, ``freeze_vision``, ``lora``); the LoRA
    adapters (rank ``lora_rank`` on ``lora_targets``; rank 0: none) are trained in every mode.
    A frozen vision tower costs 1x its forward, a decoder with frozen base weights 2x its
    matmuls' forward (forward + activation gradients, no weight gradients), attention scores
    and adapters 3x. Remat and gradient-cache re-forwards are excluded, as in
    ``train_step_flops`` (the 3 x forward convention, which this does not replace).
    """
    return sum(
        batch_required_flops(
            config, side, trainable=trainable, lora_rank=lora_rank, lora_targets=lora_targets
        )
        for side in batch.sides()
    )
