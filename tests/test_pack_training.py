"""Training on packed sides (``data.pack``): the same loss and gradients as unpacked."""

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_fixtures import assert_trees_close, loss_and_grad, processed_items, spread_weights

from jfe_jax.data.collate import collate, collate_packed
from jfe_jax.data.image_processor import ImageProcessor
from jfe_jax.data.pipeline import ContrastiveBatcher
from jfe_jax.data.tokenizer import build_tokenizer
from jfe_jax.models.batches import TrainBatch, is_packed
from jfe_jax.models.inputs import dummy_batch
from jfe_jax.models.one_tower import EncoderOptions
from jfe_jax.models.packing import pack_items
from jfe_jax.models.sizes import get_size
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.config_base import demo_stage1_config
from jfe_jax.train.setup import validate_config
from jfe_jax.train.step import TrainState

RTOL = 1e-5  # relative to each leaf's max |value|, float32
PAD = 0

# Per pair: a make_inputs row spec of the query (text) and of its candidate (text or image).
PAIRS = [
    ([9], [4, (4, 4), 3]),
    ([30], [12]),
    ([5], [(2, 8), 2]),
    ([17], [20]),
    ([3], [6, (4, 2)]),
    ([12], [3]),
    ([25], [(2, 4)]),
    ([7], [15]),
] * 2


def _batches(config, num_hard):
    """The same 16 pairs (and hard negatives) unpacked and packed into 8 rows per side."""
    sides = {
        "query": processed_items(config, [q for q, _ in PAIRS], seed=0),
        "candidate": processed_items(config, [c for _, c in PAIRS], seed=100),
    }
    if num_hard:
        specs = [c for _, c in PAIRS[3:] + PAIRS[:3]] * num_hard
        sides["hard_negative"] = processed_items(config, specs, seed=200)
    keys = np.arange(len(PAIRS), dtype=np.int32)
    common = {"query_key": keys, "candidate_key": keys + 1000}
    if num_hard:
        common["hard_negative_key"] = (keys[:, None] * num_hard + np.arange(num_hard)) + 2000
    unpacked, packed = dict(common), dict(common)
    for name, items in sides.items():
        unpacked[name] = collate(
            items, config=config, pad_token_id=PAD, length_buckets=(64,), patch_budget=32
        )
        packed[name] = collate_packed(
            items, config=config, pad_token_id=PAD, length=64, patch_budget=64,
            num_rows=8 * max(1, len(items) // len(PAIRS)),
        )  # fmt: skip
        assert packed[name].input_ids.shape[0] < len(items)
        assert packed[name].pool_index.shape[0] == len(items)
    return TrainBatch(**unpacked), TrainBatch(**packed)


@pytest.fixture(scope="module")
def model():
    """The tiny encoder, all parameters trainable, with well-spread random weights."""
    config = get_size("tiny")
    module = EncoderOptions().module(config)
    boxed = module.init(jax.random.key(0), dummy_batch(config))["params"]
    params = spread_weights(nn.meta.unbox(boxed))
    return config, module, boxed, params


def _loss_and_grad(module, boxed, params, batch, mesh):
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=params, frozen={}, opt_state=None)
    return loss_and_grad(module, state, batch, mesh=mesh, boxed=boxed)


def _assert_close(a, b):
    assert_trees_close(a, b, RTOL)


def _check_packed_step_equals_unpacked(model, num_hard):
    config, module, boxed, params = model
    mesh = mesh_lib.make_mesh(dict(data=8, fsdp=1, tensor=1))
    unpacked, packed = _batches(config, num_hard)
    loss_u, grads_u = _loss_and_grad(module, boxed, params, unpacked, mesh)
    loss_p, grads_p = _loss_and_grad(module, boxed, params, packed, mesh)
    assert abs(loss_p - loss_u) <= RTOL * abs(loss_u)
    _assert_close(grads_p, grads_u)


def test_packed_step_gives_the_unpacked_loss_and_gradients(model):
    _check_packed_step_equals_unpacked(model, num_hard=0)


def test_packed_step_with_hard_negatives_gives_the_unpacked_loss_and_gradients(model):
    _check_packed_step_equals_unpacked(model, num_hard=1)


# ---------------------------------------------------------------------------------------------
# ContrastiveBatcher with pack on


@pytest.fixture(scope="module")
def tokenizer():
    rng = np.random.default_rng(0)
    words = "red green blue circle square left right top what is on the a photo".split()
    return build_tokenizer([" ".join(rng.choice(words, 6)) for _ in range(100)], 512)


def _caption_records(count, seed):
    rng = np.random.default_rng(seed)
    words = "red green blue circle square left right top what is on the".split()
    records = []
    for i in range(count):
        size = (56, 56) if i % 2 else (84, 56)
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            out, format="PNG"
        )
        caption = " ".join(rng.choice(words, int(rng.integers(1, 12))))
        records.append({"id": f"r{i}", "caption": caption, "image": out.getvalue()})
    return records


