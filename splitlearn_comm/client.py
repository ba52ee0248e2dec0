"""The client: GRPCComputeClient and the retry strategies."""
from __future__ import annotations

import abc
import concurrent.futures
import itertools
import logging
import numbers
import random
import re
import threading
import time
import uuid
import zlib
from typing import (TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple,
                    Union, cast)

import grpc
import numpy as np

from . import _core, _structure, _tensor, balancing, protocol
from ._metadata import MetadataLike
from ._metadata import normalize as _normalize_metadata
from ._structure import CodecSpec
from .codecs import CodecError, CodecRegistry
from .core import TensorCodec
from .errors import RpcError, from_call_error, status_code
from .tls import ClientTLS

if TYPE_CHECKING:  # pragma: no cover
    from .sessions import Session

logger = logging.getLogger("splitlearn_comm.client")

OptionsLike = Optional[Sequence[Tuple[str, Union[int, bool, str]]]]

# policies that live in the C core, used here, not copied
_COMPUTE = _core.METHOD_COMPUTE
_BACKWARD = _core.METHOD_BACKWARD
_HEALTH = _core.METHOD_HEALTH
_INFO = _core.METHOD_INFO
_RETRYABLE = tuple(c for c in grpc.StatusCode if c.value[0] in _core.RETRYABLE_CODES)


def _log_retry(target: str, method: str, code: Union[int, grpc.StatusCode], details: str,
               attempt: int, delay: float) -> None:
    """Log one retry at WARNING (the C retry loop calls this before each delay)."""
    name = code.name if isinstance(code, grpc.StatusCode) else status_code(code).name
    logger.warning("retrying %s on %s in %.2f s: attempt %d failed with %s: %s",
                   method or "the call", target or "the server", delay, attempt, name, details)


def _is_dns_failure(code: Any, details: str) -> bool:
    """A name that does not resolve fails the same way on every attempt: not retried."""
    return code == grpc.StatusCode.UNAVAILABLE and details.startswith("DNS resolution failed")


class RetryStrategy(abc.ABC):
    """How a client retries a failed call.

    Subclass it and implement :meth:`execute`: call ``func(*args, **kwargs)`` (one
    attempt, which raises :class:`splitlearn_comm.RpcError`, a ``grpc.RpcError``,
    on failure) as often as your policy says. Whatever ``execute`` returns or raises
    is what ``GRPCComputeClient.compute`` returns or raises. Subclasses need not
    call ``super().__init__()``.
    """

    @abc.abstractmethod
    def execute(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``func`` under this policy."""


class _BuiltinRetry(RetryStrategy):
    """A policy whose whole loop (attempts and sleeps) runs in C without the GIL."""

    max_retries: int
    attempt_timeout: Optional[float] = None
    _initial: float
    _max: float
    _multiplier: float
    _jitter: float

    def _policy(self) -> Tuple[int, float, float, float, float, float]:
        return (int(self.max_retries), float(self._initial), float(self._max),
                float(self._multiplier), float(self._jitter), float(self.attempt_timeout or 0.0))

    def _breaker(self) -> Any:
        return None

    def delay(self, retry: int) -> float:
        """The delay before retry number ``retry`` (0-based), jitter applied (the
        rule of the C retry loop, sl_retry_delay)."""
        return float(_core.retry_delay(self._policy(), int(retry), random.random()))

    def execute(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The same policy in Python, for use outside the client."""
        retry = 0
        while True:
            try:
                return func(*args, **kwargs)
            except grpc.RpcError as e:
                code = e.code() if callable(getattr(e, "code", None)) else None
                details = e.details() if callable(getattr(e, "details", None)) else ""
                if (code not in _RETRYABLE or retry >= self.max_retries
                        or _is_dns_failure(code, details or "")):
                    raise
                delay = self.delay(retry)
                _log_retry(getattr(e, "target", ""), getattr(e, "method", ""), code,
                           details or "", retry + 1, delay)
                time.sleep(delay)
                retry += 1


class ExponentialBackoff(_BuiltinRetry):
    """Retry UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED with growing delays.

    The n-th retry waits ``min(max_delay, initial_delay * multiplier**n)``, scaled by a
    random factor in ``[1 - jitter, 1 + jitter]``. Other codes (INVALID_ARGUMENT, INTERNAL
    from a failing ``compute()``, ...) are never retried. The client's timeout
    bounds all attempts and sleeps together; ``attempt_timeout`` bounds each
    attempt (one that runs out is retried as DEADLINE_EXCEEDED).
    """

    def __init__(self, max_retries: int = 3, initial_delay: float = 1.0, max_delay: float = 30.0,
                 jitter: float = 0.25, attempt_timeout: Optional[float] = None,
                 multiplier: float = 2.0) -> None:
        if max_retries < 0 or initial_delay < 0 or max_delay < 0 or not 0 <= jitter <= 1:
            raise ValueError("max_retries, initial_delay and max_delay must be >= 0 and "
                             "jitter within [0, 1]")
        if not multiplier >= 1:
            raise ValueError(f"multiplier must be >= 1, not {multiplier}")
        self.max_retries = max_retries
        _check_timeout(attempt_timeout, "attempt_timeout")
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.jitter = jitter
        self.attempt_timeout = attempt_timeout
        self.multiplier = float(multiplier)
        self._initial, self._max, self._multiplier, self._jitter = (
            initial_delay, max_delay, float(multiplier), jitter)

    def __repr__(self) -> str:
        extra = f", multiplier={self.multiplier}" if self.multiplier != 2.0 else ""
        return (f"ExponentialBackoff(max_retries={self.max_retries}, "
                f"initial_delay={self.initial_delay}, max_delay={self.max_delay}, "
                f"jitter={self.jitter}{extra})")


class FixedDelay(_BuiltinRetry):
    """Retry UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED after a fixed delay."""

    def __init__(self, max_retries: int = 3, delay: float = 1.0,
                 attempt_timeout: Optional[float] = None) -> None:
        if max_retries < 0 or delay < 0:
            raise ValueError("max_retries and delay must be >= 0")
        self.max_retries = max_retries
        self.attempt_timeout = _check_timeout(attempt_timeout, "attempt_timeout")
        self.delay_seconds = delay
        self._initial, self._max, self._multiplier, self._jitter = delay, delay, 1.0, 0.0

    def __repr__(self) -> str:
        return f"FixedDelay(max_retries={self.max_retries}, delay={self.delay_seconds})"


class CircuitBreaker(_BuiltinRetry):
    """Stop calling a server that keeps failing; try again after a while.

    Wraps another strategy (``strategy``; ``None``: one attempt per call). After
    ``failure_threshold`` calls in a row fail with UNAVAILABLE, DEADLINE_EXCEEDED or
    RESOURCE_EXHAUSTED (after their retries), the breaker opens: calls fail at once
    with UNAVAILABLE, saying the breaker is open and for how long, for
    ``reset_timeout`` seconds. Then it lets calls through as probes:
    ``half_open_attempts`` successes close it, one failure opens it again. Errors the
    server chose (INVALID_ARGUMENT, INTERNAL, ...) do not count as failures: the
    server is up. Thread-safe; with a built-in (or no) inner strategy, the whole
    logic runs in C without the GIL. One breaker may be shared by several clients.
    """

    def __init__(self, failure_threshold: int = 5, reset_timeout: float = 60.0,
                 half_open_attempts: int = 3, strategy: Optional[RetryStrategy] = None) -> None:
        if failure_threshold < 1 or half_open_attempts < 1 or reset_timeout < 0:
            raise ValueError("failure_threshold and half_open_attempts must be >= 1, "
                             "reset_timeout >= 0")
        if strategy is not None and not isinstance(strategy, RetryStrategy):
            raise TypeError("strategy must be a RetryStrategy or None")
        if isinstance(strategy, CircuitBreaker):
            raise TypeError("a CircuitBreaker cannot wrap another CircuitBreaker")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.half_open_attempts = half_open_attempts
        self.strategy = strategy
        self._c = _core.Breaker(failure_threshold, float(reset_timeout), half_open_attempts)

    @property
    def max_retries(self) -> int:  # type: ignore[override]
        return self.strategy.max_retries if isinstance(self.strategy, _BuiltinRetry) else 0

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``."""
        return self._c.state

    def is_builtin(self) -> bool:
        return self.strategy is None or isinstance(self.strategy, _BuiltinRetry)

    def delay(self, retry: int) -> float:
        """The inner strategy's delay before retry number ``retry``; 0.0 without one
        (a breaker alone makes one attempt per call and never sleeps)."""
        inner = getattr(self.strategy, "delay", None)
        return float(inner(retry)) if callable(inner) else 0.0

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_c", None)  # the C breaker: a copy starts closed
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._c = _core.Breaker(self.failure_threshold, float(self.reset_timeout),
                                self.half_open_attempts)

    def _policy(self) -> Optional[tuple]:  # type: ignore[override]
        return self.strategy._policy() if isinstance(self.strategy, _BuiltinRetry) else None

    def _breaker(self) -> Any:
        return self._c

    def execute(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The breaker around ``strategy.execute`` (for Python strategies and direct use)."""
        allowed, wait, failures = self._c.allow()
        if not allowed:
            raise RpcError(grpc.StatusCode.UNAVAILABLE,
                           _core.breaker_open_message(float(wait), int(failures)), attempts=0)
        try:
            if self.strategy is None:
                result = func(*args, **kwargs)
            else:
                result = self.strategy.execute(func, *args, **kwargs)
        except grpc.RpcError as e:
            code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
            self._c.record(code.value[0])
            raise
        self._c.record(0)
        return result

    def __repr__(self) -> str:
        return (f"CircuitBreaker(failure_threshold={self.failure_threshold}, "
                f"reset_timeout={self.reset_timeout}, half_open_attempts="
                f"{self.half_open_attempts}, strategy={self.strategy!r}, state={self.state!r})")


_DEFAULT = object()


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:/\[\]]+)):(?P<port>\d+)$")


