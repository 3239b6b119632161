"""Decode one video clip into uniformly sampled frames, or raise :class:`SkipSample` saying why not.

One function for every reader (stage-1 shard members, stage-2 files, chat uploads), so "what counts as a
bad clip" has one answer, as :mod:`~owl_lightning.data.images` gives it for images. Clips are untrusted
input, so decoding is bounded:

- the container is recognised from its first bytes (MP4/MOV, WebM/Matroska, GIF, AVI) and opened as
  exactly that format: FFmpeg never probes, so demuxers that open other files or URLs (concat, HLS, ...)
  never run; other containers are ``unsupported_video``;
- only the codecs of :data:`ALLOWED_CODECS` are decoded (``unsupported_video`` otherwise);
- a frame larger than :data:`MAX_FRAME_PIXELS` (from the stream header, and again for every decoded frame)
  is a ``decompression_bomb``; a clip longer than :data:`MAX_DURATION_S` or with more than
  :data:`MAX_DECODED_FRAMES` frames is ``video_too_long`` (decoding cost grows with the frames);
- at most ``num_frames`` decoded frames are held at once, converted to RGB as they are picked.

Sampling (:func:`sample_indices`): the centre frame of each of ``num_frames`` equal segments of the clip,
as the official mPLUG-Owl video processor picks them. A clip with fewer frames than that, but at least
``min_frames``, repeats frames (segment centres rounded down); fewer than ``min_frames`` is
``video_too_short``; a clip that cannot be decoded is ``corrupt_video``. Where the container's frame
count is wrong (a truncated file), the frames really decoded are sampled again.

PyAV (the ``[video]`` extra) is imported on first use: the rest of the package works without it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from owl_lightning.data.health import (
    CORRUPT_VIDEO,
    DECOMPRESSION_BOMB,
    MISSING_VIDEO,
    UNSUPPORTED_VIDEO,
    VIDEO_TOO_LONG,
    VIDEO_TOO_SHORT,
    SkipSample,
)

# The decoders we run: the codecs clips come in. FFmpeg has hundreds more, each an attack surface.
ALLOWED_CODECS = ("h264", "hevc", "mpeg4", "vp8", "vp9", "av1", "gif", "mjpeg", "mpeg1video", "mpeg2video")
MAX_FRAME_PIXELS = 3840 * 2160  # 4K UHD
MAX_DURATION_S = 600.0
MAX_DECODED_FRAMES = 18_000  # 10 minutes at 30 frames a second
# File extensions read as clips (chat uploads, the OpenAI route's data: URLs, shard members).
VIDEO_EXTENSIONS = ("mp4", "m4v", "mov", "webm", "mkv", "gif", "avi")


@dataclass(frozen=True)
class VideoClip:
    """One preprocessed clip: ``views`` uint8 ``[F, 3, S, S]``, its sampled frames in time order, each one
    view for the encoder (``F = video.num_frames``)."""

    views: torch.Tensor


@dataclass(frozen=True)
class Video:
    """A decoded clip before preprocessing: its sampled RGB frames in time order (what a chat request holds)."""

    frames: tuple[Image.Image, ...]


def sample_indices(num_decodable: int, num_frames: int) -> list[int]:
    """Frame numbers to keep of a clip of ``num_decodable`` frames: the centre of each of ``num_frames``
    equal segments, in order (repeated when the clip has fewer frames than ``num_frames``)."""
    return [int((2 * index + 1) * num_decodable // (2 * num_frames)) for index in range(num_frames)]


def container_format(prefix: bytes) -> str:
    """The FFmpeg demuxer for a clip's first 12 bytes, or :class:`SkipSample` (``unsupported_video``)."""
    if prefix[4:8] == b"ftyp":
        return "mp4"  # FFmpeg's mov demuxer: MP4, MOV, M4V, 3GP
    if prefix[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # WebM and MKV
    if prefix[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"AVI ":
        return "avi"
    raise SkipSample(UNSUPPORTED_VIDEO, "not an MP4/MOV, WebM/Matroska, GIF or AVI file; convert the clip, e.g. to MP4 (H.264)")


def decode_video(data: bytes | Path, num_frames: int, min_frames: int = 1) -> list[Image.Image]:
    """Bytes of an encoded clip, or a path to one → its ``num_frames`` sampled frames as RGB images."""
    if isinstance(data, Path) and not data.is_file():
        raise SkipSample(MISSING_VIDEO, str(data))
    import av  # the [video] extra

    def opened() -> BinaryIO:
        return io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data.open("rb")

    with opened() as file:
        fmt = container_format(file.read(12))
    try:
        count = _frame_count(av, opened, fmt)
        if count < min_frames:
            raise SkipSample(VIDEO_TOO_SHORT, f"{count} decodable frame(s), fewer than video.min_frames={min_frames}")
        frames, decoded = _decode_frames(av, opened, fmt, sample_indices(count, num_frames))
        if len(frames) < num_frames:  # the container claimed more frames than there are: sample those there are
            if decoded < min_frames:
                raise SkipSample(VIDEO_TOO_SHORT, f"{decoded} decodable frame(s), fewer than video.min_frames={min_frames}")
            frames, _ = _decode_frames(av, opened, fmt, sample_indices(decoded, num_frames))
    except (av.FFmpegError, EOFError, ValueError, IndexError, UnicodeDecodeError) as err:
        raise SkipSample(CORRUPT_VIDEO, f"{type(err).__name__}: {err}") from None
    if len(frames) < num_frames:
        raise SkipSample(CORRUPT_VIDEO, f"decoding stopped before frame {len(frames) + 1} of {num_frames} on a second pass")
    return frames


def _video_stream(av, container):
    """The clip's first video stream, checked against the codec, size and duration bounds."""
    if not container.streams:  # e.g. an MP4 cut before its index (written last): nothing in it can be found
        raise SkipSample(CORRUPT_VIDEO, f"no readable stream in the {container.format.name} container (truncated?)")
    if not container.streams.video:
        raise SkipSample(UNSUPPORTED_VIDEO, f"no video stream in the {container.format.name} container (audio only?)")
    stream = container.streams.video[0]
    codec = stream.codec_context.name
    if codec not in ALLOWED_CODECS:
        raise SkipSample(UNSUPPORTED_VIDEO, f"codec {codec!r} is not decoded (only {', '.join(ALLOWED_CODECS)}); re-encode, e.g. to H.264")
    _check_pixels(stream.codec_context.width, stream.codec_context.height)
    duration = container.duration / av.time_base if container.duration else 0.0
    if duration > MAX_DURATION_S:
        raise SkipSample(VIDEO_TOO_LONG, f"{duration:.0f} s, more than MAX_DURATION_S={MAX_DURATION_S:.0f}; cut it into clips")
    stream.thread_type = "AUTO"
    return stream


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_FRAME_PIXELS:
        raise SkipSample(DECOMPRESSION_BOMB, f"{width}×{height} frames, more than MAX_FRAME_PIXELS={MAX_FRAME_PIXELS:,} pixels")


def _frame_count(av, opened: Callable[[], BinaryIO], fmt: str) -> int:
    """The clip's frames, from the container's header where it says, else by reading its packets (not decoding)."""
    with opened() as file, av.open(file, format=fmt) as container:
        stream = _video_stream(av, container)
        count = stream.frames
        if count <= 0:  # WebM and GIF headers do not say; counting stops past the bound
            count = sum(1 for _ in islice((packet for packet in container.demux(stream) if packet.size), MAX_DECODED_FRAMES + 1))
    if count > MAX_DECODED_FRAMES:
        raise SkipSample(VIDEO_TOO_LONG, f"{count} frames, more than MAX_DECODED_FRAMES={MAX_DECODED_FRAMES}; cut it into clips")
    return count


def _decode_frames(av, opened: Callable[[], BinaryIO], fmt: str, wanted: list[int]) -> tuple[list[Image.Image], int]:
    """The frames numbered ``wanted`` (ascending, repeats allowed) as RGB images, and the frames decoded
    to reach them (all of the clip's when some are missing)."""
    picked: list[Image.Image] = []
    decoded = 0
    with opened() as file, av.open(file, format=fmt) as container:
        stream = _video_stream(av, container)
        for frame in container.decode(stream):
            _check_pixels(frame.width, frame.height)
            image = None
            while len(picked) < len(wanted) and wanted[len(picked)] == decoded:  # a short clip's frames repeat
                image = image or frame.to_image()
                picked.append(image)
            decoded += 1
            if len(picked) == len(wanted) or decoded >= MAX_DECODED_FRAMES:
                break
    return picked, decoded


class VideoReader:
    """Picklable (data workers may be spawned): an encoded clip (bytes or a path) → :class:`VideoClip`.

    ``frame_transform``: one RGB frame → uint8 ``[3, S, S]`` (the model's single-view preprocessing,
    :func:`~owl_lightning.data.highres.frame_preprocess`); ``visual_tokens``: the LLM positions every clip
    it reads takes (``num_frames · V``), which the text must leave room for."""

    def __init__(
        self, frame_transform: Callable[[Image.Image], torch.Tensor], num_frames: int, min_frames: int, visual_tokens: int
    ) -> None:
        self.frame_transform, self.num_frames, self.min_frames = frame_transform, num_frames, min_frames
        self.visual_tokens = visual_tokens

    def __call__(self, data: bytes | Path) -> VideoClip:
        frames = decode_video(data, self.num_frames, self.min_frames)
        return VideoClip(torch.stack([self.frame_transform(frame) for frame in frames]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_frames={self.num_frames}, min_frames={self.min_frames}, frame_transform={self.frame_transform})"


def encode_clip(frames: Sequence[np.ndarray], fps: int = 8, codec: str = "mpeg4", container: str = "mp4") -> bytes:
    """RGB frames (uint8 ``[H, W, 3]``, even sides) → an encoded clip's bytes, for generated datasets and
    tests. ``mpeg4`` in ``mp4`` needs nothing outside PyAV's wheel; one encoder thread keeps the bytes the
    same from run to run."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        stream.codec_context.thread_count = 1
        stream.bit_rate = 2_000_000  # FFmpeg's default (200 kb/s) smears small shapes across frames
        for pixels in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")))
        output.mux(stream.encode())
    return buffer.getvalue()
