"""Split-learning training over the wire (docs/training.md).

Server side: :class:`TrainableComputeFunction` hosts a trainable slice of a model.
A training Compute call (one carrying a ``forward_id``) runs the slice with autograd
on, keeps what its backward needs in a bounded activation store under that id and
returns the output; the ComputeBackward call for the same id computes the input
gradient and the parameter gradients, steps the optimizer (or accumulates) and
answers with the input gradient. Inference calls run under ``no_grad`` and keep
nothing.

Client side: :func:`remote` (``GRPCComputeClient.remote``) and :class:`RemoteModule`
put a remote call into the client's autograd graph: ``loss.backward()`` sends the
gradient of the remote output with ComputeBackward and continues the backward pass
into the client's own layers with the input gradient the server returns.

torch is imported lazily, as everywhere in the package.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import grpc

from . import context
from .core import ComputeFunction
from .errors import Abort

logger = logging.getLogger("splitlearn_comm.training")

__all__ = ["TrainableComputeFunction", "remote", "RemoteModule"]

_PENDING, _RUNNING, _DONE = "pending", "running", "done"

#: How long a retried backward waits for the same backward already running when its
#: call has no deadline.
_WAIT_WITHOUT_DEADLINE_S = 300.0


def _torch() -> Any:
    import torch

    return torch


class _RWLock:
    """Many readers or one writer; a waiting writer goes before new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Entry:
    """One forward_id in the activation store."""

    __slots__ = ("forward_id", "state", "x", "out", "version", "rng", "nbytes", "created",
                 "finished", "event", "grad_input", "answered", "out_meta")

    def __init__(self, forward_id: str, x: Any, out: Any, version: int, rng: Any, nbytes: int,
                 created: float) -> None:
        self.forward_id = forward_id
        self.state = _PENDING
        self.x = x              # the input as an autograd leaf (requires_grad when float)
        self.out = out          # the output, with its graph
        self.version = version  # optimizer steps taken before this forward ran
        self.rng = rng          # RNG state at the forward's start (for recomputation)
        self.nbytes = nbytes
        self.created = created
        self.finished = 0.0
        self.event: Optional[threading.Event] = None
        self.grad_input: Any = None
        self.answered = 0       # backwards answered (the latest one's grad_input is kept)
        self.out_meta: Any = None  # (shape, dtype, device) of out, once out is dropped


#: The metadata key a client's training calls carry its client id under.
CLIENT_ID_KEY = "sl-client-id"


class _Key(str):
    """An activation store key: ``"<client id>/<forward_id>"`` (the forward_id alone
    for a client that sends no id). Shows as its forward_id in messages."""

    def __new__(cls, client: str, forward_id: str) -> "_Key":
        key = super().__new__(cls, f"{client}/{forward_id}" if client else forward_id)
        key.forward_id = forward_id
        return key

    def __repr__(self) -> str:
        return repr(self.forward_id)


def _store_key(forward_id: str) -> str:
    """The store key of ``forward_id`` for the client of the call being served: two
    clients never see (or collide with) each other's forwards."""
    call = context.current_call()
    client = ""
    if call is not None:
        for k, v in call.metadata:
            if k == CLIENT_ID_KEY and isinstance(v, str):
                client = v[:64]
    return _Key(client, forward_id)


def _check_id(forward_id: Optional[str], what: str) -> str:
    if not forward_id:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f"{what} needs a forward_id (the id the training forward was stored under)")
    return str(forward_id)


def _nbytes(t: Any) -> int:
    return int(t.numel()) * int(t.element_size())


