"""Codecs end to end: built-ins in C on every dtype they take, Python codecs
(the user's guide's, as written there), mismatches, failures and corrupt payloads."""
from __future__ import annotations

import numpy as np
import pytest

import splitlearn_comm as slc
from splitlearn_comm.codecs import (BFloat16Codec, CodecError, CompressedTensorCodec, Float16Codec,
                                    Int8Codec, SparseCOOCodec)
from splitlearn_comm.core import TensorCodec

from conftest import Echo, NEEDS_TORCH

torch = pytest.importorskip("torch", reason=NEEDS_TORCH)

ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
              torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
              torch.bool]


def sample(dtype: torch.dtype, shape=(6, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def sparse_sample(dtype: torch.dtype) -> torch.Tensor:
    x = sample(dtype, (40, 50))
    mask = torch.rand(40, 50, generator=torch.Generator().manual_seed(2)) < 0.9
    x[mask] = 0
    return x


# -- lossless built-ins: exact on every dtype they take ------------------------------

@pytest.mark.parametrize("codec", [CompressedTensorCodec(), CompressedTensorCodec(algorithm="zlib"),
                                   SparseCOOCodec()], ids=repr)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_lossless_codecs_are_exact(serve, connect, codec, dtype):
    client = connect(serve(Echo()), codec=codec)
    x = sparse_sample(dtype)
    y = client.compute(x)
    assert y.dtype == x.dtype and torch.equal(y, x)


def test_sparse_codec_keeps_negative_zero_and_nan(serve, connect):
    client = connect(serve(Echo()), codec=SparseCOOCodec())
    x = torch.tensor([0.0, -0.0, float("nan"), 0.0, 1.0])
    y = client.compute(x)
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))


# -- half precision: bit-identical to PyTorch ----------------------------------------

@pytest.mark.parametrize("codec,cast", [(Float16Codec(), torch.float16),
                                        (BFloat16Codec(), torch.bfloat16)], ids=["fp16", "bf16"])
def test_half_codecs_match_torch_bit_for_bit(serve, connect, codec, cast):
    client = connect(serve(Echo()), codec=codec)
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65520.0, 1e-8, -1e-8, 6e-5, 3.4e38,
                            float("inf"), -float("inf"), float("nan"), 1.00048828125,
                            1.0009765625, 2.0 ** -24, 2.0 ** -25, 2.0 ** -133])
    x = torch.cat([special, torch.randn(10000) * 100])
    expected = x.to(cast).float()
    y = client.compute(x)
    assert y.dtype == torch.float32
    assert torch.equal(y.view(torch.int32), expected.view(torch.int32))


def test_cast_codec_restores_the_dtype(serve, connect):
    client = connect(serve(Echo()), codec=TensorCodec(dtype=torch.float16))
    x = torch.randn(100, dtype=torch.float64)
    y = client.compute(x)
    assert y.dtype == torch.float64
    assert torch.equal(y, x.to(torch.float16).to(torch.float64))


def test_compressed_over_bfloat16(serve, connect):
    client = connect(serve(Echo()), codec=CompressedTensorCodec(3, "zstd", inner=BFloat16Codec()))
    x = torch.relu(torch.randn(64, 128))
    assert torch.equal(client.compute(x), x.bfloat16().float())


# -- int8: the documented error bound ---------------------------------------------------

@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_int8_error_is_at_most_half_a_step(serve, connect, axis):
    client = connect(serve(Echo()), codec=Int8Codec(axis=axis))
    x = torch.randn(32, 48) * torch.linspace(0.1, 10, 48)
    y = client.compute(x)
    if axis is None:
        step = (x.max() - x.min()) / 255
    else:
        dim = 1 - (axis % 2)  # reduce over the other dimension
        step = (x.amax(dim=dim, keepdim=True) - x.amin(dim=dim, keepdim=True)) / 255
    assert y.dtype == torch.float32
    assert bool(((y - x).abs() <= step / 2 * 1.0001 + 1e-7).all())


def test_int8_constant_tensor_is_exact(serve, connect):
    client = connect(serve(Echo()), codec=Int8Codec())
    x = torch.full((5, 5), 3.25)
    assert torch.equal(client.compute(x), x)


# -- the server answers with the request's codec unless told otherwise -----------------

def test_server_answers_in_the_request_codec(serve, connect):
    seen = []

    class Keep(slc.ComputeFunction):
        def compute(self, x):
            seen.append(x.dtype)
            return x * 1.0000001  # a new tensor: a response encoded by the server

    client = connect(serve(Keep()), codec=BFloat16Codec())
    x = torch.randn(100)
    y = client.compute(x)
    assert seen == [torch.float32]
    assert torch.equal(y, (x.bfloat16().float() * 1.0000001).bfloat16().float())


