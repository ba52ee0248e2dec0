#!/bin/sh
# Print the path of a CPython VERSION (e.g. 3.12): pyenv's newest build of it
# when there is one ($PYENV_ROOT, default ~/.pyenv), else pythonVERSION on PATH.
set -eu
v=$1
root=${PYENV_ROOT:-$HOME/.pyenv}
py=$(ls -d "$root"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$py" ]; then py=$(command -v "python$v" || true); fi
if [ -z "$py" ]; then echo "no CPython $v found (pyenv install $v, or put python$v on PATH)" >&2; exit 1; fi
echo "$py"
