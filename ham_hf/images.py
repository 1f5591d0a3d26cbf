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

# Images above this many pixels are refused before decoding (decompression-bomb guard).
MAX_PIXELS = 64_000_000


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
        raise ImageError(f"{name} is not an image that can be read (use JPEG, PNG, BMP, TIFF or WebP).") from None
    except OSError as exc:
        raise ImageError(f"{name} could not be opened: {exc}.") from None
    if img.width * img.height > MAX_PIXELS:
        raise ImageError(f"{name} is {img.width}x{img.height} pixels, too large to decode safely "
                         f"(limit {MAX_PIXELS // 1_000_000} megapixels); resize it first.")
    return img
