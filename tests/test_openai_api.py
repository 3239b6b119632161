"""``serve``'s OpenAI-compatible API, driven by the official ``openai`` client against a local server.

The model is owl-tiny (random weights, byte tokenizer: only the mechanics are checked) except where a
stand-in that generates slowly and predictably makes timing observable (batching, a client leaving).
"""

import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import torch
from PIL import Image

from owl_lightning.apps.web import TOKEN_HEADER, HttpError, running
from owl_lightning.apps.web.batching import GenerationBatcher
from owl_lightning.apps.web.openai_api import OpenAIApp, TextDeltas, fetch_image
from owl_lightning.cli import main
from owl_lightning.config import IGNORE_INDEX, IMAGE_TOKEN
from owl_lightning.data.collate import EncodedSample
from owl_lightning.inference import Generation, OwlAssistant, Request, Sampling, _AnswerSampling
from tests.helpers import COLOURS, png_bytes

MODEL = "owl-tiny-test"
KEY = "test-key"
WAIT_S = 60


@pytest.fixture
def assistant(tiny_model, tiny_tokenizer):
    return OwlAssistant(tiny_model, tiny_tokenizer, precision="fp32")


@pytest.fixture
def recorded(assistant, monkeypatch):
    """The assistant, with every batch it generates recorded: its requests (as encoded), settings and results."""
    batches, encoded = [], {}
    encode, generate = assistant.encode, assistant.generate

    def encode_recorded(request, template=None):
        sample = encode(request, template)
        encoded[id(sample)] = request
        return sample

    def generate_recorded(samples, samplings, listener=None):
        generations = generate(samples, samplings, listener)
        batches.append(([encoded[id(s)] for s in samples], samplings, generations))
        return generations

    monkeypatch.setattr(assistant, "encode", encode_recorded)
    monkeypatch.setattr(assistant, "generate", generate_recorded)
    return assistant, batches


@contextmanager
def api(assistant, **settings):
    """A running ``serve`` app and an OpenAI client for it."""
    app = OpenAIApp(assistant, model_name=MODEL, api_key=KEY, **settings)
    with running(app) as server:
        yield server, openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=WAIT_S)


def data_url(colour: str, size: int = 32) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(colour, size)).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def square(colour: str) -> Image.Image:
    return Image.new("RGB", (32, 32), COLOURS[colour])


def raw(server, path: str, body: object = None, headers: dict | None = None) -> tuple[int, dict]:
    """A request with urllib (the API's key, JSON): status and JSON answer, errors included."""
    sent = {"Authorization": f"Bearer {KEY}", **({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data, {k: v for k, v in sent.items() if v is not None})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# -- requests and answers ------------------------------------------------------------------------


def test_models_list_names_the_served_model(assistant):
    with api(assistant) as (_, client):
        assert [model.id for model in client.models.list()] == [MODEL]
        assert client.models.retrieve(MODEL).owned_by == "owl_lightning"
        with pytest.raises(openai.NotFoundError, match="serves the model"):
            client.models.retrieve("gpt-4o")


def test_an_image_as_a_data_url_is_answered_as_the_assistant_answers_it(recorded):
    assistant, batches = recorded
    with api(assistant) as (_, client):
        content = [{"type": "text", "text": "What colour is it?"}, image_part(data_url("red"))]
        response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=6)
    (request,), (sampling,), (generation,) = batches[0]
    assert request.turns[0].content == f"{IMAGE_TOKEN}\nWhat colour is it?" and request.images[0].getpixel((0, 0)) == COLOURS["red"]
    assert sampling == Sampling(6, 0.0, 1.0)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-") and response.model == MODEL
    choice = response.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == assistant.answer([Request.single("What colour is it?", [square("red")])], max_new_tokens=6)[0]
    assert choice.finish_reason == generation.finish_reason and choice.finish_reason in ("stop", "length")
    prompt_tokens = assistant.template.expanded_length(assistant.encode(request).input_ids)
    assert response.usage.prompt_tokens == prompt_tokens > assistant.model.visual_tokens_per_image
    assert response.usage.completion_tokens == generation.steps <= 6
    assert response.usage.total_tokens == prompt_tokens + generation.steps


def test_streaming_sends_the_answer_in_chunks_that_join_up_to_it(recorded):
    assistant, batches = recorded
    with api(assistant) as (_, client):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [image_part(data_url("blue")), {"type": "text", "text": "Describe it."}]}],
            max_completion_tokens=24,
            temperature=1.0,  # a random model answers greedily with one byte over and over; sampled bytes make words
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    (_,), (sampling,), (generation,) = batches[0]
    assert sampling == Sampling(24, 1.0, 1.0)
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"} and len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, last, usage = chunks
    assert "".join(chunk.choices[0].delta.content or "" for chunk in content_chunks) == assistant.decode(generation.tokens)
    assert last.choices[0].finish_reason == generation.finish_reason and not last.choices[0].delta.content
    assert usage.choices == [] and usage.usage.completion_tokens == generation.steps


