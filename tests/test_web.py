"""The rating page and the chat page: their servers over HTTP, and the pages in headless Chromium.

The browser tests skip (with the reason) where Debian's chromium, chromium-driver or selenium is
missing, except under CI=true, where they fail instead: .ci/run installs them.
"""

import base64
import io
import json
import logging
import os
import socket
import struct
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image

from owl_lightning.apps.owleval import read_questions, write_answers
from owl_lightning.apps.web import TOKEN_HEADER, running
from owl_lightning.apps.web.demo import ChatApp, read_conversation
from owl_lightning.apps.web.rate import RatingsFile, open_rating
from owl_lightning.cli import main
from owl_lightning.inference import OwlAssistant
from tests.helpers import SUBSET, png_bytes, write_owleval

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SYSTEMS = ("alpha", "beta", "gamma")
WAIT_S = 15
FOREIGN_SITE = "owl-attacker.test"


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def owleval_folder(tmp_path):
    """The 3-question subset of test_owleval, and an answer file per system: "<system> answers <id>"."""
    folder = write_owleval(tmp_path / "owleval", SUBSET)
    questions = read_questions(folder)
    for system in SYSTEMS:
        write_answers(
            folder / "answer" / f"{system}.jsonl",
            questions,
            {q.question_id: f"{system} answers {q.question_id}" for q in questions},
            system,
        )
    return folder


@pytest.fixture
def rating(owleval_folder, tmp_path):
    return open_rating(owleval_folder, [owleval_folder / "answer"], tmp_path / "ratings.jsonl")


@pytest.fixture
def chat_calls(tiny_model, tiny_tokenizer, monkeypatch):
    """An owl-tiny assistant whose requests are recorded and whose (possibly empty) replies are tagged."""
    assistant = OwlAssistant(tiny_model, tiny_tokenizer, precision="fp32")
    calls = []
    answer = assistant.answer

    def recorded(requests, **settings):
        replies = [f"{reply}[reply {len(calls) + 1}]" for reply in answer(requests, **settings)]
        calls.append((requests, settings, replies))
        return replies

    monkeypatch.setattr(assistant, "answer", recorded)
    return assistant, calls