def test_result_of_another_dtype_goes_back_raw(serve, connect):
    class ArgMax(slc.ComputeFunction):
        def compute(self, x):
            return x.argmax(dim=-1)

    client = connect(serve(ArgMax()), codec=Float16Codec())
    x = torch.randn(4, 10)
    assert torch.equal(client.compute(x), x.half().float().argmax(dim=-1))


def test_server_codec_overrides(serve, connect):
    client = connect(serve(Echo(), codec=Float16Codec()))
    x = torch.randn(50)
    assert torch.equal(client.compute(x), x.half().float())


# -- the user's guide's codecs, as written there --------------------------------------

class QuantizedTensorCodec(TensorCodec):
    """具有 8 位量化的编解码器，用于减少带宽。"""

    def encode(self, tensor):
        array = tensor.cpu().numpy()
        min_val = array.min()
        max_val = array.max()
        scale = (max_val - min_val) / 255.0
        if scale == 0:
            scale = 1.0
        quantized = ((array - min_val) / scale).astype(np.uint8)
        data = quantized.tobytes()
        metadata = {'min': min_val, 'max': max_val, 'scale': scale}
        shape = tuple(tensor.shape)
        return data, shape, metadata

    def decode(self, data, shape, metadata):
        quantized = np.frombuffer(data, dtype=np.uint8).reshape(shape)
        array = quantized.astype(np.float32) * metadata['scale'] + metadata['min']
        tensor = torch.from_numpy(array)
        return tensor


class SparseTensorCodec(TensorCodec):
    """用于稀疏张量 (COO 格式) 的编解码器。"""

    def encode(self, tensor):
        sparse = tensor.to_sparse_coo()
        indices = sparse.indices().cpu().numpy()
        values = sparse.values().cpu().numpy().astype(np.float32)
        indices_bytes = indices.tobytes()
        values_bytes = values.tobytes()
        data = (len(indices_bytes).to_bytes(4, 'little') + indices_bytes + values_bytes)
        shape = tuple(tensor.shape)
        return data, shape

    def decode(self, data, shape):
        indices_len = int.from_bytes(data[:4], 'little')
        indices_bytes = data[4:4 + indices_len]
        values_bytes = data[4 + indices_len:]
        indices = np.frombuffer(indices_bytes, dtype=np.int64)
        values = np.frombuffer(values_bytes, dtype=np.float32)
        indices_tensor = torch.from_numpy(indices).view(-1, len(shape))
        values_tensor = torch.from_numpy(values)
        sparse = torch.sparse_coo_tensor(indices_tensor.t(), values_tensor, shape)
        return sparse.to_dense()


def test_guide_quantized_codec_on_both_sides(serve, connect):
    seen = {}

    class Record(slc.ComputeFunction):
        def compute(self, x):
            seen["dtype"], seen["shape"] = x.dtype, tuple(x.shape)
            return x

    codec = QuantizedTensorCodec()
    client = connect(serve(Record(), codecs=[QuantizedTensorCodec()]), codec=codec)
    x = torch.rand(16, 32)
    y = client.compute(x)
    assert seen == {"dtype": torch.float32, "shape": (16, 32)}
    step = float(x.max() - x.min()) / 255
    assert y.shape == x.shape and float((y - x).abs().max()) <= 2 * step + 1e-6


def test_guide_sparse_codec_on_both_sides(serve, connect):
    client = connect(serve(Echo(), codecs=[SparseTensorCodec()]), codec=SparseTensorCodec())
    x = torch.relu(torch.randn(600))
    assert torch.equal(client.compute(x), x)


class FixedSparseTensorCodec(SparseTensorCodec):
    """The guide's codec with its index layout fixed for tensors of 2 and more dims.

    ``indices`` is (ndim, nnz) in C order, so the flat buffer is ndim rows of nnz:
    ``view(len(shape), -1)`` restores it; the guide's ``view(-1, len(shape)).t()``
    pairs the wrong coordinates as soon as ndim > 1 (docs/codecs.md says so)."""

    codec_name = "SparseTensorCodec"

    def decode(self, data, shape):
        indices_len = int.from_bytes(data[:4], 'little')
        indices = np.frombuffer(data[4:4 + indices_len], dtype=np.int64)
        values = np.frombuffer(data[4 + indices_len:], dtype=np.float32)
        indices_tensor = torch.from_numpy(indices.copy()).view(len(shape), -1)
        return torch.sparse_coo_tensor(indices_tensor, torch.from_numpy(values.copy()),
                                       shape).to_dense()


def test_guide_sparse_codec_fixed_for_matrices(serve, connect):
    client = connect(serve(Echo(), codecs=[FixedSparseTensorCodec()]),
                     codec=FixedSparseTensorCodec())
    x = torch.relu(torch.randn(20, 30))
    assert torch.equal(client.compute(x), x)


