"""Three replicas of a server half behind gRPC's load balancing (docs/scaling.md).

One client spreads its calls over three replicas with round_robin, a replica set to
NOT_SERVING gets no new calls, a pinned session stays on one replica, and a replica
drained and stopped while 4 threads keep calling costs no failed call. The replicas
run in this process here to keep the example self-contained; in production each is its own
process or machine (deploy/ has the Kubernetes manifests).

    python examples/replicas.py
"""
from __future__ import annotations

import threading
import time
from collections import Counter

import torch

from splitlearn_comm import (ComputeFunction, ExponentialBackoff, GRPCComputeClient,
                             GRPCComputeServer)


class Replica(ComputeFunction):
    """A stand-in model that answers with its replica number."""

    def __init__(self, index: int) -> None:
        self.index = index

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, float(self.index))


def main() -> None:
    servers = [GRPCComputeServer(Replica(i), host="127.0.0.1", port=0).start() for i in range(3)]
    addresses = [f"127.0.0.1:{s.port}" for s in servers]
    for i, address in enumerate(addresses):
        print(f"replica {i} listening on {address}")
    # short retry delays: a call that meets a stopping replica moves on at once
    client = GRPCComputeClient(addresses, timeout=30,
                               retry_strategy=ExponentialBackoff(initial_delay=0.05, max_delay=1.0))

    def who() -> int:
        return int(client.compute(torch.zeros(4))[0])

    print(f"policy: {client.load_balancing}")
    spread = Counter(who() for _ in range(300))
    print("300 calls per replica:", [spread[i] for i in range(3)])

    def wait_until_avoided(index: int) -> None:
        """Call until 30 calls in a row went elsewhere: the client has heard."""
        deadline, streak = time.monotonic() + 30, 0
        while streak < 30 and time.monotonic() < deadline:
            streak = streak + 1 if who() != index else 0

    servers[1].set_health(False)      # clients hear NOT_SERVING over Health/Watch
    wait_until_avoided(1)
    spread = Counter(who() for _ in range(300))
    print("replica 1 NOT_SERVING, its share of 300 calls:", spread[1])
    servers[1].set_health(True)

    session = client.pinned("session-42")
    seen = {int(session.compute(torch.zeros(4))[0]) for _ in range(20)}
    print(f"pinned session used {len(seen)} replica")

    failures = []

    def caller() -> None:
        for _ in range(200):
            try:
                who()
            except Exception as e:  # noqa: BLE001 - counted and printed
                failures.append(e)

    # a replica leaves the way `splitlearn-comm serve --drain-delay` makes it leave:
    # NOT_SERVING first, then the graceful stop, while 4 threads keep calling
    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    servers[2].set_health(False)
    wait_until_avoided(2)
    servers[2].stop(grace=5.0)
    for t in threads:
        t.join()
    print(f"replica 2 drained and stopped under load: {len(failures)} failed calls of 800")

    client.close()
    for s in servers:
        s.stop()
    print("all replicas stopped")


if __name__ == "__main__":
    main()
