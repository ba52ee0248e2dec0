#!/bin/sh
# Run the pytest suite against the repaired wheel installed in a fresh virtual
# environment of CPython VERSION (build/pytests/VERSION).
#
# Usage: scripts/test-python.sh VERSION
#
# The environment gets requirements-dev.txt without torch, plus torch only
# where the pinned build exists for that Python (TORCH_PYTHONS, default 3.11:
# the CPU build of torch 2.13.0 on this machine's disk is for 3.11 alone).
# Elsewhere the tests that need torch skip with a reason and the NumPy part runs.
set -eu
v=$1
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
py=$(sh scripts/python-for.sh "$v")
tag=cp$(echo "$v" | tr -d .)
wheel=$(ls dist/splitlearn_comm-*-"$tag"-"$tag"-manylinux*.whl 2>/dev/null | tail -n 1 || true)
if [ -z "$wheel" ]; then echo "no repaired wheel for $tag in dist/: run make wheel" >&2; exit 1; fi
env=build/pytests/$v
rm -rf "$env"
"$py" -m venv "$env"
grep -v '^torch' requirements-dev.txt > "$env/requirements.txt"
case " ${TORCH_PYTHONS:-3.11} " in
  *" $v "*) grep '^torch' requirements-dev.txt >> "$env/requirements.txt" ;;
esac
"$env/bin/python" -m pip install -q --disable-pip-version-check "$wheel" -r "$env/requirements.txt" 2>&1 \
  | grep -v "^WARNING: Location" || true
echo "== CPython $("$env/bin/python" -c 'import sys; print(sys.version.split()[0])') with $(basename "$wheel")"
# The tests run from a copy of the tree without the package's source (all but
# splitlearn_comm/, csrc/ and setup.py), so that neither the working directory nor the
# PYTHONPATH the tests give their child processes can shadow the installed wheel.
mkdir -p "$env/tree"
for f in $(ls -A); do
  case "$f" in
    splitlearn_comm|csrc|setup.py|build|dist|.venv|.git|*.egg-info) ;;
    *) cp -r "$f" "$env/tree/" ;;
  esac
done
find "$env/tree" -name __pycache__ -prune -exec rm -rf {} +
# the user's guide that tests/test_guide.py checks lives in shared/, in or beside the checkout
for g in "$HERE/shared/seed/extending.zh.md" "$HERE/../shared/seed/extending.zh.md"; do
  if [ -z "${SPLITLEARN_GUIDE:-}" ] && [ -f "$g" ]; then SPLITLEARN_GUIDE=$(realpath "$g"); export SPLITLEARN_GUIDE; fi
done
cd "$env/tree"
SPLITLEARN_TEST_INSTALLED=1 ../bin/python -m pytest -q -p no:cacheprovider -rfEs tests
