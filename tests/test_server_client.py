"""Server and client behaviour: lifecycle, errors, threads and the GIL, signals."""
from __future__ import annotations

import signal
import subprocess
import textwrap
import threading
import time

import grpc
import pytest

import splitlearn_comm as slc
from conftest import Echo, NEEDS_TORCH, PYTHON, subprocess_env

torch = pytest.importorskip("torch", reason=NEEDS_TORCH)


class Raising(slc.ComputeFunction):
    def compute(self, input_tensor):
        if input_tensor.numel() == 3:
            raise ValueError("three elements are not allowed")
        return input_tensor + 1


def test_compute_error_is_internal_and_server_keeps_serving(serve, connect):
    client = connect(serve(Raising()))
    with pytest.raises(grpc.RpcError) as info:
        client.compute(torch.zeros(3))
    err = info.value
    assert isinstance(err, slc.RpcError)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "ValueError: three elements are not allowed" in err.details()
    assert "Compute" in str(err) and "1 attempt" in str(err)
    assert torch.equal(client.compute(torch.zeros(2)), torch.ones(2))


def test_compute_returning_something_unsendable_is_internal(serve, connect):
    class Bad(slc.ComputeFunction):
        def compute(self, input_tensor):
            return {"fine": input_tensor, "not sendable": object()}

    client = connect(serve(Bad()))
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.zeros(2))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "cannot send a object at 'not sendable'" in info.value.details()


def test_compute_may_return_numpy_or_scalars(serve, connect):
    class Sum(slc.ComputeFunction):
        def compute(self, input_tensor):
            return input_tensor.sum().item()

    client = connect(serve(Sum()))
    assert client.compute(torch.ones(4)).item() == 4.0


def test_unavailable_fails_within_timeout():
    client = slc.GRPCComputeClient("127.0.0.1:1", timeout=2.0, retry_strategy=None)
    t0 = time.monotonic()
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(2))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 < 2.0
    assert not client.health_check(timeout=1.0)
    client.close()


def test_default_retries_are_bounded_by_the_timeout():
    client = slc.GRPCComputeClient("127.0.0.1:1", timeout=1.5,
                                   retry_strategy=slc.ExponentialBackoff(initial_delay=0.1))
    t0 = time.monotonic()
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(2))
    elapsed = time.monotonic() - t0
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.attempts == 4  # 1 + max_retries, delays 0.1, 0.2, 0.4 (+-25%)
    assert elapsed < 1.5
    client.close()


def test_python_retry_strategy_sees_rpc_errors(serve, connect):
    seen = []

    class Recording(slc.RetryStrategy):
        def execute(self, func, *args, **kwargs):
            try:
                return func(*args, **kwargs)
            except grpc.RpcError as e:
                seen.append(e.code())
                raise

    client = connect(serve(Raising()), retry_strategy=Recording())
    assert torch.equal(client.compute(torch.zeros(1)), torch.ones(1))
    with pytest.raises(slc.RpcError):
        client.compute(torch.zeros(3))
    assert seen == [grpc.StatusCode.INTERNAL]


def test_deadline_exceeded(serve, connect):
    class Slow(slc.ComputeFunction):
        def compute(self, input_tensor):
            time.sleep(1.0)
            return input_tensor

    client = connect(serve(Slow()), timeout=0.2)
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_four_workers_run_compute_at_once(serve, connect):
    """max_workers=4: four calls are inside compute() at the same time (counted)."""
    lock = threading.Lock()
    state = {"inside": 0, "max": 0}
    barrier = threading.Barrier(4, timeout=20)

    class Blocking(slc.ComputeFunction):
        def compute(self, input_tensor):
            with lock:
                state["inside"] += 1
                state["max"] = max(state["max"], state["inside"])
            try:
                barrier.wait()  # blocks without the GIL until four are inside
                time.sleep(0.05)
            finally:
                with lock:
                    state["inside"] -= 1
            return input_tensor

    server = serve(Blocking(), max_workers=4)
    client = connect(server)
    results = []

    def call(i: int) -> None:
        results.append(torch.equal(client.compute(torch.full((8,), float(i))),
                                   torch.full((8,), float(i))))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [True] * 8
    assert state["max"] == 4