def http(server, path: str, body: object = None, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """GET ``path`` (or POST ``body`` as JSON, with the page's token) from ``server``: status and the JSON
    answer, error statuses included. ``headers`` add to or replace the page's (None: leave one out)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    sent = {} if body is None else {"Content-Type": "application/json", TOKEN_HEADER: server.token}
    sent.update(headers or {})
    request = urllib.request.Request(server.url + path, data=data, headers={k: v for k, v in sent.items() if v is not None})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def raw_request(server, request: bytes) -> tuple[int, dict]:
    """``request`` sent as bytes on a fresh connection that stays open: the status and JSON answer. A server
    that waited for the client to close (or for more body) would time this out instead of answering."""
    with socket.create_connection((server.server_address[0], server.server_port), timeout=WAIT_S) as connection:
        connection.sendall(request)
        response = b""
        while chunk := connection.recv(1 << 16):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post_head(server, path: str, *lines: str) -> bytes:
    """A POST's request line and headers as the page sends them, plus ``lines``, up to the blank line."""
    headers = [f"POST /{path} HTTP/1.1", f"Host: 127.0.0.1:{server.server_port}", "Content-Type: application/json"]
    return ("\r\n".join([*headers, f"{TOKEN_HEADER}: {server.token}", *lines]) + "\r\n\r\n").encode()


# -- both servers: only their own page may drive them ----------------------------------------------


@pytest.fixture(params=["rating", "chat"])
def app_and_effects(request, rating, chat_calls):
    """Each server, a request that changes something there, and a way to see what changed."""
    if request.param == "rating":
        return rating, "api/rate", {"question_id": 2, "slot": 1, "rating": "A"}, lambda: dict(rating.ratings.ratings)
    assistant, calls = chat_calls
    return ChatApp(assistant, max_new_tokens=2), "api/chat", {"messages": [{"role": "user", "text": "hi"}]}, lambda: len(calls)


FOREIGN = [
    {"Host": "evil.example:{port}"},  # DNS rebinding: a foreign name resolving to 127.0.0.1
    {"Host": "localhost.evil.example:{port}"},
    {"Host": "127.0.0.1:{other}"},
    {"Host": "127.0.0.1"},
    {"Origin": "http://evil.example"},
    {"Origin": "null"},  # sandboxed frames, file: pages
    {"Origin": "http://127.0.0.1:{other}"},  # another local server is another site too
    {"Origin": "https://127.0.0.1:{port}"},
]


@pytest.mark.parametrize("foreign", FOREIGN, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_a_foreign_host_or_origin_is_refused(app_and_effects, foreign):
    app, path, body, effects = app_and_effects
    with running(app) as server:
        headers = {k: v.format(port=server.server_port, other=server.server_port + 1) for k, v in foreign.items()}
        before = effects()
        for get in ("", "static/common.js", "api/settings" if isinstance(app, ChatApp) else "api/overview"):
            status, answer = http(server, get, headers=headers)
            assert status == 403 and ("this server answers only at" in answer["error"] or "from other sites" in answer["error"])
        assert http(server, path, body, headers=headers)[0] == 403
        assert effects() == before
        assert http(server, path, body)[0] == 200 and effects() != before  # the page's own request goes through


@pytest.mark.parametrize(
    "own", [{"Host": "localhost:{port}"}, {"Host": "[::1]:{port}"}, {"Host": "LocalHost:{port}"}, {"Origin": "http://localhost:{port}"}]
)
def test_every_loopback_name_of_the_servers_own_port_is_answered(rating, own):
    with running(rating) as server:
        headers = {k: v.format(port=server.server_port) for k, v in own.items()}
        assert http(server, "api/overview", headers=headers)[0] == 200
        assert http(server, "api/rate", {"question_id": 2, "slot": 1, "rating": "A"}, headers=headers)[0] == 200


@pytest.mark.parametrize(
    "headers, status, message",
    [
        ({"Content-Type": "text/plain"}, 415, "send the request as application/json (it came as text/plain)"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "send the request as application/json"),
        ({TOKEN_HEADER: None}, 403, f"the {TOKEN_HEADER} header does not match this server's: reload the page"),
        ({TOKEN_HEADER: "guessed"}, 403, f"the {TOKEN_HEADER} header does not match"),
    ],
)
def test_a_post_needs_json_and_the_token_of_this_launch(app_and_effects, headers, status, message):
    app, path, body, effects = app_and_effects
    with running(app) as server:
        before = effects()
        code, answer = http(server, path, body, headers=headers)
        assert code == status and answer["error"].startswith(message)
        assert effects() == before


def test_the_page_carries_a_new_token_every_launch_and_is_not_frameable(rating):
    pages, tokens = [], []
    for _ in range(2):
        with running(rating) as server, urllib.request.urlopen(server.url, timeout=WAIT_S) as response:
            pages.append(response.read().decode())
            tokens.append(server.token)
            assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert tokens[0] != tokens[1] and len(tokens[0]) >= 32
    assert all(f'<meta name="owl-token" content="{token}">' in page for page, token in zip(pages, tokens, strict=True))


@pytest.mark.parametrize(
    "lines, status, message",
    [
        ([], 411, "a request body needs a Content-Length header"),
        (["Content-Length: -1"], 400, "Content-Length must be one decimal number of bytes, not '-1'"),
        (["Content-Length: abc"], 400, "Content-Length must be one decimal number"),
        (["Content-Length: +40"], 400, "Content-Length must be one decimal number"),
        (["Content-Length: 4e1"], 400, "Content-Length must be one decimal number"),
        (["Content-Length: 40", "Content-Length: 41"], 400, "Content-Length must be one decimal number of bytes, not '40, 41'"),
        (["Content-Length: 2000000"], 413, "the request is 1.9 MiB, over the 1 MiB limit"),
        (["Content-Length: " + "9" * 40], 413, "the request is"),
        (["Transfer-Encoding: chunked"], 411, "send the request body with a Content-Length, not chunked"),
        (["Content-Length: 400"], 400, "the request body ended after 9 of its 400 bytes"),
    ],
)
def test_content_length_is_parsed_strictly_and_never_read_until_close(rating, lines, status, message):
    with running(rating) as server:
        request = post_head(server, "api/rate", *lines) + b'{"rating"'
        if lines == ["Content-Length: 400"]:  # a body cut short: the client stops sending
            with socket.create_connection(("127.0.0.1", server.server_port), timeout=WAIT_S) as connection:
                connection.sendall(request)
                connection.shutdown(socket.SHUT_WR)
                head, _, answer = b"".join(iter(lambda: connection.recv(1 << 16), b"")).partition(b"\r\n\r\n")
            code, answer = int(head.split()[1]), json.loads(answer)
        else:
            code, answer = raw_request(server, request)
        assert code == status and answer["error"].startswith(message)
        assert http(server, "api/overview")[0] == 200
    assert not rating.ratings.ratings


def test_stalled_connections_time_out_and_cannot_take_every_thread(rating):
    rating.max_workers, rating.request_timeout_s = 2, 1.0
    with running(rating) as server:
        address = ("127.0.0.1", server.server_port)
        stalled = [socket.create_connection(address, timeout=WAIT_S) for _ in range(rating.max_workers)]
        started = time.monotonic()
        for connection in stalled:
            connection.sendall(b"GET /api/overview HTTP/1.1\r\n")  # and never the rest
        # Every worker is taken: the next connection is answered at once, without a thread of its own.
        with socket.create_connection(address, timeout=WAIT_S) as extra:
            response = b"".join(iter(lambda: extra.recv(1 << 16), b""))
        assert response.startswith(b"HTTP/1.0 503") and b"busy with 2 connections" in response
        for connection in stalled:  # closed by the server once its timeout passes
            assert connection.recv(1 << 16) == b""
            connection.close()
        assert time.monotonic() - started < 1.0 + 5
        assert http(server, "api/overview")[0] == 200


# -- rating: the server ----------------------------------------------------------------------------


def test_answers_are_shuffled_per_question_stably_and_never_named(rating, owleval_folder, tmp_path):
    # Shuffled per question, not once: with 3 questions a seed gives one order for all 1 time in 36, so
    # among 10 seeds some give different orders (a once-per-file shuffle never would). Use the first.
    for attempt in range(10):
        rating.ratings.slot_seed = f"seed {attempt}"
        orders = {q: rating.slots(q) for q in rating.questions}
        if len({tuple(order) for order in orders.values()}) > 1:
            break
    assert len({tuple(order) for order in orders.values()}) > 1
    assert all(sorted(order) == list(SYSTEMS) for order in orders.values())
    rating.ratings.add(1, "alpha", "A")  # the file's seed is saved with its first rating...
    assert json.loads((tmp_path / "ratings.jsonl").read_text().splitlines()[0]) == {"slot_seed": rating.ratings.slot_seed}
    restarted = open_rating(owleval_folder, [owleval_folder / "answer"], tmp_path / "ratings.jsonl")
    assert {q: restarted.slots(q) for q in rating.questions} == orders  # ...so a restart shows the same order
    with running(rating) as server:
        status, view = http(server, "api/question?id=3")
    assert status == 200
    assert [a["answer"] for a in view["answers"]] == [f"{system} answers 3" for system in orders[3]]
    assert view["earlier_questions"] == ["Describe the image."]
    assert [a["earlier_answers"] for a in view["answers"]] == [[f"{system} answers 2"] for system in orders[3]]
    # Only the answers' own text names a system here; no field of the page's data does.
    hidden = json.dumps({k: v for k, v in view.items() if k != "answers"}) + json.dumps([a["slot"] for a in view["answers"]])
    assert not any(system in hidden for system in SYSTEMS)


def test_every_rating_is_on_disk_before_the_page_hears_back_and_the_last_one_wins(rating, owleval_folder, tmp_path):
    path, slots = tmp_path / "ratings.jsonl", rating.slots(2)
    with running(rating) as server:
        for slot, letter in [(1, "A"), (2, "D"), (1, "B")]:
            status, saved = http(server, "api/rate", {"question_id": 2, "slot": slot, "rating": letter})
            assert status == 200 and saved["rating"] == letter
            last = json.loads(path.read_text().splitlines()[-1])
            assert (last["question_id"], last["model_id"], last["rating"]) == (2, slots[slot - 1], letter)
        assert (saved["rated"], saved["answers"]) == (2, 3)
    restarted = open_rating(owleval_folder, [owleval_folder / "answer"], path)
    assert restarted.ratings.ratings == {(2, slots[0]): "B", (2, slots[1]): "D"}


def test_each_ratings_file_has_its_own_random_slot_seed(owleval_folder, tmp_path):
    apps = [open_rating(owleval_folder, [owleval_folder / "answer"], tmp_path / f"rater{k}.jsonl") for k in range(2)]
    seeds = {app.ratings.slot_seed for app in apps}
    assert len(seeds) == 2 and all(len(seed) == 32 for seed in seeds)  # 128 random bits each, no fixed seed
    orders = [{q: app.slots(q) for q in app.questions} for app in apps]
    # An order is the file's seed and the question id, nothing else: the same seed, the same order.
    (tmp_path / "copy.jsonl").write_text(json.dumps({"slot_seed": apps[1].ratings.slot_seed}) + "\n")
    copy = open_rating(owleval_folder, [owleval_folder / "answer"], tmp_path / "copy.jsonl")
    assert {q: copy.slots(q) for q in copy.questions} == orders[1]


def test_a_torn_or_foreign_line_in_the_ratings_file_costs_only_itself(tmp_path, caplog):
    path = tmp_path / "ratings.jsonl"
    path.write_bytes(
        b'{"slot_seed": "s33d"}\n{"question_id": 1, "model_id": "alpha", "rating": "A"}\nnot json\n'
        b'{"question_id": 1, "model_id": "beta", "rating": "E"}\n'
        b'{"question_id": Infinity, "model_id": "beta", "rating": "A"}\n'
        b'{"question_id": true, "model_id": "beta", "rating": "A"}\n'
        b'{"question_id": 2.0, "model_id": "beta", "rating": "A"}\n'
        b'{"question_id": 2, "model_id": "gamma", "rating": "B", "time": "\xff"}\n'
        b'{"question_id": 2, "model_id": "beta", "rating": "B"}\n'
        b'{"question_id": 3, "model_id": "alpha", "rating": "A", "time": "caf\xc3'  # torn mid-character
    )
    with caplog.at_level(logging.WARNING, logger="owl_lightning"):
        ratings = RatingsFile(path)
    assert ratings.ratings == {(1, "alpha"): "A", (2, "beta"): "B"} and ratings.slot_seed == "s33d"
    assert ratings.unreadable_lines == [3, 4, 5, 6, 7, 8, 10]
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[1] for m in messages[:-1]] == ["3", "4", "5", "6", "7", "8", "10"]  # line numbers
    assert "Infinity is not a JSON number" in messages[2] and "question_id True is not an integer" in messages[3]
    assert "10: skipped, cut short, a write interrupted by a crash?" in messages[6]
    assert messages[-1] == f"{path}: 7 unreadable line(s) skipped, 2 rating(s) read"
    ratings.add(3, "gamma", "C")
    assert RatingsFile(path).ratings == {(1, "alpha"): "A", (2, "beta"): "B", (3, "gamma"): "C"}
    (tmp_path / "empty.jsonl").write_bytes(b"")  # created, never written to: nothing to warn about
    assert RatingsFile(tmp_path / "empty.jsonl").unreadable_lines == []


def rate_arguments(owleval_folder: Path, ratings: Path, *extra: str) -> list[str]:
    """``owl-lightning rate`` on the test's OwlEval folder and its answer files."""
    return ["rate", "--data", str(owleval_folder), "--answers", str(owleval_folder / "answer"), "--ratings", str(ratings), *extra]


def test_rate_starts_despite_a_torn_ratings_file_and_says_so(owleval_folder, tmp_path, monkeypatch, capsys):
    import owl_lightning.apps.web

    (tmp_path / "ratings.jsonl").write_bytes(b'{"question_id": 1, "model_id": "alpha", "rating": "A"}\n{"question_id": 2, "mod\xe2\x82')
    served = []
    monkeypatch.setattr(owl_lightning.apps.web, "serve", lambda app, port, what: served.append((app, what)))
    arguments = rate_arguments(owleval_folder, tmp_path / "ratings.jsonl")
    main(arguments)
    ((app, what),) = served
    assert app.ratings.ratings == {(1, "alpha"): "A"} and what.endswith("(1 unreadable line(s) skipped, see above)")
    assert app.summary_shown is False  # blind by default
    main([*arguments, "--no-blind"])
    assert served[1][0].summary_shown is True
    main([*arguments, "--summary"])
    assert "| alpha | 1/0/0/0 | 1 | 0/0/0/0 | 2 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"question_id": 99, "slot": 1, "rating": "A"}, 404, "there is no OwlEval question 99 (ids 1-3); nothing was saved"),
        ({"question_id": "two", "slot": 1, "rating": "A"}, 400, "question_id must be an integer, not 'two'"),
        ({"question_id": "2", "slot": 1, "rating": "A"}, 400, "question_id must be an integer, not '2'"),
        ({"question_id": 2.0, "slot": 1, "rating": "A"}, 400, "question_id must be an integer, not 2.0"),
        ({"question_id": True, "slot": 1, "rating": "A"}, 400, "question_id must be an integer, not True"),
        ({"question_id": 2, "slot": 4, "rating": "A"}, 400, "question 2 has answers 1-3, not 4: reload the page"),
        ({"question_id": 2, "slot": True, "rating": "A"}, 400, "question 2 has answers 1-3, not True"),  # bool is not int
        ({"question_id": 2, "slot": 1.0, "rating": "A"}, 400, "question 2 has answers 1-3, not 1.0"),
        ({"question_id": 2, "slot": 1, "rating": "E"}, 400, "a rating is one of A, B, C, D, not 'E'"),
        ({"question_id": 2, "slot": 1, "rating": ["A"]}, 400, "a rating is one of A, B, C, D, not ['A']"),
        ({"question_id": 2, "slot": 1}, 400, "send question_id (an integer), slot (an integer), rating (a string); got question_id, slot"),
        ({"question_id": 2, "slot": 1, "rating": "A", "model_id": "alpha"}, 400, "send question_id (an integer)"),
        (b'{"question_id": 2, "slot": NaN, "rating": "A"}', 400, "the request body is not JSON: NaN is not a JSON number"),
        (b'{"question_id": Infinity, "slot": 1, "rating": "A"}', 400, "the request body is not JSON: Infinity is not a JSON number"),
        (b"[" * 100_000, 400, "the request body is not JSON: nested too deeply"),
        (b'["question_id", 2]', 400, "the request body must be a JSON object"),
        (b"{not json", 400, "the request body is not JSON"),
        ('{"question_id": 2, "slot": 1, "rating": "\u00e9"}'.encode("latin-1"), 400, "the request body is not JSON"),
    ],
)
def test_bad_ratings_are_refused_with_a_message_and_nothing_saved(rating, body, status, message):
    with running(rating) as server:
        code, answer = http(server, "api/rate", body)
        assert code == status and answer["error"].startswith(message)
        assert http(server, "api/overview")[0] == 200  # and the server carries on
    assert not rating.ratings.path.exists()


