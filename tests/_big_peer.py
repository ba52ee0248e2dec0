"""A peer process for tests/test_stream_big.py: a server or a client of one very
large round trip, each reporting its own peak RSS above its baseline (so that each
side's memory is measured alone)."""
from __future__ import annotations

import sys
import time


def rss(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> None:
    import torch

    import splitlearn_comm as slc

    role = sys.argv[1]
    if role == "server":
        class Echo(slc.ComputeFunction):
            def compute(self, x):
                return x

        server = slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=0,
                                       max_decoded_bytes=int(sys.argv[2])).start()
        base = rss("VmRSS")
        print(server.port, flush=True)
        sys.stdin.readline()  # the client is done
        print(rss("VmHWM") - base, flush=True)
        server.stop(grace=0)
    else:
        port, nbytes = sys.argv[2], int(sys.argv[3])
        with slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None, timeout=600) as c:
            assert torch.equal(c.compute(torch.arange(10.0)), torch.arange(10.0))
            base = rss("VmRSS")
            x = torch.empty(nbytes // 4, dtype=torch.float32)
            x.fill_(1.0)                       # every page touched: the payload is resident
            x[:: 1 << 20] = torch.arange(x[:: 1 << 20].numel(), dtype=torch.float32)
            t = time.monotonic()
            y = c.compute(x)
            seconds = time.monotonic() - t
            ok = (y.shape == x.shape and torch.equal(y[:: 1 << 20], x[:: 1 << 20])
                  and torch.equal(y[-4096:], x[-4096:]))
            print(int(ok), rss("VmHWM") - base, round(seconds, 2), flush=True)


if __name__ == "__main__":
    main()
