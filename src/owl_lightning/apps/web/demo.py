"""``owl-lightning serve``: chat with a model about uploaded images and video clips in a browser.

The page keeps the conversation and sends all of it with every message (images and clips as data URLs),
so the server holds no sessions: a reload starts a new chat, and two tabs never mix their histories.
A message may carry images and clips (a ``data:video/...`` URL is a clip); their placeholders open that
message, as in training. ``serve`` also answers OpenAI clients from the same model (:mod:`.openai_api`);
this module's image and clip checks and settings are theirs too. A clip is decoded within
data/video.py's bounds (container and codec allow-lists, frame size, duration, frames decoded) and
only its ``video.num_frames`` sampled frames are kept.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from PIL import Image

from owl_lightning.apps.web import HttpError, WebApp
from owl_lightning.config import IMAGE_TOKEN
from owl_lightning.data.health import SkipSample
from owl_lightning.data.images import decode_image
from owl_lightning.data.template import ROLES, Turn
from owl_lightning.data.video import Video
from owl_lightning.inference import OwlAssistant, Request, user_turn

MAX_NEW_TOKENS_LIMIT = 1024
MAX_TEMPERATURE = 2.0
# Per request, i.e. per conversation (the page sends all of it every time). A PNG of a few KB can claim
# 10,000 x 10,000 pixels, so the bound is on decoded pixels, read from each header before anything is
# decoded; the model sees every image at a few hundred pixels across anyway.
MAX_IMAGES_PER_REQUEST = 16
MAX_PIXELS_PER_REQUEST = 50_000_000
# Clips per request, counted apart from images: each may decode up to data/video.py's MAX_DECODED_FRAMES.
MAX_VIDEOS_PER_REQUEST = 2
# What the page accepts; none of PIL's other formats (EPS would start Ghostscript) is ever opened.
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "WEBP")


class Upload(NamedTuple):
    """An uploaded image or clip: its name for messages, its encoded bytes, and whether it is a clip."""

    name: str
    data: bytes
    video: bool = False


def upload_bytes(upload: object, what: str) -> Upload:
    """An uploaded image or clip (``{"name": ..., "data": "data:image/...;base64,..."}``, a clip's
    ``data:video/...``): its name and encoded bytes."""
    if not isinstance(upload, dict) or not isinstance(upload.get("data"), str):
        raise HttpError(400, f"{what} must be an object with a base64 'data' URL")
    name = str(upload.get("name") or what)
    return Upload(name, data_url_bytes(upload["data"], name), upload["data"].startswith("data:video/"))


def data_url_bytes(url: str, name: str) -> bytes:
    """The bytes a base64 data URL (``data:image/png;base64,...``) carries."""
    header, _, payload = url.partition(",")
    if not header.startswith("data:") or not header.endswith(";base64"):
        raise HttpError(400, f"{name} is not sent as a base64 data URL", "invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise HttpError(400, f"{name} is not valid base64 ({err})", "invalid_image_url") from None


def image_pixels(data: bytes, name: str) -> int:
    """The pixel count an encoded image declares in its header; nothing is decoded."""
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:  # PIL's own ceiling, far above ours
        raise HttpError(413, f"{name} is too large to decode ({err})", "image_too_large") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise unreadable_image(name, err) from None
    return width * height


def unreadable_image(name: str, reason: object) -> HttpError:
    """The refusal of an image that PIL cannot read (or may not: only the upload formats are tried)."""
    return HttpError(400, f"{name} is not an image the server can read ({reason}); upload a PNG, JPEG, GIF or WebP", "invalid_image")


def decode_uploads(
    uploads: list[Upload], max_pixels: int = MAX_PIXELS_PER_REQUEST, read_video: Callable[[bytes], Video] | None = None
) -> list[Image.Image | Video]:
    """Uploaded images as RGB, converted as training converts images (:func:`~owl_lightning.data.images.decode_image`:
    transparency on white), once their headers show they hold at most ``max_pixels`` pixels together; uploaded
    clips as their sampled frames (``read_video``: :meth:`~owl_lightning.inference.OwlAssistant.read_video`)."""
    total = 0
    for name, data, video in uploads:
        if video:
            if read_video is None:
                raise HttpError(400, f"{name} is a video clip, and this server reads images only", "invalid_image")
            continue
        total += image_pixels(data, name)
        if total > max_pixels:
            raise HttpError(
                413,
                f"the images up to {name} hold {total:,} pixels, over the limit of {max_pixels:,}: send smaller images",
                "image_too_large",
            )
    decoded = []
    for name, data, video in uploads:
        try:
            decoded.append(read_video(data) if video else decode_image(data))
        except SkipSample as err:
            raise (unreadable_video(name, err) if video else unreadable_image(name, err)) from None
    return decoded


def unreadable_video(name: str, reason: object) -> HttpError:
    """The refusal of a clip that cannot be used (data/video.py's reasons: corrupt, unsupported, too long, ...)."""
    return HttpError(400, f"{name} is not a clip the server can use ({reason}); upload an MP4 (H.264), WebM or GIF", "invalid_video")


def check_video_count(uploads: list[Upload], max_videos: int, where: str) -> None:
    """413 once ``uploads`` hold more than ``max_videos`` clips."""
    if sum(upload.video for upload in uploads) > max_videos:
        raise HttpError(413, f"{where} brings the request over {max_videos} video clips: send fewer", "too_many_videos")


def read_conversation(
    messages: object,
    max_images: int = MAX_IMAGES_PER_REQUEST,
    max_pixels: int = MAX_PIXELS_PER_REQUEST,
    read_video: Callable[[bytes], Video] | None = None,
    max_videos: int = MAX_VIDEOS_PER_REQUEST,
) -> Request:
    """The page's messages (``role``, ``text``, user ``images``: images and clips) → a request whose user
    turns open with one ``<image>`` per image or clip they carry; the last message must be the user's.
    Everything is checked, image and clip counts and declared sizes included, before anything is decoded;
    ``read_video`` reads clips (None: clips are refused)."""
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty list")
    turns, uploads = [], []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("text", ""), str):
            raise HttpError(400, f"message {number} needs a role ({' or '.join(ROLES)}) and a text")
        text, images = message.get("text", ""), message.get("images") or []
        if IMAGE_TOKEN in text:
            raise HttpError(400, f"message {number} contains {IMAGE_TOKEN}, which stands for an image: reword it")
        if not is_encodable(text):
            raise HttpError(400, f"message {number} contains a lone surrogate (a broken character): reword it")
        if not isinstance(images, list) or (images and message["role"] != "user"):
            raise HttpError(400, f"message {number}: only the user's messages carry a list of images")
        if len(uploads) + len(images) > max_images:
            raise HttpError(413, f"message {number} brings the conversation over {max_images} images: start a new chat")
        if message["role"] == "user" and not text.strip() and not images:
            raise HttpError(400, f"message {number} is empty: type a question or add an image")
        uploads += [upload_bytes(upload, f"image {k} of message {number}") for k, upload in enumerate(images, start=1)]
        check_video_count(uploads, max_videos, f"message {number}")
        turns.append(user_turn(text, len(images)) if message["role"] == "user" else Turn(message["role"], text))
    if turns[-1].role != "user":
        raise HttpError(400, "the last message must be the user's")
    return Request(turns, decode_uploads(uploads, max_pixels, read_video))


