"""``owl-lightning serve``'s OpenAI-compatible API: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Any OpenAI client talks to a trained model with ``base_url="http://127.0.0.1:7860/v1"`` and the key
``serve`` prints. Requests keep the chat page's bounds: loopback Host only, no foreign Origin, JSON
bodies with a strict Content-Length under 64 MiB, socket timeouts, and at most 16 images and 50
megapixels a request, counted from the image headers before anything is decoded. Instead of the
page's token they carry ``Authorization: Bearer KEY``: an API client has no page to read a token from.

Images come as ``image_url`` parts: data URLs always; http(s) URLs only when ``--allow-image-urls``
lets the server fetch them (with a timeout, within the request's byte cap). Video clips come as
``video_url`` parts (``{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}``, as vLLM
takes them), at most 2 a request, read within data/video.py's bounds (docs/video.md). A message's images open
it, one placeholder each, as in training and on the chat page; system (and developer) messages
replace the template's system line, as a system turn does in the instruction data. Errors have
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so clients raise their usual
exceptions (a wrong key: ``openai.AuthenticationError``).

Requests are answered in shared batches (:mod:`.batching`); ``stream: true`` sends the answer as
``chat.completion.chunk`` server-sent events while its batch generates.
"""

from __future__ import annotations

import http.client
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from urllib.parse import unquote, urlsplit

from owl_lightning.apps.web import EventStream, HttpError, check_json_content, secret_matches
from owl_lightning.apps.web.batching import GenerationBatcher, PendingAnswer
from owl_lightning.apps.web.demo import (
    MAX_NEW_TOKENS_LIMIT,
    MAX_TEMPERATURE,
    MAX_VIDEOS_PER_REQUEST,
    ChatApp,
    Upload,
    data_url_bytes,
    decode_uploads,
    is_encodable,
    read_number,
)
from owl_lightning.config import IMAGE_TOKEN
from owl_lightning.data.collate import EncodedSample
from owl_lightning.data.health import SkipSample
from owl_lightning.data.template import Turn
from owl_lightning.inference import Generation, OwlAssistant, Request, Sampling, user_turn

API_PREFIX = "/v1/"
# Where `serve` takes a fixed key from when --api-key is not given (a command line is visible to `ps`).
API_KEY_ENV = "OWL_LIGHTNING_API_KEY"
IMAGE_FETCH_TIMEOUT_S = 10.0  # for one image, connection to last byte
SYSTEM_ROLES = ("system", "developer")  # "developer" is what newer OpenAI models call the system message
# Parameters this server cannot honour, with the values that ask for nothing (some clients send them by
# default): any other value is refused by name rather than quietly ignored.
NEUTRAL_VALUES: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "stop": ([], ""),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "seed": (),
    "modalities": (["text"],),
    "audio": (),
}


def new_api_key() -> str:
    """A key for one launch of the server."""
    return "owl-" + secrets.token_urlsafe(32)


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )


@dataclass
class ChatCompletionRequest:
    """A checked ``/v1/chat/completions`` body. ``images`` are ``(name, url, is a clip)`` in placeholder order,
    not yet read."""

    model: str
    turns: list[Turn]
    system: str | None
    images: list[tuple[str, str, bool]]
    sampling: Sampling
    stream: bool
    include_usage: bool


def read_chat_completion_request(
    body: dict, defaults: Sampling, max_images: int, max_videos: int = MAX_VIDEOS_PER_REQUEST
) -> ChatCompletionRequest:
    """A chat-completions body → :class:`ChatCompletionRequest`, or an :class:`HttpError` naming what is wrong.
    ``defaults`` fill ``max_tokens`` and ``temperature`` when absent; ``null`` counts as absent, as in OpenAI's API."""
    body = {key: value for key, value in body.items() if value is not None}
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HttpError(400, "'model' must name the served model (GET /v1/models lists it)", "missing_model")
    for key, neutral in NEUTRAL_VALUES.items():
        if key in body and body[key] not in neutral:
            raise HttpError(400, f"{key}={body[key]!r:.60} is not supported by this server: leave {key} out", "unsupported_parameter")
    # max_tokens is the older name of max_completion_tokens; OpenAI's clients still send either.
    length_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    sampling = Sampling(
        max_new_tokens=read_number(body, length_key, int, 1, MAX_NEW_TOKENS_LIMIT, defaults.max_new_tokens),
        temperature=read_number(body, "temperature", float, 0.0, MAX_TEMPERATURE, defaults.temperature),
        top_p=read_number(body, "top_p", float, 0.0, 1.0, defaults.top_p),
    )
    stream, options = body.get("stream", False), body.get("stream_options", {})
    if not isinstance(stream, bool):
        raise HttpError(400, f"stream must be true or false, got {stream!r:.60}")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise HttpError(400, 'stream_options must be an object like {"include_usage": true}')
    if options and not stream:
        raise HttpError(400, "stream_options applies only with stream=true: leave it out or set stream")
    turns, system, images = read_messages(body.get("messages"), max_images, max_videos)
    return ChatCompletionRequest(model, turns, system, images, sampling, stream, options.get("include_usage", False))


