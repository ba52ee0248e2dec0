"""The same-host shared-memory channel (docs/shm.md): negotiation, every dtype,
structures, non-contiguous inputs, codecs, threads, the opt-outs, refusals, bad
control metadata from a raw grpcio peer, and processes killed with -9 on either
side."""
from __future__ import annotations

import concurrent.futures
import fcntl
import gc
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import grpc
import pytest

from conftest import NEEDS_TORCH, Echo

torch = pytest.importorskip("torch", reason=NEEDS_TORCH)

import splitlearn_comm as slc  # noqa: E402
from splitlearn_comm import _core  # noqa: E402

pytestmark = pytest.mark.timeout(180)

COMPUTE = "/splitlearn.comm.ComputeService/Compute"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
          torch.bool]
HDR = 4096
SEG = HDR + (1 << 20)


def stats(client: slc.GRPCComputeClient) -> dict:
    return client._core.shm_stats()


def maps_of_segments() -> int:
    """Shared-memory segments mapped in this process now (after a garbage collection:
    a received tensor in a reference cycle keeps its segment mapped until then)."""
    gc.collect()
    with open("/proc/self/maps") as f:
        return sum("splitlearn-shm" in line for line in f)


def random_tensor(shape: Tuple[int, ...], dtype: Any) -> Any:
    g = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g,
                         dtype=torch.int64).to(dtype)


def bit_equal(a: Any, b: Any) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.reshape(-1).contiguous().view(torch.uint8).equal(
                b.reshape(-1).contiguous().view(torch.uint8)))


@pytest.fixture
def shm_client(serve, connect) -> slc.GRPCComputeClient:
    """An echo client whose channel has negotiated shared memory."""
    client = connect(serve(Echo()))
    client.compute(torch.ones(4))  # offers the segment
    assert stats(client)["state"] == "on"
    return client


def through_shm(client: slc.GRPCComputeClient, fn: Callable[[], Any]) -> Any:
    """fn() and check that its call went through shared memory."""
    before = stats(client)["calls"]
    result = fn()
    assert stats(client)["calls"] == before + 1
    return result


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(shm_client, dtype):
    for shape in [(3, 5, 7), (), (0, 4)]:  # small messages stay on gRPC
        x = random_tensor(shape, dtype)
        assert bit_equal(shm_client.compute(x), x)
    for shape in [(300, 1000), (2, 70000)]:
        x = random_tensor(shape, dtype)
        assert bit_equal(through_shm(shm_client, lambda: shm_client.compute(x)), x)


def test_structures_and_non_contiguous_inputs(shm_client):
    a = torch.arange(60000, dtype=torch.float32).reshape(600, 100)[:, ::3]  # non-contiguous
    b = torch.randn(40, 50).t()
    x = {"hidden": a, "past": (b, [torch.arange(7), torch.ones(2, dtype=torch.bool)]),
         "step": 3, "name": "x", "none": None}
    assert not a.is_contiguous() and not b.is_contiguous()
    y = through_shm(shm_client, lambda: shm_client.compute(x))
    assert torch.equal(y["hidden"], a) and torch.equal(y["past"][0], b)
    assert torch.equal(y["past"][1][0], torch.arange(7))
    assert y["past"][1][1].tolist() == [True, True]
    assert y["step"] == 3 and y["name"] == "x" and y["none"] is None


@pytest.mark.parametrize("codec", [slc.Float16Codec(), slc.CompressedTensorCodec(),
                                   slc.Int8Codec()], ids=lambda c: type(c).__name__)
def test_codecs(serve, connect, codec):
    client = connect(serve(Echo()), codec=codec)
    x = torch.randn(256, 256)
    client.compute(x)
    assert stats(client)["state"] == "on"
    y = through_shm(client, lambda: client.compute(x))
    assert y.shape == x.shape and torch.allclose(y, x, atol=0.05, rtol=0.05)


def test_large_tensor_and_reply_bigger_than_request(serve, connect):
    class Grow(slc.ComputeFunction):
        def compute(self, x):
            return torch.cat([x] * 8)

    client = connect(serve(Grow()))
    x = torch.randn(3 << 18)  # 3 MiB: a segment bigger than the first
    client.compute(x)
    y = client.compute(x)  # the 24 MiB reply does not fit: over TCP, then sized for it
    assert torch.equal(y, torch.cat([x] * 8))
    client.compute(x)
    y = through_shm(client, lambda: client.compute(x))
    assert torch.equal(y, torch.cat([x] * 8))
    assert stats(client)["segments"] <= 8


