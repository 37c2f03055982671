"""Qwen2-VL image preprocessing in numpy + PIL: smart resize, normalise, patchify.

Reproduces transformers 5.23's ``Qwen2VLImageProcessorPil`` step for step, so that
``pixel_values`` and ``image_grid_thw`` match what a Hugging Face Qwen2-VL checkpoint was
trained on:

1. RGB conversion: images with an alpha band (or a ``transparency`` entry, as palette images
   may have) are composited onto white; every other mode goes through ``convert("RGB")``.
   ``uint8`` arrays (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) are converted the same way
   transformers converts arrays (grey replicated, alpha blended onto white and rounded).
2. ``smart_resize`` to sides divisible by ``patch_size * merge_size`` with the pixel count in
   ``[min_pixels, max_pixels]``, then a PIL bicubic resize of the uint8 image.
3. Patchify: the uint8 image is cut into ``patch_size`` squares, ordered by 2x2 merge block
   (block row, block column, row in block, column in block), each flattened as (C, T,
   patch_h, patch_w) with the patch repeated ``temporal_patch_size`` times along time.
4. ``(x / 255 - mean) / std`` in float32, written into every frame of each patch.
   transformers rescales ``x * (1/255)`` in float64 and casts to float32; the float32 quotient
   ``x / 255`` is correctly rounded and equals that cast for every uint8 ``x`` (tested), so the
   values are the same bits without a float64 image.

``process_patches`` stops before step 4: it returns ``ImagePatches``
(``jfe_jax.models.image_patches``), the uint8 patches of step 3 without the temporal repeat (an
eighth of the float32 bytes), which the collate step normalises and repeats straight into the
padded batch.

``max_image_pixels`` is a decompression-bomb guard on the original image, checked from the
file header before the raster is decoded. Pillow's own ``Image.MAX_IMAGE_PIXELS`` limit
(about 89M pixels, an error at twice that) still applies on top of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from jfe_jax.image_files import (  # noqa: F401  (re-exported: the data layer's image reads)
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_opened,
    load_image,
    open_image,
)
from jfe_jax.models.image_patches import ImagePatches, normalize_uint8
from jfe_jax.train import config_base

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, the Qwen2-VL defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# smart_resize refuses aspect ratios above this (as Qwen2-VL does).
MAX_ASPECT_RATIO = 200

ImageInput = Image.Image | np.ndarray | str | os.PathLike

# HF preprocessor settings we do not implement: a config that changes them is refused rather
# than silently processed differently. Values are the Qwen2-VL defaults.
_FIXED_HF_SETTINGS = {
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": int(Image.Resampling.BICUBIC),
}


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's target (height, width): multiples of ``factor``, area within the pixel bounds.

    The aspect ratio is kept as closely as the rounding allows. Raises ValueError for an
    aspect ratio above 200, as Qwen2-VL does.
    """
    if min(height, width) < 1:
        raise ValueError(f"image has size {height}x{width}; expected both sides >= 1")
    aspect_ratio = max(height, width) / min(height, width)
    if aspect_ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {height}x{width} has aspect ratio {aspect_ratio:.1f};"
            f" expected at most {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """The image as a uint8 (H, W, 3) array, converted exactly as transformers converts it."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"expected a PIL image, a numpy array or a path; got {type(image).__name__}"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"image array has dtype {image.dtype}; expected uint8 in [0, 255]")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image array has shape {image.shape}; expected (H, W) or channels-last (H, W, C)"
            " with C in {1, 3, 4}"
        )
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        # transformers blends arrays in float64 and rounds (PIL's alpha_composite differs).
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Qwen2-VL image preprocessing (see the module docstring for the exact steps)."""

    patch_size: int = 14  # side of a ViT patch, in pixels
    temporal_patch_size: int = 2  # frames per patch; a still image is repeated this many times
    merge_size: int = 2  # patches merged per side into one LLM token
    # The smallest and largest resized area: the transformers class defaults, declared with
    # Qwen2-VL's other inference settings.
    min_pixels: int = config_base.QWEN2_VL_DEFAULTS.image_min_pixels
    max_pixels: int = config_base.QWEN2_VL_DEFAULTS.image_max_pixels
    image_mean: tuple[float, ...] = CLIP_MEAN  # per RGB channel, applied after x / 255
    image_std: tuple[float, ...] = CLIP_STD
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # cap on the original, decoded image

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; expected a positive integer")
        if self.max_pixels < self.min_pixels:
            raise ValueError(
                f"max_pixels={self.max_pixels} is below min_pixels={self.min_pixels};"
                " expected min_pixels <= max_pixels"
            )
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels is {self.max_image_pixels}; expected >= 1")
        object.__setattr__(self, "image_mean", tuple(float(m) for m in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(s) for s in self.image_std))
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"image_mean {self.image_mean} and image_std {self.image_std} must have 3 values"
                " (one per RGB channel)"
            )
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std {self.image_std} must be positive")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels * temporal_patch_size * patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def num_image_tokens(self, image_grid_thw: Sequence[int] | np.ndarray) -> int:
        """LLM tokens for one image: its patch count divided by merge_size**2."""
        return int(np.prod(image_grid_thw)) // self.merge_size**2

    def load_image(
        self, path: str | os.PathLike, root: str | os.PathLike | None = None
    ) -> Image.Image:
        """``load_image`` with this processor's ``max_image_pixels`` cap."""
        return load_image(path, root, max_image_pixels=self.max_image_pixels)

    def process_one(
        self, image: ImageInput, *, root: str | os.PathLike | None = None, name: str = "image"
    ) -> tuple[np.ndarray, np.ndarray]:
        """One image -> (pixel_values float32 [patches, patch_dim], image_grid_thw int64 [3]).

        ``image`` is a PIL image, a uint8 array (channels last) or a path (read with
        ``load_image`` relative to ``root``). ``name`` labels the image in error messages.
        """
        patches, grid_thw = self.process_patches(image, root=root, name=name)
        return patches.pixel_values(), grid_thw

    def process_patches(
        self, image: ImageInput, *, root: str | os.PathLike | None = None, name: str = "image"
    ) -> tuple[ImagePatches, np.ndarray]:
        """``process_one`` before normalisation: (uint8 ``ImagePatches``, image_grid_thw)."""
        if isinstance(image, str | os.PathLike):
            name = os.fspath(image)
            image = self.load_image(image, root)
        height, width = _size_of(image)
        if height * width > self.max_image_pixels:
            raise ValueError(
                f"{name} is {width}x{height} = {height * width} pixels;"
                f" expected at most max_image_pixels={self.max_image_pixels}"
            )
        try:
            new_height, new_width = smart_resize(
                height, width, self.factor, self.min_pixels, self.max_pixels
            )
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        return self.patchify_uint8(self.resize(image, new_height, new_width))

    def resize(self, image: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
        """The image in RGB (``to_rgb``), PIL-bicubic resized to ``height`` x ``width``: uint8
        (height, width, 3)."""
        if (
            isinstance(image, Image.Image)
            and image.mode == "RGB"
            and image.info.get("transparency") is None
        ):
            rgb = image  # what to_rgb would return, without the round trip through numpy
        else:
            rgb = Image.fromarray(to_rgb(image))
        return np.asarray(rgb.resize((width, height), Image.Resampling.BICUBIC))

    def normalize(self, pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``normalize_uint8`` with this processor's mean and std."""
        return normalize_uint8(pixels, self.image_mean, self.image_std, out=out)

    def patchify(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A resized uint8 (H, W, C) image -> (pixel_values float32 [patches, patch_dim],
        image_grid_thw int64 [3]): normalised patches in merge-block order, each repeated over
        time (the module docstring's steps 3 and 4)."""
        patches, grid_thw = self.patchify_uint8(image)
        return patches.pixel_values(), grid_thw

    def patchify_uint8(self, image: np.ndarray) -> tuple[ImagePatches, np.ndarray]:
        """A resized uint8 (H, W, C) image -> (its ``ImagePatches``, image_grid_thw int64 [3]):
        step 3 of the module docstring without the temporal repeat."""
        height, width, channels = image.shape
        p, m = self.patch_size, self.merge_size
        grid_h, grid_w = height // p, width // p
        blocks = image.reshape(grid_h // m, m, p, grid_w // m, m, p, channels)
        # -> (block row, block col, row in block, col in block, C, patch row, patch col)
        ordered = blocks.transpose(0, 3, 1, 4, 6, 2, 5).reshape(grid_h * grid_w, channels * p * p)
        patches = ImagePatches(ordered, self.image_mean, self.image_std, self.temporal_patch_size)
        return patches, np.array([1, grid_h, grid_w], dtype=np.int64)

    def __call__(
        self, images: Sequence[ImageInput], *, root: str | os.PathLike | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (pixel_values float32 [all patches, patch_dim], image_grid_thw int64 [n, 3]).

        Patches of all images are concatenated in order; ``image_grid_thw`` says how many
        belong to each.
        """
        if isinstance(images, Image.Image | np.ndarray | str | os.PathLike):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given; expected at least one")
        outputs = [
            self.process_one(image, root=root, name=f"image {i}") for i, image in enumerate(images)
        ]
        pixel_values = np.concatenate([pixels for pixels, _ in outputs], axis=0)
        return pixel_values, np.stack([grid for _, grid in outputs])

    def to_hf_dict(self) -> dict[str, Any]:
        """The settings as a Hugging Face ``preprocessor_config.json`` dict for Qwen2-VL."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            **_FIXED_HF_SETTINGS,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            # Ours; transformers keeps unknown keys as inert attributes.
            "max_image_pixels": self.max_image_pixels,
        }

    @classmethod
    def from_hf_dict(cls, config: dict[str, Any], source: str = "config") -> ImageProcessor:
        """Build from a Hugging Face Qwen2-VL preprocessor dict (``min_pixels`` beats ``size``).

        Raises ValueError when the dict asks for behaviour this class does not implement
        (no resize, another resample filter, another rescale factor, ...).
        """
        for key, expected in _FIXED_HF_SETTINGS.items():
            value = config.get(key, expected)
            if value is None or not math.isclose(float(value), float(expected)):
                raise ValueError(
                    f"{source} sets {key}={value!r}; only {key}={expected!r} is supported"
                )
        size = config.get("size") or {}
        fields: dict[str, Any] = {}
        for name, size_keys in (
            ("min_pixels", ("shortest_edge", "min_pixels")),
            ("max_pixels", ("longest_edge", "max_pixels")),
        ):
            value = config.get(name)
            for key in size_keys:
                if value is None:
                    value = size.get(key)
            if value is not None:
                fields[name] = int(value)
        for name in ("patch_size", "temporal_patch_size", "merge_size", "max_image_pixels"):
            if config.get(name) is not None:
                fields[name] = int(config[name])
        for name in ("image_mean", "image_std"):
            if config.get(name) is not None:
                value = config[name]
                fields[name] = tuple(value) if isinstance(value, list | tuple) else (value,) * 3
        return cls(**fields)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ImageProcessor:
        """Read a Hugging Face model directory's image-processor settings.

        Uses ``preprocessor_config.json``, else the ``image_processor`` entry of
        ``processor_config.json`` (transformers 5 processors), else the defaults.
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"model directory not found: {directory}")
        path = os.path.join(directory, PREPROCESSOR_CONFIG)
        if os.path.isfile(path):
            return cls.from_hf_dict(_read_json(path), source=path)
        path = os.path.join(directory, PROCESSOR_CONFIG)
        if os.path.isfile(path):
            config = _read_json(path).get("image_processor")
            if isinstance(config, dict):
                return cls.from_hf_dict(config, source=f"{path} (image_processor)")
        return cls()

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``preprocessor_config.json`` (loadable by transformers); returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(os.fspath(directory), PREPROCESSOR_CONFIG)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path


def _size_of(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """(height, width) of a PIL image or a channels-last array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"expected a PIL image, a numpy array or a path; got {type(image).__name__}"
        )
    if image.ndim not in (2, 3):
        raise ValueError(f"image array has shape {image.shape}; expected (H, W) or (H, W, C)")
    return int(image.shape[0]), int(image.shape[1])


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError naming the file if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}; expected a JSON object")
    return value
