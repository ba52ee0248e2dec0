"""Replicas behind gRPC's own load balancing (docs/scaling.md): client targets,
grpc.health.v1 Watch, client-side health checking, a replica killed under load,
and affinity for stateful calls. The replica tests run 3 real server processes
on 127.0.0.1."""
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from conftest import NEEDS_TORCH

torch = pytest.importorskip("torch", reason=NEEDS_TORCH)

from splitlearn_comm import (ComputeFunction, ExponentialBackoff, GRPCComputeClient,
                             GRPCComputeServer, TrainableComputeFunction, current_call)
from splitlearn_comm import balancing

HERE = os.path.dirname(os.path.abspath(__file__))
REPLICA = os.path.join(HERE, "_replica.py")


# -- helpers ---------------------------------------------------------------------------


class Replica:
    """A server process from tests/_replica.py; answers tensors filled with its index."""

    def __init__(self, index: int, port: int = 0, delay: float = 0.0) -> None:
        self.index = index
        self.delay = delay
        self.port = port
        self.proc = None
        self._lines: "queue.Queue[str]" = queue.Queue()
        self.start()

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, REPLICA, str(self.port), str(self.index), str(self.delay)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self._lines), daemon=True).start()
        line = self._line(60)
        assert line.startswith("PORT "), line
        self.port = int(line.split()[1])

    @staticmethod
    def _read(proc: subprocess.Popen, lines: "queue.Queue[str]") -> None:
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put("EOF")

    def _line(self, timeout: float) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"replica {self.index} said nothing for {timeout} s") from None

    def command(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        assert self._line(30) == "OK"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def total_requests(self) -> int:
        with GRPCComputeClient(self.address, timeout=10, retry_strategy=None) as c:
            return int(c.get_service_info()["total_requests"])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(30)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


@pytest.fixture
def replicas():
    started = []
    try:
        for i in range(3):
            started.append(Replica(i, delay=0.002))
        yield started
    finally:
        for r in started:
            r.close()


def which(client: GRPCComputeClient) -> int:
    """Make one call; the index of the replica that answered."""
    return int(client.compute(torch.zeros(4))[0])


def fast_retries() -> ExponentialBackoff:
    return ExponentialBackoff(max_retries=6, initial_delay=0.05, max_delay=0.5)


# Reconnect to a replica that went away within about a second (gRPC's default
# reconnect backoff grows to 120 s).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 200),
                  ("grpc.min_reconnect_backoff_ms", 200),
                  ("grpc.max_reconnect_backoff_ms", 1000)]


class Echo(ComputeFunction):
    def compute(self, x):
        return x


# -- targets and policies --------------------------------------------------------------


def test_list_of_ip_addresses_is_one_ipv4_target():
    target, replicas, named = balancing.multi_target(["10.0.0.1:50051", "10.0.0.2:50052"])
    assert target == "ipv4:10.0.0.1:50051,10.0.0.2:50052"
    assert replicas == ["10.0.0.1:50051", "10.0.0.2:50052"] and not named


def test_ipv6_and_mixed_lists_use_the_ipv6_syntax():
    target, replicas, _ = balancing.multi_target(["[::1]:1", "127.0.0.1:2"])
    assert target == "ipv6:[::1]:1,[::ffff:7f00:1]:2"  # 127.0.0.1, IPv4-mapped
    assert replicas == ["[::1]:1", "127.0.0.1:2"]


def test_host_names_in_a_list_are_resolved():
    target, replicas, named = balancing.multi_target(["localhost:7001"])
    assert named and target.startswith(("ipv4:", "ipv6:")) and replicas
    assert all(r.endswith(":7001") for r in replicas)


@pytest.mark.parametrize("bad", [[], ["nope"], ["h:0"], ["h:70000"], ["a:1", 5], ["a b:1"]])
def test_bad_replica_lists_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        GRPCComputeClient(bad)


def test_policy_defaults_and_choices():
    with GRPCComputeClient("127.0.0.1:1") as c:
        assert c.load_balancing == "pick_first"
        assert all(k != "grpc.service_config" for k, _ in c._extra_options)
    with GRPCComputeClient(["127.0.0.1:1", "127.0.0.1:2"]) as c:
        assert c.load_balancing == "round_robin" and c.replicas() == ["127.0.0.1:1",
                                                                      "127.0.0.1:2"]
        config = dict(c._extra_options)["grpc.service_config"]
        assert '"round_robin"' in config and '"healthCheckConfig"' in config
    with GRPCComputeClient("dns:///localhost:1") as c:
        assert c.load_balancing == "round_robin" and c.replicas()
    with GRPCComputeClient(["127.0.0.1:1", "127.0.0.1:2"], load_balancing="pick_first") as c:
        assert c.load_balancing == "pick_first"
    with pytest.raises(ValueError, match="load_balancing must be one of"):
        GRPCComputeClient("127.0.0.1:1", load_balancing="random")
    with pytest.raises(ValueError, match="not both"):
        GRPCComputeClient("127.0.0.1:1", load_balancing="round_robin",
                          options=[("grpc.service_config", "{}")])


