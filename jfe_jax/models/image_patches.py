"""An item's image as uint8 patches, normalised only when written into a batch.

``ImageProcessor.process_patches`` stops before normalising: its ``ImagePatches`` hold the
uint8 patches in merge-block order, without the temporal repeat (an eighth of the float32
``pixel_values``, which is what an item keeps and the example cache counts). ``collate`` and
``pack_items`` write them normalised and repeated straight into the preallocated batch, one
write per batch element, through a float32 table of the 256 normalised values per channel:
``table[c][x]`` is the same bits as ``(x / 255 - mean) / std`` computed in float32, which is
transformers' float64 rescale cast to float32 (see ``jfe_jax.data.image_processor``; tested).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np


def normalize_uint8(
    pixels: np.ndarray,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 pixels with channels on axis 1 -> float32 ``(x / 255 - mean) / std``, in float32
    throughout (the module docstring says why that is transformers' result).

    ``out``, when given, is a float32 array of ``pixels``'s shape (a view is fine) that
    receives the result.
    """
    shape = (1, len(image_mean)) + (1,) * (pixels.ndim - 2)
    mean = np.asarray(image_mean, dtype=np.float32).reshape(shape)
    std = np.asarray(image_std, dtype=np.float32).reshape(shape)
    out = np.divide(pixels, np.float32(255), out=out, dtype=np.float32)
    np.subtract(out, mean, out=out)
    return np.divide(out, std, out=out)


@functools.lru_cache(maxsize=16)
def normalized_table(image_mean: tuple[float, ...], image_std: tuple[float, ...]) -> np.ndarray:
    """float32 ``[channels, 256]``: ``normalize_uint8`` of every uint8 value in each channel
    (read-only). ``table[c][x]`` is the normalised value of ``x`` in channel ``c``, the same
    bits as computing it (an element-wise float32 formula gives one result per input)."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, len(image_mean), 256))
    table = normalize_uint8(values, image_mean, image_std)[0]
    table.flags.writeable = False
    return table


@dataclasses.dataclass(frozen=True)
class ImagePatches:
    """An item's image patches as uint8 pixels, before normalisation and the temporal repeat.

    ``pixel_values()`` computes the processor's float32 ``[patches, patch_dim]`` from them;
    ``write_pixel_values(out)`` writes the same values into a slice of a batch instead, so the
    float32 patches exist once, in the batch. Several images' patches may be concatenated.
    """

    pixels: np.ndarray  # uint8 [patches, channels * patch_size**2], (C, row, col) per patch
    image_mean: tuple[float, ...]  # per channel, applied after x / 255
    image_std: tuple[float, ...]
    temporal_patch_size: int  # frames per patch in pixel_values (a still image is repeated)

    def __post_init__(self):
        pixels, channels = self.pixels, len(self.image_mean)
        if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] % channels:
            raise ValueError(
                f"image patches are {pixels.dtype} {pixels.shape}; expected uint8 "
                f"[patches, {channels} * patch_size**2]"
            )
        if len(self.image_std) != channels or self.temporal_patch_size < 1:
            raise ValueError(
                f"image_std {self.image_std} and temporal_patch_size {self.temporal_patch_size}:"
                f" expected {channels} values and a positive integer"
            )

    @property
    def num_patches(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def patch_dim(self) -> int:
        """Length of one patch of ``pixel_values``: channels * temporal_patch_size * ps**2."""
        return int(self.pixels.shape[1]) * self.temporal_patch_size

    def pixel_values(self) -> np.ndarray:
        """The normalised patches, float32 ``[patches, patch_dim]`` (a new array each call)."""
        out = np.empty((self.num_patches, self.patch_dim), dtype=np.float32)
        return self.write_pixel_values(out)

    def write_pixel_values(self, out: np.ndarray) -> np.ndarray:
        """Writes ``pixel_values()`` into ``out`` (float32 ``[patches, patch_dim]``, C-contiguous,
        e.g. the patch rows of one batch row) and returns it: one write per element."""
        shape = (self.num_patches, self.patch_dim)
        if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
            raise ValueError(
                f"output for image patches is {out.dtype} {out.shape} (C-contiguous: "
                f"{out.flags.c_contiguous}); expected C-contiguous float32 {shape}"
            )
        channels = len(self.image_mean)
        patches, area = self.num_patches, self.pixels.shape[1] // channels
        table = normalized_table(self.image_mean, self.image_std)
        pixels = self.pixels.reshape(patches, channels, area)
        frames = out.reshape(patches, channels, self.temporal_patch_size, area)
        first = np.empty((patches, 1, area), dtype=np.float32)  # one channel's first frame
        for c in range(channels):
            # mode="clip" takes straight into ``first`` (no buffer); a uint8 is always in range.
            np.take(table[c], pixels[:, c], out=first[:, 0], mode="clip")
            frames[:, c] = first  # broadcast over the temporal frames
        return out


def pixel_values_shape(pixels: ImagePatches | np.ndarray) -> tuple[int, ...]:
    """The shape of the ``pixel_values`` that an item's image stands for: float32 pixel
    values as they are, or ``ImagePatches`` (without computing them)."""
    if isinstance(pixels, ImagePatches):
        return (pixels.num_patches, pixels.patch_dim)
    return np.shape(pixels)


def write_pixel_values(pixels: ImagePatches | np.ndarray, out: np.ndarray) -> None:
    """Writes an item's image into ``out`` (float32, e.g. the patch rows of a batch row):
    float pixel values copied, ``ImagePatches`` normalised on the way."""
    if isinstance(pixels, ImagePatches):
        pixels.write_pixel_values(out)
    else:
        out[...] = pixels
