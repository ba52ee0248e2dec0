"""Many tensors per call: structures of named tensors end to end.

A real server and client on 127.0.0.1 carry dicts, tuples, lists and nestings of
them (with scalar and None leaves) both ways; every dtype inside a structure; one
codec or a mapping of codecs, on the request and on the reply; the server's limits
(tensors per message, nesting depth); the original library's KV-cache fields from a
stock grpcio client and to a stock grpcio server; and malformed structures sent by a
raw grpcio client, each refused with INVALID_ARGUMENT naming the problem while the
server keeps serving.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
from typing import Any, Dict, Iterator, List, Tuple

import grpc
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="needs torch, an optional extra "
                            "(pip install splitlearn-comm[torch])")

import splitlearn_comm as slc
from splitlearn_comm.codecs import CompressedTensorCodec, Float16Codec, Int8Codec, SparseCOOCodec
from test_interop import CALL_TIMEOUT, Stubs, generate_stubs


class Recorder(slc.ComputeFunction):
    """Echoes its input; keeps what compute() received."""

    def __init__(self) -> None:
        self.seen: List[Any] = []

    def compute(self, x: Any) -> Any:
        self.seen.append(x)
        return x


def same(a: Any, b: Any) -> None:
    """a and b are the same structure: container types, keys, tensors bit for bit,
    scalars of the same kind."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                           b.view(-1).view(torch.uint8) if b.numel() else b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a == b or (a != a and b != b)


def kv_cache(layers: int = 3, seed: int = 0) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g))
                 for _ in range(layers))


STRUCTURES = {
    "dict": lambda: {"hidden": torch.randn(2, 3), "mask": torch.ones(2, 3, dtype=torch.bool)},
    "tuple": lambda: (torch.randn(4), torch.arange(3)),
    "list": lambda: [torch.randn(2), torch.randn(1, 1), torch.zeros(0, 3)],
    "kv-cache": lambda: kv_cache(),
    "dict-of-tuples": lambda: {"past": kv_cache(2), "ids": torch.tensor([[1, 2, 3]])},
    "deep": lambda: {"a": [({"b": (torch.ones(1),)},)], "c": [[[]]]},
    "scalars": lambda: {"n": 3, "f": 0.25, "b": False, "s": "text", "none": None,
                        "big": -(1 << 62), "nan": float("nan"), "zero_d": torch.tensor(1.5),
                        "int_zero_d": torch.tensor(7)},
    "empty-dict": lambda: {},
    "empty-tuple": lambda: (),
    "none": lambda: None,
    "single-in-tuple": lambda: (torch.randn(3),),
}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_structure_arrives_and_comes_back_as_sent(serve, connect, name: str) -> None:
    fn = Recorder()
    client = connect(serve(fn))
    x = STRUCTURES[name]()
    y = client.compute(x)
    same(fn.seen[-1], x)   # compute() got the same structure, types and names
    same(y, x)             # and what it returned came back the same way


def test_compute_returns_a_structure_for_a_tensor(serve, connect) -> None:
    class Split(slc.ComputeFunction):
        def compute(self, x):
            return {"logits": x * 2, "aux": (x.sum(), x.argmax()), "ok": True, "tag": None}

    client = connect(serve(Split()))
    x = torch.randn(5)
    y = client.compute(x)
    assert torch.equal(y["logits"], x * 2)
    assert torch.equal(y["aux"][0], x.sum()) and y["aux"][0].shape == ()
    assert y["aux"][1].dtype == torch.int64
    assert y["ok"] is True and y["tag"] is None


def test_numpy_structures_come_back_as_numpy(serve, connect) -> None:
    client = connect(serve(Recorder()))
    x = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": [np.float32(2.5)]}
    y = client.compute(x)
    assert isinstance(y["a"], np.ndarray) and y["a"].dtype == np.int16
    np.testing.assert_array_equal(y["a"], x["a"])
    assert isinstance(y["b"][0], np.ndarray) and y["b"][0].shape == ()


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
          torch.bool]


def test_every_dtype_inside_one_structure(serve, connect) -> None:
    fn = Recorder()
    client = connect(serve(fn))
    g = torch.Generator().manual_seed(1)
    x = {}
    for i, dt in enumerate(DTYPES):
        shape = (2, i % 3 + 1)
        if dt == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        elif dt.is_floating_point or dt.is_complex:
            t = torch.randn(shape, generator=g).to(dt)
        else:
            t = torch.randint(0, 100, shape, generator=g).to(dt)
        x[str(dt).replace("torch.", "")] = (t, t[0, 0])   # a 0-d tensor of each dtype too
    same(client.compute(x), x)
    same(fn.seen[-1], x)


