#!/usr/bin/env python3
"""Round-trip benchmark: splitlearn-comm against the gRPC floor and a plain grpcio baseline.

A client sends a float32 torch tensor, the server's compute() returns it unchanged,
the client receives it. For each tensor size (3 KiB, 1 MiB, 32 MiB) and each
implementation this measures the p50 and p99 latency of one round trip and the
throughput (round trips/s, and MB/s of tensor payload each way, MB = 10^6 bytes):

  splitlearn-comm  GRPCComputeServer(IdentityComputeFunction(), host="127.0.0.1",
                   port=0, max_workers=4) in a child process;
                   GRPCComputeClient(..., retry_strategy=None, shared_memory=False)
                   in this one (over TCP; benchmarks/bench_shm.py measures shared memory).
  grpcio+numpy     what a user would otherwise write: grpc.server(ThreadPoolExecutor(4))
                   serving the same proto (Python stubs generated at run time into a
                   temporary folder by grpc_tools.protoc), np.frombuffer(...).reshape()
                   on receive, ndarray.tobytes() on send, torch.from_numpy() /
                   Tensor.numpy() at the edges, message limits -1; a grpcio stub client.

Both servers run in child processes (this file run with --serve) bound to
127.0.0.1 port 0; each child reports its port on stdout, the parent checks its
health (HealthCheck RPC), warms up, times the round trips and finally stops the
children by closing their stdin.

Two more rows come from C programs built by `make bench-floor` (benchmarks/floor/).
For each one-thread size every row, C and Python, runs in 5 interleaved rounds (each
round warms each row up again, then runs it for a fifth of its round trips), so that
every ratio comes from one run and the floor sees the same machine load as the rows
measured against it:

  C-core echo      the floor of any gRPC design: a unary echo on the bare gRPC C core
                   with no copies (build/bench/echo_floor);
  core, C hook     the same round trip through splitlearn-comm's C core (sl_server with
                   an identity compute hook written in C, sl_client), no Python
                   (build/bench/core_echo).

    python3 benchmarks/bench_roundtrip.py                 # full run, writes benchmarks/results.md
    python3 benchmarks/bench_roundtrip.py --quick         # smoke run, prints only
    python3 benchmarks/bench_roundtrip.py --concurrency 4 # 4 client threads per run

See benchmarks/README.md for how to read the output.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent import futures
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROTO_DIR = os.path.join(ROOT, "proto")
PROTO_FILE = "splitlearn_comm.proto"

try:  # the installed (or editable) package first, else this checkout
    import splitlearn_comm  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is run
    sys.path.insert(0, ROOT)
    import splitlearn_comm  # noqa: F401

import grpc
import numpy as np
import torch

from _report import cpu_model, write_data  # noqa: E402

from splitlearn_comm import ComputeFunction, GRPCComputeClient, GRPCComputeServer

IMPL_SLC = "splitlearn-comm"
IMPL_GRPCIO = "grpcio+numpy"
IMPLS = (IMPL_SLC, IMPL_GRPCIO)  # the servers (child processes)
# a second client of the splitlearn-comm server, with busy polling off (every call
# sleeps while it waits: docs/api.md, "Busy polling"), timed in the one-thread rows
IMPL_SLC_SLEEP = "splitlearn-comm, busy_poll=0"
CLIENT_IMPLS = (IMPL_SLC, IMPL_SLC_SLEEP, IMPL_GRPCIO)
IMPL_FLOOR = "C-core echo (floor)"
IMPL_CORE = "splitlearn-comm core, C hook"
# the C rows: implementation name -> program under build/bench (make bench-floor)
C_PROGRAMS = {IMPL_FLOOR: "echo_floor", IMPL_CORE: "core_echo"}
BENCH_BIN = os.path.join(ROOT, "build", "bench")

KiB = 1024
MiB = 1024 * 1024
# the one-thread sizes with the C rows run in this many interleaved rounds
ROUNDS = 5

# (label, shape, full-run N, quick-run N); float32, so bytes = 4 * numel
SIZES: List[Tuple[str, Tuple[int, ...], int, int]] = [
    ("3 KiB", (3, 256), 2000, 200),
    ("1 MiB", (256, 1024), 300, 30),
    ("32 MiB", (8192, 1024), 50, 5),
]


_UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class IdentityComputeFunction(ComputeFunction):
    """Returns its input unchanged: the round trip is all transport."""

    def compute(self, input_tensor: Any) -> Any:
        return input_tensor


class DelayedIdentityComputeFunction(IdentityComputeFunction):
    """Sleeps ``delay_s`` (releasing the GIL, like a model running in native code),
    then returns its input: used only by the overlap check, never by the main table."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def compute(self, input_tensor: Any) -> Any:
        time.sleep(self.delay_s)
        return input_tensor


