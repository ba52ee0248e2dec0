"""Split-learning training over the wire: an MLP on scikit-learn's digits.

The model ``64 -> 128 -> 64 -> 10`` is split across two processes. With the default
U-shaped split the client keeps the bottom layer, the head and the labels; the server
(``TrainableComputeFunction``) trains the middle layer. With ``--split vanilla`` the
server holds everything after the bottom layer and returns logits. The client's code
reads like local training: ``client.remote(h)`` is one step of its autograd graph,
and ``loss.backward()`` sends the gradient to the server and continues into the
client's layers with the input gradient that comes back.

For comparison the client also trains the same model locally, in lockstep (same seed,
same data order), and prints both per epoch; with the raw codec the two runs are the
same computation, so they reach the same accuracy.

Usage::

    python examples/split_training.py                  # server in a child process
    python examples/split_training.py --codec bf16     # bf16 activations and gradients
    python examples/split_training.py --chunks 4       # pipelined: 4 micro-batches in flight
    python examples/split_training.py --serve --port 6000            # server only
    python examples/split_training.py --connect 127.0.0.1:6000       # client only

Needs scikit-learn (the digits data set ships inside it).
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

import splitlearn_comm as slc

CODECS = {"raw": slc.TensorCodec, "bf16": slc.BFloat16Codec, "int8": slc.Int8Codec}


def build(seed: int) -> Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """bottom, middle, head, with weights fixed by ``seed`` (both processes build them)."""
    torch.manual_seed(seed)
    bottom = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU())
    middle = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU())
    head = torch.nn.Linear(64, 10)
    return bottom, middle, head


def server_part(args: argparse.Namespace) -> torch.nn.Module:
    bottom, middle, head = build(args.seed)
    return middle if args.split == "u" else torch.nn.Sequential(middle, head)


def make_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9)


def load_digits(seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        sys.exit("this example needs scikit-learn (pip install scikit-learn): "
                 "the digits data set ships inside it")
    digits = sk_load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


# -- the server ------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    fn = slc.TrainableComputeFunction(server_part(args), lambda p: make_optimizer(p, args),
                                      max_entries=256, max_bytes=64 << 20, ttl=60.0,
                                      model_name=f"digits-{args.split}")
    server = slc.GRPCComputeServer(fn, host=args.host, port=args.port, max_workers=4,
                                   handle_signals=True, grace=1.0)
    server.start()
    print(f"listening on {args.host}:{server.port}", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(1.0)
    print(f"server stopped after {fn.stats()['steps']} optimizer steps", flush=True)
    return 0


def start_server_process(args: argparse.Namespace) -> Tuple[subprocess.Popen, str]:
    cmd = [sys.executable, __file__, "--serve", "--host", "127.0.0.1", "--port", "0",
           "--split", args.split, "--seed", str(args.seed), "--lr", str(args.lr),
           "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the child prints this once it serves (or exits)
    if not line.startswith("listening on "):
        proc.kill()
        sys.exit(f"the server process did not start: {line!r}")
    return proc, line.split()[-1]


# -- the client ------------------------------------------------------------------------


class Split(torch.nn.Module):
    """The client's view of the model: its own layers around the remote call."""

    def __init__(self, client: slc.GRPCComputeClient, args: argparse.Namespace) -> None:
        super().__init__()
        bottom, _, head = build(args.seed)
        self.bottom = bottom
        self.head = head if args.split == "u" else torch.nn.Identity()
        self.remote = slc.RemoteModule(client)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.remote(self.bottom(x)))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():  # inference calls: the server keeps nothing
        correct = (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(y)


def train(args: argparse.Namespace, address: str) -> Tuple[float, float]:
    xtr, ytr, xte, yte = load_digits(args.seed)
    codec = CODECS[args.codec]()
    client = slc.GRPCComputeClient(address, codec=codec, timeout=30.0)
    if not client.connect(timeout=30.0):
        sys.exit(f"no server at {address}")
    split = Split(client, args)
    bottom, middle, head = build(args.seed)
    local = torch.nn.Sequential(bottom, middle, head)
    opt = make_optimizer(split.parameters(), args)
    lopt = make_optimizer(local.parameters(), args)
    pipe = client.pipeline(chunks=args.chunks) if args.chunks > 1 else None
    print(f"digits: {len(ytr)} training and {len(yte)} test samples; split {args.split}, "
          f"codec {args.codec}, server {address}"
          + (f", pipelined in {args.chunks} micro-batches" if pipe else ""), flush=True)
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(args.seed + epoch))
        sums = {"split": [0.0, 0], "local": [0.0, 0]}
        t0 = time.perf_counter()
        for i in range(0, len(ytr), args.batch_size):
            idx = order[i:i + args.batch_size]
            x, y = xtr[idx], ytr[idx]
            if pipe is not None:  # GPipe-style: micro-batches in flight, same updates
                opt.zero_grad()
                loss_value, logits = pipe.step(x, y, split.bottom, F.cross_entropy, split.head,
                                               return_outputs=True)
                opt.step()
                sums["split"][0] += loss_value * len(y)
                sums["split"][1] += (logits.argmax(1) == y).sum().item()
            for name, model, o in (("split", split, opt), ("local", local, lopt)):
                if name == "split" and pipe is not None:
                    continue
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                o.zero_grad()
                loss.backward()  # for "split": ComputeBackward, then the client's layers
                o.step()
                sums[name][0] += loss.item() * len(y)
                sums[name][1] += (logits.argmax(1) == y).sum().item()
        seconds = time.perf_counter() - t0
        acc, lacc = accuracy(split, xte, yte), accuracy(local, xte, yte)
        n = len(ytr)
        print(f"epoch {epoch}/{args.epochs}: split loss {sums['split'][0] / n:.4f} "
              f"train acc {sums['split'][1] / n:.4f} test acc {acc:.4f} | local loss "
              f"{sums['local'][0] / n:.4f} train acc {sums['local'][1] / n:.4f} "
              f"test acc {lacc:.4f} ({seconds:.1f} s)", flush=True)
    stats = client.get_statistics()
    info = client.get_service_info()["custom_info"]
    print(f"calls: {stats['successful_requests']} ok, {stats['failed_requests']} failed, "
          f"{stats['retries']} retries; server: {info['store.steps']} optimizer steps, "
          f"{info['store.waiting']} forwards waiting", flush=True)
    client.close()
    print(f"final test accuracy: split {acc:.4f}, local {lacc:.4f}", flush=True)
    return acc, lacc


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", action="store_true", help="run only the server")
    p.add_argument("--connect", metavar="HOST:PORT",
                   help="run only the client, against this server")
    p.add_argument("--host", default="127.0.0.1",
                   help="server: address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=50052,
                   help="server: port, 0 for any (default: %(default)s)")
    p.add_argument("--split", choices=["u", "vanilla"], default="u",
                   help="u: the client keeps the head and the labels; vanilla: the server "
                        "returns logits (default: %(default)s)")
    p.add_argument("--codec", choices=sorted(CODECS), default="raw",
                   help="codec of activations and gradients (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=1,
                   help="train the split model pipelined, in this many micro-batches per "
                        "batch (client.pipeline); 1: the plain step (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process "
                   "(default: %(default)s)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # Small matrices: one thread each. With torch's default (a thread per core) the
    # client and the server process would spin against each other for the same CPUs.
    torch.set_num_threads(args.threads)
    if args.serve:
        return serve(args)
    if args.connect:
        train(args, args.connect)
        return 0
    proc, address = start_server_process(args)
    try:
        train(args, address)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        assert proc.stdout is not None
        rest = proc.stdout.read()
        proc.stdout.close()
    if rest:
        print(rest.strip(), flush=True)
    print(f"server process exited with code {code}", flush=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
