"""asyncio on the server: ``async def compute()`` and the asyncio server API.

An asynchronous compute function runs on one event loop owned by the server (a
thread started with the first such call). The C worker that received the call
starts the coroutine there and goes back to serve other calls at once: while the
coroutine awaits (another service, a GPU stream, ``asyncio.sleep``) no worker
thread is held. When it returns, its result goes to the server's finisher thread,
which sends the response. Synchronous and asynchronous compute functions mix on
one server: the choice is made per call, by what the function returns.
"""
from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

import grpc

from . import context
from .core import ComputeFunction
from .errors import Abort

logger = logging.getLogger("splitlearn_comm.server")


class ServerLoop:
    """The event loop of a server's asynchronous compute functions, on its own
    thread (started on first use, stopped with the server)."""

    def __init__(self, name: str = "splitlearn-async") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None

    def get(self) -> asyncio.AbstractEventLoop:
        """The running loop (started now if needed)."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name=self._name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def run(self, awaitable: Awaitable[Any]) -> Any:
        """Run ``awaitable`` on the loop from another thread and wait for it."""
        async def wrap() -> Any:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrap(), self.get()).result()

    def stop(self) -> None:
        """Cancel what still runs, stop the loop and its thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None:
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout=10)
        except Exception:  # pragma: no cover - best effort
            logger.exception("cancelling the asynchronous computes failed")
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        if not loop.is_running():
            loop.close()


def wait(out: Any, loop: ServerLoop, call: Optional[context.CallContext] = None) -> Any:
    """``out``, or what it resolves to when it is awaitable (run on ``loop``, with
    ``current_call()`` = ``call``; the calling thread waits)."""
    if not inspect.isawaitable(out):
        return out
    ctx = contextvars.copy_context()
    if call is not None:
        ctx.run(context._task_call.set, call)
    return ctx.run(loop.run, out)


def defer(awaitable: Awaitable[Any], loop: ServerLoop, call: context.CallContext, state: Any,
          encode: Callable[[Any], Tuple[Any, int, Any]], t0: float) -> Any:
    """Serve the call whose compute returned ``awaitable``: run it on the server's
    loop (with ``current_call()`` = ``call``) and answer through ``state`` (the C
    core's CallState) when it ends. The worker returns at once."""
    if state is None or not hasattr(state, "defer"):
        # no deferral possible (e.g. called outside the C server): wait here
        out = loop.run(awaitable)
        return out

    async def run() -> None:
        try:
            out = await awaitable
            ms = (time.perf_counter() - t0) * 1e3
            leaves, form, nodes = encode(out)  # the OutTensors, form and nodes of the result
        except asyncio.CancelledError:
            state.fail(Abort(grpc.StatusCode.UNAVAILABLE,
                             "the server stopped before the call finished", call._trailing))
            return
        except BaseException as e:
            if call._trailing and not isinstance(e, Abort):
                e.sl_trailing = call._trailing  # type: ignore[attr-defined]
            state.fail(e)
            return
        state.complete(leaves, ms, call._trailing, form, nodes)

    ctx = contextvars.copy_context()
    ctx.run(context._task_call.set, call)
    state.defer()  # before the task can start (it may, as soon as the GIL is let go)
    try:
        ev = loop.get()
        ev.call_soon_threadsafe(lambda: ev.create_task(run()), context=ctx)
    except BaseException as e:
        if inspect.iscoroutine(awaitable):
            awaitable.close()
        state.fail(e)
    return None


# -- the earlier library's asynchronous compute functions ------------------------------


class AsyncComputeFunction(ComputeFunction):
    """A compute function whose ``compute`` is a coroutine: ``async def
    compute(self, input_tensor)``. It runs on the server's event loop; while it
    awaits, the server's worker threads serve other calls. ``setup`` and
    ``teardown`` may be coroutines too (run on the same loop). Mix freely with
    synchronous compute functions."""

    async def compute(self, input_tensor: Any) -> Any:
        """Return the output tensor for ``input_tensor``."""
        raise NotImplementedError

    async def setup(self) -> None:  # type: ignore[override]
        """Called once when the server starts (on the server's event loop)."""

    async def teardown(self) -> None:  # type: ignore[override]
        """Called once when the server stops (on the server's event loop)."""