def test_two_images_over_two_turns_and_a_system_message_reach_the_template(recorded):
    assistant, batches = recorded
    messages = [
        {"role": "system", "content": "You describe colours."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image_part(data_url("red"))]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [image_part(data_url("blue")), {"type": "text", "text": "Compare"}, {"type": "text", "text": "them."}]},
    ]
    with api(assistant) as (_, client):
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5).choices[0].message.content
    (request,), _, _ = batches[0]
    assert [(turn.role, turn.content) for turn in request.turns] == [
        ("user", f"{IMAGE_TOKEN}\nAnd this one?"),
        ("assistant", "Red."),
        ("user", f"{IMAGE_TOKEN}\nCompare\nthem."),
    ]
    assert request.system == "You describe colours."
    assert [image.getpixel((0, 0)) for image in request.images] == [COLOURS["red"], COLOURS["blue"]]
    assert answer == assistant.answer([request], max_new_tokens=5)[0]
    prompt = assistant.tokenizer.decode(assistant.encode(request).input_ids)
    assert "You describe colours." in prompt and "curious human" not in prompt  # it replaces the template's system line


def test_concurrent_requests_share_a_batch_and_each_gets_its_own_answer(recorded):
    assistant, batches = recorded
    questions = [("What colour is it?", "red"), ("Is it blue?", "blue"), ("Say something.", None), ("Name it.", "green")]

    def ask(question, colour):
        content = [{"type": "text", "text": question}] + ([image_part(data_url(colour))] if colour else [])
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8)

    # The batch closes as soon as it is full, so the long window only guards against a slow thread start.
    with api(assistant, max_batch=4, batch_window_s=10.0) as (_, client), ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda qc: ask(*qc), questions))
    assert [len(requests) for requests, _, _ in batches] == [4]
    for (question, colour), response in zip(questions, responses, strict=True):
        alone = assistant.answer([Request.single(question, [square(colour)] if colour else [])], max_new_tokens=8)[0]
        assert response.choices[0].message.content == alone


def test_greedy_and_sampled_answers_of_different_lengths_share_a_batch(assistant):
    samples = [assistant.encode(Request.single(q)) for q in ("What is it?", "Say more about it, please.", "What is it?")]
    samplings = [Sampling(8), Sampling(8, temperature=1.5, top_p=0.9), Sampling(3)]
    together = assistant.generate(samples, samplings)
    alone = assistant.generate(samples[:1], samplings[:1])[0]
    assert together[0].tokens == alone.tokens  # the greedy answer is not disturbed by its sampled neighbour
    assert together[2].tokens == alone.tokens[: len(together[2].tokens)] and together[2].steps <= 3
    assert [g.finish_reason in ("stop", "length") for g in together] == [True] * 3


def test_per_answer_sampling_keeps_the_argmax_or_the_nucleus():
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3)
    processor = _AnswerSampling([Sampling(temperature=0.0), Sampling(temperature=1.0, top_p=0.7), Sampling(temperature=2.0)], "cpu")
    scores = processor(torch.zeros(3, 1, dtype=torch.long), probabilities.log())
    assert torch.isfinite(scores).tolist() == [[True, False, False, False], [True, True, False, False], [True] * 4]
    assert torch.allclose(scores[2], probabilities[2].log() / 2)