def test_the_summary_counts_each_category_and_prints_markdown(rating):
    alpha, beta = "alpha", "beta"
    for question_id, system, letter in [(1, alpha, "A"), (2, alpha, "B"), (3, alpha, "D"), (2, beta, "C")]:
        rating.ratings.add(question_id, system, letter)
    summary = rating.summary()
    assert summary["denominators"] == {"single_turn": 2, "multi_turn": 2}
    rows = {row["model_id"]: row for row in summary["rows"]}
    # Question 2 is single- and multi-turn: it counts in both, as in the paper.
    assert rows[alpha]["single_turn"] == {"A": 1, "B": 1, "C": 0, "D": 0, "unrated": 0}
    assert rows[alpha]["multi_turn"] == {"A": 0, "B": 1, "C": 0, "D": 1, "unrated": 0}
    assert rows[beta]["multi_turn"] == {"A": 0, "B": 0, "C": 1, "D": 0, "unrated": 1}
    assert rows["gamma"]["single_turn"]["unrated"] == 2
    assert summary["markdown"].splitlines()[0] == "| system | single-turn (2) A/B/C/D | unrated | multi-turn (2) A/B/C/D | unrated |"
    assert "| alpha | 1/1/0/0 | 0 | 0/1/0/1 | 0 |" in summary["markdown"]