def test_pinned_clients_are_stable_and_owned():
    c = GRPCComputeClient(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    a, b = c.pinned("session-a"), c.pinned("session-a")
    assert a is b and a.server_address in c.replicas() and a.load_balancing == "pick_first"
    assert {c.pinned().server_address for _ in range(3)} == set(c.replicas())
    assert a.client_id == c.client_id
    c.close()
    with pytest.raises(ValueError, match="closed"):
        a.compute(torch.zeros(1))
    one = GRPCComputeClient("127.0.0.1:1")
    assert one.pinned("x") is one
    one.close()


# -- grpc.health.v1 Watch --------------------------------------------------------------


def _watch(channel: grpc.Channel, service: bytes = b""):
    method = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                  request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
    request = b"\x0a" + bytes([len(service)]) + service if service else b""
    return method(request, timeout=30)


SERVING, NOT_SERVING, SERVICE_UNKNOWN = b"\x08\x01", b"\x08\x02", b"\x08\x03"


def test_watch_streams_the_status_and_ends_when_the_server_stops():
    server = GRPCComputeServer(Echo(), host="127.0.0.1", port=0).start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stream = _watch(ch)
        assert next(stream) == SERVING
        named = _watch(ch, b"splitlearn.comm.ComputeService")
        assert next(named) == SERVING
        unknown = _watch(ch, b"no.such.Service")
        assert next(unknown) == SERVICE_UNKNOWN
        live = _watch(ch, b"liveness")
        assert next(live) == SERVING
        assert server._core.health_watchers == 4
        server.set_health(False)
        assert server.health == "NOT_SERVING"
        assert next(stream) == NOT_SERVING and next(named) == NOT_SERVING
        # Check agrees, and calls that still come are served; "liveness" stays SERVING
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        assert check(b"", timeout=10) == NOT_SERVING
        assert check(b"\x0a\x08liveness", timeout=10) == SERVING
        with GRPCComputeClient(f"127.0.0.1:{server.port}") as c:
            assert c.compute(torch.ones(2)).tolist() == [1.0, 1.0]
            assert not c.health_check()
        server.set_health(True)
        assert next(stream) == SERVING and server.health == "SERVING"
        server.set_health(False)
        assert next(stream) == NOT_SERVING
        server.set_health(True)
        assert next(stream) == SERVING
        server.stop(5.0)
        # a stopping server says NOT_SERVING, then ends the stream
        assert next(stream) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server._core.health_watchers == 0
    with pytest.raises(RuntimeError, match="not running"):
        server.set_health(True)


def test_a_cancelled_watch_is_released():
    server = GRPCComputeServer(Echo(), host="127.0.0.1", port=0).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stream = _watch(ch)
            assert next(stream) == SERVING
            stream.cancel()
            deadline = time.monotonic() + 20
            while server._core.health_watchers and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server._core.health_watchers == 0
            assert next(_watch(ch)) == SERVING  # still serving streams
    finally:
        server.stop(1.0)


def test_malformed_watch_request_is_invalid_argument():
    server = GRPCComputeServer(Echo(), host="127.0.0.1", port=0).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            method = ch.unary_stream("/grpc.health.v1.Health/Watch")
            with pytest.raises(grpc.RpcError) as e:
                next(method(b"\xff\xff\xff", timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert next(_watch(ch)) == SERVING
    finally:
        server.stop(1.0)


# -- three replica processes -----------------------------------------------------------


@pytest.mark.timeout(300)
def test_calls_spread_over_three_replicas(replicas):
    with GRPCComputeClient([r.address for r in replicas], timeout=30) as client:
        seen = [which(client) for _ in range(300)]
    counts = [r.total_requests() for r in replicas]
    assert sum(counts) == 300 and [seen.count(i) for i in range(3)] == counts
    assert min(counts) > 0 and max(counts) <= 2 * min(counts), counts


@pytest.mark.timeout(300)
def test_a_not_serving_replica_gets_no_new_calls(replicas):
    with GRPCComputeClient([r.address for r in replicas], timeout=30) as client:
        assert {which(client) for _ in range(30)} == {0, 1, 2}
        replicas[1].command("not_serving")
        # the client learns it over Watch: wait until 30 calls in a row avoid it
        deadline, streak = time.monotonic() + 30, 0
        while streak < 30:
            assert time.monotonic() < deadline, "replica 1 kept getting calls"
            streak = streak + 1 if which(client) != 1 else 0
        before = replicas[1].total_requests()
        seen = [which(client) for _ in range(300)]
        assert 1 not in seen and {0, 2} <= set(seen)
        assert replicas[1].total_requests() == before
        replicas[1].command("serving")
        deadline = time.monotonic() + 30
        while which(client) != 1:
            assert time.monotonic() < deadline, "replica 1 got no calls once SERVING again"


@pytest.mark.timeout(300)
def test_sigkill_of_a_replica_under_load_fails_no_call(replicas):
    timeout = 20.0
    client = GRPCComputeClient([r.address for r in replicas], timeout=timeout,
                               retry_strategy=fast_retries(), options=FAST_RECONNECT)
    done, failures, slow, lock = [], [], [], threading.Lock()
    killed = threading.Event()

    def worker(n: int) -> None:
        for _ in range(n):
            t0 = time.monotonic()
            try:
                index = which(client)
            except Exception as e:  # noqa: BLE001 - every failure is a test failure
                with lock:
                    failures.append(repr(e))
                continue
            elapsed = time.monotonic() - t0
            with lock:
                done.append((index, killed.is_set()))
                if elapsed > timeout:
                    slow.append(elapsed)

    threads = [threading.Thread(target=worker, args=(250,)) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(done) < 400 and not failures and time.monotonic() < deadline:
        time.sleep(0.01)
    replicas[2].kill()
    killed.set()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert failures == [] and slow == []
    assert len(done) == 2000
    assert any(i == 2 for i, after in done if not after)   # it did take calls before
    # restarted on its port, it gets calls again
    replicas[2].start()
    deadline = time.monotonic() + 60
    while which(client) != 2:
        assert time.monotonic() < deadline, "the restarted replica got no calls"
    client.close()


# -- affinity for stateful calls -------------------------------------------------------


def test_training_through_a_balancing_client_is_pinned_to_one_replica():
    torch.manual_seed(0)
    fns = [TrainableComputeFunction(torch.nn.Linear(4, 2),
                                    lambda p: torch.optim.SGD(p, lr=0.1)) for _ in range(2)]
    servers = [GRPCComputeServer(f, host="127.0.0.1", port=0).start() for f in fns]
    try:
        client = GRPCComputeClient([f"127.0.0.1:{s.port}" for s in servers], timeout=30)
        bottom = torch.nn.Linear(3, 4)
        for _ in range(6):
            out = client.remote(bottom(torch.randn(5, 3)))
            out.pow(2).mean().backward()
        steps = [f.stats()["backward_calls"] for f in fns]
        assert sorted(steps) == [0, 6]   # every step on one replica, none failed
        with torch.no_grad():             # inference still spreads over both
            for _ in range(20):
                client.remote(torch.randn(5, 4))
        assert all(f.stats()["inference_calls"] > 0 for f in fns)
        client.close()
    finally:
        for s in servers:
            s.stop(1.0)


class Counter(ComputeFunction):
    """Counts the calls of each session in its server-side state."""

    def compute(self, x):
        state = current_call().session
        state["n"] = state.get("n", 0) + 1
        return torch.full((1,), float(state["n"]))


def test_a_session_through_a_balancing_client_stays_on_one_replica():
    """Every call of a session reaches the replica that keeps its state; several
    sessions spread over the replicas; closing the client closes them."""
    servers = [GRPCComputeServer(Counter(), host="127.0.0.1", port=0).start() for _ in range(2)]
    try:
        client = GRPCComputeClient([f"127.0.0.1:{s.port}" for s in servers], timeout=30)
        # 32 random ids: all on one replica has probability 2**-31
        sessions = [client.session() for _ in range(32)]
        for _ in range(3):
            counts = [int(s.compute(torch.zeros(1))[0]) for s in sessions]
        assert counts == [3] * 32   # no session's state was split over the replicas
        held = [srv.metrics()["sessions"]["active"] for srv in servers]
        assert sum(held) == 32 and all(h > 0 for h in held), held
        client.close()
        assert all(srv.metrics()["sessions"]["active"] == 0 for srv in servers)
    finally:
        for s in servers:
            s.stop(1.0)


def test_a_dns_target_balances_and_pins():
    server = GRPCComputeServer(Echo(), host="127.0.0.1", port=0).start()
    try:
        with GRPCComputeClient(f"dns:///localhost:{server.port}", timeout=30) as client:
            assert client.load_balancing == "round_robin"
            assert client.compute(torch.ones(2)).tolist() == [1.0, 1.0]
            assert f"127.0.0.1:{server.port}" in client.replicas()
            pin = client.pinned("k")
            assert pin is not client and pin.compute(torch.ones(2)).tolist() == [1.0, 1.0]
    finally:
        server.stop(1.0)