def test_stream_pieces_hold_back_what_a_later_token_can_change():
    # An unfinished character decodes as U+FFFD; a tokenizer's clean-up drops the space before "n't" and ".".
    texts = ["Hello", "Hello wor", "Hello world \ufffd", "Hello world do n", "Hello world don't", "Hello world don't ."]
    final = "Hello world don't."
    pieces = TextDeltas(lambda tokens: final if len(tokens) == len(texts) else texts[len(tokens) - 1])
    sent = [pieces.next(list(range(n)), final=n == len(texts)) for n in range(1, len(texts) + 1)]
    assert sent == ["", "Hello", " world", " do", "", "n't."] and "".join(sent) == final


# -- refusals, in OpenAI's error shape --------------------------------------------------------------


def test_a_wrong_or_missing_key_is_refused_with_401(assistant):
    with api(assistant) as (server, _):
        client = openai.OpenAI(base_url=server.url + "v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="Authorization: Bearer KEY"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        status, answer = raw(server, "v1/models", headers={"Authorization": None})
        assert status == 401 and answer["error"]["type"] == "authentication_error" and answer["error"]["code"] == "invalid_api_key"
        # The chat page's token is no key, and the key does not open the page's API.
        assert raw(server, "v1/models", headers={"Authorization": None, TOKEN_HEADER: server.token})[0] == 401
        status, answer = raw(server, "api/chat", {"messages": [{"role": "user", "text": "hi"}]})
        assert status == 403 and TOKEN_HEADER in answer["error"]


@pytest.mark.parametrize(
    "headers",
    [{"Host": "evil.example:{port}"}, {"Origin": "http://evil.example"}, {"Origin": "null"}],
    ids=["host", "origin", "null-origin"],
)
def test_the_api_answers_only_its_own_loopback_address_and_no_other_site(assistant, headers):
    with api(assistant) as (server, _):
        sent = {name: value.format(port=server.server_port) for name, value in headers.items()}
        for path, body in (("v1/models", None), ("v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})):
            status, answer = raw(server, path, body, sent)
            assert status == 403 and answer["error"]["type"] == "permission_error"


@pytest.mark.parametrize(
    "change, status, code, message",
    [
        ({"model": "gpt-4o"}, 404, "model_not_found", f"this server serves the model '{MODEL}', not 'gpt-4o'"),
        ({"n": 2}, 400, "unsupported_parameter", "n=2 is not supported by this server"),
        ({"stop": ["\n"]}, 400, "unsupported_parameter", "stop=['\\n'] is not supported"),
        ({"max_tokens": 0}, 400, None, "max_tokens must be between 1 and 1024"),
        ({"temperature": 3}, 400, None, "temperature must be between 0.0 and 2.0"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            400,
            None,
            "the last message must be the user's",
        ),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "1"}]}, 400, None, "messages[0] has role 'tool'"),
        ({"messages": [{"role": "user", "content": "what is <image>?"}]}, 400, None, "messages[0] contains <image>"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            400,
            None,
            "messages[0].content[0] must be a text, image_url or video_url part",
        ),
        (
            {"messages": [{"role": "assistant", "content": [image_part("data:,")]}, {"role": "user", "content": "x"}]},
            400,
            None,
            "only user",
        ),
        (
            {"messages": [{"role": "user", "content": [image_part("file:///etc/passwd")]}]},
            400,
            "invalid_image_url",
            "image 1 of messages[0]",
        ),
        (
            {"messages": [{"role": "user", "content": [image_part("data:image/png;base64,!!")]}]},
            400,
            "invalid_image_url",
            "not valid base64",
        ),
        ({"messages": [{"role": "user", "content": [image_part("data:image/png;base64,AAAA")]}]}, 400, "invalid_image", "not an image"),
        ({"stream_options": {"include_usage": True}}, 400, None, "stream_options applies only with stream=true"),
    ],
)
def test_bad_requests_get_openais_error_shape_naming_the_problem(recorded, change, status, code, message):
    assistant, batches = recorded
    with api(assistant) as (server, _):
        got, answer = raw(server, "v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **change})
    assert got == status and message in answer["error"]["message"] and answer["error"]["code"] == code
    assert answer["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error") and not batches


def test_images_and_pixels_per_request_are_capped_as_on_the_chat_page(recorded):
    assistant, batches = recorded
    with api(assistant, max_pixels=3 * 32 * 32) as (server, _):
        seventeen = [{"role": "user", "content": [image_part(data_url("red"))] * 17}]
        status, answer = raw(server, "v1/chat/completions", {"model": MODEL, "messages": seventeen})
        assert status == 413 and answer["error"]["code"] == "too_many_images" and "over 16 images" in answer["error"]["message"]
        four = [{"role": "user", "content": [image_part(data_url("red"))] * 4}]
        status, answer = raw(server, "v1/chat/completions", {"model": MODEL, "messages": four})
        assert status == 413 and answer["error"]["code"] == "image_too_large" and "over the limit of 3,072" in answer["error"]["message"]
    assert not batches


# -- images by URL ----------------------------------------------------------------------------------


@pytest.fixture
def image_site():
    """A local web server with /red.png, /huge.png (64 MiB) and /slow.png (a byte every 0.1 s)."""

    class Pictures(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/red.png":
                body = png_bytes("red")
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/huge.png":
                self.send_response(200)
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"\0" * (1 << 20))
            elif self.path == "/slow.png":
                self.send_response(200)
                self.end_headers()
                for byte in png_bytes("red")[:30]:
                    self.wfile.write(bytes([byte]))
                    time.sleep(0.1)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_a_web_image_url_is_refused_unless_the_server_allows_them(recorded, image_site):
    assistant, batches = recorded
    messages = [{"role": "user", "content": [{"type": "text", "text": "What colour?"}, image_part(f"{image_site}/red.png")]}]
    with api(assistant) as (_, client):
        with pytest.raises(openai.BadRequestError, match="--allow-image-urls") as refused:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert refused.value.code == "image_url_not_allowed" and not batches
    with api(assistant, allow_image_urls=True) as (_, client):
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3).choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="answered HTTP 404"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [image_part(f"{image_site}/gone.png")]}])
    (request,), _, _ = batches[0]
    assert request.images[0].getpixel((0, 0)) == COLOURS["red"]
    assert answer == assistant.answer([Request.single("What colour?", [square("red")])], max_new_tokens=3)[0]


