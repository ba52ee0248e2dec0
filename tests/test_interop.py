"""Interoperability with a real, stock grpcio peer.

The wire contract (``proto/``, DESIGN.md "Wire contract") promises that the earlier
pure-Python splitlearn-comm, which spoke plain grpcio with generated stubs,
interoperates with this one for float32 tensors, and that our extension fields
(dtype, codec) round-trip for every other dtype. These tests check that promise
from both sides:

* a stock grpcio client, built on stubs generated at test time from ``proto/``,
  calls our :class:`splitlearn_comm.GRPCComputeServer`;
* our :class:`splitlearn_comm.GRPCComputeClient` calls a stock grpcio server that
  emulates the old pure-Python server (float32 only, no extension fields).

Nothing generated is committed: the stubs are compiled into a temporary folder by
a module-scoped fixture.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Sequence, Tuple

import grpc
import numpy as np
import pytest
from grpc_tools import protoc

import splitlearn_comm
from conftest import NEEDS_TORCH

try:
    import torch
except ImportError:  # the NumPy part of this module runs; the rest skips
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason=NEEDS_TORCH)

PROTO_DIR = Path(__file__).resolve().parent.parent / "proto"

#: Upper bound, in seconds, of every single RPC and every wait in this module.
CALL_TIMEOUT = 10.0

#: Invocation-metadata key that tells the test servers what to do with a call.
MODE_KEY = "x-interop-mode"

#: The version our server reports.
OUR_VERSION = "9.8.7-interop"
#: What our compute function's get_info() returns.
OUR_INFO = {"name": "InteropFunction", "layers": "3", "note": "héllo wörld"}
#: The message of the exception our compute function raises in "raise" mode.
BOOM = "boom: the compute function failed on purpose"

#: Four float32 values 0, 1, 2, 3 as tensor bytes.
F32x4 = np.arange(4, dtype="<f4").tobytes()

#: What the emulated pure-Python server reports.
LEGACY_VERSION = "0.9.0-legacy"
LEGACY_INFO = {"service_name": "legacy-splitlearn", "version": LEGACY_VERSION,
               "device": "cpu", "uptime_seconds": 2.5, "total_requests": 42,
               "custom_info": {"model": "legacy-mlp", "hidden": "128"}}


# ---------------------------------------------------------------------------
# generated stubs
# ---------------------------------------------------------------------------

class Stubs(NamedTuple):
    """The modules grpc_tools.protoc generated from proto/."""

    pb: Any          #: splitlearn_comm_pb2: the ComputeService messages
    rpc: Any         #: splitlearn_comm_pb2_grpc: ComputeServiceStub, servicer base, adder
    health_pb: Any   #: health_pb2: grpc.health.v1 messages
    health_rpc: Any  #: health_pb2_grpc: HealthStub


def generate_stubs(out_dir: Path) -> Stubs:
    """Compile proto/splitlearn_comm.proto and proto/health.proto into ``out_dir``
    with grpcio-tools' protoc and import the generated modules.

    health_pb2 registers ``grpc.health.v1.*`` in protobuf's default descriptor pool,
    so grpcio-health-checking's ``grpc_health.v1.health_pb2`` (the same symbols)
    cannot be imported into the same test process afterwards, nor before: tests
    that need it run it in a child process."""
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", "splitlearn_comm.proto", "health.proto"]
    rc = protoc.main(args)
    assert rc == 0, f"grpc_tools.protoc failed ({rc}): {' '.join(args)}"
    sys.path.insert(0, str(out_dir))
    try:
        names = ("splitlearn_comm_pb2", "splitlearn_comm_pb2_grpc", "health_pb2", "health_pb2_grpc")
        return Stubs(*(importlib.import_module(name) for name in names))
    finally:
        sys.path.remove(str(out_dir))


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Stubs:
    return generate_stubs(tmp_path_factory.mktemp("interop_stubs"))


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def mode(name: str) -> Tuple[Tuple[str, str], ...]:
    """Invocation metadata selecting a test server's behaviour for one call."""
    return ((MODE_KEY, name),)


