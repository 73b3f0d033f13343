"""Backend plugins that misbehave while tuning measures them: one crashes, one hangs, one eats memory, one answers
wrongly (right on the warm-up samples, a batch of two, and wrong on single examples).

Each loads ONNX files through onnxruntime when it behaves, so the package's real variants are its candidates.
"""

from __future__ import annotations

import os
import signal
import time

from edgerun.hookspecs import hookimpl
from edgerun_onnxruntime import OnnxRuntimeBackend


class CrashingBackend(OnnxRuntimeBackend):
    """Dies of a segmentation fault while loading."""

    name = "crashing"
    aliases = ()
    primary_formats = ()
    memory_estimate = (1 << 20, 1.0)

    def load(self, path, options):
        os.kill(os.getpid(), signal.SIGSEGV)


class HangingBackend(OnnxRuntimeBackend):
    """Loads, then never returns from a run."""

    name = "hanging"
    aliases = ()
    primary_formats = ()
    memory_estimate = (1 << 20, 1.0)

    def load(self, path, options):
        session = super().load(path, options)
        session.run = lambda inputs: time.sleep(3600)
        return session


class HungryBackend(OnnxRuntimeBackend):
    """Claims to need 1 MiB, then holds 400 MiB."""

    name = "hungry"
    aliases = ()
    primary_formats = ()
    memory_estimate = (1 << 20, 1.0)

    def load(self, path, options):
        session = super().load(path, options)
        import numpy as np

        session.ballast = np.ones(400 << 20, dtype=np.uint8)
        time.sleep(2)
        return session


class WrongBackend(OnnxRuntimeBackend):
    """Right on batches of two (the warm-up sample), the next class on single examples."""

    name = "wrong"
    aliases = ()
    primary_formats = ()
    memory_estimate = (1 << 20, 1.0)

    def load(self, path, options):
        import numpy as np

        session = super().load(path, options)
        run = session.run

        def wrong(inputs):
            out = run(inputs)
            if len(next(iter(inputs.values()))) == 1:
                out = {k: np.roll(v, 1, axis=-1) for k, v in out.items()}
            return out

        session.run = wrong
        return session


@hookimpl
def register_backends(register):
    for cls in (CrashingBackend, HangingBackend, HungryBackend, WrongBackend):
        register(cls)
