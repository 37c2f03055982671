"""The train batch ``jfe aot`` compiles: the data pipeline's own collate over laid-out items.

The trainer's batches are collated by ``ContrastiveBatcher.collate`` (``jfe_jax.data.pipeline``),
set up from the config by ``train.data.make_train_data``. ``jfe aot`` sets one up the same way,
lays out a global batch of examples (token ids and image grids, as ``encode`` would make them,
with no tokenizer and no files), has it collate each host's share, and takes the shapes of
what it returns, made global as ``mesh.global_batch_from_host`` makes them. Sequence packing
(``data.pack``), late fusion (``model.fusion``) and vision packing (``data.pack_vision``) are
thus laid out by the code that lays out training batches, not by a copy of it.

Which stream: ``data.kind = "mbeir"`` has one; stage 1 (``"pairs"``) alternates text triples
and image captions, and aot compiles the image-caption stream (caption queries, image
candidates; the query patch budget is unused), or the text triples when
``data.candidate_patch_budget`` is 0.

What the examples hold (``--batch-mix``):

* ``uniform`` (the default): every item as large as its side allows, the padded layout with
  (nearly) nothing padded: L tokens of text and, where the side has a patch budget, one image
  of the budget's patches among them (smaller only when L cannot hold its tokens); a side of
  images only (image captions) holds the image and the chat template. With ``data.pack`` each
  item fills its share of a row, ``pack_length / pack_items_per_row`` tokens.
* ``mbeir``: the rows of M-BEIR's union training set (``data.kind = "mbeir"`` only): each row
  one of the 16 training tasks in proportion to its training queries (``MBEIR_TRAIN_QUERIES``),
  so queries and candidates are text-only, image-only or image+text as the tasks make them,
  images at ``data.image_max_pixels`` (Qwen2-VL's resize of a square image) and text filling
  the item up to the batch shape's length L, packed or not (the items are the data's, the
  same under every layout, and so are the required FLOPs). Hard negatives take the task's
  candidate modality.

The required FLOPs (``models.flops.batch_required_flops``) count each item's real tokens and
real patches alone, as if nothing were padded: the MFU at them is the share of the chips'
peak doing work a training step needs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jfe_jax.data.image_processor import smart_resize
from jfe_jax.data.item_format import ItemFormat
from jfe_jax.data.late_fusion import LateItem
from jfe_jax.data.mbeir import TASK_MODALITIES, TEST_TASKS
from jfe_jax.data.pipeline import ContrastiveBatcher, EncodedExample
from jfe_jax.data.processing import ProcessedItem
from jfe_jax.models.batches import EarlyBatch
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.flops import batch_required_flops
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.setup import batch_layout

BATCH_MIXES = ("uniform", "mbeir")

# M-BEIR's 16 training tasks and their training queries: UniIR (Wei et al., "UniIR: Training
# and Benchmarking Universal Multimodal Information Retrievers", arXiv 2311.17136), Table 1,
# "Train" column, in thousands as printed there (also github.com/TIGER-AI-Lab/UniIR, branch
# github-page, static/images/Table1.png). Their sum, 1.15M, is the table's "1.1M". Task ids as
# ``data.mbeir.TASK_MODALITIES`` numbers them (the paper's tasks 1-8 are ids 0-4 and 6-8).
MBEIR_TRAIN_QUERIES = {
    "visualnews_task0": 99_000,
    "mscoco_task0": 100_000,
    "fashion200k_task0": 15_000,
    "webqa_task1": 16_000,
    "edis_task2": 26_000,
    "webqa_task2": 17_000,
    "visualnews_task3": 100_000,
    "mscoco_task3": 113_000,
    "fashion200k_task3": 15_000,
    "nights_task4": 16_000,
    "oven_task6": 150_000,
    "infoseek_task6": 141_000,
    "fashioniq_task7": 16_000,
    "cirr_task7": 26_000,
    "oven_task8": 157_000,
    "infoseek_task8": 143_000,
}
assert tuple(MBEIR_TRAIN_QUERIES) == TEST_TASKS  # the same 16 tasks train and test

# Tokens of an item besides its text and image (``data.processing``'s chat layout), estimated
# for Qwen2-VL's tokenizer: "<|im_start|>user\n" 3, <|vision_start|> and <|vision_end|> 2,
# "\n" and the default prompt "Summarize above image and sentence in one word:" 12,
# "<|im_end|>\n<|im_start|>assistant\n" 5. They matter only for items without text.
TEMPLATE_TOKENS = 22
INSTRUCTION_TOKENS = 12  # an M-BEIR instruction, e.g. "Find an everyday image match with caption"


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """Padded sizes of one step's rows: sequence length and patch budgets per side."""

    length: int
    query_patches: int
    candidate_patches: int


