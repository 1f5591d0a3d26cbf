"""The one rule for what counts as a usable image file, shared by `prepare` and every decoder.

`ham-hf prepare` checks each file with it, and training, the app and `ham-hf predict` open files
through it, so an image that passes prepare (say, one over the pixel limit) cannot fail later.
"""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image, UnidentifiedImageError

from ham_hf.errors import ImageError

try:  # HEIC / HEIF (iPhone photos) through Pillow, where pillow-heif is installed
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - a requirement; without it HEIC is refused with the message below
    pass

# The image files every stage reads (prepare's folder scans, `ham-hf predict`, the app's uploads).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".heic", ".heif"})

# Images above this many pixels are refused before decoding (decompression-bomb guard).
MAX_PIXELS = 64_000_000
# Formats decoded at full size (all but JPEG, which decodes at 1/2 to 1/8 scale when large) are refused
# above this (a 12 MP phone photo, 4032 x 3024, passes): Pillow holds 4 bytes a pixel, and shrinking an
# image with transparency takes one copy more, so one upload costs at most about 100 MB.
MAX_FULL_DECODE_PIXELS = 12_500_000
REDUCIBLE_FORMATS = frozenset({"JPEG", "MPO"})
# Longer side over shorter side: a thinner image holds no lesion, and scaling its short side up to the
# model's size would cost memory in proportion to its length (1 x 10,000 px: 2.6 GB).
MAX_ASPECT = 10


def open_image(source) -> Image.Image:
    """Open (header only) a path or bytes, turning every failure into an ImageError."""
    name = "the upload" if isinstance(source, (bytes, bytearray)) else os.path.basename(str(source))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name} is too large to decode safely (over {MAX_PIXELS // 1_000_000} megapixels).") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image that can be read "
                         "(use JPEG, PNG, HEIC, WebP, TIFF, BMP or GIF).") from None
    except OSError as exc:
        raise ImageError(f"{name} could not be opened: {exc}.") from None
    check_size(img.width, img.height, img.format, name)
    return img


def check_size(width: int, height: int, image_format: str | None, name: str = "the image") -> None:
    """Refuse, before decoding, what would cost too much memory: too many pixels, or too thin a shape."""
    pixels = width * height
    if pixels > MAX_PIXELS or (image_format not in REDUCIBLE_FORMATS and pixels > MAX_FULL_DECODE_PIXELS):
        limit = MAX_PIXELS if image_format in REDUCIBLE_FORMATS else MAX_FULL_DECODE_PIXELS
        raise ImageError(f"{name} is {width}x{height} pixels, too large to decode safely "
                         f"(limit {limit // 1_000_000} megapixels for {image_format or 'this format'}); "
                         "resize it first.")
    if min(width, height) >= 1 and max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(f"{name} is {width}x{height} pixels: too thin to show a lesion (longer side over "
                         f"{MAX_ASPECT}x the shorter); crop it around the lesion first.")
