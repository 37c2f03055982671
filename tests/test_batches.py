"""Typed batches: the collate functions make them, the package dispatches on their type."""

import io
import pathlib
import pickle
import re
from collections.abc import Mapping

import jax
import numpy as np
import pytest
from batch_dicts import as_dict
from PIL import Image

from jfe_jax.data.collate import collate, collate_packed
from jfe_jax.data.image_processor import ImageProcessor
from jfe_jax.data.late_fusion import LateItem, late_collate
from jfe_jax.data.pipeline import ContrastiveBatcher
from jfe_jax.data.processing import ProcessedItem
from jfe_jax.data.tokenizer import build_tokenizer
from jfe_jax.models.batches import (
    EarlyBatch,
    LateFusionBatch,
    PackedBatch,
    TrainBatch,
    VisionGroup,
    VisionPackedBatch,
    as_batch,
    is_packed,
    text_rows,
)
from jfe_jax.models.packing import pack_vision
from jfe_jax.models.padding import padding_report
from jfe_jax.models.sizes import get_size

CONFIG = get_size("tiny")
PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jfe_jax"


def _item(length, image=False, seed=0):
    rng = np.random.default_rng(seed)
    ids = list(rng.integers(0, CONFIG.text.vocab_size - 16, size=length))
    if not image:
        return ProcessedItem(input_ids=ids, pixel_values=None, image_grid_thw=None)
    ids[1:5] = [CONFIG.image_token_id] * 4
    pixels = rng.normal(size=(16, CONFIG.vision.patch_dim)).astype(np.float32)
    return ProcessedItem(input_ids=ids, pixel_values=pixels, image_grid_thw=np.array([[1, 4, 4]]))


def _items():
    return [_item(9, image=True, seed=1), _item(6, seed=2), _item(12, image=True, seed=3)]


def test_collate_functions_make_their_kinds():
    early = collate(_items(), config=CONFIG, pad_token_id=0, patch_budget=16)
    assert type(early) is EarlyBatch and early.has_pixels and early.num_items == 3
    packed = collate_packed(_items(), config=CONFIG, pad_token_id=0, patch_budget=32, length=32)
    assert type(packed) is PackedBatch and is_packed(packed) and packed.num_items == 3
    vision = pack_vision(early)
    assert type(vision) is VisionPackedBatch and type(vision.rows) is EarlyBatch
    assert not vision.rows.has_pixels and isinstance(vision.masked, VisionGroup)
    assert text_rows(vision) is vision.rows and vision.num_items == 3
    assert type(pack_vision(packed).rows) is PackedBatch and is_packed(pack_vision(packed))
    late = late_collate(
        [LateItem(_item(5, seed=4), _item(7, image=True, seed=5)), LateItem(_item(6), None)],
        lambda items, budget: collate(items, config=CONFIG, pad_token_id=0, patch_budget=budget),
        16,
    )
    assert type(late) is LateFusionBatch and late.num_items == 2
    np.testing.assert_array_equal(late.has_image, [1.0, 0.0])


def _png(seed):
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["a red circle", "a photo of a green square"] * 20, 512)


def test_the_pipeline_makes_a_train_batch_that_pickles_and_jits(tokenizer):
    batcher = ContrastiveBatcher.from_options(
        tokenizer,
        ImageProcessor(max_pixels=56 * 56),
        CONFIG,
        kind="image_captions",
        length_buckets=(64,),
        candidate_patch_budget=16,
        prompt="a photo:",
    )
    records = [{"id": f"r{i}", "caption": "a red circle", "image": _png(i)} for i in range(4)]
    batch = batcher(records)
    assert type(batch) is TrainBatch and batch.hard_negative is None
    assert [type(s) for s in batch.sides()] == [EarlyBatch, EarlyBatch]
    assert batch.hard_negative_key is not None and batch.skipped_records is not None
    # grain's worker processes pickle batches; jit takes them as pytrees.
    again = pickle.loads(pickle.dumps(batch))
    np.testing.assert_array_equal(again.candidate.pixel_values, batch.candidate.pixel_values)
    rows = jax.jit(lambda b: b.candidate.input_ids.shape[0])(batch)
    assert rows == 4