def expect_rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """Run ``call`` and return the grpc.RpcError it must raise."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def decode_float32(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """Read tensor bytes the way the old pure-Python peer did: float32, little-endian."""
    return np.frombuffer(data, dtype="<f4").reshape(tuple(shape))


def random_bytes(dtype: str, shape: Tuple[int, ...], seed: int = 0) -> bytes:
    """Arbitrary bit patterns for a tensor of ``dtype`` and ``shape`` (NaN payloads,
    infinities and subnormals included), 0/1 for bool."""
    n = int(np.prod(shape, dtype=np.int64))
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, size=n, dtype=np.uint8).tobytes()
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    return rng.bytes(n * itemsize)


@contextlib.contextmanager
def our_server(version: str = OUR_VERSION) -> Iterator[splitlearn_comm.GRPCComputeServer]:
    """A started GRPCComputeServer hosting :class:`InteropFunction` on 127.0.0.1."""
    server = splitlearn_comm.GRPCComputeServer(InteropFunction(), host="127.0.0.1", port=0,
                                               max_workers=4, version=version)
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=0)


@contextlib.contextmanager
def stock_channel(port: int) -> Iterator[grpc.Channel]:
    """A grpcio channel to 127.0.0.1:``port``."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()


class InteropFunction(splitlearn_comm.ComputeFunction):
    """Echoes its input bit for bit, unless the call's metadata asks for
    ``affine`` (x * 2 + 1) or ``raise`` (raises ValueError(BOOM))."""

    def compute(self, input_tensor: torch.Tensor) -> torch.Tensor:
        call = splitlearn_comm.current_call()
        wanted = dict(call.metadata).get(MODE_KEY, "echo") if call is not None else "echo"
        if wanted == "raise":
            raise ValueError(BOOM)
        if wanted == "affine":
            return input_tensor * 2 + 1
        return input_tensor

    def get_info(self) -> Dict[str, str]:
        return dict(OUR_INFO)


# ---------------------------------------------------------------------------
# a stock grpcio client calls our server
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served() -> Iterator[splitlearn_comm.GRPCComputeServer]:
    with our_server() as server:
        yield server


@pytest.fixture(scope="module")
def channel(served: splitlearn_comm.GRPCComputeServer) -> Iterator[grpc.Channel]:
    with stock_channel(served.port) as ch:
        grpc.channel_ready_future(ch).result(timeout=CALL_TIMEOUT)
        yield ch


@pytest.fixture(scope="module")
def stub(stubs: Stubs, channel: grpc.Channel) -> Any:
    return stubs.rpc.ComputeServiceStub(channel)


def assert_still_serving(stubs: Stubs, stub: Any) -> None:
    """One well-formed Compute call succeeds (the server survived what came before)."""
    x = np.array([1.5, -2.0], dtype="<f4")
    resp = stub.Compute(stubs.pb.ComputeRequest(data=x.tobytes(), shape=[2]), timeout=CALL_TIMEOUT)
    np.testing.assert_array_equal(decode_float32(resp.data, resp.shape), x)


@pytest.mark.parametrize("shape", [(2, 3, 4), (7,), (), (0, 5)], ids=str)
def test_legacy_float32_request(stubs: Stubs, stub: Any, shape: Tuple[int, ...]) -> None:
    """A request carrying only fields 1 (data) and 2 (shape), as the old pure-Python
    client sent it, is read as float32; the answer decodes as little-endian float32."""
    x = (np.arange(int(np.prod(shape)), dtype="<f4") * 0.75 - 3.25).reshape(shape)
    request = stubs.pb.ComputeRequest(data=x.tobytes(), shape=list(shape))
    assert {f.name for f, _ in request.ListFields()} <= {"data", "shape"}

    resp = stub.Compute(request, timeout=CALL_TIMEOUT, metadata=mode("affine"))

    assert list(resp.shape) == list(shape)
    np.testing.assert_array_equal(decode_float32(resp.data, resp.shape), x * 2 + 1)
    assert resp.dtype == "float32"
    assert resp.codec in ("", "raw")


# NumPy has no bfloat16: without torch, a compute() cannot be handed one
DTYPES = ["float16", pytest.param("bfloat16", marks=needs_torch), "float32", "float64", "complex64", "complex128", "int8",
          "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"]


