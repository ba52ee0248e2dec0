"""Retries and resilience: strategies in C and in Python, the circuit breaker,
deadlines, cancellation, and faults with real processes (SIGKILL, restarts)."""
from __future__ import annotations

import signal
import socket
import subprocess
import textwrap
import threading
import time
from typing import List

import grpc
import pytest

import splitlearn_comm as slc
from conftest import Echo, NEEDS_TORCH, PYTHON, subprocess_env

torch = pytest.importorskip("torch", reason=NEEDS_TORCH)


class Flaky(slc.ComputeFunction):
    """Fails the first `failures` calls with `code`, then echoes."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE):
        self.failures = failures
        self.code = code
        self.calls = 0
        self.lock = threading.Lock()

    def compute(self, x):
        with self.lock:
            self.calls += 1
            n = self.calls
        if n <= self.failures:
            slc.current_call().abort(self.code, f"failure {n}")
        return x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- errors ------------------------------------------------------------------------------

def test_rpc_error_is_a_grpc_call_and_says_where():
    client = slc.GRPCComputeClient("127.0.0.1:1", timeout=2,
                                   retry_strategy=slc.FixedDelay(max_retries=2, delay=0.01))
    with pytest.raises(grpc.RpcError) as info:
        client.compute(torch.ones(1))
    e = info.value
    assert isinstance(e, grpc.Call) and isinstance(e, slc.RpcError)
    assert e.code() == grpc.StatusCode.UNAVAILABLE and e.attempts == 3
    assert e.details() and isinstance(e.debug_error_string(), str)
    assert e.trailing_metadata() == () and e.initial_metadata() == ()
    text = str(e)
    assert "UNAVAILABLE" in text and "127.0.0.1:1" in text and "Compute" in text
    assert "after 3 attempts" in text
    client.close()


# -- built-in strategies -------------------------------------------------------------------

@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_builtin_retries_retryable_codes(serve, connect, code):
    fn = Flaky(2, code)
    client = connect(serve(fn), retry_strategy=slc.ExponentialBackoff(initial_delay=0.01))
    assert torch.equal(client.compute(torch.ones(2)), torch.ones(2))
    assert fn.calls == 3
    assert client.get_statistics()["retries"] == 2


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED])
def test_builtin_never_retries_other_codes(serve, connect, code):
    fn = Flaky(1, code)
    client = connect(serve(fn), retry_strategy=slc.FixedDelay(max_retries=3, delay=0.01))
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(1))
    assert info.value.code() == code and info.value.attempts == 1 and fn.calls == 1


def test_compute_exception_is_not_retried(serve, connect):
    calls = []

    class Boom(slc.ComputeFunction):
        def compute(self, x):
            calls.append(1)
            raise RuntimeError("model exploded")

    client = connect(serve(Boom()), retry_strategy=slc.ExponentialBackoff(initial_delay=0.01))
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.INTERNAL and len(calls) == 1


def test_attempt_timeout_retries_slow_attempts(serve, connect):
    seen = []

    class Slow(slc.ComputeFunction):
        def compute(self, x):
            seen.append(1)
            time.sleep(0.3 if len(seen) < 3 else 0)
            return x

    client = connect(serve(Slow(), max_workers=4), timeout=10,
                     retry_strategy=slc.FixedDelay(max_retries=3, delay=0.01, attempt_timeout=0.1))
    assert torch.equal(client.compute(torch.ones(1)), torch.ones(1))
    assert len(seen) == 3


# -- Python strategies: the user's guide's, as written -------------------------------------

import logging  # noqa: E402  (the guide's imports, as it writes them)

from splitlearn_comm.client import RetryStrategy  # noqa: E402


class AdaptiveRetry(RetryStrategy):
    """根据错误类型进行适应的重试策略。"""

    def __init__(self, max_retries=5, base_delay=1.0):
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.logger = logging.getLogger(__name__)

    def execute(self, func, *args, **kwargs):
        last_exception = None
        for attempt in range(self.max_retries):
            try:
                return func(*args, **kwargs)
            except grpc.RpcError as e:
                last_exception = e
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    delay = self.base_delay * (3 ** attempt)
                elif e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    delay = self.base_delay * (2 ** attempt)
                elif e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    delay = self.base_delay * (2 ** attempt)
                else:
                    raise
                if attempt < self.max_retries - 1:
                    self.logger.warning(
                        f"Attempt {attempt + 1} failed with {e.code()}. "
                        f"Retrying in {delay:.1f}s..."
                    )
                    time.sleep(delay)
        raise last_exception


from enum import Enum  # noqa: E402


class CircuitState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreakerRetry(RetryStrategy):
    """用于容错的熔断器模式。"""

    def __init__(self, failure_threshold=5, timeout=60.0, half_open_attempts=3):
        self.failure_threshold = failure_threshold
        self.timeout = timeout
        self.half_open_attempts = half_open_attempts
        self.state = CircuitState.CLOSED
        self.failure_count = 0
        self.last_failure_time = None
        self.success_count = 0

    def execute(self, func, *args, **kwargs):
        if self.state == CircuitState.OPEN:
            if time.time() - self.last_failure_time > self.timeout:
                self.state = CircuitState.HALF_OPEN
                self.success_count = 0
            else:
                raise Exception("Circuit breaker is OPEN")
        try:
            result = func(*args, **kwargs)
            if self.state == CircuitState.HALF_OPEN:
                self.success_count += 1
                if self.success_count >= self.half_open_attempts:
                    self.state = CircuitState.CLOSED
                    self.failure_count = 0
            return result
        except Exception:
            self.failure_count += 1
            self.last_failure_time = time.time()
            if self.failure_count >= self.failure_threshold:
                self.state = CircuitState.OPEN
            raise


def test_guide_adaptive_retry(serve, connect):
    fn = Flaky(2)
    client = connect(serve(fn), retry_strategy=AdaptiveRetry(max_retries=5, base_delay=0.01))
    assert torch.equal(client.compute(torch.ones(3)), torch.ones(3))
    assert fn.calls == 3
    bad = connect(serve(Flaky(1, grpc.StatusCode.INVALID_ARGUMENT)),
                  retry_strategy=AdaptiveRetry(base_delay=0.01))
    with pytest.raises(grpc.RpcError) as info:
        bad.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_guide_circuit_breaker_retry():
    client = slc.GRPCComputeClient("127.0.0.1:1", timeout=2,
                                   retry_strategy=CircuitBreakerRetry(failure_threshold=2,
                                                                      timeout=60))
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            client.compute(torch.ones(1))
    with pytest.raises(Exception, match="Circuit breaker is OPEN"):
        client.compute(torch.ones(1))
    client.close()


# -- the built-in circuit breaker ------------------------------------------------------------

def test_circuit_breaker_opens_fails_fast_and_recovers(serve, connect):
    breaker = slc.CircuitBreaker(failure_threshold=2, reset_timeout=0.3, half_open_attempts=2)
    fn = Flaky(2)
    client = connect(serve(fn), retry_strategy=breaker)
    for _ in range(2):
        with pytest.raises(slc.RpcError):
            client.compute(torch.ones(1))
    assert breaker.state == "open"
    t0 = time.monotonic()
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "circuit breaker is open" in info.value.details() and info.value.attempts == 0
    assert time.monotonic() - t0 < 0.1 and fn.calls == 2
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            client.compute(torch.ones(1))
            break
        except slc.RpcError:
            time.sleep(0.05)  # the breaker's own reset timeout is what this waits out
    assert breaker.state == "half_open"
    client.compute(torch.ones(1))
    assert breaker.state == "closed"


def test_circuit_breaker_ignores_errors_the_server_chose(serve, connect):
    breaker = slc.CircuitBreaker(failure_threshold=1)
    client = connect(serve(Flaky(3, grpc.StatusCode.INVALID_ARGUMENT)), retry_strategy=breaker)
    for _ in range(3):
        with pytest.raises(slc.RpcError):
            client.compute(torch.ones(1))
    assert breaker.state == "closed"


def test_circuit_breaker_wraps_a_python_strategy(serve, connect):
    breaker = slc.CircuitBreaker(failure_threshold=1, reset_timeout=60,
                                 strategy=AdaptiveRetry(max_retries=2, base_delay=0.01))
    client = slc.GRPCComputeClient("127.0.0.1:1", timeout=2, retry_strategy=breaker)
    with pytest.raises(slc.RpcError):
        client.compute(torch.ones(1))
    with pytest.raises(slc.RpcError, match="circuit breaker is open"):
        client.compute(torch.ones(1))
    client.close()


def test_circuit_breaker_is_thread_safe(serve, connect):
    breaker = slc.CircuitBreaker(failure_threshold=1000)
    client = connect(serve(Echo()), retry_strategy=breaker)
    threads = [threading.Thread(target=lambda: [client.compute(torch.ones(4)) for _ in range(25)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert breaker.state == "closed" and client.get_statistics()["successful_requests"] == 200


# -- deadlines and cancellation --------------------------------------------------------------

def test_stalled_compute_gives_deadline_exceeded_and_the_server_notices(serve, connect):
    noticed = threading.Event()
    released = threading.Event()
    client_gave_up = threading.Event()

    class Long(slc.ComputeFunction):
        def compute(self, x):
            if released.is_set():
                return x  # only the first call stalls
            call = slc.current_call()
            for _ in range(1000):  # up to 10 s of "work" in 10 ms steps
                if not call.is_active():
                    noticed.set()
                    break
                time.sleep(0.01)
            # answer only once the client has given up: on a loaded machine the client's
            # deadline timer may fire after a prompt answer has already arrived
            client_gave_up.wait(10)
            released.set()
            return x

    server = serve(Long(), max_workers=1)
    client = connect(server, timeout=0.3)
    t0 = time.monotonic()
    try:
        with pytest.raises(slc.RpcError) as info:
            client.compute(torch.ones(1))
    finally:
        client_gave_up.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2
    assert noticed.wait(5) and released.wait(5)
    # the one worker is free again
    assert torch.equal(connect(server, timeout=5).compute(torch.ones(2)), torch.ones(2))


def test_wait_for_ready_waits_for_the_server_to_come_up():
    port = free_port()
    client = slc.GRPCComputeClient(f"127.0.0.1:{port}", timeout=20, retry_strategy=None,
                                   wait_for_ready=True)
    result: List[torch.Tensor] = []
    caller = threading.Thread(target=lambda: result.append(client.compute(torch.ones(3))))
    caller.start()
    caller.join(0.5)
    assert caller.is_alive()  # waiting, not failing fast
    server = slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=port).start()
    try:
        caller.join(20)
        assert result and torch.equal(result[0], torch.ones(3))
    finally:
        server.stop(0)
        client.close()
    fast = slc.GRPCComputeClient(f"127.0.0.1:{port}", timeout=5, retry_strategy=None)
    assert not fast.connect(timeout=0.2)
    fast.close()


# -- faults with real processes ---------------------------------------------------------------

SERVER = textwrap.dedent("""
    import sys, time
    import torch  # a real server has its model loaded before it says it is ready
    import splitlearn_comm as slc

    class Slowish(slc.ComputeFunction):
        def compute(self, x):
            time.sleep(0.05)
            return x * 2

    server = slc.GRPCComputeServer(Slowish(), host="127.0.0.1", port=int(sys.argv[1]),
                                   max_workers=4)
    server.start()
    print("ready", server.port, flush=True)
    server.wait_for_termination()
