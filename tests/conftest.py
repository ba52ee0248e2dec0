"""Shared fixtures: real servers and clients on 127.0.0.1, port 0."""
from __future__ import annotations

import os
import sys
from typing import Callable, Iterator, List

import pytest

import splitlearn_comm as slc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("SPLITLEARN_TEST_SANITIZED") == "1":
    # `make asan` must test the sanitized build, not the in-place one
    from splitlearn_comm import _core

    assert "/build/asan/" in _core.__file__, f"testing {_core.__file__}, not the ASan build"


#: True when the suite runs against an installed wheel (scripts/test-python.sh), from a
#: copy of the tree without the package's source.
INSTALLED = os.environ.get("SPLITLEARN_TEST_INSTALLED") == "1"

if INSTALLED:
    # scripts/test-python.sh: the suite must test the wheel installed in its venv
    assert os.path.realpath(slc.__file__).startswith(os.path.realpath(sys.prefix)), (
        f"testing {slc.__file__}, not the wheel installed in {sys.prefix}")

#: Why a test that needs torch is skipped (torch is an optional extra; the
#: pinned CPU build on the dev machines exists for CPython 3.11 only).
NEEDS_TORCH = "needs torch, an optional extra (pip install splitlearn-comm[torch])"


class Echo(slc.ComputeFunction):
    """Returns its input unchanged."""

    def compute(self, input_tensor):
        return input_tensor


@pytest.fixture
def serve() -> Iterator[Callable[..., slc.GRPCComputeServer]]:
    """Start GRPCComputeServers on 127.0.0.1:0; all are stopped at teardown."""
    started: List[slc.GRPCComputeServer] = []

    def start(compute_fn: slc.ComputeFunction, **kwargs) -> slc.GRPCComputeServer:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        server = slc.GRPCComputeServer(compute_fn, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=0)


@pytest.fixture
def connect() -> Iterator[Callable[..., slc.GRPCComputeClient]]:
    """Clients for a server (single attempt unless told otherwise), closed at teardown."""
    clients: List[slc.GRPCComputeClient] = []

    def make(server: slc.GRPCComputeServer, **kwargs) -> slc.GRPCComputeClient:
        kwargs.setdefault("retry_strategy", None)
        kwargs.setdefault("timeout", 30.0)
        client = slc.GRPCComputeClient(f"127.0.0.1:{server.port}", **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def echo_client(serve, connect) -> slc.GRPCComputeClient:
    return connect(serve(Echo()))


def subprocess_env() -> dict:
    """Environment for child Python processes that import the package from here."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), ROOT) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


PYTHON = sys.executable
