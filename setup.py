"""edgerun's one compiled part, and an optional one: the native gRPC server (``edgerun.grpc._native``).

It is built where gRPC's C++ library and ``pkg-config`` are installed (Debian and Ubuntu: ``apt-get install
libgrpc++-dev pkg-config``); elsewhere edgerun installs without it and serves gRPC with grpcio. The environment
variable ``EDGERUN_NATIVE_GRPC`` decides otherwise: ``0`` never builds it, ``1`` fails the install when it cannot
be built. Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

WANT = os.environ.get("EDGERUN_NATIVE_GRPC", "auto").strip().lower()


def grpc_flags() -> tuple[list[str], list[str]] | None:
    """gRPC C++'s compile and link flags, from pkg-config; None when it is not installed."""
    try:
        cflags, libs = (subprocess.run(["pkg-config", option, "grpc++"], capture_output=True, text=True,
                                       check=True).stdout for option in ("--cflags", "--libs"))
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(cflags), shlex.split(libs)


class OptionalBuildExt(build_ext):
    """Build the native gRPC server if it can be built, and say so (and how to get it) if it cannot."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            if WANT in ("1", "true", "yes"):
                raise
            self.warn(f"edgerun's native gRPC server was not built ({exc}); gRPC will be served by grpcio")


def extensions() -> list[Extension]:
    if WANT in ("0", "false", "no"):
        return []
    flags = grpc_flags()
    if flags is None:
        if WANT in ("1", "true", "yes"):
            raise SystemExit("EDGERUN_NATIVE_GRPC=1 but pkg-config finds no grpc++ (apt-get install libgrpc++-dev "
                             "pkg-config)")
        print("edgerun: gRPC's C++ library not found (pkg-config grpc++): the native gRPC server is not built; "
              "gRPC will be served by grpcio")
        return []
    cflags, libs = flags
    return [Extension("edgerun.grpc._native", ["edgerun/grpc/_native.cpp"], language="c++",
                      extra_compile_args=["-std=c++17", "-O2", *cflags], extra_link_args=libs)]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
