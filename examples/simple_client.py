"""Send batches to ``simple_server.py`` and finish the forward pass locally.

The server runs the bottom layers of the MLP; this client keeps the top layers
(``build_mlp()[SPLIT:]``, the same seed as the server's), sends a batch, applies
its own layers to the activations that come back, and prints shapes and timings.

Usage::

    python examples/simple_server.py --port 50051 &
    python examples/simple_client.py --port 50051 --batch-size 64 --calls 5
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import grpc
import torch

from simple_server import IN_FEATURES, SPLIT, build_mlp  # examples/ is on sys.path
from splitlearn_comm import ExponentialBackoff, GRPCComputeClient


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="server host (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50051,
                        help="server port (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="samples per call (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=5,
                        help="number of calls to make (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds allowed per call, retries included (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    address = f"{args.host}:{args.port}"
    top = build_mlp()[SPLIT:].eval()

    retry = ExponentialBackoff(max_retries=3, initial_delay=0.2, max_delay=2.0)
    with GRPCComputeClient(address, timeout=args.timeout, retry_strategy=retry) as client:
        if not client.connect(timeout=args.timeout):
            print(f"error: no server at {address} after {args.timeout:g} s", file=sys.stderr)
            return 1
        print(f"connected to {address}; healthy: {client.health_check()}")
        info = client.get_service_info()
        print(f"service {info['service_name']} version {info['version']} on {info['device']}, "
              f"up {info['uptime_seconds']:.1f} s, {info['total_requests']} requests served")
        for key, value in sorted(info["custom_info"].items()):
            print(f"  {key}: {value}")

        for i in range(args.calls):
            x = torch.randn(args.batch_size, IN_FEATURES)
            start = time.perf_counter()
            try:
                hidden = client.compute(x)
            except grpc.RpcError as e:
                print(f"call {i}: failed with {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
            ms = (time.perf_counter() - start) * 1e3
            with torch.no_grad():
                logits = top(hidden)
            print(f"call {i}: input {tuple(x.shape)} -> hidden {tuple(hidden.shape)} "
                  f"-> logits {tuple(logits.shape)} in {ms:.2f} ms")

        stats = client.get_statistics()
        print(f"{stats['successful_requests']}/{stats['total_requests']} calls succeeded; "
              f"mean {stats['avg_total_time_ms']:.2f} ms per call "
              f"({stats['avg_compute_time_ms']:.2f} ms compute on the server, "
              f"{stats['avg_network_time_ms']:.2f} ms network and serialization)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
