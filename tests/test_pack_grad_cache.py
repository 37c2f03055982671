"""Sequence packing with the gradient cache: a side packed in the cache's chunks
(``pack_items(chunks=)``, ``ContrastiveBatcher(pack_chunk_items=)``) gives the unpacked
whole-batch step's loss and gradients, with and without vision packing, on 8 devices
(``train()`` with both: tests/test_vision_pack_training.py)."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from train_fixtures import (
    MIXED_PAIRS,
    assert_same_step,
    processed_items,
    spread_weights,
    step_on_mesh,
)

from jfe_jax.data.collate import collate, collate_packed
from jfe_jax.models.batches import TrainBatch
from jfe_jax.models.inputs import dummy_batch
from jfe_jax.models.one_tower import EncoderOptions
from jfe_jax.models.packing import pack_items, pack_vision
from jfe_jax.models.sizes import get_size

RTOL = 1e-5  # relative to each leaf's max |value|, float32
PAD = 0
BUDGET = 32  # image patches per item
CHUNK = 8  # gradient-cache chunk: 16 items per side -> 2 chunks; a multiple of data x fsdp
ROWS = 8  # packed rows per side: 4 per chunk, 1 per batch shard and chunk
PAIRS = MIXED_PAIRS


def _batch(sides, **keys):
    n = len(PAIRS)
    return TrainBatch(
        query=sides[0],
        candidate=sides[1],
        query_key=np.arange(n, dtype=np.int32),
        candidate_key=np.arange(n, dtype=np.int32) + 1000,
        **keys,
    )


@pytest.fixture(scope="module")
def items():
    config = get_size("tiny")
    return (
        processed_items(config, [q for q, _ in PAIRS], seed=0),
        processed_items(config, [c for _, c in PAIRS], seed=100),
    )


def _packed(items, chunks):
    config = get_size("tiny")
    return [
        collate_packed(
            side,
            config=config,
            pad_token_id=PAD,
            length=64,
            patch_budget=4 * BUDGET,
            num_rows=ROWS,
            chunks=chunks,
        )
        for side in items
    ]


@pytest.fixture(scope="module")
def model():
    config = get_size("tiny")
    module = EncoderOptions().module(config)
    boxed = module.init(jax.random.key(0), dummy_batch(config))["params"]
    return module, boxed, spread_weights(nn.meta.unbox(boxed))


def _loss_and_grad(model, batch, *, mode="full", chunk=0):
    module, boxed, params = model
    return step_on_mesh(module, boxed, params, batch, mode=mode, chunk=chunk)


def _assert_same_step(got, want):
    assert_same_step(got, want, RTOL)


@pytest.fixture(scope="module")
def reference(model, items):
    """The unpacked batch's whole-batch step (no cache), every param trained."""
    config = get_size("tiny")
    sides = [
        collate(s, config=config, pad_token_id=PAD, length_buckets=(64,), patch_budget=BUDGET)
        for s in items
    ]
    return _loss_and_grad(model, _batch(sides))


# ---------------------------------------------------------------------------------------------
# The layout


def test_chunked_packing_keeps_each_item_in_a_row_of_its_chunk(items):
    chunks = 2
    for side, packed in zip(items, _packed(items, chunks)):
        assert packed.row_chunks == chunks and packed.input_ids.shape == (ROWS, 64)
        rows = np.asarray(packed.pool_index[:, 0])
        np.testing.assert_array_equal(rows % chunks, np.arange(len(side)) % chunks)
        for i, (row, last) in enumerate(np.asarray(packed.pool_index)):
            ids = side[i].input_ids
            np.testing.assert_array_equal(
                packed.input_ids[row, last - len(ids) + 1 : last + 1], ids
            )
    # Not a multiple of the chunks: refused, naming the numbers.
    config = get_size("tiny")
    ids = [np.ones(5, np.int32)] * 6
    with pytest.raises(ValueError, match=r"packing in 4 chunks needs item slots \(num_items=6\)"):
        pack_items(config, ids, length=16, num_rows=4, chunks=4)
    with pytest.raises(ValueError, match=r"chunk 0 of 2: its 3 items"):
        pack_items(config, ids, length=5, num_rows=2, chunks=2)  # one item a row, 1 row a chunk


# ---------------------------------------------------------------------------------------------
# The step: the unpacked loss and gradients


@pytest.mark.parametrize("chunk", [CHUNK, 2 * CHUNK], ids=["two_chunks", "one_chunk"])
def test_packed_step_with_grad_cache_gives_the_unpacked_loss_and_gradients(
    model, items, reference, chunk
):
    packed = _packed(items, len(PAIRS) // chunk)
    _assert_same_step(_loss_and_grad(model, _batch(packed), chunk=chunk), reference)


@pytest.mark.parametrize("mode", ["full", "freeze_vision"])
def test_packed_and_vision_packed_step_with_grad_cache_gives_the_same(
    model, items, reference, mode
):
    packed = [
        pack_vision(side, row_multiple=8, coarse=True)
        for side in _packed(items, len(PAIRS) // CHUNK)
    ]
    got = _loss_and_grad(model, _batch(packed), mode=mode, chunk=CHUNK)
    if mode == "full":
        _assert_same_step(got, reference)
    else:  # the same step with the tower frozen: compare with that reference
        config = get_size("tiny")
        sides = [
            collate(s, config=config, pad_token_id=PAD, length_buckets=(64,), patch_budget=BUDGET)
            for s in items
        ]
        _assert_same_step(got, _loss_and_grad(model, _batch(sides), mode=mode))


def test_a_side_packed_without_the_caches_chunks_is_refused(model, items):
    with pytest.raises(ValueError, match="needs packing in 2 chunks .* this one was packed in 1"):
        _loss_and_grad(model, _batch(_packed(items, 1)), chunk=CHUNK)
