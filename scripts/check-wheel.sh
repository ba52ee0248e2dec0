#!/bin/sh
# Install a repaired wheel into a fresh virtual environment and run a round trip
# with the Debian gRPC libraries hidden: the extension must load everything it
# needs from the wheel itself (splitlearn_comm.libs/).
#
# Usage: scripts/check-wheel.sh PYTHON WHEEL
#
# "Hidden" means: inside a private mount namespace (unshare -m, as root), every
# shared library of the Debian packages our extension links against
# (DEBIAN_LIBS below: what `ldd` of a development build resolves to, less the
# libraries every manylinux system has) is covered by /dev/null. The process
# then checks /proc/self/maps: each gRPC-related library it mapped must come
# from splitlearn_comm.libs.
set -eu
PY=$1
WHEEL=$2
HERE=$(cd "$(dirname "$0")/.." && pwd)
AUDITWHEEL=${AUDITWHEEL:-$HERE/.venv/bin/auditwheel}
DEBIAN_LIBS="libgrpc29 libabsl20220623 libc-ares2 libprotobuf-c1 libre2-9 libssl3 libzstd1"
WORK=$HERE/build/wheel-check/$(basename "$WHEEL" .whl)

echo "== $(basename "$WHEEL")"
"$AUDITWHEEL" show "$WHEEL" 2>/dev/null | tr '\n' ' ' | grep -o 'consistent with the following platform tag: "[^"]*"'
rm -rf "$WORK"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL" 2>&1 \
  | grep -v "^WARNING: Location" || true

hidden=""
for pkg in $DEBIAN_LIBS; do
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    for f in $(dpkg -L "$pkg" | grep '\.so'); do
      if [ -f "$f" ] && [ ! -L "$f" ]; then hidden="$hidden $f"; fi
    done
  fi
done

cat > "$WORK/roundtrip.py" <<'PYEOF'
import os, sys
import numpy as np
import splitlearn_comm as slc
from splitlearn_comm import _core

class Double(slc.ComputeFunction):
    def compute(self, x):
        return np.asarray(x) * 2

x = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
with slc.GRPCComputeServer(Double(), host="127.0.0.1", port=0) as server:
    with slc.GRPCComputeClient(f"127.0.0.1:{server.port}", timeout=30.0) as client:
        y = np.asarray(client.compute(x))
assert np.array_equal(y, x * 2), "round trip returned wrong values"

libs_dir = os.path.realpath(os.path.join(os.path.dirname(_core.__file__), "..", "splitlearn_comm.libs"))
ours = ("libgrpc", "libgpr", "libupb", "libaddress_sorting", "libabsl", "libre2", "libcares",
        "libprotobuf-c", "libssl", "libcrypto", "libzstd")
mapped = set()
with open("/proc/self/maps") as maps:
    for line in maps:
        path = line.split()[-1]
        if path.startswith("/") and os.path.basename(path).startswith(ours):
            mapped.add(os.path.realpath(path))
outside = sorted(p for p in mapped if os.path.dirname(p) != libs_dir)
assert not outside, f"loaded from outside the wheel: {outside}"
assert any(os.path.basename(p).startswith("libgrpc") for p in mapped), "no libgrpc mapped"
print(f"round trip ok on Python {sys.version.split()[0]}: {len(mapped)} libraries, all from "
      f"{os.path.relpath(libs_dir, sys.prefix)}; package at {os.path.dirname(slc.__file__)}")
PYEOF

CORE=$(ls "$WORK"/venv/lib/python*/site-packages/splitlearn_comm/_core*.so)
set -- $hidden
echo "hiding $# shared libraries of:$DEBIAN_LIBS"
# shellcheck disable=SC2016
unshare -m sh -eu -c '
  core=$1; py=$2; script=$3; shift 3
  for f in "$@"; do mount --bind /dev/null "$f"; done
  # the control: the system libgrpc must now fail to load
  if "$py" -I -c "import ctypes; ctypes.CDLL(\"libgrpc.so.29\")" 2>/dev/null; then
    echo "the system libgrpc.so.29 still loads: hiding failed"; exit 1
  fi
  if ldd "$core" | grep "not found"; then echo "ldd: a library is missing"; exit 1; fi
  ldd "$core" | awk "/=> \// { if (\$3 ~ /splitlearn_comm.libs/) n++; else sys = sys \" \" \$1 }
    END { printf \"ldd, system gRPC hidden: %d libraries from splitlearn_comm.libs; from the system:%s\n\", n, sys }"
  cd /
  "$py" -I "$script"
' sh "$CORE" "$WORK/venv/bin/python" "$WORK/roundtrip.py" $hidden
