"""The package's types: mypy --strict (pyproject.toml's [tool.mypy]) on the package,
and mypy's stubtest of splitlearn_comm/_core.pyi against the built extension, so
the stub cannot drift from csrc/py."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

pytest.importorskip("mypy", reason="mypy is in requirements-dev.txt")

#: mypy with a cold cache on a loaded machine
TIMEOUT_S = 300


def _mypy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_mypy_strict() -> None:
    proc = _mypy("mypy", "--config-file", f"{ROOT}/pyproject.toml", "--cache-dir",
                 f"{ROOT}/build/mypy-cache", "-p", "splitlearn_comm")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_core_stub_matches_the_extension() -> None:
    proc = _mypy("mypy.stubtest", "--mypy-config-file", f"{ROOT}/pyproject.toml",
                 "splitlearn_comm._core")
    assert proc.returncode == 0, proc.stdout + proc.stderr
