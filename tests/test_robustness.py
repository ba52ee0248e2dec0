"""Nothing a client sends can take the server down (issue 16): hostile requests built
by hand (raw grpcio calls with hand-encoded protobuf, a raw HTTP/2 socket), and the
client's side of the same: status messages it must always turn into an RpcError."""
from __future__ import annotations

import socket
import struct
import time
from typing import Dict, List, Optional, Tuple

import grpc
import pytest
torch = pytest.importorskip("torch", reason="needs torch, an optional extra "
                            "(pip install splitlearn-comm[torch])")

import splitlearn_comm as slc
from conftest import Echo

COMPUTE = "/splitlearn.comm.ComputeService/Compute"
BACKWARD = "/splitlearn.comm.ComputeService/ComputeBackward"


# -- protobuf by hand: the only way to put bytes that are not UTF-8 into a string field --

def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def float32_request(*extra: bytes, n: int = 3) -> bytes:
    """ComputeRequest: float32 [n] of zeros, then `extra` fields."""
    return ld(1, bytes(4 * n)) + ld(2, varint(n)) + b"".join(extra)


def map_entry(field: int, key: bytes, value: bytes) -> bytes:
    return ld(field, ld(1, key) + ld(2, value))


@pytest.fixture
def raw(serve):
    """A server hosting Echo and a raw grpcio callable for its Compute method."""
    server = serve(Echo())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    call = channel.unary_unary(COMPUTE)  # bytes in, bytes out
    yield server, call, channel
    channel.close()


def status_of(call, request: bytes, **kwargs) -> Tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=30, **kwargs)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def still_serving(server: slc.GRPCComputeServer) -> None:
    with slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None) as c:
        assert torch.equal(c.compute(torch.arange(4.0)), torch.arange(4.0))


# -- D3: text fields that are not UTF-8 ------------------------------------------------------

