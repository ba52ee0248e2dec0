#!/usr/bin/env python3
"""Many clients: requests/s of 16 concurrent client processes against one server.

Each client process sends a 64 KiB float32 tensor to an identity compute() in a loop
for a fixed time; the figure is the completed round trips per second of all
clients together, and the server process's CPU time per request. The servers are
the two of bench_roundtrip.py (splitlearn-comm's GRPCComputeServer, and the plain
grpcio + NumPy server a user would otherwise write), each in a child process on
the same cores; each client process uses the matching client. The two are
measured in alternation (rounds), so that both see the same machine state.

    python3 benchmarks/bench_multiclient.py               # writes its section of results.md
    python3 benchmarks/bench_multiclient.py --quick       # prints only
    python3 benchmarks/bench_multiclient.py --procs 8 --seconds 3
"""
from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_roundtrip as rt  # noqa: E402
from _report import cpu_model, write_data, write_section  # noqa: E402

BEGIN = "<!-- bench_multiclient.py: begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_multiclient.py: end -->"
SHAPE = (64, 256)  # float32: 64 KiB


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process `pid`, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_main(impl: str, address: str, stub_dir: str) -> int:
    """One client process: connect, say READY, wait for a line with the seconds to
    run, call in a loop that long, print the count."""
    import torch

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if impl == rt.IMPL_SLC:
        call: Any = rt.SplitlearnClient(address)
    else:
        call = rt.GrpcioClient(address, stub_dir)
    call.wait_ready(60.0)
    x = torch.randn(SHAPE, dtype=torch.float32)
    rt.check_identity(call, x, impl, "64 KiB")
    for _ in range(5):
        call(x)
    print("READY", flush=True)
    seconds = float(sys.stdin.readline())
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        call(x)
        n += 1
    print(f"COUNT {n}", flush=True)
    call.close()
    return 0


def _line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], timeout)[0]:
        return ""
    return proc.stdout.readline().decode().strip()


def one_round(impl: str, child: rt.Child, stub_dir: str, procs: int, seconds: float
              ) -> Dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (rt.ROOT, env.get("PYTHONPATH")) if p)
    clients = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--client", impl,
                                 child.address, stub_dir],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
               for _ in range(procs)]
    try:
        for c in clients:
            if _line(c, 120.0) != "READY":
                raise RuntimeError(f"a {impl} client did not get ready")
        cpu0, t0 = proc_cpu(child.proc.pid), time.perf_counter()
        for c in clients:
            assert c.stdin is not None
            c.stdin.write(f"{seconds}\n".encode())
            c.stdin.flush()
        counts = []
        for c in clients:
            line = _line(c, seconds + 120.0)
            if not line.startswith("COUNT "):
                raise RuntimeError(f"a {impl} client failed: {line!r}")
            counts.append(int(line.split()[1]))
        wall, cpu = time.perf_counter() - t0, proc_cpu(child.proc.pid) - cpu0
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
            c.wait()
    total = sum(counts)
    return {"rps": total / wall, "server_cpu_us": cpu / max(total, 1) * 1e6,
            "min_client": min(counts), "max_client": max(counts)}


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=16, help="client processes (default 16)")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per round (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per server (default 3)")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s; prints only")
    p.add_argument("--output", default=None, help="results.md to write")
    p.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        return client_main(*args.client)
    if args.quick:
        args.rounds, args.seconds = 1, 2.0
    output = args.output or (None if args.quick else os.path.join(HERE, "results.md"))
    stub_dir = tempfile.mkdtemp(prefix="slc-bench-stubs-")
    rounds: Dict[str, List[Dict[str, float]]] = {i: [] for i in rt.IMPLS}
    try:
        rt.generate_stubs(stub_dir)
        children = {impl: rt.Child(impl, stub_dir) for impl in rt.IMPLS}
        try:
            for r in range(args.rounds):
                for impl in rt.IMPLS:
                    res = one_round(impl, children[impl], stub_dir, args.procs, args.seconds)
                    rounds[impl].append(res)
                    print(f"round {r + 1} {impl:<16} {res['rps']:8.0f} req/s  server CPU "
                          f"{res['server_cpu_us']:6.0f} us/req  per client "
                          f"{res['min_client']:.0f}-{res['max_client']:.0f}", flush=True)
        finally:
            for c in children.values():
                c.stop()
    finally:
        shutil.rmtree(stub_dir, ignore_errors=True)

    med = {impl: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for impl, rs in rounds.items()}
    ratio = med[rt.IMPL_SLC]["rps"] / med[rt.IMPL_GRPCIO]["rps"]
    lines = [
        BEGIN, "",
        "## Many clients: 16 client processes, 64 KiB",
        "",
        f"Generated by `benchmarks/bench_multiclient.py`: {args.procs} client processes each "
        f"send a 64 KiB float32 tensor to an identity `compute()` in a loop for "
        f"{args.seconds:g} s; the servers of the round-trip table (splitlearn-comm with "
        "max_workers=4; grpcio with a 4-thread pool), each in a child process on the same "
        f"cores, measured in alternation ({args.rounds} rounds each, medians shown). "
        f"`server CPU`: the server process's CPU time per request. Machine: {cpu_model()}, "
        f"{os.cpu_count()} CPUs shared by the server and every client, so the figure is "
        "what the whole machine completes, clients' cost included.",
        "",
        "| server | requests/s | server CPU us per request |",
        "|---|--:|--:|",
    ]
    for impl in rt.IMPLS:
        lines.append(f"| {impl} | {med[impl]['rps']:,.0f} | {med[impl]['server_cpu_us']:.0f} |")
    lines += ["", f"splitlearn-comm / grpcio: **{ratio:.2f}x** the requests/s.", "", END, ""]
    text = "\n".join(lines)
    print(text)
    if output:
        write_section(output, text, BEGIN, END)
        write_data(output, "multiclient", {"script": "bench_multiclient.py", "procs": args.procs,
                                           "seconds": args.seconds, "rounds": rounds,
                                           "median": med, "ratio": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
