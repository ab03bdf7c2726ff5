"""A real HTTP server on a free local port, in a thread, that records the webhooks it receives."""

import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Listener:
    """Answers each POST with the next of `statuses` (the last one once they run out); over TLS
    with `tls` (a server context)."""

    def __init__(self, statuses: list[int] | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.statuses = list(statuses or [200])
        self.received: list[Received] = []
        self._lock = threading.Lock()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with listener._lock:
                    listener.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    status = listener.statuses.pop(0) if len(listener.statuses) > 1 else listener.statuses[0]
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # a node sends a whole batch at once

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/hooks/softserve?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Listener":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
