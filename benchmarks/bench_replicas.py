#!/usr/bin/env python3
"""Replicas benchmark: requests per second with 1, 2 and 3 server replicas.

Each replica is a server process on 127.0.0.1 hosting a small model (a 256 -> 256
linear layer, one torch thread). One client process spreads calls over the
replicas with gRPC's round_robin (``GRPCComputeClient([...])``) from 8 threads,
each sending a 32 x 256 float32 tensor (32 KiB) and waiting for the answer. For
each replica count it reports:

- requests per second over the measured window;
- the CPU time per call (user + system, of the client and every replica together,
  read from /proc), which is the figure that tells how the rate would scale with
  cores: with C free cores, the rate cannot exceed C / (CPU per call);
- how the calls spread over the replicas.

On a machine with fewer cores than processes the replicas share the cores, the
rate stays flat (or drops: more processes, more context switches) and only the
CPU per call is comparable across rows.

    python3 benchmarks/bench_replicas.py            # about 45 s; writes the "Replicas"
                                                    # section of benchmarks/results.md
    python3 benchmarks/bench_replicas.py --quick    # smoke run: prints only

The rest of results.md is kept as it is.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from _report import cpu_model, write_section  # noqa: E402

BEGIN = "<!-- bench_replicas.py: begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_replicas.py: end -->"
THREADS = 8
SHAPE = (32, 256)


def serve(index: int) -> None:
    """The replica process: serve until stdin closes."""
    import torch

    from splitlearn_comm import GRPCComputeServer, ModelComputeFunction

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(SHAPE[1], SHAPE[1]).eval()
    server = GRPCComputeServer(ModelComputeFunction(model), host="127.0.0.1", port=0,
                               max_workers=THREADS).start()
    print(f"PORT {server.port}", flush=True)
    sys.stdin.read()
    server.stop(1.0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(n: int, warmup: float, seconds: float) -> Dict[str, float]:
    import torch

    from splitlearn_comm import GRPCComputeClient

    procs: List[subprocess.Popen] = []
    try:
        for i in range(n):
            procs.append(subprocess.Popen([sys.executable, __file__, "--serve", str(i)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True))
        ports = []
        for p in procs:
            line = p.stdout.readline()
            if not line.startswith("PORT "):
                raise RuntimeError(f"a replica did not start: {line!r}")
            ports.append(int(line.split()[1]))
        client = GRPCComputeClient([f"127.0.0.1:{port}" for port in ports], timeout=30)
        x = torch.randn(*SHAPE)
        count = [0] * THREADS
        state = {"measure": False, "stop": False}

        def worker(i: int) -> None:
            while not state["stop"]:
                client.compute(x)
                if state["measure"]:
                    count[i] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        time.sleep(warmup)
        pids = [os.getpid()] + [p.pid for p in procs]
        before = {pid: cpu_seconds(pid) for pid in pids}
        served0 = [p_total(port) for port in ports]
        t0 = time.monotonic()
        state["measure"] = True
        time.sleep(seconds)
        state["measure"] = False
        elapsed = time.monotonic() - t0
        after = {pid: cpu_seconds(pid) for pid in pids}
        calls = sum(count)
        state["stop"] = True
        for t in threads:
            t.join()
        served = [p_total(port) - s0 for port, s0 in zip(ports, served0)]
        client.close()
        cpu = sum(after[p] - before[p] for p in pids)
        client_cpu = after[os.getpid()] - before[os.getpid()]
        return {"replicas": n, "calls": calls, "rps": calls / elapsed,
                "cpu_us": 1e6 * cpu / max(calls, 1),
                "client_cpu_us": 1e6 * client_cpu / max(calls, 1),
                "server_cpu_us": 1e6 * (cpu - client_cpu) / max(calls, 1),
                "cores_busy": cpu / elapsed, "load": os.getloadavg()[0],
                "spread": "/".join(str(s) for s in served)}
    finally:
        for p in procs:
            try:
                p.stdin.close()
                p.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait()


def p_total(port: int) -> int:
    from splitlearn_comm import GRPCComputeClient

    with GRPCComputeClient(f"127.0.0.1:{port}", timeout=10, retry_strategy=None) as c:
        return int(c.get_service_info()["total_requests"])


def report(rows: List[Dict[str, float]], seconds: float) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [BEGIN, "## Replicas", "",
             f"Measured {datetime.date.today().isoformat()} on {cpu_model()}, {cores} cores "
             f"available, Python {platform.python_version()}: one client process, "
             f"{THREADS} threads, calls spread by round_robin over N replica processes "
             f"(each a 256 -> 256 linear layer, one torch thread, {THREADS} workers), "
             f"a {SHAPE[0]} x {SHAPE[1]} float32 tensor (32 KiB) each way, {seconds:g} s "
             "per row after a warm-up. CPU is user + system time of the client and all "
             "replicas, from /proc.", "",
             "| replicas | requests/s | CPU per call (all) | client | replicas | cores busy "
             "| calls per replica |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['replicas']} | {r['rps']:,.0f} | {r['cpu_us']:.0f} us | "
                     f"{r['client_cpu_us']:.0f} us | {r['server_cpu_us']:.0f} us | "
                     f"{r['cores_busy']:.2f} | {r['spread']} |")
    one = rows[0]
    busy = ", ".join(f"{r['cores_busy']:.1f}" for r in rows)
    load = max(r["load"] for r in rows)
    lines += ["", "## Reading", "",
              f"- With {cores} cores the client and the replicas share the same CPUs. The rows "
              f"kept {busy} cores busy with this benchmark's processes alone, and the load "
              f"average reached {load:.1f} (other work on the machine took the rest): the "
              "CPUs were saturated, so more replicas could not add requests per second here; "
              "the rate stays flat or drops as more processes compete.",
              f"- A call costs about {one['cpu_us']:.0f} us of CPU in all "
              f"({one['client_cpu_us']:.0f} us in the client, {one['server_cpu_us']:.0f} us "
              "in a replica) with one replica: one core carries about "
              f"{1e6 / one['cpu_us']:,.0f} calls/s end to end. Given a core of its own, a "
              f"replica would serve up to about {1e6 / max(one['server_cpu_us'], 1):,.0f} "
              "calls/s, and one client core drives about "
              f"{1e6 / max(one['client_cpu_us'], 1):,.0f} calls/s; so with a core per "
              "replica (and enough client cores) the rate grows with the replicas.",
              f"- CPU per call goes from {one['cpu_us']:.0f} us with one replica to "
              f"{rows[-1]['cpu_us']:.0f} us with {rows[-1]['replicas']}: on a saturated "
              "machine every extra process adds context switches, and each replica sees "
              "fewer calls at a time, so fewer calls share each wake-up of its threads. "
              "Balancing itself costs the client only the pick of a connection per call.",
              "- Calls per replica show round_robin's spread.",
              END, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run; print only")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    warmup, seconds = (0.5, 1.5) if args.quick else (2.0, 8.0)
    rows = []
    for n in (1, 2, 3):
        row = run(n, warmup, seconds)
        print(f"{n} replica(s): {row['rps']:,.0f} requests/s, {row['cpu_us']:.0f} us CPU/call "
              f"(client {row['client_cpu_us']:.0f}, replicas {row['server_cpu_us']:.0f}), "
              f"{row['cores_busy']:.2f} cores busy, spread {row['spread']}", flush=True)
        rows.append(row)
    if not args.quick:
        write_section(os.path.join(HERE, "results.md"), report(rows, seconds), BEGIN, END)
        print("wrote the Replicas section of benchmarks/results.md")


if __name__ == "__main__":
    main()
