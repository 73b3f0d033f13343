"""What the HTTP routes share: the inference service (with its access control), HTTP's body limit and disconnect
watch."""

from __future__ import annotations

from edgerun.config import Config
from edgerun.runtime import Runtime
from edgerun.server.asgi import DisconnectWatch
from edgerun.serving.service import InferenceService


class ServerState:
    def __init__(self, runtime: Runtime, config: Config, service: InferenceService | None = None):
        self.runtime = runtime
        self._owns_service = service is None  # a service handed in is shared (gRPC): its owner closes it
        self.service = service or InferenceService(runtime, config)
        self.metrics = self.service.metrics
        self.max_body = config.server.max_body
        self.repository = self.service.repository
        self.watch = DisconnectWatch()
        self.in_flight = 0

    def reconfigure(self, config: Config) -> None:
        self.service.reconfigure(config)

    def close(self) -> None:
        if self._owns_service:
            self.service.close()
