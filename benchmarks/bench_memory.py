#!/usr/bin/env python3
"""Memory benchmark: what a server keeps after a burst, and the peak of a big call.

A server process on 127.0.0.1 hosts an identity ``compute()``; this process is the
client. Resident memory is read from /proc (VmRSS, and VmHWM reset through
clear_refs for peaks), so it needs Linux.

1. **Idle after a burst.** The server's RSS after its first call (the start), right
   after 8 client threads each sent 25 calls of an 8 MiB float32 tensor, and after
   3 s of quiet (the server gives its storage pool's idle blocks and the C
   allocator's free pages back once a second of quiet follows calls).
2. **A 256 MiB round trip.** The peak RSS above each side's baseline during one
   round trip of a 256 MiB float32 tensor, as a multiple of the payload; the
   client's baseline is taken before the input tensor exists, so the input counts.
   Three calls: the first is cold. Before each, both sides give back what they
   kept (the client calls ``release_memory()``, the server does it after a second
   of quiet), so each baseline is what the process needs, not what it kept.

    python3 benchmarks/bench_memory.py            # about 30 s; writes the "Memory"
                                                  # section of benchmarks/results.md
    python3 benchmarks/bench_memory.py --quick    # smoke run: prints only

The rest of results.md is kept as it is.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import splitlearn_comm as slc  # noqa: E402
from _report import cpu_model, write_data, write_section  # noqa: E402

BEGIN = "<!-- bench_memory.py: begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_memory.py: end -->"

SERVER = r"""
import sys
import torch
import splitlearn_comm as slc

class Echo(slc.ComputeFunction):
    def compute(self, input_tensor):
        return input_tensor

server = slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=0, max_workers=16)
server.start()
print(server.port, flush=True)
sys.stdin.read()
server.stop()
"""

MIB = 1024 * 1024


def status_mib(pid: int, key: str) -> float:
    """A /proc/PID/status figure (``VmRSS``, ``VmHWM``) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def run(quick: bool) -> Dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        # over TCP, as these figures were taken (a same-host segment would count in
        # both sides' RSS: docs/shm.md)
        client = slc.GRPCComputeClient(f"127.0.0.1:{port}", timeout=120, shared_memory=False)
        client.compute(torch.ones(4))
        time.sleep(1.5)  # let the server's first-call allocations settle
        start = status_mib(proc.pid, "VmRSS")

        threads, calls = (4, 5) if quick else (8, 25)
        x = torch.randn(2 * MIB)  # 8 MiB of float32

        def burst() -> None:
            for _ in range(calls):
                client.compute(x)

        workers = [threading.Thread(target=burst) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        after = status_mib(proc.pid, "VmRSS")
        time.sleep(3.0)
        idle = status_mib(proc.pid, "VmRSS")
        del x

        big: List[Dict[str, float]] = []
        numel = (16 if quick else 64) * MIB  # float32: 64 or 256 MiB
        payload = numel * 4 / MIB
        me = os.getpid()
        for _ in range(3):
            gc.collect()
            slc.release_memory()  # the client's baseline without what it kept
            time.sleep(1.5)  # a quiet second: the server gives memory back
            reset_peak(proc.pid)
            reset_peak(me)
            server_base, client_base = status_mib(proc.pid, "VmRSS"), status_mib(me, "VmRSS")
            inp = torch.randn(numel)
            t0 = time.perf_counter()
            out = client.compute(inp)
            ms = (time.perf_counter() - t0) * 1e3
            big.append({"ms": ms,
                        "client_x": (status_mib(me, "VmHWM") - client_base) / payload,
                        "server_x": (status_mib(proc.pid, "VmHWM") - server_base) / payload})
            del inp, out
        client.close()
        return {"burst": {"threads": threads, "calls_per_thread": calls, "mib": 8,
                          "start_mib": start, "after_mib": after, "idle_mib": idle},
                "big": {"payload_mib": payload, "calls": big}}
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)


def report(res: Dict[str, Any]) -> str:
    b, g = res["burst"], res["big"]
    lines = [BEGIN, "## Memory", "",
             f"Measured {datetime.date.today().isoformat()} on {cpu_model()} "
             f"({os.cpu_count()} cores) by `benchmarks/bench_memory.py`: a server process "
             "with an identity `compute()`, this process as the client; RSS from /proc.", "",
             f"**Idle after a burst** ({b['threads']} threads x {b['calls_per_thread']} calls "
             f"of an {b['mib']} MiB tensor):", "",
             "| server RSS | MiB | x start |", "|---|--:|--:|",
             f"| after its first call (start) | {b['start_mib']:.0f} | 1.00 |",
             f"| right after the burst | {b['after_mib']:.0f} | {b['after_mib'] / b['start_mib']:.2f} |",
             f"| after 3 s idle | {b['idle_mib']:.0f} | {b['idle_mib'] / b['start_mib']:.2f} |", "",
             f"**A {g['payload_mib']:.0f} MiB round trip**: peak RSS above each side's baseline, "
             "as a multiple of the payload (the client's input included):", "",
             "| call | ms | client | server |", "|---|--:|--:|--:|"]
    for i, c in enumerate(g["calls"]):
        lines.append(f"| {i + 1}{' (cold)' if i == 0 else ''} | {c['ms']:.0f} | "
                     f"{c['client_x']:.2f}x | {c['server_x']:.2f}x |")
    lines += ["", "The floor is 2x on the client (its input and the output it receives) and "
              "1x on the server (the one copy it receives into; the reply is sent from it); "
              "above it is gRPC's received message, held while its bytes are copied out.",
              END, ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run; print only")
    args = parser.parse_args()
    res = run(args.quick)
    text = report(res)
    print(text)
    if not args.quick:
        results = os.path.join(HERE, "results.md")
        write_section(results, text, BEGIN, END)
        write_data(results, "memory", res)
        print("wrote the Memory section of benchmarks/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
