"""Two local web pages: blind rating of OwlEval answers (:mod:`.rate`) and chatting with a model (:mod:`.demo`),
which ``serve`` also offers as an OpenAI-compatible API (:mod:`.openai_api`).

Built on the standard library's ``ThreadingHTTPServer`` and plain HTML/JavaScript pages, not on gradio,
which the official mPLUG-Owl demo used. Gradio would add hundreds of MB of dependencies (FastAPI,
uvicorn, pandas, ...) and a websocket app whose API changes between major versions, for two pages
that need a few JSON endpoints and an image upload. These pages load nothing from the internet, work
in any browser, and the browser tests drive them with plain Selenium.

Both servers listen on 127.0.0.1 only, and since every website the user visits can send requests
there, each request passes one guard before anything else is read: the Host must name the loopback on
our port (no DNS rebinding) and a foreign Origin is refused (:func:`check_origin`); then a POST needs a
JSON content type and the per-launch token the served page carries (:meth:`WebApp.authorize`, where
an app may ask other credentials on some paths: ``serve``'s API takes a key). Bodies need a strict
Content-Length under the app's limit; connections time out and at most ``max_workers`` are served at once.
"""

from __future__ import annotations

import hmac
import json
import secrets
import socket
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qsl, urlsplit

from owl_lightning.files import loads_strict

HOST = "127.0.0.1"
# The names a browser may use for this machine. Anything else in Host is a DNS name that happens to
# resolve here (DNS rebinding): a foreign site would then be same-origin with the page.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Sent back by the page with every POST. A custom header plus a JSON content type cannot be sent
# cross-site without a CORS preflight (which is never granted), and the token itself is only in the
# page, which another site cannot read.
TOKEN_HEADER = "X-Owl-Token"
TOKEN_PLACEHOLDER = b"{{owl-token}}"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    # Nothing but this server's own scripts, styles and images (uploads are shown as data: URLs), and
    # no framing by other sites (a framed page could be clicked through by them).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "same-origin",  # other sites cannot embed the images or the JSON
}


@dataclass
class Binary:
    """A response that is not JSON (a page, an image)."""

    data: bytes
    content_type: str


@dataclass
class EventStream:
    """A response sent as server-sent events while ``events`` yields them: each JSON object on its own
    ``data:`` line, then ``data: [DONE]``. An :class:`HttpError` raised midway is sent as a last event
    (:meth:`WebApp.error_body`). When the client goes away, ``events`` is closed (``GeneratorExit`` at its
    ``yield``), so a generator can stop the work it started in a ``finally``."""

    events: Iterable[object]


class HttpError(Exception):
    """A request the server refuses; ``message`` is shown on the page (and the console), so it says what to do.
    ``code`` is a short machine-readable name of the problem, for API clients."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class WebApp:
    """The server side of one page. ``GET /`` serves ``static/<page>`` and ``GET /static/<file>`` the other
    static files; any other path goes to :meth:`get` (query parameters) or :meth:`post` (a JSON object),
    which return JSON-able data or :class:`Binary`, or raise :class:`HttpError`."""

    page = ""
    max_body_bytes = 1 << 20
    max_workers = 16  # connections served at once; more are answered 503 at once, never given a thread
    request_timeout_s = 10.0  # a connection that sends nothing for this long is closed

    def get(self, path: str, query: dict[str, str]) -> object:
        raise HttpError(404, f"nothing at {path}")

    def post(self, path: str, body: dict) -> object:
        raise HttpError(404, f"nothing to post to at {path}")

    def authorize(self, method: str, path: str, headers: Message, token: str) -> None:
        """Refuse (:class:`HttpError`) a request without this app's credentials; the Host and Origin are
        already checked. The page's: a POST needs a JSON content type and the per-launch ``token``."""
        if method != "GET":
            check_page_token(headers, token)

    def error_body(self, path: str, error: HttpError) -> object:
        """The JSON a refused request to ``path`` gets: what the pages' scripts read."""
        return {"error": error.message}

    def startup_lines(self, url: str) -> list[str]:
        """What ``serve`` prints under the page's address ``url`` when it starts."""
        return []

    def close(self) -> None:
        """Release what the app holds beyond the server (threads); called when the server stops."""


