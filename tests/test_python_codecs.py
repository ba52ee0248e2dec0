"""Python codecs in the core's codec table: the C core calls a TensorCodec written
in Python through GIL-taking trampolines, so it encodes and decodes every tensor on
both sides, inside structures too. A codec that raises, returns the wrong thing or
decodes to more than its payload declares gives a clear error naming the codec,
and the server keeps serving."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import splitlearn_comm as slc
from splitlearn_comm.codecs import CodecError
from splitlearn_comm.core import TensorCodec

from conftest import Echo, NEEDS_TORCH

torch = pytest.importorskip("torch", reason=NEEDS_TORCH)

pytestmark = pytest.mark.timeout(120)


class Counting(TensorCodec):
    """float32 on the wire, scaled by 2 (so that a tensor that skipped the codec
    would show), counting its calls per thread-safe counter."""

    codec_name = "counting"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.encoded = 0
        self.decoded = 0

    def encode(self, tensor):
        with self.lock:
            self.encoded += 1
        data = (tensor.float() * 2).numpy().tobytes()
        return data, tuple(tensor.shape), {"dtype": str(tensor.dtype).replace("torch.", "")}

    def decode(self, data, shape, metadata):
        with self.lock:
            self.decoded += 1
        t = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape) / 2
        return t.to(getattr(torch, metadata["dtype"]))


class Recorder(slc.ComputeFunction):
    def __init__(self) -> None:
        self.seen = []

    def compute(self, x):
        self.seen.append(x)
        return {"logits": x["hidden"] * 3, "ids": x["ids"] + 1, "pair": (x["hidden"][:1], None)}


def test_python_codec_inside_a_structure_both_directions(serve, connect):
    server_codec, client_codec = Counting(), Counting()
    fn = Recorder()
    client = connect(serve(fn, codecs=[server_codec]), codec=client_codec)
    hidden = torch.randn(3, 4)
    ids = torch.arange(5)
    out = client.compute({"hidden": hidden, "ids": ids, "mask": torch.ones(3, dtype=torch.bool)})
    seen = fn.seen[0]
    assert torch.equal(seen["hidden"], hidden) and seen["hidden"].dtype == torch.float32
    assert torch.equal(seen["ids"], ids) and seen["mask"].dtype == torch.bool
    assert torch.equal(out["logits"], hidden * 3) and torch.equal(out["ids"], ids + 1)
    assert isinstance(out["pair"], tuple) and out["pair"][1] is None
    assert torch.equal(out["pair"][0], hidden[:1])
    # the float tensors went through the codec each way; the integer and bool ones raw
    assert client_codec.encoded == 1 and server_codec.decoded == 1
    assert server_codec.encoded == 2 and client_codec.decoded == 2  # answered in its codec


def test_python_codec_by_name_in_a_server_mapping(serve, connect):
    server_codec, client_codec = Counting(), Counting()
    client = connect(serve(Recorder(), codec={"logits": server_codec}), codecs=[client_codec])
    hidden = torch.randn(2, 2)
    out = client.compute({"hidden": hidden, "ids": torch.arange(2)})
    assert torch.equal(out["logits"], hidden * 3)
    assert server_codec.encoded == 1 and client_codec.decoded == 1  # only "logits"


def test_python_codec_through_the_async_path(serve, connect):
    codec = Counting()
    client = connect(serve(Echo(), codecs=[Counting()]), codec=codec)
    x = {"a": torch.randn(4), "b": (torch.randn(2, 2),)}
    y = client.compute_async(x).result(timeout=60)
    assert torch.equal(y["a"], x["a"]) and torch.equal(y["b"][0], x["b"][0])
    assert codec.encoded == 2 and codec.decoded == 2


# -- errors: clear, naming the codec; the server keeps serving ------------------------


class Plain(TensorCodec):
    codec_name = "plain"

    def encode(self, tensor):
        return tensor.numpy().tobytes(), tuple(tensor.shape)

    def decode(self, data, shape):
        return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)


def _still_serving(client):
    x = torch.ones(3)
    assert client.health_check()
    assert torch.equal(client.compute(x, codec=None), x)


def _broken(**overrides):
    return type("Broken", (Plain,), {"codec_name": "plain", **overrides})()


@pytest.mark.parametrize("decode,expect", [
    (lambda self, data, shape: (_ for _ in ()).throw(RuntimeError("bad payload")),
     "decode() raised RuntimeError: bad payload"),
    (lambda self, data, shape: "not a tensor", "decode() must return a tensor"),
    (lambda self, data, shape: torch.zeros(1000), "more than the"),
], ids=["raises", "wrong-type", "too-big"])
def test_server_decode_errors(serve, connect, decode, expect):
    client = connect(serve(Echo(), codecs=[_broken(decode=decode)]), codec=Plain())
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(2))
    assert info.value.code().name == "INVALID_ARGUMENT"
    assert "codec 'plain'" in info.value.details() and expect in info.value.details()
    _still_serving(client)


def test_server_decode_error_names_the_tensor_of_a_structure(serve, connect):
    bad = _broken(decode=lambda self, data, shape: None)
    client = connect(serve(Echo(), codecs=[bad]), codec={"h": Plain()})
    with pytest.raises(slc.RpcError) as info:
        client.compute({"h": torch.ones(2), "i": torch.arange(2)})
    assert "tensor 'h'" in info.value.details() and "codec 'plain'" in info.value.details()
    _still_serving(client)


@pytest.mark.parametrize("encode,expect", [
    (lambda self, t: (_ for _ in ()).throw(ValueError("cannot encode")),
     "encode() raised ValueError: cannot encode"),
    (lambda self, t: [b"", (1,)], "encode() must return (data, shape)"),
    (lambda self, t: (12345, tuple(t.shape)), "must be bytes or another contiguous buffer"),
    (lambda self, t: (b"", (-1,)), "out of range"),
], ids=["raises", "not-a-tuple", "data-not-a-buffer", "bad-shape"])
def test_client_encode_errors(serve, connect, encode, expect):
    client = connect(serve(Echo(), codecs=[Plain()]), codec=_broken(encode=encode))
    with pytest.raises(CodecError) as info:
        client.compute(torch.ones(2))
    assert "codec 'plain'" in str(info.value) and expect in str(info.value)
    assert isinstance(info.value, ValueError)
    _still_serving(client)


def test_server_encode_error_is_internal_and_the_server_keeps_serving(serve, connect):
    bad = _broken(encode=lambda self, t: (_ for _ in ()).throw(RuntimeError("no reply")))
    client = connect(serve(Echo(), codec=bad), codecs=[Plain()])
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(2))
    assert info.value.code().name == "INTERNAL"
    assert "codec 'plain'" in info.value.details() and "no reply" in info.value.details()
    assert client.health_check()


@pytest.mark.parametrize("decode,expect", [
    (lambda self, data, shape: (_ for _ in ()).throw(KeyError("k")), "decode() raised KeyError"),
    (lambda self, data, shape: np.zeros(10**4, dtype=np.float32), "more than the"),
], ids=["raises", "too-big"])
def test_client_decode_errors(serve, connect, decode, expect):
    client = connect(serve(Echo(), codec=Plain()), codecs=[_broken(decode=decode)])
    with pytest.raises(CodecError) as info:
        client.compute(torch.ones(2))
    assert "codec 'plain'" in str(info.value) and expect in str(info.value)
    assert client.health_check()


def test_a_response_in_a_codec_the_client_does_not_know(serve, connect):
    client = connect(serve(Echo(), codec=Plain()))
    with pytest.raises(CodecError, match="unknown codec 'plain'; known codecs: raw, "):
        client.compute(torch.ones(2))


def test_python_codec_name_cannot_be_a_builtin():
    class Shadow(Plain):
        codec_name = "float16"

    with pytest.raises(ValueError, match="built-in"):
        slc.GRPCComputeClient("127.0.0.1:1", codec=Shadow())
