"""What each HTTP path needs from access control: an action and the model it names, or nothing (health)."""

from __future__ import annotations

from edgerun.serving.access import ADMIN, INFER, METADATA, METRICS, SERVER

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def needs(path: str) -> tuple[str, str | None] | None:
    """(action, model or None for every model) for a path without its trailing slash; None when it is open.

    A path that names no endpoint needs a valid token (SERVER), then answers 404: an anonymous caller learns
    nothing of the server's endpoints or models.
    """
    if path in OPEN_PATHS:
        return None
    if path == "/metrics":
        return METRICS, None
    parts = path.split("/")  # ['', 'v2', 'models', m, ...] or ['', 'v2', 'repository', ...]
    if len(parts) < 4 or parts[1] != "v2":
        return SERVER, None
    if parts[2] == "models" and parts[3]:
        if len(parts) == 4 and parts[3] == "stats":
            return METADATA, None
        return (INFER if parts[-1] == "infer" else METADATA), parts[3]
    if parts[2] == "repository":
        if len(parts) == 4 and parts[3] == "index":
            return METADATA, None
        if len(parts) == 6 and parts[3] == "models":
            return ADMIN, parts[4]
    return SERVER, None
