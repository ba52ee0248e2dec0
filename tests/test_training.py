"""Split-learning training over the wire (issue 7, docs/training.md).

Real servers and clients on 127.0.0.1, port 0. What is checked:

* a split MLP trained over the wire (raw codec) ends with the parameters of the same
  model trained locally (same seed, same data order) to 1e-6, and every step's input
  gradient equals local autograd's: vanilla (server holds the top), U-shaped (client
  holds the head and the labels), and server-only (the client has no layers);
* learning_rate and accumulation_step from the client;
* bf16 and int8 codecs still converge: the final loss is within
  ``CODEC_MARGIN_ABS + CODEC_MARGIN_REL * local`` of local training's;
* a retried backward (by hand, and by the client's own retries after an attempt
  timed out while the backward was running) returns the same input gradient and
  steps once;
* NOT_FOUND, FAILED_PRECONDITION (evicted by ttl / max_entries / max_bytes, already
  applied, stale), RESOURCE_EXHAUSTED, INVALID_ARGUMENT, ALREADY_EXISTS;
* inference calls keep nothing;
* several clients training at once: no lost updates, no torn parameters.

Every wait is bounded; the only clock games use an injected clock.
"""
from __future__ import annotations

import copy
import threading
import time
import uuid
from typing import Callable, List, Optional, Tuple

import grpc
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import splitlearn_comm as slc  # noqa: E402
from splitlearn_comm import TrainableComputeFunction  # noqa: E402

pytestmark = pytest.mark.timeout(120)

#: bf16 / int8 training must end within this margin of local training's loss.
CODEC_MARGIN_ABS = 0.02
CODEC_MARGIN_REL = 0.05


# -- helpers ----------------------------------------------------------------------------


def _mlp(seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    bottom = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU())
    middle = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.Tanh(), torch.nn.Linear(24, 16),
                                 torch.nn.ReLU())
    head = torch.nn.Linear(16, 3)
    return bottom, middle, head