def batch_shape_for(config: ml_collections.ConfigDict, spec: str = "") -> BatchShape:
    """The config's largest length bucket and patch budgets, overridden by ``L=..,P=..``."""
    shape = {
        "L": max(config.data.length_buckets),
        "QP": config.data.query_patch_budget,
        "CP": config.data.candidate_patch_budget,
    }
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        key = key.strip().upper()
        if key not in ("L", "P", "QP", "CP") or not value.strip().isdigit():
            raise ValueError(
                f"--batch-shape part {part!r} is not KEY=INT with KEY one of L (length), "
                f"P (patches, both sides), QP, CP (query / candidate patches)"
            )
        for k in ("QP", "CP") if key == "P" else (key,):
            shape[k] = int(value)
    if shape["L"] < 1:
        raise ValueError(f"--batch-shape L must be positive, got {shape['L']}")
    return BatchShape(shape["L"], shape["QP"], shape["CP"])


@dataclasses.dataclass(frozen=True)
class AotBatch:
    """A train batch as ``jfe aot`` lowers it."""

    batch: dict[str, Any]  # the global batch: ShapeDtypeStructs in the batch sharding
    required_flops: float  # every item of the global batch, real tokens and patches only
    modalities: dict[str, dict[str, int]]  # side -> {"text" | "image" | "image,text": items}
    host_batch: dict[str, Any]  # the first host's collated batch (numpy, pixels 1 float wide)


@dataclasses.dataclass(frozen=True)
class _Side:
    """What one side of the stream can hold."""

    name: str
    text: bool
    image_budget: int  # patches per item; 0: no images
    instruction: bool  # M-BEIR queries carry their task's instruction


def train_batch(
    config: ml_collections.ConfigDict,
    model_config: ModelConfig,
    mesh: jax.sharding.Mesh,
    shape: BatchShape,
    mix: str = "uniform",
) -> AotBatch:
    """The train batch of ``config`` at ``shape`` on ``mesh``, its examples laid out by ``mix``.

    The examples of ``data.global_batch_size`` rows are laid out, and each host's share (the
    slice's hosts are the processes of the mesh's devices) is collated as that host's loader
    collates it; every leaf of the first host's batch is then as ``global_batch_from_host``
    makes it: leading size over the data-parallel shards.
    """
    if mix not in BATCH_MIXES:
        raise ValueError(f"--batch-mix must be one of {BATCH_MIXES}, got {mix!r}")
    d = config.data
    hosts, local_shards = _slice_hosts(config, mesh)
    kind, num_hard, sides = _stream(config, shape)
    if mix == "mbeir" and kind != "mbeir":
        raise ValueError(
            f"--batch-mix mbeir lays out M-BEIR's training tasks; data.kind={d.kind!r} trains "
            "on pairs"
        )
    batcher = _batcher(config, model_config, shape, kind, num_hard, local_shards, hosts)
    layout = _ItemLayout(
        model_config,
        # The mix's items are what the data holds, the same whatever the layout (so packing's
        # gain shows against the same required FLOPs); uniform items fill a packed row's share.
        item_length=(
            batcher.layout.pack_length // d.pack_items_per_row
            if d.pack and mix != "mbeir"
            else shape.length
        ),
        late=config.model.fusion == "late",
        grid=_max_pixel_grid(config, model_config) if mix == "mbeir" else None,
    )
    rows = d.global_batch_size
    tasks = mbeir_tasks(rows) if mix == "mbeir" else [None] * rows
    examples, modalities = _examples(layout, sides, tasks, num_hard)
    host_batches = _collate_per_host(batcher, examples, hosts, mix)
    items = {
        "query": [e.query for e in examples],
        "candidate": [e.candidate for e in examples],
        "hard_negative": [h for e in examples for h in e.hard_negatives],
    }
    return AotBatch(
        host_batch=host_batches[0],
        batch=_global_shapes(host_batches[0], model_config.vision.patch_dim, mesh, local_shards),
        required_flops=sum(_required_flops(config, model_config, i) for i in items.values()),
        modalities=modalities,
    )


