"""Streaming large tensors: ComputeStream and ComputeBackwardStream (docs/protocol.md).

Our client sends a request of ``stream_threshold`` bytes or more as a stream of
Chunks whose data, concatenated, is the unary message; the server answers the same
way. These tests force streaming on small tensors (threshold 0, tiny chunks, so that
every message spans many chunks) and check that the stream carries everything the
unary call carries, that malformed or abandoned streams are refused or cleaned up
while the server keeps serving, and that stock grpcio peers still interoperate both
ways (unary to our server; our client falling back to unary on a server without the
method).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="needs torch, an optional extra (pip install splitlearn-comm[torch])")

import grpc  # noqa: E402

import splitlearn_comm as slc  # noqa: E402
from splitlearn_comm import _core  # noqa: E402
from conftest import PYTHON, ROOT, Echo, subprocess_env  # noqa: E402
from test_interop import generate_stubs  # noqa: E402

pytestmark = pytest.mark.timeout(120)

#: bytes of the message per Chunk in these tests: every message spans many chunks
CHUNK = 1000


@pytest.fixture(autouse=True)
def _over_tcp(monkeypatch):
    """Streaming is how bytes cross a connection: keep them off the same-host
    shared-memory channel (which would carry these 127.0.0.1 calls otherwise)."""
    monkeypatch.setenv("SPLITLEARN_SHM", "0")


def streaming(client: slc.GRPCComputeClient, chunk: int = CHUNK) -> slc.GRPCComputeClient:
    """Make every request of `client` go as a stream of `chunk`-byte pieces."""
    client._core.set_streaming(0, chunk)
    return client


def wait_for(cond, what: str, timeout: float = 20.0) -> None:
    """Wait (bounded) until cond() holds: the tests wait on state, not on time."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}: {cond.__doc__}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return generate_stubs(tmp_path_factory.mktemp("stream_stubs"))


class Seen(slc.ComputeFunction):
    """Echoes its input and records what each call saw."""

    def __init__(self):
        self.calls = []

    def compute(self, x):
        call = slc.current_call()
        self.calls.append({"method": call.method, "grpc_metadata": dict(call.metadata),
                           "deadline": call.deadline})
        return x


# -- the stream carries what the unary call carries -----------------------------------------


def test_defaults_and_settings(serve, connect):
    client = connect(serve(Echo()))
    assert client.stream_threshold == _core.STREAM_THRESHOLD
    assert client._core.streaming() == (_core.STREAM_THRESHOLD, _core.STREAM_CHUNK, False, False)
    off = connect(serve(Echo()), stream_threshold=None)
    assert off._core.streaming()[0] == -1
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="stream_threshold"):
            slc.GRPCComputeClient("127.0.0.1:1", stream_threshold=bad)
    assert _core.METHOD_COMPUTE_STREAM.endswith("/ComputeStream")


@pytest.mark.parametrize("dtype", _core.DTYPES.split(", "))
def test_every_dtype(serve, connect, dtype):
    client = streaming(connect(serve(Echo())), 200)
    t = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1)
    if t == torch.bool:
        x = torch.randint(0, 2, (61, 47), generator=g).bool()
    elif t.is_complex or t.is_floating_point:
        x = torch.randn(37, 29, generator=g, dtype=torch.float64).to(t) if not t.is_complex \
            else torch.randn(37, 29, generator=g, dtype=t)
    else:
        info = torch.iinfo(t)
        x = torch.randint(max(info.min, -(2 ** 31)), min(info.max, 2 ** 31 - 1), (61, 47),
                          generator=g, dtype=torch.int64).to(t)
    y = client.compute(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))  # bit for bit, NaNs too
    assert x.numel() * x.element_size() > 10 * 200  # it took many chunks


def test_default_settings_stream_both_ways_in_many_chunks(serve, connect):
    """Above the default threshold a request and its reply go in chunks of an
    eighth of the message (here 768 KiB)."""
    server = serve(Echo())
    client = connect(server)
    x = torch.randint(0, 255, (6 << 20,), dtype=torch.uint8)
    assert x.numel() >= _core.STREAM_THRESHOLD
    y = client.compute(x)
    assert torch.equal(y, x)
    assert client._core.streaming()[2:] == (False, False)
    small = connect(server, stream_threshold=None)
    assert torch.equal(small.compute(x), x)  # the same through the unary method