def test_as_batch_types_the_dict_layouts_and_names_what_is_wrong():
    early = collate(_items(), config=CONFIG, pad_token_id=0, patch_budget=16)
    assert type(as_batch(as_dict(early))) is EarlyBatch
    packed = collate_packed(_items(), config=CONFIG, pad_token_id=0, patch_budget=32, length=32)
    assert type(as_batch(as_dict(packed))) is PackedBatch
    vision = as_batch(as_dict(pack_vision(early)))
    assert type(vision) is VisionPackedBatch and vision.masked is not None
    late = as_batch(
        {"text": as_dict(early), "image": as_dict(early), "has_text": 1, "has_image": 1}
    )
    assert type(late) is LateFusionBatch and type(late.text) is EarlyBatch
    train = as_batch(
        {"query": as_dict(early), "candidate": as_dict(packed), "query_key": np.arange(3)}
    )
    assert type(train) is TrainBatch and type(train.candidate) is PackedBatch
    assert as_batch(train) is train
    with pytest.raises(ValueError, match="no model batch found: keys \\['features'\\]"):
        as_batch({"features": np.zeros(3)})
    with pytest.raises(ValueError, match="both segment_ids and pool_index"):
        as_batch({k: v for k, v in as_dict(packed).items() if k != "pool_index"})
    with pytest.raises(ValueError, match="unknown train batch keys \\['extra'\\]"):
        as_batch({"query": as_dict(early), "candidate": as_dict(early), "extra": 1})


def test_a_batch_is_not_a_mapping():
    early = collate(_items(), config=CONFIG, pad_token_id=0, patch_budget=16)
    packed = collate_packed(_items(), config=CONFIG, pad_token_id=0, patch_budget=32, length=32)
    late = late_collate(
        [LateItem(_item(5, seed=4), _item(7, image=True, seed=5))],
        lambda items, budget: collate(items, config=CONFIG, pad_token_id=0, patch_budget=budget),
        16,
    )
    train = TrainBatch(query=early, candidate=packed)
    for batch in (early, packed, pack_vision(early), late, train):
        assert not isinstance(batch, Mapping)
        assert not hasattr(batch, "keys") and not hasattr(batch, "__getitem__")
        with pytest.raises(TypeError):
            batch["input_ids"]
        with pytest.raises(TypeError):
            "query" in batch  # noqa: B015 (the test is that it raises)
    # The pytree view stays: tree_map keeps the types, leaves are the arrays.
    doubled = jax.tree.map(lambda x: 2 * x, train)
    assert type(doubled.candidate) is PackedBatch and doubled.candidate.row_chunks == 1
    np.testing.assert_array_equal(doubled.query.input_ids, 2 * early.input_ids)


def test_as_batch_converts_a_dict_at_the_public_boundary():
    """padding_report (a user-facing report) takes the former dict layout; the same numbers."""
    early = collate(_items(), config=CONFIG, pad_token_id=0, patch_budget=16)
    packed = collate_packed(_items(), config=CONFIG, pad_token_id=0, patch_budget=32, length=32)
    typed = TrainBatch(query=early, candidate=packed)
    as_dicts = {"query": as_dict(early), "candidate": as_dict(packed)}
    assert padding_report(as_dicts, CONFIG) == padding_report(typed, CONFIG)
    assert padding_report(as_dict(pack_vision(early))) == padding_report(pack_vision(early))


def test_as_batch_names_a_wrong_key():
    fields = as_dict(collate(_items(), config=CONFIG, pad_token_id=0, patch_budget=16))
    fields["pixel_value"] = fields.pop("pixel_values")
    with pytest.raises(ValueError, match=r"of which \['pixel_value'\] are no batch field"):
        as_batch(fields)
    with pytest.raises(ValueError, match=r"unknown train batch keys \['candidates'\]"):
        as_batch({"query": fields, "candidates": fields})


def test_only_the_dict_boundaries_call_as_batch():
    """The library passes typed batches; as_batch runs where a user hands a dict."""
    callers = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "batches.py" and "as_batch(" in path.read_text()
    )
    assert callers == ["models/padding.py"]


def test_the_package_dispatches_on_batch_types_not_on_keys():
    """No module tests a batch for a key: the kinds are types (jfe_jax.models.batches, the
    one place that reads a dict's layout, for callers that pass dicts)."""
    keys = (
        "input_ids|attention_mask|pixel_values|segment_ids|pool_index|item_mask|has_text|"
        "has_image|image_token_index|vision_pixel_values|vision_blocks|hard_negative|"
        "hard_negative_key|patch_segment_ids"
    )
    pattern = re.compile(rf"""["']({keys})["']\s+(not\s+)?in\s+\w+|\.get\(["']({keys})["']""")
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "batches.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)
