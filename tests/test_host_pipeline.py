"""The host pipeline's copy-free steps give the same bits as the code they replaced.

References, written out here: transformers' rescale (``x * (1/255)`` in float64, cast to
float32) then normalise in float32; the float image patchified with a broadcast temporal
repeat; and collation by concatenating every item's patches and handing them to
``prepare_batch``. Items hold uint8 patches (``ImagePatches``) that collate and pack_items
normalise straight into the batch; items given float32 pixel values must batch the same.
"""

import dataclasses
import io
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from jfe_jax.data.collate import collate, collate_packed, pick_length
from jfe_jax.data.example_cache import example_nbytes
from jfe_jax.data.image_processor import ImageProcessor, smart_resize, to_rgb
from jfe_jax.data.processing import ProcessedItem, encode_item
from jfe_jax.data.tokenizer import build_tokenizer
from jfe_jax.models.image_patches import ImagePatches, normalized_table
from jfe_jax.models.inputs import prepare_batch
from jfe_jax.models.sizes import get_size

CONFIG = get_size("tiny")
BUCKETS = (64, 128)


def _reference_patches(processor: ImageProcessor, image: Image.Image) -> np.ndarray:
    """The processor's pixel_values as the code before issue 32 item 4 computed them."""
    new_height, new_width = smart_resize(
        image.height, image.width, processor.factor, processor.min_pixels, processor.max_pixels
    )
    resized = Image.fromarray(to_rgb(image)).resize((new_width, new_height), Image.BICUBIC)
    pixels = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - np.float32(processor.image_mean)) / np.float32(processor.image_std)
    c, h, w = pixels.transpose(2, 0, 1).shape
    p, m, t = processor.patch_size, processor.merge_size, processor.temporal_patch_size
    blocks = pixels.transpose(2, 0, 1).reshape(c, h // p // m, m, p, w // p // m, m, p)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    return np.ascontiguousarray(frames.reshape(h * w // p**2, c * t * p * p))


def _reference_collate(items, *, patch_budget: int, padding_side: str):
    """``collate`` as it was: concatenate all patches and grids, then ``prepare_batch``."""
    length = pick_length(max(len(it.input_ids) for it in items), BUCKETS)
    ids = np.zeros((len(items), length), dtype=np.int32)
    mask = np.zeros((len(items), length), dtype=np.int32)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[row, span], mask[row, span] = item.input_ids, 1
    with_image = [it for it in items if it.pixel_values is not None]
    return prepare_batch(
        CONFIG,
        ids,
        mask,
        np.concatenate([it.pixel_values for it in with_image]),
        np.concatenate([np.reshape(it.image_grid_thw, (-1, 3)) for it in with_image]),
        num_patches=patch_budget,
    )


def _assert_same_bits(actual, expected):
    for field in dataclasses.fields(expected):
        a, e = getattr(actual, field.name), getattr(expected, field.name)
        assert (a is None) == (e is None), field.name
        if not isinstance(e, np.ndarray):
            assert a == e, field.name
        else:
            assert a.dtype == e.dtype and a.shape == e.shape, field.name
            assert np.array_equal(a.view(np.uint8), e.view(np.uint8)), field.name


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A JPEG-decoded photo-like image (smooth noise), as the training data holds."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    data = io.BytesIO()
    image.save(data, "JPEG", quality=90)
    return Image.open(io.BytesIO(data.getvalue()))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["a red circle", "a photo of a green square"] * 20, 512)