def static_file(name: str) -> Binary:
    folder = resources.files(__package__) / "static"
    suffix = "." + name.rpartition(".")[2]
    # Only files that are there by name: no path from the URL reaches the file system.
    if "/" in name or suffix not in STATIC_TYPES or not (folder / name).is_file():
        raise HttpError(404, f"no static file {name!r}")
    return Binary((folder / name).read_bytes(), STATIC_TYPES[suffix])


def is_own_address(host: str, port: int) -> bool:
    """Whether ``host`` (a Host header, or an origin's host[:port]) names this machine's loopback on ``port``."""
    if host.endswith("]") or ":" not in host:  # no port: [::1], localhost
        name, port_text = host, "80"
    else:
        name, _, port_text = host.rpartition(":")
    return name.lower() in LOOPBACK_NAMES and port_text == str(port)


def check_origin(headers: Message, port: int) -> None:
    """Refuse a request whose Host is not the loopback on ``port`` (DNS rebinding) or that a page of another
    site sent (its Origin): every request to these servers, whatever its credentials, passes this first."""
    hosts = headers.get_all("Host") or []
    if len(hosts) != 1 or not is_own_address(hosts[0].strip(), port):
        raise HttpError(403, f"this server answers only at http://{HOST}:{port}/ (or localhost), not at Host {', '.join(hosts)!r}")
    origins = headers.get_all("Origin") or []
    if origins:
        origin = urlsplit(origins[0])
        own = len(origins) == 1 and origin.scheme == "http" and origin.path == "" and is_own_address(origin.netloc, port)
        if not own:
            raise HttpError(403, f"requests from other sites ({', '.join(origins)}) are refused: open http://{HOST}:{port}/ itself")


def check_json_content(headers: Message) -> None:
    """Refuse a body that is not declared JSON: a form or text/plain POST is what another site can send without asking."""
    if headers.get_content_type() != "application/json":
        raise HttpError(415, f"send the request as application/json (it came as {headers.get('Content-Type') or 'no Content-Type'})")


def check_page_token(headers: Message, token: str) -> None:
    """Refuse a POST that is not JSON or lacks the per-launch ``token`` of the served page."""
    check_json_content(headers)
    if not secret_matches(headers.get(TOKEN_HEADER, ""), token):
        raise HttpError(403, f"the {TOKEN_HEADER} header does not match this server's: reload the page (the server was restarted?)")


def secret_matches(given: str, secret: str) -> bool:
    """Whether ``given`` is ``secret``, compared in constant time (no timing hints to a guesser)."""
    return hmac.compare_digest(given.encode(), secret.encode())


def body_length(headers: Message, limit: int) -> int:
    """The Content-Length of a request body, parsed strictly (one header, decimal digits only) and at most
    ``limit``. Without it there is no safe end to the body, so reading until the client closes is never an option."""
    if headers.get("Transfer-Encoding") is not None:
        raise HttpError(411, "send the request body with a Content-Length, not chunked")
    lengths = headers.get_all("Content-Length") or []
    if not lengths:
        raise HttpError(411, "a request body needs a Content-Length header")
    text = lengths[0].strip()
    if len(lengths) != 1 or not (text.isascii() and text.isdigit()):
        raise HttpError(400, f"Content-Length must be one decimal number of bytes, not {', '.join(lengths)!r}")
    length = int(text) if len(text) <= 18 else limit + 1  # a longer number is over any limit: no need to parse it
    if length > limit:
        raise HttpError(413, f"the request is {length / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit: send smaller images")
    return length


