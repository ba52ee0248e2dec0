#!/usr/bin/env python3
"""Many tensors per call vs the same bytes as one tensor: the cost of each extra tensor.

A transformer stage's traffic: hidden states (1x128x768 float16) plus a 12-layer KV
cache (24 tensors of 1x12x128x64 float16), sent to an echo server and back in one
call, as a structure ``{"hidden": h, "past": ((k, v), ...)}`` (25 named tensors each
way), against one float16 tensor holding the same bytes. The difference, divided by
the 24 extra tensors, is what one more tensor in a call costs.

Per call it reports:

- client: the client's wall time minus the server's whole handling of the call
  (the server's ``total`` stage, from the request's arrival to its reply being sent);
  what is left is the client's work (flattening the structure, exporting each tensor
  through DLPack, framing, reading the reply, rebuilding the structure) plus the
  loopback transfer, which is the same bytes in both cases;
- server: its ``decode`` + ``compute`` + ``encode`` stages (reading and copying each
  tensor once, the Python hand-off that rebuilds the structure and calls the echo
  ``compute()``, flattening and framing the reply).

Both paths of a call on one host are measured: over TCP (gRPC carries the tensor
bytes, as between any two hosts; ``shared_memory=False``) and through shared memory
(the default for a 127.0.0.1 target: gRPC carries a control message, the bytes go
through a memfd segment; docs/shm.md). The per-tensor goal is read on the TCP path,
the one every deployment has; the shared-memory rows show what that path adds or
saves per tensor.

The server runs in this process with one worker; the client's waits release the GIL,
so the two do not contend. Cases run in interleaved rounds so that drifts of a noisy
machine hit both alike.

    python3 benchmarks/bench_tensormap.py           # full run (~60 s); writes the "Tensor
                                                    # maps" section of benchmarks/results.md
    python3 benchmarks/bench_tensormap.py --quick   # smoke run: prints only
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from _report import cpu_model, write_section  # noqa: E402

import splitlearn_comm as slc  # noqa: E402
from splitlearn_comm import _structure  # noqa: E402

BEGIN = "<!-- bench_tensormap.py: begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_tensormap.py: end -->"

LAYERS = 12
KV_SHAPE = (1, 12, 128, 64)
HIDDEN_SHAPE = (1, 128, 768)


class Echo(slc.ComputeFunction):
    """Echoes its input; remembers the CPU clock of the worker thread serving it."""

    clock: Any = None

    def compute(self, x: Any) -> Any:
        if self.clock is None:
            self.clock = time.pthread_getcpuclockid(threading.get_ident())
        return x


def stage_sums(server: slc.GRPCComputeServer) -> Dict[str, float]:
    lat = server.metrics()["latency_seconds"]
    return {k: v["sum"] for k, v in lat.items()} | {"count": lat["total"]["count"]}


def run_case(client: slc.GRPCComputeClient, server: slc.GRPCComputeServer, echo: Echo,
             payload: Any, n: int) -> Dict[str, List[float]]:
    walls: List[float] = []
    own: List[float] = []
    reply: List[Any] = []
    before = stage_sums(server)
    cpu0, wcpu0 = time.thread_time(), time.clock_gettime(echo.clock)
    for _ in range(n):
        t0 = time.perf_counter()
        client._tensor_call(payload, _reply=reply)  # compute(), handing over its Reply
        walls.append(time.perf_counter() - t0)
        # only the figures are kept: a Reply holds the received tensors, and keeping
        # them would keep their storage (and segments) from being reused
        r = reply.pop()
        own.append(r.encode_ms + r.decode_ms)
        del r
    cpu1, wcpu1 = time.thread_time(), time.clock_gettime(echo.clock)
    # the client's own stages: flattening (timed here, as compute() runs it), then
    # what the Reply says: exporting and packing, reading and building the result
    t0 = time.perf_counter()
    for _ in range(n):
        _structure.flatten(payload)
    flat = (time.perf_counter() - t0) / n
    stages = flat + statistics.mean(own) / 1e3
    after = stage_sums(server)
    calls = after["count"] - before["count"]
    per = {k: (after[k] - before[k]) / calls for k in ("decode", "compute", "encode", "total")}
    return {"wall": walls, "server": [per["decode"] + per["compute"] + per["encode"]],
            "server_total": [per["total"]], "client_stages": [stages],
            "client_cpu": [(cpu1 - cpu0) / n],
            "server_cpu": [(wcpu1 - wcpu0) / calls]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few calls; print only")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=40,
                    help="calls per case per round through shared memory; over TCP, whose "
                         "calls vary more (the kernel's work on the bytes), 4 times as many")
    args = ap.parse_args()
    rounds, calls = (2, 5) if args.quick else (args.rounds, args.calls)
    per_path = {"TCP": 4 * calls, "shared memory": calls}
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(HIDDEN_SHAPE, generator=g).half()
    past = tuple((torch.randn(KV_SHAPE, generator=g).half(), torch.randn(KV_SHAPE, generator=g).half())
                 for _ in range(LAYERS))
    structure = {"hidden": hidden, "past": past}
    n_bytes = hidden.numel() * 2 + 2 * LAYERS * past[0][0].numel() * 2
    one = torch.randn(n_bytes // 2, generator=g).half()
    cases = {"one tensor": one, "25 tensors": structure}
    paths = {"TCP": False, "shared memory": True}
    keys = [(p, c) for p in paths for c in cases]
    results: Dict[Any, Dict[str, List[float]]] = {
        k: {"wall": [], "server": [], "client": [], "client_stages": [], "client_cpu": [],
            "server_cpu": []}
        for k in keys}
    echo = Echo()
    with slc.GRPCComputeServer(echo, host="127.0.0.1", port=0, max_workers=1) as server:
        clients = {p: slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None,
                                            shared_memory=shm) for p, shm in paths.items()}
        try:
            for p, c in keys:  # warm-up
                for _ in range(3):
                    clients[p].compute(cases[c])
            for _ in range(rounds):
                for p, c in keys:
                    r = run_case(clients[p], server, echo, cases[c], per_path[p])
                    res = results[(p, c)]
                    res["wall"].append(statistics.median(r["wall"]))
                    res["server"].append(r["server"][0])
                    res["client"].append(statistics.mean(r["wall"]) - r["server_total"][0])
                    res["client_stages"].append(r["client_stages"][0])
                    res["client_cpu"].append(r["client_cpu"][0])
                    res["server_cpu"].append(r["server_cpu"][0])
        finally:
            for client in clients.values():
                client.close()
    # Each round ran both cases back to back: the per-tensor cost is read from each
    # round's pair (so a drift of this shared, noisy machine hits both cases alike),
    # and its median over the rounds is reported with the quartiles of that spread.
    extra = 2 * LAYERS  # tensors beyond the first
    stats = ("client", "client_stages", "server", "client_cpu", "server_cpu")
    med = {k: {s: statistics.median(v) * 1e3 for s, v in r.items()} for k, r in results.items()}
    per: Dict[str, Dict[str, float]] = {}
    spread: Dict[str, Dict[str, Any]] = {}
    for p in paths:
        per[p], spread[p] = {}, {}
        for s in stats:
            d = [(b - a) * 1e6 / extra for a, b in zip(results[(p, "one tensor")][s],
                                                   results[(p, "25 tensors")][s])]
            q = statistics.quantiles(d, n=4) if len(d) > 1 else [d[0], d[0], d[0]]
            per[p][s], spread[p][s] = statistics.median(d), (q[0], q[2])
    lines = [
        BEGIN,
        "## Tensor maps: 25 tensors in one call vs the same bytes as one tensor",
        "",
        f"`benchmarks/bench_tensormap.py`, {datetime.date.today().isoformat()}, "
        f"{cpu_model()}, Python {platform.python_version()}, torch {torch.__version__}; "
        f"server and client in one process on 127.0.0.1, {rounds} rounds of {per_path['TCP']} "
        f"calls per case over TCP and {calls} through shared memory, interleaved (medians "
        "over the rounds).",
        "",
        f"Payload each way: hidden states {tuple(HIDDEN_SHAPE)} + a {LAYERS}-layer KV cache "
        f"({2 * LAYERS} tensors of {tuple(KV_SHAPE)}), float16, {n_bytes / 2**20:.2f} MiB; "
        "echoed back. TCP: gRPC carries the bytes (`shared_memory=False`, as between two "
        "hosts); shared memory: the default on one host (docs/shm.md).",
        "",
        "| path | case | wall p50 (ms) | client (ms) | client stages (ms) "
        "| server decode+compute+encode (ms) | client thread CPU (ms) | server worker CPU (ms) |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for p, c in keys:
        m = med[(p, c)]
        lines.append(f"| {p} | {c} | {m['wall']:.3f} | {m['client']:.3f} "
                     f"| {m['client_stages']:.3f} | {m['server']:.3f} "
                     f"| {m['client_cpu']:.3f} | {m['server_cpu']:.3f} |")
    lines += [
        "",
        "Cost per extra tensor (24 of them, both directions of the echo included; goal: "
        "under 5 us per tensor on each side): the median over the rounds of each round's "
        "difference between the two cases, divided by 24, with its quartiles in brackets:",
        "",
        "| path | client, wall (us) | client, stages (us) | server, stages (us) "
        "| client thread CPU (us) | server worker CPU (us) |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for p in paths:
        q, r = per[p], spread[p]
        lines.append("| " + p + " | " + " | ".join(
            f"{q[s]:.1f} [{r[s][0]:.1f}, {r[s][1]:.1f}]" for s in stats) + " |")
    lines += [
        "",
        "Per round the median call (CPU and stages: the mean). The client's wall column is "
        "wall time minus the server's total stage, so it carries the loopback transfer and "
        "its noise; the client's stages are its own work, wall clock: flattening the "
        "structure, exporting and packing the tensors, reading the reply and building its "
        "objects (`Reply.encode_ms` and `decode_ms`); the server's are its decode, compute "
        "and encode stages (wall clock). Over TCP the CPU columns also carry whatever part "
        "of the kernel's loopback work lands on each thread, which moves from round to "
        "round; the stage columns leave the transfer out. The CPU columns are the "
        "calling thread's CPU time (the client's Python, the binding and the core, its "
        "receive included) and the server worker's (receive, decode, the Python hand-off, "
        "encode, send).",
        END,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_section(os.path.join(HERE, "results.md"), text, BEGIN, END)


if __name__ == "__main__":
    main()
