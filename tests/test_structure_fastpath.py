"""The per-tensor fast paths of a call with many tensors (issue 10).

``_core.flatten`` walks the common structures in C and must give exactly what
the Python walker of ``_structure.flatten`` gives, or hand the object back to it
(None) for everything else; ``_core.rebuild`` wraps the received tensors and
rebuilds the structure in one pass and refuses nodes that do not describe one.
The walkers of ``_structure`` leave no reference cycles behind: a cycle kept
every tensor of a call (and its received storage) alive until the cycle
collector ran.
"""
from __future__ import annotations

import enum
import gc
import time
import warnings
import weakref
from collections import OrderedDict
from typing import Any, List, Tuple

import grpc
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="needs torch, an optional extra "
                            "(pip install splitlearn-comm[torch])")

import splitlearn_comm as slc
from splitlearn_comm import _core, _structure, _tensor

pytestmark = pytest.mark.timeout(120)


class Level(enum.IntEnum):
    LOW = 1


def python_walk(obj: Any) -> Tuple[List[Tuple[str, Any]], List[Any]]:
    leaves: List[Tuple[str, Any]] = []
    nodes: List[Any] = []
    _structure._walk(obj, "", None, leaves, nodes, set(), torch.Tensor)
    return leaves, nodes


COMMON = [
    {"hidden": torch.zeros(2, 3), "past": tuple((torch.ones(1), torch.zeros(1)) for _ in range(3))},
    (torch.zeros(1), None, True, False, 7, -(1 << 63), (1 << 63) - 1, 2.5, "text", ""),
    [[], (), {}, [torch.zeros(0)]],
    {"k\u00e9y": {"nested": [torch.arange(3), {"deep": (torch.ones(2),)}]}},
    {"a": torch.zeros(1), "b": {"c": None, "d": [1, 2.0, "x"]}},
    [torch.zeros(1)] * 12,
    # keys that make names ambiguous (empty, or with a '.') but do not collide
    {"a.b": torch.zeros(1), "c": {"d.e": (torch.ones(1),)}},
    {"": torch.zeros(1), "x": {"": torch.ones(1)}},
    ({"": torch.zeros(1)}, [torch.ones(1)]),
]

# each of these leaves the C walker: a NumPy array, subclasses (IntEnum, OrderedDict),
# a non-str key, an int beyond 64 bits, two tensors under one name
OTHER = [
    {"a": np.zeros(2)},
    {"level": Level.LOW},
    OrderedDict(a=torch.zeros(1)),
    {"m": OrderedDict(a=torch.zeros(1))},
    {1: torch.zeros(1)},
    {"big": 1 << 64},
    {"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}},
    {"a": {"b": torch.zeros(1)}, "a.b": torch.zeros(1)},  # the key after the name it meets
    {"": torch.zeros(1), "0": torch.zeros(1)},  # "" at the root is named "0"
    {"": {"x": torch.zeros(1)}, "x": torch.zeros(1)},
]


@pytest.mark.parametrize("obj", COMMON, ids=range(len(COMMON)))
def test_c_flatten_gives_what_the_python_walker_gives(obj: Any) -> None:
    fast = _core.flatten(obj, torch.Tensor)
    assert fast is not None
    leaves, nodes = python_walk(obj)
    assert [n for n, _ in fast[0]] == [n for n, _ in leaves]
    assert all(a is b for (_, a), (_, b) in zip(fast[0], leaves))
    assert fast[1] == nodes
    assert [type(n[3]) for n in fast[1]] == [type(n[3]) for n in nodes]
    form, items, nodes2 = _structure.flatten(obj)
    assert form == _structure.STRUCTURE and nodes2 == nodes


@pytest.mark.parametrize("obj", OTHER, ids=range(len(OTHER)))
def test_c_flatten_hands_the_rest_to_the_python_walker(obj: Any) -> None:
    assert _core.flatten(obj, torch.Tensor) is None
    try:
        expected: Any = python_walk(obj)[1]
    except (TypeError, ValueError) as e:
        with pytest.raises(type(e), match=str(e)[:30].replace("(", r"\(").replace(")", r"\)")):
            _structure.flatten(obj)
    else:
        assert _structure.flatten(obj)[2] == expected


def received(obj: Any) -> Tuple[int, List[Any], Any]:
    """(form, leaves, nodes) as the binding hands a received structure up: Leaf
    objects holding DLPackTensors, made here through a real round trip."""
    class Keep(slc.ComputeFunction):
        def compute(self, x: Any) -> Any:
            return x

    with slc.GRPCComputeServer(Keep(), host="127.0.0.1", port=0, max_workers=1) as server:
        with slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None,
                                   shared_memory=False) as client:
            form, items, nodes = _structure.flatten(obj)
            sendable = ([(n, t, None) for n, t in items], form, nodes)
            reply = client._attempt(sendable, [], 30.0, None)
            return reply.form, list(reply.leaves), reply.nodes