def test_a_fetched_image_is_cut_off_at_the_requests_byte_cap(assistant, image_site):
    with api(assistant, allow_image_urls=True) as (server, _):
        server.app.max_body_bytes = 1 << 20
        messages = [{"role": "user", "content": [image_part(f"{image_site}/huge.png")]}]
        status, answer = raw(server, "v1/chat/completions", {"model": MODEL, "messages": messages})
    assert status == 413 and answer["error"]["code"] == "image_too_large" and "over the 1 MiB left" in answer["error"]["message"]


def test_fetching_an_image_has_a_deadline_however_the_bytes_trickle(image_site):
    started = time.monotonic()
    with pytest.raises(HttpError, match="did not arrive within 0.5 s") as refused:
        fetch_image(f"{image_site}/slow.png", "image 1", max_bytes=1 << 20, timeout_s=0.5)
    assert refused.value.code == "image_url_timeout" and time.monotonic() - started < 2


# -- batching and leaving ---------------------------------------------------------------------------


class SlowAssistant:
    """Stands in for :class:`OwlAssistant` where timing matters: every answer is one token ("w") per
    ``step_s``, until its max_tokens; each batch's size and results are recorded."""

    def __init__(self, step_s: float = 0.02) -> None:
        self.step_s, self.batches = step_s, []

    def encode(self, request: Request) -> EncodedSample:
        return EncodedSample([1], [IGNORE_INDEX], [])

    def prompt_tokens(self, sample: EncodedSample) -> int:
        return 1

    def read_video(self, data: bytes) -> object:  # the server hands it over whether or not a request holds a clip
        raise AssertionError("these requests hold no video clip")

    def decode(self, tokens: list[int]) -> str:
        return " ".join("w" for _ in tokens)

    def generate(self, samples, samplings, listener=None) -> list[Generation]:
        generations = [Generation() for _ in samples]
        self.batches.append(generations)
        while any(generation.finish_reason is None for generation in generations):
            time.sleep(self.step_s)
            for row, (generation, sampling) in enumerate(zip(generations, samplings, strict=True)):
                if generation.finish_reason is None:
                    generation.tokens.append(7)
                    generation.steps += 1
                    generation.finish_reason = "length" if generation.steps >= sampling.max_new_tokens else None
                    if listener is not None and not listener(row, generation) and generation.finish_reason is None:
                        generation.finish_reason = "cancelled"
        return generations