class TrainableComputeFunction(ComputeFunction):
    """Host a trainable slice of a model: forward and backward over the wire.

    Args:
        model: the ``torch.nn.Module`` slice (moved to ``device``).
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, or a
            callable ``params -> optimizer`` (e.g.
            ``lambda p: torch.optim.SGD(p, lr=0.1)``). ``None``: a frozen slice;
            backward returns input gradients and never changes the parameters.
        device: where the model runs.
        max_entries: at most this many forwards are kept, waiting for their backward
            or answered (kept to answer a retried backward).
        max_bytes: at most this many bytes of kept tensors: each forward's input,
            output and the activations autograd saved for backward (parameters not
            counted), and each answered input gradient.
        ttl: seconds a forward waits for its backward, and an answered backward is
            kept for retries, before it is dropped.
        accumulation_steps: backward calls whose gradients are summed before one
            optimizer step, unless a call says otherwise (``accumulation_step``).
        on_stale: what a backward does when the optimizer stepped after its forward
            (several clients, or several forwards in flight): ``"recompute"`` re-runs
            the forward on the kept input with the current parameters (and the RNG
            state of the original forward) and backpropagates through that;
            ``"error"`` fails the call with FAILED_PRECONDITION.
        model_name: reported by ``get_info()``.
        clock: the monotonic clock of the store's time-to-live (for tests).

    Concurrency: training forwards and backward+step calls hold one exclusive lock,
    so they run one at a time, each seeing whole parameters and each step applied
    once (no lost updates, no torn parameters); inference calls share the lock
    with each other and never see a step half done. See docs/training.md.

    Many clients may train against one instance at once: the activation store keys
    each forward by the client's id (the ``sl-client-id`` metadata that
    ``GRPCComputeClient.remote`` sends) and its forward_id, so clients never see or
    collide with each other's forwards, and the steps apply in the order the calls
    take the lock (docs/scaling.md).

    To change how the slice runs or steps, override :meth:`forward_model`
    (called for training and inference calls) or :meth:`optimizer_step`.
    """

    #: Tells the server to route Compute calls with forward_id / training_mode to
    #: :meth:`compute_training`.
    supports_training = True

    def __init__(self, model: Any, optimizer: Any = None, *, device: str = "cpu",
                 max_entries: int = 1024, max_bytes: int = 1 << 30, ttl: float = 120.0,
                 accumulation_steps: int = 1, on_stale: str = "recompute",
                 model_name: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        torch = _torch()
        if max_entries < 1 or max_bytes < 1 or not ttl > 0:
            raise ValueError("max_entries and max_bytes must be >= 1 and ttl > 0")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, not {accumulation_steps}")
        if on_stale not in ("recompute", "error"):
            raise ValueError(f"on_stale must be 'recompute' or 'error', not {on_stale!r}")
        self.device = str(device)
        self.model = model.to(self.device)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            if not callable(optimizer):
                raise TypeError("optimizer must be a torch.optim.Optimizer, a callable "
                                "params -> optimizer, or None")
            optimizer = optimizer(self.model.parameters())
        self.optimizer = optimizer
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.ttl = float(ttl)
        self.accumulation_steps = int(accumulation_steps)
        self.on_stale = on_stale
        self.model_name = model_name or type(model).__name__
        self._clock = clock
        self._rw = _RWLock()              # the model: training exclusive, inference shared
        self._lock = threading.Lock()     # the store and the counters
        self._waiting: "collections.OrderedDict[str, _Entry]" = collections.OrderedDict()
        self._answered: "collections.OrderedDict[str, _Entry]" = collections.OrderedDict()
        self._gone: "collections.OrderedDict[str, str]" = collections.OrderedDict()
        self._max_gone = max(4096, 4 * self.max_entries)
        self._bytes = 0
        self._version = 0     # optimizer steps taken
        self._micro = 0       # backward calls accumulated since the last step
        self._counts: Dict[str, int] = collections.Counter()

    # -- hooks a subclass may override -------------------------------------------

    def forward_model(self, x: Any) -> Any:
        """Run the slice on ``x`` (already on ``device``). The caller has set autograd
        and train/eval mode. Must return one tensor."""
        return self.model(x)

    def optimizer_step(self, learning_rate: Optional[float] = None) -> None:
        """Apply the accumulated gradients: ``learning_rate`` (when the client sent
        one) becomes the lr of every param group, then ``optimizer.step()`` and
        ``zero_grad``. Called with the exclusive lock held."""
        if learning_rate is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = float(learning_rate)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- the calls the server makes ------------------------------------------------

    def compute(self, input_tensor: Any) -> Any:
        """An inference call: eval mode, no autograd, nothing kept."""
        torch = _torch()
        with self._rw.read():
            if self.model.training:
                self.model.eval()
            with torch.no_grad():
                out = self.forward_model(input_tensor.to(self.device))
        self._count("inference_calls")
        return out

    def compute_training(self, input_tensor: Any, forward_id: Optional[str] = None,
                         training: bool = True) -> Any:
        """A Compute call with training fields: with ``training`` false it is an
        inference call; otherwise a training forward kept under ``forward_id``. A
        retried forward (same id, same input, backward not yet run) gets the output
        of the first one."""
        if not training:
            return self.compute(input_tensor)
        torch = _torch()
        fid = _store_key(_check_id(forward_id, "a training forward"))
        with self._lock:
            self._sweep()
            replay = self._repeat_forward(fid, input_tensor)
        if replay is not None:
            return replay
        with self._rw.write():
            if not self.model.training:
                self.model.train()
            version = self._version
            rng = self._rng_state()
            x = input_tensor.to(self.device).detach()
            if x.is_floating_point() or x.is_complex():
                x.requires_grad_(True)
            with torch.enable_grad():
                out, saved = self._forward_measured(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"forward_model() must return a tensor, got {type(out).__name__}")
        entry = _Entry(fid, x, out, version, rng, saved, 0.0)
        with self._lock:
            self._sweep()
            existing = self._waiting.get(fid)
            if existing is not None:  # a duplicate raced us; the first one stays
                return existing.out.detach()
            if fid in self._answered or fid in self._gone:
                raise self._reused(fid)
            if entry.nbytes > self.max_bytes:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the forward for forward_id {fid!r} keeps {entry.nbytes} bytes for "
                            f"its backward, more than the activation store's max_bytes "
                            f"({self.max_bytes}); send smaller batches or raise max_bytes")
            self._make_room(entry.nbytes)
            entry.created = self._clock()
            self._waiting[fid] = entry
            self._bytes += entry.nbytes
            self._counts["training_forwards"] += 1
        return out.detach()

    def backward(self, grad_output: Any, forward_id: Optional[str] = None,
                 learning_rate: Optional[float] = None,
                 accumulation_step: Optional[int] = None, backward_seq: int = 1) -> Any:
        """A ComputeBackward call: the input gradient of the forward kept under
        ``forward_id``; the parameter gradients are accumulated and, every
        ``accumulation_step`` (default ``accumulation_steps``) backward calls, the
        optimizer steps. A retried backward gets the same input gradient again,
        without another step.

        ``backward_seq`` numbers the backwards of one forward: 1 for the first, 2
        for a second backward through the same output (``loss1.backward(
        retain_graph=True)`` then ``loss2.backward()`` on the client), and so on.
        Each number runs once; the same number again is a retry and is answered
        with the input gradient already sent. A later backward recomputes the
        forward from its kept input (with the forward's RNG state), so its
        gradients are those of local autograd."""
        fid = _store_key(_check_id(forward_id, "ComputeBackward"))
        if learning_rate is not None and not (0.0 <= learning_rate < float("inf")):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"learning_rate must be a finite number >= 0, not {learning_rate}")
        seq = 1 if backward_seq is None else int(backward_seq)
        if seq < 1:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"backward_seq must be >= 1, not {seq}")
        entry, replay = self._claim(fid, seq)
        if entry is None:
            return replay
        try:
            with self._rw.write():
                grad_input = self._run_backward(entry, grad_output, learning_rate,
                                                accumulation_step)
        except BaseException as e:
            self._release(entry, e)
            raise
        with self._lock:
            if self._waiting.pop(fid, None) is not None:  # (teardown() may have cleared it)
                self._bytes -= entry.nbytes
            # the graph is spent; the input and RNG state stay for a later backward
            # through the same output, which recomputes the forward from them
            if entry.out is not None:
                entry.out_meta = (tuple(entry.out.shape), entry.out.dtype, entry.out.device)
            entry.out = None
            entry.grad_input = grad_input
            entry.answered = seq
            entry.nbytes = _nbytes(grad_input) + _nbytes(entry.x)
            entry.state = _DONE
            entry.finished = self._clock()
            if self._make_room(entry.nbytes, answered_only=True):
                self._answered[fid] = entry
                self._bytes += entry.nbytes
            else:  # answered, but the store is full of waiting forwards: no replay
                self._forget(fid, "was already applied (its backward ran and its gradients went "
                                  "into the optimizer), but its input gradient could not be kept "
                                  "(the activation store is full); do not send this backward again")
            self._counts["backward_calls"] += 1
            event = entry.event
        if event is not None:
            event.set()
        return grad_input

    # -- the store -------------------------------------------------------------------

    def stats(self) -> Dict[str, int]:
        """Counters: entries waiting for backward and answered, bytes kept, optimizer
        steps, training forwards, backward calls, replayed backward calls, stale
        recomputations, inference calls, and evictions by cause."""
        with self._lock:
            out = {"waiting": len(self._waiting), "answered": len(self._answered),
                   "bytes": self._bytes, "steps": self._version,
                   "accumulated": self._micro}
            for key in ("training_forwards", "backward_calls", "replayed_backward_calls",
                        "replayed_forwards", "recomputed", "inference_calls",
                        "evicted_max_entries", "evicted_max_bytes", "evicted_ttl"):
                out[key] = self._counts.get(key, 0)
            return out

    def get_info(self) -> Dict[str, str]:
        n_params = sum(p.numel() for p in self.model.parameters())
        info = {"name": self.model_name, "model_class": type(self.model).__name__,
                "device": self.device, "parameters": str(n_params), "trainable": "true",
                "max_entries": str(self.max_entries), "max_bytes": str(self.max_bytes),
                "ttl": str(self.ttl)}
        info.update({f"store.{k}": str(v) for k, v in self.stats().items()})
        return info

    def teardown(self) -> None:
        with self._lock:
            self._waiting.clear()
            self._answered.clear()
            self._bytes = 0

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _forget(self, fid: str, reason: str) -> None:
        self._gone[fid] = reason
        self._gone.move_to_end(fid)
        while len(self._gone) > self._max_gone:
            self._gone.popitem(last=False)

    def _drop_answered(self, fid: str, why: str) -> None:
        entry = self._answered.pop(fid)
        self._bytes -= entry.nbytes
        self._forget(fid, "was already applied (its backward ran and its gradients went into "
                          f"the optimizer), but its input gradient is no longer kept: {why}; "
                          "do not send this backward again")

    def _evict(self, fid: str, why: str, cause: str) -> None:
        entry = self._waiting.pop(fid)
        self._bytes -= entry.nbytes
        self._counts[cause] += 1
        logger.debug("forward_id %r evicted: %s", fid, why)
        self._forget(fid, f"was evicted from the activation store before its backward: {why}; "
                          "run the forward again")

    def _sweep(self) -> None:
        """Drop what outlived the time-to-live (called with the store lock held). Both
        dicts are in time order, so this looks at the expired entries and one more."""
        now = self._clock()
        expired = []
        for fid, e in self._waiting.items():
            if e.created + self.ttl > now:
                break
            if e.state == _PENDING:
                expired.append((fid, e.created))
        for fid, created in expired:
            self._evict(fid, f"no backward came within the time-to-live (ttl={self.ttl:g} s; "
                             f"the forward ran {now - created:.1f} s ago)", "evicted_ttl")
        expired = []
        for fid, e in self._answered.items():
            if e.finished + self.ttl > now:
                break
            expired.append(fid)
        for fid in expired:
            self._drop_answered(fid, f"answered backwards are kept for ttl={self.ttl:g} s")

    def _make_room(self, nbytes: int, answered_only: bool = False) -> bool:
        """Evict until one more entry of ``nbytes`` fits: answered entries first (oldest
        first), then forwards still waiting (oldest first), never one whose backward
        is running. With ``answered_only`` (room for an answer) only answered entries
        go; False when that was not enough."""
        while True:
            too_many = len(self._waiting) + len(self._answered) + 1 > self.max_entries
            too_big = self._bytes + nbytes > self.max_bytes
            if not (too_many or too_big):
                return True
            if too_many:
                why = (f"the store keeps at most max_entries={self.max_entries} forwards "
                       "(waiting or answered) and newer ones needed the room")
                cause = "evicted_max_entries"
            else:
                why = (f"the store keeps at most max_bytes={self.max_bytes} bytes and newer "
                       f"entries needed the room (the latest needed {nbytes} bytes)")
                cause = "evicted_max_bytes"
            if self._answered:
                self._drop_answered(next(iter(self._answered)), why)
                continue
            if answered_only:
                return False
            victim = next((f for f, e in self._waiting.items() if e.state == _PENDING), None)
            if victim is None:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            "the activation store is full of forwards whose backward is running "
                            f"(max_entries={self.max_entries}, max_bytes={self.max_bytes})")
            self._evict(victim, why, cause)

    def _reused(self, fid: str) -> Abort:
        return Abort(grpc.StatusCode.ALREADY_EXISTS,
                     f"forward_id {fid!r} was already used for a forward whose backward ran or "
                     "that was dropped; every training forward needs a new forward_id")

    def _repeat_forward(self, fid: str, x: Any) -> Optional[Any]:
        """The answer to a retried training forward, or None for a new forward_id."""
        torch = _torch()
        entry = self._waiting.get(fid)
        if entry is None:
            if fid in self._answered or fid in self._gone:
                raise self._reused(fid)
            return None
        kept = entry.x.detach()
        same = (kept.shape == x.shape and kept.dtype == x.dtype and
                torch.equal(kept, x.to(kept.device)))
        if not same:
            raise Abort(grpc.StatusCode.ALREADY_EXISTS,
                        f"forward_id {fid!r} is already stored for a different input; every "
                        "training forward needs a new forward_id")
        self._counts["replayed_forwards"] += 1
        return entry.out.detach()

    def _claim(self, fid: str, seq: int) -> Tuple[Optional[_Entry], Any]:
        """(entry, None) to run backward number ``seq`` of ``fid``, or (None,
        grad_input) to answer a retried one; waits while the same backward runs on
        another thread."""
        call = context.current_call()
        deadline = call.deadline if call is not None and call.deadline is not None else \
            time.monotonic() + _WAIT_WITHOUT_DEADLINE_S
        while True:
            with self._lock:
                self._sweep()
                entry = self._waiting.get(fid)
                if entry is None:
                    entry = self._answered.get(fid)
                if entry is None:
                    reason = self._gone.get(fid)
                    if reason is not None:
                        raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"forward_id {fid!r} {reason}")
                    raise Abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown forward_id {fid!r}: no training forward was stored "
                                "under it on this server (or it was forgotten long ago)")
                if seq == entry.answered and entry.grad_input is not None:
                    self._counts["replayed_backward_calls"] += 1
                    return None, entry.grad_input
                if seq != entry.answered + 1:
                    raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"backward {seq} of forward_id {fid!r} is out of order: "
                                f"{entry.answered} backward(s) of it were answered, so the "
                                f"next is backward {entry.answered + 1} (only the latest "
                                "answer is kept for a retry)")
                if entry.state != _RUNNING:
                    if entry.x is None:
                        raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"forward_id {fid!r}: backward {seq} cannot run, the "
                                    "forward's input is no longer kept")
                    if self._answered.pop(fid, None) is not None:
                        self._waiting[fid] = entry  # running again: not evictable
                    entry.state = _RUNNING
                    entry.event = threading.Event()
                    return entry, None
                event = entry.event
            left = deadline - time.monotonic()
            if left <= 0 or not event.wait(left):
                raise Abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the backward for forward_id {fid!r} is still running (a retry "
                            "waited for it until its deadline)")

    def _release(self, entry: _Entry, exc: BaseException) -> None:
        """A backward failed: a bad gradient leaves the forward waiting for a good
        one; any other failure drops it (and the gradients accumulated so far)."""
        fid = entry.forward_id
        with self._lock:
            if isinstance(exc, Abort) and exc.sl_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
                entry.state = _PENDING
            else:
                if self._waiting.pop(fid, None) is not None:
                    self._bytes -= entry.nbytes
                what = exc.sl_details if isinstance(exc, Abort) else f"{type(exc).__name__}: {exc}"
                logger.warning("the backward of forward_id %r failed: %s", fid, what)
                self._forget(fid, f"had a backward that failed ({what}); run the forward again")
                entry.x = entry.out = entry.rng = None
            event, entry.event = entry.event, None
        if event is not None:
            event.set()

    # -- the computation -------------------------------------------------------------

    def _rng_state(self) -> Tuple[Any, Any]:
        torch = _torch()
        cuda = None
        if self.device.startswith("cuda"):
            cuda = torch.cuda.get_rng_state(torch.device(self.device))
        return torch.get_rng_state(), cuda

    def _forward_measured(self, x: Any) -> Tuple[Any, int]:
        """forward_model(x) and the bytes it keeps for backward: x, the output and the
        tensors autograd saved, parameters excluded, each storage counted once."""
        torch = _torch()
        seen = set()
        for p in self.model.parameters():
            seen.add(p.untyped_storage().data_ptr())
        for b in self.model.buffers():
            seen.add(b.untyped_storage().data_ptr())
        total = 0

        def count(t: Any) -> None:
            nonlocal total
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                total += _nbytes(t)
                return
            ptr = storage.data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()

        def pack(t: Any) -> Any:
            count(t)
            return t.detach()  # no reference cycle through an output's grad_fn

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.forward_model(x)
        count(x)
        if isinstance(out, torch.Tensor):
            count(out)
        return out, total

    def _run_backward(self, entry: _Entry, grad_output: Any, learning_rate: Optional[float],
                      accumulation_step: Optional[int]) -> Any:
        torch = _torch()
        fid = entry.forward_id
        out = entry.out
        out_shape, out_dtype, out_device = entry.out_meta if out is None else \
            (tuple(out.shape), out.dtype, out.device)
        if tuple(grad_output.shape) != out_shape:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the gradient for forward_id {fid!r} has shape "
                        f"{tuple(grad_output.shape)}, but the forward's output had shape "
                        f"{out_shape}")
        if not (grad_output.is_floating_point() or grad_output.is_complex()):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the gradient for forward_id {fid!r} has dtype {grad_output.dtype}; "
                        "gradients are floating point")
        g = grad_output.to(device=out_device, dtype=out_dtype)
        x = entry.x
        if entry.version != self._version and self.on_stale == "error":
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"forward_id {fid!r} is stale: the optimizer stepped "
                        f"{self._version - entry.version} time(s) after its forward "
                        "(on_stale='error')")
        if entry.version != self._version or out is None:
            # stale, or a later backward whose graph the earlier one spent: run the
            # forward again from the kept input, under the forward's RNG state
            x = entry.x.detach().requires_grad_(entry.x.requires_grad)
            devices = [torch.device(self.device)] if entry.rng[1] is not None else []
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.set_rng_state(entry.rng[0])
                if entry.rng[1] is not None:
                    torch.cuda.set_rng_state(entry.rng[1], torch.device(self.device))
                if not self.model.training:
                    self.model.train()
                out = self.forward_model(x)
            with self._lock:
                self._counts["recomputed"] += 1
        grad_input = None
        try:
            if out.requires_grad:
                if self.optimizer is None:
                    if x.requires_grad:
                        grad_input, = torch.autograd.grad(out, [x], g, allow_unused=True)
                else:
                    params = [p for group in self.optimizer.param_groups for p in group["params"]
                              if p.requires_grad]
                    inputs = ([x] if x.requires_grad else []) + params
                    if inputs:
                        torch.autograd.backward(out, g, inputs=inputs)
                    grad_input = x.grad if x.requires_grad else None
        except BaseException:
            self._discard_accumulated()
            raise
        if grad_input is None:
            grad_input = torch.zeros_like(x) if x.requires_grad else torch.empty(0)
        grad_input = grad_input.detach()
        if self.optimizer is not None:
            n = int(accumulation_step) if accumulation_step else self.accumulation_steps
            self._micro += 1
            if self._micro >= max(1, n):
                try:
                    self.optimizer_step(learning_rate)
                finally:
                    self._micro = 0
                    self._version += 1
        return grad_input

    def _discard_accumulated(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0


# -- the client side ---------------------------------------------------------------------


class _Call:
    """What the backward of one remote training call needs."""

    __slots__ = ("client", "forward_id", "learning_rate", "accumulation_step", "metadata",
                 "timeout", "shape", "dtype", "device", "backwards", "lock", "session")

    def __init__(self, client: Any, learning_rate: Optional[float],
                 accumulation_step: Optional[int], metadata: Any,
                 timeout: Optional[float]) -> None:
        self.client = client
        self.forward_id = uuid.uuid4().hex
        self.learning_rate = learning_rate
        self.accumulation_step = accumulation_step
        self.metadata = metadata
        self.timeout = timeout
        self.backwards = 0  # backwards sent through this call's output so far
        self.lock = threading.Lock()
        self.session: Dict[str, Any] = {}  # session_id and session_step in a session

    def next_backward(self) -> int:
        """The number of the backward about to be sent: 1, then 2 for a second
        backward through the same output (retain_graph=True), and so on. Retries
        of one backward reuse its number, so the server runs each number once."""
        with self.lock:
            self.backwards += 1
            return self.backwards


_function_class: Any = None


def _remote_function() -> Any:
    """The torch.autograd.Function of a remote call (made on first use: torch is lazy)."""
    global _function_class
    if _function_class is not None:
        return _function_class
    torch = _torch()
    from torch.autograd.function import once_differentiable

    class RemoteCall(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, anchor: Any, call: _Call) -> Any:
            call.shape, call.dtype, call.device = x.shape, x.dtype, x.device
            y = call.client._tensor_call(x, metadata=call.metadata, timeout=call.timeout,
                                         forward_id=call.forward_id, training_mode=True,
                                         **call.session)
            ctx.call = call
            return y

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, grad_y: Any) -> Any:
            call = ctx.call
            g = call.client._tensor_call(grad_y, metadata=call.metadata, timeout=call.timeout,
                                         backward=True, forward_id=call.forward_id,
                                         learning_rate=call.learning_rate,
                                         accumulation_step=call.accumulation_step,
                                         backward_seq=call.next_backward(),
                                         **{k: v for k, v in call.session.items()
                                            if k == "session_id"})
            if not ctx.needs_input_grad[0]:
                return None, None, None
            if tuple(g.shape) != tuple(call.shape):
                raise RuntimeError(f"the server answered the backward of forward_id "
                                   f"{call.forward_id!r} with a gradient of shape "
                                   f"{tuple(g.shape)} for an input of shape {tuple(call.shape)}")
            return g.to(device=call.device, dtype=call.dtype), None, None

    _function_class = RemoteCall
    return RemoteCall


