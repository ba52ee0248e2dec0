"""Server-side sessions (issue 11, docs/inference.md).

Real servers and clients on 127.0.0.1, port 0. What is checked:

* every call of a session reaches the same ``current_call().session``; sessions are
  independent; calls outside a session see ``None``;
* closing (``s.close()``, the ``with`` block, ``client.close()``) frees the state
  on the server; a later call on it is FAILED_PRECONDITION naming "closed";
* a step number makes retries idempotent: the same step again (by hand, and by the
  client's own retry after an attempt timed out while the step was running) is
  answered from the record and runs once; a gap is FAILED_PRECONDITION;
* bounds: evicted for bytes (least recently used first, and a session over the
  limit on its own), for count (max_sessions), idle (session_idle_timeout), each a
  FAILED_PRECONDITION naming the reason; a session the server never had (it
  restarted) is NOT_FOUND;
* bytes are counted exactly (storages of tensors in nested containers);
* sessions and sizes in ``server.metrics()``, Prometheus and GetServiceInfo;
* several threads on one session: every step runs once, in order;
* ``s.remote()`` training in a session: forward and backward see the session;
* bad session fields are INVALID_ARGUMENT and the server keeps serving.

Every wait is bounded; nothing depends on timing margins (the idle test waits,
bounded, for the eviction it provokes).
"""
from __future__ import annotations

import threading
import time
from typing import List

import grpc
import pytest

torch = pytest.importorskip("torch")

import splitlearn_comm as slc  # noqa: E402
from splitlearn_comm import current_call  # noqa: E402
from splitlearn_comm.sessions import state_nbytes  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class Accumulate(slc.ComputeFunction):
    """Adds each input to a running sum kept in the session; counts its runs."""

    def __init__(self, gate: threading.Event = None) -> None:
        self.runs = 0
        self.seen_none = 0
        self.gate = gate
        self.started = threading.Event()
        self.lock = threading.Lock()

    def compute(self, x):
        s = current_call().session
        with self.lock:
            self.runs += 1
        if s is None:
            self.seen_none += 1
            return x
        self.started.set()
        if self.gate is not None and s.step == 1:
            assert self.gate.wait(60)
        s["sum"] = s.get("sum", torch.zeros_like(x)) + x
        s.setdefault("steps", []).append(s.step)
        return s["sum"].clone()


class Store(slc.ComputeFunction):
    """Keeps a tensor of the requested number of float32 elements in the session."""

    def compute(self, x):
        s = current_call().session
        s["blob"] = torch.zeros(int(x[0]))
        return torch.zeros(1)


def _code(e) -> grpc.StatusCode:
    return e.value.code()


def test_session_state_persists_between_calls(serve, connect) -> None:
    fn = Accumulate()
    server = serve(fn)
    client = connect(server)
    with client.session() as a, client.session() as b:
        assert a.id != b.id
        assert a.compute(torch.ones(3)).tolist() == [1, 1, 1]
        assert b.compute(torch.full((3,), 5.0)).tolist() == [5, 5, 5]
        assert a.compute(torch.ones(3)).tolist() == [2, 2, 2]
        assert a.compute(torch.ones(3)).tolist() == [3, 3, 3]
        assert b.compute(torch.ones(3)).tolist() == [6, 6, 6]
        assert (a.step, b.step) == (3, 2)
        assert server.metrics()["sessions"]["active"] == 2
    assert client.compute(torch.ones(2)).tolist() == [1, 1]
    assert fn.seen_none == 1
    m = server.metrics()["sessions"]
    assert m["active"] == 0 and m["bytes"] == 0 and m["closed"] == 2 and m["steps"] == 5