def test_both_sides_count_calls_by_transport(serve, connect, stubs, caplog):
    """A streamed call counts as "stream" on the client (get_statistics), on the
    server (metrics, Prometheus) and in the access log; a unary one as "unary",
    whichever client sent it."""
    logger = logging.getLogger("test.transport")
    server = serve(Echo(), access_log=logger)
    client = streaming(connect(server))
    unary = connect(server, stream_threshold=None)
    x = torch.randn(3000)
    with caplog.at_level(logging.INFO, logger="test.transport"):
        assert torch.equal(client.compute(x), x)
        assert torch.equal(client.compute(x), x)
        assert torch.equal(unary.compute(x), x)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = stubs.rpc.ComputeServiceStub(channel)
            stub.Compute(stubs.pb.ComputeRequest(data=b"\0" * 8, shape=[2], dtype="float32"),
                         timeout=30)
            req = stubs.pb.ComputeRequest(data=b"\0" * 8, shape=[2], dtype="float32")
            list(stub.ComputeStream(iter(chunks_of(req.SerializeToString(), 7, stubs.pb)),
                                    timeout=30))
        wait_for(lambda: sum(server.metrics()["requests"].values()) >= 5, "5 calls counted")
        server.stop(grace=1)  # writes what the access log queued
    assert client.get_statistics()["requests_by_transport"] == \
        {"unary": 0, "stream": 2, "shared_memory": 0}
    assert unary.get_statistics()["requests_by_transport"] == \
        {"unary": 1, "stream": 0, "shared_memory": 0}
    assert server.metrics()["requests_by_transport"] == \
        {"unary": 2, "stream": 3, "shared_memory": 0}
    logged = sorted(json.loads(r.getMessage())["transport"] for r in caplog.records
                    if r.name == "test.transport")
    assert logged == ["stream"] * 3 + ["unary"] * 2


def test_non_contiguous_zero_d_and_empty(serve, connect):
    client = streaming(connect(serve(Echo())))
    base = torch.arange(60 * 70, dtype=torch.float32).reshape(60, 70)
    for x in (base.t(), base[::3, 1::2], base[:, 5], torch.tensor(3.5), torch.empty(0, 4)):
        y = client.compute(x)
        assert torch.equal(y, x.contiguous()) and y.shape == x.shape


def test_structures_metadata_and_deadline(serve, connect):
    fn = Seen()
    client = streaming(connect(serve(fn), metadata=[("x-who", "me")]))
    x = {"h": torch.randn(40, 30), "ids": torch.arange(500), "flags": [True, None, 2.5, "s"],
         "pair": (torch.ones(3, dtype=torch.bfloat16), torch.zeros(0))}
    y = client.compute(x, metadata=[("x-step", "7")], timeout=30)
    assert y.keys() == x.keys() and y["flags"] == x["flags"]
    assert torch.equal(y["h"], x["h"]) and torch.equal(y["ids"], x["ids"])
    assert torch.equal(y["pair"][0], x["pair"][0]) and y["pair"][1].shape == (0,)
    seen = fn.calls[-1]
    # user code sees the unary method: streaming is how the bytes travel
    assert seen["method"] == _core.METHOD_COMPUTE
    assert seen["grpc_metadata"]["x-who"] == "me" and seen["grpc_metadata"]["x-step"] == "7"
    assert seen["deadline"] is not None


class Halve(slc.TensorCodec):
    """A Python codec: float32 as float16 bytes (it runs in Python on both sides)."""

    codec_name = "halve-test"

    def encode(self, tensor):
        return tensor.half().numpy().tobytes(), tuple(tensor.shape)

    def decode(self, data, shape, metadata=None):
        return torch.frombuffer(bytearray(data), dtype=torch.float16).float().reshape(shape)


