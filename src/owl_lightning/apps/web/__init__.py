"""Two local web pages: blind rating of OwlEval answers (:mod:`.rate`) and chatting with a model (:mod:`.demo`).

Built on the standard library's ``ThreadingHTTPServer`` and plain HTML/JavaScript pages, not on gradio,
which the official mPLUG-Owl demo used. Gradio would add hundreds of MB of dependencies (FastAPI,
uvicorn, pandas, ...) and a websocket app whose API changes between major versions, for two pages
that need a few JSON endpoints and an image upload. These pages load nothing from the internet, work
in any browser, and the browser tests drive them with plain Selenium.

Both servers listen on 127.0.0.1 only: they serve local files and run the model for whoever connects.
"""

from __future__ import annotations

import json
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qsl, urlsplit

HOST = "127.0.0.1"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


@dataclass
class Binary:
    """A response that is not JSON (a page, an image)."""

    data: bytes
    content_type: str


class HttpError(Exception):
    """A request the server refuses; ``message`` is shown on the page (and the console), so it says what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class WebApp:
    """The server side of one page. ``GET /`` serves ``static/<page>`` and ``GET /static/<file>`` the other
    static files; any other path goes to :meth:`get` (query parameters) or :meth:`post` (a JSON object),
    which return JSON-able data or :class:`Binary`, or raise :class:`HttpError`."""

    page = ""
    max_body_bytes = 1 << 20

    def get(self, path: str, query: dict[str, str]) -> object:
        raise HttpError(404, f"nothing at {path}")

    def post(self, path: str, body: dict) -> object:
        raise HttpError(404, f"nothing to post to at {path}")


def static_file(name: str) -> Binary:
    folder = resources.files(__package__) / "static"
    suffix = "." + name.rpartition(".")[2]
    # Only files that are there by name: no path from the URL reaches the file system.
    if "/" in name or suffix not in STATIC_TYPES or not (folder / name).is_file():
        raise HttpError(404, f"no static file {name!r}")
    return Binary((folder / name).read_bytes(), STATIC_TYPES[suffix])


class AppServer(ThreadingHTTPServer):
    """Serves one :class:`WebApp` on 127.0.0.1 (``port`` 0: any free port); a thread per request."""

    daemon_threads = True

    def __init__(self, app: WebApp, port: int = 0) -> None:
        super().__init__((HOST, port), _Handler)
        self.app = app

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_port}/"


class _Handler(BaseHTTPRequestHandler):
    server: AppServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self._respond(lambda: self._get(url.path, dict(parse_qsl(url.query))))

    def do_POST(self) -> None:
        self._respond(lambda: self.server.app.post(urlsplit(self.path).path, self._json_body()))

    def _get(self, path: str, query: dict[str, str]) -> object:
        if path == "/":
            return static_file(self.server.app.page)
        if path.startswith("/static/"):
            return static_file(path.removeprefix("/static/"))
        return self.server.app.get(path, query)

    def _json_body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        limit = self.server.app.max_body_bytes
        if length > limit:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise HttpError(413, f"the request is {length / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit: send smaller images")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HttpError(400, f"the request body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        return body

    def _respond(self, handle) -> None:
        try:
            result, status = handle(), 200
        except HttpError as err:
            self.log_message("%s %s: %s", self.command, self.path.split("?")[0], err.message)
            result, status = {"error": err.message}, err.status
        except Exception as err:  # a bug in one request must not take the server, or a rater's work, down
            traceback.print_exc()
            result, status = {"error": f"internal error: {err!r} (traceback on the server console)"}, 500
        body = result if isinstance(result, Binary) else Binary(json.dumps(result, ensure_ascii=False).encode(), "application/json")
        self.send_response(status)
        self.send_header("Content-Type", body.content_type)
        self.send_header("Content-Length", str(len(body.data)))
        self.send_header("Cache-Control", "no-store")  # pages and ratings always fresh after a reload
        self.end_headers()
        self.wfile.write(body.data)

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


def serve(app: WebApp, port: int, what: str) -> None:
    """Serve ``app`` until Ctrl-C, printing where."""
    try:
        server = AppServer(app, port)
    except OSError as err:
        raise SystemExit(f"cannot listen on {HOST}:{port} ({err.strerror}); pass --port 0 for any free port") from None
    print(f"{what}: {server.url}  (Ctrl-C stops)", flush=True)
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", flush=True)
