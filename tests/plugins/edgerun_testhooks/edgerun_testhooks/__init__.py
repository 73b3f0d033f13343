"""edgerun's test switches on its notification hooks: pause the update agent in a state, freeze the loop."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from edgerun.hookspecs import hookimpl

log = logging.getLogger(__name__)

PAUSE_AT = "EDGERUN_TESTHOOKS_PAUSE_AT"
PAUSE_SECONDS = "EDGERUN_TESTHOOKS_PAUSE_SECONDS"
FREEZE_AFTER = "EDGERUN_TESTHOOKS_FREEZE_AFTER"
_frozen = False


def _pause(state: str, version: int) -> None:
    spec = os.environ.get(PAUSE_AT)
    if not spec:
        return
    want, _, ver = spec.partition(":")
    if want == state and (not ver or int(ver) == version):
        seconds = float(os.environ.get(PAUSE_SECONDS, "60"))
        log.warning("%s=%s: pausing %.0fs (test hook)", PAUSE_AT, spec, seconds)
        time.sleep(seconds)


@hookimpl
def on_update_event(model: str, version: int, state: str, detail: str) -> None:
    _pause(state, version)


@hookimpl
def on_model_activated(model: str, version: int, variant: str, backend: str) -> None:
    global _frozen
    _pause("pointer", version)
    seconds = os.environ.get(FREEZE_AFTER)
    if seconds and not _frozen:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # activated off the event loop (an update): nothing to freeze from here
        _frozen = True
        log.warning("%s=%s: the event loop will freeze (test hook)", FREEZE_AFTER, seconds)
        loop.call_later(float(seconds), time.sleep, 3600)
