"""Image files read safely: the decompression-bomb guard (size from the header, before any
pixel is decoded), EXIF orientation, and paths kept inside their root.

A base-level module (no package imports) because the models (MIRe's CLIP tower reads image
files) and the data pipeline both read images; ``jfe_jax.data.image_processor`` re-exports
these names.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from PIL import Image, ImageOps

# The largest image (pixels, from its header) the readers here decode by default.
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def load_image(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Open and decode an image file, with its EXIF orientation applied.

    ``path`` is taken relative to ``root`` when one is given, and must stay inside it once
    ``..`` and symlinks are resolved. The size is checked against ``max_image_pixels`` from
    the header, before the raster is decoded. The mode is left as stored (RGBA, P, ...):
    the processor converts to RGB. Raises FileNotFoundError for a missing file and
    ValueError, naming the file, for an escaping path, an oversized or unreadable image.
    """
    path = _resolve_inside(path, root) if root is not None else os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"image path {path} is not a regular file")
    name = f"image file {path}"
    return decode_opened(open_image(path, max_image_pixels=max_image_pixels, name=name), name)


def open_image(
    source: str | os.PathLike | BinaryIO, *, max_image_pixels: int, name: str
) -> Image.Image:
    """``Image.open`` (the header only) with the decompression-bomb guard: ValueError naming
    ``name`` when the header is unreadable or claims more than ``max_image_pixels`` pixels.

    No pixel is decoded yet: the caller decodes (``decode_opened``) or closes the image.
    """
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{name} is too large to decode safely: {err}") from err
    except Image.UnidentifiedImageError:  # its message is the repr of an in-memory file
        raise ValueError(f"{name} is not a readable image: unknown or corrupt format") from None
    except OSError as err:
        raise ValueError(f"{name} is not a readable image: {err}") from err
    width, height = image.size
    if width * height > max_image_pixels:
        image.close()
        raise ValueError(
            f"{name} is {width}x{height} = {width * height} pixels;"
            f" expected at most max_image_pixels={max_image_pixels}"
        )
    return image


def decode_opened(image: Image.Image, name: str) -> Image.Image:
    """Decodes an ``open_image`` result, applies its EXIF orientation and closes the file;
    ValueError naming ``name`` for truncated or corrupt data after a valid header."""
    try:
        image.load()
        # exif_transpose always returns a new image, so closing the file below is safe.
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{name} could not be decoded: {err}") from err
    finally:
        image.close()


def _resolve_inside(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` joined to ``root`` and resolved; ValueError if it lands outside ``root``."""
    real_root = os.path.realpath(root)
    real_path = os.path.realpath(os.path.join(real_root, os.fspath(path)))
    if os.path.commonpath([real_root, real_path]) != real_root:
        raise ValueError(
            f"image path {os.fspath(path)!r} resolves to {real_path}, outside the image root"
            f" {real_root}; expected a path inside the root"
        )
    return real_path