def read_messages(
    messages: object, max_images: int, max_videos: int = MAX_VIDEOS_PER_REQUEST
) -> tuple[list[Turn], str | None, list[tuple[str, str, bool]]]:
    """OpenAI messages → the conversation's turns, its system text (None: the template's own) and its images
    and clips as ``(name, url, is a clip)``. The last message must be the user's; only user messages carry
    images and clips."""
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty list of {role, content} objects")
    turns, system_texts, images = [], [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in (*SYSTEM_ROLES, "user", "assistant"):
            raise HttpError(400, f"{where} has role {role!r}: this server reads system, developer, user and assistant messages (no tools)")
        if message.get("tool_calls") or message.get("function_call"):
            raise HttpError(400, f"{where} carries tool calls: this model has no tools", "unsupported_parameter")
        text, urls = read_content(message.get("content"), where, images_allowed=role == "user")
        if role in SYSTEM_ROLES:
            if text.strip():  # as the instruction readers do: an empty system message adds nothing
                system_texts.append(text.strip())
            continue
        if role == "user" and not text.strip() and not urls:
            raise HttpError(400, f"{where} is empty: give it text or an image")
        images += [
            (f"{'video' if video else 'image'} {number} of {where}", url, video) for number, (url, video) in enumerate(urls, start=1)
        ]
        if sum(not video for _, _, video in images) > max_images:
            raise HttpError(413, f"{where} brings the request over {max_images} images: send fewer", "too_many_images")
        if sum(video for _, _, video in images) > max_videos:
            raise HttpError(413, f"{where} brings the request over {max_videos} video clips: send fewer", "too_many_videos")
        turns.append(user_turn(text, len(urls)) if role == "user" else Turn("assistant", text))
    if not turns or turns[-1].role != "user":
        raise HttpError(400, "the last message must be the user's: it is the one the model answers")
    return turns, "\n".join(system_texts) or None, images


def read_content(content: object, where: str, images_allowed: bool) -> tuple[str, list[tuple[str, bool]]]:
    """A message's ``content`` (a string, or a list of ``text``, ``image_url`` and ``video_url`` parts) → its
    text, the text parts joined by newlines, and its image and clip URLs in order, each with whether it is a clip."""
    if isinstance(content, str):
        texts, urls = [content], []
    elif isinstance(content, list):
        texts, urls = [], []
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "video_url") and images_allowed:
                media = part.get(kind)
                if not isinstance(media, dict) or not isinstance(media.get("url"), str):
                    example = "data:video/mp4;base64,..." if kind == "video_url" else "data:image/png;base64,..."
                    raise HttpError(400, f'{where}.content[{index}].{kind} must be an object {{"url": "{example}"}}')
                urls.append((media["url"], kind == "video_url"))
            elif kind in ("image_url", "video_url"):
                what = "a video clip" if kind == "video_url" else "an image"
                raise HttpError(400, f"{where}.content[{index}] is {what}: only user messages carry images and clips")
            else:
                raise HttpError(400, f"{where}.content[{index}] must be a text, image_url or video_url part, got {kind or part!r:.60}")
    else:
        raise HttpError(400, f"{where}.content must be a string or a list of text, image_url and video_url parts")
    text = "\n".join(texts)
    if IMAGE_TOKEN in text:
        raise HttpError(400, f"{where} contains {IMAGE_TOKEN}, which stands for an image: send images as image_url parts")
    if not is_encodable(text):
        raise HttpError(400, f"{where} contains a lone surrogate (a broken character): reword it")
    return text, urls


def image_bytes(url: str, name: str, allow_web: bool, max_bytes: int) -> bytes:
    """The encoded image an ``image_url`` names: a base64 data URL, or (when ``allow_web``) an http(s) URL
    fetched within ``max_bytes`` and :data:`IMAGE_FETCH_TIMEOUT_S`."""
    if url.startswith("data:"):
        return data_url_bytes(url, name)
    scheme = urlsplit(url[:2048]).scheme.lower()
    if scheme not in ("http", "https"):
        raise HttpError(400, f"{name} must be a data: URL (or an http(s) one), not {url[:60]!r}", "invalid_image_url")
    if not allow_web:
        raise HttpError(
            400,
            f"{name} is a web address ({url[:80]}), and this server fetches none unless started with --allow-image-urls: "
            "send the image inline as a data URL (data:image/png;base64,...)",
            "image_url_not_allowed",
        )
    return fetch_image(url, name, max_bytes)


