"""Authenticate clients with auth_tokens, and audit calls with an interceptor.

The server accepts only calls whose ``authorization`` metadata is one of its
tokens. The check runs in C, in constant time, before any Python: a call without
an accepted token gets UNAUTHENTICATED and never reaches the interceptor or the
model. The standard ``grpc.health.v1`` health check stays open, so that load
balancers and Kubernetes probes need no secret.

An ``AuditInterceptor`` (a standard ``grpc.ServerInterceptor``) then sees every
authenticated call: it records the method and the caller's ``x-client`` name, and
refuses with PERMISSION_DENIED the clients that do not give one.

The script starts the server on 127.0.0.1 (a free port) and calls it as three
clients would: one with the token, one without, one with the token but no name;
then it prints the audit log and exits.

Usage::

    python examples/auth_server.py
    SPLITLEARN_TOKEN=my-secret python examples/auth_server.py

Real deployments read the token from a secret store and use TLS as well, so that
the token cannot be read on the network (see examples/tls_server.py and
docs/server.md).
"""
from __future__ import annotations

import os
import sys
import threading
from typing import List, Tuple

import grpc
import torch

from splitlearn_comm import (ComputeFunction, GRPCComputeClient, GRPCComputeServer, RpcError,
                             current_call)


class Double(ComputeFunction):
    def compute(self, input_tensor):
        caller = dict(current_call().metadata).get("x-client")
        print(f"  compute() for {caller}")
        return input_tensor * 2


class AuditInterceptor(grpc.ServerInterceptor):
    """Records (method, client name) of every call; refuses calls without a name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: List[Tuple[str, str]] = []

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata)
        method = handler_call_details.method.rsplit("/", 1)[-1]
        name = metadata.get("x-client", "")
        with self.lock:
            self.log.append((method, name or "<anonymous>"))
        if name or handler_call_details.method.startswith("/grpc.health.v1."):
            return continuation(handler_call_details)

        def refuse(request, context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "say who you are in x-client")

        return grpc.unary_unary_rpc_method_handler(refuse)


def call(label: str, address: str, metadata) -> None:
    with GRPCComputeClient(address, metadata=metadata, retry_strategy=None, timeout=10) as client:
        try:
            result = client.compute(torch.tensor([1.0, 2.0]))
            print(f"{label}: ok, result {result.tolist()}")
        except RpcError as e:
            print(f"{label}: refused, {e.code().name}: {e.details()}")


def main() -> int:
    token = os.environ.get("SPLITLEARN_TOKEN", "demo-token-change-me")
    audit = AuditInterceptor()
    server = GRPCComputeServer(Double(), host="127.0.0.1", port=0,
                               auth_tokens=[f"Bearer {token}"], interceptors=[audit])
    server.start()
    address = f"127.0.0.1:{server.port}"
    print(f"server on {address}")
    try:
        call("client with the token", address,
             [("authorization", f"Bearer {token}"), ("x-client", "trainer-1")])
        call("client without the token", address, [("x-client", "intruder")])
        call("client with the token but no name", address,
             [("authorization", f"Bearer {token}")])

        # the standard health check needs no token (a stock grpcio client)
        with grpc.insecure_channel(address) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                        request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)
            # serialized by hand to need nothing beyond grpcio: an empty HealthCheckRequest
            # (the whole server) and HealthCheckResponse{status: SERVING} are these bytes
            reply = check(b"", timeout=10)
            status = "SERVING" if reply == b"\x08\x01" else f"not serving ({reply!r})"
            print(f"standard health check without a token: {status}")
    finally:
        server.stop(grace=1.0)

    print("audit log (calls that passed auth_tokens):")
    for method, name in audit.log:
        print(f"  {method} from {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