def test_rebuild_gives_the_structure_sent() -> None:
    obj = {"hidden": torch.arange(6.0).reshape(2, 3), "mask": torch.tensor([True, False]),
           "past": ((torch.ones(2), torch.zeros(2)),), "n": 3, "f": None, "flag": True}
    form, leaves, nodes = received(obj)
    out, values = _core.rebuild(form, leaves, nodes, _tensor.from_dlpack())
    assert set(out) == set(obj) and out["n"] == 3 and out["flag"] is True and out["f"] is None
    assert torch.equal(out["hidden"], obj["hidden"]) and torch.equal(out["mask"], obj["mask"])
    assert type(out["past"]) is tuple and torch.equal(out["past"][0][1], torch.zeros(2))
    assert len(values) == 4 and values[0] is out["hidden"]


@pytest.mark.parametrize("nodes, message", [
    ([(_structure.DICT, 2, None, None), (_structure.TENSOR, 0, "a", None)], "children"),
    ([(_structure.TUPLE, 2, None, None), (_structure.TENSOR, 0, None, None),
      (_structure.TENSOR, 0, None, None)], "more tensors"),
    ([(_structure.TUPLE, 1, None, None), ("x",)], "node is"),
    ([(_structure.LIST, -1, None, None)], "children"),
])
def test_rebuild_refuses_nodes_that_describe_no_structure(nodes: List[Any], message: str) -> None:
    form, leaves, _ = received({"a": torch.zeros(1)})
    with pytest.raises((ValueError, TypeError), match=message):
        _core.rebuild(_structure.STRUCTURE, leaves, nodes, _tensor.from_dlpack())


def test_the_walkers_leave_no_reference_cycles() -> None:
    """Once the walkers are done and the caller lets go, the tensors are freed at
    once: nothing waits for the cycle collector (disabled here)."""
    def walk_all() -> List[Any]:
        obj = {"hidden": torch.zeros(2),
               "past": tuple((torch.ones(1), torch.zeros(1)) for _ in range(4)),
               "extra": [np.zeros(1), Level.LOW, OrderedDict(x=torch.zeros(1))]}
        refs = [weakref.ref(t) for t in _structure.tensor_leaves(obj)]
        form, items, nodes = _structure.flatten(obj)
        _structure.unflatten(form, [t for _, t in items], [n for n, _ in items], nodes)
        _structure.replace_tensors(obj, _structure.tensor_leaves(obj))
        return refs

    gc.disable()
    try:
        refs = walk_all()
        assert len(refs) == 11 and all(r() is None for r in refs)
    finally:
        gc.enable()


class Answer(slc.ComputeFunction):
    """Returns what the call names: its input, or one of a few fixed results."""

    def compute(self, x: Any) -> Any:
        kind = x["kind"]
        if kind == "none":
            return None
        if kind == "scalars":
            return {"n": 3, "f": 0.5, "s": "s", "b": False, "nothing": None, "empty": ()}
        return x["payload"]


