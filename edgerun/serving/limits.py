"""The limits of ``[server]`` that every listener holds its connections to: the HTTP front door
(``edgerun.server.http.FrontDoor``) and the loop gRPC server (``edgerun.grpc.server``) each keep their own."""

from __future__ import annotations

from edgerun.config import ServerConfig


class ConnectionLimits:
    """A listener's limits on its connections, how many are open, and how many it cut, by reason."""

    def __init__(self, config: ServerConfig, reasons: tuple[str, ...]):
        self.header_timeout = config.header_timeout
        self.body_timeout = config.body_timeout
        self.body_min_rate = config.body_min_rate
        self.body_window = max(1, int(config.body_min_rate * config.body_timeout))  # bytes due per body_timeout
        self.idle_timeout = config.idle_timeout
        self.max_connections = config.max_connections
        self.max_held = config.max_body_total  # request bytes held at once, across connections
        self.open = 0
        self.cut = dict.fromkeys(reasons, 0)