def make_compute(delay_ms: float) -> IdentityComputeFunction:
    return DelayedIdentityComputeFunction(delay_ms / 1e3) if delay_ms > 0 \
        else IdentityComputeFunction()


# --------------------------------------------------------------------------------------
# The grpcio baseline's generated stubs
# --------------------------------------------------------------------------------------

def generate_stubs(out_dir: str) -> None:
    """Generate splitlearn_comm_pb2(_grpc).py from proto/ into ``out_dir``."""
    from grpc_tools import protoc
    import importlib.resources

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
                      f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                      os.path.join(PROTO_DIR, PROTO_FILE)])
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with status {rc}")


def import_stubs(stub_dir: str) -> Tuple[Any, Any]:
    if stub_dir not in sys.path:
        sys.path.insert(0, stub_dir)
    import splitlearn_comm_pb2 as pb2  # type: ignore[import-not-found]
    import splitlearn_comm_pb2_grpc as pb2_grpc  # type: ignore[import-not-found]
    return pb2, pb2_grpc


def _to_tensor(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    # What a user writes: a NumPy view of the message bytes, then torch.from_numpy.
    return torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(tuple(shape)))


# --------------------------------------------------------------------------------------
# Child processes: the servers
# --------------------------------------------------------------------------------------

def serve_splitlearn(delay_ms: float) -> Callable[[], None]:
    server = GRPCComputeServer(make_compute(delay_ms), host="127.0.0.1", port=0,
                               max_workers=4)
    server.start()
    _report_port(server.port)
    return lambda: server.stop(grace=1.0)


def serve_grpcio(stub_dir: str, delay_ms: float) -> Callable[[], None]:
    pb2, pb2_grpc = import_stubs(stub_dir)
    fn = make_compute(delay_ms)
    started = time.monotonic()

    class Servicer(pb2_grpc.ComputeServiceServicer):
        def Compute(self, request: Any, context: Any) -> Any:
            x = _to_tensor(request.data, request.shape)
            t0 = time.perf_counter()
            y = fn.compute(x)
            ms = (time.perf_counter() - t0) * 1e3
            arr = y.numpy()
            return pb2.ComputeResponse(data=arr.tobytes(), shape=list(arr.shape),
                                       request_id=request.request_id, compute_time_ms=ms)

        def HealthCheck(self, request: Any, context: Any) -> Any:
            return pb2.HealthResponse(status="ok", version="baseline",
                                      uptime_seconds=time.monotonic() - started)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_UNLIMITED)
    pb2_grpc.add_ComputeServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        raise OSError("grpcio could not bind 127.0.0.1:0")
    server.start()
    _report_port(port)
    return lambda: server.stop(grace=1.0).wait()


def _report_port(port: int) -> None:
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()


def child_main(impl: str, stub_dir: Optional[str], delay_ms: float) -> int:
    # The parent reads each array back as a torch tensor without a copy: NumPy's
    # read-only buffer warning is expected and harmless here (nothing writes to it).
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if impl == IMPL_SLC:
        stop = serve_splitlearn(delay_ms)
    elif impl == IMPL_GRPCIO:
        if not stub_dir:
            raise SystemExit("--serve grpcio+numpy needs --stub-dir")
        stop = serve_grpcio(stub_dir, delay_ms)
    else:
        raise SystemExit(f"unknown implementation {impl!r}")
    # Serve until the parent closes our stdin (or dies).
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except KeyboardInterrupt:
        pass
    stop()
    return 0