def test_small_messages_stay_on_grpc(shm_client):
    x = torch.randn(1000)
    calls = stats(shm_client)["calls"]
    assert torch.equal(shm_client.compute(x), x)
    assert stats(shm_client)["calls"] == calls


def test_threads_share_one_client(shm_client):
    def work(i: int) -> bool:
        ok = True
        for j in range(10):
            x = torch.full((1 << 16,), float(i * 100 + j))
            ok &= torch.equal(shm_client.compute(x), x)
        return ok

    before = stats(shm_client)["calls"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))
    assert stats(shm_client)["calls"] > before
    assert stats(shm_client)["segments"] <= 8


def test_async_calls_go_through_segments_too(shm_client):
    x = torch.randn(1 << 16)
    assert torch.equal(through_shm(shm_client,
                                   lambda: shm_client.compute_async(x).result(timeout=60)), x)
    assert torch.equal(shm_client.compute(x), x)
    # many in flight: each takes a free segment, the rest (past the pool's 8) go over
    # the connection; every result is right, and the outputs view their segments
    xs = [torch.full((1 << 16,), float(i)) for i in range(20)]
    before = stats(shm_client)["calls"]
    futures = [shm_client.compute_async(x) for x in xs]
    outs = [f.result(timeout=60) for f in futures]
    assert all(torch.equal(o, x) for o, x in zip(outs, xs))
    assert stats(shm_client)["calls"] > before
    assert stats(shm_client)["segments"] <= 8


def test_both_sides_count_the_calls_through_shared_memory(serve, connect):
    """The public counts by transport (client statistics, server metrics) say which
    calls went through a segment, blocking and asynchronous ones alike."""
    server = serve(Echo())
    client = connect(server)
    client.compute(torch.ones(4))  # small: over the connection (it offers the segment)
    x = torch.randn(1 << 16)
    assert torch.equal(client.compute(x), x)
    assert torch.equal(client.compute_async(x).result(timeout=60), x)
    counts = client.get_statistics()["requests_by_transport"]
    assert counts == {"unary": 1, "stream": 0, "shared_memory": 2}
    assert counts["shared_memory"] == stats(client)["calls"]
    deadline = time.monotonic() + 10  # a call is counted just after its status went out
    while sum(server.metrics()["requests_by_transport"].values()) < 3 and \
            time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.metrics()["requests_by_transport"] == counts


def test_async_call_cancelled_while_the_server_computes(serve, connect):
    entered, release = threading.Event(), threading.Event()

    class Gate(slc.ComputeFunction):
        def compute(self, x):
            if float(x[0]) == 7.0:
                entered.set()
                release.wait(60)
            return x

    client = connect(serve(Gate()))
    client.compute(torch.ones(1 << 16))  # the channel is on
    held = client.compute_async(torch.full((1 << 16,), 7.0))
    assert entered.wait(60)
    held.cancel()
    with pytest.raises(Exception):
        held.result(timeout=60)
    ys = [torch.full((1 << 16,), float(i)) for i in range(3)]
    for y in ys:  # the held segment is not reused while the server reads it
        assert torch.equal(client.compute_async(y).result(timeout=60), y)
    release.set()
    assert torch.equal(through_shm(client, lambda: client.compute(ys[1])), ys[1])

def test_async_client_alone_negotiates(serve):
    """An asynchronous client that never makes a blocking call still gets the channel:
    its first large call offers a segment on a health check."""
    server = serve(Echo())

    async def run() -> None:
        async with slc.AsyncGRPCComputeClient(f"127.0.0.1:{server.port}",
                                              retry_strategy=None, timeout=30) as client:
            x = torch.randn(1 << 18)
            for _ in range(3):
                assert torch.equal(await client.compute(x), x)
            assert client.sync._core.shm_stats()["calls"] >= 2

    import asyncio
    asyncio.run(run())


def test_opt_out_setting(serve, connect):
    client = connect(serve(Echo()), shared_memory=False)
    x = torch.randn(1000)
    for _ in range(3):
        assert torch.equal(client.compute(x), x)
    assert stats(client) == {"state": "off", "segments": 0, "calls": 0}