def test_rate_refuses_a_malformed_answers_file_with_its_line(owleval_folder, tmp_path, capsys):
    with open(owleval_folder / "answer" / "beta.jsonl", "a") as file:
        file.write('{"image": "red.png", "question_id": 1, "answer": "again"}\n')
    with pytest.raises(SystemExit) as exit:
        main(rate_arguments(owleval_folder, tmp_path / "ratings.jsonl", "--summary"))
    assert exit.value.code == 2
    assert "beta.jsonl:4: missing question, model_id; the official answer format has" in capsys.readouterr().err


def test_a_missing_image_is_named_on_the_page_not_served(rating, owleval_folder, caplog):
    (owleval_folder / "cases" / "blue.png").unlink()
    with running(rating) as server:
        status, view = http(server, "api/question?id=3")
        assert status == 200 and view["image_error"].startswith("Image blue.png is missing from")
        assert http(server, "image/blue.png") == (404, {"error": f"image blue.png is not in {owleval_folder / 'cases'}"})
        assert http(server, "image/..%2Fquestions.jsonl")[0] == 404  # nothing but the questions' images
        assert http(server, "api/question?id=1")[1]["image_error"] is None


def with_images(owleval_folder: Path, names: dict[int, str]) -> Path:
    """The folder's questions.jsonl with the images of some questions renamed (the answer files stay)."""
    questions = [dict(q, image=names.get(q["question_id"], q["image"])) for q in SUBSET]
    (owleval_folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return owleval_folder


def test_image_serves_nothing_outside_the_cases_folder_whatever_questions_jsonl_names(owleval_folder, tmp_path, caplog):
    (tmp_path / "outside.png").write_bytes(png_bytes("red"))
    (owleval_folder / "cases" / "link.png").symlink_to(tmp_path / "outside.png")
    escape = "../" * len(owleval_folder.resolve().parts) + "etc/hostname"  # /etc/hostname, from cases/
    with_images(owleval_folder, {1: escape, 2: "link.png", 3: "link.png"})
    with caplog.at_level(logging.WARNING, logger="owl_lightning"):
        app = open_rating(owleval_folder, [owleval_folder / "answer"], tmp_path / "ratings.jsonl")
    assert "2 image(s) cannot be shown" in caplog.text and f"Image {escape} lies outside" in caplog.text
    assert app.locate_image(str(tmp_path / "outside.png"))[0] is None  # an absolute path
    assert app.locate_image("../questions.jsonl")[0] is None
    with running(app) as server:
        for name in (escape, "link.png", "..%2Fquestions.jsonl"):
            assert http(server, "image/" + quote(name))[0] == 404
        assert http(server, "image/" + escape)[0] == 404  # the dots unquoted too: urllib sends the path as it is
        view = http(server, "api/question?id=2")[1]
        assert view["image_error"] == f"Image link.png lies outside {owleval_folder / 'cases'}, so it is not shown; " + (
            "rate from the text, or restart with the right --data."
        )


def test_an_image_name_that_needs_quoting_is_served(owleval_folder, tmp_path):
    (owleval_folder / "cases" / "red.png").rename(owleval_folder / "cases" / "red #1 ü.png")
    app = open_rating(with_images(owleval_folder, {1: "red #1 ü.png"}), [owleval_folder / "answer"], tmp_path / "ratings.jsonl")
    with running(app) as server:
        view = http(server, "api/question?id=1")[1]
        assert view["image_error"] is None and view["image"] == "/image/red%20%231%20%C3%BC.png"
        with urllib.request.urlopen(server.url + view["image"][1:], timeout=WAIT_S) as response:
            assert response.headers["Content-Type"] == "image/png" and response.read() == png_bytes("red")


def test_blind_rating_hides_the_summary_until_the_rater_reveals_it(rating, owleval_folder, tmp_path):
    with running(rating) as server:
        assert http(server, "api/overview")[1]["summary_shown"] is False
        status, answer = http(server, "api/summary")
        assert status == 403 and answer["error"].startswith("blind rating: the summary shows each system's counts")
        status, saved = http(server, "api/rate", {"question_id": 2, "slot": 1, "rating": "A"})
        assert status == 200 and not any(system in json.dumps(saved) for system in SYSTEMS)
        # Only the page of this launch can reveal it, and only by asking for exactly that.
        assert http(server, "api/reveal", {}, headers={TOKEN_HEADER: None})[0] == 403
        assert http(server, "api/reveal", {"question_id": 2})[1] == {"error": "send no fields; got question_id"}
        assert http(server, "api/summary")[0] == 403
        status, summary = http(server, "api/reveal", {})
        assert status == 200 and summary["markdown"] == rating.summary()["markdown"]
        assert http(server, "api/summary")[0] == 200 and http(server, "api/overview")[1]["summary_shown"] is True
    not_blind = open_rating(owleval_folder, [owleval_folder / "answer"], tmp_path / "ratings.jsonl", blind=False)
    with running(not_blind) as server:
        assert http(server, "api/overview")[1]["summary_shown"] is True and http(server, "api/summary")[0] == 200


# -- chat: the server ------------------------------------------------------------------------------


def encoded(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format=image_format)
    return buffer.getvalue()


def upload(name: str, data: bytes) -> dict:
    return {"name": name, "data": "data:image/png;base64," + base64.b64encode(data).decode()}


def data_url(colour: str) -> dict:
    return upload(f"{colour}.png", png_bytes(colour))


def test_each_message_opens_with_its_own_images():
    request = read_conversation(
        [
            {"role": "user", "text": "What is this?", "images": [data_url("red")]},
            {"role": "assistant", "text": "red"},
            {"role": "user", "text": "And these?", "images": [data_url("blue"), data_url("green")]},
        ]
    )
    assert [t.content for t in request.turns] == ["<image>\nWhat is this?", "red", "<image><image>\nAnd these?"]
    assert [image.getpixel((0, 0)) for image in request.images] == [(220, 30, 30), (30, 30, 220), (30, 200, 30)]


def test_uploads_convert_to_rgb_as_training_does():

    transparent = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(transparent, format="PNG")
    upload = {"name": "clear.png", "data": "data:image/png;base64," + base64.b64encode(transparent.getvalue()).decode()}
    (image,) = read_conversation([{"role": "user", "text": "what?", "images": [upload]}]).images
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)  # on white, as data.images composites it


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "'messages' must be a non-empty list"),
        (
            [{"role": "user", "text": "look", "images": [{"name": "notes.png", "data": "data:image/png;base64,bm90IGFuIGltYWdl"}]}],
            "notes.png is not an image the server can read",
        ),
        ([{"role": "user", "text": "a <image> here"}], "message 1 contains <image>, which stands for an image"),
        ([{"role": "user", "text": " "}], "message 1 is empty: type a question or add an image"),
        ([{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello"}], "the last message must be the user's"),
        ([{"role": "system", "text": "hi"}], "message 1 needs a role (user or assistant)"),
        ([{"role": "user", "text": "broken \ud800 here"}], "message 1 contains a lone surrogate"),
        # A format the page does not offer is not opened, however PIL could read it.
        ([{"role": "user", "text": "look", "images": [upload("old.bmp", encoded("BMP"))]}], "old.bmp is not an image the server can read"),
    ],
)
def test_bad_chat_requests_get_a_message(chat_calls, messages, message):
    assistant, calls = chat_calls
    with running(ChatApp(assistant)) as server:
        status, answer = http(server, "api/chat", {"messages": messages})
        assert status == 400 and answer["error"].startswith(message)
        assert http(server, "api/chat", {"messages": [{"role": "user", "text": "hi"}], "max_new_tokens": 0})[1] == {
            "error": "max_new_tokens must be between 1 and 1024, got 0"
        }
        assert http(server, "api/chat", {"messages": [{"role": "user", "text": "hi"}], "max_new_tokens": 2})[0] == 200
    assert len(calls) == 1


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_new_tokens": True}, "max_new_tokens must be a whole number, got True"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number, got 2.5"),
        ({"max_new_tokens": "2"}, "max_new_tokens must be a whole number, got '2'"),
        ({"temperature": False}, "temperature must be a number, got False"),
        ({"temperature": 2.5}, "temperature must be between 0.0 and 2.0, got 2.5"),
        ('"temperature": NaN', "the request body is not JSON: NaN is not a JSON number"),
        ('"temperature": -Infinity', "the request body is not JSON: -Infinity is not a JSON number"),
    ],
)
def test_chat_settings_must_be_numbers_of_their_kind(chat_calls, settings, message):
    assistant, calls = chat_calls
    body = {"messages": [{"role": "user", "text": "hi"}]}
    if isinstance(settings, str):  # what json.dumps cannot write
        body = json.dumps(body)[:-1].encode() + b", " + settings.encode() + b"}"
    else:
        body.update(settings)
    with running(ChatApp(assistant)) as server:
        status, answer = http(server, "api/chat", body)
    assert status == 400 and answer["error"].startswith(message) and not calls


