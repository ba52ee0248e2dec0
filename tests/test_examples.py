"""The examples in examples/ run as a user would run them, each in its own process.

* ``demo.py`` (the README's ``make demo``) must exit 0 and print the shapes of
  every batch it sends;
* ``simple_server.py --port 0`` must print "listening on HOST:PORT", serve
  ``simple_client.py`` against that port, and exit 0 promptly on SIGINT (Ctrl-C)
  and on SIGTERM;
* ``custom_codec.py``, ``auth_server.py``, ``tls_server.py``, ``dashboard.py``,
  ``transformer_kv_cache.py``, ``prometheus_monitoring.py``, ``multi_port_server.py`` and
  ``replicas.py`` run their servers and
  clients in one process: each must exit 0 in time and print the lines that show
  what it demonstrates.

Every wait is bounded; readiness is read from the server's output, never slept for.
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from conftest import NEEDS_TORCH

pytest.importorskip("torch", reason=f"the examples use torch; {NEEDS_TORCH}")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

DEMO_TIMEOUT_S = 180
#: Limit for each self-contained example (server and clients in one process).
SELF_CONTAINED_TIMEOUT_S = 120
#: How long the server may take to print its "listening on" line (imports torch first).
START_TIMEOUT_S = 60
CLIENT_TIMEOUT_S = 120
#: How long the server may take to exit after SIGINT or SIGTERM.
STOP_TIMEOUT_S = 10

LISTENING = re.compile(r"listening on (\S+):(\d+)")
_FLOAT = re.compile(r"\d+\.\d+")


def long_floats(text: str) -> List[str]:
    """Floats printed with all their digits (2.477726459503174, 0.013285591000000001):
    more than 8 significant digits."""
    return [f for f in _FLOAT.findall(text) if len(f.replace(".", "").lstrip("0")) > 8]


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
    assert re.search(r"^  uptime_seconds: \d+\.\d$", out, re.M), _report(proc)
    assert long_floats(out) == [], _report(proc)  # floats are printed rounded
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


# -- self-contained examples: server and clients in one process -----------------------

@pytest.mark.timeout(SELF_CONTAINED_TIMEOUT_S + 20)
def test_custom_codec_example() -> None:
    proc = _run([str(EXAMPLES / "custom_codec.py"), "--batch", "2", "--seq", "64"],
                SELF_CONTAINED_TIMEOUT_S)
    assert proc.returncode == 0, _report(proc)
    out = proc.stdout
    raw = 2 * 64 * 768 * 4
    assert f"{raw} bytes raw" in out, _report(proc)
    expected = {  # label: request payload bytes
        "raw": raw,
        "scaled-half (Python)": raw // 2,
        "int8 (built in)": raw // 4,
    }
    for label, nbytes in expected.items():
        line = re.search(rf"^codec {re.escape(label)}: (\d+) bytes, (\d+) bytes saved "
                         rf"\((\d+)%\), max error (\S+)$", out, re.M)
        assert line is not None, f"no line for {label}\n" + _report(proc)
        assert int(line.group(1)) == nbytes and int(line.group(2)) == raw - nbytes, line.group(0)
    zstd = re.search(r"^codec zstd over bfloat16 \(built in\): (\d+) bytes", out, re.M)
    assert zstd is not None and int(zstd.group(1)) < raw // 2, _report(proc)
    assert "all results within tolerance" in out, _report(proc)


@pytest.mark.timeout(SELF_CONTAINED_TIMEOUT_S + 20)
def test_auth_server_example() -> None:
    proc = _run([str(EXAMPLES / "auth_server.py")], SELF_CONTAINED_TIMEOUT_S)
    assert proc.returncode == 0, _report(proc)
    lines = proc.stdout.splitlines()
    for expected in [
        "client with the token: ok, result [2.0, 4.0]",
        "client without the token: refused, UNAUTHENTICATED: missing or invalid authorization token",
        "client with the token but no name: refused, PERMISSION_DENIED: say who you are in x-client",
        "standard health check without a token: SERVING",
        "  Compute from trainer-1",
        "  Compute from <anonymous>",
    ]:
        assert expected in lines, f"missing {expected!r}\n" + _report(proc)
    # the call without a token never reached the interceptor or compute()
    assert "intruder" not in proc.stdout, _report(proc)
    assert lines.count("  compute() for trainer-1") == 1, _report(proc)


@pytest.mark.timeout(SELF_CONTAINED_TIMEOUT_S + 20)
def test_tls_server_example() -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line tool")
    proc = _run([str(EXAMPLES / "tls_server.py")], SELF_CONTAINED_TIMEOUT_S)
    assert proc.returncode == 0, _report(proc)
    lines = proc.stdout.splitlines()
    for expected in [
        "trusted client: served, result [-1.0, 2.0]",
        "client without a certificate: refused, UNAVAILABLE",
        "client with a certificate from another CA: refused, UNAVAILABLE",
        "as expected: only the trusted client was served",
    ]:
        assert expected in lines, f"missing {expected!r}\n" + _report(proc)
    made = re.search(r"^made a throwaway CA and certificates in (\S+)$", proc.stdout, re.M)
    assert made is not None and not Path(made.group(1)).exists(), "the temporary PKI was left behind"


@pytest.mark.timeout(SELF_CONTAINED_TIMEOUT_S + 20)
def test_prometheus_monitoring_example() -> None:
    pytest.importorskip("prometheus_client")   # an optional extra
    proc = _run([str(EXAMPLES / "prometheus_monitoring.py"), "--calls", "4"],
                SELF_CONTAINED_TIMEOUT_S)
    assert proc.returncode == 0, _report(proc)
    lines = proc.stdout.splitlines()
    url = re.search(r"^serving on 127\.0\.0\.1:\d+, metrics on "
                    r"(http://127\.0\.0\.1:\d+/metrics)$", proc.stdout, re.M)
    assert url is not None, _report(proc)
    assert f"scraped {url.group(1)}: " in proc.stdout, _report(proc)   # one scrape, over HTTP
    assert long_floats(proc.stdout) == [], _report(proc)  # floats are printed rounded
    for expected in [
        "bad call: INTERNAL",
        'splitlearn_requests_total{code="OK",method="Compute"} 4.0',
        'splitlearn_requests_total{code="INTERNAL",method="Compute"} 1.0',
        'splitlearn_errors_total{method="Compute"} 1.0',
        "splitlearn_in_flight_requests 0.0",
        'splitlearn_call_duration_seconds_count{method="Compute",stage="total"} 5.0',
        "compute_requests_total 5.0",      # the compute function's own counters
        "compute_errors_total 1.0",
        "stopped",
    ]:
        assert expected in lines, f"missing {expected!r}\n" + _report(proc)
    assert all(not line.startswith("splitlearn_") or "_bucket{" not in line for line in lines)


@pytest.mark.timeout(SELF_CONTAINED_TIMEOUT_S + 20)
def test_replicas_example() -> None:
    proc = _run([str(EXAMPLES / "replicas.py")], SELF_CONTAINED_TIMEOUT_S)
    assert proc.returncode == 0, _report(proc)
    lines = proc.stdout.splitlines()
    spread = re.search(r"^300 calls per replica: \[(\d+), (\d+), (\d+)\]$", proc.stdout, re.M)
    assert spread is not None, _report(proc)
    counts = [int(n) for n in spread.groups()]
    assert sum(counts) == 300 and min(counts) > 0 and max(counts) <= 2 * min(counts)
    for expected in [
        "policy: round_robin",
        "replica 1 NOT_SERVING, its share of 300 calls: 0",
        "replica 2 drained and stopped under load: 0 failed calls of 800",
        "pinned session used 1 replica",
        "all replicas stopped",
    ]:
        assert expected in lines, f"missing {expected!r}\n" + _report(proc)


@pytest.mark.timeout(SELF_CONTAINED_TIMEOUT_S + 20)
def test_multi_port_server_example() -> None:
    proc = _run([str(EXAMPLES / "multi_port_server.py"), "--batch", "5"], SELF_CONTAINED_TIMEOUT_S)
    assert proc.returncode == 0, _report(proc)
    lines = proc.stdout.splitlines()
    ports = [int(m.group(2)) for m in
             re.finditer(r"^(preprocessing|model|postprocessing) listening on 127\.0\.0\.1:(\d+)$",
                         proc.stdout, re.M)]
    assert len(ports) == 3 and len(set(ports)) == 3 and 0 not in ports, _report(proc)
    for expected in [
        "pipeline: input (5, 16) -> preprocessing (5, 16) -> model (5, 3) -> postprocessing (5, 3)",
        "rows sum to 1: True",
        "matches the stages run locally: True",
        "stopped the model server",
        "model: UNAVAILABLE",
        "preprocessing still serving: True",
        "postprocessing still serving: True",
        "all servers stopped",
    ]:
        assert expected in lines, f"missing {expected!r}\n" + _report(proc)


@pytest.mark.timeout(SELF_CONTAINED_TIMEOUT_S + 20)
def test_transformer_kv_cache_example() -> None:
    """Hidden states, a padding mask and a 2-layer KV cache in one structure per call;
    the remote run matches the local one."""
    proc = _run([str(EXAMPLES / "transformer_kv_cache.py"), "--steps", "4"],
                SELF_CONTAINED_TIMEOUT_S)
    assert proc.returncode == 0, _report(proc)
    steps = re.findall(r"^step (\d+): sent (\d+) position\(s\), cache now (\d+) long", proc.stdout,
                       re.M)
    assert [(int(a), int(b), int(c)) for a, b, c in steps] == \
        [(0, 8, 8), (1, 1, 9), (2, 1, 10), (3, 1, 11)], _report(proc)
    assert "matches the local run within the codecs' rounding" in proc.stdout, _report(proc)


@pytest.mark.timeout(SELF_CONTAINED_TIMEOUT_S + 20)
def test_dashboard_example() -> None:
    proc = _run([str(EXAMPLES / "dashboard.py"), "--seconds", "3"], SELF_CONTAINED_TIMEOUT_S)
    assert proc.returncode == 0, _report(proc)
    m = re.search(r"^serving on 127\.0\.0\.1:\d+; dashboard on (http://127\.0\.0\.1:\d+/)$",
                  proc.stdout, re.M)
    assert m is not None, _report(proc)
    last = re.search(r"^dashboard samples: (\d+); calls (\d+), errors (\d+); activation store "
                     r"(\d+) waiting, (\d+) answered$", proc.stdout, re.M)
    assert last is not None, _report(proc)
    samples, calls, errors, waiting, answered = map(int, last.groups())
    assert samples >= 2 and calls > 0 and answered > 0 and waiting == 0, _report(proc)
    assert proc.stdout.splitlines()[-1] == "stopped", _report(proc)
