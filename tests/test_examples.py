"""The examples in examples/ run as a user would run them, each in its own process.

* ``demo.py`` (the README's ``make demo``) must exit 0 and print the shapes of
  every batch it sends;
* ``simple_server.py --port 0`` must print "listening on HOST:PORT", serve
  ``simple_client.py`` against that port, and exit 0 promptly on SIGINT (Ctrl-C)
  and on SIGTERM.

Every wait is bounded; readiness is read from the server's output, never slept for.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

DEMO_TIMEOUT_S = 180
#: How long the server may take to print its "listening on" line (imports torch first).
START_TIMEOUT_S = 60
CLIENT_TIMEOUT_S = 120
#: How long the server may take to exit after SIGINT or SIGTERM.
STOP_TIMEOUT_S = 10

LISTENING = re.compile(r"listening on (\S+):(\d+)")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(args: List[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _report(proc: subprocess.CompletedProcess) -> str:
    return (f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
            f"--- stderr ---\n{proc.stderr}")


@pytest.mark.timeout(DEMO_TIMEOUT_S + 20)
def test_demo_runs_and_prints_shapes() -> None:
    proc = _run([str(EXAMPLES / "demo.py")], DEMO_TIMEOUT_S)
    assert proc.returncode == 0, _report(proc)
    out = proc.stdout
    for batch in (1, 8, 32, 128):
        line = f"input ({batch}, 784) -> hidden ({batch}, 128) -> logits ({batch}, 10)"
        assert line in out, _report(proc)
    assert out.count("(matches local layers)") == 4, _report(proc)
    assert "successful_requests: 45" in out, _report(proc)  # 1 warm-up + 4 + 4 threads x 10
    assert "failed_requests: 0" in out, _report(proc)
    assert "custom_info.name: mlp-bottom" in out, _report(proc)
    assert "server process exited with code 0" in out, _report(proc)


class _Server:
    """examples/simple_server.py in a child process; a thread collects its output lines."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "simple_server.py"), "--host", "127.0.0.1",
             "--port", "0", "--grace", "1"],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: List[str] = []
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)  # EOF

    def read_until(self, pattern: "re.Pattern[str]", timeout: float) -> Optional["re.Match[str]"]:
        """Take output lines until one matches (None at EOF or when time runs out)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                return None
            self.lines.append(line)
            match = pattern.search(line)
            if match:
                return match

    def drain(self, timeout: float) -> None:
        """Collect the rest of the output (the process has exited)."""
        self._reader.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
        self._reader.join(STOP_TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    try:
        yield s
    finally:
        s.kill()


@pytest.mark.timeout(START_TIMEOUT_S + CLIENT_TIMEOUT_S + 2 * STOP_TIMEOUT_S + 20)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_simple_server_and_client(server: _Server, signum: int) -> None:
    match = server.read_until(LISTENING, START_TIMEOUT_S)
    assert match is not None, f"no 'listening on' line:\n{server.output()}"
    host, port = match.group(1), int(match.group(2))
    assert host == "127.0.0.1" and port > 0

    client = _run([str(EXAMPLES / "simple_client.py"), "--host", "127.0.0.1", "--port", str(port),
                   "--batch-size", "16", "--calls", "3"], CLIENT_TIMEOUT_S)
    assert client.returncode == 0, _report(client) + f"\n--- server ---\n{server.output()}"
    assert "healthy: True" in client.stdout, _report(client)
    assert "service splitlearn.comm.ComputeService version example-1" in client.stdout
    assert "name: mlp-bottom" in client.stdout
    for i in range(3):
        assert f"call {i}: input (16, 784) -> hidden (16, 128) -> logits (16, 10)" in client.stdout
    assert "3/3 calls succeeded" in client.stdout, _report(client)

    server.proc.send_signal(signum)
    try:
        code = server.proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        name = signal.Signals(signum).name
        pytest.fail(f"the server did not exit within {STOP_TIMEOUT_S} s of {name}:\n{server.output()}")
    server.drain(STOP_TIMEOUT_S)
    assert code == 0, server.output()
    assert "stopped" in server.output()


@pytest.mark.timeout(CLIENT_TIMEOUT_S + 20)
def test_simple_client_reports_missing_server() -> None:
    # Port 1 on the loopback interface: nothing listens there, the connection is refused.
    proc = _run([str(EXAMPLES / "simple_client.py"), "--port", "1", "--timeout", "2"],
                CLIENT_TIMEOUT_S)
    assert proc.returncode == 1, _report(proc)
    assert "no server at 127.0.0.1:1" in proc.stderr, _report(proc)