def _slice_hosts(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[int, int]:
    """``(hosts, batch shards on the first host)`` of the slice (its hosts are the processes
    of the mesh's devices), after checking the batch against them as the trainer does."""
    d = config.data
    devices = list(mesh.devices.flat)
    hosts = len({device.process_index for device in devices})
    if d.global_batch_size % hosts:
        raise ValueError(
            f"data.global_batch_size={d.global_batch_size} is not divisible by the slice's "
            f"{hosts} hosts"
        )
    if d.pack_vision and not d.pack_vision_row_fraction and hosts > 1:
        raise ValueError(
            f"data.pack_vision on the slice's {hosts} hosts needs data.pack_vision_row_fraction "
            "(a fixed vision row count every host feeds), as the trainer does"
        )
    return hosts, mesh_lib.local_data_parallel_shards(mesh, devices[0].process_index)


def _examples(
    layout: _ItemLayout, sides: list[_Side], tasks: list, num_hard: int
) -> tuple[list[EncodedExample], dict[str, dict[str, int]]]:
    """``(examples, side -> {modality: items})``: one example per row of ``tasks`` (an M-BEIR
    task of the mbeir mix, or None: uniform), its query, candidate and ``num_hard`` hard
    negatives laid out by ``layout`` for ``sides``; keys unique over the batch."""
    rows = len(tasks)
    examples, modalities = [], {"query": [], "candidate": [], "hard_negative": []}
    for row, task in enumerate(tasks):
        query, candidate, hard = (layout.item(side, task) for side in sides)
        modalities["query"].append(query[1])
        modalities["candidate"].append(candidate[1])
        modalities["hard_negative"] += [hard[1]] * num_hard
        examples.append(
            EncodedExample(
                query=query[0],
                candidate=candidate[0],
                hard_negatives=[hard[0]] * num_hard,
                query_key=row,
                candidate_key=rows + row,
                hard_negative_keys=[2 * rows + row] * num_hard,
                hard_negative_count=num_hard,
            )
        )
    counts = {
        side: dict(sorted(collections.Counter(names).items()))
        for side, names in modalities.items()
        if names
    }
    return examples, counts


def _collate_per_host(
    batcher: ContrastiveBatcher, examples: list[EncodedExample], hosts: int, mix: str
) -> list[Any]:
    """Each host's collated batch of its own rows (the mix is laid out over the global batch):
    every one must collate, and to the same shapes, as the trainer's hosts must."""
    per_host = len(examples) // hosts
    host_batches = []
    for host in range(hosts):
        try:
            host_batches.append(batcher.collate(examples[host * per_host : (host + 1) * per_host]))
        except ValueError as error:
            raise ValueError(f"the {mix} batch mix does not collate: {error}") from error
    host_shapes = {str(jax.tree_util.tree_map(np.shape, b)) for b in host_batches}
    if len(host_shapes) > 1:
        raise ValueError(f"the {mix} batch mix collates to different shapes on different hosts")
    return host_batches


def mbeir_tasks(rows: int) -> list[str]:
    """The task of each of ``rows`` rows: M-BEIR's training tasks in proportion to their
    queries (largest remainders), spread evenly over the rows."""
    total = sum(MBEIR_TRAIN_QUERIES.values())
    quotas = {task: rows * n / total for task, n in MBEIR_TRAIN_QUERIES.items()}
    counts = {task: math.floor(q) for task, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda task: counts[task] - quotas[task])
    for task in by_remainder[: rows - sum(counts.values())]:
        counts[task] += 1
    slots = sorted(
        ((k + 0.5) / counts[task], i, task)
        for i, task in enumerate(counts)
        for k in range(counts[task])
    )
    return [task for _, _, task in slots]


# ============================================================================ the stream


def _stream(config: ml_collections.ConfigDict, shape: BatchShape) -> tuple[str, int, list[_Side]]:
    """(batcher kind, hard negatives per query, the query, candidate and hard-negative sides)
    of the stream aot compiles (module docstring)."""
    d = config.data
    if d.kind == "mbeir":
        query = _Side("query", True, shape.query_patches, instruction=True)
        candidate = _Side("candidate", True, shape.candidate_patches, instruction=False)
        return "mbeir", d.num_hard_negatives, [query, candidate, candidate]
    text = _Side("query", True, 0, instruction=False)
    if shape.candidate_patches:  # image captions: caption queries, image candidates
        image = _Side("candidate", False, shape.candidate_patches, instruction=False)
        return "image_captions", 0, [text, image, image]
    candidate = dataclasses.replace(text, name="candidate")
    return "text_triples", min(d.num_hard_negatives, 1), [text, candidate, candidate]


def _batcher(
    config: ml_collections.ConfigDict,
    model_config: ModelConfig,
    shape: BatchShape,
    kind: str,
    num_hard: int,
    local_shards: int,
    hosts: int,
) -> ContrastiveBatcher:
    """A ContrastiveBatcher with the options ``make_train_data`` gives the trainer's, at
    ``shape``, collating pixels one float wide (``_global_shapes`` widens them: a 2b stage-2
    batch's pixels would take 10 GB of host memory)."""
    d = config.data
    # The trainer picks each side's length among the buckets; L is the longest here.
    buckets = tuple(b for b in d.length_buckets if b < shape.length) + (shape.length,)
    narrow = dataclasses.replace(
        model_config,
        vision=dataclasses.replace(
            model_config.vision, in_channels=1, temporal_patch_size=1, patch_size=1
        ),
    )
    pad_only = types.SimpleNamespace(pad_token_id=0)  # collate reads nothing else of it
    item_format = dataclasses.replace(
        ItemFormat.from_train_config(config, model_config.vision),
        length_buckets=buckets,
        query_patch_budget=shape.query_patches,  # the kind picks the sides that use them
        candidate_patch_budget=shape.candidate_patches,
    )
    layout = dataclasses.replace(
        batch_layout(config, local_shards, hosts), pack_length=d.pack_length or shape.length
    )
    return ContrastiveBatcher(
        pad_only,
        narrow,
        item_format,
        layout,
        kind=kind,
        instruction_mode=d.instruction_mode,
        instruction_seed=config.seed,
        num_hard_negatives=num_hard,
        skip_bad_records=d.skip_bad_records,
    )


def _global_shapes(host_batch: Any, patch_dim: int, mesh, local_shards: int) -> Any:
    """One host's collated batch -> the global batch's ShapeDtypeStructs (pixels widened to the
    model's ``patch_dim``; leading sizes as ``global_batch_from_host`` makes them)."""
    sharding = mesh_lib.batch_sharding(mesh)
    parallel = mesh_lib.data_parallel_size(mesh)

    def leaf(path, value):
        dims = list(np.shape(value))
        name = path[-1].key if hasattr(path[-1], "key") else getattr(path[-1], "name", "")
        if str(name).endswith("pixel_values"):
            dims[-1] = patch_dim
        if dims[0] % local_shards:
            raise ValueError(
                f"{jax.tree_util.keystr(path)}: a host's {dims[0]} rows do not split over "
                f"the {local_shards} batch shards its chips hold"
            )
        dims[0] = dims[0] // local_shards * parallel
        return jax.ShapeDtypeStruct(
            tuple(dims), jnp.dtype(np.asarray(value).dtype), sharding=sharding
        )

    return jax.tree_util.tree_map_with_path(leaf, host_batch)


# ============================================================================ the items


def _max_pixel_grid(config: ml_collections.ConfigDict, model_config: ModelConfig) -> tuple:
    """``image_grid_thw`` of a square image at ``data.image_max_pixels`` after Qwen2-VL's
    resize (the largest image the data pipeline lets through)."""
    v, d = model_config.vision, config.data
    side = math.isqrt(d.image_max_pixels)
    factor = v.patch_size * v.spatial_merge_size
    height, width = smart_resize(side, side, factor, d.image_min_pixels, d.image_max_pixels)
    return (1, height // v.patch_size, width // v.patch_size)


def _grid_for(patches: int, merge: int) -> tuple | None:
    """The squarest ``(1, h, w)`` grid (h, w multiples of ``merge``) of at most ``patches``."""
    best = None
    for h in range(merge, math.isqrt(patches) + 1, merge):
        w = patches // h // merge * merge
        if w and (best is None or h * w >= best[1] * best[2]):
            best = (1, h, w)
    return best


@dataclasses.dataclass(frozen=True)
class _ItemLayout:
    """Builds the items ``ContrastiveBatcher.encode`` would make (ids with one run of
    ``<|image_pad|>`` per image, zero pixels), from what they hold."""

    model_config: ModelConfig
    item_length: int  # text fills items up to this many tokens
    late: bool  # late fusion: text and image apart (``data.late_fusion.split_item``)
    grid: tuple | None  # the mbeir mix's image (at max pixels); None: uniform

    def item(self, side: _Side, task: str | None) -> tuple[ProcessedItem | LateItem, str]:
        """``(item, its modality)`` of ``side``, for ``task`` of the mbeir mix or uniform."""
        text, image = side.text, bool(side.image_budget)
        if task is not None:
            modality = TASK_MODALITIES[int(task.rsplit("task", 1)[1])][side.name != "query"]
            text, image = "text" in modality, "image" in modality
            if image and not side.image_budget:
                raise ValueError(
                    f"--batch-mix mbeir: task {task} has {side.name} images but the "
                    f"{side.name} patch budget is 0"
                )
        modality = ",".join(m for m, present in (("image", image), ("text", text)) if present)
        return self._item(side, text=text, image=image), modality

    def _item(self, side: _Side, *, text: bool, image: bool) -> ProcessedItem | LateItem:
        """Uniform: an item of exactly ``item_length`` tokens (text and, with a budget, the
        largest image its tokens leave room for; without text the template and the image).
        The mix: its image, the template, the instruction and text filling the item up to
        ``item_length``."""
        merge = self.model_config.vision.spatial_merge_size
        instruction = INSTRUCTION_TOKENS if side.instruction else 0
        grid, uniform = self.grid, self.grid is None
        if image and uniform:
            beside = 1 if text and not self.late else TEMPLATE_TOKENS  # a token of text at least
            room = max(self.item_length - beside, 0) * merge**2
            grid = _grid_for(min(side.image_budget, room), merge)
            if grid is None:
                raise ValueError(
                    f"{side.name} items of {self.item_length} tokens leave no room for an image"
                )
        elif image and math.prod(grid) > side.image_budget:
            raise ValueError(
                f"an image at data.image_max_pixels has {math.prod(grid)} patches (grid "
                f"{list(grid)}), more than the {side.name} patch budget {side.image_budget}: "
                "the data pipeline would reject it"
            )
        image_tokens = math.prod(grid) // merge**2 if image else 0
        if self.late:  # split_item: an image-only query keeps its instruction as its text
            text_part = None
            if text:
                text_part = self._ids(self.item_length)
            elif instruction and image:
                text_part = self._ids(TEMPLATE_TOKENS + instruction)
            image_part = self._ids(TEMPLATE_TOKENS + image_tokens, grid) if image else None
            return LateItem(text_part, image_part)
        tokens = TEMPLATE_TOKENS + instruction + image_tokens  # no text
        if text:
            tokens = self.item_length if uniform else max(self.item_length, tokens)
        return self._ids(tokens, grid if image else None)

    def _ids(self, length: int, grid=None) -> ProcessedItem:
        config = self.model_config
        filler = 1 if config.image_token_id == 0 else 0
        ids = np.full(length, filler, np.int32)
        if grid is None:
            return ProcessedItem(ids, None, None)
        patches = math.prod(grid)
        ids[1 : 1 + patches // config.vision.spatial_merge_size**2] = config.image_token_id
        pixels = np.zeros((patches, 1), np.float32)  # one float wide: see _batcher
        return ProcessedItem(ids, pixels, np.array([grid]))


def _parts(item: ProcessedItem | LateItem) -> list[ProcessedItem]:
    """What the model runs on for real: a late item's present parts, or the item."""
    if isinstance(item, LateItem):
        return [part for part in (item.text, item.image) if part is not None]
    return [item]


def _required_flops(
    config: ml_collections.ConfigDict, model_config: ModelConfig, items: Sequence
) -> float:
    """Required FLOPs of ``items``, each alone at its real tokens and patches."""
    sizes = collections.Counter(
        (len(part.input_ids), part.num_patches) for item in items for part in _parts(item)
    )
    total = 0.0
    for (tokens, patches), count in sizes.items():
        ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
        alone = EarlyBatch(
            input_ids=ids,
            attention_mask=ids,
            position_ids=jax.ShapeDtypeStruct((1, 3, tokens), jnp.int32),
            pixel_values=jax.ShapeDtypeStruct((1, patches, 1), jnp.float32) if patches else None,
        )
        total += count * batch_required_flops(
            model_config,
            alone,
            trainable=config.optimizer.trainable,
            lora_rank=config.model.lora_rank,
            lora_targets=tuple(config.model.lora_targets),
        )
    return total
