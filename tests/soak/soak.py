"""Soak and fault run (`make soak`; a short version in `make test`).

    python tests/soak/soak.py [--threads 64] [--procs 16] [--calls 60000] [--rounds 8]

A server process (tests/soak/server.py) hosting an echo, and clients with the default
retry strategy (ExponentialBackoff()): `--threads` threads sharing one client in this
process, and `--procs` client processes of one client each. Every round, each caller
makes its share of the calls and checks every answer; after the round the server's
RSS is read. Faults, mid-load:
- in the second round the server is killed with SIGKILL and a warmed-up replacement
  binds the same port 1 s later: no call may fail (the retry strategy carries them);
- in the round after it, two extra client processes sending 4 MiB tensors are killed
  with SIGKILL in the middle of their calls: the server must be left with nothing in
  flight.
Prints one line per round and a summary; exits 1 on any failed call, a server left
with calls in flight, or RSS that keeps growing round over round.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from server import ServerProcess, free_port  # noqa: E402

ROOT = HERE.parent.parent


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def caller(port: int, numel: int = 256) -> None:
    """Child mode: one client; reads "N S" lines, makes N checked calls and goes on
    calling until S seconds have passed, answers [ok, failed, first_error] as one JSON
    line. "loop" calls until killed."""
    import torch

    import splitlearn_comm as slc

    client = slc.GRPCComputeClient(f"127.0.0.1:{port}", timeout=60)
    x = torch.arange(float(numel))
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "loop":
            big = torch.ones(1 << 20)  # 4 MiB: a kill lands inside a call
            while True:
                client.compute(big)
        ok = failed = 0
        first = ""
        n, seconds = cmd.split()
        until = time.monotonic() + float(seconds)
        left = int(n)
        while left > 0 or time.monotonic() < until:
            left -= 1
            try:
                if not bool((client.compute(x) == x).all()):
                    raise AssertionError("wrong answer")
                ok += 1
            except Exception as e:  # noqa: BLE001 - every failure is counted
                failed += 1
                first = first or f"{type(e).__name__}: {e}"
        print(json.dumps([ok, failed, first[:300]]), flush=True)


class Child:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=child_env())
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def result(self) -> List:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--calls", type=int, default=60000, help="calls in all rounds together")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        caller(args.child)
        return 0
    if args.rounds < 4:
        ap.error("--rounds must be at least 4 (a warm-up, a restart and a client-kill round)")

    import torch

    import splitlearn_comm as slc

    port = free_port()
    server = ServerProcess(port, workers=16, env=child_env())
    server.go()
    spare = ServerProcess(port, workers=16, env=child_env())  # the replacement, warmed up
    children = [Child(port) for _ in range(args.procs)]
    client = slc.GRPCComputeClient(f"127.0.0.1:{port}", timeout=60)  # default retries
    callers = args.threads + args.procs
    per_round = max(1, args.calls // (args.rounds * callers))
    restart_round = 1  # early, so that the replacement serves most rounds
    kill_round = 2
    x = torch.arange(256.0)
    total_ok = total_failed = 0
    errors: List[str] = []
    rss: List[int] = []
    restart_gap = 0.0
    status = 0
    print(f"soak: {args.threads} threads + {args.procs} processes, {args.rounds} rounds of "
          f"{per_round} calls each per caller, {per_round * callers * args.rounds} calls",
          flush=True)
    try:
        for rnd in range(args.rounds):
            counts = [[0, 0] for _ in range(args.threads)]
            fault_over = threading.Event()
            fault = rnd in (restart_round, kill_round)
            if not fault:
                fault_over.set()

            def work(i: int) -> None:
                # the share of calls, and in a fault round on until the fault is over
                left = per_round
                while left > 0 or not fault_over.is_set():
                    left -= 1
                    try:
                        if not bool((client.compute(x) == x).all()):
                            raise AssertionError("wrong answer")
                        counts[i][0] += 1
                    except Exception as e:  # noqa: BLE001
                        counts[i][1] += 1
                        errors.append(f"{type(e).__name__}: {e}"[:300])
                        return

            victims = [Child(port) for _ in range(2)] if rnd == kill_round else []
            for v in victims:
                v.send("loop")
            start = time.monotonic()
            for c in children:
                c.send(f"{per_round} {3.0 if fault else 0}")
            threads = [threading.Thread(target=work, args=(i,)) for i in range(args.threads)]
            for t in threads:
                t.start()
            event = ""
            if rnd == restart_round:
                time.sleep(1.0)  # let the load build up
                server.kill()
                killed_at = time.monotonic()
                time.sleep(1.0)  # the restart gap
                spare.go()
                restart_gap = time.monotonic() - killed_at
                server, spare = spare, None
                event = f"server killed -9, back after {restart_gap:.2f} s"
            if victims:
                time.sleep(1.0)
                for v in victims:
                    v.close()  # SIGKILL, mid-call
                event = "2 clients killed -9 mid-call"
            fault_over.set()
            for t in threads:
                t.join()
            ok = sum(c[0] for c in counts)
            failed = sum(c[1] for c in counts)
            for c in children:
                r_ok, r_failed, first = c.result()
                ok += r_ok
                failed += r_failed
                if first:
                    errors.append(first)
            took = time.monotonic() - start
            # nothing may stay in flight (killed clients' calls included)
            deadline = time.monotonic() + 30
            m = server.metrics()
            while m["in_flight"] != 0 and time.monotonic() < deadline:
                time.sleep(0.1)
                m = server.metrics()
            rss.append(m["rss_kb"])
            total_ok += ok
            total_failed += failed
            print(f"round {rnd + 1}: {ok} calls ok, {failed} failed, {took:.1f} s, "
                  f"{ok / took:.0f} calls/s, server in flight {m['in_flight']}, "
                  f"server RSS {m['rss_kb'] / 1024:.1f} MiB{'  (' + event + ')' if event else ''}",
                  flush=True)
            if m["in_flight"] != 0:
                print(f"soak: FAILED: {m['in_flight']} calls left in flight", flush=True)
                status = 1
    finally:
        client.close()
        for c in children:
            c.close()
        server.stop()
        if spare is not None:
            spare.stop()
    # RSS of the rounds the replacement served whole (its first one warms it up)
    after = rss[kill_round:]
    grew = len(after) >= 2 and after[-1] > after[0] * 1.25 + 16 * 1024
    print(f"soak: {total_ok} calls ok, {total_failed} failed; restart gap {restart_gap:.2f} s; "
          f"server RSS per round (MiB): {', '.join(f'{r / 1024:.1f}' for r in rss)}", flush=True)
    if total_failed:
        print(f"soak: FAILED: {total_failed} failed calls; first: {errors[:3]}", flush=True)
        status = 1
    if grew:
        print("soak: FAILED: the server's RSS kept growing", flush=True)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
