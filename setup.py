"""Build splitlearn_comm._core: the C core (csrc/core) and its CPython bindings
(csrc/py), on Debian's gRPC C core and protobuf-c, with flags from pkg-config.

The protobuf-c code is generated from proto/ at build time (scripts/gen_proto.py)
into the build folder; nothing generated is committed.

Environment:
  SPLITLEARN_SANITIZE=1   build with AddressSanitizer and UndefinedBehaviorSanitizer
  SPLITLEARN_DEBUG=1      -O0 -g
"""
from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent
PKGS = ("grpc", "libprotobuf-c", "zlib", "libzstd")


def pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", *args, *PKGS], check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            f"pkg-config could not find {' '.join(PKGS)} ({exc}); "
            "install the system packages with: sudo scripts/install-system-deps.sh") from exc
    return shlex.split(out)


class BuildExt(build_ext):
    """Generate the protobuf-c sources, then build as usual."""

    def build_extensions(self) -> None:
        sys.path.insert(0, str(ROOT / "scripts"))
        import gen_proto  # noqa: E402  (a build-time helper of this repository)

        gen_dir = pathlib.Path(self.build_temp).resolve() / "gen"
        generated = gen_proto.generate(gen_dir)
        for ext in self.extensions:
            ext.sources = [*ext.sources, *(os.path.relpath(p, ROOT) for p in generated)]
            ext.include_dirs.insert(0, str(gen_dir))
        super().build_extensions()


sanitize = os.environ.get("SPLITLEARN_SANITIZE") == "1"
debug = os.environ.get("SPLITLEARN_DEBUG") == "1" or sanitize
cflags = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden",
          "-Wno-missing-field-initializers", *pkg_config("--cflags")]
ldflags = pkg_config("--libs")
if debug:
    cflags += ["-O1" if sanitize else "-O0", "-g", "-fno-omit-frame-pointer"]
else:
    cflags += ["-O2"]
if sanitize:
    cflags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    ldflags += ["-fsanitize=address,undefined"]

core_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "core").glob("*.c"))
py_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "py").glob("*.c"))

setup(
    ext_modules=[
        Extension(
            "splitlearn_comm._core",
            sources=core_sources + py_sources,
            include_dirs=["csrc/core", "csrc/py"],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
