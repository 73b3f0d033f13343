"""Put a plugin distribution on a subprocess's path as an install would: its modules and a ``*.dist-info``."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgerun.tomlfile import read_toml


def site_dir(dist: Path, dest: Path) -> Path:
    """Copy the plugin project at ``dist`` (a pyproject.toml beside its package) into ``dest`` with the entry
    points its pyproject.toml declares; put ``dest`` on ``PYTHONPATH`` and ``importlib.metadata`` finds it."""
    project = read_toml(dist / "pyproject.toml")["project"]
    name, version = project["name"], project["version"]
    eps = project.get("entry-points", {})
    dest.mkdir(parents=True, exist_ok=True)
    package = name.replace("-", "_")
    shutil.copytree(dist / package, dest / package, dirs_exist_ok=True)
    info = dest / f"{package}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) for group, entries in eps.items()))
    return dest
