"""The limits of ``[server]`` that every listener holds its connections to: the HTTP front door
(``edgerun.server.http.FrontDoor``) and the loop gRPC server (``edgerun.grpc.server``) each keep their own
connection counts, and share one count of the request bytes held (``server.max_body_total``)."""

from __future__ import annotations

from array import array

from edgerun.config import ServerConfig


# The request bytes the process's listeners hold at once, HTTP bodies and gRPC messages together: what
# server.max_body_total bounds. One 8-byte cell ([0]), which the listeners read and add to in place and the loop
# gRPC server's sessions (C++) update too (edgerun.grpc._h2.share_held); every listener runs on the one
# event-loop thread.
HELD = array("q", [0])
SMALL_REQUEST = 64 << 10  # a request body (or gRPC message) this small is always let in: many still hold little


class ConnectionLimits:
    """A listener's limits on its connections, how many are open, and how many it cut, by reason."""

    def __init__(self, config: ServerConfig, reasons: tuple[str, ...], held: array = HELD):
        self.header_timeout = config.header_timeout
        self.body_timeout = config.body_timeout
        self.body_min_rate = config.body_min_rate
        self.body_window = max(1, int(config.body_min_rate * config.body_timeout))  # bytes due per body_timeout
        self.idle_timeout = config.idle_timeout
        self.max_connections = config.max_connections
        self.max_held = config.max_body_total  # request bytes held at once, across connections and listeners
        self.total = held  # [0]: the request bytes held by every listener
        self.open = 0
        self.cut = dict.fromkeys(reasons, 0)
