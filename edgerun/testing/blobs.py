"""A static HTTP file server with Range support, for tests and benchmarks of URL transfers."""

from __future__ import annotations

import re
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        blobs = self.server.blobs
        name = self.path.rsplit("/", 1)[-1]
        path = blobs.root / name
        blobs.requests.append((name, self.headers.get("Range")))
        if not name or not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        m = _RANGE.match(self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        with blobs.lock:
            drop = blobs.drops > 0
            blobs.drops -= drop
        left = end - start + 1
        if drop:
            left = min(left, blobs.drop_after)
        with open(path, "rb") as f:
            f.seek(start)
            while left > 0:
                block = f.read(min(left, 1 << 16))
                if not block:
                    break
                self.wfile.write(block)
                blobs.bytes_sent += len(block)
                left -= len(block)
        if drop:  # the connection dies mid-body, as on a flaky link
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    blobs: "BlobServer"


class BlobServer:
    """Serves ``root/<name>`` at ``http(s)://127.0.0.1:<port>/<name>``, honouring Range requests.

    ``drop(n, after)`` makes the next ``n`` answers end the connection after ``after`` body bytes;
    ``requests`` lists ``(name, Range header)`` of every request and ``bytes_sent`` counts body bytes.
    """

    def __init__(self, root: Path, tls: tuple[Path, Path] | None = None):
        """``tls``: (certificate, key) files to serve HTTPS with."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str | None]] = []
        self.bytes_sent = 0
        self.drops = 0
        self.drop_after = 0
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.blobs = self
        scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def drop(self, n: int, after: int) -> None:
        with self.lock:
            self.drops, self.drop_after = n, after

    def __enter__(self) -> "BlobServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


__all__ = ["BlobServer"]