#: gRPC target schemes (passed through without the HOST:PORT check).
_GRPC_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:", "xds:",
                 "passthrough:")


def bad_address_message(address: str) -> str:
    """What is wrong with an address that is neither HOST:PORT nor a gRPC target
    (the command line says the same)."""
    return (f"bad address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:50051 "
            "(or [::1]:50051, unix:/path/to.sock)")


def _check_target(target: str) -> None:
    """Refuse addresses gRPC would misread: empty, a URL with a scheme gRPC does not
    know (``http://host:port``: gRPC would look the whole text up in DNS), or
    host:port with a bad port. gRPC target forms (dns:///..., unix:..., ipv4:...)
    pass through."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"server_address must be 'host:port', got {target!r}")
    if target.startswith(_GRPC_SCHEMES):
        return
    m = _HOST_PORT.match(target)
    if m is None:
        hint = ""
        if "://" in target:
            hint = (f"; {target.split('://', 1)[0]}:// is not a gRPC scheme: give the address "
                    "without it")
        raise ValueError(f"server_address: {bad_address_message(target)}{hint}")
    if not 1 <= int(m.group("port")) <= 65535:
        raise ValueError(f"server_address: bad address {target!r}: port {int(m.group('port'))} "
                         "is not in 1-65535")


def _check_timeout(timeout: Optional[float], what: str = "timeout") -> Optional[float]:
    """``timeout`` as given, after refusing what is not a number of seconds >= 0
    (a negative timeout would otherwise silently mean no deadline at all)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"{what} must be a number of seconds or None, "
                        f"not {type(timeout).__name__}")
    if not timeout >= 0:  # also NaN
        raise ValueError(f"{what} must be >= 0 seconds (or None for no deadline), not {timeout}")
    return timeout


def _seconds(timeout: Optional[float], forever: float = 0.0) -> float:
    """A timeout for the C core: None means no deadline (0 there, or `forever`)."""
    return forever if timeout is None else float(_check_timeout(timeout))


def _percentile(values: List[float], q: float) -> float:
    """The q-quantile of ``values`` (nearest rank below), 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _as_float32(t: Any) -> Any:
    """A KV cache tensor as the original's wire carries it: float32."""
    if _tensor.is_torch_tensor(t):
        return t.detach().float()
    return np.asarray(t, dtype=np.float32)


def _timing_of(start: float, reply: Any) -> Dict[str, float]:
    total = (time.perf_counter() - start) * 1e3
    server = float(reply.compute_time_ms or 0.0)
    return {"network_total_ms": total, "server_compute_ms": server,
            "network_overhead_ms": max(0.0, total - server)}


def _raw(spec: Any) -> bool:
    """Whether a codec spec sends every tensor as the core chooses (none, or a
    plain TensorCodec): the binding then exports flatten's pairs as they are."""
    return spec is None or (type(spec) is TensorCodec and spec.dtype is None)


