"""Server-side sessions: state that stays where it is computed (docs/inference.md).

Client side: :class:`Session` (``GRPCComputeClient.session()``) sends every call of
the session under one session id, numbering its calls (steps) from 1; a retry
repeats its number. Server side: :class:`SessionStore` keeps one
:class:`SessionState` per session id, bounded in count, bytes (tensors counted
exactly) and idle time, evicting the least recently used; ``compute()`` reads and
writes it as ``current_call().session``. Each step runs once: the same number
again is answered from the record of the step's result.

:class:`KVCacheComputeFunction` hosts a stack of torch modules that take and
return past key/values, keeping their cache in the session.

torch is imported lazily, as everywhere in the package.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import grpc

from . import context
from .core import ComputeFunction
from .errors import Abort, RpcError

logger = logging.getLogger("splitlearn_comm.sessions")

__all__ = ["Session", "SessionState", "SessionStore", "KVCacheComputeFunction", "state_nbytes"]

#: How long a step waits for an earlier step of its session (another thread's, or the
#: same step's first attempt still running) when its call has no deadline.
_WAIT_WITHOUT_DEADLINE_S = 300.0
#: How long a step waits for a missing earlier step before it is out of order.
_GAP_WAIT_S = 5.0
#: Trailing metadata key naming why a session is gone (closed, evicted-bytes,
#: evicted-count, idle, unknown).
GONE_KEY = "sl-session-gone"

# why a session is gone: (short reason for GONE_KEY, text for the error)
_CLOSED = "closed"
_EVICTED_BYTES = "evicted-bytes"
_EVICTED_COUNT = "evicted-count"
_IDLE = "idle"
_STOPPED = "server-stopped"
_UNKNOWN = "unknown"


def state_nbytes(obj: Any) -> int:
    """Bytes held by the tensors in ``obj``: torch tensors and NumPy arrays, in
    dicts, lists and tuples at any depth, each storage counted once (a view counts
    the storage it keeps alive). Other objects count 0."""
    seen: set[Tuple[Any, ...]] = set()
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif hasattr(o, "untyped_storage"):  # torch.Tensor
            try:
                s = o.untyped_storage()
                key: Tuple[Any, ...] = ("t", s.data_ptr(), o.device.type, o.device.index)
                size = int(s.nbytes())
            except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
                key, size = ("i", id(o)), int(o.numel()) * int(o.element_size())
            if key not in seen:
                seen.add(key)
                total += size
        elif hasattr(o, "nbytes") and hasattr(o, "__array_interface__"):  # numpy.ndarray
            base = o
            while getattr(base, "base", None) is not None and hasattr(base.base, "nbytes"):
                base = base.base
            key = ("n", id(base))
            if key not in seen:
                seen.add(key)
                total += int(base.nbytes)
    return total


class SessionState(dict[str, Any]):
    """``current_call().session``: the state one session keeps on the server.

    A dict (keys and values are yours: tensors, lists of past key/values, counters,
    ...) with two read-only attributes: ``id`` (the session id) and ``step`` (the
    number of the step being run, 1 for the first). Tensors in it are counted
    against the server's ``max_session_bytes`` after every step.
    """

    __slots__ = ("_id", "_step")

    def __init__(self, session_id: str) -> None:
        super().__init__()
        self._id = session_id
        self._step = 0

    @property
    def id(self) -> str:
        return self._id

    @property
    def step(self) -> int:
        return self._step

    def __repr__(self) -> str:
        return f"SessionState(id={self._id!r}, step={self._step}, keys={list(self)!r})"


class _Session:
    __slots__ = ("id", "state", "last_step", "answer", "error", "running", "nbytes",
                 "created", "used")

    def __init__(self, sid: str, now: float) -> None:
        self.id = sid
        self.state = SessionState(sid)
        self.last_step = 0           # the latest step answered
        self.answer: Any = None      # its result, for a retry of it
        self.error: Optional[Tuple[grpc.StatusCode, str]] = None  # or its failure
        self.running = 0             # the step running now (0: none)
        self.nbytes = 0
        self.created = now
        self.used = now


class SessionStore:
    """The sessions of one server: at most ``max_sessions`` of them holding at
    most ``max_bytes`` bytes of tensors together; a session unused for
    ``idle_timeout`` seconds is dropped. Room is made by evicting the least
    recently used sessions. Thread-safe. (Used by :class:`GRPCComputeServer`.)"""

    def __init__(self, max_sessions: int = 256, max_bytes: int = 1 << 30,
                 idle_timeout: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if int(max_sessions) < 1 or int(max_bytes) < 1 or not float(idle_timeout) > 0:
            raise ValueError("max_sessions and max_session_bytes must be >= 1 and "
                             "session_idle_timeout > 0")
        self.max_sessions = int(max_sessions)
        self.max_bytes = int(max_bytes)
        self.idle_timeout = float(idle_timeout)
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._sessions: "collections.OrderedDict[str, _Session]" = collections.OrderedDict()
        self._gone: "collections.OrderedDict[str, Tuple[str, str]]" = collections.OrderedDict()
        self._max_gone = max(4096, 4 * self.max_sessions)
        self._bytes = 0
        self._counts: Dict[str, int] = collections.Counter()
        self._sweeper: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # -- a step ------------------------------------------------------------------

    def begin(self, sid: str, step: int, deadline: Optional[float]) -> Tuple[Optional[_Session], Any]:
        """(session, None) to run step ``step`` of ``sid`` (the caller then calls
        :meth:`finish`), or (None, result) to answer a retried step from the record.
        Raises Abort when the session is gone or unknown, or the step is out of order."""
        if not sid:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id must not be empty")
        if step < 1:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"session {sid!r}: session_step must be >= 1, not {step} "
                        "(a session's calls are numbered from 1)")
        now = time.monotonic()
        wait_until = deadline if deadline is not None else now + _WAIT_WITHOUT_DEADLINE_S
        # a missing earlier step may still be on its way (threads sharing a session);
        # wait for it a little, and answer out-of-order well before the deadline
        gap_until = now + min(_GAP_WAIT_S, max(0.0, wait_until - now) / 2)
        with self._cond:
            self._sweep_locked()
            self._ensure_sweeper()
            s = self._sessions.get(sid)
            while s is None and step > 1 and sid not in self._gone:
                # threads sharing a new session: step 1 may still be on its way
                now = time.monotonic()
                if now >= gap_until:
                    break
                self._cond.wait(min(gap_until - now, 1.0))
                s = self._sessions.get(sid)
            if s is None:
                self._raise_gone(sid, step)
                self._make_room_for_one(sid)
                s = _Session(sid, self._clock())
                self._sessions[sid] = s
                self._counts["opened"] += 1
                self._cond.notify_all()
                logger.debug("session %s opened", sid)
            while True:
                if self._sessions.get(sid) is not s:
                    self._raise_gone(sid, step)  # dropped while we waited
                if not s.running:
                    if step == s.last_step:
                        return self._replay(s)
                    if step == s.last_step + 1:
                        break
                    if step < s.last_step:
                        raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"session {sid!r}: step {step} was answered long ago "
                                    f"(the latest step is {s.last_step}; only its answer is "
                                    "kept for a retry)")
                now = time.monotonic()
                until = wait_until if (s.running and step <= s.running + 1) else gap_until
                if now >= until:
                    if s.running and step <= s.running + 1:
                        raise Abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"session {sid!r}: step {step} waited for step "
                                    f"{s.running} of the session until its deadline")
                    raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"session {sid!r}: step {step} is out of order: the latest "
                                f"step the server ran is {s.last_step}, so the next is "
                                f"{s.last_step + 1} (a step the client sent never arrived; "
                                "start a new session)")
                self._cond.wait(min(until - now, 1.0))
            s.running = step
            s.state._step = step
            s.used = self._clock()
            self._sessions.move_to_end(sid)
            self._counts["steps"] += 1
            return s, None

    def finish(self, s: _Session, result: Any = None,
               error: Optional[Tuple[grpc.StatusCode, str]] = None) -> None:
        """End the running step of ``s`` with its result (or its error), count the
        session's bytes and make room. Raises Abort (FAILED_PRECONDITION) when the
        session alone is over ``max_bytes``: it is evicted."""
        nbytes = state_nbytes([s.state, result]) if error is None else None
        with self._cond:
            try:
                s.last_step = s.running
                s.answer = result if error is None else None
                s.error = error
                s.used = self._clock()
                if self._sessions.get(s.id) is not s:
                    return  # closed or dropped while it ran: nothing to keep
                self._sessions.move_to_end(s.id)  # LRU order follows `used`
                if nbytes is None:
                    nbytes = s.nbytes  # a failed step: count again at the next one
                self._bytes += nbytes - s.nbytes
                s.nbytes = nbytes
                if nbytes > self.max_bytes:
                    self._drop(s.id, _EVICTED_BYTES,
                               f"it held {nbytes} bytes after step {s.last_step}, more than "
                               f"the server's max_session_bytes ({self.max_bytes}) on its own")
                    raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"session {s.id!r} was evicted for bytes: it held {nbytes} "
                                f"bytes after step {s.last_step}, more than the server's "
                                f"max_session_bytes ({self.max_bytes}) on its own; start a "
                                "new session", ((GONE_KEY, _EVICTED_BYTES),))
                self._make_room_bytes(keep=s.id)
            finally:
                s.running = 0
                self._cond.notify_all()

    def _replay(self, s: _Session) -> Tuple[None, Any]:
        self._counts["replayed_steps"] += 1
        s.used = self._clock()
        self._sessions.move_to_end(s.id)
        if s.error is not None:
            code, details = s.error
            raise Abort(code, f"session {s.id!r}: step {s.last_step} failed (answered again "
                              f"for its retry): {details}")
        return None, s.answer

    # -- closing and bounds --------------------------------------------------------

    def close(self, sid: str) -> bool:
        """End session ``sid`` (a later call on it is FAILED_PRECONDITION, "closed");
        False when it was not open. Closing again is not an error."""
        with self._cond:
            if sid in self._sessions:
                self._drop(sid, _CLOSED, "the client closed it")
                self._counts["closed"] += 1
                self._cond.notify_all()
                return True
            return False

    def get(self, sid: str) -> SessionState:
        """The state of open session ``sid`` (for a call without a step of its own:
        a backward); raises Abort when it is gone."""
        with self._cond:
            s = self._sessions.get(sid)
            if s is None:
                self._raise_gone(sid, 2)  # raises for every step but 1
                raise RuntimeError(f"session {sid!r} is not open")  # not reached
            s.used = self._clock()
            self._sessions.move_to_end(sid)
            return s.state

    def clear(self) -> None:
        """Drop every session (the server stops)."""
        self._stop.set()
        with self._cond:
            for sid in list(self._sessions):
                self._drop(sid, _STOPPED, "the server stopped")
            self._cond.notify_all()

    def _drop(self, sid: str, reason: str, why: str) -> None:
        s = self._sessions.pop(sid)
        self._bytes -= s.nbytes
        s.state.clear()
        s.answer = None
        self._gone[sid] = (reason, why)
        self._gone.move_to_end(sid)
        while len(self._gone) > self._max_gone:
            self._gone.popitem(last=False)
        if reason in (_EVICTED_BYTES, _EVICTED_COUNT, _IDLE):
            self._counts["evicted_" + reason.replace("evicted-", "").replace("-", "_")] += 1
            logger.info("session %s dropped (%s): %s", sid, reason, why)

    def _raise_gone(self, sid: str, step: int) -> None:
        """Raise the error for a session that is not open: FAILED_PRECONDITION
        naming why it is gone, or NOT_FOUND when this server never had it. A step 1
        of an id never seen returns (it opens the session)."""
        gone = self._gone.get(sid)
        if gone is not None:
            reason, why = gone
            what = {_CLOSED: "was closed", _EVICTED_BYTES: "was evicted for bytes",
                    _EVICTED_COUNT: "was evicted for count", _IDLE: "was evicted as idle",
                    _STOPPED: "ended when the server stopped"}[reason]
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"session {sid!r} {what}: {why}; its state is gone, start a new "
                        "session", ((GONE_KEY, reason),))
        if step > 1:
            raise Abort(grpc.StatusCode.NOT_FOUND,
                        f"session {sid!r} is unknown to this server (step {step}): the server "
                        "restarted since the session began (sessions live in its memory), "
                        "or the call reached another server; start a new session",
                        ((GONE_KEY, _UNKNOWN),))

    def _make_room_for_one(self, sid: str) -> None:
        while len(self._sessions) >= self.max_sessions:
            victim = next((v for v in self._sessions.values() if not v.running), None)
            if victim is None:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"session {sid!r} cannot open: all {len(self._sessions)} sessions "
                            f"(max_sessions) are running a step")
            self._drop(victim.id, _EVICTED_COUNT,
                       f"the server's max_sessions ({self.max_sessions}) was reached and it "
                       "was the least recently used")

    def _make_room_bytes(self, keep: str) -> None:
        if self._bytes <= self.max_bytes:
            return
        for victim in list(self._sessions.values()):
            if self._bytes <= self.max_bytes:
                break
            if victim.id == keep or victim.running:
                continue
            self._drop(victim.id, _EVICTED_BYTES,
                       f"the sessions held {self._bytes} bytes, more than the server's "
                       f"max_session_bytes ({self.max_bytes}), and it was the least recently "
                       f"used ({victim.nbytes} bytes)")

    def _sweep_locked(self) -> None:
        now = self._clock()
        for s in list(self._sessions.values()):
            if now - s.used < self.idle_timeout:
                break  # LRU order: the rest were used later
            if not s.running:
                self._drop(s.id, _IDLE, f"it was idle for {now - s.used:.0f} s, more than "
                                        f"the server's session_idle_timeout "
                                        f"({self.idle_timeout:g} s)")

    def sweep(self) -> None:
        """Drop the sessions idle for longer than ``idle_timeout``."""
        with self._cond:
            self._sweep_locked()

    def _ensure_sweeper(self) -> None:
        # a thread drops idle sessions even when no call comes
        if self._sweeper is None and not self._stop.is_set():
            self._sweeper = threading.Thread(target=self._sweep_loop, daemon=True,
                                             name="splitlearn-session-sweeper")
            self._sweeper.start()

    def _sweep_loop(self) -> None:
        period = min(max(self.idle_timeout / 4, 0.05), 5.0)
        while not self._stop.wait(period):
            try:
                self.sweep()
            except Exception:  # pragma: no cover - never kill the sweeper
                logger.exception("session sweep failed")

    # -- reporting ---------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """``active`` sessions, ``bytes`` held, the limits, counters (``opened``,
        ``closed``, ``evicted_bytes``, ``evicted_count``, ``evicted_idle``,
        ``steps``, ``replayed_steps``) and ``sizes``: bytes by session id."""
        with self._cond:
            self._sweep_locked()
            out: Dict[str, Any] = {"active": len(self._sessions), "bytes": self._bytes,
                                   "max_sessions": self.max_sessions,
                                   "max_bytes": self.max_bytes,
                                   "idle_timeout": self.idle_timeout}
            for key in ("opened", "closed", "evicted_bytes", "evicted_count", "evicted_idle",
                        "steps", "replayed_steps"):
                out[key] = self._counts[key]
            out["sizes"] = {sid: s.nbytes for sid, s in self._sessions.items()}
            return out

    @staticmethod
    def empty_stats(max_sessions: int, max_bytes: int, idle_timeout: float) -> Dict[str, Any]:
        return {"active": 0, "bytes": 0, "max_sessions": max_sessions, "max_bytes": max_bytes,
                "idle_timeout": idle_timeout, "opened": 0, "closed": 0, "evicted_bytes": 0,
                "evicted_count": 0, "evicted_idle": 0, "steps": 0, "replayed_steps": 0,
                "sizes": {}}


def _error_of(e: BaseException) -> Tuple[grpc.StatusCode, str]:
    code = getattr(e, "sl_code", None)
    if isinstance(e, Abort) and code is not None:
        from .errors import status_code

        return status_code(code), e.sl_details
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


def run_step(store: SessionStore, fields: Dict[str, Any], call: Any,
             run: Callable[[], Any], backward: bool = False) -> Any:
    """Run one session call in the server's dispatch: a close, a backward (the
    session's state, no step; ``backward`` is the core's ``Call.backward``) or step
    ``fields['session_step']`` (run once; replayed from the record on a retry)."""
    sid = fields.get("session_id") or ""
    if fields.get("session_close"):
        store.close(sid)
        return None
    if backward:
        call.session = store.get(sid)
        return run()
    s, replay = store.begin(sid, int(fields.get("session_step") or 0), call.deadline)
    if s is None:
        return replay
    call.session = s.state
    try:
        out = run()
    except BaseException as e:
        store.finish(s, error=_error_of(e))
        raise
    store.finish(s, out)
    return out


# -- client side ----------------------------------------------------------------------


class Session:
    """A session on the server: every call goes to the same server-side state.

    Made by :meth:`GRPCComputeClient.session`; use it as a context manager (or call
    :meth:`close`): ``with client.session() as s: y = s.compute(x)``. Calls are
    numbered (steps 1, 2, ...); a retry repeats its number and the server answers
    it from its record, so no step runs twice. Calls of one session run one after
    another (threads sharing a session take turns), in the order of their numbers.

    A call on a session the server no longer has raises
    :class:`splitlearn_comm.RpcError` with ``FAILED_PRECONDITION`` (closed, evicted
    for bytes or count, idle) or ``NOT_FOUND`` (the server restarted); the reason is
    in the message and in :attr:`lost_reason`. Start a new session and send the
    state again (e.g. the prompt).
    """

    def __init__(self, client: Any, session_id: Optional[str] = None,
                 metadata: Any = None, timeout: Optional[float] = None) -> None:
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValueError("session_id must be a non-empty string")
        self.client = client
        self.id = session_id or uuid.uuid4().hex
        self.metadata = metadata
        self.timeout = timeout
        self._step = 0
        self._lock = threading.Lock()
        # one call of the session at a time from this client: steps leave in order
        # (the server runs them one at a time anyway)
        self._in_order = threading.Lock()
        self._closed = False
        #: why the server no longer has this session (``"closed"``, ``"evicted-bytes"``,
        #: ``"evicted-count"``, ``"idle"``, ``"unknown"``), or None.
        self.lost_reason: Optional[str] = None

    @property
    def step(self) -> int:
        """The number of the latest step sent (0 before the first)."""
        return self._step

    @property
    def closed(self) -> bool:
        return self._closed

    def _next(self) -> int:
        with self._lock:
            if self._closed:
                raise ValueError(f"session {self.id!r} is closed")
            self._step += 1
            return self._step

    def _fields(self) -> Dict[str, Any]:
        return {"session_id": self.id, "session_step": self._next()}

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RpcError as e:
            for key, value in e.trailing_metadata():
                if key == GONE_KEY:
                    self.lost_reason = value if isinstance(value, str) else value.decode()
            raise

    def compute(self, tensor: Any, metadata: Any = None, timeout: Optional[float] = None) -> Any:
        """``client.compute(tensor)`` as the next step of this session."""
        md = metadata if metadata is not None else self.metadata
        t = timeout if timeout is not None else self.timeout
        with self._in_order:
            fields = self._fields()
            return self._call(lambda: self.client._tensor_call(tensor, metadata=md, timeout=t,
                                                               **fields))

    def remote(self, tensor: Any, *, training: Optional[bool] = None,
               learning_rate: Optional[float] = None, accumulation_step: Optional[int] = None,
               metadata: Any = None, timeout: Optional[float] = None) -> Any:
        """``client.remote(tensor)`` (a step of the caller's autograd graph) as the
        next step of this session; its backward sees the same session state."""
        from .training_client import remote

        md = metadata if metadata is not None else self.metadata
        t = timeout if timeout is not None else self.timeout
        with self._in_order:
            fields = self._fields()
            return self._call(lambda: remote(self.client, tensor, training=training,
                                             learning_rate=learning_rate,
                                             accumulation_step=accumulation_step, metadata=md,
                                             timeout=t, _session_fields=fields))

    def close(self, timeout: Optional[float] = 5.0) -> None:
        """End the session: the server frees its state. Closing again does nothing.
        A server that cannot be reached is logged, not raised (it drops the session
        after its idle time-out)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.client._forget_session(self)
        if self.client._core is None:
            return
        try:
            import torch

            empty: Any = torch.empty(0)
        except ImportError:  # pragma: no cover - NumPy-only clients
            import numpy

            empty = numpy.empty(0, dtype=numpy.float32)
        try:
            self.client._tensor_call(empty, metadata=self.metadata, timeout=timeout,
                                     session_id=self.id, session_close=True)
        except (RpcError, ValueError) as e:
            logger.warning("closing session %s on %s failed (the server drops it after its "
                           "idle time-out): %s", self.id, self.client.server_address, e)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}"
        return f"Session({self.id!r}, {state})"