def test_closed_session_is_failed_precondition(serve, connect) -> None:
    server = serve(Accumulate())
    client = connect(server)
    s = client.session()
    s.compute(torch.ones(2))
    s.close()
    s.close()  # again: nothing
    assert s.closed
    with pytest.raises(ValueError, match="closed"):
        s.compute(torch.ones(2))
    with pytest.raises(grpc.RpcError) as e:
        client._tensor_call(torch.ones(2), session_id=s.id, session_step=2)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "was closed" in e.value.details() and s.id in e.value.details()
    assert ("sl-session-gone", "closed") in e.value.trailing_metadata()
    assert server.metrics()["sessions"]["active"] == 0


def test_client_close_closes_its_sessions(serve, connect) -> None:
    server = serve(Accumulate())
    client = connect(server)
    sessions = [client.session() for _ in range(3)]
    for s in sessions:
        s.compute(torch.ones(4))
    assert server.metrics()["sessions"]["active"] == 3
    client.close()
    m = server.metrics()["sessions"]
    assert m["active"] == 0 and m["closed"] == 3 and m["bytes"] == 0
    assert all(s.closed for s in sessions)


def test_retried_step_is_answered_from_the_record(serve, connect) -> None:
    fn = Accumulate()
    server = serve(fn)
    client = connect(server)
    sid = "retry-by-hand"
    one = client._tensor_call(torch.ones(2), session_id=sid, session_step=1)
    again = client._tensor_call(torch.full((2,), 9.0), session_id=sid, session_step=1)
    assert one.tolist() == again.tolist() == [1, 1]
    two = client._tensor_call(torch.ones(2), session_id=sid, session_step=2)
    assert two.tolist() == [2, 2]
    assert fn.runs == 2
    m = server.metrics()["sessions"]
    assert m["replayed_steps"] == 1 and m["steps"] == 2
    with pytest.raises(grpc.RpcError) as e:  # older than the latest: not kept
        client._tensor_call(torch.ones(2), session_id=sid, session_step=1)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "answered long ago" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # a gap: step 3 never came
        client._tensor_call(torch.ones(2), session_id=sid, session_step=4, timeout=20)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "out of order" in e.value.details()
    assert client._tensor_call(torch.ones(2), session_id=sid, session_step=3).tolist() == [3, 3]


class _CountCompute(grpc.ServerInterceptor):
    def __init__(self, n: int) -> None:
        self.calls = 0
        self.reached = threading.Event()
        self.n = n

    def intercept_service(self, continuation, details):
        if details.method.endswith("/Compute"):
            self.calls += 1
            if self.calls >= self.n:
                self.reached.set()
        return continuation(details)


def test_client_retry_while_the_step_runs_runs_it_once(serve, connect) -> None:
    gate = threading.Event()
    fn = Accumulate(gate)
    counter = _CountCompute(2)
    server = serve(fn, interceptors=[counter])
    client = connect(server, retry_strategy=slc.FixedDelay(max_retries=100, delay=0.02,
                                                           attempt_timeout=0.3))
    result = {}

    def call() -> None:
        try:
            with client.session() as s:
                result["out"] = s.compute(torch.ones(2))
                result["next"] = s.compute(torch.ones(2))
        except BaseException as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=call)
    t.start()
    try:
        assert counter.reached.wait(60), "the client never retried the step"
    finally:
        gate.set()
        t.join(60)
    assert not t.is_alive()
    assert "error" not in result, result
    assert result["out"].tolist() == [1, 1] and result["next"].tolist() == [2, 2]
    assert fn.runs == 2  # step 1 ran once whatever the attempts
    assert client.get_statistics()["retries"] >= 1