def test_client_shared_between_threads(echo_client):
    errors = []

    def worker(seed: int) -> None:
        for i in range(20):
            x = torch.full((64, seed + 1), float(seed * 100 + i))
            if not torch.equal(echo_client.compute(x), x):
                errors.append((seed, i))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    stats = echo_client.get_statistics()
    assert stats["total_requests"] == stats["successful_requests"] == 160
    assert stats["failed_requests"] == 0
    assert stats["avg_total_time_ms"] >= stats["avg_compute_time_ms"] >= 0


def test_setup_and_teardown_run_once_in_order(connect):
    events = []

    class Tracked(slc.ComputeFunction):
        def setup(self):
            events.append("setup")

        def compute(self, input_tensor):
            events.append("compute")
            return input_tensor

        def teardown(self):
            events.append("teardown")

    server = slc.GRPCComputeServer(Tracked(), host="127.0.0.1", port=0)
    assert events == []
    with server:
        connect(server).compute(torch.ones(1))
    server.stop()
    assert events == ["setup", "compute", "teardown"]
    assert server.wait_for_termination(timeout=1)


def test_service_info_and_health(serve, connect):
    class Described(slc.ComputeFunction):
        device = "cpu"

        def compute(self, input_tensor):
            return input_tensor

        def get_info(self):
            return {"name": "Described", "layers": 3}

    server = serve(Described(), version="2.5.0")
    client = connect(server)
    assert client.health_check()
    client.compute(torch.ones(1))
    info = client.get_service_info()
    assert info["version"] == "2.5.0"
    assert info["device"] == "cpu"
    assert info["custom_info"] == {"name": "Described", "layers": "3"}
    assert info["total_requests"] == 1
    assert info["uptime_seconds"] >= 0


def test_model_compute_function_matches_local_model(serve, connect):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    fn = slc.ModelComputeFunction(model, model_name="mlp-head")
    client = connect(serve(fn))
    x = torch.randn(8, 16)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(client.compute(x), expected, atol=0, rtol=0)
    info = client.get_service_info()["custom_info"]
    assert info["name"] == "mlp-head" and info["parameters"] == str(16 * 32 + 32 + 32 * 4 + 4)


def test_several_servers_in_one_process(serve, connect):
    class Add(slc.ComputeFunction):
        def __init__(self, k):
            self.k = k

        def compute(self, input_tensor):
            return input_tensor + self.k

    servers = [serve(Add(k)) for k in range(3)]
    clients = [connect(s) for s in servers]
    assert len({s.port for s in servers}) == 3
    servers[1].stop(grace=0)
    assert servers[1].wait_for_termination(timeout=5)
    for k in (0, 2):
        assert clients[k].compute(torch.zeros(1)).item() == k
    with pytest.raises(slc.RpcError) as info:
        clients[1].compute(torch.zeros(1))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_busy_port_is_an_error(serve):
    server = serve(Echo())
    other = slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=server.port)
    with pytest.raises(OSError, match="could not bind"):
        other.start()


def test_bad_options_are_type_errors():
    with pytest.raises(TypeError, match="grpc.max_receive_message_length"):
        slc.GRPCComputeServer(Echo(), port=0,
                              options=[("grpc.max_receive_message_length", 1.5)]).start()
    with pytest.raises(TypeError):
        slc.GRPCComputeClient("127.0.0.1:1", options=[("grpc.keepalive_time_ms", None)])


def test_guide_options_are_accepted(serve, connect):
    options = [
        ("grpc.max_send_message_length", 100 * 1024 * 1024),
        ("grpc.max_receive_message_length", 100 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 30000),
        ("grpc.keepalive_timeout_ms", 10000),
        ("grpc.keepalive_permit_without_calls", True),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    client = connect(serve(Echo(), options=options), options=options)
    assert torch.equal(client.compute(torch.ones(3)), torch.ones(3))


def test_lowered_receive_limit_gives_resource_exhausted(serve, connect):
    server = serve(Echo(), options=[("grpc.max_receive_message_length", 1024)])
    client = connect(server)
    assert client.compute(torch.ones(16)).shape == (16,)
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(1024))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_call_context_inside_compute(serve, connect):
    seen = {}

    class Peek(slc.ComputeFunction):
        def compute(self, input_tensor):
            call = slc.current_call()
            seen.update(method=call.method, peer=call.peer, md=dict(call.metadata),
                        remaining=call.time_remaining(), active=call.is_active())
            return input_tensor

    client = connect(serve(Peek()), metadata=[("x-user", "alice")])
    client.compute(torch.ones(1), metadata={"x-trace": "t1"}, timeout=10)
    assert seen["method"] == "/splitlearn.comm.ComputeService/Compute"
    assert seen["peer"].startswith("ipv4:127.0.0.1:")
    assert seen["md"]["x-user"] == "alice" and seen["md"]["x-trace"] == "t1"
    assert 0 < seen["remaining"] <= 10.5 and seen["active"]  # gRPC rounds timeouts up
    assert slc.current_call() is None


