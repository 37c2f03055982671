"""The checks of a training config that need neither weights nor data: each field's type and
range (``check_fields``), then the fields together and against a mesh (``check_config``:
batch and gradient-cache chunks over the data-parallel shards and the hosts, packing's
options). ValueError names the field. ``setup.build`` runs them on the mesh it builds for
(``jfe aot`` too, on a TPU slice's), ``setup.validate_config`` on this runtime's before
``train`` writes anything.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from jfe_jax.train import mesh as mesh_lib

# (field, lowest allowed value, whether it must be an integer): checked by ``check_fields``.
_RANGES = (
    ("data.global_batch_size", 1, True),
    ("data.num_hard_negatives", 0, True),
    ("data.max_length", 1, True),
    ("data.query_patch_budget", 0, True),
    ("data.candidate_patch_budget", 0, True),
    ("data.image_min_pixels", 1, True),
    ("data.image_max_pixels", 1, True),
    ("data.worker_count", 0, True),
    ("data.read_threads", 0, True),
    ("data.read_buffer_size", 1, True),
    ("data.cache_examples_mb", 0, True),
    ("data.prepare_wait_s", 0, False),
    ("data.pack_items_per_row", 1, True),
    ("data.pack_length", 0, True),
    ("data.pack_vision_row_fraction", 0, False),
    ("model.lora_rank", 0, True),
    ("model.lora_alpha", 0, False),
    ("model.projection_dim", 0, True),
    ("optimizer.end_learning_rate", 0, False),
    ("optimizer.decay_fraction", 0, False),
    ("optimizer.warmup_steps", 0, True),
    ("optimizer.weight_decay", 0, False),
    ("optimizer.max_grad_norm", 0, False),
    ("optimizer.b1", 0, False),
    ("optimizer.b2", 0, False),
    ("train.num_steps", 1, True),
    ("train.grad_cache_chunk", 0, True),
    ("train.log_every", 1, True),
    ("train.checkpoint_every_steps", 0, True),
    ("train.keep_checkpoints", 1, True),
)
# (field, its allowed values).
_CHOICES = (
    ("stage", ("stage1", "stage2")),
    ("data.kind", ("pairs", "mbeir")),
    ("data.instruction_mode", ("fixed", "seeded")),
    ("data.verify_images", ("header", "full", "none")),
    ("model.dtype", ("float32", "bfloat16", "float16")),
    ("model.param_dtype", ("float32", "bfloat16", "float16")),
    ("model.remat", ("none", "full", "dots", "dots_no_batch")),
    ("model.fusion", ("early", "late")),
    ("optimizer.trainable", ("full", "freeze_vision", "lora")),
)


def _field(config: ml_collections.ConfigDict, name: str) -> Any:
    for key in name.split("."):
        config = config[key]
    return config


def _positive_ints(config: ml_collections.ConfigDict, name: str, *, ascending: bool) -> None:
    value = _field(config, name)
    ok = isinstance(value, tuple | list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    )
    if ok and ascending:
        ok = bool(value) and all(a < b for a, b in zip(value, value[1:]))
    if not ok:
        what = "a non-empty ascending tuple" if ascending else "a tuple"
        raise ValueError(
            f"{name}={value!r}: expected {what} of positive integers "
            f"(e.g. --config.{name}='(64, 128)')"
        )


def check_fields(config: ml_collections.ConfigDict) -> None:
    """Types and ranges of the config's fields, each alone; ValueError names the field and what
    it expects. The first check of ``check_config``, so a bad value fails before any data is
    prepared or folder written."""
    for name, low, integer in _RANGES:
        value = _field(config, name)
        kind = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not value >= low:
            kind_name = "an integer" if integer else "a number"
            raise ValueError(f"{name} must be >= {low} ({kind_name}), got {value!r}")
    for name, choices in _CHOICES:
        if _field(config, name) not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {_field(config, name)!r}")
    _positive_ints(config, "data.length_buckets", ascending=True)
    _positive_ints(config, "data.pack_vision_blocks", ascending=False)
    for name in ("optimizer.learning_rate", "optimizer.eps", "model.temperature"):
        value = _field(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} must be > 0 (a number), got {value!r}")
    for name in ("optimizer.b1", "optimizer.b2", "optimizer.decay_fraction"):
        if _field(config, name) > 1:
            raise ValueError(f"{name} must be in [0, 1], got {_field(config, name)!r}")
    prepare_workers = config.data.prepare_workers
    if isinstance(prepare_workers, bool) or not isinstance(prepare_workers, int):
        raise ValueError(f"data.prepare_workers={prepare_workers!r}: expected an integer")
    if prepare_workers == 0 or prepare_workers < -1:
        raise ValueError(
            f"data.prepare_workers={prepare_workers}: expected >= 1, or -1 for every core"
        )
    if config.data.image_min_pixels > config.data.image_max_pixels:
        raise ValueError(
            f"data.image_min_pixels={config.data.image_min_pixels} is above "
            f"data.image_max_pixels={config.data.image_max_pixels}"
        )
    if config.data.max_length > max(config.data.length_buckets):
        raise ValueError(
            f"data.max_length={config.data.max_length} is longer than the largest of "
            f"data.length_buckets={tuple(config.data.length_buckets)}: an item of max_length "
            "tokens would have no bucket"
        )


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """The checks of a config against a mesh that need no weights; ValueError names the field.
    ``build`` runs them (``jfe aot`` too, on a TPU slice's mesh)."""
    check_fields(config)
    if config.stage not in ("stage1", "stage2"):
        raise ValueError(f"stage must be 'stage1' or 'stage2', got {config.stage!r}")
    if config.data.kind not in ("pairs", "mbeir"):
        raise ValueError(f"data.kind must be 'pairs' or 'mbeir', got {config.data.kind!r}")
    if config.data.task_weights and not (config.data.kind == "mbeir" and config.data.task_batches):
        raise ValueError(
            f"data.task_weights={tuple(config.data.task_weights)!r} weighs the tasks of "
            "one-task batches: it needs data.kind='mbeir' and data.task_batches=True"
        )
    if config.train.num_steps < 1:
        raise ValueError(f"train.num_steps must be >= 1, got {config.train.num_steps}")
    if config.train.keep_checkpoints < 1:
        raise ValueError(
            f"train.keep_checkpoints must be >= 1, got {config.train.keep_checkpoints}: the run "
            "would leave no checkpoint to resume from or export"
        )
    if not config.optimizer.learning_rate > 0:
        raise ValueError(
            f"optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}"
        )
    if config.optimizer.trainable == "lora" and config.model.lora_rank < 1:
        raise ValueError(
            f"optimizer.trainable='lora' needs model.lora_rank >= 1, got "
            f"{config.model.lora_rank}: without adapters nothing would train"
        )
    if not 0 <= config.optimizer.warmup_steps < config.train.num_steps:
        raise ValueError(
            f"optimizer.warmup_steps={config.optimizer.warmup_steps} must be in "
            f"[0, train.num_steps={config.train.num_steps})"
        )
    mesh_lib.check_batch_divisible(config.data.global_batch_size, mesh)
    chunk = config.train.grad_cache_chunk
    if chunk and config.data.global_batch_size % chunk:
        raise ValueError(
            f"train.grad_cache_chunk={chunk} does not divide data.global_batch_size="
            f"{config.data.global_batch_size}"
        )
    if config.data.global_batch_size % jax.process_count():
        raise ValueError(
            f"data.global_batch_size={config.data.global_batch_size} is not divisible by the "
            f"{jax.process_count()} hosts"
        )
    if config.data.pack:
        parallel = mesh_lib.data_parallel_size(mesh)
        if chunk and chunk % parallel:
            # Each batch shard packs its share of every chunk: item i and its row stay in
            # i's chunk (mod the chunk count) only when every shard's items and rows are
            # whole multiples of the chunks, on every host.
            raise ValueError(
                f"data.pack with train.grad_cache_chunk={chunk}: the chunk must be a multiple "
                f"of the data-parallel size {parallel} (each batch shard packs its share of "
                "every chunk)"
            )
        if config.model.fusion != "early":
            raise ValueError(
                f"data.pack packs early-fusion items only, got model.fusion={config.model.fusion!r}"
            )
        if config.data.pack_items_per_row < 1:
            raise ValueError(
                f"data.pack_items_per_row must be >= 1, got {config.data.pack_items_per_row}"
            )
        pack_length = config.data.pack_length or max(config.data.length_buckets)
        if pack_length < config.data.max_length:
            raise ValueError(
                f"data.pack_length={pack_length} is shorter than data.max_length="
                f"{config.data.max_length}: an item of max_length tokens would not fit in a row"
            )
