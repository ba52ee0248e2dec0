"""A server with its live dashboard, under a load of training steps and inference calls.

``GRPCComputeServer(..., metrics_port=PORT)`` serves a live dashboard at
``http://HOST:PORT/`` (and Prometheus metrics at ``/metrics``). This script hosts a
trainable slice of a model with the dashboard on a free port, prints its address,
and runs clients against it for ``--seconds`` (training steps: Compute and
ComputeBackward calls that fill the activation store; inference calls of changing
sizes; now and then a malformed batch the server rejects). Open the address in a
browser (or on a phone, with ``--host 0.0.0.0``) to watch it. At the end it reads the
dashboard's JSON once and prints what the last sample says.

Usage::

    python examples/dashboard.py [--seconds 60] [--host 127.0.0.1] [--metrics-port 0]

``--seconds 0`` runs until Ctrl-C. See docs/monitoring.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request

import grpc
import torch

import splitlearn_comm as slc


class Middle(slc.TrainableComputeFunction):
    """The middle of a split MLP; refuses batches of the wrong width."""

    def forward_model(self, x):
        if x.shape[-1] != 64:
            slc.current_call().abort(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"expected 64 features, got {x.shape[-1]}")
        return super().forward_model(x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="how long to run the load (0: until Ctrl-C)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="the dashboard's port (0: a free one)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 64))
    fn = Middle(model, lambda p: torch.optim.SGD(p, lr=0.01), max_entries=512, ttl=10.0)
    server = slc.GRPCComputeServer(fn, host=args.host, port=0, max_workers=4,
                                   metrics_port=args.metrics_port).start()
    address = f"127.0.0.1:{server.port}"
    print(f"serving on {address}; dashboard on {server.dashboard_url}", flush=True)
    stop = threading.Event()

    def train() -> None:
        with slc.GRPCComputeClient(address, timeout=30) as client:
            while not stop.is_set():
                x = torch.randn(32, 64, requires_grad=True)
                client.remote(x).pow(2).mean().backward()   # Compute, then ComputeBackward
                time.sleep(0.01)

    def infer() -> None:
        with slc.GRPCComputeClient(address, timeout=30, retry_strategy=None) as client:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    client.compute(torch.randn(1 + n % 64, 63 if n % 50 == 0 else 64))
                except slc.RpcError:
                    pass                                     # the malformed batch
                time.sleep(0.005)

    threads = [threading.Thread(target=f, daemon=True) for f in (train, infer)]
    for t in threads:
        t.start()
    try:
        if args.seconds > 0:
            time.sleep(args.seconds)
        else:
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    time.sleep(1.5)  # one more sample after the load stopped
    with urllib.request.urlopen(server.dashboard_url + "api/dashboard", timeout=10) as r:
        data = json.load(r)
    last = data["servers"][0]["samples"][-1]
    store = last["store"] or {}
    print(f"dashboard samples: {len(data['servers'][0]['samples'])}; calls "
          f"{last['totals']['calls']}, errors {last['totals']['errors']}; activation store "
          f"{store.get('waiting', 0)} waiting, {store.get('answered', 0)} answered", flush=True)
    server.stop(grace=1.0)
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