""")


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, "-c", SERVER, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    line = proc.stdout.readline()
    assert line.startswith("ready"), proc.stderr.read()
    return proc


def test_server_killed_mid_call_and_restarted():
    port = free_port()
    proc = start_server(port)
    client = slc.GRPCComputeClient(f"127.0.0.1:{port}", timeout=3, retry_strategy=None)
    outcomes: List[str] = []
    lock = threading.Lock()
    some_ok = threading.Event()

    def caller(i: int) -> None:
        for _ in range(20):
            x = torch.full((16,), float(i))
            t0 = time.monotonic()
            try:
                ok = torch.equal(client.compute(x), x * 2)
                outcome = "ok" if ok else "WRONG"
            except slc.RpcError as e:
                outcome = e.code().name
            if time.monotonic() - t0 > 3.5:
                outcome = "HUNG"
            with lock:
                outcomes.append(outcome)
            if outcome == "ok":
                some_ok.set()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    assert some_ok.wait(30)
    time.sleep(0.1)  # calls are in flight: this is the fault being injected
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert "WRONG" not in outcomes and "HUNG" not in outcomes
    assert set(outcomes) <= {"ok", "UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"}
    assert "ok" in outcomes and "UNAVAILABLE" in outcomes
    proc = start_server(port)
    try:
        # the same client reconnects by itself (connect() waits out gRPC's reconnect
        # backoff; a retrying strategy or wait_for_ready=True would do the same)
        assert client.connect(timeout=20)
        x = torch.arange(5.0)
        assert torch.equal(client.compute(x), x * 2)
    finally:
        proc.kill()
        proc.wait(10)
        client.close()


CLIENT = textwrap.dedent("""
    import sys, torch
    import splitlearn_comm as slc

    client = slc.GRPCComputeClient(sys.argv[1], retry_strategy=None, timeout=60)
    print("calling", flush=True)
    client.compute(torch.ones(4))