def test_invalid_metadata_is_rejected_locally(echo_client):
    with pytest.raises(ValueError, match="metadata key"):
        echo_client.compute(torch.ones(1), metadata=[("Bad Key", "x")])


def test_closed_client_raises(echo_client):
    echo_client.close()
    with pytest.raises(ValueError, match="closed"):
        echo_client.compute(torch.ones(1))


@pytest.mark.timeout(60)
def test_close_while_a_blocking_call_is_in_flight(serve):
    """close() on one thread while another waits in compute(): the call ends
    CANCELLED, saying so, and nothing is used after it is freed (the ASan run of
    the suite checks that part)."""
    entered, release = threading.Event(), threading.Event()

    class Held(slc.ComputeFunction):
        def compute(self, x):
            entered.set()
            release.wait(30)
            return x

    server = serve(Held(), max_workers=2)
    client = slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None, timeout=30)
    outcome = []

    def call():
        try:
            outcome.append(client.compute(torch.ones(4)))
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
    with pytest.raises(ValueError, match="closed"):
        client.compute(torch.ones(1))


SIGINT_SERVER = textwrap.dedent("""
    import splitlearn_comm as slc

    class Echo(slc.ComputeFunction):
        def compute(self, x):
            return x

    server = slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=0)
    server.start()
    try:
        print("ready", server.port, flush=True)
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=1)
        print("interrupted", flush=True)
""")


def test_ctrl_c_ends_wait_for_termination():
    proc = subprocess.Popen([PYTHON, "-c", SIGINT_SERVER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), proc.stderr.read()
        port = int(line.split()[1])
        with slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None) as client:
            assert client.health_check(timeout=10)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "interrupted" in out
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("address", ["", "  ", "127.0.0.1:99999", "127.0.0.1:0", "localhost"])
def test_bad_addresses_are_value_errors(address):
    with pytest.raises(ValueError, match="server_address"):
        slc.GRPCComputeClient(address)


def test_each_call_sees_its_own_peer_and_metadata(serve, connect):
    """The server reuses the last call's method, peer and metadata objects while
    their text is the same (server_py.c, last_*): calls that alternate between two
    connections, and between metadata that differ in one value or one binary
    byte, still see their own."""
    seen = []

    class Recorder(slc.ComputeFunction):
        def compute(self, input_tensor):
            call = slc.current_call()
            seen.append((call.peer, dict(call.metadata).get("x-who"),
                         dict(call.metadata).get("x-raw-bin"), call.method))
            return input_tensor

    server = serve(Recorder(), max_workers=2)
    a = connect(server, metadata=[("x-who", "a"), ("x-raw-bin", b"\x00\x01")])
    # its own subchannel pool: its own connection (channels of one process share one)
    b = connect(server, metadata=[("x-who", "b"), ("x-raw-bin", b"\x00\x02")],
                options=[("grpc.use_local_subchannel_pool", 1)])
    expected = []
    clients = ((a, "a", b"\x00\x01"), (b, "b", b"\x00\x02"))
    for i in range(6):  # consecutive calls with as many metadata entries, one differing
        for client, who, raw in clients:
            client.compute(torch.ones(1))
            expected.append((who, raw))
        for client, who, raw in clients:
            client.compute(torch.ones(1), metadata=[("x-who", f"{who}{i % 2}")])
            expected.append((f"{who}{i % 2}", raw))
    assert [(w, r) for _, w, r, _ in seen] == expected
    peers = ({p for p, w, _, _ in seen if w[0] == "a"},
             {p for p, w, _, _ in seen if w[0] == "b"})
    assert len(peers[0]) == 1 and len(peers[1]) == 1 and peers[0] != peers[1]
    assert {m for *_, m in seen} == {"/splitlearn.comm.ComputeService/Compute"}
