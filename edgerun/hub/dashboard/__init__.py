"""``edgerun hub dashboard``: a live web page of one fleet (devices, rollouts, events) served by the hub."""

from edgerun.hub.dashboard.app import make_app

__all__ = ["make_app"]
