"""Sequence packing: several items per row give the embeddings each item gets alone."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from batch_dicts import as_dict
from hf_reference import make_inputs
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image
from train_fixtures import spread_weights

from jfe_jax.data.collate import collate, collate_packed
from jfe_jax.data.processing import ProcessedItem
from jfe_jax.data.tokenizer import build_tokenizer
from jfe_jax.encoder import Encoder
from jfe_jax.index.embedder import Item, ItemEmbedder
from jfe_jax.models import flops
from jfe_jax.models.axes import LOGICAL_RULES
from jfe_jax.models.batches import as_batch
from jfe_jax.models.inputs import dummy_batch, prepare_batch
from jfe_jax.models.packing import items_from_rows, pack_items
from jfe_jax.models.padding import padding_report
from jfe_jax.models.sizes import get_size
from jfe_jax.train import mesh as mesh_lib

# float32 embeddings (unit norm) of a packed row against the item alone: the masked softmax
# sums over other keys in another order, nothing more (measured here: at most 4e-7).
ATOL = 2e-5

# Each item: a make_inputs row spec (int = text tokens, (h, w) = an image of that grid).
CASES = {
    "text_only": dict(items=[[9], [30], [5], [17], [3], [12], [25]], length=32, patches=0),
    "image_only": dict(
        items=[[(4, 4)], [(2, 8)], [(4, 6)], [(2, 2)], [(6, 4)]], length=16, patches=48
    ),
    "text_and_images_mixed": dict(
        items=[[3, (4, 4), 5], [20], [2, (2, 4), 1, (4, 2), 3], [7], [(6, 4), 2], [1], [4, (2, 2)]],
        length=32,
        patches=64,
    ),
}


@pytest.fixture(scope="module")
def model():
    """The tiny encoder with well-spread random weights (the default init is near identity)."""
    config = get_size("tiny")
    encoder = Encoder.init(config, seed=0)
    params = spread_weights(encoder.params)
    module = encoder.module
    forward = jax.jit(lambda p, b: module.apply({"params": p}, b)[0])
    return config, Encoder(config, params, encoder.options), forward


def make_items(config, specs, seed=0):
    """Per item: (input_ids [n], pixel_values or None, image_grid_thw or None)."""
    items = []
    for i, spec in enumerate(specs):
        ids, _, pixels, grid = make_inputs(config, [spec], seed=seed + i)
        items.append((ids[0], pixels, grid))
    return items


def embed_alone(config, forward, params, items):
    """Each item in a batch of its own, unpacked (the path the parity tests check)."""
    out = []
    for ids, pixels, grid in items:
        batch = prepare_batch(config, ids[None], None, pixels, grid)
        out.append(np.asarray(forward(params, batch))[0])
    return np.stack(out)


def pack(config, items, **kw):
    ids, pixels, grids = zip(*items)
    return pack_items(config, ids, pixels, grids, **kw)


def items_per_row(batch):
    return batch.segment_ids.max(axis=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_embeddings_equal_each_item_embedded_alone(case, model):
    config, encoder, forward = model
    spec = CASES[case]
    items = make_items(config, spec["items"], seed=len(case))
    batch = pack(
        config, items, length=spec["length"], num_patches=spec["patches"], num_rows=4, num_items=8
    )
    assert batch.input_ids.shape == (4, spec["length"]) and batch.pool_index.shape == (8, 2)
    assert items_per_row(batch).max() >= 2  # some row really holds several items
    if spec["patches"]:
        assert batch.patch_segment_ids.max(axis=1).max() >= 2  # and several images
    packed = np.asarray(forward(encoder.params, batch))
    alone = embed_alone(config, forward, encoder.params, items)
    n = len(items)
    assert packed.shape == (8, config.text.hidden_size)
    np.testing.assert_allclose(packed[:n], alone, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(batch.item_mask, [1] * n + [0] * (8 - n))
    assert np.all(packed[n:] == 0)  # padding item slots
    # The items are not near-copies of one another (the comparison could fail).
    assert np.min(1 - alone @ alone.T + 2 * np.eye(n)) > 1e-3


def test_attention_across_items_would_change_the_embeddings(model):
    config, encoder, forward = model
    items = make_items(config, CASES["text_and_images_mixed"]["items"], seed=3)
    batch = pack(config, items, length=32, num_patches=64, num_rows=4)
    joined = batch.replace(segment_ids=batch.attention_mask.copy())  # one segment per row
    alone = embed_alone(config, forward, encoder.params, items)
    leaked = np.asarray(forward(encoder.params, joined))
    # The first item of each row sees only itself either way; every later one changes.
    later = batch.segment_ids[tuple(batch.pool_index.T)] > 1
    assert later.sum() >= 2
    assert np.all(np.max(np.abs(leaked - alone), axis=1)[later] > 1e-3)
    np.testing.assert_allclose(leaked[~later], alone[~later], atol=ATOL, rtol=0)


def test_packed_forward_under_jit_on_a_data_parallel_mesh(model):
    config, encoder, forward = model
    spec = CASES["text_and_images_mixed"]
    items = make_items(config, spec["items"], seed=11)
    batch = pack(config, items, length=32, num_patches=64, num_rows=8, num_items=16)
    mesh = mesh_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    module = encoder.module
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), dummy_batch(config)))
    shardings = mesh_lib.logical_shardings(abstract["params"], mesh, LOGICAL_RULES)
    params = jax.device_put(encoder.params, shardings)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        sharded = jax.device_put(batch, rows)
        embed = jax.jit(lambda p, b: module.apply({"params": p}, b)[0])
        packed = embed(params, sharded)
    assert sharded.input_ids.sharding.spec == PartitionSpec("data")
    alone = embed_alone(config, forward, encoder.params, items)
    np.testing.assert_allclose(np.asarray(packed)[: len(items)], alone, atol=ATOL, rtol=0)


def test_packing_lays_items_end_to_end_with_positions_restarted():
    config = get_size("tiny")
    items = make_items(config, [[3], [5], [2, (2, 2)], [6]], seed=1)
    batch = pack(config, items, length=8, num_patches=8, num_rows=3)
    # First-fit decreasing (ties: more patches first): 6 -> row 0, the image item (5 tokens)
    # -> row 1, 5 -> row 2, 3 -> row 1 after the image item.
    np.testing.assert_array_equal(
        batch.segment_ids,
        [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0, 0]],
    )
    np.testing.assert_array_equal(batch.pool_index, [[1, 7], [2, 4], [1, 4], [0, 5]])
    np.testing.assert_array_equal(batch.attention_mask[0], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch.input_ids[1, 5:], items[0][0])
    np.testing.assert_array_equal(batch.position_ids[1, :, 5:], [[0, 1, 2]] * 3)
    # The image item's positions are those it has alone (M-RoPE jumps over the image).
    alone = prepare_batch(config, items[2][0][None], None, items[2][1], items[2][2])
    np.testing.assert_array_equal(batch.position_ids[1, :, :5], alone.position_ids[0])
    np.testing.assert_array_equal(batch.patch_segment_ids[1], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch.pixel_values[1, :4], items[2][1])
    assert not batch.patch_segment_ids[[0, 2]].any()


def test_items_from_rows_splits_reference_arrays_per_row():
    config = get_size("tiny")
    specs = [[2, (2, 4), 1, (4, 2)], [6], [(2, 2), 3]]
    ids, mask, pixels, grid = make_inputs(config, specs, seed=4)
    got_ids, got_pixels, got_grids = items_from_rows(config, ids, mask, pixels, grid)
    assert [len(x) for x in got_ids] == list(mask.sum(axis=1))
    assert got_pixels[1] is None and got_grids[1] is None
    np.testing.assert_array_equal(got_grids[0], [[1, 2, 4], [1, 4, 2]])
    np.testing.assert_array_equal(got_pixels[0], pixels[:16])
    np.testing.assert_array_equal(got_pixels[2], pixels[16:])


# ---------------------------------------------------------------------------- padding


def test_padding_report_of_a_packed_batch_matches_hand_counts():
    config = get_size("tiny")
    items = make_items(config, [[3], [5], [2]], seed=2)
    batch = pack(config, items, length=8, num_rows=2)  # rows: [5 + 3], [2 + 6 padding]
    report = padding_report(batch, config)
    assert report["token_padding"] == pytest.approx(6 / 16)
    assert report["text_attention_padding"] == pytest.approx((128 - (64 + 4)) / 128)
    assert report["text_attention_cross_item"] == pytest.approx((68 - (25 + 9 + 4)) / 128)
    real = sum(flops.text_forward_flops(config, 1, n) for n in (3, 5, 2))
    assert report["flops_padding"] == pytest.approx(
        1 - real / flops.text_forward_flops(config, 2, 8)
    )


def test_packing_the_same_items_lowers_the_padding():
    config = get_size("tiny")
    specs = CASES["text_and_images_mixed"]["items"] + [[25], [2], [11, (2, 2)]]
    processed = [
        ProcessedItem(ids.astype(np.int32), pixels, grid)
        for ids, pixels, grid in make_items(config, specs, seed=5)
    ]
    kw = dict(config=config, pad_token_id=0, length_buckets=(32, 64), patch_budget=64)
    unpacked = padding_report(collate(processed, **kw), config)
    packed_batch = collate_packed(processed, **kw, row_multiple=2)
    packed = padding_report(packed_batch, config)
    assert packed_batch.input_ids.shape[0] < len(processed)
    assert packed["token_padding"] < unpacked["token_padding"] - 0.2
    assert packed["patch_padding"] < unpacked["patch_padding"] - 0.1
    assert packed["flops_padding"] < unpacked["flops_padding"] - 0.2
    # Every item's own cost is counted alike in both (only the padded total differs).
    assert "text_attention_cross_item" not in unpacked


# ---------------------------------------------------------------------------- bad input


def test_items_that_do_not_fit_raise_naming_the_item_and_the_numbers():
    config = get_size("tiny")
    items = make_items(config, [[5], [12], [3, (4, 4)]], seed=6)
    with pytest.raises(ValueError, match=r"item 1 has 12 tokens but a packed row holds 8"):
        pack(config, items[:2], length=8)
    with pytest.raises(ValueError, match=r"item 2 has 16 image patches but .* budget is 8"):
        pack(config, items, length=16, num_patches=8)
    with pytest.raises(ValueError, match=r"item 2 has 16 image patches but .* budget is 0"):
        pack(config, items, length=16)
    with pytest.raises(ValueError, match=r"3 items do not fit in 2 item slots"):
        pack(config, items, length=16, num_patches=16, num_items=2)
    with pytest.raises(ValueError, match=r"item \d .* does not fit: .* more than 1 rows of 16"):
        pack(config, items, length=16, num_patches=16, num_rows=1)
    with pytest.raises(ValueError, match=r"need 2 packed rows but the largest row bucket is 1"):
        pack(config, items, length=16, num_patches=16, num_rows=[1])
    with pytest.raises(ValueError, match=r"patch budget 6 is not a multiple"):
        pack(config, items, length=16, num_patches=6)


def test_malformed_items_are_rejected_naming_the_item():
    config = get_size("tiny")
    (ids, pixels, grid), text = make_items(config, [[2, (4, 4)], [4]], seed=7)
    with pytest.raises(ValueError, match=r"item 1 .*needs 4"):
        pack(config, [text, (ids[:-2], pixels, grid)], length=16, num_patches=16)
    with pytest.raises(ValueError, match=r"item 0: pixel_values and image_grid_thw"):
        pack(config, [(ids, pixels, None)], length=16, num_patches=16)
    with pytest.raises(ValueError, match=r"item 1 .*outside the vocabulary"):
        pack(config, [text, (np.array([1, 10_000]), None, None)], length=16)
    with pytest.raises(ValueError, match=r"item 0: input_ids must be a non-empty 1-D"):
        pack(config, [(np.zeros(0, np.int64), None, None)], length=16)
    with pytest.raises(ValueError, match="empty list"):
        pack_items(config, [], length=16)


def test_packed_batch_without_segment_ids_is_rejected(model):
    config, encoder, forward = model
    batch = as_dict(pack(config, make_items(config, [[3], [4]]), length=8))  # the dict layout
    del batch["segment_ids"]
    with pytest.raises(ValueError, match="both segment_ids and pool_index"):
        forward(encoder.params, as_batch(batch))


# ---------------------------------------------------------------------------- export


def test_item_embedder_pack_option_gives_the_unpacked_embeddings(model, tmp_path):
    config, encoder, _ = model
    rng = np.random.default_rng(0)
    words = "red green blue circle square left right top what is on the".split()
    tokenizer = build_tokenizer([" ".join(rng.choice(words, 6)) for _ in range(100)], 512)
    for i, size in enumerate([(56, 56), (84, 56)]):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    items = [
        Item(text="red circle"),
        Item(image="0.png"),
        Item(text=" ".join(rng.choice(words, 30))),
        Item(text="what is on the left", image="1.png"),
        Item(text="blue"),
    ] * 3
    kw = dict(
        tokenizer=tokenizer,
        batch_size=16,
        length_buckets=(256,),
        max_pixels=112 * 112,
        image_root=str(tmp_path),
    )
    packer = ItemEmbedder(encoder, pack=True, **kw)
    packed = packer.embed(items)
    unpacked = ItemEmbedder(encoder, **kw).embed(items)
    np.testing.assert_allclose(packed, unpacked, atol=ATOL, rtol=0)
    # Images in their own vision rows (sharded over the 8 devices), alone and with pack.
    for pack in (False, True):
        vision = ItemEmbedder(encoder, pack=pack, pack_vision=True, **kw).embed(items)
        np.testing.assert_allclose(vision, unpacked, atol=ATOL, rtol=0)
    batch = collate_packed(
        [packer.process(it) for it in items],
        config=config,
        pad_token_id=packer.pad_token_id,
        length_buckets=packer.length_buckets,
        patch_budget=packer.patch_budget,
        num_rows=packer._row_buckets,
        num_items=packer.batch_size,
    )
    assert batch.input_ids.shape[0] == 8  # 15 items of 63..92 tokens in 8 rows, not 16
    with pytest.raises(ValueError, match="pack=True packs early-fusion items"):
        ItemEmbedder(encoder, pack=True, fusion="late", **kw)
    with pytest.raises(ValueError, match="pack_vision=True packs early-fusion images"):
        ItemEmbedder(encoder, pack_vision=True, fusion="late", **kw)


def test_images_packed_into_their_own_vision_rows_give_the_same_embeddings(model):
    from jfe_jax.models.packing import pack_vision

    config, encoder, forward = model
    rows = [[5], [3, (4, 4), 5], [2, (2, 4), 1, (4, 2), 3], [9], [(6, 4), 2], [4, (2, 2)], [7]]
    ids, mask, pixels, grid = make_inputs(config, rows, seed=5)
    batch = prepare_batch(config, ids, mask, pixels, grid)
    packed = pack_vision(batch, row_multiple=2)
    # 6 images (16, 8, 8, 24, 4 patches ...) fill fewer vision rows than the 7 text rows
    assert packed.masked.pixel_values.shape[0] < batch.pixel_values.shape[0]
    assert packed.rows.pixel_values is None
    want = np.asarray(forward(encoder.params, batch))
    got = np.asarray(forward(encoder.params, packed))
    np.testing.assert_allclose(got, want, atol=ATOL)
    # The map matters: shuffling which image token goes where changes the embeddings.
    wrong = packed.replace(image_token_index=packed.image_token_index[::-1].copy())
    assert np.abs(np.asarray(forward(encoder.params, wrong)) - want).max() > 1e-3
    # The user-facing call takes this path by default.
    np.testing.assert_allclose(
        encoder.embed(ids, mask, pixels, grid),
        encoder.embed(ids, mask, pixels, grid, pack_vision=False),
        atol=ATOL,
    )
    # Row counts: as needed, coarse, then a multiple of (say) the device count.
    needed = pack_vision(batch).masked.pixel_values.shape[0]
    assert needed < 7
    assert pack_vision(batch, coarse=True).masked.pixel_values.shape[0] == needed
    assert pack_vision(batch, row_multiple=8).masked.pixel_values.shape[0] == 8
    with pytest.raises(ValueError, match="does not fit a vision row of 8"):
        pack_vision(batch, patch_budget=8)
    # A fixed count (what several hosts feed): empty rows beyond the images' own, the same
    # embeddings; too few rows, blocks or a count off the multiple are refused by name.
    fixed = pack_vision(batch, row_multiple=2, num_rows=6)
    assert fixed.masked.pixel_values.shape[0] == 6
    np.testing.assert_allclose(np.asarray(forward(encoder.params, fixed)), want, atol=ATOL)
    with pytest.raises(ValueError, match=rf"need {needed} vision rows .* fixed count is 1"):
        pack_vision(batch, num_rows=1)
    with pytest.raises(ValueError, match="takes no per-image blocks"):
        pack_vision(batch, num_rows=6, block_sizes=(8,))
    with pytest.raises(ValueError, match="multiple of row_multiple=4"):
        pack_vision(batch, num_rows=6, row_multiple=4)
    text_only = prepare_batch(config, np.full((7, 8), 5, np.int32)).replace(
        pixel_values=np.zeros((7, 16, config.vision.patch_dim), np.float32),
        patch_segment_ids=np.zeros((7, 16), np.int32),
        patch_positions=np.zeros((7, 16, 2), np.int32),
    )
    empty = pack_vision(text_only, num_rows=2)
    assert empty.masked.pixel_values.shape == (2, 16, config.vision.patch_dim)
    assert not empty.masked.segment_ids.any()


def test_coarse_row_count_keeps_three_significant_bits():
    from jfe_jax.models.packing import coarse_row_count

    got = [coarse_row_count(n) for n in range(0, 42)]
    assert got[:9] == [1, 1, 2, 3, 4, 5, 6, 7, 8]
    assert got[9:17] == [10, 10, 12, 12, 14, 14, 16, 16]
    assert got[17:21] == [20, 20, 20, 20] and got[33] == 40 and got[41] == 48
    assert all(n <= r < max(2, 1.25 * n) for n, r in enumerate(got) if n)
    assert len(set(got[8:])) == 11  # 8..41 compile as 11 shapes