class Child:
    """A server in a child process: this file run with --serve IMPL."""

    def __init__(self, impl: str, stub_dir: str, delay_ms: float = 0.0) -> None:
        self.impl = impl
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", impl, "--stub-dir", stub_dir,
             "--delay-ms", repr(delay_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=ROOT)
        line = self._read_line(timeout=60.0)
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"{impl} server did not start (said {line!r}, "
                               f"exit status {self.proc.poll()})")
        self.port = int(line.split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def _read_line(self, timeout: float) -> str:
        """The child's first line of output ('' if it exits or stays silent)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 256)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace").split("\n", 1)[0].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --------------------------------------------------------------------------------------
# Clients: one callable per implementation, torch tensor in, torch tensor out
# --------------------------------------------------------------------------------------

class SplitlearnClient:
    def __init__(self, address: str, busy_poll: Optional[float] = None) -> None:
        # over TCP: same-host shared memory has its own benchmark (bench_shm.py)
        extra = {} if busy_poll is None else {"busy_poll": busy_poll}  # None: the default
        self.client = GRPCComputeClient(address, retry_strategy=None, shared_memory=False,
                                        **extra)

    def wait_ready(self, timeout: float) -> None:
        if not self.client.connect(timeout) or not self.client.health_check(timeout):
            raise RuntimeError(f"splitlearn-comm server at {self.client.server_address} "
                               "is not healthy")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.client.compute(x)

    def close(self) -> None:
        self.client.close()


class GrpcioClient:
    def __init__(self, address: str, stub_dir: str) -> None:
        self.pb2, pb2_grpc = import_stubs(stub_dir)
        self.channel = grpc.insecure_channel(address, options=_UNLIMITED)
        self.stub = pb2_grpc.ComputeServiceStub(self.channel)

    def wait_ready(self, timeout: float) -> None:
        reply = self.stub.HealthCheck(self.pb2.HealthRequest(), timeout=timeout,
                                      wait_for_ready=True)
        if reply.status != "ok":
            raise RuntimeError(f"grpcio server is not healthy: {reply.status!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.numpy()
        reply = self.stub.Compute(self.pb2.ComputeRequest(data=arr.tobytes(),
                                                          shape=list(arr.shape)))
        return _to_tensor(reply.data, reply.shape)

    def close(self) -> None:
        self.channel.close()


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------

class Result:
    def __init__(self, size: str, nbytes: int, impl: str, concurrency: int, n: int,
                 latencies_ns: List[int], wall_ns: int, cpu_ns: int) -> None:
        self.size, self.nbytes, self.impl = size, nbytes, impl
        self.concurrency, self.n = concurrency, n
        lat = sorted(latencies_ns)
        self.p50_ms = _percentile(lat, 50) / 1e6
        self.p99_ms = _percentile(lat, 99) / 1e6
        self.rts: Optional[float] = n / (wall_ns / 1e9)
        self.mbs: Optional[float] = self.rts * nbytes / 1e6
        self.cpu_ms: Optional[float] = cpu_ns / n / 1e6

    @classmethod
    def from_rounds(cls, size: str, nbytes: int, impl: str,
                    rows: List[Dict[str, Any]]) -> "Result":
        """A C row (benchmarks/floor) from the JSON lines of its rounds: the median of
        their p50s and of their p99s, and the client process's mean CPU per round
        trip (no round trips/s: the program times calls one by one)."""
        r = cls.__new__(cls)
        r.size, r.nbytes, r.impl, r.concurrency = size, nbytes, impl, 1
        r.n = sum(int(row["n"]) for row in rows)
        r.p50_ms = statistics.median(float(row["p50_us"]) for row in rows) / 1e3
        r.p99_ms = statistics.median(float(row["p99_us"]) for row in rows) / 1e3
        r.rts = r.mbs = None
        cpus = [float(row["client_cpu_us"]) * int(row["n"]) for row in rows
                if row.get("client_cpu_us") is not None]
        r.cpu_ms = sum(cpus) / r.n / 1e3 if len(cpus) == len(rows) else None
        return r


def c_program(impl: str) -> str:
    """The path of a C row's program, built with `make bench-floor` when missing."""
    path = os.path.join(BENCH_BIN, C_PROGRAMS[impl])
    if not os.path.exists(path):
        subprocess.run(["make", "-s", "-C", ROOT, "bench-floor"], check=True)
    return path


def run_c(impl: str, nbytes: int, n: int, warm: int) -> Dict[str, Any]:
    """Run a C row's program for one size; its JSON line."""
    # our core's client would take shared memory on 127.0.0.1: this table is TCP
    out = subprocess.run([c_program(impl), "--sizes", str(nbytes), "--n", str(n),
                          "--warm", str(warm)], check=True, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "SPLITLEARN_SHM": "0"})
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if len(rows) != 1 or int(rows[0]["bytes"]) != nbytes:
        raise RuntimeError(f"{impl}: unexpected output {out.stdout!r} {out.stderr!r}")
    return rows[0]