@pytest.mark.parametrize("mean,std", [(None, None), ((0.5, 0.25, 0.0), (0.5, 0.125, 1.0))])
def test_float32_normalise_equals_the_float64_rescale_for_every_uint8_value(mean, std):
    processor = ImageProcessor() if mean is None else ImageProcessor(image_mean=mean, image_std=std)
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, 3, 256))
    expected = (values.astype(np.float64) * (1 / 255)).astype(np.float32)
    m = np.float32(processor.image_mean).reshape(1, 3, 1)
    s = np.float32(processor.image_std).reshape(1, 3, 1)
    expected = (expected - m) / s
    actual = processor.normalize(values)
    assert actual.dtype == np.float32
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("mean,std", [(None, None), ((0.5, 0.25, 0.0), (0.5, 0.125, 1.0))])
def test_the_uint8_lookup_table_equals_the_float64_rescale_for_every_value(mean, std):
    processor = ImageProcessor() if mean is None else ImageProcessor(image_mean=mean, image_std=std)
    values = np.arange(256, dtype=np.float64) * (1 / 255)
    expected = values.astype(np.float32)[None] - np.float32(processor.image_mean)[:, None]
    expected = expected / np.float32(processor.image_std)[:, None]
    table = normalized_table(processor.image_mean, processor.image_std)
    assert table.dtype == np.float32 and table.shape == (3, 256)
    np.testing.assert_array_equal(table.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize(
    "width,height,mode",
    [(640, 480, "RGB"), (768, 1024, "RGB"), (333, 517, "L"), (120, 90, "RGBA")],
)
def test_process_one_gives_the_bits_of_the_float64_reference(width, height, mode):
    processor = ImageProcessor(max_pixels=448 * 448)  # the 2b stage-2 item format
    image = _photo(width, height, seed=width)
    if mode != "RGB":
        image = image.convert(mode)
    pixel_values, grid_thw = processor.process_one(image)
    expected = _reference_patches(processor, image)
    assert pixel_values.dtype == np.float32 and pixel_values.shape == expected.shape
    assert int(np.prod(grid_thw)) == len(expected)
    np.testing.assert_array_equal(pixel_values.view(np.uint32), expected.view(np.uint32))


def test_an_encoded_item_holds_uint8_patches_an_eighth_of_its_float_pixel_values(tokenizer):
    processor = ImageProcessor(max_pixels=448 * 448)
    image = _photo(640, 480, seed=3)
    item = encode_item(tokenizer, processor, text="a red circle", image=image)
    assert isinstance(item.patches, ImagePatches)
    pixels = item.patches.pixels  # patch order, (C, row, col) per patch, no temporal repeat
    assert pixels.dtype == np.uint8 and pixels.shape == (item.num_patches, 3 * 14 * 14)
    expected = _reference_patches(processor, image)
    assert item.num_patches == len(expected) == int(np.prod(item.image_grid_thw))
    np.testing.assert_array_equal(item.pixel_values.view(np.uint32), expected.view(np.uint32))
    frames = expected.reshape(len(expected), 3, 2, 14 * 14)
    np.testing.assert_array_equal(frames[:, :, 0], frames[:, :, 1])
    # The example cache counts the uint8 patches, not the float32 ones they stand for.
    arrays = (item.input_ids, pixels, item.image_grid_thw)
    assert example_nbytes(item) == sum(a.nbytes for a in arrays)
    assert pixels.nbytes * 8 == expected.nbytes
    copy = pickle.loads(pickle.dumps(item))  # as grain's worker processes hand items over
    assert isinstance(copy.patches, ImagePatches)
    np.testing.assert_array_equal(copy.patches.pixels, pixels)


def test_processed_item_takes_float_pixel_values_or_patches_not_both():
    ids = np.arange(6, dtype=np.int32)
    pixels = np.ones((4, CONFIG.vision.patch_dim), np.float32)
    item = ProcessedItem(ids, pixels, np.array([[1, 2, 2]]))
    assert item.pixel_values is pixels and item.num_patches == 4
    assert ProcessedItem(ids).pixel_values is None and ProcessedItem(ids).num_patches == 0
    with pytest.raises(ValueError, match="both pixel_values and patches"):
        ProcessedItem(ids, pixels, patches=pixels)


def test_image_patches_refuse_an_output_they_cannot_fill_in_place():
    processor = ImageProcessor(max_pixels=56 * 56)
    patches, _ = processor.process_patches(_photo(56, 56, seed=1))
    out = np.zeros((patches.num_patches, 2 * patches.patch_dim), np.float32)
    with pytest.raises(ValueError, match="expected C-contiguous float32"):
        patches.write_pixel_values(out[:, ::2])  # strided: a reshape would copy
    with pytest.raises(ValueError, match=r"expected uint8 \[patches, 3 \* patch_size\*\*2\]"):
        ImagePatches(np.zeros((4, 10), np.uint8), patches.image_mean, patches.image_std, 2)


def _two_image_item(seed: int) -> ProcessedItem:
    """An item with two images (grids 1x2x2 and 1x4x2): two runs of image tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 400, 20).astype(np.int32)
    ids[3:4] = CONFIG.image_token_id
    ids[8:10] = CONFIG.image_token_id
    grids = np.array([[1, 2, 2], [1, 4, 2]])
    pixels = rng.normal(size=(12, CONFIG.vision.patch_dim)).astype(np.float32)
    return ProcessedItem(input_ids=ids, pixel_values=pixels, image_grid_thw=grids)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_equals_concatenating_then_prepare_batch_bit_for_bit(tokenizer, padding_side):
    processor = ImageProcessor(max_pixels=112 * 112)
    sizes = [(56, 56), (112, 84), None, (60, 150), None]
    items = [
        encode_item(
            tokenizer,
            processor,
            text="a red circle" * (i + 1),
            image=None if size is None else _photo(*size, seed=i),
        )
        for i, size in enumerate(sizes)
    ] + [_two_image_item(7)]
    for item, size in zip(items, sizes):
        if size is not None:
            expected = _reference_patches(processor, _photo(*size, seed=sizes.index(size)))
            np.testing.assert_array_equal(item.pixel_values, expected)
    batch = collate(
        items, config=CONFIG, pad_token_id=0, length_buckets=BUCKETS, patch_budget=128,
        padding_side=padding_side,
    )  # fmt: skip
    expected = _reference_collate(items, patch_budget=128, padding_side=padding_side)
    _assert_same_bits(batch, expected)


def test_collate_names_the_row_whose_patches_or_tokens_disagree(tokenizer):
    item = encode_item(tokenizer, ImageProcessor(max_pixels=112 * 112), image=_photo(56, 56, 0))
    options = dict(config=CONFIG, pad_token_id=0, length_buckets=BUCKETS)
    with pytest.raises(ValueError, match="row 1 has 16 patches but the patch budget is 12"):
        collate([_two_image_item(0), item], patch_budget=12, **options)
    short = dataclasses.replace(item, patches=item.pixel_values[:8])
    with pytest.raises(ValueError, match="row 1: pixel_values has 8 patches but image_grid_thw"):
        collate([item, short], patch_budget=16, **options)
    no_run = dataclasses.replace(
        item, input_ids=item.input_ids[item.input_ids != CONFIG.image_token_id]
    )
    with pytest.raises(ValueError, match=re.escape("row 0 has 0 runs of <|image_pad|> but 1")):
        collate([no_run], patch_budget=16, **options)


def _as_float_item(item: ProcessedItem) -> ProcessedItem:
    """The item with its image as float32 pixel values (as the code before kept it)."""
    return ProcessedItem(item.input_ids, item.pixel_values, item.image_grid_thw)


def test_pack_items_of_uint8_patches_equals_packing_their_float_pixel_values(tokenizer):
    processor = ImageProcessor(max_pixels=112 * 112)
    sizes = [(56, 56), None, (112, 84), (60, 150), None, (84, 84)]
    items = [
        encode_item(
            tokenizer,
            processor,
            text="a photo of a green square" * (i % 3),
            image=None if size is None else _photo(*size, seed=i),
        )
        for i, size in enumerate(sizes)
    ] + [_two_image_item(3)]
    options = dict(config=CONFIG, pad_token_id=0, patch_budget=96, length=256, num_rows=4)
    packed = collate_packed(items, **options)
    expected = collate_packed([_as_float_item(it) for it in items], **options)
    _assert_same_bits(packed, expected)
    assert packed.pixel_values.shape == (4, 96, CONFIG.vision.patch_dim)
