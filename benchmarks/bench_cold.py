#!/usr/bin/env python3
"""Cold large calls: the first round trips of 256 MiB on a new client and server.

For each stack a new server process and a new client process are started, the
client connects, then times its first three round trips of a 256 MiB float32 tensor
through an identity compute, one after the other. The stacks, measured in
alternation (rounds):

  C-core echo (floor)   build/bench/echo_floor --cold: the bare gRPC C core, no copies
  our core, C hook      build/bench/core_echo --cold: our C core, no Python, over TCP
  splitlearn-comm       GRPCComputeServer and GRPCComputeClient (this file, --client):
                        on 127.0.0.1 the tensors go through shared memory (the default)
  splitlearn-comm, TCP  the same with SPLITLEARN_SHM=0 (streamed over the connection)

For splitlearn-comm it also counts the page faults of each call (client and server
processes): a first call touches memory that no earlier call has (gRPC's receive
buffers and the tensor storage on each side), and on a virtual machine every first
touch of a page is a fault, which is where most of a cold call's extra time goes.

    python3 benchmarks/bench_cold.py             # writes its section of results.md
    python3 benchmarks/bench_cold.py --quick     # one round, prints only
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _report import cpu_model, write_data, write_section  # noqa: E402

BEGIN = "<!-- bench_cold.py: begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_cold.py: end -->"
BENCH_BIN = os.path.join(ROOT, "build", "bench")
MiB = 1 << 20


def minflt(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def serve() -> int:
    import torch  # noqa: F401  (imported before the first call, as a server does)

    from splitlearn_comm import ComputeFunction, GRPCComputeServer

    class Identity(ComputeFunction):
        def compute(self, input_tensor: Any) -> Any:
            return input_tensor

    server = GRPCComputeServer(Identity(), host="127.0.0.1", port=0, max_workers=4)
    server.start()
    print(f"PORT {server.port}", flush=True)
    while sys.stdin.buffer.read(4096):
        pass
    server.stop(grace=1.0)
    return 0


def client(address: str, nbytes: int, calls: int, server_pid: int) -> int:
    import torch

    from splitlearn_comm import GRPCComputeClient

    x = torch.randn(nbytes // 4, dtype=torch.float32)
    c = GRPCComputeClient(address, retry_strategy=None)
    if not c.connect(60.0):
        raise SystemExit("could not connect")
    times, faults_c, faults_s = [], [], []
    for _ in range(calls):
        f0, s0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, minflt(server_pid)
        t0 = time.perf_counter()
        y = c.compute(x)
        times.append((time.perf_counter() - t0) * 1e3)
        faults_c.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        faults_s.append(minflt(server_pid) - s0)
        if y.shape != x.shape:
            raise SystemExit("the reply is not the request")
        del y
    c.close()
    print(json.dumps({"calls_ms": times, "client_faults": faults_c, "server_faults": faults_s}),
          flush=True)
    return 0


def run_ours(nbytes: int, calls: int, shm: bool = True) -> Dict[str, Any]:
    env = dict(os.environ)
    if not shm:
        env["SPLITLEARN_SHM"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    me = os.path.abspath(__file__)
    srv = subprocess.Popen([sys.executable, me, "--serve"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, env=env)
    try:
        assert srv.stdout is not None
        ready = select.select([srv.stdout], [], [], 120.0)[0]
        line = srv.stdout.readline().decode() if ready else ""
        if not line.startswith("PORT "):
            raise RuntimeError(f"the server did not start: {line!r}")
        port = int(line.split()[1])
        out = subprocess.run([sys.executable, me, "--client", f"127.0.0.1:{port}", str(nbytes),
                              str(calls), str(srv.pid)], env=env, check=True,
                             capture_output=True, text=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if srv.poll() is None:
            assert srv.stdin is not None
            srv.stdin.close()
            try:
                srv.wait(timeout=30)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()


def run_c(program: str, nbytes: int, calls: int) -> Dict[str, Any]:
    path = os.path.join(BENCH_BIN, program)
    if not os.path.exists(path):
        subprocess.run(["make", "-s", "-C", ROOT, "bench-floor"], check=True)
    # our core's client over TCP, as the floor (the same-host row is splitlearn-comm's)
    out = subprocess.run([path, "--cold", str(nbytes), "--cold-calls", str(calls)], check=True,
                         env={**os.environ, "SPLITLEARN_SHM": "0"},
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256, help="tensor MiB (default 256)")
    p.add_argument("--calls", type=int, default=3, help="calls on each new client (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    p.add_argument("--quick", action="store_true", help="one round; prints only")
    p.add_argument("--output", default=None, help="results.md to write")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return serve()
    if args.client:
        a = args.client
        return client(a[0], int(a[1]), int(a[2]), int(a[3]))
    if args.quick:
        args.rounds = 1
    output = args.output or (None if args.quick else os.path.join(HERE, "results.md"))
    nbytes = args.mib * MiB
    stacks = [("C-core echo (floor)", lambda: run_c("echo_floor", nbytes, args.calls)),
              ("our core, C hook", lambda: run_c("core_echo", nbytes, args.calls)),
              ("splitlearn-comm", lambda: run_ours(nbytes, args.calls)),
              ("splitlearn-comm, TCP", lambda: run_ours(nbytes, args.calls, shm=False))]
    rows: Dict[str, List[Dict[str, Any]]] = {name: [] for name, _ in stacks}
    for r in range(args.rounds):
        for name, run in stacks:
            res = run()
            rows[name].append(res)
            print(f"round {r + 1} {name:<20} " + " ".join(f"{t:7.0f}" for t in res["calls_ms"])
                  + " ms", flush=True)
    med = {name: [statistics.median(res["calls_ms"][i] for res in rs) for i in range(args.calls)]
           for name, rs in rows.items()}
    floor_first = med["C-core echo (floor)"][0]
    faults = {name: {k: [statistics.median(res[k][i] for res in rows[name])
                         for i in range(args.calls)]
                     for k in ("client_faults", "server_faults")}
              for name in ("splitlearn-comm", "splitlearn-comm, TCP")}
    lines = [
        BEGIN, "",
        f"## Cold large calls: the first {args.calls} round trips of {args.mib} MiB",
        "",
        f"Generated by `benchmarks/bench_cold.py`: for each stack a new server process and a "
        f"new client process; the client connects, then times its first {args.calls} round "
        f"trips of a {args.mib} MiB float32 tensor through an identity compute. Stacks "
        f"measured in alternation, {args.rounds} rounds, medians shown; `x floor`: the "
        "first call against the C-core echo's first call. On 127.0.0.1 splitlearn-comm "
        "sends tensors through shared memory (docs/shm.md; the first call offers the "
        "segment on a health check, then goes through it); the TCP row turns that off "
        "(`SPLITLEARN_SHM=0`), as between two hosts. Machine: "
        f"{cpu_model()}, {os.cpu_count()} CPUs.",
        "",
        "| stack | " + " | ".join(f"call {i + 1} ms" for i in range(args.calls))
        + " | first call x floor's |",
        "|---|" + "--:|" * (args.calls + 1),
    ]
    for name in rows:
        lines.append(f"| {name} | " + " | ".join(f"{t:.0f}" for t in med[name])
                     + f" | {med[name][0] / floor_first:.2f}x |")
    lines += ["", f"Page faults per call (medians; 4 KiB pages: {nbytes // 4096:,} make "
              f"{args.mib} MiB):", ""]
    for name, f in faults.items():
        lines.append(f"- {name}: client "
                     f"{', '.join(f'{v:,.0f}' for v in f['client_faults'])}; server "
                     f"{', '.join(f'{v:,.0f}' for v in f['server_faults'])}.")
    lines += ["", END, ""]
    text = "\n".join(lines)
    print(text)
    if output:
        write_section(output, text, BEGIN, END)
        write_data(output, "cold", {"script": "bench_cold.py", "mib": args.mib,
                                    "rounds": rows, "median_ms": med, "faults": faults})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
