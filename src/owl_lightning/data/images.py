"""Decode one image into an RGB PIL image, or raise :class:`SkipSample` saying why not.

One function for every reader (tar members in stage 1, files in stage 2, chat uploads), so "what
counts as a bad image" has one answer. Only the raster formats photos and datasets come in are
opened (:data:`ALLOWED_FORMATS`): PIL's other readers include EPS, which hands the file to
Ghostscript. The pixel count is checked from the header before anything is decoded. Modes PIL can
convert faithfully are converted (L, LA, P, RGBA, CMYK, 16-bit greyscale); what cannot be read is
skipped with a reason.
"""

from __future__ import annotations

import io
import struct
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

# The formats PIL may open (its plugin names). Every other reader is refused before it runs.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# PIL's own default (≈89.5 Mpx); checked here explicitly from the header, before decoding: a warnings
# filter that turned PIL's warning into an error would not be thread-safe (the chat server decodes in threads).
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
# Bytes PIL's readers look at to recognise a format (Image.open reads as many).
_PREFIX_BYTES = 16


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
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with Image.open(source, formats=ALLOWED_FORMATS) as image:
            width, height = image.size  # from the header: nothing is decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise SkipSample(
                    DECOMPRESSION_BOMB, f"{width}×{height} = {width * height:,} pixels, more than MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS:,}"
                )
            image.load()  # decode now: a truncated file fails here, not inside the transform
            return to_rgb(image)
    except Image.DecompressionBombError as err:  # PIL's own check, past twice its limit, inside open()
        raise SkipSample(DECOMPRESSION_BOMB, str(err)) from None
    except Image.UnidentifiedImageError:
        refused = _refused_format(data)
        if refused is not None:
            raise SkipSample(
                UNSUPPORTED_IMAGE, f"format {refused} is not read (only {', '.join(ALLOWED_FORMATS)}); convert the image, e.g. to PNG"
            ) from None
        raise SkipSample(CORRUPT_IMAGE, "no image format recognises these bytes") from None
    except SkipSample:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise SkipSample(CORRUPT_IMAGE, f"{type(err).__name__}: {err}") from None


def _refused_format(data: bytes | Path) -> str | None:
    """The format outside :data:`ALLOWED_FORMATS` whose signature ``data`` starts with, if any: only the
    readers' cheap byte checks run (no reader opens it), to tell "EPS, refused" from "corrupt"."""
    if isinstance(data, Path):
        with data.open("rb") as file:
            prefix = file.read(_PREFIX_BYTES)
    else:
        prefix = bytes(data[:_PREFIX_BYTES])
    Image.init()
    for name, (_, accepts) in Image.OPEN.items():
        if name in ALLOWED_FORMATS or accepts is None:
            continue
        try:
            if accepts(prefix):
                return name
        except (IndexError, SyntaxError, TypeError, ValueError, struct.error):  # a check that needs more bytes: as PIL's open() does
            continue
    return None


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
