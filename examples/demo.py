"""splitlearn-comm in one command: a split MLP across two processes.

A child process hosts the bottom layers of a small torch MLP with
``GRPCComputeServer`` on 127.0.0.1 (port 0: the OS picks a free port, which the
child sends back through a pipe). This process keeps the top layers, connects
with ``GRPCComputeClient``, sends batches of several sizes, checks each answer
against the same layers run locally, and prints shapes, timings, the client's
statistics and the server's service info. Then it stops the child cleanly.

Run it with ``make demo`` or ``python examples/demo.py``.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from simple_server import IN_FEATURES, SPLIT, build_mlp  # noqa: E402
from splitlearn_comm import GRPCComputeClient, GRPCComputeServer, ModelComputeFunction  # noqa: E402

#: Batch sizes sent one after another.
BATCH_SIZES = [1, 8, 32, 128]
#: Concurrent part: this many threads share one client, each making CALLS_PER_THREAD calls.
THREADS = 4
CALLS_PER_THREAD = 10
#: Upper bound, in seconds, on every wait in this demo.
WAIT_S = 60.0


def serve(conn: Connection) -> None:
    """The child process: host build_mlp()[:SPLIT] until told to stop.

    Sends ("port", N) once serving, or ("error", message) when the server could
    not start. Any message from the parent, or the parent going away (EOF), or
    Ctrl-C, stops the server.
    """
    bottom = build_mlp()[:SPLIT]
    server = GRPCComputeServer(ModelComputeFunction(bottom, model_name="mlp-bottom"),
                               host="127.0.0.1", port=0, max_workers=THREADS, version="demo-1")
    try:
        server.start()
    except Exception as e:  # report it to the parent instead of leaving it waiting
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send(("port", server.port))
        conn.recv()
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        server.stop(grace=2.0)
        conn.close()


def start_server_process() -> "tuple[multiprocessing.process.BaseProcess, Connection, int]":
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child_conn,), name="demo-server")
    proc.start()
    child_conn.close()  # the child has its own copy; EOF on ours now means "child gone"
    if not parent_conn.poll(WAIT_S):
        raise RuntimeError(f"the server process did not report a port within {WAIT_S:g} s")
    kind, value = parent_conn.recv()
    if kind != "port":
        raise RuntimeError(f"the server process failed to start: {value}")
    return proc, parent_conn, int(value)


def stop_server_process(proc: "multiprocessing.process.BaseProcess", conn: Connection) -> int:
    try:
        conn.send("stop")
    except (BrokenPipeError, OSError):
        pass  # already gone
    proc.join(WAIT_S)
    if proc.is_alive():
        print("server process did not stop; terminating it", file=sys.stderr)
        proc.terminate()
        proc.join(5)
    conn.close()
    return proc.exitcode if proc.exitcode is not None else -1


def run_client(port: int) -> None:
    model = build_mlp()
    bottom, top = model[:SPLIT].eval(), model[SPLIT:].eval()
    address = f"127.0.0.1:{port}"

    with GRPCComputeClient(address, timeout=30.0) as client:
        if not client.connect(timeout=30):
            raise RuntimeError(f"could not connect to {address}")
        print(f"connected to {address}")
        start = time.perf_counter()
        client.compute(torch.zeros(1, IN_FEATURES))  # first call: connection and lazy set-up
        print(f"first (warm-up) call: {(time.perf_counter() - start) * 1e3:.2f} ms")

        print("\nsequential calls:")
        for batch in BATCH_SIZES:
            x = torch.randn(batch, IN_FEATURES)
            start = time.perf_counter()
            hidden = client.compute(x)
            ms = (time.perf_counter() - start) * 1e3
            with torch.no_grad():
                logits = top(hidden)
                expected = bottom(x)
            torch.testing.assert_close(hidden, expected)
            print(f"  batch {batch:4d}: input {tuple(x.shape)} -> hidden {tuple(hidden.shape)} "
                  f"-> logits {tuple(logits.shape)}  {ms:7.2f} ms  (matches local layers)")

        print(f"\n{THREADS} threads sharing one client, {CALLS_PER_THREAD} calls each:")
        errors: List[BaseException] = []
        per_thread_ms: Dict[int, float] = {}

        def worker(n: int) -> None:
            try:
                x = torch.randn(16, IN_FEATURES)
                start = time.perf_counter()
                for _ in range(CALLS_PER_THREAD):
                    out = client.compute(x)
                    assert out.shape == (16, 128), out.shape
                per_thread_ms[n] = (time.perf_counter() - start) * 1e3 / CALLS_PER_THREAD
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        start = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        wall = time.perf_counter() - start
        if errors:
            raise errors[0]
        total = THREADS * CALLS_PER_THREAD
        print(f"  {total} calls in {wall * 1e3:.1f} ms ({total / wall:.0f} calls/s); "
              f"mean {sum(per_thread_ms.values()) / THREADS:.2f} ms per call per thread")

        print("\nclient statistics:")
        for key, value in client.get_statistics().items():
            print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")

        print("\nservice info:")
        info = client.get_service_info()
        for key in ("service_name", "version", "device", "total_requests"):
            print(f"  {key}: {info[key]}")
        print(f"  uptime_seconds: {info['uptime_seconds']:.1f}")
        for key, value in sorted(info["custom_info"].items()):
            print(f"  custom_info.{key}: {value}")


def main() -> int:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    proc, conn, port = start_server_process()
    interrupted = False
    try:
        print(f"server process {proc.pid} serving build_mlp()[:{SPLIT}] on 127.0.0.1:{port}")
        run_client(port)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; stopping the server process", file=sys.stderr)
    finally:
        code = stop_server_process(proc, conn)
    if interrupted:
        return 130
    print(f"\nserver process exited with code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
