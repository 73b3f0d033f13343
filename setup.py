"""edgerun's compiled parts, both optional: its two compiled gRPC servers.

- the loop server's HTTP/2 sessions (``edgerun.grpc._h2``), built where nghttp2's headers and ``pkg-config`` are
  installed (Debian and Ubuntu: ``apt-get install libnghttp2-dev pkg-config``);
- the native server (``edgerun.grpc._native``), built where gRPC's C++ library is (``libgrpc++-dev``).

Without either, edgerun serves gRPC with grpcio. The environment variable ``EDGERUN_NATIVE_GRPC`` decides
otherwise: ``0`` builds neither, ``1`` fails the install when one cannot be built. Everything else about the
package is in pyproject.toml.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

WANT = os.environ.get("EDGERUN_NATIVE_GRPC", "auto").strip().lower()
# each compiled gRPC server: its extension, sources and pkg-config package, what installs that, and its role
SERVERS = (("edgerun.grpc._h2", "edgerun/grpc/_h2.cpp", "libnghttp2", "libnghttp2-dev",
            "the loop gRPC server (nghttp2 on the event loop)"),
           ("edgerun.grpc._native", "edgerun/grpc/_native.cpp", "grpc++", "libgrpc++-dev pkg-config",
            "the native gRPC server (gRPC's C++ server)"))


def flags(package: str) -> tuple[list[str], list[str]] | None:
    """A pkg-config package's compile and link flags; None when it is not installed."""
    try:
        cflags, libs = (subprocess.run(["pkg-config", option, package], capture_output=True, text=True,
                                       check=True).stdout for option in ("--cflags", "--libs"))
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(cflags), shlex.split(libs)


class OptionalBuildExt(build_ext):
    """Build each compiled gRPC server if it can be built, and say so (and how to get it) if it cannot."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            if WANT in ("1", "true", "yes"):
                raise
            self.warn(f"edgerun's {ext.name} was not built ({exc}); gRPC will be served by another server")


def extensions() -> list[Extension]:
    if WANT in ("0", "false", "no"):
        return []
    built = []
    for name, source, package, debian, role in SERVERS:
        found = flags(package)
        if found is None:
            if WANT in ("1", "true", "yes"):
                raise SystemExit(f"EDGERUN_NATIVE_GRPC=1 but pkg-config finds no {package} (apt-get install "
                                 f"{debian})")
            print(f"edgerun: pkg-config finds no {package}: {role} is not built (apt-get install {debian})")
            continue
        cflags, libs = found
        built.append(Extension(name, [source], language="c++", extra_compile_args=["-std=c++17", "-O2", *cflags],
                               extra_link_args=libs))
    return built


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