def test_evicted_for_bytes_least_recently_used(serve, connect) -> None:
    server = serve(Store(), max_session_bytes=10_000)
    client = connect(server)
    a, b = client.session(), client.session()
    a.compute(torch.tensor([1000.0]))  # 4000 + 4 bytes
    b.compute(torch.tensor([1000.0]))
    assert server.metrics()["sessions"]["bytes"] == 2 * 4004
    a.compute(torch.tensor([1000.0]))  # a is now the most recent
    b.compute(torch.tensor([1500.0]))  # 10008 > 10000: a goes
    m = server.metrics()["sessions"]
    assert m["evicted_bytes"] == 1 and list(m["sizes"]) == [b.id] and m["bytes"] == 6004
    with pytest.raises(grpc.RpcError) as e:
        a.compute(torch.tensor([10.0]))
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "evicted for bytes" in e.value.details() and "max_session_bytes" in e.value.details()
    assert a.lost_reason == "evicted-bytes"
    # one session over the limit on its own: its own step fails and it is gone
    with pytest.raises(grpc.RpcError) as e:
        b.compute(torch.tensor([3000.0]))
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "on its own" in e.value.details()
    assert server.metrics()["sessions"]["active"] == 0
    a.close()
    b.close()


def test_evicted_for_count(serve, connect) -> None:
    server = serve(Accumulate(), max_sessions=2)
    client = connect(server)
    s = [client.session() for _ in range(3)]
    for x in s:
        x.compute(torch.ones(1))
    m = server.metrics()["sessions"]
    assert m["active"] == 2 and m["evicted_count"] == 1 and s[0].id not in m["sizes"]
    with pytest.raises(grpc.RpcError) as e:
        s[0].compute(torch.ones(1))
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "evicted for count" in e.value.details() and "max_sessions" in e.value.details()
    assert s[1].compute(torch.ones(1)).tolist() == [2]


def test_idle_session_is_evicted(serve, connect) -> None:
    server = serve(Accumulate(), session_idle_timeout=0.2)
    client = connect(server)
    s = client.session()
    s.compute(torch.ones(1))
    deadline = time.monotonic() + 60
    while server.metrics()["sessions"]["evicted_idle"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    m = server.metrics()["sessions"]
    assert m["evicted_idle"] == 1 and m["active"] == 0 and m["bytes"] == 0
    with pytest.raises(grpc.RpcError) as e:
        s.compute(torch.ones(1))
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "idle" in e.value.details() and "session_idle_timeout" in e.value.details()
    assert s.lost_reason == "idle"


def test_server_restart_is_not_found(serve, connect) -> None:
    first = serve(Accumulate())
    port = first.port
    client = slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None,
                                   wait_for_ready=True, timeout=30)
    try:
        s = client.session()
        s.compute(torch.ones(1))
        first.stop(grace=0)
        try:
            serve(Accumulate(), port=port)
        except OSError:
            pytest.skip(f"port {port} could not be bound again")
        with pytest.raises(grpc.RpcError) as e:
            s.compute(torch.ones(1))
        assert _code(e) == grpc.StatusCode.NOT_FOUND
        assert "restarted" in e.value.details()
        assert s.lost_reason == "unknown"
    finally:
        client.close()


def test_bytes_are_counted_exactly(serve, connect) -> None:
    a = torch.zeros(10)
    assert state_nbytes({"a": a, "view": a[2:5], "nested": [(torch.zeros(3, 4),), {"x": 1}],
                         "np": __import__("numpy").zeros(8)}) == 40 + 48 + 64
    assert state_nbytes({"i8": torch.zeros(7, dtype=torch.int8)}) == 7


def test_metrics_prometheus_and_service_info(serve, connect) -> None:
    server = serve(Store())
    client = connect(server)
    assert "sessions.active" not in client.get_service_info()["custom_info"]
    with client.session() as s:
        s.compute(torch.tensor([100.0]))
        m = server.metrics()["sessions"]
        assert m["active"] == 1 and m["bytes"] == 404 and m["sizes"] == {s.id: 404}
        info = client.get_service_info()["custom_info"]
        assert info["sessions.active"] == "1" and info["sessions.bytes"] == "404"
        prometheus = pytest.importorskip("prometheus_client")
        from splitlearn_comm.monitoring import ServerMetricsCollector

        registry = prometheus.CollectorRegistry()
        registry.register(ServerMetricsCollector(server))
        text = prometheus.generate_latest(registry).decode()
        assert "splitlearn_sessions 1.0" in text
        assert "splitlearn_session_bytes 404.0" in text
        assert 'splitlearn_sessions_evicted_total{reason="bytes"} 0.0' in text
        assert "splitlearn_session_steps_total 1.0" in text


