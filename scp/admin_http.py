"""The HTTP admin listener: ``/healthz``, ``/readyz`` and ``/metrics`` (off unless ``--http-port`` is set)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from scp.metrics import Metrics

log = logging.getLogger("scp.admin_http")

# A readiness check returns None when fine, else what is wrong.
ReadinessCheck = Callable[[], str | None]


class AdminServer:
    """A small threaded HTTP server; health and metrics only, no state changes."""

    def __init__(self, host: str, port: int, metrics: Metrics, readiness: list[ReadinessCheck]) -> None:
        handler = _handler(metrics, readiness)
        self._http = ThreadingHTTPServer((host, port), handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, name="admin-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._http.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("admin HTTP listening on %s:%d", self._http.server_address[0], self.port)

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def _handler(metrics: Metrics, readiness: list[ReadinessCheck]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                problems = [p for p in (check() for check in readiness) if p]
                body = ("\n".join(problems) if problems else "ready") + "\n"
                self._send(503 if problems else 200, body.encode(), "text/plain")
            elif path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("%s " + format, self.address_string(), *args)

    return Handler
