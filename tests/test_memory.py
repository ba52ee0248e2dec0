"""Memory the transport keeps between calls: the storage pool's bound, and a server
giving memory back once calls stop."""
from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch", reason="these tests send torch tensors")

import splitlearn_comm as slc  # noqa: E402
from splitlearn_comm import _core  # noqa: E402


def pool_blocks() -> int:
    return _core.storage_pool()[1]


@pytest.mark.timeout(60)
def test_storage_pool_limit_bounds_the_pool_and_can_turn_it_off():
    before = slc.storage_pool_limit()
    try:
        slc.release_memory()
        assert slc.storage_pool_limit(2 << 20) == 2 << 20
        tensors = [_core.decode("raw", bytes(1 << 20), [1 << 18], "float32", {}) for _ in range(3)]
        del tensors  # three 1 MiB blocks freed; room for two
        held, blocks, limit = _core.storage_pool()
        assert (held, blocks, limit) == (2 << 20, 2, 2 << 20)
        assert slc.storage_pool_limit(0) == 0  # lowering it frees at once
        assert _core.storage_pool()[:2] == (0, 0)
        with pytest.raises(ValueError, match="max_bytes must be >= 0"):
            slc.storage_pool_limit(-1)
    finally:
        slc.storage_pool_limit(before)


@pytest.mark.timeout(60)
def test_server_gives_pooled_memory_back_once_calls_stop(serve, connect):
    class Echo(slc.ComputeFunction):
        def compute(self, x):
            return x.clone()

    client = connect(serve(Echo()))
    slc.release_memory()
    x = torch.randn(1 << 18)  # 1 MiB: received blocks are pooled when freed
    for _ in range(4):
        y = client.compute(x)
        assert torch.equal(y, x)
        del y
    client.compute(torch.ones(4))  # the last call; quiet follows it
    deadline = time.monotonic() + 30
    while pool_blocks() > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool_blocks() == 0, "the server did not give the pool back after calls stopped"