def test_a_conversation_too_long_for_the_model_asks_for_a_new_chat(chat_calls):
    assistant, _ = chat_calls
    assistant.template.max_length = 50
    with running(ChatApp(assistant)) as server:
        status, answer = http(server, "api/chat", {"messages": [{"role": "user", "text": "hi " * 40}]})
    assert (
        status == 400 and "exceeds max_length=50" in answer["error"] and answer["error"].endswith("start a new chat (or use fewer images)")
    )


def grey_png(width: int, height: int) -> bytes:
    """A valid all-black greyscale PNG, compressed row by row: 9400 x 9400 is 88 Mpx decoded, ~86 KB here."""
    compressor, row = zlib.compressobj(9), b"\0" * (1 + width)  # each row: filter byte, then the pixels
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture
def decoded(monkeypatch):
    """The images the chat server decodes, by size."""
    from owl_lightning.apps.web import demo

    sizes, decode = [], demo.decode_image
    monkeypatch.setattr(demo, "decode_image", lambda data: sizes.append(decode(data).size) or decode(data))
    return sizes


def test_a_pixel_bomb_is_refused_from_its_header_before_anything_is_decoded(chat_calls, decoded):
    assistant, calls = chat_calls
    bomb = upload("bomb.png", grey_png(9400, 9400))
    assert len(bomb["data"]) < 200_000
    with running(ChatApp(assistant)) as server:
        messages = [{"role": "user", "text": "what?", "images": [upload("small.png", png_bytes("red")), bomb, bomb]}]
        status, answer = http(server, "api/chat", {"messages": messages})
        assert status == 413 and answer["error"] == (
            "the images up to bomb.png hold 88,361,024 pixels, over the limit of 50,000,000: send smaller images"
        )
        assert not decoded and not calls
        # Under the limit, the same kind of image is decoded as usual.
        messages[0]["images"] = [upload("fine.png", grey_png(300, 200))]
        assert http(server, "api/chat", {"messages": messages})[0] == 200 and decoded == [(300, 200)]