""")


def test_client_killed_mid_call_leaves_the_server_serving(serve, connect):
    entered = threading.Event()
    finished = threading.Event()

    class Held(slc.ComputeFunction):
        def compute(self, x):
            entered.set()
            call = slc.current_call()
            while call.is_active():
                time.sleep(0.01)
            finished.set()
            return x

    server = serve(Held(), max_workers=1)
    proc = subprocess.Popen([PYTHON, "-c", CLIENT, f"127.0.0.1:{server.port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    try:
        assert entered.wait(30)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert finished.wait(10)  # the server saw the call die
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while server._core.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server._core.in_flight == 0  # no leaked call
    entered.clear()
    client = connect(server, timeout=10)
    assert client.health_check()


def test_statistics(serve, connect):
    client = connect(serve(Flaky(1)), retry_strategy=slc.FixedDelay(max_retries=2, delay=0.01))
    for _ in range(5):
        client.compute(torch.ones(256))
    dead = slc.GRPCComputeClient("127.0.0.1:1", retry_strategy=None, timeout=2)
    with pytest.raises(slc.RpcError):
        dead.compute(torch.ones(1))
    stats = client.get_statistics()
    assert stats["total_requests"] == 5 and stats["retries"] == 1
    assert stats["bytes_sent"] >= 6 * 1024 and stats["bytes_received"] >= 5 * 1024
    assert 0 < stats["p50_total_time_ms"] <= stats["p99_total_time_ms"]
    assert dead.get_statistics()["failures_by_code"] == {"UNAVAILABLE": 1}
    dead.close()
