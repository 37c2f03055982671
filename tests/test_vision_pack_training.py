"""Training with images in vision rows of their own (``data.pack_vision``): the same loss and
gradients as the per-row patch budgets, with and without the gradient cache, for less work."""

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_fixtures import (
    MIXED_PAIRS,
    assert_same_step,
    contrastive_loss_and_grad_fn,
    count_forward_dots,
    processed_items,
    small_bench,
    spread_weights,
    step_on_mesh,
)

from jfe_jax.data.collate import collate
from jfe_jax.data.image_processor import ImageProcessor
from jfe_jax.data.pipeline import ContrastiveBatcher
from jfe_jax.data.tokenizer import build_tokenizer
from jfe_jax.models import flops
from jfe_jax.models.batches import TrainBatch, VisionPackedBatch, text_rows
from jfe_jax.models.inputs import dummy_batch
from jfe_jax.models.one_tower import EncoderOptions
from jfe_jax.models.packing import pack_vision, vision_groups
from jfe_jax.models.padding import padding_report
from jfe_jax.models.sizes import get_size
from jfe_jax.train.optimizer import trainable_mask
from jfe_jax.train.step import TrainState, split_params

RTOL = 1e-5  # relative to each leaf's max |value|, float32
PAD = 0
BUDGET = 32  # image patches per text row, unpacked
BLOCKS = (16,)  # patch counts with per-image attention blocks; the rest share masked rows

PAIRS = MIXED_PAIRS  # text only, image only, text with one or two images


def _side(config, specs, seed):
    return collate(
        processed_items(config, specs, seed),
        config=config,
        pad_token_id=PAD,
        length_buckets=(64,),
        patch_budget=BUDGET,
    )


@pytest.fixture(scope="module")
def batches():
    """The same 16 pairs with per-row patch budgets and vision-packed (8 shards' rows)."""
    config = get_size("tiny")
    keys = np.arange(len(PAIRS), dtype=np.int32)
    unpacked = TrainBatch(
        query=_side(config, [q for q, _ in PAIRS], seed=0),
        candidate=_side(config, [c for _, c in PAIRS], seed=100),
        query_key=keys,
        candidate_key=keys + 1000,
    )
    packed = unpacked.replace(
        **{
            name: pack_vision(side, row_multiple=8, coarse=True, block_sizes=BLOCKS)
            for name, side in unpacked.named_sides().items()
        }
    )
    return unpacked, packed


@pytest.fixture(scope="module")
def model():
    """The tiny encoder with well-spread random weights."""
    config = get_size("tiny")
    module = EncoderOptions().module(config)
    boxed = module.init(jax.random.key(0), dummy_batch(config))["params"]
    return config, module, boxed, spread_weights(nn.meta.unbox(boxed))


def _loss_and_grad(model, batch, *, mode, chunk):
    """(loss, grads) of one step on a data x fsdp mesh (``train_fixtures.step_on_mesh``)."""
    _, module, boxed, params = model
    return step_on_mesh(module, boxed, params, batch, mode=mode, chunk=chunk)


def _assert_same_step(got, want):
    assert_same_step(got, want, RTOL)


# ---------------------------------------------------------------------------------------------
# The layout


def test_vision_rows_hold_every_image_once_and_no_text_rows_budget(batches):
    unpacked, packed = batches
    for name in ("query", "candidate"):
        side, rows = getattr(packed, name), getattr(unpacked, name)
        assert side.rows.pixel_values is None and side.rows.input_ids.shape == rows.input_ids.shape
        groups = vision_groups(side)
        assert len(groups) == 2  # masked rows of BUDGET patches, then the 16-patch blocks
        assert groups[0][0].shape[1] == BUDGET and groups[1][0].shape[1:2] == (16,)
        # Every block row holds one whole image (or is a padding row): no cross-image scores.
        block_segments = groups[1][1]
        assert set(np.unique(block_segments.max(axis=1))) <= {0, 1}
        assert np.all((block_segments == 1).sum(axis=1) % 16 == 0)
        real = sum(int((seg > 0).sum()) for _, seg, _ in groups)
        assert real == int((rows.patch_segment_ids > 0).sum())
        total = sum(seg.size for _, seg, _ in groups)
        assert total < rows.patch_segment_ids.size
        # Each image token of a text row reads a distinct real vision output.
        flat_real = np.concatenate([(seg > 0).reshape(-1, 4).all(axis=1) for _, seg, _ in groups])
        index = side.image_token_index[rows.patch_segment_ids[:, ::4] > 0]
        assert len(set(index.tolist())) == index.size and flat_real[index].all()