def _batches(n: int, batch: int = 16, seed: int = 1, features: int = 12, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, features, generator=g),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def _params(*modules: torch.nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _assert_close(a: List[torch.Tensor], b: List[torch.Tensor], tol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert (x - y).abs().max().item() <= tol, (x - y).abs().max().item()


def _fid() -> str:
    return uuid.uuid4().hex


def _forward(client: slc.GRPCComputeClient, x: torch.Tensor, fid: str) -> torch.Tensor:
    return client._tensor_call(x, forward_id=fid, training_mode=True)


def _backward(client: slc.GRPCComputeClient, g: torch.Tensor, fid: str, **kw) -> torch.Tensor:
    return client._tensor_call(g, backward=True, forward_id=fid, **kw)


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- correctness against local training -------------------------------------------------


@pytest.mark.parametrize("split", ["u_shaped", "vanilla", "server_only"])
def test_split_training_matches_local_training(serve, connect, split: str) -> None:
    """Adam on the server, SGD with momentum on the client, 25 steps: the parameters end
    equal to local training's and every input gradient equals local autograd's."""
    bottom, middle, head = _mlp()
    if split == "vanilla":  # the server holds the rest of the model, logits come back
        server_part = torch.nn.Sequential(middle, head)
        client_parts: List[torch.nn.Module] = [bottom]
    elif split == "server_only":  # the client only has the loss and the labels
        server_part = torch.nn.Sequential(bottom, middle, head)
        client_parts = []
    else:
        server_part = middle
        client_parts = [bottom, head]
    local_server = copy.deepcopy(server_part)
    local_client = [copy.deepcopy(m) for m in client_parts]

    fn = TrainableComputeFunction(server_part, lambda p: torch.optim.Adam(p, lr=1e-2))
    client = connect(serve(fn))

    def optimizer(mods):
        params = [p for m in mods for p in m.parameters()]
        return torch.optim.SGD(params, lr=0.05, momentum=0.9) if params else None

    opt, lopt = optimizer(client_parts), optimizer(local_client)
    lopt_server = torch.optim.Adam(local_server.parameters(), lr=1e-2)

    def run(x, parts, middle_fn):
        if split == "vanilla":
            return middle_fn(parts[0](x))
        if split == "server_only":
            return middle_fn(x)
        return parts[1](middle_fn(parts[0](x)))

    for x, y in _batches(25):
        xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss = F.cross_entropy(run(xr, client_parts, client.remote), y)
        if opt:
            opt.zero_grad()
        loss.backward()
        if opt:
            opt.step()

        lloss = F.cross_entropy(run(xl, local_client, local_server), y)
        if lopt:
            lopt.zero_grad()
        lopt_server.zero_grad()
        lloss.backward()
        if lopt:
            lopt.step()
        lopt_server.step()

        assert abs(loss.item() - lloss.item()) <= 1e-6
        _assert_close([xr.grad], [xl.grad])

    _assert_close(_params(*client_parts), _params(*local_client))
    _assert_close(_params(server_part), _params(local_server))
    stats = fn.stats()
    assert stats["steps"] == 25 and stats["backward_calls"] == 25 and stats["waiting"] == 0
    assert stats["recomputed"] == 0


def test_remote_module_in_a_sequential(serve, connect) -> None:
    bottom, middle, head = _mlp()
    local = torch.nn.Sequential(copy.deepcopy(bottom), copy.deepcopy(middle), copy.deepcopy(head))
    fn = TrainableComputeFunction(middle, lambda p: torch.optim.SGD(p, lr=0.1))
    client = connect(serve(fn))
    model = torch.nn.Sequential(bottom, slc.RemoteModule(client), head)
    assert "127.0.0.1" in repr(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lopt = torch.optim.SGD(local.parameters(), lr=0.1)
    for x, y in _batches(10):
        for m, o in ((model, opt), (local, lopt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    _assert_close(_params(model), _params(local[0], local[2]))
    _assert_close(_params(middle), _params(local[1]))
    # eval mode: inference calls, nothing kept
    model.eval()
    before = fn.stats()
    model(torch.randn(4, 12))
    after = fn.stats()
    assert after["inference_calls"] == before["inference_calls"] + 1
    assert after["training_forwards"] == before["training_forwards"]


def test_learning_rate_and_accumulation_from_the_client(serve, connect) -> None:
    """accumulation_step=3: gradients of 3 backward calls are summed, then one step,
    at the learning_rate the client sent (0.125, exact in float32)."""
    torch.manual_seed(3)
    server_part = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(),
                                      torch.nn.Linear(8, 3))
    local = copy.deepcopy(server_part)
    fn = TrainableComputeFunction(server_part, lambda p: torch.optim.SGD(p, lr=1.0))
    client = connect(serve(fn))
    lopt = torch.optim.SGD(local.parameters(), lr=0.125)
    for i, (x, y) in enumerate(_batches(9)):
        F.cross_entropy(client.remote(x, learning_rate=0.125, accumulation_step=3), y).backward()
        F.cross_entropy(local(x), y).backward()
        if i % 3 == 2:
            lopt.step()
            lopt.zero_grad()
        assert fn.stats()["steps"] == (i + 1) // 3
    _assert_close(_params(server_part), _params(local))
    assert fn.stats()["accumulated"] == 0


@pytest.mark.parametrize("codec", [slc.BFloat16Codec(), slc.Int8Codec()], ids=["bf16", "int8"])
def test_low_precision_codecs_still_converge(serve, connect, codec) -> None:
    """Activations and gradients in bf16 / int8 both ways: the loss falls, and ends within
    the documented margin of local training's (same data, same seed)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 12, generator=g) * 0.6
    labels = torch.randint(0, 4, (512,), generator=g)
    data = centers[labels] + torch.randn(512, 12, generator=g)

    def train(remote_fn: Optional[Callable], server_part, client_parts):
        params = [p for m in client_parts for p in m.parameters()]
        opt = torch.optim.SGD(params, lr=0.1)
        sopt = torch.optim.SGD(server_part.parameters(), lr=0.1) if remote_fn is None else None
        mid = remote_fn or server_part
        for step in range(120):
            i = (torch.arange(32) + 32 * step) % 512
            loss = F.cross_entropy(client_parts[1](mid(client_parts[0](data[i]))), labels[i])
            opt.zero_grad()
            if sopt:
                sopt.zero_grad()
            loss.backward()
            opt.step()
            if sopt:
                sopt.step()
        with torch.no_grad():
            logits = client_parts[1](server_part(client_parts[0](data)))
            return F.cross_entropy(logits, labels).item()

    def fresh():
        torch.manual_seed(0)
        return (torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU()),
                torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU()),
                torch.nn.Linear(32, 4))

    b, m, h = fresh()
    with torch.no_grad():
        initial = F.cross_entropy(h(m(b(data))), labels).item()
    local = train(None, m, [b, h])
    b, m, h = fresh()
    fn = TrainableComputeFunction(m, lambda p: torch.optim.SGD(p, lr=0.1))
    client = connect(serve(fn), codec=codec)
    remote = train(client.remote, m, [b, h])
    assert remote < 0.6 * initial, (initial, remote)
    assert abs(remote - local) <= CODEC_MARGIN_ABS + CODEC_MARGIN_REL * local, (local, remote)


# -- retries and failure modes -------------------------------------------------------------


def _linear_fn(**kw) -> TrainableComputeFunction:
    torch.manual_seed(0)
    return TrainableComputeFunction(torch.nn.Linear(4, 3), lambda p: torch.optim.SGD(p, lr=0.5),
                                    **kw)


def test_retried_backward_returns_the_same_gradient_without_stepping_again(serve, connect) -> None:
    fn = _linear_fn()
    client = connect(serve(fn))
    x = torch.randn(5, 4)
    fid = _fid()
    y = _forward(client, x, fid)
    assert _forward(client, x, fid).equal(y)  # a retried forward: the same output, kept once
    g = torch.randn(5, 3)
    first = _backward(client, g, fid)
    after_first = _params(fn.model)
    second = _backward(client, g, fid)
    assert second.equal(first)
    _assert_close(_params(fn.model), after_first, tol=0.0)
    s = fn.stats()
    assert s["steps"] == 1 and s["backward_calls"] == 1 and s["replayed_backward_calls"] == 1
    assert s["training_forwards"] == 1 and s["replayed_forwards"] == 1
    # the gradient is the local one: d(y)/dx = W, so grad_x = g @ W (W before the step)
    torch.manual_seed(0)
    w0 = torch.nn.Linear(4, 3).weight.detach()
    _assert_close([first], [g @ w0])


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_two_backwards_through_one_output_equal_local_autograd(serve, connect,
                                                                dropout: bool) -> None:
    """loss1.backward(retain_graph=True) then loss2.backward() through one remote()
    output (multi-loss training): each backward is its own step on the server, so the
    input gradient is 3*g1 for losses y.sum() and 2*y.sum() (it was 2*g1: the second
    backward was taken for a retry of the first and its answer replayed), and the
    parameters after the server's one optimizer step equal local autograd's."""
    bottom, middle, _ = _mlp()
    if dropout:  # the recomputed forward must replay the forward's dropout mask
        middle = torch.nn.Sequential(middle, torch.nn.Dropout(0.5))
    local_middle, local_bottom = copy.deepcopy(middle), copy.deepcopy(bottom)
    fn = TrainableComputeFunction(middle, lambda p: torch.optim.SGD(p, lr=0.1),
                                  accumulation_steps=2)
    client = connect(serve(fn))
    lopt = torch.optim.SGD(local_middle.parameters(), lr=0.1)
    x, _ = _batches(1)[0]

    xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(7)
    y = client.remote(bottom(xr))
    y.sum().backward(retain_graph=True)
    g1 = xr.grad.clone()
    (2 * y.sum()).backward()

    torch.manual_seed(7)
    yl = local_middle(local_bottom(xl))
    yl.sum().backward(retain_graph=True)
    g1l = xl.grad.clone()
    (2 * yl.sum()).backward()
    lopt.step()

    _assert_close([xr.grad], [3 * g1], tol=1e-5)
    if dropout:  # the server's mask came from its own RNG: local cannot match it, but
        # 3*g1 above shows the second backward saw the first one's mask
        assert fn.stats()["recomputed"] == 1
        assert fn.stats()["steps"] == 1 and fn.stats()["backward_calls"] == 2
        return
    _assert_close([g1], [g1l])
    _assert_close([xr.grad], [xl.grad])
    _assert_close([p.grad for p in bottom.parameters()], [p.grad for p in local_bottom.parameters()])
    _assert_close(_params(middle), _params(local_middle))
    s = fn.stats()
    assert s["steps"] == 1 and s["backward_calls"] == 2 and s["replayed_backward_calls"] == 0


def test_backward_numbers_make_retries_idempotent_and_order_checked(serve, connect) -> None:
    """The same backward_seq again is a retry (the answer replayed, no second step); the
    next number runs; a number out of order is FAILED_PRECONDITION saying which one is
    expected."""
    fn = _linear_fn(accumulation_steps=1)
    client = connect(serve(fn))
    fid = _fid()
    x = torch.randn(5, 4)
    _forward(client, x, fid)
    g = torch.randn(5, 3)
    first = _backward(client, g, fid, backward_seq=1)
    assert _backward(client, g, fid, backward_seq=1).equal(first)
    assert fn.stats()["steps"] == 1 and fn.stats()["replayed_backward_calls"] == 1
    with pytest.raises(grpc.RpcError) as e:
        _backward(client, g, fid, backward_seq=3)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "out of order" in e.value.details() and "backward 2" in e.value.details()
    second = _backward(client, g, fid, backward_seq=2)  # stale: recomputed after the step
    assert fn.stats()["steps"] == 2 and fn.stats()["recomputed"] == 1
    assert _backward(client, g, fid, backward_seq=2).equal(second)
    assert fn.stats()["steps"] == 2
    with pytest.raises(grpc.RpcError) as e:
        _backward(client, g, fid, backward_seq=1)  # only the latest answer is kept
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION


class _Gate(torch.autograd.Function):
    """Identity whose backward waits (bounded) until the test opens the gate."""

    gate = threading.Event()

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        assert _Gate.gate.wait(30), "the test never opened the gate"
        return g


class _GatedLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(_Gate.apply(x))


class _CountBackward(grpc.ServerInterceptor):
    def __init__(self, n: int) -> None:
        self.calls = 0
        self.reached = threading.Event()
        self.n = n

    def intercept_service(self, continuation, details):
        if details.method.endswith("/ComputeBackward"):
            self.calls += 1
            if self.calls >= self.n:
                self.reached.set()
        return continuation(details)


def test_client_retries_a_backward_that_timed_out_while_running(serve, connect) -> None:
    """The first backward attempt runs out of time while the server is still in it; the
    client's own (C) retries reach the server, wait for it or find its answer: the
    client gets the input gradient of a single optimizer step."""
    _Gate.gate.clear()
    torch.manual_seed(0)
    model = _GatedLinear()
    w0 = model.lin.weight.detach().clone()
    fn = TrainableComputeFunction(model, lambda p: torch.optim.SGD(p, lr=0.5))
    counter = _CountBackward(2)
    server = serve(fn, interceptors=[counter])
    client = connect(server, retry_strategy=slc.FixedDelay(max_retries=50, delay=0.02,
                                                           attempt_timeout=0.3))
    x = torch.randn(5, 4, requires_grad=True)
    result = {}

    def train():
        try:
            client.remote(x).sum().backward()
            result["ok"] = True
        except BaseException as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=train)
    t.start()
    try:
        assert counter.reached.wait(60), "the client never retried the backward"
    finally:
        _Gate.gate.set()
        t.join(60)
    assert not t.is_alive()
    assert result.get("ok"), result
    _assert_close([x.grad], [torch.ones(5, 3) @ w0])
    s = fn.stats()
    assert s["steps"] == 1 and s["backward_calls"] == 1
    assert s["replayed_backward_calls"] >= 1
    assert client.get_statistics()["retries"] >= 1


def test_unknown_forward_id_is_not_found(serve, connect) -> None:
    client = connect(serve(_linear_fn()))
    with pytest.raises(grpc.RpcError) as e:
        _backward(client, torch.randn(5, 3), "no-such-id")
    assert _code(e) == grpc.StatusCode.NOT_FOUND
    assert "no-such-id" in e.value.details()


def test_evicted_by_ttl_is_failed_precondition(serve, connect) -> None:
    clock = FakeClock()
    fn = _linear_fn(ttl=5.0, clock=clock)
    client = connect(serve(fn))
    fid = _fid()
    _forward(client, torch.randn(5, 4), fid)
    clock.now += 6.0
    with pytest.raises(grpc.RpcError) as e:
        _backward(client, torch.randn(5, 3), fid)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "evicted" in e.value.details() and "ttl=5" in e.value.details()
    assert fn.stats()["evicted_ttl"] == 1 and fn.stats()["waiting"] == 0


def test_evicted_by_max_entries_and_max_bytes(serve, connect) -> None:
    fn = _linear_fn(max_entries=2)
    client = connect(serve(fn))
    ids = [_fid() for _ in range(3)]
    for fid in ids:
        _forward(client, torch.randn(5, 4), fid)
    with pytest.raises(grpc.RpcError) as e:
        _backward(client, torch.randn(5, 3), ids[0])
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "evicted" in e.value.details() and "max_entries=2" in e.value.details()
    for fid in ids[1:]:
        _backward(client, torch.randn(5, 3), fid)  # the newer ones are still there

    # one forward of 1000x4 keeps input (16000 B) + output (12000 B); room for one only
    fn = _linear_fn(max_bytes=40000)
    client = connect(serve(fn))
    a, b = _fid(), _fid()
    _forward(client, torch.randn(1000, 4), a)
    assert 28000 <= fn.stats()["bytes"] <= 40000
    _forward(client, torch.randn(1000, 4), b)
    with pytest.raises(grpc.RpcError) as e:
        _backward(client, torch.randn(1000, 3), a)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "max_bytes=40000" in e.value.details()
    _backward(client, torch.randn(1000, 3), b)
    assert fn.stats()["evicted_max_bytes"] == 1

    # a forward that alone needs more than max_bytes is refused, and nothing is kept
    with pytest.raises(grpc.RpcError) as e:
        _forward(client, torch.randn(5000, 4), _fid())
    assert _code(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_bytes" in e.value.details()
    assert fn.stats()["waiting"] == 0


def test_applied_backward_whose_answer_was_dropped(serve, connect) -> None:
    clock = FakeClock()
    fn = _linear_fn(ttl=5.0, clock=clock)
    client = connect(serve(fn))
    fid = _fid()
    _forward(client, torch.randn(5, 4), fid)
    _backward(client, torch.randn(5, 3), fid)
    clock.now += 6.0
    with pytest.raises(grpc.RpcError) as e:
        _backward(client, torch.randn(5, 3), fid)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "already applied" in e.value.details()
    assert fn.stats()["steps"] == 1
    # and its id cannot be used for a new forward
    with pytest.raises(grpc.RpcError) as e:
        _forward(client, torch.randn(5, 4), fid)
    assert _code(e) == grpc.StatusCode.ALREADY_EXISTS


def test_bad_requests(serve, connect) -> None:
    fn = _linear_fn()
    client = connect(serve(fn))
    fid = _fid()
    _forward(client, torch.randn(5, 4), fid)
    with pytest.raises(grpc.RpcError) as e:  # same id, another input
        _forward(client, torch.randn(5, 4), fid)
    assert _code(e) == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as e:  # a gradient of the wrong shape
        _backward(client, torch.randn(5, 2), fid)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "(5, 3)" in e.value.details()
    _backward(client, torch.randn(5, 3), fid)  # the forward is still there for a good one
    with pytest.raises(grpc.RpcError) as e:
        _backward(client, torch.randn(5, 3), fid, learning_rate=float("nan"))
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "learning_rate" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # a training forward without an id
        client._tensor_call(torch.randn(5, 4), training_mode=True)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError):
        with torch.no_grad():
            client.remote(torch.randn(5, 4), training=True)


def test_evicted_forward_fails_loss_backward_with_the_rpc_error(serve, connect) -> None:
    fn = _linear_fn(max_entries=1)
    client = connect(serve(fn))
    y1 = client.remote(torch.randn(5, 4))
    y2 = client.remote(torch.randn(5, 4))  # pushes y1's forward out
    with pytest.raises(grpc.RpcError) as e:
        y1.sum().backward()
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION and "evicted" in e.value.details()
    y2.sum().backward()


def test_stale_forward_recomputed_or_refused(serve, connect) -> None:
    """Two forwards in flight, then their backwards: the second one's forward predates
    the first one's step. "recompute" backpropagates through the current parameters;
    "error" refuses."""
    fn = _linear_fn()
    client = connect(serve(fn))
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    f1, f2 = _fid(), _fid()
    _forward(client, x1, f1)
    _forward(client, x2, f2)
    g = torch.randn(5, 3)
    _backward(client, g, f1)
    w1 = fn.model.weight.detach().clone()
    gx2 = _backward(client, g, f2)
    _assert_close([gx2], [g @ w1])  # at the parameters after the first step
    assert fn.stats()["recomputed"] == 1 and fn.stats()["steps"] == 2

    fn = _linear_fn(on_stale="error")
    client = connect(serve(fn))
    _forward(client, x1, f1)
    _forward(client, x2, f2)
    _backward(client, g, f1)
    with pytest.raises(grpc.RpcError) as e:
        _backward(client, g, f2)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION and "stale" in e.value.details()
    assert fn.stats()["steps"] == 1


def test_stale_recompute_replays_dropout_mask(serve, connect) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Dropout(0.5))
    fn = TrainableComputeFunction(model, lambda p: torch.optim.SGD(p, lr=0.5))
    client = connect(serve(fn))
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    f1, f2 = _fid(), _fid()
    _forward(client, x1, f1)
    y2 = _forward(client, x2, f2)
    _backward(client, torch.ones(5, 64), f1)
    w = model[0].weight.detach().clone()
    gx2 = _backward(client, torch.ones(5, 64), f2)
    kept = (y2 != 0).float() * 2.0  # the mask of the original forward, scaled by 1/(1-p)
    _assert_close([gx2], [kept @ w], tol=1e-5)


def test_inference_calls_keep_nothing(serve, connect) -> None:
    fn = _linear_fn()
    client = connect(serve(fn))
    before = _params(fn.model)
    with torch.no_grad():
        y = client.remote(torch.randn(5, 4))
    assert not y.requires_grad
    client.compute(torch.randn(5, 4))
    client.remote(torch.randn(5, 4), training=False)
    s = fn.stats()
    assert s["inference_calls"] == 3 and s["training_forwards"] == 0
    assert s["waiting"] == 0 and s["bytes"] == 0
    assert all(p.grad is None for p in fn.model.parameters())
    _assert_close(_params(fn.model), before, tol=0.0)
    assert client.get_service_info()["custom_info"]["store.inference_calls"] == "3"


def test_frozen_server_returns_input_gradients_only(serve, connect) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    fn = TrainableComputeFunction(lin, optimizer=None)
    client = connect(serve(fn))
    before = _params(lin)
    x = torch.randn(5, 4, requires_grad=True)
    (client.remote(x) ** 2).sum().backward()
    xl = x.detach().clone().requires_grad_()
    (lin(xl) ** 2).sum().backward()
    _assert_close([x.grad], [xl.grad])
    lin.zero_grad(set_to_none=True)
    _assert_close(_params(lin), before, tol=0.0)
    assert fn.stats()["steps"] == 0


def test_a_hand_written_trainable_function(serve, connect) -> None:
    """The protocol of docs/training.md ("Writing your own"), without the base class:
    y = 3x; backward returns 3g; training fields reach compute_training and backward."""
    seen = []

    class Triple(slc.ComputeFunction):
        supports_training = True

        def __init__(self):
            self.kept = {}

        def compute(self, x):
            seen.append(("compute",))
            return x * 3

        def compute_training(self, x, forward_id=None, training=True):
            seen.append(("forward", forward_id is not None, training))
            self.kept[forward_id] = x.shape
            return x * 3

        def backward(self, grad_output, forward_id=None, learning_rate=None,
                     accumulation_step=None):
            seen.append(("backward", learning_rate, accumulation_step))
            if forward_id not in self.kept:
                slc.current_call().abort(grpc.StatusCode.NOT_FOUND, f"no {forward_id}")
            del self.kept[forward_id]
            return grad_output * 3

    client = connect(serve(Triple()))
    x = torch.randn(2, 5, requires_grad=True)
    client.remote(x, learning_rate=0.5, accumulation_step=2).sum().backward()
    assert torch.equal(x.grad, torch.full((2, 5), 3.0))
    with torch.no_grad():
        client.remote(x)
    assert seen == [("forward", True, True), ("backward", 0.5, 2), ("compute",)]
    with pytest.raises(grpc.RpcError) as e:
        _backward(client, torch.ones(2, 5), "nope")
    assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_server_without_backward_is_unimplemented(serve, connect) -> None:
    class Plain(slc.ComputeFunction):
        def compute(self, x):
            return x * 2

    client = connect(serve(Plain()))
    y = client.remote(torch.randn(3, 4, requires_grad=True))
    with pytest.raises(grpc.RpcError) as e:
        y.sum().backward()
    assert _code(e) == grpc.StatusCode.UNIMPLEMENTED


# -- concurrency ---------------------------------------------------------------------------------


class _SlowSGD(torch.optim.Optimizer):
    """Plain SGD that lets other threads run between parameters, so that a read of the
    parameters during a step, were it allowed, would see some updated and some not."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
                    time.sleep(0.001)  # widens the window a torn read would need


def test_several_clients_training_at_once(serve, connect) -> None:
    """4 clients x 25 steps against one server, and a prober making inference calls.

    The server's slice is ``y = x @ W.T + b`` and each client's loss is ``y.sum()``:
    every backward's parameter gradient is (sum of x rows, batch size) whatever the
    parameters are, and all the numbers are small dyadic rationals, exact in
    float32. So the final parameters must be exactly W0 - lr * (sum over ALL backward
    calls), in any order: a lost update shows. The prober's input is all ones and
    every training input too, so after k steps its output is out0 - k * lr * B * 5 in
    every component; a read of half-updated parameters lands between two such values.
    """
    clients_n, steps, batch, lr = 4, 25, 4, 0.125
    lin = torch.nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.fill_(0.5)
    fn = TrainableComputeFunction(lin, lambda p: _SlowSGD(p, lr=lr))
    server = serve(fn, max_workers=8)
    probe = torch.ones(1, 4)
    out0 = 1.0 * 4 + 0.5
    per_step = lr * batch * 5  # weight: 4 entries x batch, bias: batch
    errors: List[BaseException] = []
    torn: List[float] = []
    done = threading.Event()

    def train(i: int) -> None:
        try:
            client = connect(server)
            for _ in range(steps):
                client.remote(torch.ones(batch, 4)).sum().backward()
        except BaseException as e:
            errors.append(e)

    def prober() -> None:
        client = connect(server)
        try:
            while not done.is_set():
                with torch.no_grad():
                    v = client.remote(probe)
                k = (out0 - v[0, 0].item()) / per_step
                if k != int(k) or not v[0, 0].item() == v[0, 1].item():
                    torn.append(v[0, 0].item())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(clients_n)]
    p = threading.Thread(target=prober)
    p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    done.set()
    p.join(30)
    assert not errors, errors
    assert not torn, torn
    total = clients_n * steps
    s = fn.stats()
    assert s["steps"] == total and s["backward_calls"] == total
    assert torch.equal(lin.weight.detach(), torch.full((2, 4), 1.0 - lr * batch * total))
    assert torch.equal(lin.bias.detach(), torch.full((2,), 0.5 - lr * batch * total))
    assert s["inference_calls"] > 0
