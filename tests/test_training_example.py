"""examples/split_training.py runs as a user would run it: it starts its server in a
child process, trains on scikit-learn's digits over the wire, prints loss and accuracy
per epoch, reaches the accuracy of the same training done locally, and stops the
server cleanly. Bounded by a timeout; readiness is read from the server's output by
the example itself, never slept for."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NEEDS_TORCH

pytest.importorskip("torch", reason=f"the examples use torch; {NEEDS_TORCH}")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "split_training.py"
TIMEOUT_S = 120

pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits "
                                      "(scikit-learn is in requirements-dev.txt)")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


EPOCH = re.compile(r"epoch (\d+)/(\d+): split loss ([\d.]+) train acc ([\d.]+) test acc ([\d.]+) "
                   r"\| local loss ([\d.]+) train acc ([\d.]+) test acc ([\d.]+)")
FINAL = re.compile(r"final test accuracy: split ([\d.]+), local ([\d.]+)")


@pytest.mark.timeout(TIMEOUT_S + 30)
@pytest.mark.parametrize("args", [(), ("--split", "vanilla", "--codec", "bf16"),
                                  ("--chunks", "4")],
                         ids=["u-raw", "vanilla-bf16", "u-pipelined"])
def test_split_training_example(args) -> None:
    proc = _run(*args)
    report = (f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
              f"--- stderr ---\n{proc.stderr}")
    assert proc.returncode == 0, report
    epochs = [m.groups() for m in EPOCH.finditer(proc.stdout)]
    n = 8
    assert [int(e[0]) for e in epochs] == list(range(1, n + 1)), report
    first_loss, last_loss = float(epochs[0][2]), float(epochs[-1][2])
    assert last_loss < first_loss / 4, report
    final = FINAL.search(proc.stdout)
    assert final is not None, report
    split_acc, local_acc = float(final.group(1)), float(final.group(2))
    if not args:  # raw codec: the same computation as local training
        assert split_acc == local_acc and split_acc >= 0.93, report
        for e in epochs:
            assert e[2:5] == e[5:8], report
    elif "--chunks" in args:
        # pipelined: the same updates up to float rounding, which 2800 steps of SGD with
        # momentum amplify a little
        assert abs(split_acc - local_acc) <= 0.01 and split_acc >= 0.93, report
        for e in epochs:
            assert all(abs(float(a) - float(b)) <= 0.01 for a, b in zip(e[2:5], e[5:8])), report
    else:
        assert split_acc >= 0.9 and abs(split_acc - local_acc) <= 0.03, report
    assert "0 failed" in proc.stdout and "0 forwards waiting" in proc.stdout, report
    assert "server process exited with code 0" in proc.stdout, report
