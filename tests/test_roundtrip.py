"""Tensors through a real client and server: every dtype, shapes, layouts, sizes."""
from __future__ import annotations

import numpy as np
import pytest

import splitlearn_comm as slc
from conftest import NEEDS_TORCH

torch = pytest.importorskip("torch", reason=NEEDS_TORCH)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
          torch.uint16, torch.uint32, torch.uint64, torch.bool]


def random_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_roundtrips_bit_exactly(echo_client, dtype):
    x = random_tensor((3, 5, 7), dtype)
    assert bit_equal(echo_client.compute(x), x)


def test_special_float_values_survive(echo_client):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38])
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert bit_equal(echo_client.compute(x.to(dtype)), x.to(dtype))


@pytest.mark.parametrize("shape", [(), (0,), (4, 0, 3), (1,), (1, 1, 1, 1, 1, 1, 1, 1), (2,) * 12],
                         ids=str)
def test_shapes(echo_client, shape):
    x = random_tensor(shape, torch.float32)
    y = echo_client.compute(x)
    assert y.shape == x.shape and bit_equal(y, x)


@pytest.mark.parametrize("make", [
    lambda: torch.arange(24.0).reshape(4, 6).t(),
    lambda: torch.arange(24.0).reshape(4, 6)[:, ::2],
    lambda: torch.arange(24.0).expand(3, 24),
    lambda: torch.complex(torch.arange(8.0), torch.ones(8)).conj(),
    lambda: torch.arange(10.0)[3:7],
], ids=["transposed", "strided", "expanded", "conj-view", "offset-view"])
def test_non_contiguous_and_views(echo_client, make):
    x = make()
    y = echo_client.compute(x)
    assert torch.equal(y, x.resolve_conj())
    assert y.is_contiguous()


def test_requires_grad_input_is_sent_detached(echo_client):
    x = torch.randn(4, requires_grad=True)
    y = echo_client.compute(x * 1)
    assert not y.requires_grad and torch.equal(y, x.detach())


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8, np.uint8, np.int64, np.bool_,
                                   np.complex128, np.float16], ids=str)
def test_numpy_in_numpy_out(echo_client, dtype):
    x = (np.arange(12) % 3).astype(dtype).reshape(3, 4)
    y = echo_client.compute(x)
    assert isinstance(y, np.ndarray)
    assert y.dtype == x.dtype and np.array_equal(y, x)


def test_numpy_non_contiguous_and_big_endian(echo_client):
    x = np.arange(20, dtype=">f4").reshape(4, 5)[:, 1::2]
    y = echo_client.compute(x)
    assert np.array_equal(y, x) and y.dtype == np.float32


def test_result_is_writable_and_owned(echo_client):
    x = torch.ones(1000)
    y = echo_client.compute(x)
    y += 1  # the received storage belongs to the result
    assert torch.equal(y, torch.full((1000,), 2.0))


def test_one_mebibyte_and_odd_sizes(echo_client):
    for n in (1, 3, 1023, 64 * 1024 + 1, 1 << 18, (1 << 20) + 7):
        x = torch.randn(n)
        assert torch.equal(echo_client.compute(x), x)


def test_unsupported_input_is_a_clear_error(echo_client):
    with pytest.raises(TypeError, match="cannot send a set at '1'"):
        echo_client.compute([1, {2}, 3])
    with pytest.raises(TypeError, match="sparse"):
        echo_client.compute(torch.eye(3).to_sparse())


def test_tensor_over_the_message_limit_is_refused_before_sending(serve, connect):
    calls = []

    class Counting(slc.ComputeFunction):
        def compute(self, x):
            calls.append(x.numel())
            return x

    server = serve(Counting())
    client = connect(server, stream_threshold=None)  # unary only: gRPC's 2 GiB - 1 per message
    too_big = torch.empty(2**31, dtype=torch.uint8)  # pages never touched: no real memory
    with pytest.raises(ValueError, match="2 GiB"):
        client.compute(too_big)
    # streamed (the default above the threshold) there is no 2 GiB limit, but a single
    # tensor's wire shape is int32 (field 2): a dimension of 2**31 is refused too
    with pytest.raises(ValueError, match="int32"):
        connect(server).compute(too_big)
    assert calls == []
    assert client.health_check()


@pytest.mark.timeout(600)
def test_one_gibibyte_tensor_works_without_options(echo_client):
    x = torch.empty(2**28, dtype=torch.float32)  # 1 GiB
    x[::4096] = torch.arange(x[::4096].numel(), dtype=torch.float32)
    y = echo_client.compute(x)
    assert y.shape == x.shape
    assert torch.equal(y[::4096], x[::4096]) and torch.equal(y[-1000:], x[-1000:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_comes_back_on_its_device(echo_client):
    x = torch.randn(16, 16, device="cuda")
    y = echo_client.compute(x)
    assert y.device == x.device and torch.equal(y, x)