def test_vision_packing_lowers_the_patch_padding_and_the_model_flops(batches):
    config = get_size("tiny")
    unpacked, packed = batches
    for name in ("query", "candidate"):
        unpacked_side, packed_side = getattr(unpacked, name), getattr(packed, name)
        before = padding_report(unpacked_side, config)
        after = padding_report(packed_side, config)
        assert after["patch_padding"] < before["patch_padding"]
        # Most of what is left is the rounding of 16 text rows' images to rows for 8 devices.
        dense = pack_vision(unpacked_side, block_sizes=BLOCKS)
        assert padding_report(dense)["patch_padding"] < 0.3 * before["patch_padding"]
        assert after["vision_attention_padding"] < before["vision_attention_padding"]
        assert after["flops_padding"] < before["flops_padding"]
        assert after["token_padding"] == before["token_padding"]
        # Model FLOPs: the text rows as before, the tower on the vision rows' shapes.
        text = flops.text_forward_flops(config, *unpacked_side.input_ids.shape)
        vision = sum(
            flops.vision_forward_flops(config, *seg.shape)
            for _, seg, _ in vision_groups(packed_side)
        )
        assert flops.batch_forward_flops(config, packed_side) == text + vision
        assert vision < flops.vision_forward_flops(config, len(PAIRS), BUDGET)


# ---------------------------------------------------------------------------------------------
# The step: the same loss and gradients


@pytest.fixture(scope="module")
def reference(model, batches):
    """Loss and gradients of the unpacked batch, whole-batch step, every param trained."""
    return _loss_and_grad(model, batches[0], mode="full", chunk=0)


def test_vision_packed_step_gives_the_unpacked_loss_and_gradients(model, batches, reference):
    _assert_same_step(_loss_and_grad(model, batches[1], mode="full", chunk=0), reference)


def test_vision_packed_step_with_grad_cache_and_a_trained_tower_gives_the_same(
    model, batches, reference
):
    # Chunks of 8 text rows (one per device); the tower's gradient comes through the cached
    # image tokens' cotangents and one vjp over the vision rows.
    _assert_same_step(_loss_and_grad(model, batches[1], mode="full", chunk=8), reference)


def test_vision_packed_step_with_grad_cache_and_a_frozen_tower_gives_the_same(model, batches):
    want = _loss_and_grad(model, batches[0], mode="freeze_vision", chunk=0)
    got = _loss_and_grad(model, batches[1], mode="freeze_vision", chunk=8)
    assert not any("vision" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(got[1]))
    _assert_same_step(got, want)


def test_grad_cache_runs_the_vision_rows_once_frozen_and_twice_trained(model, batches):
    """Frozen: one forward over the vision rows per step. Trained: the forward, then the vjp's
    forward (never once per text chunk)."""
    _, module, _, params = model
    runs = {}
    for mode in ("freeze_vision", "full"):
        trainable, frozen = split_params(params, trainable_mask(params, mode))
        state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, None)
        fn = contrastive_loss_and_grad_fn(module, chunk=4)
        jaxpr = jax.make_jaxpr(fn)(state, batches[1]).jaxpr
        runs[mode] = count_forward_dots(jaxpr, "vision/patch_embed")
    # Two sides, two vision-row groups each.
    assert runs == {"freeze_vision": 4, "full": 8}


# ---------------------------------------------------------------------------------------------
# The training collate


@pytest.fixture(scope="module")
def tokenizer():
    rng = np.random.default_rng(0)
    words = "red green blue circle square left right top what is on the a photo".split()
    return build_tokenizer([" ".join(rng.choice(words, 6)) for _ in range(100)], 512)