def test_threads_sharing_a_session_run_each_step_once_in_order(serve, connect) -> None:
    fn = Accumulate()
    server = serve(fn, max_workers=8)
    client = connect(server)
    s = client.session()
    outs: List[float] = []
    errors: List[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                outs.append(float(s.compute(torch.ones(1))[0]))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(outs) == [float(i) for i in range(1, 21)]
    assert fn.runs == 20
    assert server.metrics()["sessions"]["steps"] == 20
    s.close()


class SessionLinear(slc.TrainableComputeFunction):
    """A trainable layer whose forwards count themselves in the session."""

    def forward_model(self, x):
        s = current_call().session
        if s is not None:
            s["forwards"] = s.get("forwards", 0) + 1
        return self.model(x)

    def backward(self, grad_output, **kwargs):
        s = current_call().session
        s["backwards"] = s.get("backwards", 0) + 1
        self.last_session = dict(s)
        return super().backward(grad_output, **kwargs)


def test_remote_training_in_a_session(serve, connect) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    w = model.weight.detach().clone()
    fn = SessionLinear(model)
    server = serve(fn)
    client = connect(server)
    with client.session() as s:
        x = torch.randn(5, 4, requires_grad=True)
        y = s.remote(x)
        y.sum().backward()
        assert torch.allclose(x.grad, torch.ones(5, 3) @ w, atol=1e-6)
        with torch.no_grad():
            s.remote(torch.randn(2, 4))
        assert s.step == 2
    assert fn.last_session["forwards"] == 1 and fn.last_session["backwards"] == 1
    assert server.metrics()["sessions"]["steps"] == 2


def test_bad_session_fields_are_invalid_argument(serve, connect) -> None:
    server = serve(Accumulate())
    client = connect(server)
    for fields, what in (({"session_id": "x", "session_step": 0}, "session_step"),
                         ({"session_id": ""}, "session_id")):
        with pytest.raises(grpc.RpcError) as e:
            client._tensor_call(torch.ones(1), **fields)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert what in e.value.details()
    with pytest.raises(ValueError):
        client.session(session_id="")
    with client.session() as s:
        assert s.compute(torch.ones(1)).tolist() == [1]


def test_failed_step_is_replayed_as_the_same_error(serve, connect) -> None:
    class FailsOnce(slc.ComputeFunction):
        runs = 0

        def compute(self, x):
            FailsOnce.runs += 1
            if current_call().session.step == 1:
                raise RuntimeError("first step fails")
            return x

    server = serve(FailsOnce())
    client = connect(server)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as e:
            client._tensor_call(torch.ones(1), session_id="f", session_step=1)
        assert _code(e) == grpc.StatusCode.INTERNAL and "first step fails" in e.value.details()
    assert FailsOnce.runs == 1
    assert client._tensor_call(torch.ones(1), session_id="f", session_step=2).tolist() == [1]


def test_steps_arriving_out_of_order_run_in_order(serve, connect) -> None:
    """Step 2 of a new session arriving before step 1 (two threads of a peer) waits
    for it: both run, in order."""
    fn = Accumulate()
    server = serve(fn, max_workers=4)
    client = connect(server)
    result = {}

    def second() -> None:
        try:
            result["2"] = client._tensor_call(torch.ones(1), session_id="r", session_step=2)
        except BaseException as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=second)
    t.start()
    result["1"] = client._tensor_call(torch.ones(1), session_id="r", session_step=1)
    t.join(60)
    assert "error" not in result, result
    assert result["1"].tolist() == [1] and result["2"].tolist() == [2]
    assert fn.runs == 2
