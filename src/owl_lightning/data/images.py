"""Decode one image into an RGB PIL image, or raise :class:`SkipSample` saying why not.

One function for every reader (tar members in stage 1, files in stage 2), so "what counts as
a bad image" has one answer. Modes PIL can convert faithfully are converted (L, LA, P, RGBA,
CMYK, 16-bit greyscale); what cannot be read is skipped with a reason.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from owl_lightning.data.health import (
    CORRUPT_IMAGE,
    DECOMPRESSION_BOMB,
    MALFORMED_RECORD,
    MISSING_IMAGE,
    PATH_OUTSIDE_ROOT,
    UNSUPPORTED_IMAGE,
    SkipSample,
)

# PIL's own default (≈89.5 Mpx); warnings past it become errors here so a bomb is skipped, not decoded.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode we accept to RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        return Image.fromarray((array * (255.0 / peak)).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV", "F"):
        return image.convert("RGB")
    raise SkipSample(UNSUPPORTED_IMAGE, f"image mode {image.mode!r}")


def decode_image(data: bytes | Path) -> Image.Image:
    """Bytes of an encoded image, or a path to one → fully decoded RGB image."""
    if isinstance(data, Path) and not data.is_file():
        raise SkipSample(MISSING_IMAGE, str(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as image:
                image.load()  # decode now: a truncated file fails here, not inside the transform
                return to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise SkipSample(DECOMPRESSION_BOMB, str(err)) from None
        except SkipSample:
            raise
        except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as err:
            raise SkipSample(CORRUPT_IMAGE, f"{type(err).__name__}: {err}") from None


def resolve_under_root(relative: str, root: Path) -> Path:
    """``root / relative``, refusing paths that leave ``root`` (``..``, absolute paths, symlinks out) and
    paths the OS cannot take (a NUL byte, a lone surrogate)."""
    root = root.resolve()
    try:
        candidate = (root / relative).resolve()
    except (ValueError, OSError) as err:  # "embedded null byte", UnicodeEncodeError, a name too long, ...
        raise SkipSample(MALFORMED_RECORD, f"image path {relative!r:.200} is not a usable file name: {err}") from None
    if not candidate.is_relative_to(root):
        raise SkipSample(PATH_OUTSIDE_ROOT, f"{relative!r} resolves outside image root {root}")
    return candidate
