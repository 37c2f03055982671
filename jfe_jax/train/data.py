"""The trainer's data: config.data -> prepared datasets -> grain loaders -> host batches.

Stage 1 (``data.kind = "pairs"``) alternates batches of text triples and image-caption pairs;
stage 2 (``"mbeir"``) reads (query, positive, hard negatives) of an M-BEIR query split with
task instructions. The returned object is an iterator with ``get_state``/``set_state``, saved
in every checkpoint so a resumed run continues with exactly the next batch.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import grain.python as grain
import jax
import ml_collections
import numpy as np
from etils import epath

from jfe_jax.data.item_format import ItemFormat
from jfe_jax.data.loader import make_train_loader
from jfe_jax.data.mbeir import MBEIR
from jfe_jax.data.pipeline import ContrastiveBatcher
from jfe_jax.data.tfds_builders import MbeirTrainPairs, PairData, build_dataset, load_source
from jfe_jax.data.tokenizer import load_tokenizer
from jfe_jax.models.config import ModelConfig
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.setup import batch_layout
from jfe_jax.workdir import TOKENIZER_DIR, Workdir

log = logging.getLogger(__name__)

PAIR_KINDS = ("text_triples", "image_captions")


class RoundRobin:
    """Takes batches from several grain iterators; its state is all of theirs.

    Without ``weights`` the streams take turns. With ``weights`` ({name: weight}) each turn
    draws one stream with probability proportional to its weight, from a generator seeded by
    ``(seed, turn)``: the same stream on every host at every turn, and nothing to save beyond
    the turn counter.
    """

    def __init__(self, loaders: dict[str, Any], weights: dict[str, float] | None = None, seed=0):
        self.names = sorted(loaders)
        self.iterators = {name: iter(loaders[name]) for name in self.names}
        self.turn = 0
        self.seed = seed
        self.probabilities = None
        if weights is not None:
            if sorted(weights) != self.names or min(weights.values()) <= 0:
                raise ValueError(f"weights {weights} must be positive, one per stream {self.names}")
            total = sum(weights.values())
            self.probabilities = np.array([weights[n] / total for n in self.names])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.probabilities is None:
            name = self.names[self.turn % len(self.names)]
        else:
            rng = np.random.default_rng([self.seed, self.turn])
            name = self.names[int(rng.choice(len(self.names), p=self.probabilities))]
        self.turn += 1
        return next(self.iterators[name])

    def get_state(self) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "iterators": {n: it.get_state().decode("utf-8") for n, it in self.iterators.items()},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if sorted(state["iterators"]) != self.names:
            raise ValueError(
                f"checkpointed data state has streams {sorted(state['iterators'])}, this run "
                f"reads {self.names}: resume with the same data config"
            )
        self.turn = int(state["turn"])
        for name, value in state["iterators"].items():
            self.iterators[name].set_state(value.encode("utf-8"))


def task_weights(named: Any, sizes: dict[str, int]) -> dict[str, float]:
    """The per-task batch weights of ``data.task_weights`` (``((task, weight), ...)``) over
    the tasks in ``sizes`` ({task: training pairs}): named tasks get their weight, the others
    1.0; nothing named: the pair counts."""
    named = [tuple(pair) for pair in named or ()]
    if not named:
        return {name: float(size) for name, size in sizes.items()}
    if any(len(pair) != 2 for pair in named):
        raise ValueError(f"data.task_weights={named!r}: expected ((task, weight), ...) pairs")
    unknown = sorted({task for task, _ in named} - set(sizes))
    if unknown:
        raise ValueError(
            f"data.task_weights names {unknown}, which have no training queries here; the "
            f"tasks are {sorted(sizes)}"
        )
    if len({task for task, _ in named}) != len(named):
        raise ValueError(f"data.task_weights={named!r} names a task twice")
    weights = {name: 1.0 for name in sizes}
    for task, weight in named:
        if not float(weight) > 0:
            raise ValueError(f"data.task_weights: {task} has weight {weight}; expected > 0")
        weights[task] = float(weight)
    return weights


def find_tokenizer_dir(config: ml_collections.ConfigDict) -> str:
    """data.tokenizer, else the init_from directory's, else ``<data.root>/tokenizer``."""
    candidates = [config.data.tokenizer] if config.data.tokenizer else []
    if config.model.init_from:
        candidates += [
            config.model.init_from,
            Workdir(config.model.init_from).tokenizer,
        ]
    if config.data.root:
        candidates.append(os.path.join(config.data.root, TOKENIZER_DIR))
    for path in candidates:
        if os.path.isfile(os.path.join(path, "tokenizer.json")) or os.path.isfile(
            os.path.join(path, "tokenizer_config.json")
        ):
            return path
    raise ValueError(
        "no tokenizer found: set data.tokenizer, or use an init_from directory or data.root "
        f"that has one (looked in {candidates})"
    )


