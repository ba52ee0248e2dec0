"""The call being served, visible inside ``compute()`` without changing its signature."""
from __future__ import annotations

import contextvars
import threading
import time
from typing import Any, Dict, Optional, Tuple

from ._metadata import normalize as normalize_metadata

_local = threading.local()
# the call of an asynchronous compute (a task on the server's event loop)
_task_call: "contextvars.ContextVar[Optional[CallContext]]" = contextvars.ContextVar(
    "splitlearn_comm_call", default=None)


class CallContext:
    """What the server knows about the call ``compute()`` is serving.

    Attributes:
        method: full method path, e.g. ``/splitlearn.comm.ComputeService/Compute``.
        peer: the client's address, e.g. ``ipv4:127.0.0.1:53422``.
        metadata: the call's invocation metadata, a tuple of (key, value) pairs.
        request_metadata: the request message's own ``metadata`` map.
        deadline: the call's deadline on the ``time.monotonic()`` clock, or None.
        request_id: the request's ``request_id`` field, or None.
        session: the call's session state (a dict-like
            :class:`splitlearn_comm.sessions.SessionState` kept on the server
            between the calls of one client session), or None outside a session.
    """

    __slots__ = ("method", "peer", "metadata", "request_metadata", "deadline", "request_id",
                 "_state", "_trailing", "session")

    def __init__(self, method: str, peer: str, metadata: Tuple[Tuple[str, Any], ...],
                 request_metadata: Dict[str, str], deadline: Optional[float],
                 request_id: Optional[int], state: Any = None) -> None:
        self._state = state
        self._trailing: Tuple[Tuple[str, Any], ...] = ()
        self.method = method
        self.peer = peer
        self.metadata = metadata
        self.request_metadata = request_metadata
        self.deadline = deadline
        self.request_id = request_id
        self.session: Any = None

    def time_remaining(self) -> Optional[float]:
        """Seconds until the deadline (None when the call has none)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def is_active(self) -> bool:
        """False once the call is over for the client: it was cancelled (the client
        gave up or went away), its deadline passed, or the server is stopping. A
        long ``compute()`` may check this and stop early; its result would reach no
        one. Call it from the thread running ``compute()`` (for an ``async def
        compute()``, from its task)."""
        if self._state is not None:
            return bool(self._state.is_active())
        return self.deadline is None or time.monotonic() < self.deadline

    def invocation_metadata(self) -> Tuple[Tuple[str, Any], ...]:
        return self.metadata

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        """Metadata sent with the call's status, whether it ends OK or not (keys are
        lowercase ASCII; values str, or bytes for keys ending in ``-bin``)."""
        self._trailing = tuple(normalize_metadata(trailing_metadata))

    def abort(self, code: Any, details: str) -> None:
        """End the call with gRPC status ``code`` (a ``grpc.StatusCode``) and
        ``details``, as ``grpc.ServicerContext.abort`` does: raises, so nothing after
        it runs. Use it for errors the client should see as such (e.g.
        ``INVALID_ARGUMENT`` for an input the model cannot take); any other exception
        from ``compute()`` becomes ``INTERNAL``."""
        from .errors import Abort

        raise Abort(code, details, self._trailing)

    def __repr__(self) -> str:
        return f"CallContext(method={self.method!r}, peer={self.peer!r})"


def current_call() -> Optional[CallContext]:
    """The call served by this thread (or, in an ``async def compute()``, by this
    task), or None outside ``compute()``."""
    call = _task_call.get()
    if call is not None:
        return call
    return getattr(_local, "call", None)


def _set(ctx: Optional[CallContext]) -> None:
    _local.call = ctx