class _WebOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only: a fetched address must not lead to ftp: (urllib's default allows it)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise HttpError(400, f"{req.full_url} redirects to {newurl[:80]!r}, which is not an http(s) address", "invalid_image_url")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(url: str, name: str, max_bytes: int, timeout_s: float = IMAGE_FETCH_TIMEOUT_S) -> bytes:
    """The bytes at an http(s) ``url``: at most ``max_bytes``, all within ``timeout_s`` (a server that sends a
    byte now and then cannot hold the request longer)."""
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(_WebOnlyRedirects)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "owl-lightning"}), timeout=timeout_s) as response:
            data = bytearray()
            while chunk := response.read1(1 << 16):  # whatever one read brings, so the deadline is checked between reads
                data += chunk
                if len(data) > max_bytes:
                    raise HttpError(
                        413,
                        f"{name} ({url[:80]}) is over the {max_bytes / 2**20:.0f} MiB left for this request's images",
                        "image_too_large",
                    )
                if time.monotonic() > deadline:
                    raise HttpError(
                        400, f"{name} ({url[:80]}) did not arrive within {timeout_s:g} s: send it as a data URL", "image_url_timeout"
                    )
            return bytes(data)
    except urllib.error.HTTPError as err:
        raise HttpError(400, f"{name}: {url[:80]} answered HTTP {err.code} {err.reason}", "image_url_unreachable") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise HttpError(400, f"{name}: cannot fetch {url[:80]} ({reason}): send it as a data URL", "image_url_unreachable") from None


class TextDeltas:
    """An answer's text in pieces as its tokens come. The pieces join up to exactly the whole answer's text:
    the last word is held back until the next whitespace, because a later token can still change it (an
    unfinished multi-byte character, a tokenizer's clean-up of the space before punctuation)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode, self.sent = decode, ""

    def next(self, tokens: list[int], final: bool) -> str:
        """The text to send after ``tokens`` (all of the answer so far; ``final``: all of it)."""
        text = self.decode(tokens)
        if not final:
            settled = re.match(r"(.*)\s", text, re.DOTALL)  # up to the last whitespace
            text = settled.group(1) if settled else ""
        if not text.startswith(self.sent):  # a settled piece changed after all: keep it, and the rest, for the end
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def usage(prompt_tokens: int, generation: Generation) -> dict:
    """OpenAI's token counts: the prompt's (visual tokens included) and the answer's decoding steps (its EOS included)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generation.steps, "total_tokens": prompt_tokens + generation.steps}