def _caption_records(count, seed):
    """Image-caption records with images of 16, 24 and 36 patches."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        width, height = [(56, 56), (84, 56), (84, 84)][i % 3]
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
        records.append(
            {"id": f"r{i}", "caption": "red circle on the left", "image": out.getvalue()}
        )
    return records


def _batcher(tokenizer, **options):
    return ContrastiveBatcher.from_options(
        tokenizer,
        ImageProcessor(max_pixels=84 * 84),
        get_size("tiny"),
        kind="image_captions",
        length_buckets=(64, 128),
        candidate_patch_budget=36,
        prompt="a photo:",
        **options,
    )


@pytest.mark.parametrize("pack", [False, True])
def test_batcher_moves_each_sides_images_into_vision_rows(tokenizer, pack):
    records = _caption_records(12, 0)
    plain = _batcher(tokenizer, pack=pack, pack_row_multiple=2)(records)
    batch = _batcher(
        tokenizer, pack=pack, pack_row_multiple=2, pack_vision=True, pack_vision_blocks=(24,)
    )(records)
    assert text_rows(batch.query).pixel_values is None
    assert not isinstance(batch.query, VisionPackedBatch)
    side = batch.candidate
    assert side.rows.pixel_values is None
    assert side.masked.pixel_values.shape[1] == 36  # the per-item budget, even when packed
    assert side.blocks[0].pixel_values.shape[:2] == (4, 24)  # 4 images of 24
    np.testing.assert_array_equal(side.rows.input_ids, plain.candidate.input_ids)
    real = sum(int((seg > 0).sum()) for _, seg, _ in vision_groups(side))
    assert real == int((plain.candidate.patch_segment_ids > 0).sum()) == 4 * (16 + 24 + 36)
    for _, seg, _ in vision_groups(side):
        assert seg.shape[0] % 2 == 0  # rows split over the host's batch shards


def test_batcher_with_a_row_fraction_feeds_one_vision_row_count_for_every_batch(tokenizer):
    half = _batcher(tokenizer, pack_row_multiple=2, pack_vision=True, pack_vision_row_fraction=0.5)
    assert half.vision_rows(12) == 6 and half.vision_rows(10) == 6  # 5 -> a multiple of 2
    # Every candidate is an image (36, 24, 16 patches): 12 of them need 10 rows of 36.
    batcher = _batcher(
        tokenizer, pack_row_multiple=2, pack_vision=True, pack_vision_row_fraction=1.0
    )
    shapes = set()
    for seed in range(3):
        side = batcher(_caption_records(12, seed)).candidate
        shapes.add(side.masked.pixel_values.shape)
        assert not side.blocks
    assert shapes == {(12, 36, get_size("tiny").vision.patch_dim)}
    with pytest.raises(
        ValueError, match="need 10 vision rows of 36 patches but the fixed count is 6"
    ):
        half(_caption_records(12, 0))
    with pytest.raises(ValueError, match="use one of the two"):
        _batcher(
            tokenizer, pack_vision=True, pack_vision_row_fraction=0.5, pack_vision_blocks=(24,)
        )
    with pytest.raises(ValueError, match="pack_vision_row_fraction=1.5"):
        _batcher(tokenizer, pack_vision=True, pack_vision_row_fraction=1.5)


def test_batcher_rejects_vision_packing_with_late_fusion_or_odd_block_sizes(tokenizer):
    with pytest.raises(ValueError, match="pack_vision=True packs early-fusion images only"):
        _batcher(tokenizer, pack_vision=True, fusion="late")
    with pytest.raises(ValueError, match=r"pack_vision_blocks=\(18,\).*multiple of .* 4"):
        _batcher(tokenizer, pack_vision=True, pack_vision_blocks=(18,))


# ---------------------------------------------------------------------------------------------
# train() with the option on


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return small_bench(tmp_path_factory.mktemp("bench") / "synthetic")


@pytest.mark.slow
def test_train_with_vision_or_sequence_packing_and_grad_cache_gives_the_same_loss(bench, tmp_path):
    # One unpacked run against two packed ones: images in vision rows of their own
    # (data.pack_vision), and items several to a row in the cache's chunks (data.pack,
    # tests/test_pack_grad_cache.py has the step-level checks).
    import json
    import os

    from jfe_jax.train.config_base import demo_stage1_config
    from jfe_jax.train.trainer import train

    def run(workdir, **data):
        config = demo_stage1_config()
        config.data.root = bench
        config.data.global_batch_size = 16
        for key, value in data.items():
            config.data[key] = value
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
        config.train.grad_cache_chunk = 8  # 2 chunks a side, a multiple of data x fsdp = 4
        config.train.num_steps = 1  # the streams take turns: an image-captions batch first
        config.train.log_every = 1
        config.optimizer.warmup_steps = 0
        train(config, str(workdir))
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f][-1]

    plain = run(tmp_path / "plain")
    vision = run(tmp_path / "vision", pack_vision=True)
    # 16 images of 16 to 64 patches: 16 rows of 64 patches, or 12 vision rows (4 batch shards).
    assert vision["patch_padding"] < 0.7 * plain["patch_padding"], (vision, plain)
    assert vision["flops_padding"] < plain["flops_padding"]
    packed = run(tmp_path / "packed", pack=True)
    assert packed["token_padding"] < plain["token_padding"], (packed, plain)
    for got in (vision, packed):
        assert abs(got["loss"] - plain["loss"]) <= 1e-5 * abs(plain["loss"])
        assert abs(got["grad_norm"] - plain["grad_norm"]) <= 1e-4 * plain["grad_norm"]