@pytest.mark.parametrize("kind, payload", [
    ("none", None),
    ("scalars", None),
    ("echo", {"t": (torch.arange(4), [torch.ones(2, 2), {"deep": torch.zeros(0)}])}),
    ("echo", [torch.tensor(1.5), None, 7]),
])
def test_the_binding_builds_what_the_server_returned(kind: str, payload: Any) -> None:
    """Both sides make the received object in C (Call.value, Reply.value): roots
    that are None or hold only scalars, nested containers, 0-d and empty tensors."""
    with slc.GRPCComputeServer(Answer(), host="127.0.0.1", port=0, max_workers=1) as server:
        with slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None,
                                   shared_memory=False) as client:
            out = client.compute({"kind": kind, "payload": payload, "x": torch.zeros(1)})
    if kind == "none":
        assert out is None
    elif kind == "scalars":
        assert out == {"n": 3, "f": 0.5, "s": "s", "b": False, "nothing": None, "empty": ()}
        assert type(out["b"]) is bool
    elif isinstance(payload, dict):
        assert type(out["t"]) is tuple and type(out["t"][1]) is list
        assert torch.equal(out["t"][0], payload["t"][0])
        assert torch.equal(out["t"][1][0], payload["t"][1][0])
        assert out["t"][1][1]["deep"].shape == (0,)
    else:
        assert type(out) is list and out[1] is None and out[2] == 7
        assert out[0].shape == () and float(out[0]) == 1.5


class Echo(slc.ComputeFunction):
    def compute(self, x: Any) -> Any:
        return x


def odd_tensors() -> List[Tuple[str, Any, Any]]:
    """Tensors the binding cannot export as they are: (id, tensor, the values sent)."""
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    grad = torch.arange(4.0, requires_grad=True)
    neg = torch._neg_view(torch.arange(1.0, 4.0))  # contiguous, with the negative bit
    neg_strided = z.conj().imag  # a float view with the negative bit, every other float
    assert neg.is_neg() and neg.is_contiguous() and neg_strided.is_neg()
    assert z.conj().is_conj() and z.conj().is_contiguous()
    return [
        ("conj", z.conj(), z.conj().resolve_conj()),
        ("neg", neg, neg.resolve_neg()),
        ("neg_strided", neg_strided, neg_strided.resolve_neg()),
        ("requires_grad", grad, grad.detach()),
        ("transposed", torch.arange(6.0).reshape(2, 3).t(), torch.arange(6.0).reshape(2, 3).t()),
        ("parameter", torch.nn.Parameter(torch.ones(3)), torch.ones(3)),
        ("empty_strided", torch.zeros(0, 3).t(), torch.zeros(3, 0)),
        ("zero_d", torch.tensor(2.5), torch.tensor(2.5)),
        ("numpy", np.arange(5, dtype=np.int16)[::2], torch.tensor([0, 2, 4], dtype=torch.int16)),
        ("big_endian", np.arange(3, dtype=">i4"), torch.tensor([0, 1, 2], dtype=torch.int32)),
    ]


@pytest.mark.parametrize("shm", [False, True], ids=["tcp", "shm"])
def test_every_kind_of_leaf_arrives_with_its_values(shm: bool) -> None:
    """The binding exports a plain CPU torch.Tensor through DLPack in C and hands
    every other leaf to prepare() (conjugate and negative bits resolved, autograd
    dropped, made contiguous, NumPy byte order fixed), on the client's request and
    on the server's reply, as a single tensor and inside a structure."""
    cases = odd_tensors()
    with slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=0, max_workers=1) as server:
        with slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None,
                                   shared_memory=shm) as client:
            out = client.compute({name: t for name, t, _ in cases})
            assert list(out) == [name for name, _, _ in cases]
            for name, t, want in cases:
                got = out[name]
                assert got.dtype == want.dtype and got.shape == want.shape, name
                assert torch.equal(got, want), name
                assert not got.is_conj() and not got.is_neg() and not got.requires_grad
                single = client.compute(t)
                expect = want.numpy() if isinstance(t, np.ndarray) else want
                assert type(single) is type(expect), name
                assert np.array_equal(np.asarray(single), np.asarray(expect)), name


