"""A Neutron STUB for the Nova test peer: not a network service, only enough to keep Nova happy.

Nova needs a Neutron endpoint even for servers booted with ``networks: "none"`` (without one,
``GET /servers/{id}`` answers 500). What it asks is a handful of list calls (ports of a device,
the project's and the shared networks, extensions); every GET here answers an empty list
named after the resource, e.g. ``{"ports": []}``. Anything else is 404 and is recorded in
``unexpected`` so a test can see that Nova wanted more than this stub pretends to have.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


class NeutronStub:
    """Serves on 127.0.0.1 in a daemon thread of the test process; ``url`` is its endpoint."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, code: int, body: dict[str, Any] | None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = urlsplit(self.path).path.rstrip("/")
                stub.requests.append(("GET", self.path))
                resource = path.rsplit("/", 1)[-1].removesuffix(".json")
                if path.startswith("/v2.0/") and resource.replace("-", "_").isidentifier():
                    self._answer(200, {resource: []})
                else:
                    stub.unexpected.append(("GET", self.path))
                    self._answer(404, {"NeutronError": {"message": "test-bed stub"}})

            def _other(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                stub.requests.append((self.command, self.path))
                stub.unexpected.append((self.command, self.path))
                self._answer(404, {"NeutronError": {"message": "test-bed stub"}})

            do_POST = do_PUT = do_DELETE = _other

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