# -- the KV cache helper ---------------------------------------------------------------


class KVCacheComputeFunction(ComputeFunction):
    """Host a stack of torch modules that take and return past key/values, with
    each session's cache kept on the server.

    Each module is called as ``hidden, present = module(hidden, past)`` where
    ``past`` is what it returned as ``present`` at the session's previous step
    (``None`` at the first); override :meth:`run_layer` for another convention
    (e.g. keyword arguments). In a session each call carries only the new
    positions' activations; the cache grows on the server. Outside a session a
    call runs with an empty cache and keeps nothing (the whole sequence each time).

    Args:
        layers: the modules (a ``torch.nn.ModuleList``, a list, ...), in order.
        device: where they run; inputs are moved there and results back to the CPU.
        dtype: the dtype the layers compute in (default: the input's).
        model_name: reported by ``get_info()``.

    ``current_call().session["past_key_values"]`` holds the list of the layers'
    ``present`` values and ``session["length"]`` the positions seen so far.
    """

    def __init__(self, layers: Sequence[Any], device: str = "cpu", dtype: Any = None,
                 model_name: Optional[str] = None) -> None:
        import torch

        self.layers = torch.nn.ModuleList(list(layers)).to(device)
        self.layers.eval()
        self.device = str(device)
        self.dtype = dtype
        self.model_name = model_name or "KVCacheStack"

    def run_layer(self, layer: Any, hidden: Any, past: Any) -> Tuple[Any, Any]:
        """Run one module: returns (hidden, present)."""
        out: Tuple[Any, Any] = layer(hidden, past)
        return out

    def compute(self, input_tensor: Any) -> Any:
        import torch

        call = context.current_call()
        session = getattr(call, "session", None) if call is not None else None
        pasts: List[Any] = list(session.get("past_key_values") or []) if session is not None else []
        if not pasts:
            pasts = [None] * len(self.layers)
        in_dtype = input_tensor.dtype
        x = input_tensor.to(self.device)
        if self.dtype is not None:
            x = x.to(self.dtype)
        presents = []
        with torch.inference_mode():
            for layer, past in zip(self.layers, pasts):
                x, present = self.run_layer(layer, x, past)
                presents.append(present)
        if session is not None:  # only a step that ran through is kept
            session["past_key_values"] = presents
            session["length"] = int(session.get("length", 0)) + int(input_tensor.shape[-2]
                                                                   if input_tensor.dim() >= 2
                                                                   else 1)
        return x.to("cpu", in_dtype)

    def get_info(self) -> Dict[str, str]:
        n_params = sum(p.numel() for p in self.layers.parameters())
        return {"name": self.model_name, "layers": str(len(self.layers)),
                "device": self.device, "parameters": str(n_params)}

