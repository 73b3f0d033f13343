"""A written package is readable by other users (a systemd DynamicUser service): dirs 0755, files 0644."""

from __future__ import annotations

import os
import stat


def test_package_dir_is_0755_and_its_files_0644_whatever_the_umask(digits_files, tmp_path):
    from edgerun.hub.packager import PackageRequest, package_model

    mine = tmp_path / "notes.txt"  # a file of the user's beside the package: not the packager's to change
    mine.write_text("private")
    mine.chmod(0o600)
    out = tmp_path / "digits"
    req = PackageRequest(model=digits_files["model"], name="digits", version=1, validation=digits_files["val"],
                         out=out, precisions=("fp32",), formats=("onnx", "openvino"), repeats=3)
    old = os.umask(0o077)  # files would be written 0600 and mkdtemp's directory is 0700 anyway
    try:
        package_model(req)
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix() or ".": stat.S_IMODE(p.stat().st_mode) for p in (out, *out.rglob("*"))}
    assert modes["."] == 0o755 and "edgerun.toml" in modes and any(p.endswith(".onnx") for p in modes), modes
    assert {p: m for p, m in modes.items() if m != (0o755 if (out / p).is_dir() else 0o644)} == {}
    assert stat.S_IMODE(mine.stat().st_mode) == 0o600
