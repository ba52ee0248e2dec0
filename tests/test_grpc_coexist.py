"""Our gRPC C core and grpcio's live in one process without clashing.

grpcio carries its own gRPC core, linked statically into ``grpc._cython.cygrpc``;
our extension links the gRPC C core 1.51 as a shared library (Debian's in a
development build, a renamed copy inside ``splitlearn_comm.libs`` in a wheel).
These tests import both and prove that:

* each extension exports nothing but its ``PyInit_`` function, so neither can
  bind to the other's ``grpc_*`` symbols, whatever flags the loader used;
* the ``grpc_*`` functions our extension calls resolve to our own core (a
  different file and version from grpcio's);
* both cores serve and call at the same time in the same process: our client
  calls a grpcio server, which forwards each call through a grpcio channel to
  our server, and the tensors come back intact.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
from typing import Any, Callable, Iterator, List, Optional

import grpc
import numpy as np
import pytest

import splitlearn_comm as slc
from splitlearn_comm import _core

#: Bound, in seconds, of every RPC and wait in this module.
TIMEOUT = 10.0


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _file_defining(handle: ctypes.CDLL, symbol: str) -> str:
    """Path of the shared object that `symbol`, looked up from `handle`, lives in."""
    address = ctypes.cast(getattr(handle, symbol), ctypes.c_void_p).value
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    assert libc.dladdr(address, ctypes.byref(info)) != 0, f"dladdr found no object for {symbol}"
    assert info.dli_fname is not None
    return os.path.realpath(info.dli_fname.decode())


def _loaded_objects() -> List[str]:
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return sorted({line.split()[-1] for line in maps if "/" in line.split()[-1]})


def test_extensions_export_only_their_init() -> None:
    cygrpc = grpc._cython.cygrpc.__file__  # type: ignore[attr-defined]
    ours = ctypes.CDLL(_core.__file__)
    theirs = ctypes.CDLL(cygrpc)
    # dlsym on an extension's handle searches the extension and its dependencies:
    # grpcio's has no grpc_* symbol to offer anyone ...
    with pytest.raises(AttributeError):
        theirs.grpc_init
    # ... and ours gets its grpc_* from our own core, never from grpcio's file
    ours_lib = _file_defining(ours, "grpc_version_string")
    assert ours_lib != os.path.realpath(cygrpc)
    assert os.path.basename(ours_lib).startswith("libgrpc"), ours_lib
    assert ours_lib in _loaded_objects()


def test_two_different_cores_are_loaded() -> None:
    ours = ctypes.CDLL(_core.__file__)
    version = ours.grpc_version_string
    version.restype = ctypes.c_char_p
    our_core = version().decode()
    assert our_core.startswith("29."), our_core   # gRPC 1.51's core reports 29.x
    assert grpc.__version__.split(".")[0] == "1" and not grpc.__version__.startswith("1.51."), (
        "this test wants a grpcio whose core differs from ours")


class _Forward(grpc.GenericRpcHandler):
    """A grpcio server that forwards every unary call, as raw bytes, to `target`."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self.forwarded: List[str] = []

    def service(self, details: grpc.HandlerCallDetails) -> Optional[grpc.RpcMethodHandler]:
        method = details.method
        call = self._channel.unary_unary(method)   # no serializers: bytes in, bytes out

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.forwarded.append(method)
            return call(request, timeout=TIMEOUT)

        return grpc.unary_unary_rpc_method_handler(forward)


class Double(slc.ComputeFunction):
    def compute(self, input_tensor: Any) -> Any:
        return np.asarray(input_tensor) * 2


@pytest.fixture
def forwarder(serve: Callable[..., slc.GRPCComputeServer]) -> Iterator[tuple]:
    ours = serve(Double())
    channel = grpc.insecure_channel(f"127.0.0.1:{ours.port}")
    handler = _Forward(channel)
    theirs = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    theirs.add_generic_rpc_handlers((handler,))
    port = theirs.add_insecure_port("127.0.0.1:0")
    theirs.start()
    try:
        yield port, handler
    finally:
        theirs.stop(grace=None)
        channel.close()


def test_both_cores_serve_and_call_in_one_process(forwarder: tuple) -> None:
    port, handler = forwarder
    with slc.GRPCComputeClient(f"127.0.0.1:{port}", retry_strategy=None,
                               timeout=TIMEOUT) as client:
        assert client.health_check()
        x = np.arange(4096, dtype=np.float32).reshape(64, 64)
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(client.compute, [x + i for i in range(16)]))
    for i, y in enumerate(results):
        np.testing.assert_array_equal(np.asarray(y), (x + i) * 2)
    assert handler.forwarded.count("/splitlearn.comm.ComputeService/Compute") == 16
