"""AdamW with warmup + cosine decay, clipping, weight-decay masks and learning-rate groups.

Parameters are selected by their path string, the tree keys joined by "/" (for example
``vision/blocks_0/qkv/kernel`` or ``text/layers_0/up_proj/lora_a``; with scanned layers
``text/layers/up_proj/lora_a``). Patterns are regular
expressions matched anywhere in the path (``re.search``), so they work whether or not the tree
still has its top-level ``params`` key.

Freezing is not the optimizer's business: ``trainable_mask`` says which parameters train, and
the train state keeps the others apart (``step.split_params``), so the optimizer only ever sees
trainable parameters: frozen ones get no gradient, no Adam state and no place in the clipping
norm.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import optax

from jfe_jax.train import config_base

# The keyword defaults below are the training config's (declared in config_base).
_DEFAULTS = config_base.DEFAULTS.optimizer

# Path components that get no weight decay: biases, norm scales/biases (any component
# containing "norm", or "ln..."), and Flax's "scale". Matched by path, not only by ndim,
# because scanned layers stack 1-D norm scales and biases into 2-D arrays.
NO_DECAY_PATTERN = r"(^|/)(bias|scale|[^/]*norm[^/]*|ln(_[^/]*)?)(/|$)"
VISION_PATTERN = r"(^|/)vision(/|$)"
LORA_PATTERN = r"(^|/)lora[^/]*(/|$)"
TRAINABLE_MODES = ("full", "freeze_vision", "lora")

DEFAULT_GROUP = "default"


def path_str(path: tuple[Any, ...]) -> str:
    """A tree key path as a "/"-joined string, e.g. ``text/layers_0/q_proj/lora_a``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def make_schedule(
    *,
    peak_learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    end_learning_rate: float,
    decay_fraction: float = _DEFAULTS.decay_fraction,
) -> optax.Schedule:
    """Linear warmup from 0 to the peak over ``warmup_steps``, then cosine decay to the end.

    ``total_steps`` counts the warmup too: the cosine reaches ``end_learning_rate`` at step
    ``total_steps`` and stays there. ``decay_fraction`` < 1 holds the peak after warmup and
    decays over that fraction of the steps after warmup only, the last ones (warmup, stable,
    decay: "WSD"); 1 is the plain warmup + cosine.
    """
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(
            f"the schedule needs 0 <= warmup_steps < total_steps, got warmup_steps="
            f"{warmup_steps}, total_steps={total_steps}"
        )
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
    if decay_fraction == 1.0:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak_learning_rate,
            warmup_steps=warmup_steps,
            decay_steps=total_steps,
            end_value=end_learning_rate,
        )
    decay_steps = max(1, round(decay_fraction * (total_steps - warmup_steps)))
    stable_end = total_steps - decay_steps
    alpha = end_learning_rate / peak_learning_rate if peak_learning_rate else 0.0
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak_learning_rate, max(warmup_steps, 1)),
            optax.constant_schedule(peak_learning_rate),
            optax.cosine_decay_schedule(peak_learning_rate, decay_steps, alpha=alpha),
        ],
        boundaries=[warmup_steps, stable_end],
    )


def trainable_mask(params: Any, mode: str, *, also_trainable: tuple[str, ...] = ()) -> Any:
    """A bool tree shaped like ``params``: True for the parameters that train (the state split of
    ``step.split_params`` gives the optimizer only those).

    Modes: ``full`` (everything), ``freeze_vision`` (everything outside ``vision/``), ``lora``
    (only path components starting with ``lora``). Paths matching a pattern in
    ``also_trainable`` (e.g. ``"projection"``, ``"logit_scale"``) are trainable in any mode.
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"unknown trainable mode {mode!r}; expected one of {TRAINABLE_MODES}")

    def is_trainable(path: tuple[Any, ...], _: Any) -> bool:
        name = path_str(path)
        if any(re.search(pattern, name) for pattern in also_trainable):
            return True
        if mode == "freeze_vision":
            return re.search(VISION_PATTERN, name) is None
        if mode == "lora":
            return re.search(LORA_PATTERN, name) is not None
        return True

    return jax.tree_util.tree_map_with_path(is_trainable, params)


def decay_mask(params: Any, *, no_decay_pattern: str = NO_DECAY_PATTERN) -> Any:
    """A bool tree: True where weight decay applies (matrices, not norms, biases or scalars)."""

    def decays(path: tuple[Any, ...], leaf: Any) -> bool:
        return leaf.ndim >= 2 and re.search(no_decay_pattern, path_str(path)) is None

    return jax.tree_util.tree_map_with_path(decays, params)


def _group_label(pattern: str) -> str:
    return f"lr group {pattern}"


def param_labels(params: Any, *, lr_multipliers: Mapping[str, float] | None = None) -> Any:
    """The optimizer group of every parameter: ``default`` or ``lr group <regex>``.

    The first pattern of ``lr_multipliers`` (in insertion order) that matches a path decides
    its group. Useful to log which parameters train at which rate.
    """
    lr_multipliers = {} if lr_multipliers is None else lr_multipliers

    def label(path: tuple[Any, ...], _: Any) -> str:
        name = path_str(path)
        for pattern in lr_multipliers:
            if re.search(pattern, name):
                return _group_label(pattern)
        return DEFAULT_GROUP

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    *,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    end_learning_rate: float,
    weight_decay: float,
    max_grad_norm: float | None,
    b1: float = _DEFAULTS.b1,
    b2: float = _DEFAULTS.b2,
    eps: float = _DEFAULTS.eps,
    lr_multipliers: Mapping[str, float] | None = None,
    no_decay_pattern: str = NO_DECAY_PATTERN,
    decay_fraction: float = _DEFAULTS.decay_fraction,
) -> optax.GradientTransformation:
    """AdamW on a warmup + cosine schedule with global-norm clipping and parameter groups.

    It updates every parameter it is given: pass it the trainable ones only (module docstring).

    Args:
      learning_rate, warmup_steps, total_steps, end_learning_rate, decay_fraction: see
        make_schedule.
      weight_decay: decoupled decay (scaled by the learning rate, as in optax.adamw), applied
        only where decay_mask is True.
      max_grad_norm: clip the global gradient norm to this; None disables clipping.
      lr_multipliers: ``{path regex: multiplier}``; a parameter's learning rate (and so its
        decay) is the schedule times the multiplier of the first matching pattern, else 1.
      no_decay_pattern: regex of paths excluded from weight decay.
    """
    lr_multipliers = dict(lr_multipliers or {})
    schedule = make_schedule(
        peak_learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        end_learning_rate=end_learning_rate,
        decay_fraction=decay_fraction,
    )

    def adamw(multiplier: float) -> optax.GradientTransformation:
        return optax.adamw(
            learning_rate=lambda step: multiplier * schedule(step),
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            # Called on the group's params, where other groups' leaves are MaskedNodes.
            mask=lambda p: decay_mask(p, no_decay_pattern=no_decay_pattern),
        )

    transforms: dict[str, optax.GradientTransformation] = {DEFAULT_GROUP: adamw(1.0)}
    for pattern, multiplier in lr_multipliers.items():
        transforms[_group_label(pattern)] = adamw(multiplier)

    def labels(params: Any) -> Any:
        return param_labels(params, lr_multipliers=lr_multipliers)

    chain: list[optax.GradientTransformation] = []
    if max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(max_grad_norm))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain)