@pytest.mark.parametrize("fields, named", [
    ([map_entry(4, b"trace", b"\xff\xfe")], "metadata (a value)"),
    ([map_entry(4, b"tr\xc3", b"ok")], "metadata (a key)"),
    ([ld(5, b"model-\xe9")], "model_id"),
    ([ld(6, b"\xed\xa0\x80")], "forward_id"),
    ([ld(40, b"sess-\xff")], "session_id"),
    # two such fields: once gave SystemError (a Python API called with an exception set)
    ([ld(5, b"\xff"), ld(6, b"\xfe")], "model_id"),
    ([map_entry(4, b"a", b"\xff"), map_entry(4, b"b", b"\xfe"), ld(6, b"\xfd")], "metadata"),
])
def test_text_fields_that_are_not_utf8_are_invalid_argument(raw, fields, named):
    server, call, _ = raw
    code, details = status_of(call, float32_request(*fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"field '{named}" in details and "not valid UTF-8" in details
    assert "SystemError" not in details
    still_serving(server)


def test_backward_forward_id_not_utf8(serve):
    server = serve(Echo())
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(BACKWARD)
        code, details = status_of(call, ld(1, bytes(12)) + ld(2, varint(3)) + ld(3, b"f\xff"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "field 'forward_id' of BackwardRequest" in details


def test_well_formed_text_of_every_width_passes(serve):
    seen: Dict[str, object] = {}

    class Look(slc.ComputeFunction):
        def compute(self, x):
            call = slc.current_call()
            seen["md"] = dict(call.request_metadata) if hasattr(call, "request_metadata") else None
            return x

    server = serve(Look())
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(COMPUTE)
        text = "é中😀".encode()
        code, details = status_of(call, float32_request(
            map_entry(4, text, text), ld(5, text), ld(6, text)))
    assert code == grpc.StatusCode.OK, details


# -- D6: names with a NUL in them ------------------------------------------------------------

@pytest.mark.parametrize("field, value, named", [
    (16, b"float32\x00junk", "dtype"),
    (17, b"raw\x00zstd", "codec"),
    (16, b"\x00", "dtype"),
])
def test_names_with_a_nul_are_refused(raw, field, value, named):
    server, call, _ = raw
    code, details = status_of(call, float32_request(ld(field, value)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"field '{named}'" in details and "NUL" in details
    still_serving(server)


# -- D4: status messages cut on a character boundary, decoded leniently ---------------------

@pytest.mark.parametrize("char", ["é", "中", "😀"])
def test_long_error_messages_stay_rpc_errors(serve, connect, char):
    """A compute error whose message is cut at the status limit: the client raises the
    RpcError, whatever character the cut falls in."""
    class Loud(slc.ComputeFunction):
        def compute(self, x):
            raise ValueError("x" * int(x.numel() - 1) + char * 400)

    server = serve(Loud())
    client = connect(server)
    for pad in range(1, 5):  # every offset of the cut inside a 1- to 4-byte character
        with pytest.raises(slc.RpcError) as info:
            client.compute(torch.zeros(pad))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        details = info.value.details()
        assert details.startswith("ValueError") and char in details
        assert "\ufffd" not in details  # cut cleanly, not replaced
    assert client.health_check()


def test_grpcio_peer_reads_the_cut_message(serve):
    class Loud(slc.ComputeFunction):
        def compute(self, x):
            raise ValueError("a" + "中" * 400)

    server = serve(Loud())
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        code, details = status_of(channel.unary_unary(COMPUTE), float32_request())
    assert code == grpc.StatusCode.INTERNAL
    assert details.startswith("ValueError") and details.endswith("中")


# -- duplicate credentials -------------------------------------------------------------------

@pytest.mark.parametrize("values", [("wrong", "t0k3n"), ("t0k3n", "wrong"), ("t0k3n", "t0k3n")])
def test_more_than_one_authorization_header_is_refused(serve, connect, values):
    server = serve(Echo(), auth_tokens=["t0k3n"])
    client = connect(server)
    md = [("authorization", v) for v in values]
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(2), metadata=md)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "more than one authorization header" in info.value.details()
    # the same through a stock grpcio client
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        code, _ = status_of(channel.unary_unary(COMPUTE), float32_request(), metadata=md)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert torch.equal(client.compute(torch.ones(2), metadata=[("authorization", "t0k3n")]),
                       torch.ones(2))


# -- D5: a client that leaves during its upload ----------------------------------------------

def _hpack_literal(name_index: int, value: bytes) -> bytes:
    """Literal header field without indexing, indexed name (RFC 7541 6.2.2)."""
    assert name_index < 15 and len(value) < 127
    return bytes([name_index]) + bytes([len(value)]) + value


def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) \
        + payload


def _read_frame(sock: socket.socket) -> Tuple[int, int, int, bytes]:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
        return buf
    head = exact(9)
    length = int.from_bytes(head[:3], "big")
    stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
    return head[3], head[4], stream, exact(length)


def upload_half_and_leave(port: int) -> None:
    """Open a Compute call over a raw HTTP/2 connection, send a message prefix that
    promises 100000 bytes and 10 of them, wait until the server has taken the call
    (its response headers arrive), then drop the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        headers = (b"\x83\x86"  # :method POST, :scheme http (static table)
                   + _hpack_literal(4, COMPUTE.encode())  # :path
                   + _hpack_literal(1, f"127.0.0.1:{port}".encode())  # :authority
                   + b"\x0f\x10" + bytes([16]) + b"application/grpc"  # content-type (31)
                   + b"\x00\x02te\x08trailers")
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")
                     + _frame(1, 0x4, 1, headers)  # HEADERS, END_HEADERS
                     + _frame(0, 0, 1, b"\x00" + struct.pack(">I", 100000) + bytes(10)))
        while True:
            ftype, flags, stream, _ = _read_frame(sock)
            if ftype == 4 and not flags & 1:
                sock.sendall(_frame(4, 1, 0, b""))  # SETTINGS ACK
            if ftype == 1 and stream == 1:
                break  # the server's initial metadata: a worker has the call
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST


def settled(server: slc.GRPCComputeServer, calls: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if sum(m["requests"].values()) >= calls or time.monotonic() > deadline:
            return m
        time.sleep(0.01)


def test_client_leaving_during_upload_counts_as_cancelled(serve):
    server = serve(Echo())
    upload_half_and_leave(server.port)
    m = settled(server, 1)
    assert m["requests"] == {("Compute", "CANCELLED"): 1}, m["requests"]
    assert m["in_flight"] == 0
    still_serving(server)


def test_empty_call_is_still_invalid_argument(raw):
    """A client that half-closes with no message at all did send a malformed call."""
    server, _, channel = raw
    stream = channel.stream_unary(COMPUTE)
    code, details = status_of(stream, iter([]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no request message" in details
    m = settled(server, 1)
    assert m["requests"] == {("Compute", "INVALID_ARGUMENT"): 1}


# -- D2: reconnecting after a server restart -------------------------------------------------

@pytest.fixture
def restartable():
    """Two server processes for one port: the first serving, the second warmed up and
    waiting to take over."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "soak"))
    from server import ServerProcess, free_port  # type: ignore[import-not-found]
    from conftest import subprocess_env

    port = free_port()
    procs = [ServerProcess(port, workers=8, env=subprocess_env()) for _ in range(2)]
    procs[0].go()
    yield procs
    for p in procs:
        p.stop()


def test_default_retry_carries_calls_across_a_restart(restartable):
    """kill -9 of the server, a new one on the same port 1 s later: threads calling in a
    loop with the default retry strategy see no failed call."""
    import threading

    first, second = restartable
    client = slc.GRPCComputeClient(f"127.0.0.1:{first.port}")  # ExponentialBackoff()
    x = torch.arange(8.0)
    assert torch.equal(client.compute(x), x)
    failures: List[BaseException] = []
    after_restart = threading.Event()
    done_after = [0] * 8

    def loop(i: int) -> None:
        while done_after[i] < 3:
            try:
                assert torch.equal(client.compute(x), x)
            except BaseException as e:  # noqa: BLE001 - every failure counts
                failures.append(e)
                return
            if after_restart.is_set():
                done_after[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    first.kill()
    time.sleep(1.0)  # the restart gap under test, not a wait for a condition
    second.go()
    after_restart.set()
    for t in threads:
        t.join(timeout=60)
    client.close()
    assert not failures, failures[:3]
    assert all(n >= 3 for n in done_after)


def test_retry_wait_ends_when_the_server_is_back(restartable):
    """The client's retry sleep drives the channel: a call waiting out a 20 s backoff
    goes through once the restarted server is reachable, instead of when the sleep (or
    gRPC's 5 s backup poller) ends."""
    first, second = restartable
    client = slc.GRPCComputeClient(f"127.0.0.1:{first.port}", timeout=60,
                                   retry_strategy=slc.FixedDelay(max_retries=1, delay=20.0))
    assert client.compute(torch.ones(2)).numel() == 2
    first.kill()
    start = time.monotonic()
    import threading
    threading.Timer(1.0, second.go).start()
    assert client.compute(torch.ones(2)).numel() == 2
    took = time.monotonic() - start
    client.close()
    assert took < 15, f"the call took {took:.1f} s: it slept out the backoff"


# -- the client's side: what a peer sends it -------------------------------------------------

def test_response_text_field_not_utf8_is_an_rpc_error():
    """A (non-conforming) server answers with a forward_id that is not UTF-8: the
    client raises the RpcError naming the field, not a UnicodeDecodeError."""
    from concurrent import futures

    reply = ld(1, bytes(4)) + ld(2, varint(1)) + ld(6, b"fwd-\xff")
    handler = grpc.method_handlers_generic_handler("splitlearn.comm.ComputeService", {
        "Compute": grpc.unary_unary_rpc_method_handler(lambda request, context: reply)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None) as client:
            with pytest.raises(slc.RpcError) as info:
                client.compute(torch.ones(1))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert info.value.details().startswith("bad response from the server: field 'forward_id' "
                                               "of ComputeResponse is not valid UTF-8")
    finally:
        server.stop(0)


EXIT_WITH_CALLS_IN_FLIGHT = """
import sys, threading, time
import numpy as np
import splitlearn_comm as slc

class Slow(slc.ComputeFunction):
    def compute(self, x):
        time.sleep(0.002)
        return x + 1

server = slc.GRPCComputeServer(Slow(), host="127.0.0.1", port=0, max_workers=4)
server.start()
client = slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None)
calls = [0]

def call_forever():
    while True:
        try:
            client.compute(np.ones(4))
            calls[0] += 1
        except Exception:
            pass

for _ in range(4):
    threading.Thread(target=call_forever, daemon=True).start()
while calls[0] < 50:
    time.sleep(0.01)
print("exiting with calls in flight", "torch" in sys.modules, flush=True)
"""


def test_the_interpreter_exits_cleanly_with_calls_in_flight() -> None:
    """A script that ends while its server serves and its client calls (neither
    closed): the server's C workers see the interpreter exiting (the atexit flag of
    slpy_is_finalizing) and stop calling into Python; the process exits at once with
    status 0, no crash and no hang. The calling threads send NumPy arrays: a daemon
    thread that frees a torch tensor while the interpreter finalizes aborts the
    process inside torch itself (THPVariable_clear retakes the GIL and CPython ends
    the thread by unwinding through C++ frames: "terminate called without an active
    exception"), whatever library it uses."""
    import subprocess

    from conftest import PYTHON, subprocess_env

    for _ in range(3):
        done = subprocess.run([PYTHON, "-c", EXIT_WITH_CALLS_IN_FLIGHT], env=subprocess_env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "exiting with calls in flight" in done.stdout
        assert "Fatal Python error" not in done.stderr
