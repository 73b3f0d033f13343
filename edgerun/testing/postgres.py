"""A real PostgreSQL for tests: a server of its own on a free port, and fresh databases on a running one.

>>> with Postgres() as pg:                     # doctest: +SKIP
...     url = pg.create_database("hub")         # postgresql://postgres@127.0.0.1:PORT/hub
...     pg.stop(); pg.start()                   # the data survives, as after a real outage

``Postgres`` runs the installed server's own ``initdb`` and ``pg_ctl`` (on the PATH, else the newest under
``/usr/lib/postgresql/*/bin``) in a directory of its own, with trust authentication on 127.0.0.1 only; as
root it runs them as the ``postgres`` user, since the server refuses to run as root. ``fresh_database``
makes a database on a server that is already running (this machine kind runs one on 127.0.0.1:5432).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from edgerun.testing.mosquitto import free_port

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432"


def find_postgres() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                  if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if os.access(Path(d) / "pg_ctl", os.X_OK) and os.access(Path(d) / "initdb", os.X_OK):
            return Path(d)
    return None


class Postgres:
    """One PostgreSQL server in a temporary directory; ``stop()`` and ``start()`` keep its port and data."""

    def __init__(self, port: int | None = None):
        bindir = find_postgres()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (apt install postgresql)")
        self.bindir = bindir
        self.port = port or free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root, and no runuser to start PostgreSQL as the postgres user")
            self._as = [runuser, "-u", "postgres", "--"]
        self.workdir = Path(tempfile.mkdtemp(prefix="edgerun-pg-"))
        self.datadir = self.workdir / "data"
        self.log = self.workdir / "postgres.log"
        if self._as:
            shutil.chown(self.workdir, "postgres")
        self.running = False

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        r = subprocess.run([*self._as, str(self.bindir / tool), *args], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}\n{log}")

    def start(self) -> "Postgres":
        if not self.datadir.exists():
            self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-sync")
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self.running = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down (``fast``: its clients are disconnected at once); ``start()`` brings it back."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")
            self.running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def fresh_database(server: str = LOCAL_SERVER) -> str | None:
    """The URL of a new, empty database on a running server, or None when none answers there."""
    try:
        import psycopg

        with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=2) as c:
            name = f"edgerun_t_{uuid.uuid4().hex[:10]}"
            c.execute(f'CREATE DATABASE "{name}"')
            return f"{server}/{name}"
    except Exception:
        return None


def drop_database(url: str) -> None:
    """Drop a database ``fresh_database`` made, whoever is still connected to it."""
    import psycopg

    server, _, name = url.rpartition("/")
    with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
