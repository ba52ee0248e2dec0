"""Memory the transport keeps between calls: the storage pool's bound, and a server
giving memory back once calls stop."""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import List

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


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.timeout(60)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_release_gives_back_what_a_calling_thread_freed(serve, connect):
    """The library raises glibc's trim threshold (large messages stop faulting
    their buffers in again each call), so memory a thread frees stays at the top of
    its arena, which malloc_trim does not give back; release_memory() does, for
    every thread that made or served a call."""
    if not _core.malloc_tuned():
        pytest.skip("the allocator is not glibc's (a sanitizer's), or tuning is off")
    class Echo(slc.ComputeFunction):
        def compute(self, x):
            return x

    client = connect(serve(Echo()))
    size = 24 << 20  # under the tuned mmap threshold: from the thread's arena
    kept: List[int] = []

    def user() -> None:
        client.compute(torch.ones(4))  # the call notes this thread's arena
        block = bytearray(size)  # zero-filled: every page resident
        del block  # freed to the top of this thread's arena, and kept there
        kept.append(rss_bytes())

    t = threading.Thread(target=user)
    t.start()
    t.join()
    _core.release_memory()
    after = rss_bytes()
    assert kept[0] - after >= size * 3 // 4, (kept[0], after)