@pytest.mark.parametrize("make, message", [
    (lambda: torch.eye(3).to_sparse(), "sparse"),
    (lambda: torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]), "nested"),
])
def test_a_leaf_that_cannot_be_sent_says_why(make: Any, message: str) -> None:
    with slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=0, max_workers=1) as server:
        with slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None) as client:
            with warnings.catch_warnings():  # torch.nested warns (once a process)
                warnings.simplefilter("ignore")
                bad = make()
            with pytest.raises(TypeError, match=message):
                client.compute({"ok": torch.zeros(1), "bad": [bad]})
            assert torch.equal(client.compute(torch.ones(2)), torch.ones(2))  # still serving


def test_a_reply_says_how_long_this_side_worked_on_the_call() -> None:
    """Reply.encode_ms (export and pack) and decode_ms (read and build) time the
    client's own stages of a blocking call, for bench_tensormap's client column;
    they are attributes only, not part of the Reply tuple."""
    with slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=0, max_workers=1) as server:
        with slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None) as client:
            replies: List[Any] = []
            t0 = time.perf_counter()
            out = client._tensor_call({"a": torch.ones(4), "b": (torch.zeros(2),)}, _reply=replies)
            wall_ms = (time.perf_counter() - t0) * 1e3
    assert torch.equal(out["a"], torch.ones(4))
    reply = replies[0]
    assert len(reply) == 12
    assert 0.0 < reply.encode_ms < wall_ms and 0.0 < reply.decode_ms < wall_ms
    assert reply.encode_ms + reply.decode_ms < wall_ms


def test_the_binding_takes_dlpack_capsules_as_leaves() -> None:
    """A leaf may be a DLPack capsule (torch.utils.dlpack.to_dlpack's): the binding
    consumes it as it is, on the client's request and on a server's reply; a capsule
    already used says so instead of being sent."""
    to_dlpack = torch.utils.dlpack.to_dlpack

    def dispatch(c: Any) -> Any:
        x = torch.from_dlpack(c.leaves[0].tensor.__dlpack__())
        return [("", to_dlpack(x * 2))], 0.0, None, 0, None

    server = _core.Server(compute=dispatch, info=lambda *_: ("t", "cpu", {}), host="127.0.0.1",
                          port=0, max_workers=1, version="t")
    server.start()
    client = _core.Client(f"127.0.0.1:{server.port}")
    try:
        reply = client.compute([("", to_dlpack(torch.arange(4.0)))], timeout=30.0)
        got = torch.from_dlpack(reply.leaves[0].tensor.__dlpack__())
        assert torch.equal(got, torch.arange(4.0) * 2)
        used = to_dlpack(torch.ones(1))
        torch.from_dlpack(used)  # consumes it: renamed "used_dltensor"
        with pytest.raises(TypeError, match="PyCapsule"):
            client.compute([("", used)], timeout=30.0)
    finally:
        client.close()
        server.stop(1.0)


class Named(slc.ComputeFunction):
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def compute(self, x: Any) -> Any:
        if isinstance(x, dict):
            return {k: v * self.scale for k, v in x.items()}
        return x * self.scale


