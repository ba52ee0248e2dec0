"""Prometheus metrics of a splitlearn-comm server: the built-in ones and your own.

The server measures itself in C (calls by method and status, in-flight calls,
latency histograms by stage, bytes), with no code and no GIL on the call path;
``GRPCComputeServer(..., metrics_port=PORT)`` serves those metrics as
``splitlearn_*`` on ``http://0.0.0.0:PORT/metrics``. Next to them, the compute
function keeps counters of its own with ``prometheus_client``: the
``MonitoredComputeFunction`` of docs/extending.md (its
metrics live in a registry of its own, so that two instances do not collide).

The script starts the server on 127.0.0.1 (a free port) with the metrics endpoint on
another free port, makes a few calls (one of them fails on purpose: a wrong input
shape), scrapes /metrics once over HTTP, prints the ``splitlearn_*`` samples, then
the compute function's own counters, and exits.

Usage::

    python examples/prometheus_monitoring.py [--calls 5] [--buckets]

Needs ``prometheus_client`` (``pip install prometheus_client``). In production, point
Prometheus at ``http://HOST:PORT/metrics``; see docs/monitoring.md.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
import urllib.request

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram

from splitlearn_comm import ComputeFunction, GRPCComputeClient, GRPCComputeServer


class MonitoredComputeFunction(ComputeFunction):
    """A compute function with Prometheus metrics of its own (as in docs/extending.md:
    a registry per instance; no HTTP server of its own here, since the
    script reads the counters from the registry)."""

    def __init__(self, model, registry=None):
        self.model = model
        self.registry = registry if registry is not None else CollectorRegistry()
        self.request_counter = Counter("compute_requests_total", "Total compute requests",
                                       registry=self.registry)
        self.compute_duration = Histogram("compute_duration_seconds",
                                          "Compute duration in seconds", registry=self.registry)
        self.error_counter = Counter("compute_errors_total", "Total compute errors",
                                     registry=self.registry)

    def setup(self):
        self.model.eval()

    def compute(self, input_tensor):
        self.request_counter.inc()
        with self.compute_duration.time():
            try:
                with torch.no_grad():
                    return self.model(input_tensor)
            except Exception:
                self.error_counter.inc()
                raise


def _rounded(sample: str) -> str:
    """A sample line with a fractional value shown to 6 significant digits
    (sums of seconds print as 0.013285591000000001 otherwise)."""
    name, _, value = sample.rpartition(" ")
    try:
        number = float(value)
    except ValueError:
        return sample
    return sample if number.is_integer() else f"{name} {number:.6g}"


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5, help="successful calls to make")
    parser.add_argument("--buckets", action="store_true",
                        help="print the histograms' _bucket samples too")
    args = parser.parse_args()

    torch.manual_seed(0)
    fn = MonitoredComputeFunction(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()))
    metrics_port = free_port()
    server = GRPCComputeServer(fn, host="127.0.0.1", port=0, metrics_port=metrics_port)
    server.start()
    try:
        print(f"serving on 127.0.0.1:{server.port}, metrics on "
              f"http://127.0.0.1:{metrics_port}/metrics")
        with GRPCComputeClient(f"127.0.0.1:{server.port}", timeout=10,
                               retry_strategy=None) as client:
            for _ in range(args.calls):
                client.compute(torch.randn(4, 16))
            try:
                client.compute(torch.randn(4, 15))       # wrong width: compute() raises
            except grpc.RpcError as e:
                print(f"bad call: {e.code().name}")

        # A call is counted just after its status went out: wait (bounded) for the last.
        expected = args.calls + 1
        deadline = time.monotonic() + 10
        while sum(n for (method, _), n in server.metrics()["requests"].items()
                  if method == "Compute") < expected:
            if time.monotonic() > deadline:
                print("the server's counters did not reach the calls made", file=sys.stderr)
                return 1
            time.sleep(0.01)

        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples = [line for line in text.splitlines() if line.startswith("splitlearn_")]
        buckets = [line for line in samples if "_bucket{" in line]
        print(f"scraped {url}: {len(samples)} splitlearn_* samples")
        for line in samples:
            if args.buckets or line not in buckets:
                print(_rounded(line))
        if buckets and not args.buckets:
            print(f"({len(buckets)} histogram _bucket samples not shown; --buckets shows them)")

        print("the compute function's own counters:")
        for name in ("compute_requests_total", "compute_errors_total",
                     "compute_duration_seconds_count"):
            print(f"{name} {fn.registry.get_sample_value(name)}")
    finally:
        server.stop(grace=1.0)
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
