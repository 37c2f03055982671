"""ImageProcessor against transformers' Qwen2VLImageProcessorPil, and its file-safety checks."""

import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw
from transformers import Qwen2VLImageProcessorPil

from jfe_jax.data.image_processor import ImageProcessor, load_image, smart_resize

SMALL_MAX_PIXELS = 28 * 28 * 64  # keeps the above-max_pixels cases fast

# (height, width, max_pixels): below min_pixels, ordinary, extreme aspect ratios, above max.
SIZES = [
    (1, 1, None),
    (5, 7, None),
    (28, 28, None),
    (28, 600, None),
    (600, 28, None),
    (57, 83, None),
    (224, 224, None),
    (333, 517, None),
    (100, 2000, None),
    (1000, 1500, SMALL_MAX_PIXELS),
    (3000, 40, SMALL_MAX_PIXELS),
    (700, 699, SMALL_MAX_PIXELS),
]
MODES = ["RGB", "RGBA", "L", "P", "P+transparency", "CMYK", "LA", "I"]


def _make_image(height: int, width: int, mode: str, seed: int) -> Image.Image:
    """Random noise with a drawn shape on top, in the requested PIL mode."""
    rng = np.random.default_rng(seed)
    if mode in ("RGBA", "CMYK", "LA"):
        bands = len(mode)
        raw = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
        return Image.frombytes(mode, (width, height), raw.tobytes())
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    ImageDraw.Draw(rgb).ellipse((0, 0, width // 2, height // 2), fill=(250, 20, 90))
    if mode == "P":
        return rgb.quantize(16)
    if mode == "P+transparency":
        palette = rgb.quantize(16)
        palette.info["transparency"] = 3
        return palette
    if mode == "I":
        return rgb.convert("L").convert("I")
    return rgb.convert(mode)


def _hf_processor(max_pixels):
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    return ImageProcessor(**kwargs), Qwen2VLImageProcessorPil(**kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("height,width,max_pixels", SIZES)
def test_matches_transformers_pil_processor(height, width, max_pixels, mode):
    ours, reference = _hf_processor(max_pixels)
    image = _make_image(height, width, mode, seed=height * 10007 + width)
    pixel_values, grid_thw = ours.process_one(image)
    expected = reference(images=[image])
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"][0])
    assert pixel_values.dtype == np.float32
    assert pixel_values.shape == expected["pixel_values"].shape
    assert np.abs(pixel_values - expected["pixel_values"]).max() <= 1e-5


@pytest.mark.parametrize("channels", [3, 4])
def test_matches_transformers_for_uint8_arrays(channels):
    rng = np.random.default_rng(channels)
    array = rng.integers(0, 256, (61, 90, channels), dtype=np.uint8)
    pixel_values, grid_thw = ImageProcessor().process_one(array)
    expected = Qwen2VLImageProcessorPil()(images=[array])
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"][0])
    assert np.abs(pixel_values - expected["pixel_values"]).max() <= 1e-5


def test_batch_concatenates_patches_in_image_order():
    images = [_make_image(h, w, "RGB", seed=i) for i, (h, w, _) in enumerate(SIZES[2:6])]
    pixel_values, grid_thw = ImageProcessor()(images)
    expected = Qwen2VLImageProcessorPil()(images=images)
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"])
    assert grid_thw.dtype == np.int64 and grid_thw.shape == (4, 3)
    assert pixel_values.shape[0] == int(np.prod(grid_thw, axis=1).sum())
    assert np.abs(pixel_values - expected["pixel_values"]).max() <= 1e-5


def test_patches_follow_merge_block_order_and_repeat_over_time():
    # An image whose every pixel value encodes its patch position after normalisation.
    processor = ImageProcessor(image_mean=(0, 0, 0), image_std=(1, 1, 1), min_pixels=1)
    image = np.zeros((56, 56, 3), dtype=np.uint8)
    for row in range(4):
        for col in range(4):
            image[row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14] = row * 4 + col
    pixel_values, grid_thw = processor.process_one(image)
    np.testing.assert_array_equal(grid_thw, [1, 4, 4])
    # 2x2 block order: (0,0) (0,1) (1,0) (1,1), then the next block to the right.
    expected_order = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    np.testing.assert_allclose(pixel_values[:, 0] * 255, expected_order, atol=1e-4)
    frames = pixel_values.reshape(16, 3, 2, 14, 14)
    np.testing.assert_array_equal(frames[:, :, 0], frames[:, :, 1])


def test_smart_resize_rejects_aspect_ratio_over_200():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100, factor=28, min_pixels=3136, max_pixels=1003520)


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height but which holds almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x78\x9c"))


def test_pixel_cap_is_checked_from_the_header_before_decoding(tmp_path):
    # 10000 x 7000 = 70M pixels, over the 64M default; the data would fail to decode, so the
    # error proves the cap was checked first.
    path = tmp_path / "bomb.png"
    _png_header_only(path, 10000, 7000)
    with pytest.raises(ValueError, match=r"bomb\.png.*70000000 pixels.*max_image_pixels"):
        load_image(path)


def test_pixel_cap_of_the_processor_names_the_file(tmp_path):
    path = tmp_path / "big.png"
    _make_image(100, 100, "RGB", seed=0).save(path)
    processor = ImageProcessor(max_image_pixels=5000)
    with pytest.raises(ValueError, match=r"big\.png.*10000 pixels"):
        processor([str(path)])
    with pytest.raises(ValueError, match=r"image 0 is 100x100"):
        processor([Image.open(path)])


def test_corrupt_file_raises_value_error_naming_it(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"corrupt\.jpg.*not a readable image"):
        load_image(path)


def test_truncated_file_raises_value_error_naming_it(tmp_path):
    path = tmp_path / "truncated.png"
    _make_image(64, 64, "RGB", seed=1).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.png.*could not be decoded"):
        load_image(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")


def test_paths_escaping_the_root_are_refused(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    _make_image(30, 30, "RGB", seed=2).save(outside)
    _make_image(30, 30, "RGB", seed=3).save(root / "sub" / "inside.png")
    os.symlink(outside, root / "link.png")

    assert load_image("sub/inside.png", root=root).size == (30, 30)
    assert load_image("sub/../sub/inside.png", root=root).size == (30, 30)
    for escaping in ("../outside.png", "sub/../../outside.png", str(outside), "link.png"):
        with pytest.raises(ValueError, match="outside the image root"):
            load_image(escaping, root=root)


def test_load_image_keeps_the_mode_and_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.png"
    image = _make_image(20, 40, "RGBA", seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.mode == "RGBA"
    assert loaded.size == (20, 40)


def test_save_pretrained_loads_in_transformers_with_the_same_settings(tmp_path):
    ours = ImageProcessor(
        min_pixels=28 * 28 * 2,
        max_pixels=28 * 28 * 100,
        image_mean=(0.5, 0.4, 0.3),
        image_std=(0.2, 0.25, 0.3),
        max_image_pixels=10**7,
    )
    ours.save_pretrained(tmp_path)
    reference = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert reference.size["shortest_edge"] == ours.min_pixels
    assert reference.size["longest_edge"] == ours.max_pixels
    assert (reference.patch_size, reference.merge_size, reference.temporal_patch_size) == (14, 2, 2)
    np.testing.assert_allclose(reference.image_mean, ours.image_mean)
    np.testing.assert_allclose(reference.image_std, ours.image_std)
    image = _make_image(300, 500, "RGBA", seed=5)
    pixel_values, grid_thw = ours([image])
    expected = reference(images=[image])
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"])
    assert np.abs(pixel_values - expected["pixel_values"]).max() <= 1e-5
    assert ImageProcessor.from_pretrained(tmp_path) == ours


def test_from_pretrained_reads_a_transformers_config(tmp_path):
    Qwen2VLImageProcessorPil(min_pixels=1000, max_pixels=200000).save_pretrained(tmp_path)
    loaded = ImageProcessor.from_pretrained(tmp_path)
    assert (loaded.min_pixels, loaded.max_pixels) == (1000, 200000)


def test_from_pretrained_reads_legacy_min_max_pixels_keys(tmp_path):
    config = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    loaded = ImageProcessor.from_pretrained(tmp_path)
    assert (loaded.min_pixels, loaded.max_pixels) == (3136, 12845056)


def test_from_pretrained_defaults_without_a_config(tmp_path):
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor()


def test_from_pretrained_refuses_settings_it_does_not_implement(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 2}))
    with pytest.raises(ValueError, match="resample=2"):
        ImageProcessor.from_pretrained(tmp_path)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="max_pixels=10 is below min_pixels"):
        ImageProcessor(min_pixels=100, max_pixels=10)
    with pytest.raises(ValueError, match="3 values"):
        ImageProcessor(image_mean=(0.5,))
