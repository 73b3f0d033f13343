"""The inference service shared by every front end (HTTP, gRPC): look-up, checks, scheduling, statistics."""
