#!/usr/bin/env python3
"""Where a small round trip's time goes: the layers from the gRPC floor to the API.

One float32 tensor (3 KiB by default) goes to an identity compute and back, through
stacks that add one layer at a time. Every row is measured in the same run,
interleaved round by round (each round runs every row once), and reported as the
p50 over all rounds:

  1 C-core echo (floor)     build/bench/echo_floor: a unary echo on the bare gRPC C core
  2 core, C hook            build/bench/core_echo: our C core, compute hook in C
  3 + bindings              _core.Server with a Python dispatcher that returns the
                            received DLPackTensor as is; _core.Client.compute with a
                            DLPack capsule, the reply left as a DLPackTensor
  4 + torch at the edges    the same, with torch.from_dlpack / to_dlpack on both sides
  5 + server dispatch       GRPCComputeServer(identity) and the client of row 4
  6 + client API            GRPCComputeServer and GRPCComputeClient.compute: the API

Each server runs in a child process (this file run with --serve KIND); the Python
clients run in this process, the C rows in their own. For the Python rows it also
counts the server's CPU time and the context switches per round trip (client and
server threads together, from /proc): each is a thread put to sleep or woken.

Two more columns split each Python row between its sides: "client side" is the
row's client calling our C core's server (build/bench/core_echo run with
CORE_ECHO_SERVE_ONLY=1), "server side" our C core's client calling the row's server
(core_echo with CORE_ECHO_PORT). Each is measured in the same rounds.

Every row is measured twice: with the processes where the scheduler puts them
("spread": on a small machine most of a 3 KiB round trip is then the client's and
the server's threads waking each other across CPUs, which moves from run to run),
and with every process pinned to one CPU ("one CPU": no cross-CPU wake-ups, so
the latency is the length of the path itself, and steadier).

    python3 benchmarks/bench_breakdown.py             # writes its section of results.md
    python3 benchmarks/bench_breakdown.py --quick     # prints only
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import select
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import splitlearn_comm  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is run
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from _report import cpu_model, write_data, write_section  # noqa: E402
from splitlearn_comm import ComputeFunction, GRPCComputeClient, GRPCComputeServer, _core  # noqa: E402

BEGIN = "<!-- bench_breakdown.py: begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_breakdown.py: end -->"
BENCH_BIN = os.path.join(ROOT, "build", "bench")

ROWS = [
    ("floor", "C-core echo (floor)", "bare gRPC C core, no copies, no protobuf"),
    ("core", "our core, C hook", "sl_server + sl_client, identity hook in C, no Python"),
    ("bind", "+ bindings", "_core.Server / _core.Client: GIL hand-offs, the Python hook call, "
                           "Leaf/Call/Reply objects; tensors stay DLPackTensors"),
    ("torch", "+ torch at the edges", "torch.from_dlpack of each received tensor (its capsule) and "
                                      "to_dlpack of each sent one, both sides"),
    ("dispatch", "+ server dispatch", "GRPCComputeServer's dispatcher and compute()"),
    ("api", "+ client API", "GRPCComputeClient.compute (the whole API on both sides)"),
]


# the rows whose client, and whose server, differ from the row above: measured
# alone against our C core's other side
CLIENT_SIDE = ("bind", "torch", "api")
SERVER_SIDE = ("bind", "torch", "dispatch")


class Identity(ComputeFunction):
    def compute(self, input_tensor: Any) -> Any:
        return input_tensor


def _info(*_: Any) -> Any:
    return ("breakdown", "cpu", {})


def serve(kind: str) -> None:
    if kind in ("bind", "torch"):
        out_tensor = _core.OutTensor
        if kind == "bind":
            def dispatch(c: Any) -> Any:
                return [out_tensor(("", c.leaves[0].tensor, None))], 0.0, None, 0, None
        else:
            from_dlpack, to_dlpack = torch.from_dlpack, torch.utils.dlpack.to_dlpack

            def dispatch(c: Any) -> Any:
                x = from_dlpack(c.leaves[0].tensor.__dlpack__())  # a capsule, as the library does
                return [out_tensor(("", to_dlpack(x), None))], 0.0, None, 0, None
        server: Any = _core.Server(compute=dispatch, info=_info, host="127.0.0.1", port=0,
                                   max_workers=4, version="breakdown")
        server.start()
        port = server.port
        stop: Callable[[], None] = lambda: server.stop(1.0)  # noqa: E731
    else:
        s = GRPCComputeServer(Identity(), host="127.0.0.1", port=0, max_workers=4)
        s.start()
        port = s.port
        stop = lambda: s.stop(grace=1.0)  # noqa: E731
    sys.stdout.write(f"PORT {port} PID {os.getpid()}\n")
    sys.stdout.flush()
    while sys.stdin.buffer.read(4096):
        pass
    stop()


class Child:
    """A server process: this file run with --serve KIND, or (KIND "c") our C core's
    server alone (core_echo with CORE_ECHO_SERVE_ONLY=1). It prints its port and
    pid and serves until its stdin closes."""

    def __init__(self, kind: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        env["CORE_ECHO_SERVE_ONLY"] = "1"
        command = [c_program("core_echo")] if kind == "c" else \
            [sys.executable, os.path.abspath(__file__), "--serve", kind]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env)
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], 60.0)[0]
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"server {kind} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.pid = int(line.split()[3])

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ctx_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of `pid`."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(path) as f:
                for line in f:
                    if line.endswith("ctxt_switches:\t0\n"):
                        continue
                    if "ctxt_switches:" in line:
                        total += int(line.split()[1])
        except OSError:  # a thread that ended meanwhile
            pass
    return total


def make_call(kind: str, port: int) -> Tuple[Callable[[torch.Tensor], Any], Callable[[], None]]:
    target = f"127.0.0.1:{port}"
    if kind == "api":
        client = GRPCComputeClient(target, retry_strategy=None)
        if not client.connect(30.0):
            raise RuntimeError("could not connect")
        return client.compute, client.close
    c = _core.Client(target)
    out_tensor, to_dlpack, from_dlpack = _core.OutTensor, torch.utils.dlpack.to_dlpack, torch.from_dlpack
    if kind == "bind":
        def call(x: torch.Tensor) -> Any:
            return c.compute([out_tensor(("", to_dlpack(x), None))]).leaves[0].tensor
    else:
        def call(x: torch.Tensor) -> Any:
            reply = c.compute([out_tensor(("", to_dlpack(x), None))])
            return from_dlpack(reply.leaves[0].tensor.__dlpack__())  # a capsule, as the library does
    call(torch.zeros(1))  # connects
    return call, c.close


def c_program(program: str) -> str:
    path = os.path.join(BENCH_BIN, program)
    if not os.path.exists(path):
        subprocess.run(["make", "-s", "-C", ROOT, "bench-floor"], check=True)
    return path


def run_c(program: str, nbytes: int, n: int, port: Optional[int] = None) -> Dict[str, float]:
    """p50 of a C row and its client's CPU per round trip, in microseconds; with
    ``port``, core_echo's client calls the server there instead of its own."""
    env = dict(os.environ)
    if port is not None:
        env["CORE_ECHO_PORT"] = str(port)
    out = subprocess.run([c_program(program), "--sizes", str(nbytes), "--n", str(n)], check=True,
                         capture_output=True, text=True, timeout=600, env=env)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"p50": float(row["p50_us"]), "cpu": float(row.get("client_cpu_us", "nan"))}


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kinds: List[str], x: torch.Tensor, args: argparse.Namespace,
            cpus: Optional[Set[int]]) -> Dict[str, Dict[str, float]]:
    """Every row, interleaved round by round, with this process and its children on
    ``cpus`` (None: where the scheduler puts them). Per row: p50 us, client CPU us,
    and for the Python rows server CPU us and switches per round trip."""
    before = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # the children (servers, C rows) inherit it
    py_kinds = [k for k in kinds if k not in ("floor", "core")]
    client_side = [k for k in py_kinds if k in CLIENT_SIDE]
    server_side = [k for k in py_kinds if k in SERVER_SIDE]
    calls = {}
    calls_c: Dict[str, Tuple[Callable[[torch.Tensor], Any], Callable[[], None]]] = {}
    children: Dict[str, Child] = {}
    try:
        for k in py_kinds:
            children[k] = Child("full" if k in ("dispatch", "api") else k)
        c_server = Child("c")
        children["c"] = c_server
        for k in py_kinds:
            calls[k] = make_call(k, children[k].port)
        for k in client_side:
            calls_c[k] = make_call(k, c_server.port)
        lat: Dict[str, List[float]] = {k: [] for k in kinds}  # us
        c_p50: Dict[str, List[float]] = {"floor": [], "core": []}
        cpu: Dict[str, List[float]] = {k: [] for k in kinds}  # client CPU us per call
        scpu: Dict[str, List[float]] = {k: [] for k in py_kinds}  # server CPU us per call
        switches: Dict[str, List[float]] = {k: [] for k in py_kinds}
        lat_client: Dict[str, List[float]] = {k: [] for k in client_side}  # us
        p50_server: Dict[str, List[float]] = {k: [] for k in server_side}
        for call in [c[0] for c in calls.values()] + [c[0] for c in calls_c.values()]:
            for _ in range(max(20, args.n // 10)):  # warm-up
                call(x)
        for rnd in range(args.rounds):
            for k in kinds:
                if k in c_p50:
                    row = run_c("echo_floor" if k == "floor" else "core_echo", x.numel() * 4,
                                args.n)
                    c_p50[k].append(row["p50"])
                    cpu[k].append(row["cpu"])
                    continue
                call = calls[k][0]
                clock = time.perf_counter_ns
                pid = children[k].pid
                s0 = ctx_switches(os.getpid()) + ctx_switches(pid)
                c0, sc0 = time.process_time(), server_cpu(pid)
                for _ in range(args.n):
                    t0 = clock()
                    call(x)
                    lat[k].append((clock() - t0) / 1e3)
                cpu[k].append((time.process_time() - c0) / args.n * 1e6)
                scpu[k].append((server_cpu(pid) - sc0) / args.n * 1e6)
                s1 = ctx_switches(os.getpid()) + ctx_switches(pid)
                switches[k].append((s1 - s0) / args.n)
                if k in calls_c:  # the row's client alone: against our C server
                    call = calls_c[k][0]
                    for _ in range(args.n):
                        t0 = clock()
                        call(x)
                        lat_client[k].append((clock() - t0) / 1e3)
                if k in p50_server:  # the row's server alone: our C client
                    p50_server[k].append(run_c("core_echo", x.numel() * 4, args.n,
                                               port=children[k].port)["p50"])
            print(f"{'spread' if cpus is None else 'one CPU'}: round {rnd + 1}/{args.rounds} "
                  "done", flush=True)
    finally:
        for c in list(calls.values()) + list(calls_c.values()):
            c[1]()
        for ch in children.values():
            ch.stop()
        os.sched_setaffinity(0, before)
    out: Dict[str, Dict[str, float]] = {}
    for k in kinds:
        out[k] = {"p50": statistics.median(c_p50[k]) if k in c_p50  # median of rounds' p50s
                  else statistics.median(lat[k]),
                  "client_cpu": statistics.median(cpu[k])}
        if k in scpu:
            out[k]["server_cpu"] = statistics.median(scpu[k])
            out[k]["switches"] = statistics.median(switches[k])
        if k in lat_client:
            out[k]["client_side"] = statistics.median(lat_client[k])
        if k in p50_server:
            out[k]["server_side"] = statistics.median(p50_server[k])
    return out


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bytes", type=int, default=3072, help="tensor bytes (default 3072)")
    p.add_argument("--n", type=int, default=1000, help="round trips per row and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="200 round trips, 2 rounds; prints only")
    p.add_argument("--output", default=None, help="results.md to write (default: benchmarks/"
                                                  "results.md; none with --quick)")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.quick:
        args.n, args.rounds = 200, 2
    output = args.output or (None if args.quick else os.path.join(HERE, "results.md"))
    x = torch.randn(max(1, args.bytes // 4), dtype=torch.float32)
    kinds = [k for k, *_ in ROWS]
    placements = [("spread", None), ("one CPU", {min(os.sched_getaffinity(0))})]
    results = []
    for label, cpus in placements:
        results.append((label, measure(kinds, x, args, cpus)))
    lines = [
        BEGIN,
        "",
        f"## Breakdown of a {x.numel() * 4 / 1024:g} KiB round trip",
        "",
        "Generated by `benchmarks/bench_breakdown.py`: the same identity round trip through "
        "stacks that add one layer at a time, all measured in this run, interleaved "
        f"({args.rounds} rounds of {args.n} round trips per row; p50 over all of a row's "
        "round trips, and for the C rows the median of their rounds' p50s). `switches`: "
        "context switches per round trip in the client and server processes together "
        "(threads put to sleep or woken). `client CPU`: CPU time of the client process "
        "per round trip (all its threads), which the machine's load disturbs less than "
        "latency. `client side` and `server side`: the p50 of the row's client calling our "
        "C core's server, and of our C core's client calling the row's server (the row "
        "with the other side's Python taken away; the core row's p50 is where both "
        "start).",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPUs; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
    ]
    for label, res in results:
        floor = res["floor"]["p50"]
        lines += [
            f"**{label}**: " + ("every process where the scheduler puts it (the client's "
                                "and the server's threads wake each other across the CPUs; "
                                "our clients, C and Python, busy-poll for the reply, the "
                                "floor's client sleeps)"
                                if label == "spread" else
                                "every process pinned to one CPU: no cross-CPU wake-ups, so "
                                "the latency is the length of the path (nothing busy-polls "
                                "on one CPU)"),
            "",
            "| stack | what it adds | p50 us | added us | x floor | client side us "
            "| server side us | client CPU us | server CPU us | switches |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        prev = None
        for k, name, what in ROWS:
            r = res[k]
            added = "" if prev is None else f"{r['p50'] - res[prev]['p50']:+.1f}"
            sw = f"{r['switches']:.1f}" if "switches" in r else "-"
            sc = f"{r['server_cpu']:.0f}" if "server_cpu" in r else "-"
            cs = f"{r['client_side']:.1f}" if "client_side" in r else "-"
            ss = f"{r['server_side']:.1f}" if "server_side" in r else "-"
            lines.append(f"| {name} | {what} | {r['p50']:.1f} | {added} | "
                         f"{r['p50'] / floor:.2f}x | {cs} | {ss} | {r['client_cpu']:.1f} | "
                         f"{sc} | {sw} |")
            prev = k
        lines.append("")
    lines += [END, ""]
    text = "\n".join(lines)
    print(text)
    if output:
        write_section(output, text, BEGIN, END)
        write_data(output, "breakdown", {"script": "bench_breakdown.py", "bytes": x.numel() * 4,
                                         "n": args.n, "rounds": args.rounds,
                                         "placements": dict(results)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