def _builders(
    config: ml_collections.ConfigDict, tfds_dir: str, max_image_pixels: int
) -> dict[str, Any]:
    """Prepares (or reuses) the TFDS datasets the config reads, by stream name."""
    d = config.data
    if d.prepare_workers < -1 or d.prepare_wait_s <= 0:
        raise ValueError(
            f"data.prepare_workers={d.prepare_workers} and data.prepare_wait_s="
            f"{d.prepare_wait_s}: expected prepare_workers >= -1 and prepare_wait_s > 0"
        )
    checks = dict(
        skip_bad_records=d.skip_bad_records,
        verify_images=d.verify_images,
        max_image_pixels=max_image_pixels,
        image_store=d.image_store or None,
        workers=None if d.prepare_workers == -1 else d.prepare_workers,
        # Host 0 prepares; the others wait for it on the filesystem (never a device
        # collective: their chips stay free, and the wait is bounded).
        wait_for_host=0 if jax.process_index() != 0 else None,
        wait_seconds=d.prepare_wait_s,
    )
    if d.kind == "mbeir":
        common = dict(
            mbeir_root=d.root,
            query_split=d.split,
            # Only what the run reads: no negative (or its image) unless it trains on one.
            max_hard_negatives=d.num_hard_negatives,
            **checks,
        )
        if not d.task_batches:
            return {"mbeir": build_dataset(MbeirTrainPairs, tfds_dir, **common)}
        tasks = MBEIR(d.root).tasks(d.split)
        if not tasks:
            raise ValueError(
                f"data.task_batches needs one query file per task in query/{d.split}/ of "
                f"{d.root} (mbeir_<task>_{d.split}.jsonl); found none"
            )
        return {
            task: build_dataset(MbeirTrainPairs, tfds_dir, task=task, **common) for task in tasks
        }
    return {
        kind: build_dataset(PairData, tfds_dir, root=d.root, kind=kind, **checks)
        for kind in PAIR_KINDS
        if os.path.isfile(os.path.join(d.root, "pairs", f"{kind}.jsonl"))
    }


def make_train_data(
    config: ml_collections.ConfigDict,
    workdir: str,
    model_config: ModelConfig,
    item_format: ItemFormat | None = None,
) -> RoundRobin:
    """Builds (or reuses) the TFDS datasets and returns the checkpointable batch iterator.
    ``item_format``: what each item becomes (the one the trainer's run record saves); None:
    ``ItemFormat.from_train_config``."""
    d = config.data
    if not d.root or not os.path.isdir(d.root):
        raise ValueError(f"data.root={d.root!r} is not a directory")
    if d.pack_vision and not d.pack_vision_row_fraction and jax.process_count() > 1:
        # Every host must feed the same number of vision rows (global_batch_from_host).
        raise ValueError(
            f"data.pack_vision on {jax.process_count()} hosts needs a fixed vision row count "
            "that every host feeds: set data.pack_vision_row_fraction (e.g. 0.5)"
        )
    tokenizer_dir = find_tokenizer_dir(config)
    tokenizer = _load_into_workdir(tokenizer_dir, workdir, model_config)
    if item_format is None:
        item_format = ItemFormat.from_train_config(config, model_config.vision)
    tfds_dir = d.tfds_dir or Workdir(workdir).tfds
    builders = _builders(config, tfds_dir, item_format.image_processor().max_image_pixels)
    layout = batch_layout(
        config, mesh_lib.local_data_parallel_shards(mesh_lib.make_mesh(dict(config.mesh)))
    )
    # The batcher of every stream: the tokenizer, model and item format, with its own kind.
    batcher = functools.partial(
        ContrastiveBatcher,
        tokenizer,
        model_config,
        item_format,
        layout,
        instruction_mode=d.instruction_mode,
        instruction_seed=config.seed,
        skip_bad_records=d.skip_bad_records,
    )
    loader_options = _loader_options(config)
    if d.kind == "pairs":
        loaders = _pair_loaders(config, builders, batcher, loader_options)
    else:
        loaders, sizes = _mbeir_loaders(config, builders, batcher, loader_options)
        if d.task_batches:
            weights = task_weights(d.task_weights, sizes)
            shares = {n: round(w / sum(weights.values()), 4) for n, w in weights.items()}
            log.info("one task per batch; pairs %s, batch shares %s", sizes, shares)
            return RoundRobin(loaders, weights=weights, seed=config.seed)
    log.info("training data: %s from %s (tokenizer %s)", sorted(loaders), d.root, tokenizer_dir)
    return RoundRobin(loaders)


