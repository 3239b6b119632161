"""decode_image: only the raster formats training needs are opened, and the pixel count is checked
from the header before anything is decoded."""

from __future__ import annotations

import io
import warnings

import numpy as np
import PIL.Image
import pytest

from owl_lightning.data import images
from owl_lightning.data.health import CORRUPT_IMAGE, DECOMPRESSION_BOMB, UNSUPPORTED_IMAGE, SkipSample
from owl_lightning.data.images import ALLOWED_FORMATS, decode_image

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def encoded(fmt: str, side: int = 8) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_decodes_to_rgb(fmt):
    image = decode_image(encoded(fmt))
    assert image.mode == "RGB" and image.size == (8, 8)


@pytest.mark.parametrize("as_path", [False, True])
def test_eps_is_refused_without_ghostscript_or_the_eps_reader_running(monkeypatch, tmp_path, as_path):
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ran.append("ghostscript"))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: ran.append("eps reader"))
    source = tmp_path / "drawing.png" if as_path else EPS  # a misleading extension changes nothing
    if as_path:
        source.write_bytes(EPS)
    with pytest.raises(SkipSample, match="EPS") as skip:
        decode_image(source)
    assert skip.value.reason == UNSUPPORTED_IMAGE
    assert ran == []


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "ICO"])
def test_formats_training_does_not_need_are_refused_by_name(fmt):
    with pytest.raises(SkipSample, match=fmt) as skip:
        decode_image(encoded(fmt))
    assert skip.value.reason == UNSUPPORTED_IMAGE


def test_bytes_no_reader_recognises_are_corrupt():
    with pytest.raises(SkipSample) as skip:
        decode_image(b"\x00\x01 nothing at all")
    assert skip.value.reason == CORRUPT_IMAGE


def test_the_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch):
    """Our own limit, read from ``image.size`` before ``load()``: it holds with every warning ignored and
    with PIL's own limit far above it (so PIL neither warns nor raises)."""
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 15 * 15)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10**9)
    loaded = []
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: loaded.append(self.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SkipSample, match="256 pixels") as skip:
            decode_image(encoded("PNG", side=16))
    assert skip.value.reason == DECOMPRESSION_BOMB
    assert loaded == []
    monkeypatch.undo()
    assert decode_image(encoded("PNG", side=16)).size == (16, 16)


def test_an_image_far_past_pils_own_limit_is_a_bomb_too(monkeypatch):
    """PIL raises DecompressionBombError itself past twice its limit, before our check sees the size."""
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(SkipSample) as skip:
        decode_image(encoded("PNG", side=16))
    assert skip.value.reason == DECOMPRESSION_BOMB
