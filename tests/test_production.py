"""Running a server for real: options, interceptors, authentication, TLS, health,
graceful stop, signals, the low-level stub."""
from __future__ import annotations

import logging
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict

import grpc
import pytest

import splitlearn_comm as slc
from splitlearn_comm.protocol import ComputeRequest

from conftest import Echo, NEEDS_TORCH, PYTHON, subprocess_env

torch = pytest.importorskip("torch", reason=NEEDS_TORCH)


# -- interceptors: the user's guide's, unchanged ------------------------------------

class LoggingInterceptor(grpc.ServerInterceptor):
    """记录所有 RPC 调用。"""

    def __init__(self):
        self.logger = logging.getLogger(__name__)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        self.logger.info(f"RPC call: {method}")
        return continuation(handler_call_details)


class AuthInterceptor(grpc.ServerInterceptor):
    """需要认证令牌。"""

    def __init__(self, valid_tokens):
        self.valid_tokens = valid_tokens

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata)
        token = metadata.get('authorization', '')
        if token not in self.valid_tokens:
            return grpc.unary_unary_rpc_method_handler(
                lambda request, context: context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    'Invalid token'
                )
            )
        return continuation(handler_call_details)


def test_guide_interceptors_run_in_order_for_every_call(serve, connect, caplog):
    order = []

    class Recording(grpc.ServerInterceptor):
        def __init__(self, name):
            self.name = name

        def intercept_service(self, continuation, handler_call_details):
            order.append((self.name, handler_call_details.method))
            return continuation(handler_call_details)

    server = serve(Echo(), interceptors=[Recording("a"), LoggingInterceptor(), Recording("b")])
    client = connect(server)
    with caplog.at_level(logging.INFO, logger=__name__):
        client.compute(torch.ones(2))
        assert client.health_check()
    compute = "/splitlearn.comm.ComputeService/Compute"
    health = "/splitlearn.comm.ComputeService/HealthCheck"
    assert order == [("a", compute), ("b", compute), ("a", health), ("b", health)]
    assert f"RPC call: {compute}" in caplog.text


def test_guide_auth_interceptor(serve, connect):
    server = serve(Echo(), interceptors=[AuthInterceptor({"secret-token"})])
    anonymous = connect(server)
    with pytest.raises(slc.RpcError) as info:
        anonymous.compute(torch.ones(2))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == "Invalid token"
    authorized = connect(server, metadata=[("authorization", "secret-token")])
    assert torch.equal(authorized.compute(torch.ones(2)), torch.ones(2))
    # and per call, through the low-level stub, as the guide does
    request = ComputeRequest(data=torch.ones(3).numpy().tobytes(), shape=[3])
    reply = anonymous.stub.Compute(request, metadata=[("authorization", "secret-token")], timeout=5)
    assert reply.shape == [3] and reply.data == request.data