def _percentile(sorted_values: List[int], q: float) -> float:
    """Nearest-rank-with-interpolation percentile (statistics.quantiles, inclusive)."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    cuts = statistics.quantiles(sorted_values, n=100, method="inclusive")
    return float(cuts[int(q) - 1])


def check_identity(call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   impl: str, size: str) -> None:
    y = call(x)
    if not isinstance(y, torch.Tensor) or y.dtype != x.dtype or y.shape != x.shape \
            or not torch.equal(y, x):
        raise AssertionError(f"{impl} {size}: the result differs from the input "
                             f"({type(y).__name__}, {getattr(y, 'dtype', None)}, "
                             f"{tuple(getattr(y, 'shape', ()))})")


def run_timed(call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int,
              concurrency: int) -> Tuple[List[int], int, int]:
    """``n`` round trips spread over ``concurrency`` threads sharing ``call``.
    Returns every call's latency (ns), the wall time of the whole run (ns) and the
    CPU time this (client) process used meanwhile, all its threads together (ns)."""
    clock = time.perf_counter_ns
    cpu = time.process_time_ns
    if concurrency <= 1:
        lat = [0] * n
        c_start = cpu()
        t_start = clock()
        for i in range(n):
            t0 = clock()
            call(x)
            lat[i] = clock() - t0
        wall = clock() - t_start
        return lat, wall, cpu() - c_start

    shares = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    per_thread: List[List[int]] = [[] for _ in range(concurrency)]
    errors: List[BaseException] = []
    barrier = threading.Barrier(concurrency + 1)
    ends = [0] * concurrency

    def worker(k: int) -> None:
        out = per_thread[k]
        barrier.wait()
        try:
            for _ in range(shares[k]):
                t0 = clock()
                call(x)
                out.append(clock() - t0)
        except BaseException as e:  # reported by the parent thread
            errors.append(e)
        ends[k] = clock()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True)
               for k in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    c_start = cpu()
    t_start = clock()
    for t in threads:
        t.join()
    c_used = cpu() - c_start
    if errors:
        raise errors[0]
    return [v for lst in per_thread for v in lst], max(ends) - t_start, c_used


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def machine_info() -> Dict[str, str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    import google.protobuf

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{usable} usable (nproc), {os.cpu_count()} online",
        "cpu": cpu_model(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "splitlearn-comm": getattr(splitlearn_comm, "__version__", "?"),
    }


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _opt(fmt: Callable[[float], str], v: Optional[float]) -> str:
    return "-" if v is None else fmt(v)


def _fmt_num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def table(results: List[Result]) -> List[str]:
    lines = ["| size | implementation | threads | round trips | p50 ms | p99 ms "
             "| round trips/s | MB/s each way | client CPU ms per round trip |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        lines.append(f"| {r.size} | {r.impl} | {r.concurrency} | {r.n} | {_fmt_ms(r.p50_ms)} "
                     f"| {_fmt_ms(r.p99_ms)} | {_opt(_fmt_num, r.rts)} | {_opt(_fmt_num, r.mbs)} "
                     f"| {'-' if r.cpu_ms is None else _fmt_ms(r.cpu_ms)} |")
    return lines


def floor_ratios(results: List[Result]) -> List[str]:
    """Each one-thread row's p50 as a multiple of the C-core echo's in the same run."""
    one = [r for r in results if r.concurrency == 1]
    floors = {r.size: r for r in one if r.impl == IMPL_FLOOR}
    impls = [i for i in (IMPL_FLOOR, IMPL_CORE, IMPL_SLC, IMPL_SLC_SLEEP, IMPL_GRPCIO)
             if any(r.impl == i for r in one)]
    if not floors:
        return []
    lines = ["| size | " + " | ".join(impls) + " |", "|---|" + "--:|" * len(impls)]
    for size in [s for s, *_ in SIZES if s in floors]:
        cells = []
        for impl in impls:
            r = next((r for r in one if r.size == size and r.impl == impl), None)
            if r is None:
                cells.append("")
            elif impl == IMPL_FLOOR:
                cells.append(f"{_fmt_ms(r.p50_ms)} ms")
            else:
                cells.append(f"{_fmt_ms(r.p50_ms)} ms ({r.p50_ms / floors[size].p50_ms:.2f}x)")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return lines


def floor_section(results: List[Result]) -> List[str]:
    lines = floor_ratios(results)
    if not lines:
        return []
    return [
        "",
        "## Against the floor",
        "",
        "p50 of one round trip, one client thread, and its multiple of the floor's. Every "
        f"row of a size was measured in this run in {ROUNDS} interleaved rounds, so that all "
        "see the same machine load (each round warms every row up again first; a C row's p50 is the median of its rounds' p50s, a "
        "Python row's the p50 of all its round trips). "
        "**C-core echo (floor)**: "
        "a unary echo on the bare gRPC C core, no copies, no protobuf "
        "(`benchmarks/floor/echo_floor.c`): what any design on gRPC whose client sleeps "
        "while it waits pays at least. "
        "**splitlearn-comm core, C hook**: the same round trip through our C core "
        "(`sl_server` with an identity compute hook in C, `sl_client`, one copy per "
        "received tensor on each side; its client busy-polls for the reply like the "
        "Python client), no Python (`benchmarks/floor/core_echo.c`). Both "
        "are built by `make bench-floor` and, like the Python servers, serve from a child "
        "process. **splitlearn-comm, busy_poll=0**: the same server, called by a client "
        "with busy polling off, so that each call sleeps while it waits for its reply as "
        "the floor's client does (docs/api.md, \"Busy polling\"). At 3 KiB a round trip "
        "is mostly cross-CPU wake-ups, so these ratios move with where the scheduler puts "
        "the processes.",
        "",
    ] + lines + [""]


def speedups(results: List[Result]) -> List[str]:
    lines = ["| size | threads | p50 latency: baseline / splitlearn-comm "
             "| throughput: splitlearn-comm / baseline |",
             "|---|--:|--:|--:|"]
    by_key = {(r.size, r.concurrency, r.impl): r for r in results}
    seen = []
    for r in results:
        key = (r.size, r.concurrency)
        if key in seen:
            continue
        seen.append(key)
        a, b = by_key.get(key + (IMPL_SLC,)), by_key.get(key + (IMPL_GRPCIO,))
        if a is None or b is None:
            continue
        lines.append(f"| {r.size} | {r.concurrency} | {b.p50_ms / a.p50_ms:.2f}x "
                     f"| {a.rts / b.rts:.2f}x |")
    return lines


def render(results: List[Result], overlap: List[Result], info: Dict[str, str],
           args: argparse.Namespace, elapsed_s: float) -> str:
    out = ["# Round-trip benchmark results", ""]
    if args.quick:
        out += ["**Quick (smoke) run: too few round trips for these figures to mean "
                "anything.**", ""]
    out += [
        "Generated by `benchmarks/bench_roundtrip.py` (how to run and read it: "
        "`benchmarks/README.md`). A client sends a float32 torch tensor, the server's "
        "`compute()` returns it unchanged, the client receives it as a torch tensor. Both "
        "servers ran in child processes on 127.0.0.1 with 4 worker threads each; the "
        "client ran in the parent process. Two C rows, measured in the same run, give the "
        "floor of any gRPC design and our C core alone (see \"Against the floor\").",
        "",
        "- **splitlearn-comm**: `GRPCComputeServer(IdentityComputeFunction(), "
        "host=\"127.0.0.1\", port=0, max_workers=4)` and "
        "`GRPCComputeClient(address, retry_strategy=None, shared_memory=False)` (TCP).",
        "- **grpcio+numpy**, the baseline a user would otherwise write: "
        "`grpc.server(ThreadPoolExecutor(max_workers=4))` serving the same proto through "
        "grpcio stubs, `torch.from_numpy(np.frombuffer(data, np.float32).reshape(shape))` "
        "on receive, `tensor.numpy().tobytes()` on send, message limits -1, a grpcio stub "
        "as client.",
        "",
        "Machine and software:",
        "",
    ]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [
        f"- command: `{' '.join(['benchmarks/bench_roundtrip.py'] + args.argv)}` "
        f"({elapsed_s:.0f} s)",
        "",
        "**These figures come from a small, shared, noisy 2-vCPU virtual machine**: the "
        "client and the server compete for the same two CPUs, and the same command run "
        "twice can differ by 10-30% (more in p99). Compare only rows of one run, which were "
        "made back to back (for each size, both implementations were warmed up, then timed "
        "one after the other); do not compare them with figures from another machine or "
        "another run.",
        "",
        "## Round trips",
        "",
        "`threads`: client threads sharing one client (one channel). `round trips`: how "
        "many were timed. p50/p99: latency of one round trip as the calling thread sees "
        "it, tensor in to tensor out (with few round trips, p99 is close to the slowest "
        "one). `round trips/s`: completed round trips per second of wall time, all "
        "threads together. `MB/s each way`: tensor payload carried per second in each "
        "direction (MB = 10^6 bytes). `client CPU`: CPU time the client process used "
        "(every thread, gRPC's included) per round trip.",
        "",
    ]
    out += table(results)
    out += ["", "## Speedup of splitlearn-comm over grpcio+numpy", "",
            "Ratios of the rows above (greater than 1: splitlearn-comm is faster).", ""]
    out += speedups(results)
    multi = sorted({r.concurrency for r in results if r.concurrency > 1})
    if multi:
        out += [
            "",
            "On the rows with several threads the calls share one HTTP/2 connection. "
            "With an identity `compute()` a round trip is nothing but CPU work (copies, "
            "TCP, gRPC) split between the client and the server process, and on this "
            "2-vCPU machine one client thread already keeps most of both CPUs busy; more "
            "threads therefore cannot raise the aggregate round trips/s much here and "
            "may lower it (the threads queue for the CPUs, and p50 grows with their "
            "number). Whether calls really are in flight together is what the overlap "
            "check below tests.",
        ]
    if overlap:
        delay = args.overlap_delay_ms
        out += [
            "",
            "## Overlap check: calls from several threads in flight at once",
            "",
            f"The same two servers, except that `compute()` sleeps {delay:g} ms (releasing "
            "the GIL, as a model running in native code does) before returning its 3 KiB "
            f"input. One thread can complete at most {1000 / delay:.0f} round trips/s; "
            f"with K threads, calls that really overlap (client waits with the GIL "
            f"released, calls multiplexed on the channel, server workers in parallel) "
            f"give about K x {1000 / delay:.0f}.",
            "",
        ]
        out += table(overlap)
        base = {r.impl: r for r in overlap if r.concurrency == 1}
        out.append("")
        for r in overlap:
            if r.concurrency > 1 and r.impl in base:
                out.append(f"- {r.impl}: {r.concurrency} threads give "
                           f"{r.rts / base[r.impl].rts:.2f}x the round trips/s of one "
                           f"(ideal {r.concurrency}x).")
    out += floor_section(results)
    return "\n".join(out)


def data(results: List[Result], overlap: List[Result], info: Dict[str, str],
         args: argparse.Namespace) -> Dict[str, Any]:
    """The figures of this run as plain data (benchmarks/data/roundtrip.json)."""
    def rows(rs: List[Result]) -> List[Dict[str, Any]]:
        return [{"size": r.size, "bytes": r.nbytes, "impl": r.impl, "threads": r.concurrency,
                 "n": r.n, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "round_trips_s": r.rts,
                 "mb_s": r.mbs, "client_cpu_ms": r.cpu_ms} for r in rs]

    sizes = {label: math.prod(shape) * 4 for label, shape, *_ in SIZES}
    floor = {r.size: r.p50_ms for r in results if r.impl == IMPL_FLOOR}
    return {"script": "bench_roundtrip.py", "quick": bool(args.quick), "info": info,
            "results": rows([r for r in results if r.impl in CLIENT_IMPLS]),
            "c_rows": rows([r for r in results if r.impl in C_PROGRAMS]),
            "overlap": rows(overlap),
            "reference_p50_ms": {
                "source": "this run: build/bench/echo_floor (benchmarks/floor/echo_floor.c)",
                "sizes_bytes": sizes,
                "gRPC C-core echo, no copies (floor)": floor}}


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run with about 10x fewer round trips; prints the results "
                        "and writes no file unless --output is given")
    p.add_argument("--concurrency", type=int, default=1, metavar="K",
                   help="client threads sharing one client for every size (default 1)")
    p.add_argument("--mux", type=int, default=4, metavar="K",
                   help="also run 1 MiB with K client threads sharing one client, to show "
                        "that calls multiplex (default 4; 0 skips it; skipped when it "
                        "equals --concurrency)")
    p.add_argument("--overlap-delay-ms", type=float, default=20.0, metavar="MS",
                   help="after the main table, run 3 KiB against servers whose compute() "
                        "sleeps MS ms, with 1 and with --mux client threads, to show that "
                        "calls overlap (default 20; 0 skips it)")
    p.add_argument("--sizes", default=",".join(s for s, *_ in SIZES),
                   help="comma-separated subset of: " + ", ".join(s for s, *_ in SIZES))
    p.add_argument("--repeat", type=float, default=1.0, metavar="F",
                   help="scale every round-trip count by F (default 1)")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="where to write the markdown report (default "
                        "benchmarks/results.md; none for --quick)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the C rows (the C-core echo floor and the core with a C hook)")
    p.add_argument("--serve", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--stub-dir", help=argparse.SUPPRESS)
    p.add_argument("--delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if args.mux < 0:
        p.error("--mux must be 0 or more")
    wanted = [s.strip() for s in args.sizes.split(",") if s.strip()]
    known = {s for s, *_ in SIZES}
    bad = [s for s in wanted if s not in known]
    if bad:
        p.error(f"unknown sizes {bad}; choose from {sorted(known)}")
    args.sizes = wanted
    return args


class Servers:
    """Both servers in child processes, a client for each, ready to call."""

    def __init__(self, stub_dir: str, delay_ms: float = 0.0) -> None:
        self.children: List[Child] = []
        self.clients: Dict[str, Any] = {}
        try:
            for impl in IMPLS:
                self.children.append(Child(impl, stub_dir, delay_ms))
            by_impl = {c.impl: c for c in self.children}
            self.clients[IMPL_SLC] = SplitlearnClient(by_impl[IMPL_SLC].address)
            self.clients[IMPL_SLC_SLEEP] = SplitlearnClient(by_impl[IMPL_SLC].address, 0.0)
            self.clients[IMPL_GRPCIO] = GrpcioClient(by_impl[IMPL_GRPCIO].address, stub_dir)
            for impl in CLIENT_IMPLS:
                self.clients[impl].wait_ready(30.0)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for child in self.children:
            child.stop()

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def measure(servers: Servers, plan: Sequence[Tuple[str, Tuple[int, ...], int, int]],
            with_c: bool = False) -> List[Result]:
    """For each (size, shape, n, threads): check, warm up, then time each
    implementation in turn. With ``with_c``, each one-thread size also runs the C
    rows (floor and core), and every row of it is measured in ROUNDS interleaved
    rounds (each round runs each row for its share of ``n``), so that the floor and
    the rows compared with it see the same machine load."""
    results = []
    torch.manual_seed(0)
    for label, shape, n, k in plan:
        x = torch.randn(shape, dtype=torch.float32)
        nbytes = x.numel() * x.element_size()
        warm = max(3, n // 10)
        impls = CLIENT_IMPLS if k == 1 else IMPLS
        for impl in impls:
            call = servers.clients[impl]
            check_identity(call, x, impl, label)
            run_timed(call, x, warm, k)
        rounds = min(ROUNDS, n) if k == 1 and with_c else 1  # no round without calls
        shares = [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]
        c_rows: Dict[str, List[Dict[str, Any]]] = {impl: [] for impl in C_PROGRAMS}
        timed: Dict[str, List[Tuple[List[int], int, int]]] = {impl: [] for impl in impls}
        for share in shares:
            if rounds > 1:
                for impl in C_PROGRAMS:
                    c_rows[impl].append(run_c(impl, nbytes, share, max(3, warm // rounds)))
            for impl in impls:
                if rounds > 1:
                    # as each C row's new process does: the other rows ran meanwhile,
                    # and a server that sat idle has given its memory back (a second
                    # of quiet), which its next few large calls fault in again
                    run_timed(servers.clients[impl], x, max(3, warm // rounds), k)
                timed[impl].append(run_timed(servers.clients[impl], x, share, k))
        if rounds > 1:
            for impl in C_PROGRAMS:
                r = Result.from_rounds(label, nbytes, impl, c_rows[impl])
                results.append(r)
                print(f"{label:>7} {impl:<28} n={r.n:<5} p50={_fmt_ms(r.p50_ms):>8} ms "
                      f"p99={_fmt_ms(r.p99_ms):>8} ms", flush=True)
        for impl in impls:
            lat = [v for t in timed[impl] for v in t[0]]
            r = Result(label, nbytes, impl, k, n, lat, sum(t[1] for t in timed[impl]),
                       sum(t[2] for t in timed[impl]))
            results.append(r)
            print(f"{label:>7} {impl:<16} threads={k} n={n:<5} p50={_fmt_ms(r.p50_ms):>8} ms "
                  f"p99={_fmt_ms(r.p99_ms):>8} ms {_fmt_num(r.rts):>7} rt/s "
                  f"{_fmt_num(r.mbs):>7} MB/s  client CPU {_fmt_ms(r.cpu_ms)} ms/rt", flush=True)
    return results


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.serve:
        return child_main(args.serve, args.stub_dir, args.delay_ms)

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    output = args.output
    if output is None and not args.quick:
        output = os.path.join(HERE, "results.md")

    begun = time.perf_counter()
    info = machine_info()
    stub_dir = tempfile.mkdtemp(prefix="slc-bench-stubs-")
    try:
        generate_stubs(stub_dir)

        plan: List[Tuple[str, Tuple[int, ...], int, int]] = []
        for label, shape, n_full, n_quick in SIZES:
            if label not in args.sizes:
                continue
            n = max(1, int(round((n_quick if args.quick else n_full) * args.repeat)))
            plan.append((label, shape, n, args.concurrency))
            if label == "1 MiB" and args.mux and args.mux != args.concurrency:
                plan.append((label, shape, n * 2, args.mux))
        with Servers(stub_dir) as servers:
            results = measure(servers, plan, with_c=not args.no_floor)

        overlap: List[Result] = []
        if args.overlap_delay_ms > 0 and args.mux > 1:
            label, shape = SIZES[0][0], SIZES[0][1]
            n1 = max(4, int(round((10 if args.quick else 50) * args.repeat)))
            print(f"overlap check: compute() sleeps {args.overlap_delay_ms:g} ms", flush=True)
            with Servers(stub_dir, args.overlap_delay_ms) as servers:
                overlap = measure(servers, [(label, shape, n1, 1),
                                            (label, shape, n1 * args.mux, args.mux)])
    finally:
        shutil.rmtree(stub_dir, ignore_errors=True)

    report = render(results, overlap, info, args, time.perf_counter() - begun)
    if output:
        # keep the other scripts' sections (bench_codecs.py, bench_training.py)
        kept = ""
        if os.path.exists(output):
            with open(output) as f:
                old = f.read()
            at = old.find("<!-- bench_")
            kept = old[at:] if at >= 0 else ""
        with open(output, "w") as f:
            f.write(report.rstrip("\n") + "\n\n" + kept if kept else report)
        write_data(output, "roundtrip", data(results, overlap, info, args))
        shown = os.path.relpath(output)
        print(f"wrote {output if shown.startswith('..') else shown}")
    else:
        print()
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
