"""Memory the transport keeps between calls, and giving it back.

Received tensors live in 64-byte aligned blocks from the C core. Blocks of 64 KiB
and more return, when their tensor dies, to a small process-wide pool (at most 128
blocks and :func:`storage_pool_limit` bytes), because split learning sends the same
shapes every step and a reused block saves the page faults of a fresh one.

A server gives memory back on its own: once a second of quiet follows calls, it
frees the pool's idle blocks and asks the C allocator to return its free pages
(after a burst of large calls glibc would otherwise keep the burst's peak
resident). A client process can do the same with :func:`release_memory`, e.g.
after a burst of large calls before a long idle period.
"""
from __future__ import annotations

from typing import Optional

from . import _core

__all__ = ["release_memory", "storage_pool_limit"]


def release_memory() -> int:
    """Free every block in the storage pool and return the C allocator's free pages
    to the system; returns the pool bytes freed. Safe from any thread; costs a walk
    of the allocator's arenas (milliseconds), so call it when idle, not per call."""
    return int(_core.release_memory())


def storage_pool_limit(max_bytes: Optional[int] = None) -> int:
    """The storage pool's bound in bytes (256 MiB by default); with ``max_bytes``,
    set it first (``0`` turns pooling off; blocks over a lower bound are freed at
    once). Process-wide."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    return int(_core.storage_pool(max_bytes)[2])