def is_encodable(text: str) -> bool:
    """False for text with a lone surrogate (JSON can carry ``"\\ud800"``), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_number(body: dict, key: str, kind: type[int] | type[float], low: float, high: float, default: float) -> float:
    """``body[key]`` (or ``default``) as a JSON number of ``kind`` within [low, high]. Strict: ``true`` is not 1,
    and 2.5 is not a whole number of tokens (NaN and Infinity never get past the JSON parser)."""
    value = body.get(key, default)
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise HttpError(400, f"{key} must be {'a whole number' if kind is int else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise HttpError(400, f"{key} must be between {low} and {high}, got {value}")
    return kind(value)


class ChatApp(WebApp):
    """The chat page's server: answers a whole conversation with one assistant turn."""

    page = "demo.html"
    max_body_bytes = 64 << 20  # a few photos, base64-encoded

    def __init__(
        self,
        assistant: OwlAssistant,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        title: str = "",
        max_images: int = MAX_IMAGES_PER_REQUEST,
        max_pixels: int = MAX_PIXELS_PER_REQUEST,
        max_videos: int = MAX_VIDEOS_PER_REQUEST,
    ) -> None:
        self.assistant, self.title = assistant, title
        self.max_images, self.max_pixels, self.max_videos = max_images, max_pixels, max_videos
        self.defaults = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        # One generation at a time: the model is shared by every request (the API's batches take it too).
        self.generation_lock = threading.Lock()

    def get(self, path: str, query: dict[str, str]) -> object:
        if path == "/api/settings":
            return {**self.defaults, "max_new_tokens_limit": MAX_NEW_TOKENS_LIMIT, "max_temperature": MAX_TEMPERATURE, "title": self.title}
        return super().get(path, query)

    def post(self, path: str, body: dict) -> object:
        if path != "/api/chat":
            return super().post(path, body)
        max_new_tokens = read_number(body, "max_new_tokens", int, 1, MAX_NEW_TOKENS_LIMIT, self.defaults["max_new_tokens"])
        temperature = read_number(body, "temperature", float, 0.0, MAX_TEMPERATURE, self.defaults["temperature"])
        # Decoded under the lock too: one request's pixels in memory at a time, however many wait.
        with self.generation_lock:
            request = read_conversation(body.get("messages"), self.max_images, self.max_pixels, self.assistant.read_video, self.max_videos)
            started = time.perf_counter()
            try:
                answer = self.assistant.answer([request], max_new_tokens=max_new_tokens, temperature=temperature)[0]
            except SkipSample as skip:  # the prompt is longer than the model takes
                raise HttpError(400, f"{skip.detail}: start a new chat (or use fewer images)") from None
        return {"answer": answer, "seconds": round(time.perf_counter() - started, 2)}