def test_the_pixel_limit_counts_the_whole_conversation(chat_calls, decoded):
    assistant, calls = chat_calls
    first = [{"role": "user", "text": "and?", "images": [data_url("red")]}, {"role": "assistant", "text": "red"}]
    with running(ChatApp(assistant, max_new_tokens=2, max_pixels=2 * 32 * 32)) as server:
        second = {"role": "user", "text": "and?", "images": [data_url("blue")]}
        assert http(server, "api/chat", {"messages": [*first, second]})[0] == 200
        second["images"].append(data_url("green"))
        status, answer = http(server, "api/chat", {"messages": [*first, second]})
    assert status == 413 and answer["error"].startswith("the images up to green.png hold 3,072 pixels, over the limit of 2,048")
    assert len(calls) == 1 and decoded == [(32, 32), (32, 32)]


def test_images_per_conversation_are_capped(chat_calls, decoded):
    assistant, calls = chat_calls
    with running(ChatApp(assistant, max_new_tokens=2)) as server:
        messages = [
            {"role": "user", "text": "these?", "images": [data_url("red")] * 10},
            {"role": "assistant", "text": "red"},
            {"role": "user", "text": "and these?", "images": [data_url("blue")] * 7},
        ]
        status, answer = http(server, "api/chat", {"messages": messages})
        assert status == 413 and answer["error"] == "message 3 brings the conversation over 16 images: start a new chat"
        messages[2]["images"].pop()
        assert http(server, "api/chat", {"messages": messages})[0] == 200
    assert len(calls) == 1 and len(decoded) == 16