class AppServer(ThreadingHTTPServer):
    """Serves one :class:`WebApp` on 127.0.0.1 (``port`` 0: any free port), a thread per connection, at
    most ``app.max_workers`` of them; ``token`` is new for every launch."""

    daemon_threads = True

    def __init__(self, app: WebApp, port: int = 0) -> None:
        self.app = app
        self.token = secrets.token_urlsafe(32)
        self._workers = threading.BoundedSemaphore(app.max_workers)
        super().__init__((HOST, port), _Handler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_port}/"

    def process_request(self, request: socket.socket, client_address) -> None:
        # Called by the accepting thread: a connection over the limit is refused here, without a thread,
        # so stalled connections can hold at most max_workers threads (each until its timeout).
        if not self._workers.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._workers.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._workers.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"the server is busy with {self.app.max_workers} connections: try again in a moment"}).encode()
        head = (
            f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nRetry-After: 1\r\n\r\n"
        )
        try:
            request.settimeout(1.0)
            request.sendall(head.encode() + body)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    server: AppServer
    # HTTP/1.0: one request per connection, so an unread (refused) body is never taken for the next request.
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        self.timeout = self.server.app.request_timeout_s  # read by StreamRequestHandler.setup: every socket read and write
        super().setup()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self._respond(lambda: self._get(url.path, dict(parse_qsl(url.query))))

    def do_POST(self) -> None:
        self._respond(lambda: self.server.app.post(urlsplit(self.path).path, self._json_body()))

    def _get(self, path: str, query: dict[str, str]) -> object:
        if path == "/":
            page = static_file(self.server.app.page)
            return Binary(page.data.replace(TOKEN_PLACEHOLDER, self.server.token.encode()), page.content_type)
        if path.startswith("/static/"):
            return static_file(path.removeprefix("/static/"))
        return self.server.app.get(path, query)

    def _json_body(self) -> dict:
        length = body_length(self.headers, self.server.app.max_body_bytes)
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise HttpError(408, f"the request body did not arrive within {self.server.app.request_timeout_s:g} s") from None
        if len(data) != length:
            raise HttpError(400, f"the request body ended after {len(data)} of its {length} bytes")
        try:
            body = loads_strict(data)
        except ValueError as err:
            raise HttpError(400, f"the request body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        return body

    def _respond(self, handle: Callable[[], object]) -> None:
        app, path = self.server.app, urlsplit(self.path).path
        try:
            check_origin(self.headers, self.server.server_port)
            app.authorize(self.command, path, self.headers, self.server.token)
            result, status = handle(), 200
        except Exception as err:  # a bug in one request must not take the server, or a rater's work, down
            result, status = self._refusal(path, err)
        if isinstance(result, EventStream):
            self._stream(path, result)
            return
        body = result if isinstance(result, Binary) else Binary(json.dumps(result, ensure_ascii=False).encode(), "application/json")
        self._send_head(status, body.content_type, len(body.data))
        self.wfile.write(body.data)

    def _refusal(self, path: str, err: Exception) -> tuple[object, int]:
        """The JSON body and status that answer ``err``: an :class:`HttpError` as raised, anything else a 500."""
        if not isinstance(err, HttpError):
            traceback.print_exc()
            err = HttpError(500, f"internal error: {err!r} (traceback on the server console)", "internal_error")
        self.log_message("%s %s: %s", self.command, path, err.message)
        return self.server.app.error_body(path, err), err.status

    def _send_head(self, status: int, content_type: str, length: int | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:  # a stream has none: over HTTP/1.0 it ends when the connection closes
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")  # pages and ratings always fresh after a reload
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()

    def _stream(self, path: str, stream: EventStream) -> None:
        """Send ``stream`` as server-sent events, each as soon as it is made; stop making them (close the
        generator) once the client has gone."""
        self._send_head(200, "text/event-stream; charset=utf-8", None)
        events = iter(stream.events)
        try:
            for event in events:
                self._send_event(event)
            self._send_event("[DONE]")
        except OSError:  # the client went away, or stopped reading until the socket timed out
            self.log_message("%s %s: the client left before the stream ended", self.command, path)
        except Exception as err:  # the status line is out: the error travels as the last event
            with suppress(OSError):
                self._send_event(self._refusal(path, err)[0])
        finally:
            close = getattr(events, "close", None)  # a generator: its finally blocks run now
            if close is not None:
                close()

    def _send_event(self, event: object) -> None:
        data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
        self.wfile.write(f"data: {data}\n\n".encode())

    def log_request(self, code="-", size="-") -> None:
        # Every click is a request: only failures are worth a console line (and they get one above).
        pass


@contextmanager
def running(app: WebApp, port: int = 0) -> Iterator[AppServer]:
    """``app`` served from a background thread for the duration of the block; shut down after it."""
    server = AppServer(app, port)
    thread = threading.Thread(target=server.serve_forever, name=f"{type(app).__name__} server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        app.close()


def serve(app: WebApp, port: int, what: str) -> None:
    """Serve ``app`` until Ctrl-C, printing where."""
    try:
        server = AppServer(app, port)
    except OSError as err:
        raise SystemExit(f"cannot listen on {HOST}:{port} ({err.strerror}); pass --port 0 for any free port") from None
    print("\n".join([f"{what}: {server.url}  (Ctrl-C stops)", *app.startup_lines(server.url)]), flush=True)
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", flush=True)
        finally:
            app.close()
