#!/usr/bin/env python3
"""Asynchronous calls: pipelined split training, and futures vs threads.

Part 1, pipelining. A split MLP whose three parts each take about a third of a
sequential training step: the client's layers (bottom, head, loss, optimizer), the
server's slice (a ``TrainableComputeFunction`` in a child process on 127.0.0.1,
forward + backward + SGD step), and the transfer of the activations and gradients
(4 MiB each way, twice per step). It reports steps/s of the plain sequential step
(``head(client.remote(bottom(x)))``, then ``loss.backward()``) and of
``client.pipeline(chunks=K).step(...)`` for K = 2, 4, 8 (GPipe-style: every
micro-batch forward in flight, then the backwards in reverse; the server steps once
per batch). The split of the sequential step is measured as in bench_training.py:
server compute as the server reports it, transport = time inside the calls minus
that, client = the rest. Each process uses one torch thread.

Part 2, concurrency of unary calls at 3 KiB and 1 MiB against an echo server in a
child process: calls/s with W calls kept in flight by futures from ONE thread
(``compute_async``), against N threads each calling the blocking ``compute()``.

    python3 benchmarks/bench_async.py           # about a minute; writes the "Asynchronous
                                                # calls" section of benchmarks/results.md
    python3 benchmarks/bench_async.py --quick   # smoke run (about 20 s): prints only
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _report import cpu_model, write_section  # noqa: E402

import splitlearn_comm as slc  # noqa: E402

BEGIN = "<!-- bench_async.py: begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_async.py: end -->"

BATCH, D_IN, WIDTH, CLASSES = 4096, 64, 256, 10  # 4 MiB activations
CLIENT_LAYERS, SERVER_LAYERS = 2, 1
LR = 0.01


def build(seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    bottom = torch.nn.Sequential(torch.nn.Linear(D_IN, WIDTH), torch.nn.ReLU(),
                                 *[m for _ in range(CLIENT_LAYERS - 1)
                                   for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU())])
    middle = torch.nn.Sequential(*[m for _ in range(SERVER_LAYERS)
                                   for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU())])
    head = torch.nn.Linear(WIDTH, CLASSES)
    return bottom, middle, head


class Echo(slc.ComputeFunction):
    def compute(self, x):
        return x


# -- servers (child processes) ----------------------------------------------------------


def serve(kind: str) -> int:
    if kind == "train":
        _, middle, _ = build()
        fn: slc.ComputeFunction = slc.TrainableComputeFunction(
            middle, lambda p: torch.optim.SGD(p, lr=LR))
        workers = 4
    else:
        fn, workers = Echo(), 16
    server = slc.GRPCComputeServer(fn, host="127.0.0.1", port=0, max_workers=workers)
    server.start()
    print(f"port {server.port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(grace=0)
    return 0


class Child:
    def __init__(self, kind: str) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", kind],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.proc.kill()
            raise RuntimeError(f"the benchmark server did not start: {line!r}")
        self.address = f"127.0.0.1:{int(line.split()[1])}"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- part 1: pipelining ---------------------------------------------------------------------


def cpu_seconds(pid: int = 0) -> float:
    """CPU time (user + system, all threads) of this process, or of process `pid`."""
    if not pid:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Trainer:
    def __init__(self, address: str, chunks: int, server_pid: int = 0) -> None:
        self.bottom, _, self.head = build()
        self.client = slc.GRPCComputeClient(address, retry_strategy=None)
        self.client.connect(30)
        self.pipe = self.client.pipeline(chunks=chunks) if chunks else None
        self.opt = torch.optim.SGD([*self.bottom.parameters(), *self.head.parameters()], lr=LR)
        g = torch.Generator().manual_seed(1)
        self.data = [(torch.randn(BATCH, D_IN, generator=g),
                      torch.randint(0, CLASSES, (BATCH,), generator=g)) for _ in range(4)]
        self.i = 0
        self.wall = 0.0
        self.steps = 0
        self.call_ms = self.server_ms = 0.0
        self.server_pid = server_pid
        self.client_cpu = self.server_cpu = 0.0

    def step(self) -> None:
        x, y = self.data[self.i % len(self.data)]
        self.i += 1
        self.opt.zero_grad()
        if self.pipe is None:
            loss = F.cross_entropy(self.head(self.client.remote(self.bottom(x))), y)
            loss.backward()
        else:
            self.pipe.step(x, y, self.bottom, F.cross_entropy, self.head)
        self.opt.step()

    def timed(self, n: int) -> None:
        s0 = self.client.get_statistics()
        c0, p0 = cpu_seconds(), cpu_seconds(self.server_pid) if self.server_pid else 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        self.wall += time.perf_counter() - t0
        self.client_cpu += cpu_seconds() - c0
        if self.server_pid:
            self.server_cpu += cpu_seconds(self.server_pid) - p0
        self.steps += n
        s1 = self.client.get_statistics()

        def tot(s: Dict, k: str) -> float:
            return s[k] * s["successful_requests"]

        self.call_ms += tot(s1, "avg_total_time_ms") - tot(s0, "avg_total_time_ms")
        self.server_ms += tot(s1, "avg_compute_time_ms") - tot(s0, "avg_compute_time_ms")


def run_pipeline(rounds: int, per_round: int) -> List[Dict[str, float]]:
    modes = [0, 2, 4, 8]
    child = Child("train")  # one server: the modes take turns (timing, not accuracy, counts)
    try:
        runners = {k: Trainer(child.address, k, child.proc.pid) for k in modes}
        for r in runners.values():
            for _ in range(2):
                r.step()
        rates: Dict[int, List[float]] = {k: [] for k in modes}
        for _ in range(rounds):
            for k, r in runners.items():
                wall = r.wall
                r.timed(per_round)
                rates[k].append(per_round / (r.wall - wall))
        rows = []
        for k, r in runners.items():
            # the median over rounds of the rate, and of the ratio to the sequential
            # rate of the same round: a loaded machine's drift hits both alike
            sps = statistics.median(rates[k])
            row = {"chunks": k, "steps": r.steps, "sps": sps, "ms": 1e3 / sps,
                   "speedup": statistics.median(a / b for a, b in zip(rates[k], rates[0])),
                   "client_cpu": r.client_cpu * 1e3 / r.steps,
                   "server_cpu": r.server_cpu * 1e3 / r.steps}
            if k == 0:
                ms = r.wall * 1e3 / r.steps
                server = r.server_ms / r.steps
                transport = (r.call_ms - r.server_ms) / r.steps
                row.update(server=server, transport=transport, client=ms - server - transport,
                           mean_ms=ms)
            rows.append(row)
            r.client.close()
        return rows
    finally:
        child.close()


# -- part 2: futures from one thread vs threads ---------------------------------------------


def futures_rate(client: slc.GRPCComputeClient, x: torch.Tensor, window: int,
                 seconds: float) -> float:
    """Calls/s with `window` calls kept in flight by one thread."""
    lock = threading.Lock()
    done = [0]
    slots = threading.Semaphore(window)
    end = time.perf_counter() + seconds

    def finished(_f: object) -> None:
        with lock:
            done[0] += 1
        slots.release()

    t0 = time.perf_counter()
    inflight: "collections.deque" = collections.deque()
    while time.perf_counter() < end:
        slots.acquire()
        f = client.compute_async(x)
        f.add_done_callback(finished)
        inflight.append(f)
        while inflight and inflight[0].done():
            inflight.popleft().result()
    for f in inflight:
        f.result(60)
    return done[0] / (time.perf_counter() - t0)


def threads_rate(client: slc.GRPCComputeClient, x: torch.Tensor, n: int, seconds: float) -> float:
    counts = [0] * n
    end = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < end:
            client.compute(x)
            counts[i] += 1

    t0 = time.perf_counter()
    ts = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def run_concurrency(seconds: float, rounds: int) -> List[Dict[str, object]]:
    child = Child("echo")
    rows: List[Dict[str, object]] = []
    try:
        client = slc.GRPCComputeClient(child.address, retry_strategy=None)
        client.connect(30)
        for size, label in ((3 * 1024, "3 KiB"), (1 << 20, "1 MiB")):
            x = torch.zeros(size // 4)
            for _ in range(20):
                client.compute(x)
            modes = [("futures, 1 thread", w, "f") for w in (1, 4, 16, 64)] + \
                    [("compute(), N threads", n, "t") for n in (1, 4, 16)]
            rates: Dict[Tuple[str, int], List[float]] = collections.defaultdict(list)
            for _ in range(rounds):
                for name, n, how in modes:
                    rate = futures_rate(client, x, n, seconds) if how == "f" else \
                        threads_rate(client, x, n, seconds)
                    rates[(name, n)].append(rate)
            for name, n, _ in modes:
                rows.append({"size": label, "mode": name, "n": n,
                             "rate": statistics.median(rates[(name, n)])})
        client.close()
    finally:
        child.close()
    return rows


# -- report -------------------------------------------------------------------------------


def report(pipe: List[Dict[str, float]], conc: List[Dict[str, object]], quick: bool,
           load: Tuple[float, float, float]) -> str:
    seq = pipe[0]
    lines = [BEGIN, "", "## Asynchronous calls", "",
             f"`benchmarks/bench_async.py`{' --quick' if quick else ''}, "
             f"{datetime.date.today().isoformat()}, {cpu_model()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}, torch {torch.__version__}; one torch thread "
             "per process; server in a child process on 127.0.0.1. A shared, noisy machine: "
             "compare only rows of one run.", "",
             f"### Pipelined split training (batch {BATCH}, {D_IN} -> {WIDTH} activations, "
             f"4 MiB each way)", "",
             f"Sequential step split (means): client {seq['client']:.1f} ms, server "
             f"{seq['server']:.1f} ms, transport {seq['transport']:.1f} ms ({seq['mean_ms']:.1f} "
             "ms in all). Steps/s: the median over rounds; vs sequential: the median of the "
             "ratio to the sequential rate of the same round.", "",
             "| mode | steps/s | ms/step | vs sequential | client CPU ms/step | server CPU ms/step |",
             "|---|---|---|---|---|---|"]
    for r in pipe:
        name = "sequential `remote()`" if r["chunks"] == 0 else f"`pipeline(chunks={r['chunks']})`"
        lines.append(f"| {name} | {r['sps']:.2f} | {r['ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['client_cpu']:.1f} | {r['server_cpu']:.1f} |")
    cpu = seq["client_cpu"] + seq["server_cpu"]
    bound = seq["ms"] / max(cpu / 2, seq["client_cpu"], seq["server_cpu"])
    lines += ["", f"CPU bound: a sequential step costs {cpu:.1f} ms of CPU time (client and "
              f"server processes, every thread, transfer included). With two idle CPUs a "
              f"perfect pipeline would take max({cpu:.1f} / 2, client, server) ms, "
              f"{bound:.2f}x the sequential rate measured here. Load average during the run "
              f"(other processes on the machine): {load[0]:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end."]
    lines += ["", "### Calls in flight: futures from one thread vs threads calling compute()", "",
              "| size | how | in flight | calls/s |", "|---|---|---|---|"]
    for r in conc:
        lines.append(f"| {r['size']} | {r['mode']} | {r['n']} | {r['rate']:.0f} |")
    lines += ["", END, ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: prints, writes no file")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.serve:
        return serve(args.serve)
    rounds, per_round, seconds = (2, 2, 0.3) if args.quick else (10, 3, 1.0)
    load = os.getloadavg()
    pipe = run_pipeline(rounds, per_round)
    conc = run_concurrency(seconds, 1 if args.quick else 2)
    text = report(pipe, conc, args.quick, load)
    print(text)
    if not args.quick:
        write_section(os.path.join(HERE, "results.md"), text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
