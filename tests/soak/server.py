"""A server process for fault tests (tests/test_robustness.py) and the soak
(tests/soak/soak.py), driven over stdin so that its restart gap is exact:

    python tests/soak/server.py PORT [MAX_WORKERS [MAX_DECODED_BYTES]]

It imports everything, prints ``ready``, and binds PORT only when it reads ``go``
(so that a replacement can wait, warmed up, for the one it replaces to be killed).
Then, one command a line: ``metrics`` prints the server's metrics as one JSON line
(``requests`` as "method code" keys, ``requests_by_transport``, ``in_flight``,
``rss_kb``); end of input stops it.
Every answer is one line on stdout.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any, Optional

import torch  # noqa: F401  (imported before "ready": a restart must not wait for it)

import splitlearn_comm as slc


class Echo(slc.ComputeFunction):
    """Returns its input unchanged."""

    def compute(self, input_tensor):
        return input_tensor


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


class ServerProcess:
    """This script in a child process (for the parent: tests and the soak)."""

    def __init__(self, port: int, workers: int = 16, env: Optional[dict] = None,
                 stderr: Any = None, max_decoded_bytes: int = 0) -> None:
        self.port = port
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port),
                                      str(workers), str(max_decoded_bytes)],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        self._expect("ready")

    def _expect(self, word: str) -> str:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith(word):
            raise RuntimeError(f"server process said {line!r}, expected {word!r}")
        return line

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def go(self) -> None:
        """Bind the port and serve; returns once it serves."""
        self._send("go")
        self._expect("serving")

    def metrics(self) -> dict:
        self._send("metrics")
        return json.loads(self._expect("{"))

    def kill(self) -> None:
        """kill -9."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    port = int(sys.argv[1])
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    max_decoded = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    server = slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=port, max_workers=workers,
                                   max_decoded_bytes=max_decoded or None)
    server.start()
    print(f"serving {server.port}", flush=True)
    for line in sys.stdin:
        if line.strip() == "metrics":
            m = server.metrics()
            print(json.dumps({"requests": {f"{k[0]} {k[1]}": v for k, v in m["requests"].items()},
                              "requests_by_transport": m["requests_by_transport"],
                              "in_flight": m["in_flight"], "rss_kb": rss_kb()}), flush=True)
    server.stop(grace=1)


if __name__ == "__main__":
    main()