def test_codecs(serve, connect):
    x = torch.randn(64, 50)
    server = serve(Echo(), codecs=[Halve()])
    for codec in (slc.Float16Codec(), slc.Int8Codec(), slc.BFloat16Codec(),
                  slc.CompressedTensorCodec(inner=slc.BFloat16Codec()), Halve()):
        client = streaming(connect(server, codec=codec, codecs=[Halve()]))
        y = client.compute(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        torch.testing.assert_close(y, x, atol=0.05, rtol=0.02)
    sparse = torch.zeros(100, 100)
    sparse[3, 7] = 1.5
    client = streaming(connect(server, codec=slc.SparseCOOCodec()))
    assert torch.equal(client.compute(sparse), sparse)


def test_server_errors_and_metrics(serve, connect):
    class Boom(slc.ComputeFunction):
        def compute(self, x):
            raise RuntimeError("no")

    server = serve(Boom())
    client = streaming(connect(server))
    with pytest.raises(grpc.RpcError) as info:
        client.compute(torch.ones(1000))
    assert info.value.code() == grpc.StatusCode.INTERNAL and "RuntimeError: no" in info.value.details()
    wait_for(lambda: server.metrics()["requests"].get(("Compute", "INTERNAL")) == 1,
             "the call to be counted")


def test_training_forward_and_backward_stream(serve, connect):
    torch.manual_seed(0)
    model = torch.nn.Linear(50, 40)
    server = serve(slc.TrainableComputeFunction(model, None))  # frozen: no step between calls
    streamed, unary = streaming(connect(server)), connect(server, stream_threshold=None)
    grads = []
    for client in (streamed, unary):
        x = torch.randn(30, 50, requires_grad=True)
        with torch.no_grad():
            x.copy_(torch.arange(1500, dtype=torch.float32).reshape(30, 50) / 1500)
        y = client.remote(x, training=True)
        y.square().sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    wait_for(lambda: server.metrics()["requests"].get(("ComputeBackward", "OK")) == 2,
             "the backward calls to be counted")


def test_retries_resend_the_stream(serve, connect):
    class FailOnce(slc.ComputeFunction):
        calls = 0

        def compute(self, x):
            FailOnce.calls += 1
            if FailOnce.calls == 1:
                slc.current_call().abort(grpc.StatusCode.UNAVAILABLE, "once")
            return x

    client = streaming(connect(serve(FailOnce()),
                               retry_strategy=slc.FixedDelay(max_retries=2, delay=0.01)))
    x = torch.randn(100, 10)
    assert torch.equal(client.compute(x), x)
    assert FailOnce.calls == 2


def test_over_the_servers_limit(serve, connect):
    server = serve(Echo(), max_decoded_bytes=1 << 16)
    client = streaming(connect(server))
    with pytest.raises(grpc.RpcError) as info:
        client.compute(torch.ones(1 << 15))  # 128 KiB
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max" in info.value.details() or "limit" in info.value.details()
    assert torch.equal(client.compute(torch.ones(100)), torch.ones(100))


def test_over_the_clients_receive_limit(serve, connect):
    class Big(slc.ComputeFunction):
        def compute(self, x):
            return torch.ones(1 << 16)

    client = streaming(connect(serve(Big()), max_message_length=1 << 17))
    with pytest.raises(grpc.RpcError) as info:
        client.compute(torch.ones(10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- stock grpcio peers ----------------------------------------------------------------------


def test_stock_grpcio_client_still_talks_unary(serve, stubs):
    """A server that prefers streaming still answers the unary method."""
    server = serve(Echo())
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = stubs.rpc.ComputeServiceStub(channel)
        data = bytes(range(256)) * 64
        reply = stub.Compute(stubs.pb.ComputeRequest(data=data, shape=[len(data)], dtype="uint8"),
                             timeout=30)
        assert reply.data == data and reply.dtype == "uint8"


def chunks_of(message: bytes, size: int, pb):
    return [pb.Chunk(data=message[i:i + size]) for i in range(0, len(message), size)] or [pb.Chunk()]


def test_stock_grpcio_client_streams(serve, stubs):
    """The streaming contract from another gRPC stack: Chunks of the unary message."""
    server = serve(Echo())
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = stubs.rpc.ComputeServiceStub(channel)
        data = os.urandom(10000)
        req = stubs.pb.ComputeRequest(data=data, shape=[2500], dtype="int32", request_id=5)
        out = b"".join(c.data for c in stub.ComputeStream(iter(chunks_of(req.SerializeToString(), 777,
                                                                            stubs.pb)), timeout=30))
        reply = stubs.pb.ComputeResponse.FromString(out)
        assert reply.data == data and reply.request_id == 5 and reply.dtype == "int32"


def test_malformed_streams_are_refused(serve, connect, stubs):
    server = serve(Echo(), max_decoded_bytes=1 << 20)
    good = stubs.pb.ComputeRequest(data=b"\0" * 400, shape=[100]).SerializeToString()
    cases = {
        "cut mid-field": (chunks_of(good[:200], 50, stubs.pb), grpc.StatusCode.INVALID_ARGUMENT),
        "no chunk": ([], grpc.StatusCode.INVALID_ARGUMENT),
        "group": ([stubs.pb.Chunk(data=b"\x0b")], grpc.StatusCode.INVALID_ARGUMENT),
        "byte count": (chunks_of(stubs.pb.ComputeRequest(data=b"\0" * 3, shape=[2])
                                 .SerializeToString(), 2, stubs.pb), grpc.StatusCode.INVALID_ARGUMENT),
        "over the limit": ([stubs.pb.Chunk(data=b"\x0a\x80\x80\x80\x80\x01")],
                           grpc.StatusCode.RESOURCE_EXHAUSTED),
    }
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = channel.stream_stream(_core.METHOD_COMPUTE_STREAM)
        bad_chunk = stream(iter([b"\x12\x01x"]), timeout=30)  # a Chunk with field 2
        with pytest.raises(grpc.RpcError) as info:
            list(bad_chunk)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Chunk" in info.value.details()
        stub = stubs.rpc.ComputeServiceStub(channel)
        for what, (chunks, code) in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ComputeStream(iter(chunks), timeout=30))
            assert info.value.code() == code, (what, info.value.details())
    client = streaming(connect(server))
    assert torch.equal(client.compute(torch.ones(1000)), torch.ones(1000))  # still serving
    wait_for(lambda: server.metrics()["in_flight"] == 0, "every call to end")


def test_fallback_to_unary_on_a_server_without_the_method(stubs):
    """A stock grpcio server that knows only the unary methods: the first streamed
    call comes back UNIMPLEMENTED and is sent again as unary; later calls go unary."""
    seen = []

    class Count(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            seen.append(details.method)
            return continuation(details)

    class Old(stubs.rpc.ComputeServiceServicer):
        def Compute(self, request, context):
            return stubs.pb.ComputeResponse(data=request.data, shape=request.shape)

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[Count()],
                         options=[("grpc.max_receive_message_length", -1),
                                  ("grpc.max_send_message_length", -1)])
    stubs.rpc.add_ComputeServiceServicer_to_server(Old(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None) as client:
            streaming(client)
            for _ in range(3):
                x = torch.randn(100)
                assert torch.equal(client.compute(x), x)
            assert client._core.streaming()[2:] == (True, False)
            # the refused stream was sent again unary: that is how it went
            assert client.get_statistics()["requests_by_transport"] == \
                {"unary": 3, "stream": 0, "shared_memory": 0}
        assert seen.count(_core.METHOD_COMPUTE_STREAM) == 1
        assert seen.count(_core.METHOD_COMPUTE) == 3
        # default settings: the threshold decides (a float32 message has ~10 more bytes)
        seen.clear()
        with slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None) as client:
            below = torch.ones(_core.STREAM_THRESHOLD // 4 - 16)
            assert torch.equal(client.compute(below), below)
            assert seen == [_core.METHOD_COMPUTE]
            at = torch.ones(_core.STREAM_THRESHOLD // 4)
            assert torch.equal(client.compute(at), at)
            assert seen == [_core.METHOD_COMPUTE, _core.METHOD_COMPUTE_STREAM, _core.METHOD_COMPUTE]
    finally:
        server.stop(grace=None)


# -- cancellation and a peer killed mid-stream -----------------------------------------------


def held_half_way(message: bytes, pb, half: threading.Event, hold: threading.Event,
                  resume: bool):
    """The Chunks of `message` (1000 bytes each), holding at the 50th: `half` is set,
    then `hold` awaited; then the rest (`resume`) or the end of the stream."""
    for i, chunk in enumerate(chunks_of(message, 1000, pb)):
        if i == 50:
            half.set()
            hold.wait(60)
            if not resume:
                return
        yield chunk


def test_cancel_mid_stream_frees_and_keeps_serving(serve, connect, stubs):
    server = serve(Echo())
    message = stubs.pb.ComputeRequest(data=b"\1" * 100000, shape=[25000]).SerializeToString()
    half = threading.Event()
    hold = threading.Event()
    requests = held_half_way(message, stubs.pb, half, hold, resume=False)

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = stubs.rpc.ComputeServiceStub(channel).ComputeStream(requests, timeout=60)
        assert half.wait(60)
        wait_for(lambda: server.metrics()["in_flight"] == 1, "the server to take the call")
        call.cancel()
        hold.set()
        wait_for(lambda: server.metrics()["requests"].get(("Compute", "CANCELLED")) == 1,
             "the server to end and count the call")
    assert server.metrics()["in_flight"] == 0
    client = streaming(connect(server))
    assert torch.equal(client.compute(torch.ones(5000)), torch.ones(5000))


@pytest.mark.parametrize("workers", [2, 4])
def test_calls_that_arrive_while_a_stream_is_received_are_served(serve, connect, stubs, workers):
    """A worker receiving a stream has the idle workers wait outside gRPC (they would
    compete with it for the CPUs), and hands them the calls that come meanwhile: a
    client holding its upload half-way does not hold up other calls, unary or
    streamed, and its own call completes once it sends the rest."""
    server = serve(Echo(), max_workers=workers)
    data = bytes(range(256)) * 400
    message = stubs.pb.ComputeRequest(data=data, shape=[len(data)], dtype="uint8").SerializeToString()
    half = threading.Event()
    hold = threading.Event()
    requests = held_half_way(message, stubs.pb, half, hold, resume=True)

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = stubs.rpc.ComputeServiceStub(channel).ComputeStream
        replies = []
        reader = threading.Thread(target=lambda: replies.append(
            b"".join(c.data for c in stream(requests, timeout=60))))
        reader.start()
        assert half.wait(60)
        wait_for(lambda: server.metrics()["in_flight"] == 1, "the server to take the held stream")
        client = connect(server)
        for k in range(20):
            x = torch.full((64,), float(k))
            assert torch.equal(client.compute(x, timeout=10), x)
        big = torch.arange(20000, dtype=torch.float32)
        assert torch.equal(streaming(connect(server)).compute(big, timeout=10), big)
        # the held stream, still waiting (a call counts as in flight until the server
        # has recorded its end, a moment after its client has the reply)
        wait_for(lambda: server.metrics()["in_flight"] == 1, "the other calls to end")
        hold.set()
        reader.join(60)
    out = replies[0]
    reply = stubs.pb.ComputeResponse.FromString(out)
    assert reply.data == data
    wait_for(lambda: server.metrics()["in_flight"] == 0, "the server to end the held call")
    assert server.metrics()["requests_by_transport"]["stream"] == 2


class LargeForFour(slc.ComputeFunction):
    """Answers a 4-element input with 64 MiB of ones (a reply that streams out for a
    while) and echoes every other input."""

    def compute(self, x):
        return torch.ones(16 * 2**20) if x.numel() == 4 else x


def test_calls_that_arrive_while_a_reply_streams_out_are_served(serve, connect, stubs):
    """The same while a worker sends a streamed reply to a client that reads it slowly:
    the worker waits for flow control with the idle workers out of gRPC, and hands
    them the calls that come meanwhile."""
    server = serve(LargeForFour(), max_workers=2)
    request = stubs.pb.ComputeRequest(data=b"\0" * 16, shape=[4], dtype="float32")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = stubs.rpc.ComputeServiceStub(channel).ComputeStream(
            iter(chunks_of(request.SerializeToString(), 1000, stubs.pb)), timeout=60)
        first = next(reply)  # the rest waits: the server blocks in its sends
        client = connect(server)
        for k in range(20):
            x = torch.full((64,), float(k))
            assert torch.equal(client.compute(x, timeout=10), x)
        # the reply, still going out
        wait_for(lambda: server.metrics()["in_flight"] == 1, "the other calls to end")
        out = first.data + b"".join(c.data for c in reply)
    message = stubs.pb.ComputeResponse.FromString(out)
    assert list(message.shape) == [16 * 2**20]
    assert message.data == torch.ones(16 * 2**20).numpy().tobytes()


CLIENT_KILLED = textwrap.dedent("""
    import sys, time
    import grpc
    sys.path.insert(0, sys.argv[2])
    import splitlearn_comm_pb2 as pb, splitlearn_comm_pb2_grpc as rpc
    message = pb.ComputeRequest(data=b"\\1" * 4000000, shape=[1000000]).SerializeToString()
    def requests():
        for i in range(0, len(message), 100000):
            if i == 2000000:
                print("half", flush=True)
                time.sleep(600)
            yield pb.Chunk(data=message[i:i + 100000])
    channel = grpc.insecure_channel("127.0.0.1:" + sys.argv[1])
    for _ in rpc.ComputeServiceStub(channel).ComputeStream(requests(), timeout=600):
        pass
""")


def test_client_killed_mid_stream(serve, connect, stubs, tmp_path):
    """kill -9 of a client process in the middle of its stream: the server ends the
    call, frees what it held, and keeps serving."""
    server = serve(Echo())
    stub_dir = str(Path(stubs.pb.__file__).parent)
    proc = subprocess.Popen([PYTHON, "-c", CLIENT_KILLED, str(server.port), stub_dir],
                            stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "half"
        wait_for(lambda: server.metrics()["in_flight"] == 1, "the server to take the call")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()
    wait_for(lambda: server.metrics()["requests"].get(("Compute", "CANCELLED")) == 1,
             "the server to end and count the call")
    assert server.metrics()["in_flight"] == 0
    client = streaming(connect(server))
    x = torch.randn(20000)
    assert torch.equal(client.compute(x), x)


def test_kv_cache_fields_stream(serve, connect):
    """The original's KV cache fields (7, 8, 9) travel in streamed messages too."""
    from test_tensormap import CachedBlock

    client = streaming(connect(serve(CachedBlock())))
    x = torch.randn(40, 30)
    out, present, _ = client.compute_with_cache(x, use_cache=True)
    assert torch.equal(out, x + 1) and present[0][0].shape == (1, 2, 1, 4)
    out, present2, _ = client.compute_with_cache(x, past_key_values=present, use_cache=True)
    assert present2[1][1].shape == (1, 2, 2, 4)
    assert torch.equal(present2[1][1][:, :, :1], present[1][1])


def test_deadline_travels_with_the_stream(serve, connect):
    released = threading.Event()
    deadlines = []

    class Slow(slc.ComputeFunction):
        def compute(self, x):
            deadlines.append(slc.current_call().deadline)
            released.wait(60)  # no reply before the client has given up
            return x

    server = serve(Slow())
    client = streaming(connect(server))
    try:
        with pytest.raises(grpc.RpcError) as info:
            client.compute(torch.ones(10000), timeout=0.5)
    finally:
        released.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert deadlines and deadlines[0] is not None  # compute() saw the call's deadline
    wait_for(lambda: server.metrics()["in_flight"] == 0, "the server to end the call")


def test_our_client_cancelled_mid_stream(stubs):
    """A server that reads one chunk and then stops reading: our client's send
    stalls in flow control, its deadline passes mid-stream, and the call ends with
    DEADLINE_EXCEEDED (what the client held is released: the ASan run checks)."""
    first = threading.Event()

    class Stalls(stubs.rpc.ComputeServiceServicer):
        def ComputeStream(self, request_iterator, context):
            next(request_iterator)
            first.set()
            done = threading.Event()
            context.add_callback(done.set)
            done.wait(60)
            return iter(())

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    stubs.rpc.add_ComputeServiceServicer_to_server(Stalls(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None) as client:
            x = torch.ones(16 << 20)  # 64 MiB: far more than the flow-control windows
            with pytest.raises(grpc.RpcError) as info:
                client.compute(x, timeout=2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert first.is_set()
            assert client._core.streaming()[2:] == (False, False)
    finally:
        server.stop(grace=None)


def test_close_while_a_streamed_call_is_in_flight(serve):
    """close() on one thread while another waits in a streamed compute(): the call
    ends CANCELLED, saying so (the ASan run checks nothing is used after free)."""
    entered, release = threading.Event(), threading.Event()

    class Held(slc.ComputeFunction):
        def compute(self, x):
            entered.set()
            release.wait(30)
            return x

    server = serve(Held(), max_workers=2)
    client = streaming(slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None,
                                             timeout=30))
    outcome = []

    def call():
        try:
            outcome.append(client.compute(torch.ones(5000)))
        except Exception as e:  # noqa: BLE001 - the test looks at what it is
            outcome.append(e)

    t = threading.Thread(target=call)
    t.start()
    try:
        assert entered.wait(30)
        client.close()
        t.join(30)
        assert not t.is_alive(), "the call did not end when its client was closed"
    finally:
        release.set()
    (err,) = outcome
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.CANCELLED, err
    assert "client was closed" in err.details()