def test_one_codec_encodes_floating_tensors_and_sends_the_rest_raw(serve, connect) -> None:
    fn = Recorder()
    server = serve(fn)
    client = connect(server, codec=Float16Codec())
    h = torch.randn(4, 8)
    ids = torch.arange(8) * 1_000_003
    mask = torch.rand(4, 8) > 0.5
    y = client.compute({"hidden": h, "ids": ids, "mask": mask})
    seen = fn.seen[-1]
    assert torch.equal(seen["hidden"], h.half().float())   # float16 on the wire, both ways
    assert torch.equal(y["hidden"], h.half().float())
    assert torch.equal(seen["ids"], ids) and torch.equal(y["ids"], ids)
    assert torch.equal(seen["mask"], mask) and torch.equal(y["mask"], mask)


def test_codec_mapping_by_name_and_path_prefix(serve, connect) -> None:
    fn = Recorder()
    client = connect(serve(fn), codec={"hidden": Int8Codec(), "past": Float16Codec(),
                                       "past.1": CompressedTensorCodec(),
                                       "sparse": SparseCOOCodec()})
    h = torch.randn(3, 5)
    past = kv_cache(2)
    sparse = torch.zeros(100, dtype=torch.int32)
    sparse[7] = 5
    y = client.compute({"hidden": h, "past": past, "sparse": sparse, "raw": h})
    seen = fn.seen[-1]
    step = float(h.max() - h.min()) / 255
    assert (seen["hidden"] - h).abs().max() <= step / 2 + 1e-6           # int8
    assert torch.equal(seen["past"][0][1], past[0][1].half().float())    # float16 by prefix
    assert torch.equal(seen["past"][1][0], past[1][0])                   # the longer prefix: zstd
    assert torch.equal(seen["sparse"], sparse)                           # int: sparse takes it
    assert torch.equal(seen["raw"], h)                                   # not mapped: raw
    assert torch.equal(y["raw"], h)


def test_server_codec_mapping_applies_to_the_reply(serve, connect) -> None:
    class Out(slc.ComputeFunction):
        def compute(self, x):
            return {"logits": x, "labels": x.argmax(dim=-1), "copy": x.clone()}

    client = connect(serve(Out(), codec={"logits": Float16Codec()}))
    x = torch.randn(3, 4)
    y = client.compute(x)
    assert torch.equal(y["logits"], x.half().float())
    assert torch.equal(y["copy"], x)
    assert torch.equal(y["labels"], x.argmax(dim=-1))


def test_reply_follows_the_request_codec_for_floating_tensors(serve, connect) -> None:
    class Out(slc.ComputeFunction):
        def compute(self, x):
            return (x["h"] * 1, x["h"].argmax(dim=-1))

    client = connect(serve(Out()), codec=Float16Codec())
    x = torch.randn(2, 6)
    y = client.compute({"h": x})
    assert torch.equal(y[0], x.half().float())
    assert y[1].dtype == torch.int64 and torch.equal(y[1], x.half().float().argmax(dim=-1))


class HalfBytes(slc.TensorCodec):
    """A Python codec: float32 as float16 bytes."""

    codec_name = "test.half-bytes"

    def encode(self, tensor):
        return tensor.detach().half().numpy().tobytes(), tuple(tensor.shape)

    def decode(self, data, shape):
        return torch.from_numpy(np.frombuffer(bytes(data), dtype=np.float16).copy()).float().reshape(shape)


def test_python_codec_inside_a_structure(serve, connect) -> None:
    fn = Recorder()
    client = connect(serve(fn, codecs=[HalfBytes()]), codec={"a": HalfBytes()})
    a, b = torch.randn(3), torch.arange(4)
    y = client.compute({"a": a, "b": b})
    assert torch.equal(fn.seen[-1]["a"], a.half().float())
    assert torch.equal(fn.seen[-1]["b"], b)
    assert torch.equal(y["a"], a.half().float().half().float())   # the reply in the same codec
    assert torch.equal(y["b"], b)