def _out_leaves(form: int, items: List[Tuple[str, Any]], spec: Any,
                registry: CodecRegistry) -> List[Any]:
    """The tensors of a call: ``(name, tensor)`` each, sent raw or as the core
    chooses, or ``(name, tensor, codec)`` with the ``_core.Codec`` the C core encodes
    it with (built in or Python). The binding exports each tensor for each attempt
    (a plain CPU torch.Tensor straight through DLPack in C, anything else made
    sendable by ``_tensor.export_slow``)."""
    if _raw(spec):
        return items  # the common case: flatten's (name, tensor) pairs as they are
    out: List[Any] = []
    for i, (name, obj) in enumerate(items):
        t, _how = _tensor.prepare(obj)
        if form == _structure.SINGLE and i > 0:
            out.append((name, t))  # KV cache entries: raw
            continue
        if form == _structure.SINGLE and isinstance(spec, TensorCodec):
            codec = spec  # one tensor: the codec as given (it refuses what it cannot take)
        else:
            codec = _structure.codec_for(spec, name)
            if codec is not None and not _structure.accepts(codec, _structure.dtype_of(t)):
                codec = None
        c = None if codec is None else registry.c_codec(codec)
        out.append((name, t, None if c is None or c.name == "raw" else c))
    return out


class GRPCComputeClient:
    """Send tensors to a :class:`GRPCComputeServer` and get the results back.

    Args:
        server_address: ``"host:port"`` (any gRPC target, e.g.
            ``"dns:///splitlearn.default.svc:50051"``), or a list of replica
            addresses ``["host1:50051", "host2:50051", ...]``: calls are spread over
            the replicas by gRPC's load balancing (docs/scaling.md).
        load_balancing: the gRPC load-balancing policy, ``"round_robin"`` or
            ``"pick_first"``. Default: ``round_robin`` for a list of several
            addresses and for ``dns:`` targets, ``pick_first`` for one address. With
            ``round_robin`` the client also checks each replica's
            grpc.health.v1 status (client-side health checking): a replica that
            reports NOT_SERVING (draining, or set so) gets no new calls.
        timeout: seconds allowed for each ``compute()`` (all retries included).
        retry_strategy: a :class:`RetryStrategy`; ``ExponentialBackoff()`` by
            default; ``None`` makes a single attempt.
        codec: the :class:`TensorCodec` for requests (``None``: raw), or a mapping
            from tensor name or path prefix to codec (``{"hidden": Float16Codec()}``).
            In a structure, one codec applies to the tensors it accepts (floating
            point for most; integer and bool tensors go raw); see docs/api.md.
            Built-in codecs run in C without the GIL; a Python codec must also be
            registered on the server.
        codecs: more Python codecs this client can decode (responses carry the
            name of the codec that encoded them).
        tls: a :class:`ClientTLS` to connect over TLS (or mutual TLS).
        options: gRPC channel arguments, ``[(name, value), ...]``.
        metadata: gRPC metadata sent with every call, e.g.
            ``[("authorization", token)]``.
        wait_for_ready: wait (within the timeout) for an unreachable server to come up
            instead of failing at once with UNAVAILABLE.
        max_message_length: the largest message, in bytes, sent or received (sets
            ``grpc.max_send_message_length`` and ``grpc.max_receive_message_length``
            unless ``options`` sets them); ``None``: unlimited (up to gRPC's 2 GiB).
        model_id: the ``model_id`` every call carries unless it names its own: which
            of a server's compute functions serves it (a server hosting several).
        shared_memory: when the server runs on this host (a ``unix:`` address,
            ``localhost``, ``127.x.x.x`` or ``[::1]``, without TLS), carry the
            tensor bytes of blocking calls through shared memory, negotiated with
            the server on the first call and refused safely (falling back to TCP,
            logged at debug level) across hosts, pid namespaces or users
            (docs/shm.md). ``False`` keeps every byte on the gRPC connection; so
            does the environment variable ``SPLITLEARN_SHM=0``.
        stream_threshold: a ``compute()`` (or backward) request of this many bytes
            or more travels as a stream of chunks (``ComputeStream``,
            docs/protocol.md), each copied into place on the far side while the
            next is on the wire, with no 2 GiB limit; the reply comes back the same
            way. ``None``: always unary. A server that does not know the streaming
            method gets the call again as unary, and this client remembers it.
        busy_poll: seconds a blocking call looks for its reply without sleeping
            before it sleeps; ``None``: 200 µs, or off when the environment has
            ``SPLITLEARN_BUSY_POLL=0``. A quick reply is then read by a
            thread already running instead of one the kernel has to wake, which
            takes tens of microseconds off a small round trip. It spins only where
            that pays: after a few polls that the reply outlasted, the client's
            calls sleep at once and poll only now and then (a client of slower
            calls hardly ever spins); one thread of the process spins at a time;
            and a process pinned to one CPU never spins. ``0``
            turns it off (calls then use no CPU while they wait); see
            docs/api.md, "Busy polling".

    A client can be pickled and deep-copied (e.g. inside a model holding a
    ``RemoteModule`` that is checkpointed): the copy opens its own channel to the
    same server with the same settings.

    One client may be shared by many threads; their calls multiplex over one HTTP/2
    connection (one per replica when balancing), and each waits on the network
    without holding the GIL.

    Stateful calls need affinity: :meth:`pinned` gives a client bound to one
    replica, and :meth:`remote` in training mode pins this client's training steps
    to one replica by itself.
    """

    def __init__(self, server_address: Union[str, Sequence[str]], timeout: float = 30.0,
                 retry_strategy: Any = _DEFAULT, codec: CodecSpec = None,
                 options: OptionsLike = None, metadata: MetadataLike = None,
                 wait_for_ready: bool = False,
                 codecs: Optional[Sequence[TensorCodec]] = None,
                 tls: Optional[ClientTLS] = None,
                 load_balancing: Optional[str] = None,
                 max_message_length: Optional[int] = None,
                 model_id: Optional[str] = None, shared_memory: bool = True,
                 stream_threshold: Optional[int] = _core.STREAM_THRESHOLD,
                 busy_poll: Optional[float] = None) -> None:
        _structure.check_codec_spec(codec)
        if model_id is not None and not isinstance(model_id, str):
            raise TypeError(f"model_id must be a str or None, not {type(model_id).__name__}")
        if stream_threshold is not None and (isinstance(stream_threshold, bool) or
                                             not isinstance(stream_threshold, int) or
                                             stream_threshold < 0):
            raise ValueError(f"stream_threshold must be a byte count >= 0 or None, "
                             f"not {stream_threshold!r}")
        self.stream_threshold = stream_threshold
        if retry_strategy is _DEFAULT:
            retry_strategy = ExponentialBackoff()
        if retry_strategy is not None and not isinstance(retry_strategy, RetryStrategy):
            raise TypeError("retry_strategy must be a RetryStrategy or None")
        self.server_address: Union[str, List[str]] = (
            server_address if isinstance(server_address, str) else list(server_address))
        self.timeout = _check_timeout(timeout)
        self.retry_strategy = retry_strategy
        self.codec: CodecSpec = codec if codec is not None else TensorCodec()
        self.model_id = model_id or None
        mapped = list(codec.values()) if isinstance(codec, Mapping) else [self.codec]
        self._registry = CodecRegistry([*mapped, *(codecs or [])])
        self._codecs = list(codecs or [])
        from .server import _with_message_length

        self.options = _with_message_length(options, max_message_length)
        self.metadata = _normalize_metadata(metadata)
        self.wait_for_ready = wait_for_ready
        if tls is not None and not isinstance(tls, ClientTLS):
            raise TypeError("tls must be a splitlearn_comm.ClientTLS")
        self.tls = tls
        fixed: Optional[List[str]] = None
        self._extra_options: List[Tuple[str, Any]] = []
        if isinstance(server_address, str):
            _check_target(server_address)
            self._target = server_address
        else:
            self._target, fixed, named = balancing.multi_target(server_address)
            keys = {k for k, _ in self.options}
            if named and not keys & {"grpc.default_authority", "grpc.ssl_target_name_override"}:
                # the name TLS checks the certificate against (and the :authority)
                self._extra_options.append(("grpc.default_authority",
                                            self.server_address[0].strip()))
        policy = (balancing.default_policy(self.server_address) if load_balancing is None
                  else load_balancing)
        if policy not in balancing.POLICIES:
            raise ValueError(f"load_balancing must be one of {', '.join(balancing.POLICIES)}, "
                             f"not {policy!r}")
        if any(k == "grpc.service_config" for k, _ in self.options):
            if load_balancing is not None:
                raise ValueError("pass either load_balancing= or a 'grpc.service_config' "
                                 "option, not both")
        elif load_balancing is not None or policy != "pick_first":
            self._extra_options.append(("grpc.service_config", balancing.service_config(policy)))
        self.load_balancing = policy
        self._replicas = balancing.Replicas(self._target, fixed)
        #: sent with training calls, so that the server's activation store keys by client
        self.client_id = uuid.uuid4().hex
        self._pins: Dict[str, "GRPCComputeClient"] = {}
        self._pins_lock = threading.Lock()
        self._rotation = 0
        self.shared_memory = bool(shared_memory)
        self._core: Optional[Any] = _core.Client(self._target, self.options + self._extra_options,
                                                 tls._args() if tls else None,
                                                 shm=self.shared_memory)
        self._core.set_retry_hook(_log_retry)
        self._core.set_streaming(-1 if stream_threshold is None else stream_threshold)
        self._busy_poll = 0.0
        if busy_poll is not None:
            self.busy_poll = busy_poll
        # counters of compute() calls (_core.CallStats: updated in C with the GIL held,
        # by Client.plain at the end of a call and by _record / _call_failed otherwise)
        self._stats = _core.CallStats()
        self._id_counter = itertools.count(1)
        self._ids_lock = threading.Lock()
        self._sessions: Dict[int, Any] = {}  # open sessions, closed with the client

    # -- lifecycle ------------------------------------------------------------

    @property
    def busy_poll(self) -> float:
        """The busy-polling window in use, in seconds (``0.0``: off, as in a process
        bound to one CPU). Settable: ``client.busy_poll = 0`` turns it off."""
        return self._core.busy_poll if self._core is not None else self._busy_poll

    @busy_poll.setter
    def busy_poll(self, seconds: float) -> None:
        self._live().busy_poll = seconds  # checked there: seconds in [0, 1]

    def connect(self, timeout: Optional[float] = None) -> bool:
        """Wait until the server is reachable; True when connected within ``timeout``."""
        return bool(self._live().connect(_seconds(self.timeout if timeout is None else timeout,
                                                  forever=1e9)))

    def close(self) -> None:
        """Close the channel (and those of :meth:`pinned` clients), after closing the
        client's open sessions on the server. Calls after this raise ValueError."""
        with self._ids_lock:
            sessions = list(getattr(self, "_sessions", {}).values())
        for s in sessions:
            s.close(timeout=min(5.0, self.timeout or 5.0))
        core, self._core = self._core, None
        if core is not None:
            self._busy_poll = core.busy_poll
            core.close()
        with self._pins_lock:
            pins, self._pins = list(self._pins.values()), {}
        for pin in pins:
            pin.close()

    # -- replicas and affinity --------------------------------------------------

    def replicas(self) -> List[str]:
        """The replica addresses behind this client (``"ip:port"``): the list it was
        given (host names resolved), the addresses a ``dns:`` target resolves to now,
        or the one address."""
        return self._replicas.get()

    def pinned(self, key: Any = None) -> "GRPCComputeClient":
        """A client bound to one replica, for calls that need affinity.

        Every call through it goes to the same replica: a training step (forward
        and backward), a session, anything that keeps state on the server. ``key``
        picks the replica (the same key, the same replica, while the replica set
        is unchanged); ``None`` takes the next replica in turn. The pinned client
        shares this client's settings (timeout, retry strategy, codec, metadata,
        TLS, options other than the service config); its retries stay on its
        replica. It belongs to this client: do not close it; ``close()`` here
        closes it. A client with one address returns itself.
        """
        replicas = self.replicas()
        if len(replicas) <= 1 and not self._target.startswith("dns:"):
            return self
        if not replicas:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"{self._target} has no replica to pin",
                           target=self._target, method=_COMPUTE, attempts=0)
        if key is None:
            with self._pins_lock:
                index = self._rotation % len(replicas)
                self._rotation += 1
        else:
            index = zlib.crc32(repr(key).encode()) % len(replicas)
        address = replicas[index]
        with self._pins_lock:
            self._live()
            pin = self._pins.get(address)
            if pin is None:
                options = [o for o in self.options if o[0] != "grpc.service_config"]
                options += [o for o in self._extra_options if o[0] != "grpc.service_config"]
                pin = GRPCComputeClient(address, timeout=self.timeout,
                                        retry_strategy=self.retry_strategy, codec=self.codec,
                                        options=options, metadata=self.metadata,
                                        wait_for_ready=self.wait_for_ready,
                                        codecs=self._codecs, tls=self.tls,
                                        load_balancing="pick_first", model_id=self.model_id,
                                        shared_memory=self.shared_memory,
                                        stream_threshold=self.stream_threshold,
                                        busy_poll=self.busy_poll)
                pin.client_id = self.client_id
                self._pins[address] = pin
        return pin

    def _affine(self, key: Any) -> "GRPCComputeClient":
        """This client, or, when it balances over replicas, the one pinned to
        ``key``: calls that keep state on the server must all reach one replica."""
        if self.load_balancing == "pick_first" and not isinstance(self.server_address, list):
            return self
        return self.pinned(key)

    def _training_client(self) -> "GRPCComputeClient":
        """The client a training step goes through: this one, or the replica this
        client's training is pinned to (keyed by its client_id) when it balances."""
        return self._affine(self.client_id)

    def __enter__(self) -> "GRPCComputeClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _live(self) -> Any:
        if self._core is None:
            raise ValueError("the client is closed")
        return self._core

    def __getattr__(self, name: str) -> Any:
        # only for names not found otherwise: the earlier package's methods say what
        # replaced them
        from ._moved import CLIENT

        if name in CLIENT:
            raise AttributeError(f"{CLIENT[name]} (docs/migrating.md)")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __reduce__(self) -> Tuple[Any, Tuple[Dict[str, Any]]]:
        """Pickle (and deep-copy) as the client's settings: the copy opens its own
        channel, so a model holding a RemoteModule can be checkpointed and loaded."""
        return (_rebuild_client, ({
            "server_address": self.server_address, "timeout": self.timeout,
            "retry_strategy": self.retry_strategy, "codec": self.codec,
            "options": list(self.options), "metadata": list(self.metadata),
            "wait_for_ready": self.wait_for_ready, "codecs": list(self._codecs),
            "tls": self.tls, "model_id": self.model_id,
            "shared_memory": self.shared_memory,
            "stream_threshold": self.stream_threshold, "busy_poll": self.busy_poll,
            "load_balancing": None if any(k == "grpc.service_config" for k, _ in self.options)
            else self.load_balancing},))

    # -- calls ----------------------------------------------------------------

    def compute(self, tensor: Any, metadata: MetadataLike = None,
                timeout: Optional[float] = None, *, codec: Any = _DEFAULT,
                model_id: Optional[str] = None) -> Any:
        """Send ``tensor`` to the server's ``compute()`` and return its result.

        ``tensor`` is a tensor or any structure of them: dicts (str keys), tuples
        and lists nested as you like, with ``None``, ``bool``, ``int``, ``float``
        and ``str`` leaves too. ``compute()`` receives it with the same structure,
        container types and names, and whatever structure it returns comes back the
        same way. A ``torch.Tensor`` comes back as a ``torch.Tensor`` on the device
        the (first) input was on; NumPy arrays come back as NumPy arrays.
        ``metadata`` is extra gRPC metadata for this call; ``timeout`` overrides
        the client's; ``model_id`` (default: the client's) picks one of a server's
        compute functions; ``codec`` the client's codec (one codec or a mapping from
        tensor name or path prefix to codec); ``model_id`` is sent in the
        request's ``model_id`` field.

        Raises:
            RpcError: the call failed (``e.code()`` is a ``grpc.StatusCode``).
            TypeError, ValueError: the input cannot be sent (unsupported dtype or
                leaf type, larger than gRPC's 2 GiB message limit, ...).
        """
        if (type(tensor) is _structure._torch_tensor_type() and metadata is None and timeout is None
                and codec is _DEFAULT and model_id is None and _raw(self.codec)
                and tensor.is_cpu and self._builtin_retry()):
            return self._plain_call(tensor)
        _check_not_model_id(metadata)
        fields: Dict[str, Any] = {}
        if model_id is not None:
            fields["model_id"] = str(model_id)
        return self._tensor_call(tensor, metadata=metadata, timeout=timeout, codec=codec,
                                 **fields)

    def _plain_call(self, tensor: Any) -> Any:
        """compute() of one CPU torch.Tensor with the client's settings and a retry
        strategy that runs in C: one call into the binding (Client.plain), which
        exports the tensor, makes the call, makes the result and counts it; none of
        _tensor_call's steps that change nothing for such a call."""
        strategy = self.retry_strategy
        start = time.perf_counter()
        try:
            out = self._live().plain(
                tensor, self.timeout or 0.0, self.metadata, self.wait_for_ready,
                strategy._policy() if strategy is not None else None,
                strategy._breaker() if strategy is not None else None,
                self._registry.table, _tensor.from_dlpack(), self.model_id, self._next_id(),
                self._stats)
        except _core.CallError as e:
            self._record(False, start, None)
            raise self._call_failed(e, False) from None
        except BaseException:
            self._record(False, start, None)
            raise
        if type(out) is _core.Reply:  # the reply carries KV cache pairs
            return self._result(out, ("torch", tensor.device))
        return out

    def compute_with_timing(self, tensor: Any, model_id: Optional[str] = None, *,
                            metadata: MetadataLike = None,
                            timeout: Optional[float] = None) -> Tuple[Any, Dict[str, float]]:
        """``compute()`` that also says where the time went (the earlier
        splitlearn-comm's method): ``(result, timing)`` with ``timing`` the dict
        ``{"network_total_ms", "server_compute_ms", "network_overhead_ms"}``: the
        whole call as the client saw it (retries included), the server's
        ``compute()`` as the server measured it, and the difference."""
        timing: Dict[str, float] = {}
        result = self._tensor_call(tensor, metadata=metadata, timeout=timeout,
                                   model_id=model_id, _timing=timing)
        return result, timing

    def compute_backward(self, grad_output: Any, forward_id: str,
                         model_id: Optional[str] = None, *,
                         learning_rate: Optional[float] = None,
                         accumulation_step: Optional[int] = None,
                         metadata: MetadataLike = None, timeout: Optional[float] = None) -> Any:
        """Send ``grad_output`` (the gradient of the output of the training forward
        stored under ``forward_id``) with ComputeBackward and return the input
        gradient (the earlier splitlearn-comm's method). :meth:`remote` does this
        for you inside ``loss.backward()``; see docs/training.md."""
        if not isinstance(forward_id, str) or not forward_id:
            raise ValueError("compute_backward() needs the forward_id of a training forward")
        return self._tensor_call(grad_output, metadata=metadata, timeout=timeout, backward=True,
                                 forward_id=forward_id, model_id=model_id,
                                 learning_rate=learning_rate,
                                 accumulation_step=accumulation_step)

    def compute_with_cache(self, input_tensor: Any, past_key_values: Any = None,
                           use_cache: bool = False, model_id: Optional[str] = None,
                           timeout: Optional[float] = None
                           ) -> Tuple[Any, Optional[Tuple[Tuple[Any, Any], ...]], Dict[str, float]]:
        """The original library's KV-cache call, on its wire fields, for migration.

        Sends ``input_tensor`` with ``past_key_values`` (a sequence of ``(key,
        value)`` pairs, one per layer, or None) in ``ComputeRequest.past_key_values``
        and ``use_cache`` in ``ComputeRequest.use_cache``; returns ``(output,
        present_key_values, timing)`` with ``present_key_values`` read from
        ``ComputeResponse.present_key_values`` (a tuple of ``(key, value)`` pairs, or
        None when the server sent none). The cache travels as raw float32, as the
        original sent it: other dtypes are converted (and come back float32). Works
        against the original's servers and ours; a server of ours calls
        ``compute(x, past_key_values=..., use_cache=...)`` (see docs/api.md). New
        code can send the cache as a structure with ``compute()`` instead, in any
        dtype and codec.
        """
        leaves: List[Tuple[str, Any]] = [("", input_tensor)]
        if past_key_values is not None:
            for i, pair in enumerate(past_key_values):
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise TypeError(f"past_key_values[{i}] must be a (key, value) pair")
                for part in pair:
                    if not _tensor.is_torch_tensor(part) and not isinstance(part, np.ndarray):
                        raise TypeError(f"past_key_values[{i}] holds a {type(part).__name__}, "
                                        "not a tensor")
                leaves.append(("", _as_float32(pair[0])))
                leaves.append(("", _as_float32(pair[1])))
        start = time.perf_counter()
        reply_box: List[Any] = []
        fields: Dict[str, Any] = {"use_cache": bool(use_cache)}
        if model_id is not None:
            fields["model_id"] = str(model_id)
        out = self._tensor_call(input_tensor, timeout=timeout, _reply=reply_box,
                                _kv_leaves=leaves, **fields)
        reply = reply_box[0]
        present = None
        if isinstance(out, tuple) and reply.form == _structure.SINGLE:
            out, present = out
        return out, present, _timing_of(start, reply)

    def compute_async(self, tensor: Any, metadata: MetadataLike = None,
                      timeout: Optional[float] = None) -> "concurrent.futures.Future[Any]":
        """Start ``compute(tensor)`` and return at once with its future.

        The result (or the :class:`RpcError`) arrives in a
        ``concurrent.futures.Future``: ``result(timeout)``, ``exception()``,
        ``add_done_callback()``; ``cancel()`` cancels the gRPC call (the server sees
        ``current_call().is_active()`` turn false). Any number of calls may be in
        flight from one thread: they wait in the C core's completion queue, served by
        one completion thread per client (done callbacks run there: keep them short
        and never wait there for another call). Retries, deadlines, metadata, codecs
        and statistics are those of :meth:`compute`. Closing the client fails the
        calls in flight with CANCELLED. See docs/async.md.
        """
        from ._async import compute_async

        return compute_async(self, tensor, metadata=metadata, timeout=timeout)

    async def acompute(self, tensor: Any, metadata: MetadataLike = None,
                       timeout: Optional[float] = None) -> Any:
        """``await client.acompute(x)``: :meth:`compute` for asyncio, from any running
        loop, without blocking it or parking a thread; ``task.cancel()`` cancels the
        gRPC call."""
        from ._async import acall

        return await acall(self, tensor, metadata=metadata, timeout=timeout)

    def pipeline(self, chunks: int = 4, **kwargs: Any) -> "Any":
        """A :class:`splitlearn_comm.Pipeline` of ``chunks`` micro-batches over this
        client (GPipe-style split training; see docs/async.md)."""
        from .pipeline import Pipeline

        return Pipeline(self, chunks=chunks, **kwargs)

    def remote(self, tensor: Any, *, training: Optional[bool] = None,
               learning_rate: Optional[float] = None, accumulation_step: Optional[int] = None,
               metadata: MetadataLike = None, timeout: Optional[float] = None) -> Any:
        """``compute()`` as a step of the caller's autograd graph (split-learning training).

        Under autograd (or with ``training=True``) the call is a training forward and
        the result requires grad: ``loss.backward()`` sends its gradient to the server
        (ComputeBackward, with ``learning_rate`` and ``accumulation_step``) and goes on
        into the layers that produced ``tensor`` with the input gradient the server
        returns. Under ``torch.no_grad()`` (or ``training=False``) it is a plain
        inference call. The server hosts a ``TrainableComputeFunction`` (or another
        compute function with ``backward()``); see docs/training.md.
        """
        from .training_client import remote

        return remote(self, tensor, training=training, learning_rate=learning_rate,
                      accumulation_step=accumulation_step, metadata=metadata, timeout=timeout)

    def session(self, session_id: Optional[str] = None, metadata: MetadataLike = None,
                timeout: Optional[float] = None) -> "Session":
        """A session: every call of it reaches the same state on the server
        (``current_call().session`` in its ``compute()``), e.g. a transformer's KV
        cache. Use it as a context manager; closing it (or the client) frees the
        state on the server. ``session_id`` defaults to a fresh random id.
        See docs/inference.md::

            with client.session() as s:
                y1 = s.compute(x1)
                y2 = s.compute(x2)   # sees what the call for x1 left in the session
        """
        from .sessions import Session

        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValueError("session_id must be a non-empty string")
        session_id = session_id or uuid.uuid4().hex
        self._live()
        # a session's state lives on one replica: on a balancing client, its calls
        # go through the client pinned to the session id (closed by this one)
        owner = self._affine(session_id)
        s = Session(owner, session_id, metadata=metadata, timeout=timeout)
        with owner._ids_lock:
            owner._sessions[id(s)] = s
        return s

    def _forget_session(self, session: Any) -> None:
        with self._ids_lock:
            self._sessions.pop(id(session), None)

    def _tensor_call(self, tensor: Any, *, metadata: MetadataLike = None,
                     timeout: Optional[float] = None, codec: Any = _DEFAULT,
                     _reply: Optional[List[Any]] = None,
                     _timing: Optional[Dict[str, float]] = None,
                     _kv_leaves: Optional[List[Tuple[str, Any]]] = None, **fields: Any) -> Any:
        """compute() with the call's extra fields: backward=True (ComputeBackward),
        forward_id, training_mode, model_id, learning_rate, accumulation_step,
        use_cache."""
        sendable, how = self._sendable(tensor, fields, codec, _kv_leaves)
        # torch results on the CPU are made by the binding, structure and all
        convert = _tensor.from_dlpack() if how[0] == "torch" and (
            how[1] is None or how[1].type == "cpu") else None
        md = self.metadata + _normalize_metadata(metadata)
        total = self.timeout if timeout is None else _check_timeout(timeout)
        start = time.perf_counter()
        try:
            strategy = self.retry_strategy
            if self._builtin_retry():
                reply = self._attempt(sendable, md, total, cast(Optional[_BuiltinRetry], strategy),
                                      fields, convert)
            else:
                deadline = time.monotonic() + total if total and total > 0 else None
                reply = strategy.execute(self._attempt_until, sendable, md, deadline, fields,
                                         convert)
        except BaseException:
            self._record(False, start, None)
            raise
        self._record(True, start, reply.compute_time_ms, reply)
        if _reply is not None:
            _reply.append(reply)
        if _timing is not None:
            _timing.update(_timing_of(start, reply))
        return self._result(reply, how)

    def _builtin_retry(self) -> bool:
        """Whether the retry strategy runs in C (none, or a built-in one); a Python
        RetryStrategy's execute() runs the blocking path instead."""
        strategy = self.retry_strategy
        return strategy is None or (isinstance(strategy, _BuiltinRetry) and
                                    (not isinstance(strategy, CircuitBreaker) or
                                     strategy.is_builtin()))

    def _total_timeout(self, timeout: Optional[float]) -> Optional[float]:
        """A call's deadline over all attempts: ``timeout``, else the client's."""
        return self.timeout if timeout is None else _check_timeout(timeout)

    def _sendable(self, tensor: Any, fields: Dict[str, Any], codec: Any = _DEFAULT,
                  kv_leaves: Optional[List[Tuple[str, Any]]] = None
                  ) -> Tuple[Tuple[List[Any], int, Any], _tensor.Restore]:
        """What a call sends, ``(leaves, form, nodes)``, and how its result is given
        back; sets ``fields["model_id"]`` from the client's default. Shared by the
        blocking and the asynchronous calls."""
        if fields.get("model_id") is None:
            fields.pop("model_id", None)
            if self.model_id is not None:
                fields["model_id"] = self.model_id
        spec = self.codec if codec is _DEFAULT else codec
        if codec is not _DEFAULT:
            _structure.check_codec_spec(spec)
            if isinstance(spec, TensorCodec):
                self._registry.register(spec)
            elif isinstance(spec, Mapping):
                for c in spec.values():
                    self._registry.register(c)
        if kv_leaves is not None:
            form, items, nodes = _structure.SINGLE, kv_leaves, None
        else:
            form, items, nodes = _structure.flatten(tensor)
        how = _structure.restore_kind(tensor)
        return (_out_leaves(form, items, spec, self._registry), form, nodes), how

    def _result(self, reply: Any, how: _tensor.Restore) -> Any:
        if reply.values is not None:  # made by the binding (compute(convert=...))
            obj, values = reply.value, reply.values
        elif how[0] == "torch" and (how[1] is None or how[1].type == "cpu"):
            # torch tensors on the CPU: wrapped and rebuilt in one pass in C
            obj, values = _core.rebuild(reply.form, reply.leaves, reply.nodes,
                                        _tensor.from_dlpack())
        else:
            values = [_tensor.restore(leaf.tensor, how) for leaf in reply.leaves]
            if reply.form != _structure.SINGLE:
                return _structure.unflatten(reply.form, values,
                                            [leaf.name for leaf in reply.leaves], reply.nodes)
            obj = values[0]
        if reply.form == _structure.SINGLE and reply.n_kv:
            pairs = tuple((values[1 + 2 * i], values[2 + 2 * i]) for i in range(reply.n_kv))
            return values[0], pairs
        return obj

    def _next_id(self) -> int:
        # next() on itertools.count is atomic under the GIL: no lock
        return next(self._id_counter) & 0x7FFFFFFF

    def _attempt(self, sendable: tuple, md: list, timeout: Optional[float],
                 strategy: Optional[_BuiltinRetry], fields: Optional[Dict[str, Any]] = None,
                 convert: Any = None) -> Any:
        """One call to the C core: a single attempt, or a built-in strategy's loop in C.
        ``convert`` (a capsule's wrapper) has the binding make the reply's tensors
        and object (``Reply.value``, ``Reply.values``)."""
        fields = fields or {}
        leaves, form, nodes = sendable  # exported by the binding, for this attempt
        try:
            return self._live().compute(
                leaves, form=form, nodes=nodes, timeout=timeout or 0.0, metadata=md,
                wait_for_ready=self.wait_for_ready,
                retry=strategy._policy() if strategy is not None else None,
                breaker=strategy._breaker() if strategy is not None else None,
                request_id=None if fields.get("backward") else self._next_id(),
                codecs=self._registry.table, convert=convert, **fields)
        except _core.CallError as e:
            raise self._call_failed(e, bool(fields.get("backward"))) from None

    def _call_failed(self, e: Any, backward: bool) -> RpcError:
        """The RpcError of a failed call (a _core.CallError), counted by its status."""
        err = from_call_error(e, target=self._target, method=_BACKWARD if backward else _COMPUTE)
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.wait_for_ready:
            reason = self._unreachable_reason()
            if reason:
                err = RpcError(err.code(), f"{err.details()}: the server was not reachable "
                               f"(wait_for_ready); last connectivity error: {reason}",
                               target=err.target, method=err.method, attempts=err.attempts,
                               trailing_metadata=err.trailing_metadata(),
                               initial_metadata=err.initial_metadata(),
                               debug_error_string=err.debug_error_string())
        self._stats.count_error(err.code().name, err.attempts)
        return err

    def _unreachable_reason(self) -> Optional[str]:
        """Why the channel is not connected (e.g. "Connection refused"), or None when
        it is: asks once without wait_for_ready, with the side-effect-free HealthCheck,
        so that gRPC reports its last connectivity error."""
        core = self._live()
        if core.connect(0.0):
            return None
        try:
            core.health(timeout=1.0, metadata=self.metadata)
        except _core.CallError as e:
            code, details = e.args[0], e.args[1]
            if status_code(code) == grpc.StatusCode.UNAVAILABLE:
                return str(details)
            if status_code(code) == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "still connecting (no answer to the connection attempt)"
        return None

    def _attempt_until(self, sendable: tuple, md: list, deadline: Optional[float],
                       fields: Optional[Dict[str, Any]] = None, convert: Any = None) -> Any:
        """One attempt bounded by the overall deadline (for Python strategies)."""
        if deadline is None:
            return self._attempt(sendable, md, None, None, fields, convert)
        left = deadline - time.monotonic()
        if left <= 0:
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           "the call's timeout ran out before this attempt",
                           target=self._target,
                           method=_BACKWARD if (fields or {}).get("backward") else _COMPUTE,
                           attempts=0)
        return self._attempt(sendable, md, left, None, fields, convert)

    def _record(self, ok: bool, start: float, server_ms: Optional[float],
                reply: Any = None) -> None:
        """Count a call that began at ``start`` (``time.perf_counter()``); ``reply``,
        when given, adds its retries, bytes and transport."""
        self._stats.record(ok, (time.perf_counter() - start) * 1e3, server_ms, reply)

    def health_check(self, timeout: Optional[float] = None) -> bool:
        """True when the server answers HealthCheck with status "ok"."""
        try:
            reply = self._live().health(
                timeout=_seconds(self.timeout if timeout is None else timeout),
                metadata=self.metadata)
        except _core.CallError as e:
            logger.debug("health check of %s failed: %s", self._target, e.args[1])
            return False
        return reply["status"] == "ok"

    def get_service_info(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The server's GetServiceInfo answer as a dict: service_name, version, device,
        uptime_seconds, total_requests and custom_info (its ``get_info()``)."""
        try:
            return self._live().service_info(
                timeout=_seconds(self.timeout if timeout is None else timeout),
                metadata=self.metadata)
        except _core.CallError as e:
            raise from_call_error(e, target=self._target,
                                  method=_INFO) from None

    def get_statistics(self) -> Dict[str, Any]:
        """Counters and times (ms) of this client's ``compute()`` calls.

        ``avg_*`` are means over successful calls (network = total - server compute);
        ``p50_total_time_ms`` / ``p99_total_time_ms`` cover the latest 4096 calls;
        ``failures_by_code`` counts failed calls by gRPC status name; ``retries`` the
        attempts beyond the first; bytes are message bytes on the wire, all attempts.
        ``requests_by_transport`` counts the successful calls by how their request's
        tensors went: ``"unary"`` (one gRPC message), ``"stream"`` (a stream of
        chunks: large tensors, docs/protocol.md) or ``"shared_memory"`` (a segment
        shared with a server on this host, docs/shm.md).
        """
        s = self._stats.snapshot()
        n = s["ok"] or 1
        return {
            "total_requests": s["total"],
            "successful_requests": s["ok"],
            "failed_requests": s["failed"],
            "retries": s["retries"],
            "failures_by_code": s["by_code"],
            "requests_by_transport": s["by_transport"],
            "bytes_sent": s["bytes_sent"],
            "bytes_received": s["bytes_received"],
            "avg_network_time_ms": s["network_ms"] / n,
            "avg_compute_time_ms": s["compute_ms"] / n,
            "avg_total_time_ms": s["total_ms"] / n,
            "p50_total_time_ms": _percentile(s["recent"], 0.50),
            "p99_total_time_ms": _percentile(s["recent"], 0.99),
        }

    @property
    def stub(self) -> "ComputeServiceStub":
        """A low-level stub with the service's methods, taking and returning the
        message objects of :mod:`splitlearn_comm.protocol`, as a grpcio stub would."""
        return ComputeServiceStub(self)

    def __repr__(self) -> str:
        return f"GRPCComputeClient({self.server_address!r})"


def _rebuild_client(settings: Dict[str, Any]) -> GRPCComputeClient:
    return GRPCComputeClient(**settings)


def _check_not_model_id(metadata: Any) -> None:
    if isinstance(metadata, str):
        raise TypeError("compute()'s second argument is gRPC metadata, not a model id: the "
                        "earlier splitlearn-comm's compute(x, model_id) is "
                        f"compute(x, model_id={metadata!r}) here")


class ComputeServiceStub:
    """``client.stub``: one method per RPC, with per-call ``metadata`` and ``timeout``.

    Calls go through the client's channel (and its TLS and default metadata) but
    not its retry strategy or codec: what you build is what is sent.
    """

    def __init__(self, client: GRPCComputeClient) -> None:
        self._client = client

    def _md(self, metadata: MetadataLike) -> list:
        return self._client.metadata + _normalize_metadata(metadata)

    def _timeout(self, timeout: Optional[float]) -> float:
        return _seconds(self._client.timeout if timeout is None else timeout)

    def Compute(self, request: "protocol.ComputeRequest", metadata: MetadataLike = None,
                timeout: Optional[float] = None) -> "protocol.ComputeResponse":
        meta = dict(request.codec_metadata or {})
        sendable = (request.data, tuple(request.shape), request.dtype, request.codec or "raw", meta)
        try:
            reply = self._client._live().compute(
                [_core.OutTensor(("", sendable, None))], timeout=self._timeout(timeout),
                metadata=self._md(metadata), request_id=request.request_id,
                codecs=self._client._registry.table)
        except _core.CallError as e:
            raise from_call_error(e, target=self._client._target, method=_COMPUTE) from None
        if reply.form != _structure.SINGLE:
            raise CodecError("the server answered with several tensors; the stub reads one "
                             "(use GRPCComputeClient.compute)")
        leaf = reply.leaves[0]
        return protocol.ComputeResponse(
            data=bytes(memoryview(leaf.tensor)), shape=list(leaf.shape), dtype=leaf.dtype,
            codec="raw", codec_metadata={},
            compute_time_ms=reply.compute_time_ms, request_id=reply.request_id)

    def HealthCheck(self, request: Any = None, metadata: MetadataLike = None,
                    timeout: Optional[float] = None) -> "protocol.HealthResponse":
        try:
            r = self._client._live().health(timeout=self._timeout(timeout), metadata=self._md(metadata))
        except _core.CallError as e:
            raise from_call_error(e, target=self._client._target,
                                  method=_HEALTH) from None
        return protocol.HealthResponse(**r)

    def GetServiceInfo(self, request: Any = None, metadata: MetadataLike = None,
                       timeout: Optional[float] = None) -> "protocol.ServiceInfoResponse":
        try:
            r = self._client._live().service_info(timeout=self._timeout(timeout),
                                                  metadata=self._md(metadata))
        except _core.CallError as e:
            raise from_call_error(e, target=self._client._target,
                                  method=_INFO) from None
        return protocol.ServiceInfoResponse(**r)
