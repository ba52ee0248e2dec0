"""Serve the first layers of a small MLP with splitlearn-comm.

The model is split in two: this server runs the bottom layers (``build_mlp()[:SPLIT]``)
and the client (``simple_client.py``) keeps the top ones. Both build the model with
the same seed, so their halves fit together without shipping weights around.

Usage::

    python examples/simple_server.py                      # 127.0.0.1:50051
    python examples/simple_server.py --host 0.0.0.0 --port 6000

Port 0 lets the operating system choose a free port; the chosen one is printed in
the "listening on HOST:PORT" line. The server runs until Ctrl-C (SIGINT) or SIGTERM,
then drains the calls in flight for up to ``--grace`` seconds and exits 0.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import List, Optional

import torch

from splitlearn_comm import GRPCComputeServer, ModelComputeFunction

#: Features of one input sample (a flattened 28x28 image).
IN_FEATURES = 784
#: The model is cut after this many modules: the server runs model[:SPLIT].
SPLIT = 4


def build_mlp(seed: int = 0) -> torch.nn.Sequential:
    """The full model, 784 -> 256 -> 128 -> 10, with weights fixed by ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s; 0.0.0.0 accepts "
                             "clients from other machines)")
    parser.add_argument("--port", type=int, default=50051,
                        help="port to bind, 0 for any free port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4,
                        help="calls served at once (default: %(default)s)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds given to calls in flight when stopping "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help='where the layers run: "cpu", "cuda", ... (default: %(default)s)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    bottom = build_mlp()[:SPLIT]
    compute_fn = ModelComputeFunction(bottom, device=args.device, model_name="mlp-bottom")
    server = GRPCComputeServer(compute_fn, host=args.host, port=args.port,
                               max_workers=args.workers, version="example-1")
    try:
        server.start()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"listening on {args.host}:{server.port}", flush=True)

    # SIGTERM (docker stop, kill, systemd) stops the server; wait_for_termination()
    # then returns. Ctrl-C (SIGINT) raises KeyboardInterrupt out of
    # wait_for_termination(); the handler is set explicitly because a shell starts
    # background jobs (`python simple_server.py &`) with SIGINT ignored.
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop(grace=args.grace))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        print("interrupted; stopping", flush=True)
    finally:
        server.stop(grace=args.grace)  # a no-op when SIGTERM already stopped it
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
