#!/usr/bin/env python3
"""Streaming benchmark: large tensors sent unary vs streamed (ComputeStream).

The server (an identity compute) runs in its own process. One client measures
sequential round trips of a float32 tensor, switching between the unary method
(``stream_threshold=None``) and the streamed one (``stream_threshold=0``) on the
same channel, interleaved in rounds so that both see the same load; the gRPC
C-core echo floor (``build/bench/echo_floor``, made by ``make bench-floor``) joins
the rounds when it is built. Then, for a 256 MiB round trip, each side's peak RSS
above its baseline, unary vs streamed, each in fresh processes.

    python3 benchmarks/bench_stream.py            # about 1-2 min; writes the
                                                  # "Streaming" section of results.md
    python3 benchmarks/bench_stream.py --quick    # smoke run: prints only
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks._report import cpu_model, write_data, write_section  # noqa: E402

BEGIN = "<!-- bench_stream.py: begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_stream.py: end -->"
FLOOR = os.path.join(ROOT, "build", "bench", "echo_floor")
MIB = 1 << 20


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peer(argv: List[str]) -> None:
    """--peer server | --peer client PORT BYTES THRESHOLD (-1: unary)."""
    import torch

    import splitlearn_comm as slc

    if argv[0] == "server":
        class Echo(slc.ComputeFunction):
            def compute(self, x):
                return x

        server = slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=0).start()
        base = rss("VmRSS")
        print(server.port, flush=True)
        sys.stdin.readline()
        print(rss("VmHWM") - base, flush=True)
        server.stop(grace=0)
        return
    port, nbytes, threshold = argv[1], int(argv[2]), int(argv[3])
    with slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None, timeout=600,
                               shared_memory=False,
                               stream_threshold=None if threshold < 0 else threshold) as c:
        c.compute(torch.ones(4))
        base = rss("VmRSS")
        x = torch.ones(nbytes // 4)
        c.compute(x)
        print(rss("VmHWM") - base, flush=True)


def start_server() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--peer", "server"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)


def stop_server(p: subprocess.Popen) -> int:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("done\n")
    p.stdin.flush()
    peak = int(p.stdout.readline())
    p.wait(30)
    return peak


def floor_p50(nbytes: int, n: int) -> Optional[float]:
    if not os.access(FLOOR, os.X_OK):
        return None
    out = subprocess.run([FLOOR, "--sizes", str(nbytes), "--n", str(n)], capture_output=True,
                         text=True, timeout=300).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])["p50_us"] / 1e3 if lines else None


def round_trips(sizes: List[int], rounds: int, n: int) -> Dict[int, Dict[str, List[float]]]:
    import torch

    import splitlearn_comm as slc

    server = start_server()
    assert server.stdout is not None
    port = server.stdout.readline().strip()
    results: Dict[int, Dict[str, List[float]]] = {}
    with slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None, timeout=600,
                               shared_memory=False) as c:
        for size in sizes:
            x = torch.randn(size // 4)
            res: Dict[str, List[float]] = {"floor": [], "unary": [], "stream": []}
            for threshold in (-1, 0):  # warm both paths (window growth, pooled storage)
                c._core.set_streaming(threshold)
                c.compute(x)
                c.compute(x)
            for _ in range(rounds):
                f = floor_p50(size, n)
                if f is not None:
                    res["floor"].append(f)
                for name, threshold in (("unary", -1), ("stream", 0)):
                    c._core.set_streaming(threshold)
                    times = []
                    for _ in range(n):
                        t = time.perf_counter()
                        c.compute(x)
                        times.append((time.perf_counter() - t) * 1e3)
                    res[name].append(statistics.median(times))
            results[size] = res
            print(f"{size // MIB} MiB: " + ", ".join(
                f"{k} {statistics.median(v):.2f} ms" for k, v in res.items() if v), flush=True)
    stop_server(server)
    return results


def memory(nbytes: int) -> Dict[str, Dict[str, float]]:
    out: Dict[str, Dict[str, float]] = {}
    for name, threshold in (("unary", -1), ("stream", 0)):
        server = start_server()
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        client = subprocess.run([sys.executable, __file__, "--peer", "client", port, str(nbytes),
                                 str(threshold)], capture_output=True, text=True, cwd=ROOT,
                                timeout=300)
        assert client.returncode == 0, client.stderr[-2000:]
        out[name] = {"client": int(client.stdout.split()[-1]) / nbytes,
                     "server": stop_server(server) / nbytes}
        print(f"256 MiB {name}: peak RSS above baseline: client {out[name]['client']:.2f}x, "
              f"server {out[name]['server']:.2f}x the payload", flush=True)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        peer(sys.argv[2:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results", default=os.path.join(HERE, "results.md"))
    args = ap.parse_args()
    load = os.getloadavg()[0]
    sizes = [4 * MIB, 32 * MIB] if args.quick else [1 * MIB, 4 * MIB, 8 * MIB, 32 * MIB]
    rt = round_trips(sizes, rounds=1 if args.quick else 3, n=3 if args.quick else 7)
    mem = memory(256 * MIB) if not args.quick else {}
    if args.quick:
        return
    med = {s: {k: statistics.median(v) for k, v in r.items() if v} for s, r in rt.items()}
    have_floor = all("floor" in m for m in med.values())
    lines = [BEGIN, "## Streaming: unary vs streamed large tensors", "",
             f"{datetime.date.today().isoformat()}, {cpu_model()}, {os.cpu_count()} CPUs; "
             "`benchmarks/bench_stream.py`. Sequential round trips of a float32 tensor "
             "through an identity compute in another process, p50 of each round's median, "
             "median of 3 rounds; in each round the floor (when built), the unary method "
             "(`stream_threshold=None`) and the streamed one (`ComputeStream`, chunks of an "
             "eighth of the message within 512 KiB-4 MiB) run one after the other on the same "
             f"load. Load average when it started: {load:.1f} (on a loaded machine the "
             "figures, the floor's included, move by tens of percent from run to run: compare "
             "the ratios within a row).", ""]
    head = "| size | " + ("C-core echo floor | " if have_floor else "") + \
        "unary | streamed | streamed / unary |" + (" streamed / floor |" if have_floor else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for s, m in med.items():
        row = f"| {s // MIB} MiB | " + (f"{m['floor']:.2f} ms | " if have_floor else "")
        row += f"{m['unary']:.2f} ms | {m['stream']:.2f} ms | {m['stream'] / m['unary']:.2f} |"
        if have_floor:
            row += f" {m['stream'] / m['floor']:.2f} |"
        lines.append(row)
    lines += ["", "Peak RSS above each process's baseline during one 256 MiB round trip "
              "(client: its input included), in multiples of the payload:", "",
              "| | client | server |", "|---|---|---|"]
    for name, m in mem.items():
        lines.append(f"| {name} | {m['client']:.2f}x | {m['server']:.2f}x |")
    lines += ["", END, ""]
    write_section(args.results, "\n".join(lines), BEGIN, END)
    write_data(args.results, "stream", {"round_trips_ms": {str(s): m for s, m in med.items()},
                                        "peak_rss_256mib": mem})


if __name__ == "__main__":
    main()
