"""The host pipeline's copy-free steps give the same bits as the code they replaced.

References, written out here: transformers' rescale (``x * (1/255)`` in float64, cast to
float32) then normalise in float32; the float image patchified with a broadcast temporal
repeat; and collation by concatenating every item's patches and handing them to
``prepare_batch``.
"""

import dataclasses
import io
import re

import numpy as np
import pytest
from PIL import Image

from jfe_jax.data.collate import collate, pick_length
from jfe_jax.data.image_processor import ImageProcessor, smart_resize, to_rgb
from jfe_jax.data.processing import ProcessedItem, encode_item
from jfe_jax.data.tokenizer import build_tokenizer
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
        if e is not None:
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
    short = dataclasses.replace(item, pixel_values=item.pixel_values[:8])
    with pytest.raises(ValueError, match="row 1: pixel_values has 8 patches but image_grid_thw"):
        collate([item, short], patch_budget=16, **options)
    no_run = dataclasses.replace(
        item, input_ids=item.input_ids[item.input_ids != CONFIG.image_token_id]
    )
    with pytest.raises(ValueError, match=re.escape("row 0 has 0 runs of <|image_pad|> but 1")):
        collate([no_run], patch_budget=16, **options)
