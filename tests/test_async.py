"""Calls in flight while the caller works: futures, asyncio on both sides, pipelining.

Every wait here is on an event the test controls (no timing margins): servers
block on a gate the test opens once it has seen what it checks.
"""
from __future__ import annotations

import asyncio
import os
import threading

import grpc
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="needs torch, an optional extra "
                            "(pip install splitlearn-comm[torch])")

import splitlearn_comm as slc
from splitlearn_comm import current_call

WAIT = 30.0


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


class Gated(slc.ComputeFunction):
    """Doubles its input once the gate is open; counts calls that arrived."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.arrived = 0
        self.lock = threading.Lock()

    def compute(self, x):
        with self.lock:
            self.arrived += 1
        assert self.gate.wait(WAIT)
        return x * 2


# -- futures -----------------------------------------------------------------------------


def test_256_futures_in_flight_complete_with_the_right_results(serve, connect):
    fn = Gated()
    client = connect(serve(fn, max_workers=4))
    fn.gate.set()
    client.compute(torch.zeros(1))  # the channel is up, threads started
    fn.gate.clear()
    before = os_threads()
    futures = [client.compute_async(torch.full((3,), float(i))) for i in range(256)]
    during = os_threads()
    assert not any(f.done() for f in futures)  # all in flight: the 4 workers are gated
    fn.gate.set()
    for i, f in enumerate(futures):
        assert torch.equal(f.result(WAIT), torch.full((3,), 2.0 * i))
    # one completion thread (plus whatever gRPC may start), not one per call
    assert during - before < 16, (before, during)
    stats = client.get_statistics()
    assert stats["successful_requests"] == 257 and stats["failed_requests"] == 0


def test_future_callbacks_errors_and_numpy(serve, connect):
    class Picky(slc.ComputeFunction):
        def compute(self, x):
            if float(x.sum()) < 0:
                current_call().abort(grpc.StatusCode.INVALID_ARGUMENT, "negative sum")
            return x + 1

    client = connect(serve(Picky()))
    done = threading.Event()
    seen = []
    f = client.compute_async(np.ones(4, dtype=np.float32))
    f.add_done_callback(lambda fut: (seen.append(fut.result()), done.set()))
    assert done.wait(WAIT)
    assert isinstance(seen[0], np.ndarray) and np.array_equal(seen[0], np.full(4, 2.0))
    bad = client.compute_async(torch.full((2,), -1.0))
    err = bad.exception(WAIT)
    assert isinstance(err, slc.RpcError) and isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "negative sum" in err.details()
    with pytest.raises(slc.RpcError):
        bad.result()
    # an unsendable object fails the future, not the caller (a str is a structure leaf)
    f = client.compute_async(object())
    assert isinstance(f.exception(WAIT), TypeError)
    assert client.get_statistics()["failures_by_code"].get("INVALID_ARGUMENT") == 1


def test_futures_carry_metadata_codecs_deadlines_and_retries(serve, connect):
    class Flaky(slc.ComputeFunction):
        def __init__(self):
            self.calls = 0
            self.metadata = []

        def compute(self, x):
            self.calls += 1
            self.metadata.append(dict(current_call().metadata).get("x-tag"))
            if self.calls == 1:
                current_call().abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            if float(x[0]) == 99:
                assert gate.wait(WAIT)
            return x * 3

    gate = threading.Event()
    fn = Flaky()
    server = serve(fn)
    client = connect(server, retry_strategy=slc.FixedDelay(max_retries=2, delay=0.01),
                     codec=slc.Float16Codec(), metadata=[("x-tag", "default")])
    y = client.compute_async(torch.tensor([1.0, 2.0]), metadata=[("x-tag", "mine")]).result(WAIT)
    assert torch.equal(y, torch.tensor([3.0, 6.0])) and y.dtype == torch.float32
    assert fn.calls == 2 and fn.metadata == ["mine", "mine"]
    assert client.get_statistics()["retries"] == 1
    slow = client.compute_async(torch.tensor([99.0]), timeout=0.2)
    assert slow.exception(WAIT).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.set()


def test_python_retry_strategy_and_open_breaker(serve, connect):
    class Always(slc.RetryStrategy):
        def __init__(self):
            self.runs = 0

        def execute(self, func, *args, **kwargs):
            self.runs += 1
            return func(*args, **kwargs)

    server = serve(slc.ModelComputeFunction(torch.nn.Identity()))
    strategy = Always()
    client = connect(server, retry_strategy=strategy)
    assert torch.equal(client.compute_async(torch.ones(2)).result(WAIT), torch.ones(2))
    assert strategy.runs == 1
    breaker = slc.CircuitBreaker(failure_threshold=1, reset_timeout=60)
    down = slc.GRPCComputeClient("127.0.0.1:1", retry_strategy=breaker, timeout=5)
    try:
        assert down.compute_async(torch.ones(1)).exception(WAIT).code() == \
            grpc.StatusCode.UNAVAILABLE
        assert breaker.state == "open"
        err = down.compute_async(torch.ones(1)).exception(WAIT)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "circuit breaker" in err.details()
    finally:
        down.close()


def test_cancel_of_a_pending_future_cancels_on_the_server(serve, connect):
    started, saw_cancel = threading.Event(), threading.Event()

    class Watch(slc.ComputeFunction):
        def compute(self, x):
            started.set()
            call = current_call()
            while not saw_cancel.is_set():
                if not call.is_active():
                    saw_cancel.set()
                    break
                saw_cancel.wait(0.01)
            return x

    client = connect(serve(Watch()))
    f = client.compute_async(torch.ones(2))
    assert started.wait(WAIT)
    assert f.cancel() and f.cancelled()
    assert saw_cancel.wait(WAIT)
    assert not f.cancel() or f.cancelled()
    # the client keeps working
    started.clear()
    saw_cancel.set()
    assert torch.equal(client.compute(torch.ones(2)), torch.ones(2))


def test_closing_the_client_fails_pending_futures(serve, connect):
    fn = Gated()
    server = serve(fn)
    client = slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None)
    futures = [client.compute_async(torch.ones(1)) for _ in range(8)]
    client.close()
    for f in futures:
        err = f.exception(WAIT)
        assert err.code() == grpc.StatusCode.CANCELLED
        assert "closed" in err.details()
    with pytest.raises(ValueError, match="closed"):
        client.compute_async(torch.ones(1)).result(WAIT)
    fn.gate.set()


def test_close_from_a_done_callback_does_not_deadlock(serve):
    server = serve(slc.ModelComputeFunction(torch.nn.Identity()))
    client = slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None)
    closed = threading.Event()
    f = client.compute_async(torch.ones(1))
    f.add_done_callback(lambda _: (client.close(), closed.set()))
    assert closed.wait(WAIT)
    assert torch.equal(f.result(), torch.ones(1))


# -- asyncio client ------------------------------------------------------------------------


def test_asyncio_client_shared_by_64_tasks(serve):
    fn = Gated()
    server = serve(fn, max_workers=4)

    async def main():
        async with slc.AsyncGRPCComputeClient(f"127.0.0.1:{server.port}",
                                              retry_strategy=None) as client:
            ticks = 0

            async def ticker():
                # the loop stays free while 64 calls wait: open the gate from here
                nonlocal ticks
                while ticks < 5:
                    await asyncio.sleep(0.01)
                    ticks += 1
                fn.gate.set()

            results = await asyncio.gather(
                ticker(), *[client.compute(torch.full((2,), float(i))) for i in range(64)])
            for i, y in enumerate(results[1:]):
                assert torch.equal(y, torch.full((2,), 2.0 * i))
            assert client.get_statistics()["successful_requests"] == 64
            assert await client.health_check()

    asyncio.run(asyncio.wait_for(main(), WAIT))


def test_task_cancel_cancels_the_call(serve, connect):
    started, saw_cancel = threading.Event(), threading.Event()

    class Watch(slc.ComputeFunction):
        def compute(self, x):
            started.set()
            call = current_call()
            while call.is_active():
                saw_cancel.wait(0.01)
            saw_cancel.set()
            return x

    client = connect(serve(Watch()))

    async def main():
        task = asyncio.ensure_future(client.acompute(torch.ones(1)))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), WAIT))
    assert saw_cancel.wait(WAIT)


# -- asyncio on the server --------------------------------------------------------------------


class Sleeper(slc.AsyncComputeFunction):
    """Input [0]: returns at once. Input [1]: awaits asyncio.sleep until the gate opens."""

    def __init__(self):
        self.gate = threading.Event()
        self.waiting = threading.Event()
        self.set_up = self.torn_down = False

    async def setup(self):
        self.set_up = True

    async def teardown(self):
        self.torn_down = True

    async def compute(self, x):
        if float(x[0]) == 1:
            self.waiting.set()
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
        return x + 10


def test_async_compute_awaits_while_other_calls_proceed(serve, connect):
    fn = Sleeper()
    server = serve(fn, max_workers=1)  # one worker: an awaiting call must not hold it
    assert fn.set_up
    client = connect(server)
    slow = client.compute_async(torch.tensor([1.0]))
    assert fn.waiting.wait(WAIT)
    for _ in range(5):
        assert torch.equal(client.compute(torch.tensor([0.0])), torch.tensor([10.0]))
    assert not slow.done()
    fn.gate.set()
    assert torch.equal(slow.result(WAIT), torch.tensor([11.0]))
    server.stop(grace=1)
    assert fn.torn_down


def test_async_compute_errors_trailing_metadata_and_cancel(serve, connect):
    seen, looping = threading.Event(), threading.Event()

    class Async(slc.AsyncComputeFunction):
        async def compute(self, x):
            call = current_call()
            if float(x[0]) < 0:
                call.set_trailing_metadata([("x-why", "negative")])
                raise ValueError("no negatives")
            if float(x[0]) == 2:
                call.abort(grpc.StatusCode.FAILED_PRECONDITION, "not two")
            if float(x[0]) == 3:
                looping.set()
                while call.is_active():
                    await asyncio.sleep(0.01)
                seen.set()
            return x

    client = connect(serve(Async(), max_workers=1))
    with pytest.raises(slc.RpcError) as e:
        client.compute(torch.tensor([-1.0]))
    assert e.value.code() == grpc.StatusCode.INTERNAL and "no negatives" in e.value.details()
    assert ("x-why", "negative") in e.value.trailing_metadata()
    with pytest.raises(slc.RpcError) as e:
        client.compute(torch.tensor([2.0]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    f = client.compute_async(torch.tensor([3.0]))
    assert looping.wait(WAIT)
    assert f.cancel()
    assert seen.wait(WAIT)  # current_call().is_active() turned false in the coroutine
    assert torch.equal(client.compute(torch.tensor([5.0])), torch.tensor([5.0]))


def test_sync_and_async_functions_mixed_on_one_server(serve, connect):
    class Half(slc.ComputeFunction):
        def compute(self, x):
            return x / 2

    class Plus(slc.AsyncComputeFunction):
        async def compute(self, x):
            await asyncio.sleep(0)
            return x + 1

    chain = slc.AsyncChainComputeFunction([Half(), Plus(), slc.AsyncLambdaComputeFunction(
        lambda x: x * 10)])
    client = connect(serve(chain))
    assert torch.equal(client.compute(torch.tensor([4.0])), torch.tensor([30.0]))

    class Both(slc.AsyncComputeFunction):
        """Async forward, sync backward on the same function."""

        async def compute(self, x):
            return x * 2

        def backward(self, grad, forward_id=None, **kw):
            return grad * 2

    client = connect(serve(Both()))
    x = torch.ones(3, requires_grad=True)
    y = client.remote(x)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.full((3,), 2.0))
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_stopping_answers_pending_async_calls(serve, connect):
    fn = Sleeper()
    server = serve(fn)
    client = connect(server)
    f = client.compute_async(torch.tensor([1.0]))
    assert fn.waiting.wait(WAIT)
    server.stop(grace=0.1)
    assert f.exception(WAIT).code() == grpc.StatusCode.UNAVAILABLE
    fn.gate.set()


def test_async_server_api_and_serve_async():
    fn = Sleeper()

    async def main():
        async with slc.AsyncGRPCComputeServer(fn, host="127.0.0.1", port=0) as server:
            async with slc.AsyncGRPCComputeClient(f"127.0.0.1:{server.port}") as client:
                assert torch.equal(await client.compute(torch.tensor([0.0])),
                                   torch.tensor([10.0]))
        assert fn.torn_down
        task = asyncio.ensure_future(slc.serve_async(slc.AsyncLambdaComputeFunction(
            lambda x: x), port=0, host="127.0.0.1"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), WAIT))


# -- pipelined training -----------------------------------------------------------------------


def _train(k, x, y, steps=3):
    torch.manual_seed(0)
    bottom = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU())
    mid = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.Tanh())
    head = torch.nn.Linear(12, 3)
    fn = slc.TrainableComputeFunction(mid, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    opt = torch.optim.SGD(list(bottom.parameters()) + list(head.parameters()), lr=0.1,
                          momentum=0.9)
    server = slc.GRPCComputeServer(fn, host="127.0.0.1", port=0, max_workers=4).start()
    losses = []
    try:
        with slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None) as client:
            pipe = client.pipeline(chunks=k) if k else None
            for _ in range(steps):
                opt.zero_grad()
                if pipe is None:
                    loss = torch.nn.functional.cross_entropy(head(client.remote(bottom(x))), y)
                    loss.backward()
                    losses.append(float(loss.detach()))
                else:
                    losses.append(pipe.step(x, y, bottom, torch.nn.functional.cross_entropy, head))
                opt.step()
    finally:
        server.stop(grace=0)
    params = [p.detach().clone() for m in (bottom, mid, head) for p in m.parameters()]
    return params, losses, fn._version


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_pipelined_training_equals_plain_training(k):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 6, generator=g)  # 30: uneven micro-batches for k = 4 and 8
    y = torch.randint(0, 3, (30,), generator=g)
    ref, ref_losses, ref_steps = _train(0, x, y)
    got, losses, steps = _train(k, x, y)
    assert steps == ref_steps == 3  # the server stepped once per batch
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    assert np.allclose(ref_losses, losses, atol=1e-6)


def test_pipeline_arguments():
    with pytest.raises(ValueError):
        slc.Pipeline(None, chunks=0)
    with pytest.raises(ValueError):
        slc.pipeline(None, chunks=2, loss_reduction="max")
    assert slc.pipeline(None, chunks=3).chunks == 3


# -- the rest of what blocking calls do ----------------------------------------------------


class Negate(slc.TensorCodec):
    """A Python codec: negated float32 bytes."""

    codec_name = "negate-test"

    def encode(self, tensor):
        t = (-tensor).contiguous().numpy()
        return t.tobytes(), tuple(t.shape), {"sign": -1}

    def decode(self, data, shape, metadata):
        assert metadata == {"sign": -1}
        return -torch.from_numpy(np.frombuffer(bytearray(data), dtype=np.float32).reshape(shape))


def test_interceptors_and_python_codecs_apply_to_async_calls(serve, connect):
    seen = []

    class Gate(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            seen.append(details.method)
            if dict(details.invocation_metadata).get("x-deny") == "1":
                def deny(request, context):
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied")
                return grpc.unary_unary_rpc_method_handler(deny)
            return continuation(details)

    class Plus(slc.AsyncComputeFunction):
        async def compute(self, x):
            return x + 1

    server = serve(Plus(), interceptors=[Gate()], codecs=[Negate()])
    client = connect(server, codec=Negate())
    y = client.compute_async(torch.tensor([1.0, 2.0])).result(WAIT)
    assert torch.equal(y, torch.tensor([2.0, 3.0]))
    err = client.compute_async(torch.ones(1), metadata=[("x-deny", "1")]).exception(WAIT)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and err.details() == "denied"
    assert seen == ["/splitlearn.comm.ComputeService/Compute"] * 2


def test_acompute_from_a_loop_in_another_thread(echo_client):
    out = []

    def run():
        async def main():
            out.append(await echo_client.acompute(torch.arange(4.0)))

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(asyncio.wait_for(main(), WAIT))
        finally:
            loop.close()

    t = threading.Thread(target=run)
    t.start()
    t.join(WAIT)
    assert torch.equal(out[0], torch.arange(4.0))


def test_close_while_other_threads_start_calls(serve):
    server = serve(slc.ModelComputeFunction(torch.nn.Identity()), max_workers=2)
    client = slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None)
    futures = []
    started = threading.Barrier(5)

    def submit():
        started.wait(WAIT)
        for _ in range(2000):
            f = client.compute_async(torch.ones(8))
            futures.append(f)
            if isinstance(f.exception(WAIT) if f.done() else None, ValueError):
                return

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait(WAIT)
    while len(futures) < 50:
        threading.Event().wait(0.001)
    client.close()
    for t in threads:
        t.join(WAIT)
    for f in futures:  # every future ends: a result, CANCELLED, or "closed"
        err = f.exception(WAIT)
        assert err is None or isinstance(err, ValueError) or \
            err.code() == grpc.StatusCode.CANCELLED, err


def test_async_compute_in_a_session(serve, connect):
    class Count(slc.AsyncComputeFunction):
        async def compute(self, x):
            await asyncio.sleep(0)
            state = current_call().session
            state["n"] = state.get("n", 0) + 1
            return x + state["n"]

    client = connect(serve(Count()))
    with client.session() as s:  # a session's steps run in order: each one is awaited
        assert torch.equal(s.compute(torch.zeros(1)), torch.ones(1))
        assert torch.equal(s.compute(torch.zeros(1)), torch.full((1,), 2.0))


# -- structures (many named tensors per call) through the asynchronous paths -----------


class Stage(slc.ComputeFunction):
    """A stage taking and returning a structure: hidden states, a mask, a cache."""

    def compute(self, x):
        present = tuple((k + 1, v + 1) for k, v in x["past"])
        return {"hidden": x["hidden"] * x["mask"].unsqueeze(-1), "present": present,
                "layer": x["layer"], "note": None}


def stage_input(i: int) -> dict:
    return {"hidden": torch.full((2, 3, 4), float(i)), "mask": torch.ones(2, 3, dtype=torch.bool),
            "past": tuple((torch.zeros(2, 1, 3, 2), torch.ones(2, 1, 3, 2)) for _ in range(2)),
            "layer": i}


def check_stage_output(y: dict, i: int) -> None:
    assert sorted(y) == ["hidden", "layer", "note", "present"]
    assert torch.equal(y["hidden"], torch.full((2, 3, 4), float(i)))
    assert y["layer"] == i and y["note"] is None
    assert isinstance(y["present"], tuple) and len(y["present"]) == 2
    assert torch.equal(y["present"][1][0], torch.ones(2, 1, 3, 2))
    assert torch.equal(y["present"][1][1], torch.full((2, 1, 3, 2), 2.0))


def test_futures_and_acompute_carry_structures(serve, connect):
    server = serve(Stage())
    client = connect(server, codec={"hidden": slc.Float16Codec()})
    futures = [client.compute_async(stage_input(i)) for i in range(16)]
    for i, f in enumerate(futures):
        check_stage_output(f.result(WAIT), i)
    # the blocking and the asynchronous call give the same thing
    check_stage_output(client.compute(stage_input(3)), 3)

    async def main() -> None:
        ys = await asyncio.gather(*(client.acompute(stage_input(i)) for i in range(8)))
        for i, y in enumerate(ys):
            check_stage_output(y, i)
        async with slc.AsyncGRPCComputeClient(f"127.0.0.1:{server.port}") as aclient:
            check_stage_output(await aclient.compute(stage_input(5)), 5)

    asyncio.run(main())
    assert client.get_statistics()["successful_requests"] == 16 + 1 + 8


def test_async_compute_answers_structures_when_deferred(serve, connect):
    class AsyncStage(slc.AsyncComputeFunction):
        async def compute(self, x):
            await asyncio.sleep(0)
            return Stage().compute(x)

    client = connect(serve(AsyncStage(), max_workers=1))
    futures = [client.compute_async(stage_input(i)) for i in range(8)]
    for i, f in enumerate(futures):
        check_stage_output(f.result(WAIT), i)
    check_stage_output(client.compute(stage_input(2)), 2)
    # a bare tensor still comes back as one
    class AsyncDouble(slc.AsyncComputeFunction):
        async def compute(self, x):
            return x * 2

    client2 = connect(serve(AsyncDouble()))
    assert torch.equal(client2.compute_async(torch.ones(3)).result(WAIT), torch.full((3,), 2.0))
