"""The asyncio face of the blocking client: AsyncGRPCComputeClient.

Its calls go through _async (the C core's completion queue); it lives apart from
_async so that no import cycle runs through client.py.
"""
from __future__ import annotations

import asyncio
from typing import Any, Dict, Optional

from ._async import acall
from .client import GRPCComputeClient


class AsyncGRPCComputeClient:
    """The asyncio face of :class:`GRPCComputeClient` (same arguments).

    ``await client.compute(x)`` never blocks the event loop and parks no thread:
    the call waits in the C core's completion queue and its result is handed to the
    loop that awaits it. Any number of tasks may share one client; ``task.cancel()``
    cancels the gRPC call. Retries, deadlines, metadata, codecs and statistics are
    those of the blocking client. Use it from any event loop::

        async with AsyncGRPCComputeClient("127.0.0.1:50051") as client:
            y = await client.compute(x)
    """

    def __init__(self, server_address: str, *args: Any, **kwargs: Any) -> None:
        self.sync = GRPCComputeClient(server_address, *args, **kwargs)

    @property
    def server_address(self) -> Any:
        """The address (or list of replica addresses) the client was made with."""
        return self.sync.server_address

    async def compute(self, tensor: Any, metadata: Any = None,
                      timeout: Optional[float] = None) -> Any:
        """Send ``tensor`` to the server's ``compute()`` and return its result."""
        return await acall(self.sync, tensor, metadata=metadata, timeout=timeout)

    async def compute_backward(self, grad_output: Any, forward_id: str, *,
                               learning_rate: Optional[float] = None,
                               accumulation_step: Optional[int] = None, backward_seq: int = 1,
                               metadata: Any = None, timeout: Optional[float] = None) -> Any:
        """ComputeBackward of the training forward ``forward_id``: the input gradient."""
        return await acall(self.sync, grad_output, metadata=metadata, timeout=timeout,
                           backward=True, forward_id=forward_id, learning_rate=learning_rate,
                           accumulation_step=accumulation_step, backward_seq=backward_seq)

    async def health_check(self, timeout: Optional[float] = None) -> bool:
        """True when the server answers HealthCheck with "ok" (run off the loop)."""
        return await asyncio.get_running_loop().run_in_executor(
            None, self.sync.health_check, timeout)

    async def get_service_info(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The server's GetServiceInfo answer (run off the loop)."""
        return await asyncio.get_running_loop().run_in_executor(
            None, self.sync.get_service_info, timeout)

    async def connect(self, timeout: Optional[float] = None) -> bool:
        """Wait until the server is reachable (run off the loop)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.sync.connect, timeout)

    def get_statistics(self) -> Dict[str, Any]:
        """The same counters as :meth:`GRPCComputeClient.get_statistics`."""
        return self.sync.get_statistics()

    def close(self) -> None:
        """Close the channel; calls in flight fail with CANCELLED."""
        self.sync.close()

    async def __aenter__(self) -> "AsyncGRPCComputeClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AsyncGRPCComputeClient({self.server_address!r})"


__all__ = ["AsyncGRPCComputeClient"]
