#!/usr/bin/env python3
"""Training benchmark: split-learning training steps per second over the wire vs local.

A U-shaped split MLP: the client keeps the bottom layer, the head and the loss; the
server (a ``TrainableComputeFunction`` with SGD, in a child process on 127.0.0.1)
trains the middle. One training step is what a user's loop does:
``loss = loss_fn(head(client.remote(bottom(x))), y); opt.zero_grad(); loss.backward();
opt.step()`` -- a Compute call (forward) and a ComputeBackward call (the server
backpropagates and steps its optimizer). "local" is the same model and loop in one
process.

Per step it reports the wall time and splits it into:

- transport: the client's time inside its two calls minus the compute time the
  server reports for them (encode, copies, gRPC, loopback TCP, the server's decode and
  hand-off to Python, waiting for the server's worker thread);
- server compute: the time the server reports for running its slice forward, and
  backward plus the optimizer step (``compute_time_ms`` / ``backward_time_ms``);
- client compute: the rest (the client's own layers, loss, optimizer, autograd).

Both processes use one torch thread each (``--threads``), so that they do not spin
against each other for the CPUs; "local" uses the same. Modes run in interleaved
rounds so that slow drifts of a noisy machine hit them alike.

    python3 benchmarks/bench_training.py            # full run (about a minute); writes the
                                                    # "Training" section of benchmarks/results.md
    python3 benchmarks/bench_training.py --quick    # smoke run: prints only

The rest of results.md is kept as it is.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from _report import cpu_model, write_data, write_section  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import splitlearn_comm as slc  # noqa: E402

BEGIN = "<!-- bench_training.py: begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_training.py: end -->"

#: name -> (input features, bottom width, middle width, classes, batch, timed steps)
CONFIGS: Dict[str, Tuple[int, int, int, int, int, int]] = {
    "small": (64, 128, 64, 10, 32, 600),     # the digits example's model
    "wide": (784, 1024, 1024, 10, 128, 150),  # 512 KiB activations each way
}
MODES = ("local", "raw", "bf16", "int8")
CODECS = {"raw": slc.TensorCodec, "bf16": slc.BFloat16Codec, "int8": slc.Int8Codec}
LR = 0.01


def build(name: str, seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    d_in, d_bottom, d_mid, classes, _, _ = CONFIGS[name]
    torch.manual_seed(seed)
    bottom = torch.nn.Sequential(torch.nn.Linear(d_in, d_bottom), torch.nn.ReLU())
    middle = torch.nn.Sequential(torch.nn.Linear(d_bottom, d_mid), torch.nn.ReLU())
    head = torch.nn.Linear(d_mid, classes)
    return bottom, middle, head


# -- server (child process) -------------------------------------------------------------


def serve(name: str) -> int:
    _, middle, _ = build(name)
    fn = slc.TrainableComputeFunction(middle, lambda p: torch.optim.SGD(p, lr=LR))
    server = slc.GRPCComputeServer(fn, host="127.0.0.1", port=0, max_workers=2)
    server.start()
    print(f"port {server.port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(grace=0)
    return 0


class Child:
    def __init__(self, name: str, threads: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", name, "--threads", str(threads)],
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


# -- the client ---------------------------------------------------------------------------


class Runner:
    """One mode of one config: a model, its optimizer, and a step function."""

    def __init__(self, name: str, mode: str, address: str) -> None:
        bottom, middle, head = build(name)
        self.client: Optional[slc.GRPCComputeClient] = None
        if mode == "local":
            self.mid = middle
            params = [*bottom.parameters(), *middle.parameters(), *head.parameters()]
        else:
            # TCP: the codecs are about bytes on a network (on 127.0.0.1 the default
            # would be shared memory, where fewer bytes save little)
            self.client = slc.GRPCComputeClient(address, codec=CODECS[mode](), retry_strategy=None,
                                                shared_memory=False)
            self.client.connect(30)
            self.mid = self.client.remote
            params = [*bottom.parameters(), *head.parameters()]
        self.bottom, self.head = bottom, head
        self.opt = torch.optim.SGD(params, lr=LR)
        d_in, _, _, classes, batch, _ = CONFIGS[name]
        g = torch.Generator().manual_seed(1)
        self.data = [(torch.randn(batch, d_in, generator=g),
                      torch.randint(0, classes, (batch,), generator=g)) for _ in range(8)]
        self.i = 0
        self.wall = 0.0
        self.steps = 0
        self.call_ms = 0.0
        self.server_ms = 0.0
        self.bytes = 0
        self.losses: List[float] = []

    def step(self) -> float:
        x, y = self.data[self.i % len(self.data)]
        self.i += 1
        loss = F.cross_entropy(self.head(self.mid(self.bottom(x))), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def timed(self, n: int) -> None:
        before = self._stats()
        t0 = time.perf_counter()
        for _ in range(n):
            self.losses.append(self.step())
        self.wall += time.perf_counter() - t0
        self.steps += n
        after = self._stats()
        self.call_ms += after[0] - before[0]
        self.server_ms += after[1] - before[1]
        self.bytes += after[2] - before[2]

    def _stats(self) -> Tuple[float, float, int]:
        if self.client is None:
            return 0.0, 0.0, 0
        s = self.client.get_statistics()
        n = s["successful_requests"]
        return (s["avg_total_time_ms"] * n, s["avg_compute_time_ms"] * n,
                s["bytes_sent"] + s["bytes_received"])

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def run_config(name: str, rounds: int, scale: float, threads: int) -> List[Dict[str, float]]:
    steps = max(rounds, int(CONFIGS[name][5] * scale))
    per_round = max(1, steps // rounds)
    # one server per mode: each remote mode trains its own copy of the middle layer
    children = {mode: Child(name, threads) for mode in MODES if mode != "local"}
    try:
        runners = {mode: Runner(name, mode, children[mode].address if mode in children else "")
                   for mode in MODES}
        for r in runners.values():  # warm-up
            for _ in range(max(5, per_round // 5)):
                r.step()
        for _ in range(rounds):
            for r in runners.values():
                r.timed(per_round)
        local = runners["local"]
        local_sps = local.steps / local.wall
        rows = []
        for mode, r in runners.items():
            ms = r.wall * 1e3 / r.steps
            transport = (r.call_ms - r.server_ms) / r.steps
            server = r.server_ms / r.steps
            rows.append({"config": name, "mode": mode, "steps": r.steps, "sps": r.steps / r.wall,
                         "ms": ms, "vs_local": (r.steps / r.wall) / local_sps,
                         "transport": transport, "server": server,
                         "client": ms - transport - server, "share": transport / ms,
                         "bytes": r.bytes / r.steps,
                         "loss": statistics.mean(r.losses[-per_round:])})
            r.close()
        return rows
    finally:
        for child in children.values():
            child.close()


# -- report -----------------------------------------------------------------------------------


def machine_info() -> Dict[str, str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    cpu = cpu_model()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{usable} usable (nproc), {os.cpu_count()} online",
        "cpu": cpu,
        "load average at the start (1, 5, 15 min)": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "splitlearn-comm": getattr(slc, "__version__", "?"),
    }


def report(rows: List[Dict[str, float]], info: Dict[str, str], threads: int, seconds: float,
           command: str) -> str:
    out = [BEGIN, "", "# Training", "",
           "Generated by `benchmarks/bench_training.py` (how to run it: its docstring). "
           "Split-learning training steps of a U-shaped split MLP: "
           "the client keeps the bottom layer, the head and the cross-entropy loss; the server, "
           "a `TrainableComputeFunction(middle, SGD)` in a child process on 127.0.0.1, trains "
           "the middle layer (one server per mode). One step: "
           "`loss = F.cross_entropy(head(client.remote(bottom(x))), y); opt.zero_grad(); "
           "loss.backward(); opt.step()`, i.e. one Compute call (forward) and "
           "one ComputeBackward call (backward and the server's optimizer step). `local` is "
           "the same model and loop in one process. Modes ran in interleaved rounds after a "
           f"warm-up; every process used {threads} torch thread(s).", "",
           "Configurations:", "",
           "| config | layers | batch | activation each way |",
           "|---|---|--:|--:|"]
    for name, (d_in, d_b, d_m, c, batch, _) in CONFIGS.items():
        act = batch * d_b * 4
        out.append(f"| {name} | {d_in} -> {d_b} (client) -> {d_m} (server) -> {c} (client) "
                   f"| {batch} | {act / 1024:.0f} KiB (float32) |")
    out += ["", "Machine and software:", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [f"- command: `{command}` ({seconds:.0f} s)", "",
            "**A small, shared, noisy 2-vCPU virtual machine**: the client and the server "
            "compete for the same two CPUs; runs differ by 10-30%. Compare rows of one run.", "",
            "## Steps per second", "",
            "`ms/step`: wall time per training step. `vs local`: steps/s relative to local "
            "training. `transport`: the client's time inside its two calls minus the compute "
            "time the server reported for them (encoding, copies, gRPC, loopback TCP, the "
            "server's decode and hand-off to Python). `server`: the server's forward, and its "
            "backward plus optimizer step. `client`: the rest (the client's layers, loss, "
            "autograd, optimizer). `share`: transport / ms per step. `bytes/step`: message "
            "bytes on the wire, both calls, both ways.", "",
            "| config | mode | steps | steps/s | ms/step | vs local | transport ms | server ms "
            "| client ms | transport share | bytes/step | mean loss, last round |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        local = r["mode"] == "local"
        dash = "-"
        out.append(
            f"| {r['config']} | {r['mode']} | {r['steps']} | {r['sps']:,.0f} | {r['ms']:.3f} "
            f"| {r['vs_local']:.2f}x | {dash if local else format(r['transport'], '.3f')} "
            f"| {dash if local else format(r['server'], '.3f')} "
            f"| {dash if local else format(r['client'], '.3f')} "
            f"| {dash if local else format(r['share'], '.0%')} "
            f"| {dash if local else format(r['bytes'], ',.0f')} | {r['loss']:.4f} |")
    out += ["", "## Reading", "",
            "- Over the wire a step costs two round trips on top of the computation. For the "
            "small MLP, whose layers take microseconds, that makes a step several times slower "
            "than local: transport is about a third of it, and most of the rest is per-call "
            "Python work on both sides (the client's autograd function, the server's dispatch, "
            "locking and activation-store bookkeeping), not the layers. For the wide MLP the "
            "matrix products dominate and transport is a small share.",
            "- Every mode starts from the same weights and sees the same batches: the raw "
            "runs' losses equal local training's (the tests check the parameters to 1e-6), "
            "bf16's and int8's stay close. bf16 halves and int8 quarters the bytes on the "
            "wire; on loopback bytes are cheap, so what a codec saves in bytes it can lose in "
            "the CPU time of encoding and decoding (compare their transport columns); over a "
            "real network the bytes count for more.",
            "- With one torch thread per process. With torch's default (one thread per core) on "
            "this 2-CPU machine the client and server processes spin against each other "
            "(docs/training.md, Performance notes).",
            "", END, ""]
    return "\n".join(out)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tenth of the steps; prints only")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: small,wide")
    p.add_argument("--output", help="the markdown file whose Training section to write "
                                    "(default benchmarks/results.md; none for --quick)")
    p.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.serve:
        return serve(args.serve)
    start = time.perf_counter()
    info = machine_info()
    scale = 0.1 if args.quick else 1.0
    rows: List[Dict[str, float]] = []
    for name in args.configs.split(","):
        rows += run_config(name, args.rounds, scale, args.threads)
    command = "benchmarks/bench_training.py" + (" " + " ".join(argv) if argv else "")
    text = report(rows, info, args.threads, time.perf_counter() - start, command)
    output = args.output or (None if args.quick else os.path.join(HERE, "results.md"))
    print(text)
    if output:
        write_section(output, text, BEGIN, END)
        write_data(output, "training", {"script": "bench_training.py", "quick": args.quick,
                                        "info": info, "threads": args.threads, "rows": rows})
        print(f"wrote the Training section of {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
