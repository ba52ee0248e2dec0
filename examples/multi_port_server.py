"""Several compute functions in one process, each on its own port.

The ``MultiPortServer`` of docs/extending.md (with a ``host`` argument) hosts a three-stage pipeline: preprocessing (normalize, clamp,
scale), a model, and postprocessing (softmax). One client program chains the stages:
the output of each is the input of the next.

Servers in one process are independent: each has its own port, worker threads and
lifecycle. The script stops the model's server and shows that the other two keep
serving, while calls to the stopped one fail with UNAVAILABLE; then it stops the
rest and exits.

Usage::

    python examples/multi_port_server.py [--batch 4]

The servers listen on 127.0.0.1, on ports the OS picks (port 0); a deployment
would give each stage a fixed port (``--port`` of ``splitlearn-comm serve``, see
docs/cli.md).
"""
from __future__ import annotations

import argparse
import sys

import grpc
import torch

from splitlearn_comm import (ComputeFunction, GRPCComputeClient, GRPCComputeServer,
                             ModelComputeFunction)


class MultiPortServer:
    """Serves several compute functions, each on its own port."""

    def __init__(self, functions_and_ports, host="0.0.0.0"):
        """
        Args:
            functions_and_ports: list of (compute_fn, port) tuples
            host: the address every server binds
        """
        self.servers = [
            GRPCComputeServer(fn, host=host, port=port)
            for fn, port in functions_and_ports
        ]

    def start(self):
        for server in self.servers:
            server.start()

    def wait_for_termination(self):
        for server in self.servers:
            server.wait_for_termination()

    def stop(self):
        for server in self.servers:
            server.stop()


class PreprocessingPipeline(ComputeFunction):
    """A multi-stage preprocessing pipeline (as in docs/extending.md)."""

    def __init__(self, stages):
        self.stages = stages

    def compute(self, input_tensor):
        x = input_tensor
        for _name, transform_fn in self.stages:
            x = transform_fn(x)
        return x

    def get_info(self):
        return {"name": "PreprocessingPipeline",
                "stages": ", ".join(name for name, _ in self.stages)}


class Softmax(ComputeFunction):
    def compute(self, input_tensor):
        return torch.softmax(input_tensor, dim=-1)


def shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    names = ["preprocessing", "model", "postprocessing"]
    preprocessing_fn = PreprocessingPipeline([
        ("normalize", lambda x: (x - x.mean()) / (x.std() + 1e-6)),
        ("clamp", lambda x: torch.clamp(x, -3, 3)),
        ("scale", lambda x: x * 0.5),
    ])
    model_fn = ModelComputeFunction(torch.nn.Linear(16, 3), model_name="linear-16-3")
    postprocessing_fn = Softmax()

    server = MultiPortServer([(preprocessing_fn, 0), (model_fn, 0), (postprocessing_fn, 0)],
                             host="127.0.0.1")
    server.start()
    clients = []
    try:
        for name, s in zip(names, server.servers):
            print(f"{name} listening on 127.0.0.1:{s.port}")
        clients = [GRPCComputeClient(f"127.0.0.1:{s.port}", timeout=10, retry_strategy=None)
                   for s in server.servers]
        stages = dict(zip(names, clients))

        x = torch.randn(args.batch, 16)
        h = stages["preprocessing"].compute(x)
        logits = stages["model"].compute(h)
        probs = stages["postprocessing"].compute(logits)
        print(f"pipeline: input {shape(x)} -> preprocessing {shape(h)} -> model {shape(logits)}"
              f" -> postprocessing {shape(probs)}")
        print(f"rows sum to 1: {bool(torch.allclose(probs.sum(dim=-1), torch.ones(args.batch)))}")
        with torch.no_grad():
            local = torch.softmax(model_fn.model(preprocessing_fn.compute(x)), dim=-1)
        print(f"matches the stages run locally: {bool(torch.allclose(probs, local, atol=1e-6))}")

        # stop one server; the others keep serving
        server.servers[1].stop(grace=1.0)
        print("stopped the model server")
        try:
            stages["model"].compute(h)
            print("model: still answering (unexpected)")
            return 1
        except grpc.RpcError as e:
            print(f"model: {e.code().name}")
        for name in ("preprocessing", "postprocessing"):
            ok = stages[name].health_check() and stages[name].compute(x).shape == x.shape
            print(f"{name} still serving: {ok}")
            if not ok:
                return 1
    finally:
        for c in clients:
            c.close()
        server.stop()                  # stopping a stopped server does nothing
        server.wait_for_termination()  # returns at once: every server has stopped
    print("all servers stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
