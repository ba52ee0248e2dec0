#!/usr/bin/env python3
"""Generate the protobuf-c code for proto/*.proto into a build folder.

protoc-c 1.4 (Debian 12) predates proto3 `optional`. An `optional` field is, on
the wire and by protoc's own definition, a field inside a one-field oneof named
after it with a leading underscore, so this script rewrites each
`optional T name = N;` into `oneof _name { T name = N; }` in a copy of the file
under the output folder and runs protoc-c on the copy. proto/ stays the one
source of truth; nothing generated is committed.

Usage: gen_proto.py OUTDIR
"""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ("splitlearn_comm.proto", "health.proto")
OPTIONAL = re.compile(r"^(\s*)optional\s+(\S+)\s+(\w+)\s*=\s*(\d+)\s*;", re.MULTILINE)


def generate(outdir: pathlib.Path) -> list[pathlib.Path]:
    """Write the rewritten protos and their .pb-c.{c,h} into outdir; return the .c files."""
    protoc_c = shutil.which("protoc-c")
    if protoc_c is None:
        raise SystemExit("protoc-c not found: run scripts/install-system-deps.sh")
    src = outdir / "proto"
    src.mkdir(parents=True, exist_ok=True)
    for name in PROTOS:
        text = (ROOT / "proto" / name).read_text()
        text = OPTIONAL.sub(r"\1oneof _\3 { \2 \3 = \4; }", text)
        target = src / name
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    subprocess.run([protoc_c, f"-I{src}", f"--c_out={outdir}", *[str(src / n) for n in PROTOS]],
                   check=True)
    return [outdir / (pathlib.Path(n).stem + ".pb-c.c") for n in PROTOS]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for path in generate(pathlib.Path(sys.argv[1]).resolve()):
        print(path)