class OpenAIApp(ChatApp):
    """``serve``'s app: the chat page (:class:`~owl_lightning.apps.web.demo.ChatApp`) and, under ``/v1/``, the
    OpenAI chat-completions API on the same model, which answers concurrent requests in shared batches.

    Args:
        assistant: the model.
        model_name: the ``model`` clients name (``GET /v1/models`` lists it).
        api_key: the key clients send as ``Authorization: Bearer KEY`` (None: a new one, printed at start).
        allow_image_urls: fetch http(s) image URLs (off: only data URLs).
        max_batch, batch_window_s: see :class:`~owl_lightning.apps.web.batching.GenerationBatcher`.
        chat_settings: the chat page's (defaults for ``max_tokens`` and ``temperature``, image caps, title).
    """

    def __init__(
        self,
        assistant: OwlAssistant,
        model_name: str,
        api_key: str | None = None,
        allow_image_urls: bool = False,
        max_batch: int = 8,
        batch_window_s: float = 0.02,
        **chat_settings,
    ) -> None:
        super().__init__(assistant, **chat_settings)
        if api_key is not None and not api_key.strip():
            raise ValueError(f"the API key is empty: pass a non-empty --api-key or ${API_KEY_ENV}, or neither for a new key")
        self.model_name, self.allow_image_urls = model_name, allow_image_urls
        self.api_key_given = api_key is not None
        self.api_key = api_key or new_api_key()
        self.batcher = GenerationBatcher(assistant, max_batch, batch_window_s, self.generation_lock)
        # A full batch needs a connection per request, and the chat page a few more.
        self.max_workers = max(self.max_workers, 2 * max_batch)
        self.created = int(time.time())
        self._decode_lock = threading.Lock()  # one request's decoded pixels in memory at a time

    # -- the web package's hooks -------------------------------------------------------------------

    def authorize(self, method: str, path: str, headers: Message, token: str) -> None:
        if not path.startswith(API_PREFIX):
            return super().authorize(method, path, headers, token)
        scheme, _, key = headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret_matches(key.strip(), self.api_key):
            raise HttpError(
                401,
                "send the key `owl-lightning serve` printed at start as 'Authorization: Bearer KEY' (api_key= in OpenAI's clients)",
                "invalid_api_key",
            )
        if method != "GET":
            check_json_content(headers)

    def error_body(self, path: str, error: HttpError) -> object:
        if not path.startswith(API_PREFIX):
            return super().error_body(path, error)
        return {"error": {"message": error.message, "type": error_type(error.status), "param": None, "code": error.code}}

    def startup_lines(self, url: str) -> list[str]:
        key = f"(the one given: --api-key or ${API_KEY_ENV})" if self.api_key_given else self.api_key
        images = "data: and http(s) URLs" if self.allow_image_urls else "data: URLs (--allow-image-urls for http(s))"
        return [
            f"OpenAI API: base_url={url}v1  api_key={key}  model={self.model_name}",
            f"  up to {self.batcher.max_batch} requests answered together; images as {images}",
        ]

    def close(self) -> None:
        self.batcher.close()
        super().close()

    # -- the API -----------------------------------------------------------------------------------

    def get(self, path: str, query: dict[str, str]) -> object:
        if path == "/v1/models":
            return {"object": "list", "data": [self._model_card()]}
        if path.startswith("/v1/models/"):
            self._check_model(unquote(path.removeprefix("/v1/models/")))
            return self._model_card()
        return super().get(path, query)

    def post(self, path: str, body: dict) -> object:
        if path != "/v1/chat/completions":
            return super().post(path, body)
        defaults = Sampling(self.defaults["max_new_tokens"], self.defaults["temperature"])
        chat = read_chat_completion_request(body, defaults, self.max_images, self.max_videos)
        self._check_model(chat.model)
        uploads = self._image_bytes(chat)
        with self.batcher.preparing():
            sample = self._encode(chat, uploads)
            pending = self.batcher.submit(sample, chat.sampling)
        prompt_tokens = self.assistant.prompt_tokens(sample)
        if chat.stream:
            return EventStream(self._chunks(chat, pending, prompt_tokens))
        generation = pending.result()
        message = {"role": "assistant", "content": self.assistant.decode(generation.tokens)}
        return {
            **self._head("chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": generation.finish_reason}],
            "usage": usage(prompt_tokens, generation),
        }

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise HttpError(404, f"this server serves the model {self.model_name!r}, not {name!r}", "model_not_found")

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "owl_lightning"}

    def _head(self, kind: str) -> dict:
        return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": kind, "created": int(time.time()), "model": self.model_name}

    def _image_bytes(self, chat: ChatCompletionRequest) -> list[Upload]:
        """The request's images and clips, encoded: fetched (if allowed) within the body's byte cap."""
        uploads, bytes_left = [], self.max_body_bytes
        for name, url, video in chat.images:
            data = image_bytes(url, name, self.allow_image_urls, bytes_left)
            uploads.append(Upload(name, data, video))
            bytes_left -= len(data)
        return uploads

    def _encode(self, chat: ChatCompletionRequest, uploads: list[Upload]) -> EncodedSample:
        """The prompt as the model takes it, once the images' headers show they are within the pixel cap
        (clips: within data/video.py's bounds as they are decoded)."""
        with self._decode_lock:
            images = decode_uploads(uploads, self.max_pixels, self.assistant.read_video)
            try:
                return self.assistant.encode(Request(chat.turns, images, chat.system))
            except SkipSample as skip:
                raise HttpError(400, f"{skip.detail}: send a shorter conversation or fewer images", "context_length_exceeded") from None

    def _chunks(self, chat: ChatCompletionRequest, pending: PendingAnswer, prompt_tokens: int) -> Iterator[dict]:
        """The answer as ``chat.completion.chunk`` objects while it is generated; its generation stops if the
        client leaves (the web package closes this generator)."""
        head = self._head("chat.completion.chunk")

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        try:
            yield chunk({"role": "assistant", "content": ""})
            pieces, tokens, finish_reason = TextDeltas(self.assistant.decode), [], None
            while finish_reason is None:
                tokens, finish_reason = pending.progress(len(tokens))
                if delta := pieces.next(tokens, final=finish_reason is not None):
                    yield chunk({"content": delta})
            generation = pending.result()
            yield chunk({}, generation.finish_reason)
            if chat.include_usage:
                yield {**head, "choices": [], "usage": usage(prompt_tokens, generation)}
        finally:
            pending.cancel()  # nothing once the answer has ended