class AsyncModelComputeFunction(AsyncComputeFunction):
    """Host a ``torch.nn.Module`` asynchronously: eval mode, no autograd. The
    forward runs in the event loop's default executor, so the loop stays free."""

    def __init__(self, model: Any, device: str = "cpu", model_name: Optional[str] = None) -> None:
        self.device = str(device)
        self.model = model.to(self.device)
        self.model.eval()
        self.model_name = model_name or type(model).__name__

    def _forward(self, x: Any) -> Any:
        import torch

        with torch.no_grad():
            return self.model(x.to(self.device))

    async def compute(self, input_tensor: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self._forward,
                                                                input_tensor)

    def get_info(self) -> Dict[str, str]:
        return {"name": self.model_name, "model_class": type(self.model).__name__,
                "device": self.device,
                "parameters": str(sum(p.numel() for p in self.model.parameters()))}


class AsyncLambdaComputeFunction(AsyncComputeFunction):
    """Wrap ``async def f(x)`` (or a plain function) as a compute function."""

    def __init__(self, fn: Callable[[Any], Any], name: Optional[str] = None) -> None:
        if not callable(fn):
            raise TypeError("fn must be callable")
        self.fn = fn
        self.name: str = str(name or getattr(fn, "__name__", "lambda"))

    async def compute(self, input_tensor: Any) -> Any:
        out = self.fn(input_tensor)
        if inspect.isawaitable(out):
            out = await out
        return out

    def get_info(self) -> Dict[str, str]:
        return {"name": self.name}


class AsyncChainComputeFunction(AsyncComputeFunction):
    """Run compute functions (asynchronous or not) one after the other; ``setup``
    and ``teardown`` of each are called (teardown in reverse order)."""

    def __init__(self, functions: Sequence[ComputeFunction]) -> None:
        self.functions: List[ComputeFunction] = list(functions)
        if not self.functions:
            raise ValueError("AsyncChainComputeFunction needs at least one function")

    async def compute(self, input_tensor: Any) -> Any:
        x = input_tensor
        for fn in self.functions:
            x = fn.compute(x)
            if inspect.isawaitable(x):
                x = await x
        return x

    async def setup(self) -> None:  # type: ignore[override]
        for fn in self.functions:
            out: Any = fn.setup()  # type: ignore[func-returns-value]
            if inspect.isawaitable(out):
                await out

    async def teardown(self) -> None:  # type: ignore[override]
        for fn in reversed(self.functions):
            out: Any = fn.teardown()  # type: ignore[func-returns-value]
            if inspect.isawaitable(out):
                await out

    def get_info(self) -> Dict[str, str]:
        return {"name": "chain:" + ",".join(type(f).__name__ for f in self.functions)}


# -- the asyncio server API of the earlier library --------------------------------------


class AsyncGRPCComputeServer:
    """:class:`GRPCComputeServer` with an asyncio face: ``await start()``,
    ``await wait_for_termination()``, ``await stop(grace)``, ``async with``.

    Takes the arguments of :class:`GRPCComputeServer`. The serving itself is the
    same (C workers; asynchronous compute functions on the server's own loop);
    only the lifecycle calls are awaitable, each run off the caller's loop.
    """

    def __init__(self, compute_fn: ComputeFunction, *args: Any, **kwargs: Any) -> None:
        from .server import GRPCComputeServer

        self.server = GRPCComputeServer(compute_fn, *args, **kwargs)

    @property
    def port(self) -> int:
        return self.server.port

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def start(self) -> "AsyncGRPCComputeServer":
        await self._off_loop(self.server.start)
        return self

    async def stop(self, grace: Optional[float] = 5.0) -> None:
        await self._off_loop(self.server.stop, grace)

    async def wait_for_termination(self, timeout: Optional[float] = None) -> bool:
        return bool(await self._off_loop(self.server.wait_for_termination, timeout))

    async def __aenter__(self) -> "AsyncGRPCComputeServer":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop(1.0)

    def __repr__(self) -> str:
        return f"Async{self.server!r}"


async def serve_async(compute_fn: ComputeFunction, port: int = 50051, host: str = "0.0.0.0",
                      **kwargs: Any) -> None:
    """Serve ``compute_fn`` until stopped (the earlier library's ``serve_async``)."""
    server = AsyncGRPCComputeServer(compute_fn, host=host, port=port, **kwargs)
    await server.start()
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(0)


__all__ = ["AsyncChainComputeFunction", "AsyncComputeFunction", "AsyncGRPCComputeServer",
           "AsyncLambdaComputeFunction", "AsyncModelComputeFunction", "ServerLoop", "serve_async"]
