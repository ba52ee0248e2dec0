"""splitlearn-comm: tensor transport for split learning.

A server hosts a :class:`ComputeFunction`; clients send it tensors over gRPC and
get tensors back. The network, framing and threads are a C core on the gRPC C
core; this package is the Python face of it.
"""
from __future__ import annotations

from typing import Any

from .codecs import (BFloat16Codec, CodecError, CompressedTensorCodec, Float16Codec, Int8Codec,
                     SparseCOOCodec)
from ._aclient import AsyncGRPCComputeClient
from ._async import CallFuture
from .aio import (AsyncChainComputeFunction, AsyncComputeFunction, AsyncGRPCComputeServer,
                  AsyncLambdaComputeFunction, AsyncModelComputeFunction, serve_async)
from .client import (CircuitBreaker, ExponentialBackoff, FixedDelay, GRPCComputeClient,
                     RetryStrategy)
from .context import CallContext, current_call
from .core import ComputeFunction, ModelComputeFunction, TensorCodec
from .errors import RpcError
from .memory import release_memory, storage_pool_limit
from .server import GRPCComputeServer
from .sessions import KVCacheComputeFunction, Session, SessionState
from .tls import ClientTLS, ServerTLS
from .pipeline import Pipeline, pipeline
from .training import TrainableComputeFunction
from .training_client import remote

__version__ = "0.1.0"

__all__ = [
    "AsyncChainComputeFunction",
    "AsyncComputeFunction",
    "AsyncGRPCComputeServer",
    "AsyncLambdaComputeFunction",
    "AsyncModelComputeFunction",
    "serve_async",
    "AsyncGRPCComputeClient",
    "CallFuture",
    "Pipeline",
    "pipeline",
    "BFloat16Codec",
    "CallContext",
    "CircuitBreaker",
    "ClientTLS",
    "ServerTLS",
    "CodecError",
    "CompressedTensorCodec",
    "Float16Codec",
    "Int8Codec",
    "SparseCOOCodec",
    "ComputeFunction",
    "ExponentialBackoff",
    "FixedDelay",
    "GRPCComputeClient",
    "GRPCComputeServer",
    "ModelComputeFunction",
    "RetryStrategy",
    "RpcError",
    "TensorCodec",
    "current_call",
    "release_memory",
    "storage_pool_limit",
    "__version__",
    "TrainableComputeFunction",
    "RemoteModule",
    "remote",
    "KVCacheComputeFunction",
    "Session",
    "SessionState",
]


def __getattr__(name: str) -> Any:
    if name == "RemoteModule":  # a torch.nn.Module: made on first use, torch is imported lazily
        from . import training_client as _remote

        return _remote.RemoteModule
    from ._moved import TOP_LEVEL, missing

    missing(__name__, name, TOP_LEVEL)  # the earlier package's names say what replaced them
