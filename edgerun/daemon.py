"""``edgerun serve``: load the configured models, serve HTTP, run the MQTT agent, until told to stop.

Under systemd (``Type=notify``) the daemon reports ``READY=1`` once the configured models serve,
``STATUS=`` on changes, ``WATCHDOG=1`` from the event loop while healthy and ``STOPPING=1`` on
shutdown. SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the configuration (see docs/service.md).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from edgerun.autotune import AutoTuner
from edgerun.config import Config, ModelConfig
from edgerun.devicekey import DeviceKey
from edgerun.errors import EdgerunError, IntegrityError
from edgerun.runtime import LoadedModel, Runtime
from edgerun.systemd import Notifier, watchdog_interval

log = logging.getLogger(__name__)

EXTEND_SECONDS = 30.0  # EXTEND_TIMEOUT_USEC asks for this much more, renewed while a model loads
AGENT_STOP_TIMEOUT = 10.0  # seconds to let the update worker reach a journalled state on shutdown


@dataclass
class Daemon:
    """The running service: one Runtime shared by the HTTP server and the update agent."""

    config: Config
    reload_config: Callable[[], Config] | None = None  # re-reads file + environment + CLI flags on SIGHUP
    notifier: Notifier = field(default_factory=Notifier.from_env)
    log_level_fixed: bool = False  # --log-level given: a reload does not change the level
    runtime: Runtime = field(init=False)
    server: Any = None
    grpc: Any = None
    agent: Any = None
    app: Any = None
    access: Any = None  # edgerun.serving.access.Access: the server's tokens, checked before models load

    def __post_init__(self) -> None:
        self.runtime = Runtime(profile=self.config.profile, memory_budget=self.config.memory_budget,
                               threads=self.config.threads, device_key=DeviceKey.from_config(self.config))
        self.tuner = AutoTuner(self.runtime, self.config.tuning, self.config.state_dir, on_tuned=self._tuned)
        self._loaded: dict[ModelConfig, LoadedModel] = {}
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._ready = False
        self._reload_task: asyncio.Task | None = None
        self._reload_again = False
        self._reloading = False
        self._status = ""
        self._grpc_stopped: asyncio.Task | None = None

    # --- the main loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Load, serve until SIGTERM/SIGINT (or ``request_stop()``), drain and clean up."""
        loop = asyncio.get_running_loop()
        _hide_secrets(self.config)
        log.debug("configuration from %s%s; profile %s, budget %s", self.config.source or "built-in defaults",
                  f" with {', '.join(self.config.overrides)}" if self.config.overrides else "",
                  self.config.profile or "detected", self.config.memory_budget or "the profile's")
        self._stop = asyncio.Event()
        installed = self._install_signals(loop)
        try:
            self._check_access()
            await self._start()
            if not self._stopping:
                await self._serve()
        except BaseException as exc:
            if not isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
                self.notifier.status(f"failed: {exc}")
            raise
        finally:
            if self._reload_task is not None:
                self._reload_task.cancel()
            await self._shutdown()
            for sig in installed:
                loop.remove_signal_handler(sig)
                if sig != signal.SIGINT:
                    signal.signal(sig, signal.SIG_IGN)  # a repeated SIGTERM while exiting must not kill us

    def request_stop(self) -> None:
        """Stop accepting requests, let those in flight finish (``server.drain_timeout``), then exit."""
        if self._stopping:
            return
        self._stopping = True
        in_flight = self.server.in_flight if self.server is not None else 0
        log.info("stopping: draining %d request(s) in flight", in_flight)
        self.notifier.stopping(f"stopping: draining {in_flight} request(s)")
        self.notifier.extend_timeout(self.config.server.drain_timeout + AGENT_STOP_TIMEOUT + 5)
        if self.server is not None:
            self.server.request_stop()
        if self.grpc is not None and self._grpc_stopped is None:
            grace = self.config.server.drain_timeout
            self._grpc_stopped = asyncio.get_running_loop().create_task(self.grpc.stop(grace))
        if self._stop is not None:
            self._stop.set()

    def request_reload(self) -> None:
        """Re-read the configuration (SIGHUP); a reload already running is followed by one more."""
        if self._stopping:
            return
        if not self._ready:
            log.info("SIGHUP during start-up: reloading once serving")
            self._reload_again = True
            return
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = asyncio.get_running_loop().create_task(self.reload())

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        installed = []
        for sig, handler in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                             (signal.SIGHUP, self.request_reload)):
            try:
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals
                pass
        return installed

    def _check_access(self) -> None:
        """Read the tokens and check the TLS files before the models load: a mistake stops the start at once."""
        from edgerun.serving.access import Access
        from edgerun.serving.tls import server_tls

        self.access = Access.from_config(self.config.server)
        server_tls(self.config.server)
        if self.config.server.tokens_file is not None:
            log.info("tokens: %d from %s", len(self.access.names()), self.config.server.tokens_file)

    async def _start(self) -> None:
        self.notifier.status("loading models")
        for m in self.config.models:
            if self._stopping:
                return
            await self._load(m)
        if self.config.mqtt.enabled and not self._stopping:
            await self._start_agent(self.config, restore=True)

    async def _serve(self) -> None:
        from edgerun.server.app import create_app
        from edgerun.server.http import HttpServer
        from edgerun.serving.service import InferenceService

        config = self._app_config()
        # one service for both front ends: closed once both have stopped (gRPC may still be draining when HTTP
        # has stopped, and a stream's requests still arriving need its executor)
        service = InferenceService(self.runtime, config, access=self.access)
        self.app = create_app(self.runtime, config, service)
        self.server = HttpServer(self.app, self.config.server, handle_signals=False)
        self.server.check_security()
        await self._start_grpc()
        serving = asyncio.create_task(self.server.serve(), name="edgerun-http")
        started = asyncio.create_task(self.server.started.wait())
        await asyncio.wait({serving, started}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
        if serving.done():
            serving.result()  # a listen error: raise it
            return
        self._ready = True
        self._status = self.status_line()
        self.notifier.ready(self._status)
        log.info("ready: %s", self._status)
        tasks = [asyncio.create_task(self._watchdog(serving), name="edgerun-watchdog"),
                 asyncio.create_task(self._status_updates(), name="edgerun-status")]
        if self._reload_again:
            self.request_reload()
        try:
            await serving
        finally:
            for t in tasks:
                t.cancel()
            self._ready = False
            if self.grpc is not None:
                await (self._grpc_stopped or self.grpc.stop(self.config.server.drain_timeout))
            await asyncio.to_thread(service.close)  # waits for the runs in flight, off the loop

    async def _start_grpc(self) -> None:
        """The gRPC front end beside HTTP, sharing its inference service, unless ``server.grpc_port`` is 0."""
        if not self.config.server.grpc_port:
            return
        try:
            from edgerun.grpc.server import GrpcServer
        except ImportError as exc:
            log.warning("gRPC is off: %s (pip install 'edgerun[grpc]', or set server.grpc_port = 0)", exc)
            return
        from edgerun.serving.service import EXTENSIONS

        self.grpc = GrpcServer(self.app.state.service, self.config.server, EXTENSIONS)
        await self.grpc.start()

    async def _watchdog(self, serving: asyncio.Task) -> None:
        """``WATCHDOG=1`` at half of ``WATCHDOG_USEC``, from the event loop, only while healthy."""
        interval = watchdog_interval()
        if interval is None or not self.notifier.enabled:
            return
        log.debug("systemd watchdog: pinging every %.2fs", interval)
        while True:
            if self.healthy(serving):
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _status_updates(self, every: float = 2.0) -> None:
        """``STATUS=`` when what is served or the MQTT connection changes (e.g. an update swapped a model)."""
        while True:
            await asyncio.sleep(every)
            line = self.status_line()
            if line != self._status and not self._stopping and not self._reloading:
                self._status = line
                self.notifier.status(line)

    def healthy(self, serving: asyncio.Task | None = None) -> bool:
        """Serving HTTP and not shutting down (a frozen event loop cannot even ask)."""
        return self._ready and not self._stopping and (serving is None or not serving.done())

    def status_line(self) -> str:
        models = self.runtime.models()
        names = ", ".join(f"{m.name} v{m.version}" for m in models) or "no models"
        addresses = [*(self.server.addresses if self.server is not None else ()),
                     *([self.grpc.address] if self.grpc is not None and self.grpc.address else ())]
        where = ", ".join(addresses) or "not listening"
        mqtt = ""
        if self.agent is not None:
            mqtt = "; MQTT connected" if getattr(self.agent, "connected", False) else "; MQTT connecting"
        return f"serving {names} on {where}{mqtt}"

    async def _shutdown(self) -> None:
        await asyncio.to_thread(self.tuner.stop)
        if self.agent is not None:
            await asyncio.to_thread(_stop_agent, self.agent)
            self.agent = None
        self.runtime.close()
        log.info("stopped")

    # --- models and the agent ---------------------------------------------------------------

    async def _load(self, m: ModelConfig) -> LoadedModel:
        """Load one configured model off the event loop, asking systemd for more time while it runs."""
        self.notifier.status(f"loading {m.path}")
        self.notifier.extend_timeout(EXTEND_SECONDS)
        task = asyncio.ensure_future(asyncio.to_thread(self._prepare, m))
        while True:
            done, _ = await asyncio.wait({task}, timeout=EXTEND_SECONDS / 3)
            if done:
                break
            self.notifier.extend_timeout(EXTEND_SECONDS)
        model = task.result()
        self.runtime.activate(model, keep_other_versions=True)
        log.info("serving %s v%d (%s on %s)", model.name, model.version, model.variant.id, model.backend)
        self._loaded[m] = model
        if m.variant is None and m.backend is None:  # a variant or backend set in the configuration is not tuned
            self.tuner.activated(model, mode=m.tune, budget=m.tune_budget)
        return model

    def _prepare(self, m: ModelConfig) -> LoadedModel:
        """Load a configured model: on the cached tuned pick when there is one (docs/tuning.md), else the default."""
        if m.variant is None and m.backend is None and (m.tune or self.config.tuning.mode) != "off":
            pkg = self.runtime.open_package(m.path)
            info = self.tuner.cached(pkg)
            if info is not None and info.chosen is not None:
                c = info.chosen
                try:
                    return self.runtime.prepare(pkg, variant=c.variant, backend=c.backend, options=c.options)
                except EdgerunError as exc:
                    log.warning("%s v%d: the cached tuned pick (%s on %s) does not load here now: %s; loading the "
                                "default choice", pkg.name, pkg.version, c.variant, c.backend, exc)
            return self.runtime.prepare(pkg)
        return self.runtime.prepare(m.path, variant=m.variant, backend=m.backend)

    def _tuned(self, info: Any) -> None:
        """A model now serves its tuned pick: the agent's next status carries what was measured."""
        if self.agent is not None:
            self.agent.status_changed()

    async def _start_agent(self, config: Config, *, restore: bool) -> None:
        from edgerun.agent import Agent

        self.agent = Agent(self.runtime, config)
        self.agent.tuner = self.tuner
        if restore:
            self.notifier.status("restoring the update agent's models")
            self.notifier.extend_timeout(EXTEND_SECONDS * 2)
            await asyncio.to_thread(self.agent.restore)  # serve the store's active versions, finish/roll back
        self.agent.start()  # connects in the background: a device starts offline too

    # --- SIGHUP -----------------------------------------------------------------------------

    async def reload(self) -> None:
        """Apply a re-read configuration: the tokens file, models, log level and MQTT now; the rest after a restart."""
        while True:
            self._reload_again = False
            self._reloading = True
            self.notifier.reloading()
            self.notifier.status("reloading configuration")
            try:
                await self._apply(await asyncio.to_thread(self._read_config))
            except asyncio.CancelledError:
                raise
            except EdgerunError as exc:
                log.error("reload failed, keeping the previous configuration: %s", exc)
                self.notifier.ready(f"reload failed: {exc}; {self.status_line()}")
            except Exception:
                log.exception("reload failed, keeping the previous configuration")
                self.notifier.ready(f"reload failed; {self.status_line()}")
            else:
                self._status = self.status_line()
                self.notifier.ready(self._status)
            finally:
                self._reloading = False
            if not self._reload_again or self._stopping:
                return

    def _read_config(self) -> Config:
        if self.reload_config is None:
            raise EdgerunError("no configuration file to reload")
        return self.reload_config()

    async def _apply(self, new: Config) -> None:
        old = self.config
        log.info("reloading the configuration from %s", new.source or "defaults")
        _hide_secrets(new)
        if self.access is not None:
            await asyncio.to_thread(self.access.reload)  # the tokens file (a revocation); broken: nothing changes
        if new.log_level != old.log_level and not self.log_level_fixed:
            logging.getLogger().setLevel(new.log_level)
            log.info("log level is now %s", new.log_level)
        await self._apply_models(new.models)
        self.config = replace(old, models=new.models, log_level=new.log_level, mqtt=new.mqtt, source=new.source)
        reconfigure = getattr(getattr(self.app, "state", None), "reconfigure", None)
        if reconfigure is not None:
            reconfigure(self._app_config())
        if new.mqtt != old.mqtt:
            if self.agent is not None:
                log.info("MQTT settings changed: restarting the update agent")
                await asyncio.to_thread(_stop_agent, self.agent)
                self.agent = None
            if new.mqtt.enabled:
                await self._start_agent(self.config, restore=False)
        for key, before, after in restart_only_changes(old, new):
            log.warning("%s changed (%s -> %s): not applied while running, kept %s until the next restart",
                        key, before, after, before)

    def _app_config(self) -> Config:
        """The config the HTTP app schedules by: each [[models]] entry named after the model it loaded.

        The app finds an entry's model by its package directory or name; a bare model file has neither an
        edgerun.toml to read the name from nor a directory of its own.
        """
        models = tuple(replace(m, name=self._loaded[m].name) if m.name is None and m in self._loaded else m
                       for m in self.config.models)
        return replace(self.config, models=models)

    async def _apply_models(self, wanted: tuple[ModelConfig, ...]) -> None:
        keep: dict[ModelConfig, LoadedModel] = {}
        load: list[ModelConfig] = []
        for m in wanted:
            current = self._loaded.get(m)
            if current is not None:
                if not await asyncio.to_thread(_changed_on_disk, m, current):  # hashes a bare model file
                    keep[m] = current
                    continue
            load.append(m)
        gone = [model for m, model in self._loaded.items() if m not in keep]
        self._loaded = dict(keep)
        for m in load:  # prepared and activated one by one: each swap is atomic for its requests
            model = await self._load(m)
            log.info("reload: now serving %s v%d from %s", model.name, model.version, m.path)
        live = {(model.name, model.version) for model in self._loaded.values()}
        for model in gone:
            if (model.name, model.version) in live:
                continue
            try:
                self.runtime.unload(model.name, model.version)
                log.info("reload: no longer serving %s v%d", model.name, model.version)
            except EdgerunError:
                pass  # already replaced (e.g. by an update)


def _changed_on_disk(m: ModelConfig, current: LoadedModel) -> bool:
    """Whether ``m.path`` now holds another model: a package of another name or version, a model file of other bytes."""
    from edgerun.package import ModelPackage

    try:
        if current.package.model_file is not None:  # a bare model file is always version 1: compare its bytes
            if not m.path.is_file():
                return False  # keep serving what works; the error shows at the next load
            current.package.verify(current.variant)  # size, then sha256, of the file (and an IR's .bin)
            return False
        on_disk = ModelPackage.load(m.path)
        return (on_disk.name, on_disk.version) != (current.name, current.version)
    except IntegrityError:
        return True
    except EdgerunError:
        return False  # keep serving what works; the error shows at the next load


RESTART_ONLY = ("state_dir", "profile", "memory_budget", "threads", "device_key_file", "fleet_key_file",
                "tuning")  # and every key of [server]


def restart_only_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of each setting a reload cannot apply: the listener, state dir, profile, ..."""
    pairs = [(key, getattr(old, key), getattr(new, key)) for key in RESTART_ONLY]
    pairs += [(f"server.{f.name}", getattr(old.server, f.name), getattr(new.server, f.name))
              for f in fields(old.server)]
    return [(key, a, b) for key, a, b in pairs if a != b]


def _hide_secrets(config: Config) -> None:
    """Register the token and password so no log line shows them."""
    from edgerun.logs import hide

    for secret in (config.server.token, config.mqtt.password):
        try:
            hide(secret())
        except EdgerunError:
            pass  # an unreadable secret file is reported where it is used, with its key


def _stop_agent(agent: Any) -> None:
    """Stop the agent and give its worker time to reach a journalled state (updates resume on restart)."""
    agent.stop()
    deadline = time.monotonic() + AGENT_STOP_TIMEOUT
    for t in list(getattr(agent, "_threads", ())):
        if isinstance(t, threading.Thread):
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("update agent thread %s still busy after %.0fs; its journal resumes it at the next start",
                            t.name, AGENT_STOP_TIMEOUT)

