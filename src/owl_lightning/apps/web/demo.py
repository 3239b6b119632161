"""``owl-lightning serve``: chat with a model about uploaded images in a browser.

The page keeps the conversation and sends all of it with every message (images as data URLs), so
the server holds no sessions: a reload starts a new chat, and two tabs never mix their histories.
A message may carry images; their placeholders open that message, as in training.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time

from PIL import Image

from owl_lightning.apps.web import HttpError, WebApp
from owl_lightning.config import IMAGE_TOKEN
from owl_lightning.data.health import SkipSample
from owl_lightning.data.images import decode_image
from owl_lightning.data.template import ROLES, Turn
from owl_lightning.inference import OwlAssistant, Request

MAX_NEW_TOKENS_LIMIT = 1024
MAX_TEMPERATURE = 2.0


def decode_upload(upload: object, what: str) -> Image.Image:
    """An uploaded image (``{"name": ..., "data": "data:image/...;base64,..."}``) as RGB, converted as
    training converts images (:func:`~owl_lightning.data.images.decode_image`: transparency on white)."""
    if not isinstance(upload, dict) or not isinstance(upload.get("data"), str):
        raise HttpError(400, f"{what} must be an object with a base64 'data' URL")
    name = upload.get("name") or what
    header, _, payload = upload["data"].partition(",")
    if not header.startswith("data:") or not header.endswith(";base64"):
        raise HttpError(400, f"{name} is not sent as a base64 data URL")
    try:
        return decode_image(base64.b64decode(payload, validate=True))
    except (binascii.Error, SkipSample) as err:
        raise HttpError(400, f"{name} is not an image the server can read ({err}); upload a PNG, JPEG, GIF or WebP") from None


def read_conversation(messages: object) -> Request:
    """The page's messages (``role``, ``text``, user ``images``) → a request whose user turns open with
    one ``<image>`` per image they carry; the last message must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty list")
    turns, images = [], []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("text", ""), str):
            raise HttpError(400, f"message {number} needs a role ({' or '.join(ROLES)}) and a text")
        text, uploads = message.get("text", ""), message.get("images") or []
        if IMAGE_TOKEN in text:
            raise HttpError(400, f"message {number} contains {IMAGE_TOKEN}, which stands for an image: reword it")
        if not isinstance(uploads, list) or (uploads and message["role"] != "user"):
            raise HttpError(400, f"message {number}: only the user's messages carry a list of images")
        decoded = [decode_upload(upload, f"image {k} of message {number}") for k, upload in enumerate(uploads, start=1)]
        if message["role"] == "user" and not text.strip() and not decoded:
            raise HttpError(400, f"message {number} is empty: type a question or add an image")
        turns.append(Turn(message["role"], IMAGE_TOKEN * len(decoded) + ("\n" if decoded else "") + text))
        images += decoded
    if turns[-1].role != "user":
        raise HttpError(400, "the last message must be the user's")
    return Request(turns, images)


def _number(body: dict, key: str, kind: type, low: float, high: float, default: float):
    value = body.get(key, default)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise HttpError(400, f"{key} must be a number, got {value!r}") from None
    if not low <= number <= high:
        raise HttpError(400, f"{key} must be between {low} and {high}, got {number}")
    return number


class ChatApp(WebApp):
    """The chat page's server: answers a whole conversation with one assistant turn."""

    page = "demo.html"
    max_body_bytes = 64 << 20  # a few photos, base64-encoded

    def __init__(self, assistant: OwlAssistant, max_new_tokens: int = 128, temperature: float = 0.0, title: str = "") -> None:
        self.assistant, self.title = assistant, title
        self.defaults = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        self._lock = threading.Lock()  # one generation at a time: the model is shared by every request

    def get(self, path: str, query: dict[str, str]) -> object:
        if path == "/api/settings":
            return {**self.defaults, "max_new_tokens_limit": MAX_NEW_TOKENS_LIMIT, "max_temperature": MAX_TEMPERATURE, "title": self.title}
        return super().get(path, query)

    def post(self, path: str, body: dict) -> object:
        if path != "/api/chat":
            return super().post(path, body)
        request = read_conversation(body.get("messages"))
        max_new_tokens = _number(body, "max_new_tokens", int, 1, MAX_NEW_TOKENS_LIMIT, self.defaults["max_new_tokens"])
        temperature = _number(body, "temperature", float, 0.0, MAX_TEMPERATURE, self.defaults["temperature"])
        with self._lock:
            started = time.perf_counter()
            try:
                answer = self.assistant.answer([request], max_new_tokens=max_new_tokens, temperature=temperature)[0]
            except SkipSample as skip:  # the prompt is longer than the model takes
                raise HttpError(400, f"{skip.detail}: start a new chat (or use fewer images)") from None
        return {"answer": answer, "seconds": round(time.perf_counter() - started, 2)}