@pytest.mark.parametrize("shape", [(3, 5), (2, 1, 4), (), (0, 7)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extension_dtype_roundtrip(stubs: Stubs, stub: Any, dtype: str,
                                   shape: Tuple[int, ...]) -> None:
    """With the dtype extension (field 16) set, any dtype round-trips bit for bit."""
    data = random_bytes(dtype, shape)
    request = stubs.pb.ComputeRequest(data=data, shape=list(shape), dtype=dtype, codec="raw")

    resp = stub.Compute(request, timeout=CALL_TIMEOUT)

    assert resp.dtype == dtype
    assert resp.codec in ("", "raw")
    assert list(resp.shape) == list(shape)
    assert resp.data == data


def encode(stubs: Stubs, **fields: Any) -> bytes:
    """A ComputeRequest with ``fields``, serialized by the stock protobuf runtime.
    Concatenating two of these is, in protobuf, merging them: that is how the
    encodings below put fields in an order other than grpcio's."""
    return stubs.pb.ComputeRequest(**fields).SerializeToString()


#: Request encodings other protobuf implementations may produce, each meaning
#: "float32 tensor [[0, 1], [2, 3]]". ``s`` is the Stubs.
ENCODINGS: List[Any] = [
    pytest.param(lambda s: encode(s, shape=[2, 2]) + encode(s, data=F32x4),
                 id="shape-before-data"),
    pytest.param(lambda s: encode(s, dtype="float32", codec="raw", request_id=7)
                 + encode(s, data=F32x4, shape=[2, 2]), id="extensions-before-data"),
    # field 2 as two unpacked varints (tag 0x10), which proto3 parsers must accept
    pytest.param(lambda s: encode(s, data=F32x4) + b"\x10\x02\x10\x02", id="unpacked-shape"),
    # field 111, length-delimited (tag 0xfa 0x06): unknown fields are skipped
    pytest.param(lambda s: encode(s, data=F32x4, shape=[2, 2]) + b"\xfa\x06\x02zz",
                 id="unknown-field"),
    pytest.param(lambda s: encode(s, data=bytes(16)) + encode(s, data=F32x4, shape=[2, 2]),
                 id="repeated-data-last-wins"),
]


@pytest.mark.parametrize("make", ENCODINGS)
def test_other_valid_encodings(stubs: Stubs, channel: grpc.Channel,
                               make: Callable[[Stubs], bytes]) -> None:
    """Valid protobuf encodings that grpcio itself does not produce are read by the
    protobuf rules too (field order, packing and unknown fields are free)."""
    compute = channel.unary_unary("/splitlearn.comm.ComputeService/Compute",
                                  response_deserializer=stubs.pb.ComputeResponse.FromString)
    resp = compute(make(stubs), timeout=CALL_TIMEOUT)
    assert list(resp.shape) == [2, 2]
    assert resp.data == F32x4


def test_request_id_echoed_and_compute_time_set(stubs: Stubs, stub: Any) -> None:
    x = np.ones((2, 2), dtype="<f4")
    request = stubs.pb.ComputeRequest(data=x.tobytes(), shape=[2, 2], request_id=2_000_000_001,
                                      forward_id="fwd-42", model_id="m",
                                      metadata={"k": "v"})

    resp = stub.Compute(request, timeout=CALL_TIMEOUT)

    assert resp.HasField("request_id") and resp.request_id == 2_000_000_001
    assert resp.HasField("forward_id") and resp.forward_id == "fwd-42"
    assert resp.HasField("compute_time_ms") and resp.compute_time_ms >= 0.0


def test_health_check(stubs: Stubs, stub: Any) -> None:
    resp = stub.HealthCheck(stubs.pb.HealthRequest(), timeout=CALL_TIMEOUT)
    assert resp.status == "ok"
    assert resp.version == OUR_VERSION
    assert resp.HasField("uptime_seconds") and resp.uptime_seconds >= 0.0


def test_get_service_info(stubs: Stubs, stub: Any) -> None:
    assert_still_serving(stubs, stub)  # at least one request has been counted
    resp = stub.GetServiceInfo(stubs.pb.ServiceInfoRequest(), timeout=CALL_TIMEOUT)
    assert dict(resp.custom_info) == OUR_INFO
    assert resp.version == OUR_VERSION
    assert resp.service_name
    assert resp.device == "cpu"
    assert resp.total_requests >= 1
    assert resp.HasField("uptime_seconds") and resp.uptime_seconds >= 0.0


@pytest.mark.parametrize("service", ["", "splitlearn.comm.ComputeService"])
def test_standard_health_serving(stubs: Stubs, channel: grpc.Channel, service: str) -> None:
    health = stubs.health_rpc.HealthStub(channel)
    resp = health.Check(stubs.health_pb.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
    assert resp.status == stubs.health_pb.HealthCheckResponse.SERVING


def test_standard_health_unknown_service(stubs: Stubs, channel: grpc.Channel) -> None:
    """As the grpc.health.v1 protocol says: an unknown service is NOT_FOUND."""
    health = stubs.health_rpc.HealthStub(channel)
    err = expect_rpc_error(lambda: health.Check(
        stubs.health_pb.HealthCheckRequest(service="no.such.Service"), timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "no.such.Service" in err.details()


@pytest.mark.parametrize("reuse_channel", [True, False], ids=["same-channel", "new-channel"])
def test_calls_fail_after_stop(stubs: Stubs, reuse_channel: bool) -> None:
    """After stop(), the standard health check is SERVING no more: calls are UNAVAILABLE."""
    request = stubs.health_pb.HealthCheckRequest()
    with our_server() as server:
        port = server.port
        with stock_channel(port) as ch:
            health = stubs.health_rpc.HealthStub(ch)
            resp = health.Check(request, timeout=CALL_TIMEOUT)
            assert resp.status == stubs.health_pb.HealthCheckResponse.SERVING
            server.stop(grace=0)
            if reuse_channel:
                err = expect_rpc_error(lambda: health.Check(request, timeout=CALL_TIMEOUT))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
    if not reuse_channel:
        with stock_channel(port) as ch:
            health = stubs.health_rpc.HealthStub(ch)
            err = expect_rpc_error(lambda: health.Check(request, timeout=CALL_TIMEOUT))
            assert err.code() == grpc.StatusCode.UNAVAILABLE


BAD_REQUESTS: List[Any] = [
    pytest.param(dict(data=F32x4[:12], shape=[2, 2]), ["[2, 2]", "16", "12"],
                 id="shape-disagrees-with-bytes"),
    pytest.param(dict(data=F32x4, shape=[4], dtype="float128"), ["float128"],
                 id="unknown-dtype"),
    pytest.param(dict(data=b"", shape=[-2, 3]), ["negative", "-2"], id="negative-dim"),
    pytest.param(dict(data=F32x4, shape=[4], codec="no-such-codec"), ["no-such-codec"],
                 id="unknown-codec"),
    # an empty tensor whose other dimensions make strides no consumer can hold:
    # once a 29-byte request that crashed the server (D1)
    pytest.param(dict(data=b"", shape=[0, 2**31 - 1, 2**31 - 1, 2**31 - 1]),
                 ["[0, 2147483647, 2147483647, 2147483647]", "strides"],
                 id="empty-with-huge-dims"),
    pytest.param(dict(data=b"", shape=[0, 65536, 65536, 65536, 65536]),
                 ["[0, 65536, 65536, 65536, 65536]", "strides"], id="empty-with-large-dims"),
]


@pytest.mark.parametrize("fields, wanted", BAD_REQUESTS)
def test_bad_request_is_invalid_argument(stubs: Stubs, stub: Any, fields: Dict[str, Any],
                                         wanted: List[str]) -> None:
    """A bad request is INVALID_ARGUMENT, saying what was wrong; the server serves on."""
    request = stubs.pb.ComputeRequest(**fields)
    err = expect_rpc_error(lambda: stub.Compute(request, timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    for word in wanted:
        assert word in err.details(), (word, err.details())
    assert_still_serving(stubs, stub)


def test_malformed_bytes_are_invalid_argument(stubs: Stubs, channel: grpc.Channel) -> None:
    """Bytes that are not a ComputeRequest at all (field 1 claims more bytes than follow)."""
    raw = channel.unary_unary("/splitlearn.comm.ComputeService/Compute",
                              request_serializer=None, response_deserializer=None)
    err = expect_rpc_error(lambda: raw(b"\x0a\xff\xff\xff\x07\x00", timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details()
    assert_still_serving(stubs, stubs.rpc.ComputeServiceStub(channel))


def test_compute_raising_is_internal(stubs: Stubs, stub: Any) -> None:
    """An exception in compute() is INTERNAL with its type and message; the server
    serves the next call."""
    request = stubs.pb.ComputeRequest(data=F32x4, shape=[4])
    err = expect_rpc_error(lambda: stub.Compute(request, timeout=CALL_TIMEOUT,
                                                metadata=mode("raise")))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "ValueError" in err.details() and BOOM in err.details(), err.details()
    assert_still_serving(stubs, stub)


def test_compute_backward_unimplemented(stubs: Stubs, stub: Any) -> None:
    request = stubs.pb.BackwardRequest(grad_output_data=F32x4, grad_output_shape=[4],
                                       forward_id="fwd-1")
    err = expect_rpc_error(lambda: stub.ComputeBackward(request, timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.details()


# ---------------------------------------------------------------------------
# our client calls a stock grpcio server (the old pure-Python server, emulated)
# ---------------------------------------------------------------------------

def make_legacy_servicer(stubs: Stubs) -> Any:
    """A ComputeService servicer that behaves like the earlier pure-Python server: it
    reads data/shape as float32, answers x * 2 + 1 with data and shape only (no dtype
    extension), and aborts with PERMISSION_DENIED "nope" when asked to deny."""
    pb = stubs.pb

    class LegacyServicer(stubs.rpc.ComputeServiceServicer):
        def Compute(self, request: Any, context: grpc.ServicerContext) -> Any:
            if dict(context.invocation_metadata()).get(MODE_KEY) == "deny":
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "nope")
            if dict(context.invocation_metadata()).get(MODE_KEY) == "huge-empty":
                return pb.ComputeResponse(data=b"", shape=[0, 2**31 - 1, 2**31 - 1, 2**31 - 1])
            x = decode_float32(request.data, request.shape)
            y = (x * 2 + 1).astype("<f4")
            resp = pb.ComputeResponse(data=y.tobytes(), shape=list(y.shape))
            if dict(context.invocation_metadata()).get(MODE_KEY) == "kv":
                # a cache entry nobody asked for: the original server's reply shape
                resp.present_key_values.add(key_data=x.tobytes(), key_shape=list(x.shape),
                                            value_data=y.tobytes(), value_shape=list(y.shape))
            if request.HasField("request_id"):
                resp.request_id = request.request_id
            return resp

        def HealthCheck(self, request: Any, context: grpc.ServicerContext) -> Any:
            return pb.HealthResponse(status="ok", message="legacy", version=LEGACY_VERSION)

        def GetServiceInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
            return pb.ServiceInfoResponse(**LEGACY_INFO)

    return LegacyServicer()


@pytest.fixture(scope="module")
def legacy_port(stubs: Stubs) -> Iterator[int]:
    """Port of a started stock grpcio server running the legacy servicer."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", -1),
                                  ("grpc.max_send_message_length", -1)])
    stubs.rpc.add_ComputeServiceServicer_to_server(make_legacy_servicer(stubs), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(CALL_TIMEOUT)


@pytest.fixture(scope="module")
def client(legacy_port: int) -> Iterator[splitlearn_comm.GRPCComputeClient]:
    c = splitlearn_comm.GRPCComputeClient(f"127.0.0.1:{legacy_port}", timeout=CALL_TIMEOUT,
                                          retry_strategy=None)
    try:
        assert c.connect(timeout=CALL_TIMEOUT)
        yield c
    finally:
        c.close()


def float32_input(kind: str, shape: Tuple[int, ...], seed: int = 0) -> Any:
    """A float32 test tensor of ``kind`` ("torch" or "numpy")."""
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(x) if kind == "torch" else x


@pytest.mark.parametrize("shape", [(4, 8), (3,), (), (0, 3)], ids=str)
@pytest.mark.parametrize("kind", [pytest.param("torch", marks=needs_torch), "numpy"])
def test_our_client_compute(client: splitlearn_comm.GRPCComputeClient, kind: str,
                            shape: Tuple[int, ...]) -> None:
    x = float32_input(kind, shape)
    y = client.compute(x, timeout=CALL_TIMEOUT)
    if kind == "torch":
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
        assert tuple(y.shape) == shape
        assert torch.equal(y, x * 2 + 1)
    else:
        assert isinstance(y, np.ndarray) and y.dtype == np.float32
        np.testing.assert_array_equal(y, x * 2 + 1)


@needs_torch
def test_our_client_large_tensor(client: splitlearn_comm.GRPCComputeClient) -> None:
    """16 MiB of float32 each way, well over gRPC's default 4 MiB receive limit."""
    x = float32_input("torch", (1024, 4096), seed=1)
    y = client.compute(x, timeout=60.0)
    assert y.shape == x.shape
    assert torch.equal(y, x * 2 + 1)


@needs_torch
def test_our_client_takes_a_reply_with_cache_entries(legacy_port: int) -> None:
    """A reply carrying present_key_values to a call that sent none comes back as
    (tensor, ((key, value),)), as the general path gives it, also for a call with
    the client's own settings (the one-call path of compute(), Client.plain)."""
    x = float32_input("torch", (2, 3))
    with splitlearn_comm.GRPCComputeClient(f"127.0.0.1:{legacy_port}", timeout=CALL_TIMEOUT,
                                           retry_strategy=None,
                                           metadata=[(MODE_KEY, "kv")]) as kv_client:
        for out in (kv_client.compute(x), kv_client.compute(x, timeout=CALL_TIMEOUT)):
            y, pairs = out
            assert torch.equal(y, x * 2 + 1)
            assert len(pairs) == 1
            assert torch.equal(pairs[0][0], x) and torch.equal(pairs[0][1], x * 2 + 1)
        assert kv_client.get_statistics()["successful_requests"] == 2


def test_our_client_health_check(client: splitlearn_comm.GRPCComputeClient) -> None:
    assert client.health_check(timeout=CALL_TIMEOUT) is True


def test_our_client_service_info(client: splitlearn_comm.GRPCComputeClient) -> None:
    info = client.get_service_info(timeout=CALL_TIMEOUT)
    for key, value in LEGACY_INFO.items():
        assert info[key] == value, key


@needs_torch
def test_our_client_sees_grpcio_abort(client: splitlearn_comm.GRPCComputeClient) -> None:
    """context.abort() in a grpcio servicer reaches our caller as RpcError, with the
    code and details the servicer gave."""
    x = float32_input("torch", (2,))
    with pytest.raises(splitlearn_comm.RpcError) as info:
        client.compute(x, metadata={MODE_KEY: "deny"}, timeout=CALL_TIMEOUT)
    err = info.value
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "nope"
    # the client keeps working after a failed call
    assert torch.equal(client.compute(x, timeout=CALL_TIMEOUT), x * 2 + 1)


def test_our_client_refuses_reply_with_unrepresentable_shape(
        client: splitlearn_comm.GRPCComputeClient) -> None:
    """A peer replying with an empty tensor whose strides overflow gets an RpcError
    naming the shape, not a crash of the client (D1, client side)."""
    x = float32_input("numpy", (2,))
    with pytest.raises(splitlearn_comm.RpcError) as info:
        client.compute(x, metadata={MODE_KEY: "huge-empty"}, timeout=CALL_TIMEOUT)
    assert "strides" in info.value.details(), info.value.details()
    np.testing.assert_array_equal(client.compute(x, timeout=CALL_TIMEOUT), x * 2 + 1)


# ---------------------------------------------------------------------------
# sessions from a stock grpcio client (fields 40-42, docs/protocol.md)
# ---------------------------------------------------------------------------

class _SessionSum(splitlearn_comm.ComputeFunction):
    """The running sum of the session's inputs; counts its runs."""

    runs = 0

    def compute(self, x):
        _SessionSum.runs += 1
        s = splitlearn_comm.current_call().session
        s["sum"] = s.get("sum", 0) + x
        return s["sum"]


def test_stock_client_session_steps_and_close(stubs: Stubs) -> None:
    """A grpcio peer drives a session with fields 40-42: each step runs once (a
    repeated step is answered from the record), closing ends it, and a later step is
    FAILED_PRECONDITION with the reason in the trailing metadata."""
    server = splitlearn_comm.GRPCComputeServer(_SessionSum(), host="127.0.0.1", port=0)
    server.start()
    try:
        with stock_channel(server.port) as ch:
            stub = stubs.rpc.ComputeServiceStub(ch)
            one = np.ones(2, dtype="<f4").tobytes()

            def step(n: int, **extra: Any) -> Any:
                return stub.Compute(stubs.pb.ComputeRequest(data=one, shape=[2], session_id="s",
                                                            session_step=n, **extra),
                                    timeout=CALL_TIMEOUT)

            assert decode_float32(step(1).data, [2]).tolist() == [1, 1]
            assert decode_float32(step(1).data, [2]).tolist() == [1, 1]  # a retry
            assert decode_float32(step(2).data, [2]).tolist() == [2, 2]
            assert _SessionSum.runs == 2
            closed = stub.Compute(stubs.pb.ComputeRequest(data=b"", shape=[0], session_id="s",
                                                          session_close=True),
                                  timeout=CALL_TIMEOUT)
            assert list(closed.shape) == [0] and _SessionSum.runs == 2
            err = expect_rpc_error(lambda: step(3))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "was closed" in err.details()
            assert ("sl-session-gone", "closed") in tuple(err.trailing_metadata())
    finally:
        server.stop(grace=0)
