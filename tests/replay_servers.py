"""Live host services for replay tests: the key service the HTTP capture was made against (its
answer can be changed), and the SEQPACKET service of the seqpacket capture, on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEYS_BODY = b'{"keys":[{"id":"k1","alg":"ES256"},{"id":"k2","alg":"RS256"}]}\n'
SEQ_REPLIES = {b"HELLO": b"HELLO from the host", b"GET region": b"region=eu-west-1", b"BYE": b"BYE"}


def keys_handler(body: bytes = KEYS_BODY, status: int = 200,
                 date: str = "Thu, 01 Jan 2026 00:00:00 GMT") -> type[BaseHTTPRequestHandler]:
    class Keys(BaseHTTPRequestHandler):
        """As tests/e2e/test_captures_e2e.py's KeysHandler, which made captures/http-over-vsock.pcapng."""

        protocol_version = "HTTP/1.1"
        server_version = "keys-demo/1.0"
        wbufsize = 1 << 16

        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def version_string(self) -> str:
            return self.server_version

        def date_time_string(self, timestamp: float | None = None) -> str:
            return date

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Keys


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler], unix_path: str | None = None) -> Iterator[str]:
    """The service on TCP loopback (yields ``tcp:127.0.0.1:PORT``) or on a unix socket
    (yields ``uds:PATH`` for a PATH_8080 socket)."""
    if unix_path is None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        where = f"tcp:127.0.0.1:{server.server_address[1]}"
    else:
        class UnixHTTPServer(ThreadingHTTPServer):
            address_family = socket.AF_UNIX

            def server_bind(self) -> None:
                self.socket.bind(self.server_address)  # no getfqdn of a path

            def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
                sock, _ = self.socket.accept()
                return sock, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port)

        server = UnixHTTPServer(f"{unix_path}_8080", handler)  # type: ignore[arg-type]
        where = f"uds:{unix_path}"
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield where
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


@contextlib.contextmanager
def seqpacket_server(path: str, replies: dict[bytes, bytes] = SEQ_REPLIES) -> Iterator[list[bytes]]:
    """A unix SOCK_SEQPACKET service at ``path``: each message answered from ``replies``, one
    connection after another, until the client closes; yields the messages it got."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    got: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    while msg := conn.recv(65536):
                        got.append(msg)
                        conn.send(replies.get(msg, b"ERR unknown"))
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield got
    finally:
        stop.set()
        t.join(5)
        listener.close()