def _batcher(tokenizer, **options):
    return ContrastiveBatcher.from_options(
        tokenizer,
        ImageProcessor(max_pixels=56 * 84),
        get_size("tiny"),
        kind="image_captions",
        length_buckets=(64, 128),
        candidate_patch_budget=24,
        prompt="a photo:",
        **options,
    )


def test_batcher_packs_each_side_into_one_static_shape_with_fewer_rows(tokenizer):
    batcher = _batcher(tokenizer, pack=True, pack_items_per_row=4, pack_row_multiple=2)
    shapes = set()
    for seed in range(3):
        batch = batcher(_caption_records(16, seed))
        for side in ("query", "candidate"):
            assert getattr(batch, side).input_ids.shape == (4, 128)  # 16 items, 4 a row
            assert getattr(batch, side).pool_index.shape == (16, 2)
            np.testing.assert_array_equal(getattr(batch, side).item_mask, 1)
        assert batch.candidate.pixel_values.shape[:2] == (4, 96)
        shapes.add(str(jax.tree.map(np.shape, batch)))
    assert len(shapes) == 1
    # 6 items round up to 2 rows (4 a row), a multiple of pack_row_multiple=2.
    assert batcher(_caption_records(6, 0)).query.input_ids.shape == (2, 128)


def test_batcher_without_pack_is_unchanged(tokenizer):
    records = _caption_records(4, 0)
    plain = _batcher(tokenizer)(records)
    assert not is_packed(plain.query)
    assert plain.candidate.input_ids.shape[0] == 4


def test_batcher_raises_when_a_side_does_not_fit_its_packed_rows(tokenizer):
    batcher = _batcher(tokenizer, pack=True, pack_items_per_row=8)
    with pytest.raises(ValueError, match=r"query: 16 items do not pack into 2 rows of 128"):
        batcher(_caption_records(16, 0))  # 16 captions of about 28 tokens, more than 2 x 128


def test_batcher_rejects_pack_with_late_fusion_or_short_rows(tokenizer):
    with pytest.raises(ValueError, match="pack=True packs early-fusion items only"):
        _batcher(tokenizer, pack=True, fusion="late")
    with pytest.raises(ValueError, match="pack_length=64 is shorter than max_length=128"):
        _batcher(tokenizer, pack=True, pack_length=64)


# ---------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"train.grad_cache_chunk": 4},
            "data.pack with train.grad_cache_chunk=4: the chunk must be a multiple of the "
            "data-parallel size 8",
        ),
        ({"model.fusion": "late"}, "data.pack packs early-fusion items only"),
        ({"data.pack_items_per_row": 0}, "data.pack_items_per_row must be >= 1"),
        ({"data.pack_length": 64}, "data.pack_length=64 is shorter than data.max_length=128"),
    ],
)
def test_config_validation_rejects_unsupported_pack_settings(overrides, message):
    config = demo_stage1_config()
    config.data.pack = True
    validate_config(config)  # the demo config packs as it is
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)


# ---------------------------------------------------------------------------------------------
# Several hosts: host-local rows -> global rows


def test_two_hosts_pool_index_points_at_the_global_rows():
    config = get_size("tiny")
    rng = np.random.default_rng(0)
    hosts, rows_per_host = [], 4
    for _ in range(2):
        ids = [rng.integers(1, 100, size=int(n)).astype(np.int32) for n in rng.integers(3, 20, 8)]
        hosts.append((ids, pack_items(config, ids, length=32, num_rows=rows_per_host)))
    # Host p's local rows are the global rows [4p, 4p + 4) (2 shards of 2 rows each).
    global_ids = np.concatenate([packed.input_ids for _, packed in hosts])
    for host, (ids, packed) in enumerate(hosts):
        starts = [rows_per_host * host + 2, rows_per_host * host]
        positions = mesh_lib.host_row_positions(starts, 2)
        np.testing.assert_array_equal(positions, np.arange(4) + rows_per_host * host)
        pool_index = mesh_lib.globalize_pool_index(packed.pool_index, positions)
        for item, (row, last) in zip(ids, pool_index):
            np.testing.assert_array_equal(global_ids[row, last - len(item) + 1 : last + 1], item)


def test_host_rows_of_interleaved_shards_map_to_their_global_rows():
    # A host holding global shards 1 and 3 (of 4, 2 rows each) feeds rows 2, 3, 6, 7 in order.
    positions = mesh_lib.host_row_positions([6, 2], 2)
    np.testing.assert_array_equal(positions, [2, 3, 6, 7])
    pool_index = np.array([[0, 5], [3, 1], [2, 9]], np.int32)
    np.testing.assert_array_equal(
        mesh_lib.globalize_pool_index(pool_index, positions), [[2, 5], [7, 1], [6, 9]]
    )