def test_opt_out_environment(serve, connect, monkeypatch):
    server = serve(Echo())
    monkeypatch.setenv("SPLITLEARN_SHM", "0")
    client = connect(server)
    assert torch.equal(client.compute(torch.ones(3)), torch.ones(3))
    assert stats(client)["state"] == "off" and stats(client)["segments"] == 0


def test_server_that_refuses_falls_back_with_a_debug_log(serve, connect, monkeypatch, caplog):
    monkeypatch.setenv("SPLITLEARN_SHM", "0")
    server = serve(Echo())
    monkeypatch.delenv("SPLITLEARN_SHM")
    assert server._core.shm_segments() == -1
    client = connect(server)
    x = torch.randn(1000)
    with caplog.at_level("DEBUG", logger="splitlearn_comm.client"):
        for _ in range(3):
            assert torch.equal(client.compute(x), x)
    assert stats(client)["state"] == "off" and stats(client)["calls"] == 0
    assert any("refused (refused: disabled on the server)" in r.getMessage()
               for r in caplog.records)


def test_remote_targets_never_offer(serve):
    # a target that is not this host: no segment is ever made
    c = _core.Client("10.255.255.1:1", [], None)
    assert c.shm_stats()["state"] == "off"
    c.close()


def test_peer_without_shm_ignores_the_offer(connect):
    """A stock grpcio server that echoes the request bytes (the single-tensor
    fields of ComputeRequest and ComputeResponse are the same): the client's offer
    goes unanswered, so every call stays on TCP."""
    def echo(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "splitlearn.comm.ComputeService", {"Compute": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None, timeout=30)
        x = torch.randn(100)
        for _ in range(3):
            assert torch.equal(client.compute(x), x)
        assert stats(client)["state"] == "off" and stats(client)["calls"] == 0
        client.close()
    finally:
        server.stop(None)


def test_unix_socket_address(tmp_path):
    path = f"unix:{tmp_path}/s.sock"
    server = slc.GRPCComputeServer(Echo(), host=path, port=0).start()
    try:
        client = slc.GRPCComputeClient(path, retry_strategy=None, timeout=30)
        x = torch.randn(1 << 18)
        assert torch.equal(client.compute(x), x)
        assert torch.equal(through_shm(client, lambda: client.compute(x)), x)
        assert server._core.shm_segments() == 1
        client.close()
        # the client closed its segment: the server unmaps it
        assert server._core.shm_segments() == 0
    finally:
        server.stop(0)


def test_segments_freed_when_the_channel_closes(serve, connect):
    server = serve(Echo())
    before = maps_of_segments()
    client = connect(server)
    for n in (10, 1 << 19, 1 << 22):
        client.compute(torch.ones(n))
        client.compute(torch.ones(n))
    assert server._core.shm_segments() == stats(client)["segments"] >= 2
    client.close()
    assert server._core.shm_segments() == 0
    assert maps_of_segments() == before



def test_received_tensors_view_the_segment_and_outlive_everything(serve, connect):
    """Zero copies on receive: the server's compute() gets its input as a view of the
    client's segment, the client its output as a view of the reply beside it. A view
    keeps its segment from reuse until it is freed, so tensors kept across calls (a
    server keeping activations for backward, a client keeping outputs) stay intact,
    and they outlive the client and the server."""
    kept: List[Any] = []

    class Keep(slc.ComputeFunction):
        def compute(self, x):
            kept.append(x)
            return x * 2

    before = maps_of_segments()
    server = serve(Keep())
    client = connect(server)
    client.compute(torch.ones(4))  # offers the segment
    kept.clear()
    sent = [torch.full((1 << 18,), float(i)) for i in range(12)]  # 1 MiB each
    outs = [through_shm(client, lambda x=x: client.compute(x)) for x in sent]
    # every kept tensor held its segment: each call took a new one (12 > the pool's 8)
    assert stats(client)["segments"] == 8
    assert all(o.data_ptr() % 64 == 0 for o in outs)
    assert all(k.data_ptr() % 64 == 0 for k in kept)
    for i, x in enumerate(sent):
        assert torch.equal(kept[i], x) and torch.equal(outs[i], x * 2)
    # writing to one view touches nothing else
    outs[0].add_(1)
    kept[1].zero_()
    assert torch.equal(through_shm(client, lambda: client.compute(sent[3])), sent[3] * 2)
    assert torch.equal(kept[12], sent[3])
    for i in range(2, 12):
        assert torch.equal(outs[i], sent[i] * 2) and torch.equal(kept[i], sent[i])
    client.close()
    server.stop(0)
    for i in range(2, 12):
        assert torch.equal(outs[i], sent[i] * 2) and torch.equal(kept[i], sent[i])
    kept.clear()
    outs.clear()
    assert server._core.shm_segments() == 0  # (a sweep: the client closed them all)
    assert maps_of_segments() == before  # the last views unmapped them



def test_every_tensor_of_a_structure_is_viewed(serve, connect):
    """A message of named tensors gets padding in the segment so that every tensor
    starts on a 64-byte boundary: each is lent, none copied, whatever the sizes and
    dtypes around it (a KV cache of float16 pairs, an odd-sized mask)."""
    seen: List[Any] = []

    class Keep(slc.ComputeFunction):
        def compute(self, x):
            seen.append(x)
            return x

    client = connect(serve(Keep()))
    client.compute(torch.ones(4))
    x = {"hidden": torch.randn(1, 33, 777),
         "mask": torch.ones(70001, dtype=torch.bool),
         "past": tuple((torch.randn(1, 3, 129, 64).half(), torch.randn(1, 3, 129, 64).half())
                       for _ in range(4))}
    y = through_shm(client, lambda: client.compute(x))
    got = seen[-1]
    leaves_in = [got["hidden"], got["mask"]] + [t for kv in got["past"] for t in kv]
    leaves_out = [y["hidden"], y["mask"]] + [t for kv in y["past"] for t in kv]
    leaves_x = [x["hidden"], x["mask"]] + [t for kv in x["past"] for t in kv]
    for a, b, c in zip(leaves_in, leaves_out, leaves_x):
        assert a.data_ptr() % 64 == 0 and b.data_ptr() % 64 == 0
        assert torch.equal(a, c) and torch.equal(b, c)
    seen.clear()


def test_segments_are_reused_once_views_are_freed(serve, connect):
    """A training loop keeps one output while the next call runs: two segments
    alternate, and a server that frees its inputs holds none."""
    client = connect(serve(Echo()))
    client.compute(torch.ones(4))
    x = torch.randn(1 << 18)
    y = None
    for i in range(12):
        y = through_shm(client, lambda: client.compute(x))
        assert torch.equal(y, x)
        if i == 1:
            segments = stats(client)["segments"]  # the offer's small one, and two big
    assert stats(client)["segments"] == segments <= 3



def test_client_gives_up_while_the_server_computes(serve, connect):
    """A call through a segment that the client abandons (its deadline) while the
    server still computes on a view of the request: the client never reuses that
    segment, the server's view stays intact, and the next calls go on."""
    entered, release = threading.Event(), threading.Event()
    kept: List[Any] = []

    class Slow(slc.ComputeFunction):
        def compute(self, x):
            if float(x[0]) == 7.0:
                kept.append(x)
                entered.set()
                release.wait(60)
            return x

    client = connect(serve(Slow()))
    client.compute(torch.ones(4))
    x = torch.full((1 << 18,), 7.0)
    with pytest.raises(slc.RpcError) as info:
        client.compute(x, timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert entered.wait(60)
    others = [torch.full((1 << 18,), float(i)) for i in range(3)]
    for y in others:  # the abandoned segment is not written while the server holds it
        assert torch.equal(through_shm(client, lambda y=y: client.compute(y)), y)
    assert torch.equal(kept[0], x)
    release.set()
    assert torch.equal(through_shm(client, lambda: client.compute(others[0])), others[0])


# ---- bad control metadata from a raw grpcio peer ----------------------------------

class RawSegment:
    """A segment made by hand, as a client would (shm.h's layout)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("splitlearn-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.fchmod(self.fd, 0o600)
        os.ftruncate(self.fd, SEG)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.map = mmap.mmap(self.fd, SEG)
        self.token = os.urandom(16)
        self.map[0:8] = b"SLSHM\0\0\2"
        self.map[8:24] = self.token
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        self.attach = f"{boot} {os.getpid()} {self.fd} {self.token.hex()}"

        self.seq = 0

    def post(self) -> int:
        """Post a request (shm.c's state word: sequence number << 3 | POSTED)."""
        self.seq += 1
        self.map[24:32] = struct.pack("<Q", self.seq << 3 | 1)
        return self.seq

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def raw_call(channel: grpc.Channel, body: bytes, metadata: List[Tuple[str, str]]
             ) -> Tuple[grpc.StatusCode, str, dict]:
    call = channel.unary_unary(COMPUTE)
    try:
        _, info = call.with_call(body, metadata=metadata, timeout=30)
        return grpc.StatusCode.OK, "", dict(info.trailing_metadata() or ())
    except grpc.RpcError as e:
        return e.code(), e.details() or "", dict(e.trailing_metadata() or ())


def test_bad_control_metadata_is_refused_and_the_server_keeps_serving(serve, connect):
    server = serve(Echo())
    seg = RawSegment()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        _, _, trailing = raw_call(channel, b"", [("sl-shm-attach", seg.attach)])
        assert trailing.get("sl-shm") == "attached"
        tok = seg.token.hex()
        invalid = ["", "x", f"{tok}", f"{tok} 1", f"{tok} 0 5", f"{tok} -1 5", f"{tok} 1 -5",
                   f"{tok} 1 {SEG - HDR + 1}", f"{tok} 1 {1 << 62}", f"{tok} 1 5 extra",
                   f"{tok[:-1]}g 1 5", f"{tok} 18446744073709551616 5", tok.upper() + " 1 5"]
        rng = random.Random(7)
        for _ in range(40):
            invalid.append("".join(rng.choice("0123456789abcdef -") for _ in range(rng.randint(
                1, 80))))
        for value in invalid:
            code, details, trailing = raw_call(channel, b"", [("sl-shm-req", value)])
            assert code in (grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.FAILED_PRECONDITION), (value, code, details)
            if value.startswith(tok) and value != tok:
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (value, details)
        code, details, _ = raw_call(channel, b"", [("sl-shm-req", f"{tok} 1 {SEG - HDR + 1}")])
        assert "past its segment" in details
        # an unknown segment, a message beside the segment, the key twice
        code, _, trailing = raw_call(channel, b"", [("sl-shm-req", "0" * 32 + " 1 5")])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and trailing["sl-shm"] == "unknown"
        code, details, _ = raw_call(channel, b"\x0a\x00", [("sl-shm-req", f"{tok} 1 5")])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty message" in details
        code, details, _ = raw_call(channel, b"", [("sl-shm-req", f"{tok} 1 5"),
                                                   ("sl-shm-req", f"{tok} 1 5")])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "twice" in details
        # malformed bytes in the segment: the message reader refuses them
        for garbage in (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05\x01"):
            seg.map[HDR:HDR + len(garbage)] = garbage
            seq = seg.post()
            code, details, _ = raw_call(channel, b"", [("sl-shm-req",
                                                        f"{tok} {seq} {len(garbage)}")])
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (garbage, details)
        for _ in range(20):
            garbage = rng.randbytes(rng.randint(1, 300))
            seg.map[HDR:HDR + len(garbage)] = garbage
            seq = seg.post()
            code, _, _ = raw_call(channel, b"", [("sl-shm-req", f"{tok} {seq} {len(garbage)}")])
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)
        # a request not posted (its client gave up, or an old sequence number)
        code, details, trailing = raw_call(channel, b"", [("sl-shm-req", f"{tok} {seq} 5")])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not posted" in details
        assert "sl-shm" not in trailing
        # attach values that are refused: the call itself is served as usual
        for value in ("nonsense", seg.attach.replace(seg.token.hex(), "1" * 32),
                      "00000000-0000-0000-0000-000000000000 1 1 " + "1" * 32):
            _, _, trailing = raw_call(channel, b"", [("sl-shm-attach", value)])
            assert trailing["sl-shm"].startswith("refused"), value
        # the server keeps serving, over shared memory too
        client = connect(server)
        x = torch.randn(1 << 16)
        client.compute(x)
        assert torch.equal(through_shm(client, lambda: client.compute(x)), x)
    finally:
        channel.close()
        seg.close()


def test_hooks_never_see_the_control_metadata(serve, connect):
    seen: List[dict] = []

    class Peek(slc.ComputeFunction):
        def compute(self, x):
            seen.append(dict(slc.current_call().metadata))
            return x

    client = connect(serve(Peek()), metadata=[("x-user", "alice")])
    for _ in range(3):
        client.compute(torch.ones(1 << 16))
    assert stats(client)["calls"] >= 1
    assert all(not any(k.startswith("sl-shm") for k in md) for md in seen)
    assert all(md["x-user"] == "alice" for md in seen)


def test_limits_bind_shm_messages(serve, connect):
    limit = [("grpc.max_receive_message_length", 100_000)]
    client = connect(serve(Echo(), options=limit))
    client.compute(torch.ones(4))
    with pytest.raises(slc.RpcError) as info:  # 128 KiB: over the server's limit
        client.compute(torch.ones(1 << 15))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()
    limited = connect(serve(Echo()), options=limit)  # the client's own receive limit
    limited.compute(torch.ones(4))
    with pytest.raises(slc.RpcError) as info:
        limited.compute(torch.ones(1 << 15))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stats(limited)["state"] == "on"


# ---- processes killed with -9 ---------------------------------------------------------

CLIENT_LOOP = """
import sys, torch, splitlearn_comm as slc
c = slc.GRPCComputeClient(sys.argv[1], retry_strategy=None, timeout=60)
x = torch.randn(1 << 18)
n = 0
while True:
    assert torch.equal(c.compute(x), x)
    n += 1
    if n == 3:
        print("READY", c._core.shm_stats()["calls"], flush=True)
"""

SERVER = """
import sys, torch, splitlearn_comm as slc
class Echo(slc.ComputeFunction):
    def compute(self, x):
        return x
s = slc.GRPCComputeServer(Echo(), host=sys.argv[1], port=0).start()
print("READY", flush=True)
sys.stdin.read()
"""


def spawn(code: str, arg: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, arg], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("READY"), line
    return proc


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def wait_for(cond: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    """Poll cond() until it holds; `limit` only bounds a broken run."""
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def dev_shm_entries() -> set:
    try:
        return {n for n in os.listdir("/dev/shm") if "splitlearn" in n}
    except FileNotFoundError:
        return set()


def test_client_killed_mid_use_leaves_nothing(serve):
    server = serve(Echo())
    before_maps, before_dev = maps_of_segments(), dev_shm_entries()
    for _ in range(2):
        proc = spawn(CLIENT_LOOP, f"127.0.0.1:{server.port}")
        try:
            assert server._core.shm_segments() >= 1
        finally:
            kill9(proc)  # in the middle of its loop of calls
        # the call it left (if any) ends; then the sweep unmaps its segment
        wait_for(lambda: server._core.shm_segments() == 0, "segments back to none")
    assert maps_of_segments() == before_maps
    assert dev_shm_entries() == before_dev == set()
    # the server keeps serving
    client = slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None, timeout=30)
    x = torch.randn(1 << 16)
    client.compute(x)
    assert torch.equal(through_shm(client, lambda: client.compute(x)), x)
    client.close()


def test_server_killed_client_fails_cleanly_then_reattaches(tmp_path):
    path = f"unix:{tmp_path}/s.sock"
    proc = spawn(SERVER, path)
    client = slc.GRPCComputeClient(path, retry_strategy=None, timeout=60)
    try:
        x = torch.randn(1 << 16)
        client.compute(x)
        assert torch.equal(through_shm(client, lambda: client.compute(x)), x)
        kill9(proc)
        with pytest.raises(slc.RpcError) as info:
            client.compute(x)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        segments = stats(client)["segments"]
        proc = spawn(SERVER, path)
        # the channel may still be backing off from the refused reconnects: wait until it
        # is connected again, so that the calls below meet the new server
        assert client.connect(timeout=60)
        # the new server does not know the segments: an asynchronous call sends its
        # request again over the connection; a blocking one offers its segment again
        assert torch.equal(client.compute_async(x).result(timeout=60), x)
        assert torch.equal(client.compute(x, timeout=60), x)
        assert torch.equal(through_shm(client, lambda: client.compute(x)), x)
        assert torch.equal(through_shm(client, lambda: client.compute_async(x).result(60)), x)
        assert stats(client)["segments"] <= max(segments, 1) + 1
    finally:
        client.close()
        proc.stdin.close()
        kill9(proc)
