"""Calls in flight while the caller works: futures and asyncio on the client.

This module does not import the client (client.py imports it): it uses what the
client object it is given offers. AsyncGRPCComputeClient is in _aclient.py.

A call started here is bound to the client's one completion queue in C, polled by
one completion thread; no thread waits per call. When the call ends (after its
retries), the completion thread takes the GIL once to hand the result over: to a
``concurrent.futures.Future``, or to an asyncio loop through
``loop.call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
import time
import weakref
from typing import Any, Callable, Optional

from . import _core
from ._metadata import normalize as _normalize_metadata
from .errors import RpcError, from_call_error

logger = logging.getLogger("splitlearn_comm.client")

_COMPUTE = _core.METHOD_COMPUTE
_BACKWARD = _core.METHOD_BACKWARD

OnDone = Callable[[Any, Optional[BaseException]], None]

# Clients with asynchronous calls: closed at exit, so that no completion callback
# runs once the interpreter is finalizing.
_clients: "weakref.WeakSet[Any]" = weakref.WeakSet()

# Only for calls under a RetryStrategy written in Python, whose execute() is
# blocking by contract: those calls run the blocking path on these threads.
_python_retry_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


@atexit.register
def _close_all() -> None:
    for client in list(_clients):
        try:
            client.close()
        except Exception:  # pragma: no cover - best effort at exit
            logger.exception("closing %r at exit failed", client)


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _python_retry_pool
    with _pool_lock:
        if _python_retry_pool is None:
            _python_retry_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=8, thread_name_prefix="splitlearn-retry")
        return _python_retry_pool


class _Handle:
    """What cancels a started call: the C call, or the pool future of a call under
    a Python retry strategy."""

    __slots__ = ("client", "capsule", "pool_future")

    def __init__(self, client: Any, capsule: Any = None, pool_future: Any = None) -> None:
        self.client = client
        self.capsule = capsule
        self.pool_future = pool_future

    def cancel(self) -> None:
        core = self.client._core
        if self.capsule is not None and core is not None:
            core.cancel_async(self.capsule)
        elif self.pool_future is not None:
            self.pool_future.cancel()


def start_call(client: Any, tensor: Any, on_done: OnDone, *, metadata: Any = None,
               timeout: Optional[float] = None, **fields: Any) -> _Handle:
    """Start one call of ``client``; ``on_done(value, None)`` or ``on_done(None, exc)``
    runs once, later, on the completion thread (with the GIL). Errors found before
    anything is sent (closed client, bad tensor, open circuit breaker) raise here."""
    method = _BACKWARD if fields.get("backward") else _COMPUTE
    strategy = client.retry_strategy
    if not client._builtin_retry():
        def blocking() -> None:
            try:
                value = client._tensor_call(tensor, metadata=metadata, timeout=timeout, **fields)
            except BaseException as e:  # handed to the future
                on_done(None, e)
                return
            on_done(value, None)

        return _Handle(client, pool_future=_pool().submit(blocking))

    (leaves, form, nodes), how = client._sendable(tensor, fields)
    md = client.metadata + _normalize_metadata(metadata)
    total = client._total_timeout(timeout)
    start = time.perf_counter()

    def done(reply: Any, exc: Optional[BaseException]) -> None:
        # on the completion thread, with the GIL
        if exc is None:
            try:
                value = client._result(reply, how)
            except BaseException as e:
                client._record(False, start, None)
                on_done(None, e)
                return
            client._record(True, start, reply.compute_time_ms, reply)
            on_done(value, None)
            return
        if isinstance(exc, _core.CallError):
            exc = from_call_error(exc, target=client.server_address, method=method)
            client._stats.count_error(exc.code().name, exc.attempts)
        client._record(False, start, None)
        on_done(None, exc)

    core = client._live()
    _clients.add(client)
    try:
        capsule = core.compute_async(
            done, leaves, form=form, nodes=nodes, timeout=total or 0.0,
            metadata=md, wait_for_ready=client.wait_for_ready,
            retry=strategy._policy() if strategy is not None else None,
            breaker=strategy._breaker() if strategy is not None else None,
            request_id=None if fields.get("backward") else client._next_id(),
            codecs=client._registry.table, **fields)
    except _core.CallError as e:
        err = from_call_error(e, target=client.server_address, method=method)
        client._stats.count_error(err.code().name, err.attempts)
        client._record(False, start, None)
        raise err from None
    return _Handle(client, capsule=capsule)


class CallFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The ``concurrent.futures.Future`` of :meth:`GRPCComputeClient.compute_async`.

    ``result()``, ``exception()`` and ``add_done_callback()`` work as usual (done
    callbacks run on the client's completion thread: keep them short, and never
    wait there for another call's result). ``cancel()`` cancels the gRPC call: the
    server sees it cancelled (``current_call().is_active()`` turns false) and
    ``cancel()`` returns True unless the call had already finished.
    """

    def __init__(self) -> None:
        super().__init__()
        self._handle: Optional[_Handle] = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        if self._handle is not None:
            self._handle.cancel()
        return True

    def _settle(self, value: Any, exc: Optional[BaseException]) -> None:
        try:
            if exc is None:
                self.set_result(value)
            else:
                self.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile


def compute_async(client: Any, tensor: Any, *, metadata: Any = None,
                  timeout: Optional[float] = None, **fields: Any) -> CallFuture:
    """Start a call and return its future (errors found before sending land in the
    future too, so one ``result()`` sees every failure)."""
    fut = CallFuture()
    try:
        fut._handle = start_call(client, tensor, fut._settle, metadata=metadata,
                                 timeout=timeout, **fields)
    except Exception as e:
        fut.set_exception(e)
    return fut


async def acall(client: Any, tensor: Any, *, metadata: Any = None,
                timeout: Optional[float] = None, **fields: Any) -> Any:
    """Await one call from any running asyncio loop without blocking it: the C
    completion thread hands the result to the loop with call_soon_threadsafe.
    Cancelling the awaiting task cancels the gRPC call."""
    loop = asyncio.get_running_loop()
    fut: "asyncio.Future[Any]" = loop.create_future()

    def settle(value: Any, exc: Optional[BaseException]) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)

    def on_done(value: Any, exc: Optional[BaseException]) -> None:
        try:
            loop.call_soon_threadsafe(settle, value, exc)
        except RuntimeError:  # the loop was closed meanwhile: no one is waiting
            pass

    handle = start_call(client, tensor, on_done, metadata=metadata, timeout=timeout, **fields)
    try:
        return await fut
    except asyncio.CancelledError:
        handle.cancel()
        raise


__all__ = ["CallFuture", "RpcError", "acall", "compute_async", "start_call"]