def test_interceptor_with_set_code_and_context_accessors(serve, connect):
    seen: Dict[str, object] = {}

    class Deny(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            def handler(request, context):
                seen.update(peer=context.peer(), md=dict(context.invocation_metadata()),
                            remaining=context.time_remaining(), active=context.is_active())
                context.set_code(grpc.StatusCode.PERMISSION_DENIED)
                context.set_details("not for you")

            return grpc.unary_unary_rpc_method_handler(handler)

    client = connect(serve(Echo(), interceptors=[Deny()]), metadata=[("user", "bob")])
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(1), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "not for you"
    assert seen["peer"].startswith("ipv4:127.0.0.1") and seen["md"]["user"] == "bob"
    assert 0 < seen["remaining"] <= 10.5 and seen["active"]


def test_current_call_inside_interceptors(serve, connect):
    seen = []

    class Peek(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            seen.append(slc.current_call().method)
            return continuation(details)

    connect(serve(Echo(), interceptors=[Peek()])).compute(torch.ones(1))
    assert seen == ["/splitlearn.comm.ComputeService/Compute"]


def test_interceptor_that_raises_is_a_status_not_a_crash(serve, connect):
    class Broken(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            raise KeyError("oops")

    server = serve(Echo(), interceptors=[Broken()])
    with pytest.raises(slc.RpcError) as info:
        connect(server).compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.INTERNAL and "KeyError" in info.value.details()


# -- built-in authentication (in C) -----------------------------------------------------

def test_auth_tokens(serve, connect):
    server = serve(Echo(), auth_tokens=["t0k3n", "second"])
    for md, ok in [(None, False), ([("authorization", "wrong")], False),
                   ([("authorization", "t0k3")], False), ([("authorization", "t0k3n!")], False),
                   ([("authorization", "t0k3n")], True), ([("authorization", "second")], True)]:
        client = connect(server, metadata=md)
        if ok:
            assert torch.equal(client.compute(torch.ones(2)), torch.ones(2))
        else:
            with pytest.raises(slc.RpcError) as info:
                client.compute(torch.ones(2))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # per-call metadata works too, and the standard health check stays open
    client = connect(server)
    assert client.compute(torch.ones(1), metadata=[("authorization", "second")]).numel() == 1
    assert client._live().std_health(timeout=5) == 1


# -- TLS --------------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)


def _signed(d: Path, name: str, ca: str, san: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
             cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA with a server and a client certificate, and an unrelated CA with a client."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _signed(d, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    _signed(d, "client", "ca", "DNS:client")
    _signed(d, "rogue", "rogue-ca", "DNS:rogue")
    return d


def test_tls(serve, connect, pki):
    tls = slc.ServerTLS(pki / "server.crt", pki / "server.key")
    server = serve(Echo(), tls=tls)
    client = connect(server, tls=slc.ClientTLS(root_certs=(pki / "ca.crt").read_bytes()))
    assert torch.equal(client.compute(torch.arange(4.0)), torch.arange(4.0))
    plaintext = connect(server, timeout=5)
    with pytest.raises(slc.RpcError) as info:
        plaintext.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    untrusting = connect(server, timeout=5, tls=slc.ClientTLS(root_certs=pki / "rogue-ca.crt"))
    with pytest.raises(slc.RpcError) as info:
        untrusting.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(serve, connect, pki):
    tls = slc.ServerTLS(pki / "server.crt", pki / "server.key", root_certs=pki / "ca.crt",
                        require_client_auth=True)
    server = serve(Echo(), tls=tls)
    trusted = connect(server, tls=slc.ClientTLS(pki / "ca.crt", pki / "client.crt",
                                                pki / "client.key"))
    assert trusted.compute(torch.ones(3)).shape == (3,)
    for cert in (None, "rogue"):
        tls_c = slc.ClientTLS(pki / "ca.crt", *(() if cert is None else
                                                (pki / f"{cert}.crt", pki / f"{cert}.key")))
        with pytest.raises(slc.RpcError) as info:
            connect(server, timeout=5, tls=tls_c).compute(torch.ones(1))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_are_checked():
    with pytest.raises(ValueError, match="PEM"):
        slc.ServerTLS(b"not a cert", b"not a key")
    with pytest.raises(ValueError, match="root_certs"):
        slc.ServerTLS(b"-----BEGIN X", b"-----BEGIN Y", require_client_auth=True)
    with pytest.raises(ValueError, match="private key"):
        slc.ClientTLS(cert_chain=b"-----BEGIN X")


# -- health and graceful stop -------------------------------------------------------------

class Gate(slc.ComputeFunction):
    """compute() waits until released; counts teardowns."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.teardowns = 0

    def compute(self, x):
        self.entered.set()
        self.release.wait(30)
        return x

    def teardown(self):
        self.teardowns += 1


def test_graceful_stop_drains_in_flight_calls(connect):
    fn = Gate()
    server = slc.GRPCComputeServer(fn, host="127.0.0.1", port=0, max_workers=2).start()
    client = connect(server)
    probe = connect(server)
    results = []
    caller = threading.Thread(target=lambda: results.append(client.compute(torch.ones(2))))
    caller.start()
    assert fn.entered.wait(10)
    assert probe._live().std_health(timeout=5) == 1
    stopper = threading.Thread(target=server.stop, args=(10.0,))
    stopper.start()
    deadline = time.monotonic() + 10
    while server.serving and time.monotonic() < deadline:
        time.sleep(0.01)
    # draining: health says NOT_SERVING, new calls are refused, the old one continues
    assert probe._live().std_health(timeout=5) == 2
    assert not probe.health_check()
    with pytest.raises(slc.RpcError) as info:
        probe.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    fn.release.set()
    caller.join(10)
    stopper.join(10)
    assert results and torch.equal(results[0], torch.ones(2))
    assert fn.teardowns == 1
    assert server.wait_for_termination(timeout=5)
    server.stop()
    assert fn.teardowns == 1


def test_stop_cancels_calls_that_outlast_the_grace(connect):
    fn = Gate()
    server = slc.GRPCComputeServer(fn, host="127.0.0.1", port=0).start()
    client = connect(server)
    errors = []

    def call():
        try:
            client.compute(torch.ones(1))
        except slc.RpcError as e:
            errors.append(e.code())

    caller = threading.Thread(target=call)
    caller.start()
    assert fn.entered.wait(10)
    t0 = time.monotonic()
    stopper = threading.Thread(target=server.stop, args=(0.3,))
    stopper.start()
    caller.join(10)
    assert errors == [grpc.StatusCode.CANCELLED] or errors == [grpc.StatusCode.UNAVAILABLE]
    assert time.monotonic() - t0 < 5
    fn.release.set()  # the worker finishes its compute(); stop() then returns
    stopper.join(10)
    assert not stopper.is_alive() and fn.teardowns == 1


STOP_RACE = textwrap.dedent("""
    import sys, threading
    import torch
    import splitlearn_comm as slc

    class Echo(slc.ComputeFunction):
        def compute(self, x):
            return x

    for round in range(int(sys.argv[1])):
        server = slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=0, max_workers=4).start()
        clients = [slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None)
                   for _ in range(4)]
        calls = threading.Semaphore(0)

        def loop(client):
            x = torch.ones(16)
            try:
                while True:
                    client.compute(x, timeout=10)
                    calls.release()
            except (slc.RpcError, ValueError):  # the server stopped, or the client closed
                pass

        threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        for _ in range(20):  # calls flowing on every worker
            calls.acquire(timeout=30)
        server.stop(grace=0)  # workers finishing calls ask for their next one meanwhile
        for c in clients:
            c.close()
        for t in threads:
            t.join(30)
    print("done", flush=True)
""")


def test_stop_never_hangs_while_workers_finish_calls(tmp_path):
    """stop() while every worker is busy: a worker that finishes its call asks gRPC
    for the next one while gRPC shuts down, which gRPC could miss (the request then
    never completes and stop() would join that worker forever); workers ask no more
    once the shutdown has begun. Many rounds in a child process, bounded in time."""
    script = tmp_path / "stop_race.py"
    script.write_text(STOP_RACE)
    out = subprocess.run([PYTHON, str(script), "30"], capture_output=True, text=True,
                         timeout=240, env=subprocess_env())
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]


SIGNAL_SERVER = textwrap.dedent("""
    import splitlearn_comm as slc

    class Echo(slc.ComputeFunction):
        def compute(self, x):
            return x

        def teardown(self):
            print("teardown", flush=True)

    server = slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=0, handle_signals=True)
    server.start()
    print("ready", server.port, flush=True)
    server.wait_for_termination()
    import signal
    restored = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    print("stopped" if restored else "handlers-not-restored", flush=True)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_handle_signals(sig):
    proc = subprocess.Popen([PYTHON, "-c", SIGNAL_SERVER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), proc.stderr.read()
        with slc.GRPCComputeClient(f"127.0.0.1:{line.split()[1]}", retry_strategy=None) as c:
            assert c.health_check(timeout=10)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert out.split() == ["teardown", "stopped"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


STOCK_HEALTH_CLIENT = textwrap.dedent("""
    import sys
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(sys.argv[1]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
""")


def test_stock_grpcio_health_client(serve):
    """grpcio-health-checking's own client (in a child process: its generated
    module and the interop tests' share one protobuf descriptor pool)."""
    server = serve(Echo())
    out = subprocess.run([PYTHON, "-c", STOCK_HEALTH_CLIENT, f"127.0.0.1:{server.port}"],
                         capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SERVING"


def test_trailing_metadata_from_compute_and_interceptors(serve, connect):
    class Tagged(slc.ComputeFunction):
        def compute(self, x):
            call = slc.current_call()
            call.set_trailing_metadata([("x-model-version", "7")])
            if x.numel() == 1:
                call.abort(grpc.StatusCode.FAILED_PRECONDITION, "warming up")
            return x

    class Deny(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            if dict(details.invocation_metadata).get("who") != "me":
                def handler(request, context):
                    context.set_trailing_metadata([("retry-after", "5")])
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, "not you")
                return grpc.unary_unary_rpc_method_handler(handler)
            return continuation(details)

    server = serve(Tagged(), interceptors=[Deny()])
    me = connect(server, metadata=[("who", "me")])
    assert torch.equal(me.compute(torch.ones(2)), torch.ones(2))
    with pytest.raises(slc.RpcError) as info:
        me.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("x-model-version", "7") in info.value.trailing_metadata()
    with pytest.raises(slc.RpcError) as info:
        connect(server).compute(torch.ones(2))
    assert ("retry-after", "5") in info.value.trailing_metadata()