# -- the pages in headless Chromium ----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium; every test that takes it is marked slow (conftest.py)."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"the browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver; pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so they must run: .ci/run installs them")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--host-resolver-rules=MAP {FOREIGN_SITE} 127.0.0.1",  # a foreign name for this machine, as DNS rebinding gives one
    ):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="owl-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        driver.set_page_load_timeout(WAIT_S)
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(driver, condition, what: str):
    """``condition(driver)``'s first truthy value, polled for at most WAIT_S seconds."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, message=f"waited {WAIT_S} s for {what}")


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def open_question(driver, url: str, question_id: int) -> None:
    driver.get(f"{url}#q={question_id}")
    wait_for(
        driver,
        lambda d: f"Question {question_id} ·" in d.find_element("id", "meta").text and css(d, ".answer .rating button"),
        f"question {question_id}",
    )


def click_rating(driver, slot: int, letter: str) -> None:
    css(driver, f'.answer[data-slot="{slot}"] button[data-rating="{letter}"]')[0].click()
    wait_for(
        driver, lambda d: css(d, f'.answer[data-slot="{slot}"] .saved')[0].text == f"saved {letter}", f"answer {slot} saved as {letter}"
    )


def shown_ratings(driver) -> dict[int, str]:
    return {
        int(button.find_element("xpath", "ancestor::article").get_attribute("data-slot")): button.text
        for button in css(driver, ".rating button.selected")
    }


def test_browser_ratings_survive_reload_and_restart_and_the_summary_counts_them(browser, rating, owleval_folder, tmp_path):
    with running(rating) as server:
        open_question(browser, server.url, 1)
        assert browser.find_element("id", "question-text").text == "What colour is this?"
        assert [card.find_element("class name", "text").text for card in css(browser, ".answer")] == [
            f"{system} answers 1" for system in rating.slots(1)
        ]
        click_rating(browser, 1, "A")
        click_rating(browser, 2, "C")
        click_rating(browser, 2, "D")  # changed its mind: the last click counts
        css(browser, "#next")[0].click()
        wait_for(browser, lambda d: "Question 2 ·" in d.find_element("id", "meta").text, "question 2")
        click_rating(browser, 3, "B")
        browser.refresh()
        open_question(browser, server.url, 2)
        assert shown_ratings(browser) == {3: "B"}
        # A stale page posting for a question that does not exist: a message on the page, nothing saved.
        browser.execute_script("rate(99, 1, 'A', document.querySelector('.answer'))")
        wait_for(browser, lambda d: "no OwlEval question 99" in d.find_element("id", "error").text, "the error message")
    saved = (tmp_path / "ratings.jsonl").read_text()
    assert saved.count("\n") == 1 + 4 and '"question_id": 99' not in saved  # the file's slot seed, then the 4 clicks

    restarted = open_rating(owleval_folder, [owleval_folder / "answer"], tmp_path / "ratings.jsonl")
    with running(restarted) as server:
        open_question(browser, server.url, 1)
        assert shown_ratings(browser) == {1: "A", 2: "D"}
        assert "3 of 9 answers rated" in browser.find_element("id", "progress").text
        css(browser, "#summary-tab")[0].click()
        # Blind: nothing per system until the rater says they have finished.
        wait_for(browser, lambda d: d.find_element("id", "blind-notice").is_displayed(), "the blind-rating notice")
        assert not css(browser, "#summary-table td") and not browser.find_element("id", "summary").is_displayed()
        browser.find_element("id", "reveal").click()
        wait_for(browser, lambda d: css(d, "#summary-table td"), "the summary table")
        assert not browser.find_element("id", "blind-notice").is_displayed()

        def cell(system, category, letter):
            return css(browser, f'tr[data-model="{system}"] td[data-category="{category}"][data-letter="{letter}"]')[0].text

        first, second = rating.slots(1)[:2]
        third_of_q2 = rating.slots(2)[2]
        assert (
            cell(first, "single_turn", "A") == "1" and cell(second, "single_turn", "D") == "1" and cell(second, "single_turn", "C") == "0"
        )
        assert cell(third_of_q2, "single_turn", "B") == cell(third_of_q2, "multi_turn", "B") == "1"
        assert cell(third_of_q2, "multi_turn", "unrated") == "1"
        assert browser.find_element("id", "summary-markdown").text == restarted.summary()["markdown"]


def test_browser_rating_names_a_missing_image(browser, rating, owleval_folder):
    (owleval_folder / "cases" / "blue.png").unlink()
    with running(rating) as server:
        open_question(browser, server.url, 3)
        error = browser.find_element("id", "image-error")
        assert error.is_displayed() and error.text.startswith("Image blue.png is missing from")
        assert not browser.find_element("id", "image").is_displayed()
        assert [item.text for item in css(browser, "#earlier li")] == ["Describe the image."]


def chat_reply(driver, count: int) -> str:
    """The text of the ``count``-th assistant message, once it is there."""
    wait_for(
        driver, lambda d: len(css(d, ".message.assistant:not(.pending)")) >= count and not css(d, ".message.pending"), f"answer {count}"
    )
    return css(driver, ".message.assistant:not(.pending) .text")[count - 1].text


def test_browser_chat_with_an_uploaded_image_over_two_turns(browser, chat_calls, tmp_path):
    assistant, calls = chat_calls
    Image.new("RGB", (48, 32), (220, 30, 30)).save(tmp_path / "red.png")
    with running(ChatApp(assistant, max_new_tokens=16, title="owl-tiny")) as server:
        browser.get(server.url)
        wait_for(browser, lambda d: d.find_element("id", "max-new-tokens").get_attribute("value") == "16", "the settings")
        browser.find_element("id", "files").send_keys(str(tmp_path / "red.png"))
        wait_for(browser, lambda d: css(d, "#pending img"), "the image preview")
        browser.find_element("id", "max-new-tokens").clear()
        browser.find_element("id", "max-new-tokens").send_keys("5")
        browser.find_element("id", "text").send_keys("What colour is it?")
        browser.find_element("id", "send").click()
        first = chat_reply(browser, 1)
        assert first.endswith("[reply 1]") and css(browser, ".message.assistant .meta")[0].text.endswith(" s")
        assert len(css(browser, ".message.user img")) == 1 and not css(browser, "#pending img")
        requests, settings, _ = calls[0]
        assert [t.content for t in requests[0].turns] == ["<image>\nWhat colour is it?"]
        assert requests[0].images[0].size == (48, 32) and settings == {"max_new_tokens": 5, "temperature": 0.0}

        browser.find_element("id", "text").send_keys("Are you sure?")
        browser.find_element("id", "send").click()
        chat_reply(browser, 2)
        requests, _, _ = calls[1]
        assert [t.role for t in requests[0].turns] == ["user", "assistant", "user"]
        assert requests[0].turns[1].content == calls[0][2][0] and len(requests[0].images) == 1
        assert len(css(browser, ".message.user img")) == 1  # the image stays in the conversation, sent once


@pytest.mark.parametrize(
    "image, error",
    [
        (b"not an image at all", "image.png is not an image the server can read"),
        (png_bytes("red", size=40), "the images up to image.png hold 1,600 pixels, over the limit of 1,000: send smaller images"),
    ],
    ids=["unreadable", "too-many-pixels"],
)
def test_browser_chat_shows_why_an_image_was_refused_and_carries_on(browser, chat_calls, tmp_path, image, error):
    assistant, calls = chat_calls
    (tmp_path / "image.png").write_bytes(image)
    with running(ChatApp(assistant, max_new_tokens=4, max_pixels=1000)) as server:
        browser.get(server.url)
        wait_for(browser, lambda d: d.find_element("id", "max-new-tokens").get_attribute("value") == "4", "the settings")
        browser.find_element("id", "files").send_keys(str(tmp_path / "image.png"))
        wait_for(browser, lambda d: css(d, "#pending img"), "the preview")
        browser.find_element("id", "text").send_keys("What is this?")
        browser.find_element("id", "send").click()
        wait_for(browser, lambda d: error in d.find_element("id", "error").text, "the error")
        assert not css(browser, ".message") and not calls
        assert browser.find_element("id", "text").get_attribute("value") == "What is this?"  # kept, to fix and resend
        css(browser, "#pending button")[0].click()  # drop the bad image
        browser.find_element("id", "send").click()
        assert chat_reply(browser, 1).endswith("[reply 1]")
        assert not browser.find_element("id", "error").is_displayed()


# What a page on another site can try against the local servers: requests a browser sends without asking
# (text/plain, as a form would), then a JSON one with a guessed token (the browser must ask first, and is
# refused), then reading the page for its token.
ATTACK = """
const [target, path, body, done] = arguments;
const results = {};
try {  // the answer is unreadable either way (and Cross-Origin-Resource-Policy fails the fetch)
  await fetch(target + path, { method: "POST", mode: "no-cors", headers: { "Content-Type": "text/plain" }, body });
} catch (err) {}
try {
  const response = await fetch(target + path,
    { method: "POST", headers: { "Content-Type": "application/json", "X-Owl-Token": "guessed" }, body });
  results.json = `answered ${response.status}`;
} catch (err) { results.json = "blocked"; }
try {
  results.page = (await (await fetch(target)).text()).slice(0, 100);
} catch (err) { results.page = "unreadable"; }
done(results);
"""


@pytest.fixture
def foreign_site(tmp_path):
    """A page on another origin (http://owl-attacker.test:PORT/, which the browser resolves to 127.0.0.1)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<!doctype html><title>a site the user visits</title>")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as site:
        Thread(target=site.serve_forever, daemon=True).start()
        yield f"http://{FOREIGN_SITE}:{site.server_port}/"
        site.shutdown()


def test_browser_another_site_cannot_drive_the_pages_nor_rebind_to_them(browser, app_and_effects, foreign_site, capfd):
    app, path, body, effects = app_and_effects
    before = effects()
    with running(app) as server:
        browser.get(foreign_site)
        results = browser.execute_async_script(ATTACK, server.url, path, json.dumps(body))
        assert results == {"json": "blocked", "page": "unreadable"}
        # DNS rebinding: the foreign name now leads to our port; the page (and its token) is not served there.
        browser.get(f"http://{FOREIGN_SITE}:{server.server_port}/")
        assert "this server answers only at" in browser.page_source and server.token not in browser.page_source
        browser.get(server.url)  # the page itself still works
        wait_for(browser, lambda d: d.execute_script("return TOKEN") == server.token, "the page's token")
    assert effects() == before
    # The text/plain request did arrive, and the server refused it (the JSON one never left the browser).
    assert f"POST /{path}: requests from other sites (http://{FOREIGN_SITE}:" in capfd.readouterr().err