def test_per_call_codec_and_model_id(serve, connect) -> None:
    seen = []

    class Ids(slc.ComputeFunction):
        def compute(self, x):
            call = slc.current_call()
            seen.append(call.request_metadata)
            return x

    client = connect(serve(Ids()))
    x = torch.randn(8)
    assert torch.equal(client.compute({"x": x}, codec=Float16Codec())["x"], x.half().float())
    assert torch.equal(client.compute({"x": x})["x"], x)


def test_structure_errors_are_clear_before_sending(echo_client) -> None:
    with pytest.raises(TypeError, match="dict keys must be str"):
        echo_client.compute({1: torch.ones(1)})
    with pytest.raises(TypeError, match="cannot send a object at 'a.0'"):
        echo_client.compute({"a": [object()]})
    with pytest.raises(ValueError, match="same name 'a.b'"):
        echo_client.compute({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}})
    with pytest.raises(TypeError, match="mapping of name to TensorCodec"):
        echo_client.compute({"a": torch.ones(1)}, codec=[Float16Codec()])


def test_server_limits_are_invalid_argument_and_it_keeps_serving(serve, connect) -> None:
    server = serve(Recorder(), max_tensors=4, max_depth=3)
    client = connect(server)
    with pytest.raises(slc.RpcError) as info:
        client.compute([torch.ones(1)] * 5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "carries 5 tensors; the limit is 4" in info.value.details()
    with pytest.raises(slc.RpcError) as info:
        client.compute([[[[torch.ones(1)]]]])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "deeper than 3 levels" in info.value.details()
    same(client.compute([[[torch.ones(1)]]]), [[[torch.ones(1)]]])
    with pytest.raises(ValueError, match="max_tensors must be at least 1"):
        slc.GRPCComputeServer(Recorder(), max_tensors=0)


def test_decoded_bytes_are_bounded_per_call_over_all_tensors(serve, connect) -> None:
    client = connect(serve(Recorder(), max_decoded_bytes=3000), codec=SparseCOOCodec())
    one = torch.zeros(500)          # 2000 bytes decoded: fine alone
    assert torch.equal(client.compute({"a": one})["a"], one)
    with pytest.raises(slc.RpcError) as info:
        client.compute({"a": one, "b": one})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_decoded_bytes" in info.value.details()


# ---------------------------------------------------------------------------
# the original library's KV cache (fields past_key_values = 8, present = 7)
# ---------------------------------------------------------------------------

class CachedBlock(slc.ComputeFunction):
    """compute(x, past_key_values, use_cache) as the original's servers called it:
    appends one position to each layer's cache."""

    def __init__(self) -> None:
        self.calls: List[Tuple[Any, Any]] = []

    def compute(self, input_tensor, past_key_values=None, use_cache=False):
        self.calls.append((past_key_values, use_cache))
        out = input_tensor + 1
        if not use_cache:
            return out
        present = []
        for i in range(2):
            new = torch.full((1, 2, 1, 4), float(i))
            if past_key_values is not None:
                k, v = past_key_values[i]
                present.append((torch.cat([k, new], dim=2), torch.cat([v, new + 10], dim=2)))
            else:
                present.append((new, new + 10))
        return out, tuple(present)


def test_compute_with_cache_between_our_client_and_server(serve, connect) -> None:
    fn = CachedBlock()
    client = connect(serve(fn))
    x = torch.randn(1, 3)
    out, present, timing = client.compute_with_cache(x, use_cache=True)
    assert torch.equal(out, x + 1)
    assert len(present) == 2 and present[0][0].shape == (1, 2, 1, 4)
    assert set(timing) == {"network_total_ms", "server_compute_ms", "network_overhead_ms"}
    out, present2, _ = client.compute_with_cache(x, past_key_values=present, use_cache=True,
                                                 model_id="block-1")
    assert present2[1][1].shape == (1, 2, 2, 4)
    assert torch.equal(present2[1][1][:, :, :1], present[1][1])
    assert fn.calls[-1][1] is True and len(fn.calls[-1][0]) == 2
    out, present3, _ = client.compute_with_cache(x)          # use_cache False: no cache back
    assert present3 is None and torch.equal(out, x + 1)


def test_cache_to_a_compute_function_without_cache_keywords(serve, connect) -> None:
    client = connect(serve(Recorder()))
    x = torch.randn(2)
    out, present, _ = client.compute_with_cache(x)            # no cache sent: a plain call
    assert torch.equal(out, x) and present is None
    with pytest.raises(slc.RpcError) as info:
        client.compute_with_cache(x, past_key_values=kv_cache(1), use_cache=True)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes no past_key_values" in info.value.details()


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Stubs:
    return generate_stubs(tmp_path_factory.mktemp("tensormap_stubs"))


def f32(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().astype("<f4").tobytes()


def test_original_client_sends_a_kv_cache_to_our_server(serve, stubs: Stubs) -> None:
    """A stock grpcio client on the original's fields only (data, shape,
    past_key_values, use_cache), as the pure-Python library sent them."""
    fn = CachedBlock()
    server = serve(fn)
    pb = stubs.pb
    x = torch.randn(1, 3)
    past = [(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)) for _ in range(2)]
    request = pb.ComputeRequest(data=f32(x), shape=list(x.shape), use_cache=True)
    for k, v in past:
        request.past_key_values.add(key_data=f32(k), key_shape=list(k.shape),
                                    value_data=f32(v), value_shape=list(v.shape))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = stubs.rpc.ComputeServiceStub(channel)
        resp = stub.Compute(request, timeout=CALL_TIMEOUT)
    got_past, use_cache = fn.calls[-1]
    assert use_cache is True
    assert torch.equal(got_past[1][0], past[1][0]) and torch.equal(got_past[0][1], past[0][1])
    out = np.frombuffer(resp.data, dtype="<f4").reshape(tuple(resp.shape))
    np.testing.assert_array_equal(out, (x + 1).numpy())
    assert len(resp.present_key_values) == 2
    entry = resp.present_key_values[1]
    assert list(entry.key_shape) == [1, 2, 4, 4]
    key = np.frombuffer(entry.key_data, dtype="<f4").reshape(tuple(entry.key_shape))
    np.testing.assert_array_equal(key[:, :, :3], past[1][0].numpy())
    assert not resp.tensors and not resp.structure   # nothing but the original's fields


class OriginalServicer:
    """A stock grpcio server with the original's KV-cache behaviour (float32,
    fields 1-15 only)."""

    def __init__(self, stubs: Stubs) -> None:
        self.pb = stubs.pb
        self.requests: List[Any] = []

    def Compute(self, request, context):
        self.requests.append(request)
        x = np.frombuffer(request.data, dtype="<f4").reshape(tuple(request.shape))
        resp = self.pb.ComputeResponse(data=(x * 3).astype("<f4").tobytes(),
                                       shape=list(request.shape), compute_time_ms=1.25)
        if request.use_cache:
            for e in request.past_key_values:
                k = np.frombuffer(e.key_data, dtype="<f4")
                resp.present_key_values.add(key_data=(k + 1).astype("<f4").tobytes(),
                                            key_shape=list(e.key_shape),
                                            value_data=e.value_data, value_shape=list(e.value_shape))
        return resp


@contextlib.contextmanager
def original_server(stubs: Stubs) -> Iterator[Tuple[int, OriginalServicer]]:
    servicer = OriginalServicer(stubs)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler("splitlearn.comm.ComputeService", {
        "Compute": grpc.unary_unary_rpc_method_handler(
            servicer.Compute, request_deserializer=stubs.pb.ComputeRequest.FromString,
            response_serializer=stubs.pb.ComputeResponse.SerializeToString)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(grace=None)


def test_our_compute_with_cache_against_the_original_server(stubs: Stubs) -> None:
    with original_server(stubs) as (port, servicer):
        with slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None) as client:
            x = torch.randn(2, 3)
            past = kv_cache(2)
            out, present, timing = client.compute_with_cache(x, past_key_values=past,
                                                             use_cache=True)
    assert torch.allclose(out, x * 3)
    assert timing["server_compute_ms"] == pytest.approx(1.25)
    assert len(present) == 2
    assert torch.equal(present[1][0], past[1][0] + 1)
    assert torch.equal(present[0][1], past[0][1])
    request = servicer.requests[-1]
    assert request.use_cache and len(request.past_key_values) == 2
    assert not request.tensors and not request.structure


# ---------------------------------------------------------------------------
# malformed structures from a raw grpcio client
# ---------------------------------------------------------------------------

def named(pb: Any, name: str, shape=(1,)) -> Any:
    return pb.NamedTensor(name=name, dtype="float32", shape=list(shape))


ONE = np.ones(1, dtype="<f4").tobytes()


def _malformed(pb: Any) -> Dict[str, Tuple[Any, str]]:
    N = pb.StructureNode
    return {
        "duplicate names": (pb.ComputeRequest(tensors=[named(pb, "a"), named(pb, "a")],
                                              tensor_data=[ONE, ONE]),
                            "duplicate tensor name 'a'"),
        "descriptor mismatch": (pb.ComputeRequest(tensors=[named(pb, "a"), named(pb, "b")],
                                                  tensor_data=[ONE]),
                                "2 tensor descriptors (field 19) but 1 tensor_data"),
        "structure mismatch": (pb.ComputeRequest(
            tensors=[named(pb, "a")], tensor_data=[ONE],
            structure=[N(kind=N.TUPLE, size=2), N(kind=N.TENSOR), N(kind=N.TENSOR)]),
            "2 tensor leaves but the message carries 1"),
        "too many": (pb.ComputeRequest(tensors=[named(pb, f"t{i}") for i in range(9)],
                                       tensor_data=[ONE] * 9),
                     "carries 9 tensors; the limit is 8"),
        "too deep": (pb.ComputeRequest(
            tensors=[named(pb, "a")], tensor_data=[ONE],
            structure=[N(kind=N.LIST, size=1)] * 6 + [N(kind=N.TENSOR)]),
            "deeper than 5 levels"),
        "duplicate dict key": (pb.ComputeRequest(
            tensors=[named(pb, "a"), named(pb, "b")], tensor_data=[ONE, ONE],
            structure=[N(kind=N.DICT, size=2), N(kind=N.TENSOR, key="k"),
                       N(kind=N.TENSOR, key="k")]),
            "duplicate key 'k'"),
        "bad byte count": (pb.ComputeRequest(tensors=[named(pb, "a", (3,))], tensor_data=[ONE]),
                           "tensor 'a'"),
        "unknown kind": (pb.ComputeRequest(structure=[N(kind=N.KIND_UNSPECIFIED)]),
                         "unknown kind 0"),
        "both forms": (pb.ComputeRequest(data=ONE, shape=[1], tensors=[named(pb, "a")],
                                         tensor_data=[ONE]),
                       "both the single-tensor fields"),
        "unknown codec": (pb.ComputeRequest(tensors=[pb.NamedTensor(name="x", shape=[1],
                                                                    codec="nope")],
                                            tensor_data=[ONE]),
                          "tensor 'x': unknown codec 'nope'"),
    }


@pytest.mark.parametrize("case", ["duplicate names", "descriptor mismatch", "structure mismatch",
                                  "too many", "too deep", "duplicate dict key", "bad byte count",
                                  "unknown kind", "both forms", "unknown codec"])
def test_malformed_structures_from_a_raw_grpcio_client(serve, stubs: Stubs, case: str) -> None:
    server = serve(Recorder(), max_tensors=8, max_depth=5)
    request, expected = _malformed(stubs.pb)[case]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = stubs.rpc.ComputeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Compute(request, timeout=CALL_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in info.value.details()
        # the server keeps serving, named tensors from a stock client included
        ok = stub.Compute(stubs.pb.ComputeRequest(tensors=[named(stubs.pb, "z", (1,))],
                                                  tensor_data=[ONE]), timeout=CALL_TIMEOUT)
        assert [t.name for t in ok.tensors] == ["z"] and ok.tensor_data == [ONE]


def test_stock_client_map_form_is_a_dict_by_name(serve, stubs: Stubs) -> None:
    fn = Recorder()
    server = serve(fn)
    pb = stubs.pb
    request = pb.ComputeRequest(tensors=[named(pb, "x", (1,)), pb.NamedTensor(
        name="ids", dtype="int64", shape=[2])], tensor_data=[ONE, np.arange(2).tobytes()])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        resp = stubs.rpc.ComputeServiceStub(channel).Compute(request, timeout=CALL_TIMEOUT)
    assert list(fn.seen[-1]) == ["x", "ids"] and fn.seen[-1]["ids"].dtype == torch.int64
    # a dict comes back as a structure (a DICT node, then its two tensors)
    assert [t.name for t in resp.tensors] == ["x", "ids"]
    assert resp.structure[0].kind == pb.StructureNode.DICT and resp.structure[0].size == 2


# ---------------------------------------------------------------------------
# remote() with structures: gradients to every floating input
# ---------------------------------------------------------------------------

class TwoInTwoOut(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(5, 5)
        self.l2 = torch.nn.Linear(5, 3)

    def forward(self, x):
        y1 = self.l1(x["a"] * x["mask"]) * x["scale"] + x["b"]
        y2 = self.l2(x["b"]).tanh()
        return {"y1": y1, "pair": (y2, y1.argmax(dim=-1)), "note": "ok"}


def test_remote_two_inputs_two_outputs_equal_local_autograd(serve, connect) -> None:
    import copy

    torch.manual_seed(0)
    server_model = TwoInTwoOut()
    local_model = copy.deepcopy(server_model)
    bottom = torch.nn.Linear(4, 5)
    local_bottom = copy.deepcopy(bottom)
    fn = slc.TrainableComputeFunction(server_model, lambda p: torch.optim.SGD(p, lr=0.1))
    client = connect(serve(fn))
    x = torch.randn(3, 4)
    b0 = torch.randn(3, 5)
    mask = torch.rand(3, 5) > 0.5

    b = b0.clone().requires_grad_(True)
    out = client.remote({"a": bottom(x), "b": b, "mask": mask, "scale": 2.0})
    assert out["note"] == "ok" and out["pair"][1].dtype == torch.int64
    assert not out["pair"][1].requires_grad and out["y1"].requires_grad
    loss = out["y1"].pow(2).sum() + out["pair"][0].sum() * 3
    loss.backward()

    lb = b0.clone().requires_grad_(True)
    lout = local_model({"a": local_bottom(x), "b": lb, "mask": mask, "scale": 2.0})
    lloss = lout["y1"].pow(2).sum() + lout["pair"][0].sum() * 3
    lloss.backward()
    torch.optim.SGD(local_model.parameters(), lr=0.1).step()

    assert torch.allclose(out["y1"], lout["y1"], atol=1e-6)
    assert torch.equal(out["pair"][1], lout["pair"][1])
    assert torch.allclose(bottom.weight.grad, local_bottom.weight.grad, atol=1e-6)
    assert torch.allclose(bottom.bias.grad, local_bottom.bias.grad, atol=1e-6)
    assert torch.allclose(b.grad, lb.grad, atol=1e-6)
    for p, q in zip(server_model.parameters(), local_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)          # the server stepped as local SGD did
    stats = fn.stats()
    assert stats["backward_calls"] == 1                 # both outputs' gradients in one call


def test_remote_module_with_several_inputs_and_an_unused_output(serve, connect) -> None:
    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            a, b, ids = x
            return a * self.w, b + 1, ids * 2

    fn = slc.TrainableComputeFunction(Pair())
    module = slc.RemoteModule(connect(serve(fn)))
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    ids = torch.arange(3)
    ya, yb, yids = module(a, b, ids)
    assert torch.equal(yids, ids * 2) and not yids.requires_grad
    ya.sum().backward()                                  # yb unused: its gradient is zero
    assert torch.allclose(a.grad, torch.full((4,), 2.0))
    assert b.grad is not None and torch.equal(b.grad, torch.zeros(2))


def test_server_and_its_compute_function_in_a_cycle_are_collected() -> None:
    """_core.Server supports the cycle GC: a compute function that refers back to its
    server (a common pattern: it reads server.metrics()) does not keep both alive."""
    import gc
    import weakref

    class SelfAware(slc.ComputeFunction):
        def compute(self, x):
            return x

    fn = SelfAware()
    server = slc.GRPCComputeServer(fn, host="127.0.0.1", port=0).start()
    fn.server = server                              # the cycle: server -> core -> fn -> server
    with slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None) as client:
        assert client.compute({"a": torch.ones(2)})["a"].sum() == 2
    server.stop(grace=0)
    alive = weakref.ref(fn)
    del fn, server
    gc.collect()
    assert alive() is None


def test_a_session_carries_structures(serve, connect) -> None:
    """Server-side sessions and structures together: each step sends a dict, the
    session keeps a KV-cache-like tuple on the server, the reply is a structure."""

    class Grow(slc.ComputeFunction):
        def compute(self, x):
            state = slc.current_call().session
            past = state.get("past", ())
            state["past"] = past + ((x["k"], x["v"]),)
            return {"layers": len(state["past"]), "last": (x["k"] * 2, x["mask"])}

    client = connect(serve(Grow()))
    with client.session() as s:
        for step in range(3):
            y = s.compute({"k": torch.full((2,), float(step)), "v": torch.zeros(2),
                           "mask": torch.tensor([True, False])})
            assert y["layers"] == step + 1
            assert torch.equal(y["last"][0], torch.full((2,), 2.0 * step))
            assert y["last"][1].dtype == torch.bool