def remote(client: Any, tensor: Any, *, training: Optional[bool] = None,
           learning_rate: Optional[float] = None, accumulation_step: Optional[int] = None,
           metadata: Any = None, timeout: Optional[float] = None,
           _session_fields: Optional[Dict[str, Any]] = None) -> Any:
    """Run the server's slice on ``tensor`` as a step of the client's autograd graph.

    ``training`` (default: ``torch.is_grad_enabled()``) sends a training forward
    under a fresh forward_id; the result requires grad, and ``backward()`` through
    it sends its gradient with ComputeBackward (with ``learning_rate`` and
    ``accumulation_step``) and continues with the input gradient the server
    returns. With ``training`` false (e.g. under ``torch.no_grad()``) it is a plain
    inference Compute call and the server keeps nothing. ``metadata`` and
    ``timeout`` apply to both calls, which go through the client's retry strategy
    and codec.
    """
    torch = _torch()
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"remote() takes a torch.Tensor, got {type(tensor).__name__}")
    if training is None:
        training = torch.is_grad_enabled()
    if not training:
        return client._tensor_call(tensor, metadata=metadata, timeout=timeout,
                                   **(_session_fields or {}))
    if not torch.is_grad_enabled():
        raise ValueError("remote(training=True) needs autograd enabled (it is disabled here, "
                         "e.g. by torch.no_grad()): its backward could never be sent")
    # a client balancing over replicas pins its training steps to one of them (the
    # backward must reach the replica that kept the forward); the client id keys
    # the server's activation store by client
    step_client = client._training_client() if hasattr(client, "_training_client") else client
    client_id = getattr(step_client, "client_id", None)
    if client_id:
        from .client import _normalize_metadata

        metadata = _normalize_metadata(metadata) + [(CLIENT_ID_KEY, client_id)]
    call = _Call(step_client, learning_rate, accumulation_step, metadata, timeout)
    call.session = dict(_session_fields or {})
    # an anchor that requires grad puts the call in the graph even when the input
    # does not (the server's layers still need their backward)
    anchor = None if tensor.requires_grad else torch.empty(0, requires_grad=True)
    return _remote_function().apply(tensor, anchor, call)


