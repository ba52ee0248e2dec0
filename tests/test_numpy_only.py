"""The package with NumPy alone: transport, codecs, retries and the server.

torch is an optional extra. Most of the suite speaks torch; this module checks
the same paths with NumPy arrays only and never imports torch, so that on a
Python without torch (``make test-pythons``: CPython 3.10, 3.12, 3.13 here)
the transport is still covered end to end. The first test runs a round trip in a
process where torch cannot be imported even when it is installed.
"""
from __future__ import annotations

import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

import splitlearn_comm as slc
from conftest import PYTHON, Echo, subprocess_env

DTYPES = ["float16", "float32", "float64", "complex64", "complex128", "int8", "int16",
          "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"]


def sample(dtype: str, shape: tuple = (3, 5), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    x = rng.standard_normal(shape) * 100
    if np.issubdtype(np.dtype(dtype), np.complexfloating):
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)


def test_package_works_where_torch_cannot_be_imported() -> None:
    """Even where torch is installed: a child process in which `import torch` fails."""
    code = ("import sys\n"
            "sys.modules['torch'] = None   # any `import torch` now raises ImportError\n"
            "import numpy as np, splitlearn_comm as slc\n"
            "class E(slc.ComputeFunction):\n"
            "    def compute(self, x): return x\n"
            "with slc.GRPCComputeServer(E(), host='127.0.0.1', port=0) as s:\n"
            "    with slc.GRPCComputeClient(f'127.0.0.1:{s.port}', timeout=30) as c:\n"
            "        y = c.compute(np.ones(3, np.float32))\n"
            "assert isinstance(y, np.ndarray) and (y == 1).all(), y\n")
    proc = subprocess.run([PYTHON, "-c", code], env=subprocess_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_every_numpy_dtype(echo_client: slc.GRPCComputeClient, dtype: str) -> None:
    x = sample(dtype)
    y = echo_client.compute(x)
    assert isinstance(y, np.ndarray) and y.dtype == x.dtype and y.shape == x.shape
    assert y.tobytes() == x.tobytes()


@pytest.mark.parametrize("shape", [(), (0,), (0, 4), (1,), (2, 3, 4, 5)], ids=str)
def test_roundtrip_shapes(echo_client: slc.GRPCComputeClient, shape: tuple) -> None:
    x = sample("float32", shape)
    y = echo_client.compute(x)
    assert y.shape == x.shape and y.tobytes() == x.tobytes()


@pytest.mark.parametrize("result", [np.float32(2.5), 7, 1.5, True], ids=repr)
def test_scalar_results_are_0d(serve, connect, result) -> None:
    class Scalar(slc.ComputeFunction):
        def compute(self, input_tensor):
            return result

    y = connect(serve(Scalar())).compute(np.zeros(3, np.float32))
    assert isinstance(y, np.ndarray) and y.shape == () and y.item() == result


def test_roundtrip_non_contiguous(echo_client: slc.GRPCComputeClient) -> None:
    base = np.arange(48, dtype=np.float64).reshape(6, 8)
    for x in (base.T, base[:, ::2], base[1:5, 2:7]):
        y = echo_client.compute(x)
        assert y.shape == x.shape and y.flags.c_contiguous
        np.testing.assert_array_equal(y, x)


def test_roundtrip_large(echo_client: slc.GRPCComputeClient) -> None:
    x = sample("float32", (1024, 4096))   # 16 MiB, over gRPC's default 4 MiB limit
    np.testing.assert_array_equal(echo_client.compute(x), x)


def test_concurrent_calls_share_a_client(echo_client: slc.GRPCComputeClient) -> None:
    errors = []

    def worker(i: int) -> None:
        try:
            for j in range(10):
                x = np.full((16, 16), i * 100 + j, dtype=np.int32)
                np.testing.assert_array_equal(echo_client.compute(x), x)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("codec", [slc.CompressedTensorCodec(),
                                   slc.CompressedTensorCodec(algorithm="zlib"),
                                   slc.SparseCOOCodec()], ids=repr)
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint8", "bool"])
def test_lossless_codecs(serve, connect, codec: slc.TensorCodec, dtype: str) -> None:
    client = connect(serve(Echo()), codec=codec)
    x = sample(dtype, (8, 32))
    x[:, ::3] = 0   # sparse enough for the sparse codec to pay
    y = client.compute(x)
    assert y.dtype == x.dtype and y.tobytes() == x.tobytes()


def test_float16_codec_matches_numpy_rounding(serve, connect) -> None:
    client = connect(serve(Echo()), codec=slc.Float16Codec())
    x = sample("float32", (64,))
    y = client.compute(x)
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("codec", [slc.BFloat16Codec(), slc.Int8Codec()], ids=repr)
def test_lossy_codecs_stay_close(serve, connect, codec: slc.TensorCodec) -> None:
    client = connect(serve(Echo()), codec=codec)
    x = sample("float32", (16, 64)) / 100
    y = client.compute(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=0.05, rtol=0.02)


class Flaky(slc.ComputeFunction):
    """Aborts its first `failures` calls with `code`, then echoes."""

    def __init__(self, failures: int, code: grpc.StatusCode) -> None:
        self.failures, self.code, self.calls = failures, code, 0
        self.lock = threading.Lock()

    def compute(self, x):
        with self.lock:
            self.calls += 1
            n = self.calls
        if n <= self.failures:
            call = slc.current_call()
            assert call is not None
            call.abort(self.code, f"failure {n}")
        return x


def test_retries_then_succeeds(serve, connect) -> None:
    fn = Flaky(2, grpc.StatusCode.UNAVAILABLE)
    client = connect(serve(fn), retry_strategy=slc.ExponentialBackoff(initial_delay=0.01))
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(client.compute(x), x)
    assert fn.calls == 3 and client.get_statistics()["retries"] == 2


def test_no_retry_on_server_errors(serve, connect) -> None:
    fn = Flaky(1, grpc.StatusCode.INVALID_ARGUMENT)
    client = connect(serve(fn), retry_strategy=slc.FixedDelay(max_retries=3, delay=0.01))
    with pytest.raises(slc.RpcError) as info:
        client.compute(np.ones(2, np.float32))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fn.calls == 1


def test_unreachable_server_is_unavailable_after_retries() -> None:
    with slc.GRPCComputeClient("127.0.0.1:1", timeout=5,
                               retry_strategy=slc.FixedDelay(max_retries=2, delay=0.01)) as client:
        with pytest.raises(slc.RpcError) as info:
            client.compute(np.ones(1, np.float32))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and info.value.attempts == 3


def test_compute_error_reaches_client_and_server_keeps_serving(serve, connect) -> None:
    class Picky(slc.ComputeFunction):
        def compute(self, x):
            if np.asarray(x).size == 0:
                raise ValueError("empty input")
            return np.asarray(x) + 1

    client = connect(serve(Picky()))
    with pytest.raises(slc.RpcError) as info:
        client.compute(np.zeros(0, np.float32))
    assert info.value.code() == grpc.StatusCode.INTERNAL and "empty input" in info.value.details()
    np.testing.assert_array_equal(client.compute(np.zeros(2, np.float32)), np.ones(2, np.float32))


def test_health_and_service_info(serve, connect) -> None:
    client = connect(serve(Echo(), version="1.2.3"))
    assert client.health_check() is True
    info = client.get_service_info()
    assert info["version"] == "1.2.3"

