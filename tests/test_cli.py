"""The command line (splitlearn_comm/cli.py), run as subprocesses:
``python -m splitlearn_comm serve | health | info | bench``."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import queue
import re
import signal
import socket
import subprocess
import textwrap
import time
import threading
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from conftest import NEEDS_TORCH, PYTHON, ROOT, subprocess_env
from splitlearn_comm import cli
from splitlearn_comm.server import GRPCComputeServer

#: Bound on any one CLI command that is expected to finish by itself.
RUN_TIMEOUT_S = 60
#: Bound on a server printing its "serving ..." line (a torch import included).
START_TIMEOUT_S = 60
#: How long a server may take to exit after SIGTERM/SIGINT.
STOP_TIMEOUT_S = 10

COMPUTE_MODULE = textwrap.dedent('''
    import splitlearn_comm as slc

    class Doubler(slc.ComputeFunction):
        def compute(self, input_tensor):
            return input_tensor * 2

        def get_info(self):
            return {"name": "doubler", "flavour": "vanilla"}

    doubler = Doubler()

    def make_doubler():
        return Doubler()

    answer = 42

    def needs_args(size):
        return Doubler()

    def returns_a_string():
        return "not a compute function"

    class NotHostable:
        pass
''')

MODEL_MODULE = textwrap.dedent('''
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.linear(x)
''')


def run_cli(*args: str, cwd: Optional[Path] = None,
            timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "splitlearn_comm", *args], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


class Served:
    """A `serve` subprocess; its stdout lines arrive on a queue (no polling sleeps)."""

    def __init__(self, args: List[str], cwd: Path) -> None:
        self.proc = subprocess.Popen([PYTHON, "-m", "splitlearn_comm", "serve", *args], cwd=cwd,
                                     env=subprocess_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._stderr: List[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put),
                         daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self._stderr.append),
                         daemon=True).start()

    @staticmethod
    def _pump(stream, put) -> None:
        for line in stream:
            put(line)
        put(None)

    def first_line(self, timeout: float = START_TIMEOUT_S) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"serve printed nothing within {timeout} s; stderr: {self.stderr()}")
        if line is None:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
            pytest.fail(f"serve exited with {self.proc.returncode} before serving; "
                        f"stderr: {self.stderr()}")
        return line.rstrip("\n")

    def stderr(self) -> str:
        return "".join(s for s in self._stderr if s)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture
def serve_cli() -> Iterator:
    """Start `serve` subprocesses; any still running at teardown are killed."""
    started: List[Served] = []

    def start(*args: str, cwd: Path) -> Served:
        s = Served(list(args), cwd)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


@pytest.fixture
def compute_module(tmp_path: Path) -> Path:
    path = tmp_path / "my_compute.py"
    path.write_text(COMPUTE_MODULE)
    return path


def serving_address(line: str) -> str:
    m = re.fullmatch(r"serving (\S+) on (\S+):(\d+)(, metrics on http://\S+/metrics)?", line)
    assert m is not None, f"unexpected first line {line!r}"
    port = int(m.group(3))
    assert 0 < port < 65536
    return f"127.0.0.1:{port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- serve, then health, info, bench, against it ----------------------------------------------


@pytest.mark.timeout(180)
def test_serve_health_info_bench_and_sigterm(serve_cli, compute_module: Path) -> None:
    server = serve_cli("my_compute.py:Doubler", "--port", "0", "--workers", "4",
                       "--version", "9.8.7", cwd=compute_module.parent)
    line = server.first_line()
    assert line.startswith("serving Doubler on 127.0.0.1:"), line
    address = serving_address(line)

    health = run_cli("health", address, "--timeout", "10")
    assert health.returncode == 0, health.stderr
    assert health.stdout.startswith("ok"), health.stdout
    assert "version=9.8.7" in health.stdout and "uptime=" in health.stdout

    info = run_cli("info", address, "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["version"] == "9.8.7"
    assert data["service_name"] == "splitlearn.comm.ComputeService"
    assert data["custom_info"] == {"name": "doubler", "flavour": "vanilla"}
    assert data["device"] == "cpu"
    assert isinstance(data["uptime_seconds"], float) and data["uptime_seconds"] >= 0

    text = run_cli("info", address)
    assert text.returncode == 0, text.stderr
    assert "9.8.7" in text.stdout and "flavour" in text.stdout and "vanilla" in text.stdout

    bench = run_cli("bench", address, "--shape", "1,768", "-n", "50", "--concurrency", "4",
                    "--warmup", "2")
    assert bench.returncode == 0, bench.stdout + bench.stderr
    out = bench.stdout
    assert re.search(r"^calls\s+50 \(50 ok, 0 failed\) from 4 threads", out, re.M), out
    assert re.search(r"^errors\s+none$", out, re.M), out
    assert re.search(r"^latency ms\s+p50 [\d.]+\s+p90 [\d.]+\s+p99 [\d.]+\s+max [\d.]+$",
                     out, re.M), out
    assert re.search(r"^throughput\s+[\d.]+ calls/s, [\d.]+ MB/s sent, [\d.]+ MB/s received$",
                     out, re.M), out
    # stderr is a pipe here, so no progress bar
    assert "\r" not in bench.stderr and "[#" not in bench.stderr, bench.stderr

    as_json = run_cli("bench", address, "--shape", "2,16", "-n", "50", "--concurrency", "4",
                      "--codec", "zstd", "--json", "--no-progress")
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["count"] == 50 and summary["ok"] == 50 and summary["failed"] == 0
    assert summary["errors"] == {}
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert summary["calls_per_s"] > 0
    assert summary["bytes_sent"] == summary["bytes_received"] == 50 * 2 * 16 * 4
    assert summary["codec"] == "zstd" and summary["shape"] == [2, 16]

    # the server counted the calls: 2 + 50 timed + 10 warm-up
    data = json.loads(run_cli("info", address, "--json").stdout)
    assert data["total_requests"] >= 100

    assert server.stop(signal.SIGTERM) == 0, server.stderr()
    assert "Traceback" not in server.stderr(), server.stderr()

    down = run_cli("health", address, "--timeout", "5")
    assert down.returncode == 1
    assert address in down.stderr and "Traceback" not in down.stderr


@pytest.mark.timeout(120)
def test_serve_drain_delay_reports_not_serving_and_keeps_serving(serve_cli,
                                                                  compute_module: Path) -> None:
    import grpc

    from splitlearn_comm import GRPCComputeClient

    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    server = serve_cli("my_compute.py:Doubler", "--port", "0", "--drain-delay", "60",
                       cwd=compute_module.parent)
    address = serving_address(server.first_line())
    with grpc.insecure_channel(address) as ch, \
            GRPCComputeClient(address, retry_strategy=None, timeout=10) as client:
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        assert check(b"", timeout=10) == b"\x08\x01"           # SERVING
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while check(b"", timeout=10) != b"\x08\x02":            # NOT_SERVING
            assert time.monotonic() < deadline, "no NOT_SERVING after SIGTERM"
            time.sleep(0.02)
        # draining: still serving every call that comes
        assert client.compute(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]
        assert server.proc.poll() is None
    assert server.stop(signal.SIGTERM) == 0, server.stderr()  # a second signal: stop now
    assert "drain 60 s" in server.stderr()


@pytest.mark.timeout(120)
def test_serve_instance_and_factory_stop_on_sigint(serve_cli, compute_module: Path) -> None:
    for target in (f"{compute_module}:doubler", f"{compute_module}:make_doubler"):
        server = serve_cli(target, "--port", "0", "--codec", "float16", "--grace", "1",
                           cwd=ROOT)
        address = serving_address(server.first_line())
        assert run_cli("health", address).returncode == 0
        assert server.stop(signal.SIGINT) == 0, server.stderr()


@pytest.mark.timeout(120)
def test_serve_dotted_module_name(serve_cli, compute_module: Path) -> None:
    # a dotted name is imported from the working directory, as `python -m` would
    server = serve_cli("my_compute:doubler", "--port", "0", cwd=compute_module.parent)
    address = serving_address(server.first_line())
    info = json.loads(run_cli("info", address, "--json").stdout)
    assert info["custom_info"]["name"] == "doubler"
    assert server.stop() == 0, server.stderr()


@pytest.mark.timeout(180)
def test_serve_torch_module(serve_cli, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    (tmp_path / "my_model.py").write_text(MODEL_MODULE)
    server = serve_cli("my_model.py:model", "--port", "0", cwd=tmp_path)
    line = server.first_line()
    assert line.startswith("serving Sequential on "), line
    address = serving_address(line)

    info = json.loads(run_cli("info", address, "--json").stdout)
    assert info["custom_info"]["model_class"] == "Sequential"
    assert info["custom_info"]["parameters"] == str(8 * 4 + 4)

    bench = run_cli("bench", address, "--shape", "3,8", "-n", "20", "--concurrency", "2",
                    "--json")
    assert bench.returncode == 0, bench.stderr
    summary = json.loads(bench.stdout)
    assert summary["ok"] == 20
    assert summary["bytes_received"] == 20 * 3 * 4 * 4  # the model maps 8 features to 4

    # a shape the model rejects: the warm-up call fails, said clearly, exit 1
    wrong = run_cli("bench", address, "--shape", "3,7", "-n", "20")
    assert wrong.returncode == 1
    assert "INTERNAL" in wrong.stderr and "Traceback" not in wrong.stderr
    # without warm-up the failures are counted by status
    counted = run_cli("bench", address, "--shape", "3,7", "-n", "20", "--warmup", "0",
                      "--json")
    assert counted.returncode == 1
    assert json.loads(counted.stdout)["errors"] == {"INTERNAL": 20}

    assert server.stop() == 0, server.stderr()


@pytest.mark.timeout(180)
def test_serve_torch_module_subclass(serve_cli, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    (tmp_path / "my_model.py").write_text(MODEL_MODULE)
    server = serve_cli("my_model:Tiny", "--port", "0", cwd=tmp_path)
    line = server.first_line()
    assert line.startswith("serving Tiny on "), line
    address = serving_address(line)
    summary = json.loads(run_cli("bench", address, "--shape", "1,8", "-n", "5", "--json").stdout)
    assert summary["ok"] == 5 and summary["bytes_received"] == 5 * 2 * 4
    assert server.stop() == 0, server.stderr()


# -- errors -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["health", "info", "bench"])
def test_bad_address_exits_1(command: str) -> None:
    extra = ["--shape", "4"] if command == "bench" else []
    for address in ("localhost", "127.0.0.1:99999", "no such host:1", "127.0.0.1:"):
        r = run_cli(command, address, *extra)
        assert r.returncode == 1, (address, r.stdout, r.stderr)
        assert f"bad address {address!r}" in r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["health", "info", "bench"])
def test_no_server_exits_1(command: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    extra = ["--shape", "4"] if command == "bench" else []
    r = run_cli(command, address, "--timeout", "5", *extra)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"cannot reach {address}" in r.stderr and "UNAVAILABLE" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target, expected", [
    ("no_such_module_xyz:thing", "cannot import module 'no_such_module_xyz'"),
    ("missing_file.py:thing", "no such file"),
    ("broken.py:thing", "ZeroDivisionError"),
    ("my_compute.py:nope", "has no attribute 'nope'"),
    ("my_compute.py:answer", "42 (a builtins.int)"),
    ("my_compute.py:NotHostable", "the class my_compute.NotHostable"),
    ("my_compute.py:needs_args", "needs arguments (size)"),
    ("my_compute.py:returns_a_string", "returned 'not a compute function'"),
    ("splitlearn_comm:ComputeFunction", "abstract class ComputeFunction"),
])
def test_serve_load_errors_exit_3(compute_module: Path, target: str, expected: str) -> None:
    (compute_module.parent / "broken.py").write_text("value = 1 / 0\n")
    r = run_cli("serve", target, "--port", "0", cwd=compute_module.parent)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert expected in r.stderr, r.stderr
    assert r.stdout == ""


@pytest.mark.timeout(60)
def test_user_traceback_is_shown_trimmed(compute_module: Path) -> None:
    (compute_module.parent / "broken.py").write_text("value = 1 / 0\n")
    r = run_cli("serve", "broken.py:value", cwd=compute_module.parent)
    assert r.returncode == 3
    assert 'broken.py", line 1' in r.stderr  # the user's frame
    assert "cli.py" not in r.stderr and "importlib" not in r.stderr  # not ours


@pytest.mark.timeout(60)
def test_port_in_use_exits_1(compute_module: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("serve", "my_compute.py:doubler", "--port", str(port),
                    cwd=compute_module.parent)
    assert r.returncode == 1, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.timeout(120)
def test_metrics_port(serve_cli, compute_module: Path) -> None:
    has_metrics = "metrics_port" in inspect.signature(GRPCComputeServer).parameters
    if not has_metrics:
        r = run_cli("serve", "my_compute.py:doubler", "--port", "0", "--metrics-port", "0",
                    cwd=compute_module.parent)
        assert r.returncode == 1
        assert "metrics are not available in this build" in r.stderr
        return
    pytest.importorskip("prometheus_client")
    server = serve_cli("my_compute.py:doubler", "--port", "0", "--metrics-port", "0",
                       cwd=compute_module.parent)
    line = server.first_line()
    serving_address(line)
    # --metrics-port 0: the serving line shows the port the OS chose, and it answers
    m = re.search(r", metrics on (http://[^:]+:(\d+)/metrics)$", line)
    assert m is not None and int(m.group(2)) != 0, line
    import urllib.request

    with urllib.request.urlopen(m.group(1).replace("0.0.0.0", "127.0.0.1"), timeout=30) as r:
        assert b"splitlearn_requests_total" in r.read()
    assert server.stop() == 0, server.stderr()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", [
    [],
    ["serve"],
    ["serve", "no_colon_here"],
    ["serve", "m:x", "--port", "70000"],
    ["serve", "m:x", "--workers", "0"],
    ["serve", "m:x", "--codec", "gzip"],
    ["health"],
    ["bench", "127.0.0.1:1"],
    ["bench", "127.0.0.1:1", "--shape", "1,x"],
    ["bench", "127.0.0.1:1", "--shape", "0,4"],
    ["bench", "127.0.0.1:1", "--shape", "4", "-n", "0"],
    ["bench", "127.0.0.1:1", "--shape", "4", "--dtype", "complex64"],
    ["frobnicate"],
    ["dashboard"],
    ["dashboard", "127.0.0.1:9100", "--interval", "0"],
    ["dashboard", "127.0.0.1:9100", "--port", "70000"],
])
def test_bad_usage_exits_2(args: List[str]) -> None:
    r = run_cli(*args)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "usage:" in r.stderr or "error:" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(60)
def test_help_and_version() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for command in ("serve", "health", "info", "bench", "dashboard"):
        assert command in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("splitlearn-comm ")


# -- in-process helpers ---------------------------------------------------------------------


def test_parse_shape() -> None:
    assert cli.parse_shape("1,768") == (1, 768)
    assert cli.parse_shape("768") == (768,)
    assert cli.parse_shape("2x3x4") == (2, 3, 4)
    assert cli.parse_shape("(2, 3)") == (2, 3)
    for bad in ("", "a", "1,,2", "0", "-1,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_shape(bad)


def test_check_address() -> None:
    for ok in ("127.0.0.1:50051", "localhost:1", "[::1]:50051", "unix:/tmp/s.sock",
               "dns:///example.com:443"):
        assert cli.check_address(ok) == ok
    for bad in ("", "localhost", "host:0", "host:65536", "a b:1", ":50051", "unix:"):
        with pytest.raises(cli.CLIError) as e:
            cli.check_address(bad)
        assert e.value.code == 1


def test_percentile_matches_numpy() -> None:
    np = pytest.importorskip("numpy")
    values = sorted(float(v) for v in np.random.default_rng(1).exponential(size=101))
    for q in (0, 50, 90, 99, 100):
        assert cli._percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_progress_bar_rate_limited() -> None:
    import io

    stream = io.StringIO()
    bar = cli._Progress(100, enabled=True, stream=stream, hz=10)
    for i in range(100):
        bar.update(i, 0)  # a burst: drawn once, then held back by the rate limit
    assert stream.getvalue().count("\r") == 1
    bar.update(100, 0, force=True)
    bar.close()
    assert "100/100" in stream.getvalue()
    silent = io.StringIO()
    off = cli._Progress(10, enabled=False, stream=silent)
    off.update(5, 0, force=True)
    off.close()
    assert silent.getvalue() == ""


def test_console_script_entry_point() -> None:
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["splitlearn-comm"] == "splitlearn_comm.cli:main"
    assert callable(cli.main)