_module_class: Any = None


def _remote_module() -> Any:
    global _module_class
    if _module_class is not None:
        return _module_class
    torch = _torch()

    class RemoteModule(torch.nn.Module):
        """A ``torch.nn.Module`` whose forward is :func:`remote` on a client, so that a
        split model reads like a local one::

            model = torch.nn.Sequential(bottom, RemoteModule(client), head)

        In train mode with autograd on, its calls are training calls; otherwise
        inference calls. ``learning_rate``, ``accumulation_step``, ``metadata`` and
        ``timeout`` are passed to every call. It has no parameters of its own: the
        server's slice trains on the server.
        """

        def __init__(self, client: Any, *, learning_rate: Optional[float] = None,
                     accumulation_step: Optional[int] = None, metadata: Any = None,
                     timeout: Optional[float] = None) -> None:
            super().__init__()
            self.client = client
            self.learning_rate = learning_rate
            self.accumulation_step = accumulation_step
            self.metadata = metadata
            self.timeout = timeout

        def forward(self, x: Any) -> Any:
            return remote(self.client, x, training=self.training and torch.is_grad_enabled(),
                          learning_rate=self.learning_rate,
                          accumulation_step=self.accumulation_step, metadata=self.metadata,
                          timeout=self.timeout)

        def extra_repr(self) -> str:
            return repr(self.client.server_address)

    RemoteModule.__module__ = __name__
    RemoteModule.__qualname__ = "RemoteModule"
    _module_class = RemoteModule
    return RemoteModule


def __getattr__(name: str) -> Any:
    if name == "RemoteModule":
        return _remote_module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
