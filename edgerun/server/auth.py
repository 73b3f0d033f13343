"""Bearer-token check for every endpoint but the health ones."""

from __future__ import annotations

import hmac

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


class BearerAuth:
    """Compares ``Authorization: Bearer <token>`` in constant time."""

    def __init__(self, token: str):
        self._expected = token.encode()

    def allows(self, scope: dict) -> bool:
        if scope["path"] in OPEN_PATHS:
            return True
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, given = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._expected)
        return False