class CountingRetry(slc.RetryStrategy):
    """A Python retry strategy: the client runs its execute() for every call."""

    def __init__(self) -> None:
        self.calls = 0

    def execute(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return func(*args, **kwargs)


def test_a_plain_tensor_call_is_the_general_call() -> None:
    """compute() of one CPU torch.Tensor with the client's settings skips flatten and
    the merges (client._plain_call, one call into the binding); what it sends,
    returns and counts is what the general path gives: the client's model_id, the
    statistics; a Python retry strategy's execute(), a structure and an explicit
    argument go the general way."""
    server = slc.GRPCComputeServer({"double": Named(2.0), "triple": Named(3.0)},
                                   host="127.0.0.1", port=0, max_workers=1)
    with server:
        target = f"127.0.0.1:{server.port}"
        strategy = CountingRetry()
        with slc.GRPCComputeClient(target, retry_strategy=strategy, model_id="triple") as client:
            x = torch.arange(3.0)
            assert torch.equal(client.compute(x), x * 3)  # the client's model_id
            assert strategy.calls == 1
            assert torch.equal(client.compute(x, model_id="double"), x * 2)  # general path
            assert torch.equal(client.compute({"x": x})["x"], x * 3)
            stats = client.get_statistics()
            assert stats["successful_requests"] == 3 and stats["failed_requests"] == 0
            assert stats["bytes_sent"] > 3 * 12 and stats["bytes_received"] > 3 * 12
            with pytest.raises(TypeError):
                client.compute(torch.zeros(2, dtype=torch.bool).to_sparse())
        with slc.GRPCComputeClient(target, retry_strategy=None, model_id="nope") as client:
            with pytest.raises(slc.RpcError) as e:
                client.compute(torch.ones(1))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert client.get_statistics()["failed_requests"] == 1
            assert client.get_statistics()["failures_by_code"] == {"NOT_FOUND": 1}


def test_the_one_call_path_counts_what_the_general_path_counts() -> None:
    """Client.plain counts a call in C (CallStats); the same tensor through the
    general path (an explicit timeout) counts the same bytes, and a failure through
    either is counted by its status."""
    class Picky(slc.ComputeFunction):
        def compute(self, input_tensor: Any) -> Any:
            if input_tensor.numel() == 5:
                raise ValueError("five is refused")
            return input_tensor * 2

    server = slc.GRPCComputeServer(Picky(), host="127.0.0.1", port=0, max_workers=2)
    with server, slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None) as client:
        x = torch.arange(4.0)
        assert torch.equal(client.compute(x), x * 2)
        one = client.get_statistics()
        assert one["successful_requests"] == one["total_requests"] == 1
        assert one["requests_by_transport"] == {"unary": 1, "stream": 0, "shared_memory": 0}
        assert one["avg_total_time_ms"] > 0 and one["p50_total_time_ms"] > 0
        assert torch.equal(client.compute(x, timeout=30.0), x * 2)  # the general path
        two = client.get_statistics()
        assert two["bytes_sent"] == 2 * one["bytes_sent"] > 16
        assert two["bytes_received"] == 2 * one["bytes_received"] > 16
        for call in (lambda: client.compute(torch.ones(5)),
                     lambda: client.compute(torch.ones(5), timeout=30.0)):
            with pytest.raises(slc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert "five is refused" in e.value.details()
        stats = client.get_statistics()
        assert stats["failed_requests"] == 2 and stats["successful_requests"] == 2
        assert stats["total_requests"] == 4
        assert stats["failures_by_code"] == {"INTERNAL": 2}
        with pytest.raises(TypeError, match="CallStats"):
            client._live().plain(x, 0.0, [], False, None, None, None, _tensor.from_dlpack(),
                                 None, 1, {})


def test_call_stats_keep_the_latest_4096_latencies() -> None:
    stats = _core.CallStats()
    for i in range(5000):
        stats.record(True, float(i), 0.25, None)
    stats.record(False, 9999.0, None, None)
    stats.count_error("UNAVAILABLE", 3)
    stats.count_error("UNAVAILABLE", 1)
    s = stats.snapshot()
    assert s["total"] == 5001 and s["ok"] == 5000 and s["failed"] == 1
    assert s["retries"] == 2
    assert s["by_code"] == {"UNAVAILABLE": 2}
    assert len(s["recent"]) == 4096
    assert s["recent"][0] == 905.0 and s["recent"][-2:] == [4999.0, 9999.0]
    assert s["total_ms"] == sum(range(5000))
    assert s["compute_ms"] == 1250.0
    with pytest.raises(TypeError):
        stats.record(True, 1.0, None)