def test_metadata_types_survive(serve, connect):
    sent = {"f": 1.5, "i": -7, "s": "text", "b": b"\x00\xff", "t": True,
            "nf": np.float32(0.25), "ni": np.int64(3), "nb": np.bool_(False)}
    got = {}

    class Typed(TensorCodec):
        def encode(self, tensor):
            return tensor.numpy().tobytes(), tuple(tensor.shape), dict(sent)

        def decode(self, data, shape, metadata):
            got.update(metadata)
            return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)

    client = connect(serve(Echo(), codecs=[Typed()]), codec=Typed())
    client.compute(torch.ones(3))
    for key in ("f", "i", "s", "b", "t"):
        assert got[key] == sent[key] and type(got[key]) is type(sent[key])
    assert type(got["nf"]) is float and type(got["ni"]) is int and type(got["nb"]) is bool


# -- failures ---------------------------------------------------------------------------

def test_unknown_codec_names_the_known_ones(serve, connect):
    client = connect(serve(Echo()), codec=QuantizedTensorCodec())
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.rand(4))
    assert info.value.code().name == "INVALID_ARGUMENT"
    assert "QuantizedTensorCodec" in info.value.details()
    assert "float16" in info.value.details()


def test_python_codec_that_raises_on_the_server(serve, connect):
    class Broken(TensorCodec):
        codec_name = "broken"

        def encode(self, tensor):
            return tensor.numpy().tobytes(), tuple(tensor.shape)

        def decode(self, data, shape):
            raise RuntimeError("cannot decode this")

    class Fine(Broken):
        def decode(self, data, shape):
            return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)

    client = connect(serve(Echo(), codecs=[Broken()]), codec=Fine())
    with pytest.raises(slc.RpcError) as info:
        client.compute(torch.ones(2))
    assert info.value.code().name == "INVALID_ARGUMENT"
    assert "broken" in info.value.details() and "cannot decode this" in info.value.details()
    assert client.health_check()


def test_python_codec_that_raises_on_the_client(serve, connect):
    class Bad(TensorCodec):
        def encode(self, tensor):
            raise ValueError("no")

        def decode(self, data, shape):
            return None

    client = connect(serve(Echo()), codec=Bad())
    with pytest.raises(CodecError, match="Bad.*no"):
        client.compute(torch.ones(2))


def test_builtin_payloads_that_lie_are_rejected(serve):
    """Corrupt payloads sent as a stock grpcio client would: INVALID_ARGUMENT, server alive."""
    import grpc

    server = serve(Echo())
    x = torch.arange(256, dtype=torch.float32)
    raw = x.numpy().tobytes()
    cases = [
        ("zstd", raw[:100], {}),                         # not a zstd frame
        ("float16", raw[:10], {}),                       # wrong length
        ("sparse_coo", b"\xff" * 16, {}),                # nonsense counts and indices
        ("int8", b"\x00" * 256, {}),                     # missing scale / zero point
        ("zlib", b"x\x9c" + b"\x00" * 20, {}),
    ]
    from splitlearn_comm import _core  # the raw call path, no client-side encoding

    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = channel.unary_unary("/splitlearn.comm.ComputeService/Compute",
                                   request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        for codec, payload, _ in cases:
            msg = _encode_request(payload, (256,), "float32", codec)
            with pytest.raises(grpc.RpcError) as info:
                stub(msg, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, codec
            assert codec in info.value.details()
        assert _core is not None
    finally:
        channel.close()
    with slc.GRPCComputeClient(f"127.0.0.1:{server.port}") as client:
        assert client.health_check()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _encode_request(data: bytes, shape, dtype: str, codec: str) -> bytes:
    """A ComputeRequest by hand (fields 1, 2 packed, 16, 17), independent of our writer."""
    packed_shape = b"".join(_varint(d) for d in shape)
    return (_field(1, data) + _field(2, packed_shape) + _field(16, dtype.encode())
            + _field(17, codec.encode()))


def test_decoded_size_is_bounded_per_call_and_server(serve):
    """A few bytes of sparse payload may declare any shape: the server refuses to
    decode past max_decoded_bytes (per call: INVALID_ARGUMENT)."""
    import grpc

    server = serve(Echo(), max_decoded_bytes=1 << 20)
    payload = (0).to_bytes(8, "little")  # a sparse_coo payload with no non-zeros
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = channel.unary_unary("/splitlearn.comm.ComputeService/Compute",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            stub(_encode_request(payload, (1 << 20,), "float32", "sparse_coo"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_decoded_bytes" in info.value.details()
        ok = stub(_encode_request(payload, (1024,), "float32", "sparse_coo"), timeout=10)
        assert ok  # 4 KiB decodes fine


def test_unencodable_result_goes_back_raw(serve, connect):
    class Inf(slc.ComputeFunction):
        def compute(self, x):
            return x / 0  # inf: int8 cannot carry it

    client = connect(serve(Inf()), codec=Int8Codec())
    y = client.compute(torch.ones(4))
    assert torch.isinf(y).all()