def test_requests_arriving_during_a_batch_form_the_next_one():
    assistant = SlowAssistant()
    with api(assistant, max_batch=8, batch_window_s=0.2) as (_, client), ThreadPoolExecutor(5) as pool:
        first = pool.submit(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=50)
        time.sleep(0.5)  # the first batch (of 1, its window over) is generating its 50 steps
        later = [
            pool.submit(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "b"}], max_tokens=3)
            for _ in range(4)
        ]
        answers = [future.result().choices[0] for future in [first, *later]]
    assert [len(batch) for batch in assistant.batches] == [1, 4]
    assert [(a.message.content, a.finish_reason) for a in answers] == [(" ".join(["w"] * 50), "length")] + [("w w w", "length")] * 4


@pytest.mark.parametrize("preparing", [True, False], ids=["another-being-prepared", "none-coming"])
def test_a_batch_past_its_window_waits_only_for_requests_being_prepared(preparing):
    assistant = SlowAssistant()
    batcher = GenerationBatcher(assistant, max_batch=8, window_s=0.01)
    sample = assistant.encode(Request.single("x"))
    try:
        with batcher.preparing() if preparing else nullcontext():  # the second request decoding its images...
            first = batcher.submit(sample, Sampling(2))
            time.sleep(0.2)  # ...for far longer than the window
            second = batcher.submit(sample, Sampling(2))
        first.result(), second.result()
    finally:
        batcher.close()
    assert [len(batch) for batch in assistant.batches] == ([2] if preparing else [1, 1])


def test_a_client_that_leaves_mid_stream_stops_its_generation():
    assistant = SlowAssistant()
    with api(assistant) as (server, _):
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1000, "stream": True})
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.server_port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=WAIT_S) as connection:
            connection.sendall(head.encode() + body.encode())
            received = b""
            while received.count(b"data: ") < 5:
                received += connection.recv(1 << 16)
        assert received.startswith(b"HTTP/1.0 200") and b"text/event-stream" in received
        deadline = time.monotonic() + WAIT_S
        while assistant.batches[0][0].finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.05)
    (generation,) = assistant.batches[0]
    assert generation.finish_reason == "cancelled" and generation.steps < 1000


# -- the command ------------------------------------------------------------------------------------


def test_serve_offers_the_api_with_its_flags_and_prints_how_to_reach_it(assistant, monkeypatch):
    import owl_lightning.apps.web

    served = []
    monkeypatch.setattr(OwlAssistant, "from_checkpoint", lambda path, **options: assistant)
    monkeypatch.setattr(owl_lightning.apps.web, "serve", lambda app, port, what: served.append(app))
    monkeypatch.delenv("OWL_LIGHTNING_API_KEY", raising=False)
    main(["serve", "--ckpt", "runs/x", "--allow-image-urls", "--max-batch", "4", "--batch-window-ms", "5"])
    monkeypatch.setenv("OWL_LIGHTNING_API_KEY", "from-the-environment")
    main(["serve", "--ckpt", "runs/x", "--model-name", "owl"])
    drawn, fixed = served
    assert (drawn.model_name, drawn.allow_image_urls, drawn.batcher.max_batch, drawn.batcher.window_s) == ("runs/x", True, 4, 0.005)
    assert drawn.api_key.startswith("owl-") and len(drawn.api_key) > 40 and drawn.max_workers == 16
    assert f"api_key={drawn.api_key}" in drawn.startup_lines("http://127.0.0.1:7860/")[0]
    assert (fixed.model_name, fixed.allow_image_urls, fixed.api_key) == ("owl", False, "from-the-environment")
    assert fixed.startup_lines("http://127.0.0.1:7860/")[0] == (
        "OpenAI API: base_url=http://127.0.0.1:7860/v1  api_key=(the one given: --api-key or $OWL_LIGHTNING_API_KEY)  model=owl"
    )