def _load_into_workdir(tokenizer_dir: str, workdir: str, model_config: ModelConfig) -> Any:
    """The tokenizer of ``tokenizer_dir``, checked against the model's vocabulary and copied
    into the workdir (by host 0) unless it is the workdir's own."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > model_config.text.vocab_size:
        raise ValueError(
            f"tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model's "
            f"vocabulary is {model_config.text.vocab_size}"
        )
    target = epath.Path(Workdir(workdir).tokenizer)
    if jax.process_index() == 0 and os.path.abspath(tokenizer_dir) != os.path.abspath(
        os.fspath(target)
    ):
        # Keep the workdir self-contained: stage 2, export and search find the tokenizer here.
        target.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(tokenizer_dir):
            source = os.path.join(tokenizer_dir, name)
            if os.path.isfile(source):
                (target / name).write_bytes(epath.Path(source).read_bytes())
    return tokenizer


def _loader_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``make_train_loader`` keywords every stream shares: this host's shard of the global
    batch, the example cache and the read threads of config.data."""
    d = config.data
    if d.read_threads < 0 or d.read_buffer_size < 1:
        raise ValueError(
            f"data.read_threads={d.read_threads} and data.read_buffer_size="
            f"{d.read_buffer_size}: expected read_threads >= 0 and read_buffer_size >= 1"
        )
    if d.cache_examples_mb < 0:
        raise ValueError(f"data.cache_examples_mb={d.cache_examples_mb}: expected >= 0 (0: off)")
    return dict(
        cache_bytes=int(d.cache_examples_mb * 2**20),
        global_batch_size=d.global_batch_size,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        seed=config.seed,
        num_epochs=None,
        worker_count=d.worker_count,
        read_options=grain.ReadOptions(
            num_threads=d.read_threads, prefetch_buffer_size=d.read_buffer_size
        ),
    )


def _pair_loaders(
    config: ml_collections.ConfigDict, builders: dict[str, Any], batcher, loader_options
) -> dict[str, Any]:
    """Stage 1: a loader per pair kind, with one hard negative at most for text triples and
    none for image captions."""
    d = config.data
    loaders = {}
    for kind, builder in builders.items():
        transform = batcher(
            kind=kind,
            num_hard_negatives=min(d.num_hard_negatives, 1) if kind == "text_triples" else 0,
        )
        loaders[kind] = make_train_loader(
            load_source(builder, "train"), transform=transform, **loader_options
        )
    if not loaders:
        raise ValueError(
            f"data.root={d.root} has no pairs/text_triples.jsonl or pairs/image_captions.jsonl"
        )
    return loaders


def _mbeir_loaders(
    config: ml_collections.ConfigDict, builders: dict[str, Any], batcher, loader_options
) -> tuple[dict[str, Any], dict[str, int]]:
    """Stage 2: a loader per dataset (the whole split, or one per task with
    ``data.task_batches``, each at least a batch) with the M-BEIR task instructions;
    returns (loaders, {name: training pairs})."""
    d = config.data
    transform = batcher(
        kind="mbeir",
        instructions=MBEIR(d.root).instructions(),
        num_hard_negatives=d.num_hard_negatives,
    )
    loaders, sizes = {}, {}
    for name, builder in builders.items():
        source = load_source(builder, "train")
        sizes[name] = len(source)
        if d.task_batches and sizes[name] < d.global_batch_size:
            raise ValueError(
                f"data.task_batches: task {name} has {sizes[name]} training pairs, fewer "
                f"than one batch of data.global_batch_size={d.global_batch_size}"
            )
        loaders[name] = make_train_loader(source, transform=transform, **loader_options)
    return loaders, sizes
