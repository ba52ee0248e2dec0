"""One server replica in its own process, for tests/test_scaling.py and the
replica benchmark.

    python tests/_replica.py PORT INDEX [DELAY_S]

Serves an echo that answers every tensor with a tensor of the same shape filled
with INDEX (so a caller sees which replica answered), after sleeping DELAY_S
(GIL released). Prints "PORT <bound port>" once serving. Reads commands on stdin:
"not_serving" / "serving" set the grpc.health.v1 status (answered "OK"), "quit"
stops the server. Exits when stdin closes.
"""
import sys
import time

import torch

from splitlearn_comm import ComputeFunction, GRPCComputeServer


class Tagged(ComputeFunction):
    def __init__(self, index: int, delay: float) -> None:
        self.index = index
        self.delay = delay

    def compute(self, x):
        if self.delay > 0:
            time.sleep(self.delay)
        return torch.full_like(x, float(self.index))


def main() -> None:
    port, index = int(sys.argv[1]), int(sys.argv[2])
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    server = GRPCComputeServer(Tagged(index, delay), host="127.0.0.1", port=port,
                               max_workers=8).start()
    print(f"PORT {server.port}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command in ("serving", "not_serving"):
            server.set_health(command == "serving")
            print("OK", flush=True)
        elif command == "quit":
            break
    server.stop(1.0)


if __name__ == "__main__":
    main()
