"""Request-level fuzzer (`make fuzz-server`): mutations of valid serialized requests,
sent by a raw grpcio client (bytes in, bytes out: nothing checks them on the way) to a
server process running the ASan+UBSan build of the extension.

    python tests/fuzz/fuzz_server.py --seconds 60 [--seed N] [--threads 8]

The valid requests are the ComputeRequest and BackwardRequest seeds of the message
fuzz target (tests/fuzz/corpus/message, made by the code that sends them), and the
small requests of the other methods. Each mutation is sent to a method picked at
random (the right one most of the time), sometimes with odd metadata (two
authorization headers, binary values, malformed shared-memory control values). A
quarter of the Compute and ComputeBackward mutations go to the streaming method
instead (ComputeStream, ComputeBackwardStream), cut into Chunks at random places,
now and then a malformed Chunk among them. Between batches the server must answer a
health check. At the end the server must still be alive, have nothing in flight,
and have written no sanitizer report; otherwise the requests of the last moments are
saved under build/fuzz/server-crashes/ and the run fails.

The server's environment (LD_PRELOAD of the sanitizer runtimes, PYTHONPATH of the
ASan build) comes from the Makefile; run through `make fuzz-server`.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Deque, List, Tuple

import grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "soak"))
from server import ServerProcess, free_port  # noqa: E402  (tests/soak/server.py)

SERVICE = "/splitlearn.comm.ComputeService/"
METHODS = [SERVICE + "Compute", SERVICE + "ComputeBackward", SERVICE + "HealthCheck",
           SERVICE + "GetServiceInfo", "/grpc.health.v1.Health/Check", SERVICE + "Nope"]
#: the streaming form of the two tensor methods (docs/protocol.md)
STREAMS = {METHODS[0]: SERVICE + "ComputeStream", METHODS[1]: SERVICE + "ComputeBackwardStream"}
#: shared-memory control values (docs/shm.md) a client without a segment can send:
#: each must be refused or answered "unknown", never trusted
SHM_VALUES = [("sl-shm-req", "0" * 32 + " 1 64"), ("sl-shm-req", "f" * 32 + " 0 0 4096"),
              ("sl-shm-req", "zz 1 2 3"), ("sl-shm-req", "0" * 32 + " 18446744073709551615 1"),
              ("sl-shm-req", ""), ("sl-shm-attach", "x 1 2 " + "0" * 32),
              ("sl-shm-attach", "0" * 36 + " -1 3 " + "0" * 32),
              ("sl-shm-attach", "0" * 36 + " 1 3 " + "0" * 31)]


def seeds() -> List[Tuple[str, bytes]]:
    """(method, valid request bytes) from the message corpus, plus small requests."""
    out: List[Tuple[str, bytes]] = []
    for f in sorted((ROOT / "tests" / "fuzz" / "corpus" / "message").iterdir()):
        data = f.read_bytes()
        if not data or f.name.startswith("issue16"):
            continue
        kind = data[0] & 3  # see fuzz_message.c: 0 ComputeRequest, 2 BackwardRequest
        if kind in (0, 2):
            out.append((METHODS[0] if kind == 0 else METHODS[1], data[1:]))
    out += [(METHODS[2], b""), (METHODS[3], b""), (METHODS[4], b""),
            (METHODS[4], b"\x0a\x1esplitlearn.comm.ComputeService")]
    return out


def mutate(rng: random.Random, data: bytes, pool: List[Tuple[str, bytes]]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(10)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip a bit
            b[pos % len(b)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # an interesting byte
            b[pos % len(b)] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0xC0, 0xED))
        elif op == 2:  # insert bytes
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 3 and b:  # delete a run
            del b[pos:pos + rng.randrange(1, 17)]
        elif op == 4:  # truncate
            del b[pos:]
        elif op == 5 and b:  # duplicate a chunk (a field twice)
            start = rng.randrange(len(b))
            b[pos:pos] = b[start:start + rng.randrange(1, 33)]
        elif op == 6:  # splice another request's tail
            other = rng.choice(pool)[1]
            b[pos:] = other[rng.randrange(len(other) + 1):]
        elif op == 7 and b:  # a varint that never ends, or a huge length
            b[pos % len(b):pos % len(b) + 1] = rng.choice(
                (b"\xff" * 10, b"\xff\xff\xff\xff\x07", b"\x80\x80\x80\x80\x10"))
        elif op == 8:  # append a field: dtype, codec, shape, text fields, garbage
            b += rng.choice((b"\x82\x01\x07float32", b"\x8a\x01\x04zstd",
                             b"\x12\x05\xff\xff\xff\xff\x07", b"\x2a\x02\xc3\x28",
                             b"\x32\x03\xed\xa0\x80", b"\x92\x01\x03\x0a\x01k",
                             b"\x0a\x00", b"\x12\x00"))
        elif op == 9 and b:  # overwrite with a random byte
            b[pos % len(b)] = rng.randrange(256)
    return bytes(b)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def chunks(rng: random.Random, data: bytes, pool: List[Tuple[str, bytes]]) -> List[bytes]:
    """`data` as serialized Chunk messages cut at random places (empty pieces
    included), now and then a mutated, malformed Chunk among them."""
    out: List[bytes] = []
    at = 0
    while at < len(data) or not out:
        n = len(data) - at if len(out) >= 64 else rng.choice((0, 1, 7, 100, 4096, len(data)))
        piece = data[at:at + n]
        at += len(piece)
        msg = b"\x0a" + varint(len(piece)) + piece
        if rng.randrange(20) == 0:
            msg = mutate(rng, msg, pool)
        out.append(msg)
    return out


def metadata(rng: random.Random):
    r = rng.randrange(12)
    if r == 0:
        return (("authorization", "a"), ("authorization", "b"))
    if r == 1:
        return (("x-trace-bin", bytes(rng.randrange(256) for _ in range(8))),)
    if r == 2:
        return (("x-long", "v" * rng.randrange(1, 4000)),)
    if r == 3:
        return (rng.choice(SHM_VALUES),)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=200, help="requests between health checks")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    print(f"fuzz-server: seed {seed}, {args.seconds:.0f} s, {args.threads} threads", flush=True)

    pool = seeds()
    log_path = ROOT / "build" / "fuzz" / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with open(log_path, "w") as log:
        env = dict(os.environ)
        # the server, not this client, runs under the sanitizers (see the Makefile)
        for key in ("LD_PRELOAD", "PYTHONPATH", "ASAN_OPTIONS", "UBSAN_OPTIONS"):
            value = os.environ.get("FUZZ_SERVER_" + key)
            if value is not None:
                env[key] = value
        # a few bytes of sparse or compressed payload may declare a tensor of the
        # server's max_decoded_bytes (4 GiB by default), slow to fill under ASan: keep
        # the limit small so that the run spends its time on many requests
        server = ServerProcess(port, workers=8, env=env, stderr=log,
                               max_decoded_bytes=64 << 20)
        server.go()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        calls = {m: channel.unary_unary(m) for m in METHODS}
        streams = {m: channel.stream_stream(s) for m, s in STREAMS.items()}
        recent: Deque[Tuple[str, bytes]] = collections.deque(maxlen=256)
        lock = threading.Lock()
        codes: collections.Counter = collections.Counter()
        sent = 0
        ok = True
        end = time.monotonic() + args.seconds

        def one(i: int) -> None:
            rng = random.Random(seed * 1_000_003 + i)
            method, data = rng.choice(pool)
            if rng.randrange(10) == 0:
                method = rng.choice(METHODS)
            req = mutate(rng, data, pool)
            streamed = method in STREAMS and rng.randrange(4) == 0
            with lock:
                recent.append((STREAMS[method] if streamed else method, req))
            try:
                if streamed:
                    for _ in streams[method](iter(chunks(rng, req, pool)), timeout=10,
                                             metadata=metadata(rng)):
                        pass
                else:
                    calls[method](req, timeout=10, metadata=metadata(rng))
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            with lock:
                codes[code.name] += 1

        with ThreadPoolExecutor(args.threads) as ex:
            while time.monotonic() < end and ok:
                list(ex.map(one, range(sent, sent + args.batch)))
                sent += args.batch
                try:
                    calls[METHODS[2]](b"", timeout=10)
                except grpc.RpcError as e:
                    print(f"fuzz-server: the health check failed after {sent} requests: "
                          f"{e.code().name} {e.details()}", flush=True)
                    ok = False
        channel.close()
        alive = server.proc.poll() is None
        in_flight = -1
        transports: dict = {}
        wait_until = time.monotonic() + 60  # calls whose clients gave up may still run
        while alive and time.monotonic() < wait_until:
            m = server.metrics()
            in_flight, transports = m["in_flight"], m["requests_by_transport"]
            if in_flight == 0:
                break
            time.sleep(0.1)
            alive = server.proc.poll() is None
        server.stop()
    report = log_path.read_text(errors="replace")
    sanitizer = [line for line in report.splitlines()
                 if "ERROR: AddressSanitizer" in line or "runtime error:" in line
                 or "ERROR: LeakSanitizer" in line]
    print(f"fuzz-server: {sent} requests, status codes {dict(codes.most_common())}; "
          f"tensor calls the server took by transport {transports}", flush=True)
    if not alive or in_flight != 0 or sanitizer or not ok:
        out = ROOT / "build" / "fuzz" / "server-crashes"
        out.mkdir(parents=True, exist_ok=True)
        for n, (method, req) in enumerate(recent):
            (out / f"{n:03d}-{method.rsplit('/', 1)[1]}").write_bytes(req)
        print(f"fuzz-server: FAILED (alive={alive}, in_flight={in_flight}, "
              f"sanitizer reports={len(sanitizer)}); the last {len(recent)} requests are in "
              f"{out}, the server's log in {log_path}", flush=True)
        for line in sanitizer[:5]:
            print("  " + line)
        return 1
    print("fuzz-server: the server survived every request, nothing in flight, no sanitizer "
          "report", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
