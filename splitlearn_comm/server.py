"""The server: GRPCComputeServer hosts a ComputeFunction on the C core."""
from __future__ import annotations

import atexit
import inspect
import logging
import sys
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from . import _core, _structure, _tensor, aio, context
from ._structure import CodecSpec
from .codecs import CodecRegistry
from .core import ComputeFunction, TensorCodec
from .errors import Abort
from .tls import ServerTLS

logger = logging.getLogger("splitlearn_comm.server")

SERVICE_NAME = "splitlearn.comm.ComputeService"

_live: "weakref.WeakSet[GRPCComputeServer]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # No C worker may touch Python once the interpreter is finalizing.
    for server in list(_live):
        try:
            server.stop(grace=0)
        except Exception:  # pragma: no cover - best effort at exit
            logger.exception("stopping %r at exit failed", server)


class _HandlerCallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str, invocation_metadata: Tuple[Tuple[str, Any], ...]) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class _ServicerContext(grpc.ServicerContext):
    """The context given to a handler an interceptor returned instead of ours."""

    def __init__(self, call: context.CallContext) -> None:
        self._call = call
        self._code: Optional[grpc.StatusCode] = None
        self._details = ""
        self._trailing: Tuple = ()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Abort(code, details, self._call._trailing)

    def abort_with_status(self, status: Any) -> None:
        trailing = tuple(getattr(status, "trailing_metadata", None) or ()) or self._call._trailing
        raise Abort(status.code, status.details, trailing)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> Optional[grpc.StatusCode]:
        return self._code

    def details(self) -> str:
        return self._details

    def invocation_metadata(self) -> Tuple:
        return self._call.metadata

    def peer(self) -> str:
        return self._call.peer

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> Dict:
        return {}

    def time_remaining(self) -> Optional[float]:
        return self._call.time_remaining()

    def is_active(self) -> bool:
        return self._call.is_active()

    def cancel(self) -> None:
        raise Abort(grpc.StatusCode.CANCELLED, "cancelled by the handler")

    def add_callback(self, callback: Any) -> bool:
        return False

    def set_trailing_metadata(self, trailing_metadata: Tuple) -> None:
        self._call.set_trailing_metadata(trailing_metadata)

    def send_initial_metadata(self, initial_metadata: Tuple) -> None:
        pass

    def set_compression(self, compression: Any) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass


class GRPCComputeServer:
    """Serve a :class:`ComputeFunction` over gRPC.

    Args:
        compute_fn: the function to host; or a mapping ``{model_id: function}`` to host
            several, each call going to the one its ``model_id`` names (an unknown id
            gets NOT_FOUND listing the known ones).
        host: address to bind ("0.0.0.0" for every IPv4 interface, "127.0.0.1", "::").
        port: port to bind; 0 lets the OS pick one (read it from :attr:`port`).
        max_workers: C worker threads, hence calls served at once.
        codec: the :class:`TensorCodec` for responses, or a mapping from result tensor
            name or path prefix to codec; ``None`` answers each request with the codec
            it came in. Either way a tensor the codec does not take (an int64 result
            of a float16 call, a mask) goes back raw.
        codecs: Python codecs this server decodes (``codec`` is registered too);
            built-in codecs are always known.
        version: reported by HealthCheck and GetServiceInfo.
        options: gRPC channel arguments, ``[(name, value), ...]``, e.g.
            ``("grpc.max_receive_message_length", 100 * 1024 * 1024)``. Message
            sizes are unlimited (up to gRPC's 2 GiB) unless set here.
        interceptors: ``grpc.ServerInterceptor`` objects run, in order, for every
            call (with ``handler_call_details.method`` and ``.invocation_metadata``);
            with none, no Python runs for a call but ``compute()`` itself.
        auth_tokens: accepted values of the ``authorization`` metadata, checked in C
            with a constant-time comparison (UNAUTHENTICATED otherwise). The standard
            ``grpc.health.v1`` check stays open for load balancers.
        tls: a :class:`ServerTLS` to serve over TLS (or mutual TLS).
        handle_signals: make SIGTERM and SIGINT stop the server gracefully (main
            thread only).
        access_log: ``True`` (logger ``splitlearn_comm.access``) or a
            ``logging.Logger``: one JSON line per call, made in C without the GIL and
            written by one background thread.
        metrics_port: serve, on this port (0: one the OS picks, read back from
            :attr:`metrics_port` once started), the live dashboard at ``/`` (see
            :attr:`dashboard_url`), its JSON at ``/api/dashboard`` and Prometheus
            metrics at ``/metrics`` (that one needs prometheus_client); :meth:`metrics`
            works without any of it.
        max_decoded_bytes: how many bytes built-in codec payloads may decode to,
            all tensors of a call together and all calls at once (default 4 GiB): a
            sparse or compressed payload of a few bytes may declare any shape.
        max_tensors: tensors one request may carry (default 4096).
        max_depth: how deeply one request's structure may nest containers (default
            32). Requests over a limit fail with INVALID_ARGUMENT naming it.
        max_message_length: the largest message, in bytes, received or sent (sets
            ``grpc.max_receive_message_length`` and ``grpc.max_send_message_length``
            unless ``options`` sets them); ``None``: unlimited (up to gRPC's 2 GiB).
        max_sessions, max_session_bytes, session_idle_timeout: bounds of the
            server-side sessions (``client.session()``; docs/inference.md): at most
            this many sessions holding at most this many bytes of tensors together,
            each dropped after this many idle seconds; room is made by evicting the
            least recently used session.

    ``start()`` returns at once; ``stop(grace)`` drains; ``wait_for_termination()``
    blocks until stopped (Ctrl-C interrupts it). Usable as a context manager.
    Several servers can run in one process.
    """

    def __init__(self, compute_fn: Union[ComputeFunction, Mapping[str, ComputeFunction]],
                 host: str = "0.0.0.0", port: int = 50051,
                 max_workers: int = 10, codec: Optional[TensorCodec] = None,
                 version: str = "1.0.0", options: Optional[Sequence[Tuple[str, Any]]] = None,
                 interceptors: Optional[Sequence[grpc.ServerInterceptor]] = None,
                 codecs: Optional[Sequence[TensorCodec]] = None,
                 auth_tokens: Optional[Sequence[str]] = None, tls: Optional[ServerTLS] = None,
                 handle_signals: bool = False, grace: float = 5.0,
                 access_log: Union[bool, logging.Logger] = False,
                 metrics_port: Optional[int] = None,
                 max_decoded_bytes: Optional[int] = None,
                 max_tensors: Optional[int] = None, max_depth: Optional[int] = None,
                 max_message_length: Optional[int] = None,
                 max_sessions: int = 256, max_session_bytes: int = 1 << 30,
                 session_idle_timeout: float = 600.0) -> None:
        self._models = _Models(compute_fn)
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, not {max_workers}")
        _structure.check_codec_spec(codec)
        for name, value in (("max_tensors", max_tensors), ("max_depth", max_depth)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        self.max_tensors = max_tensors
        self.max_depth = max_depth
        self.compute_fn = compute_fn
        self.host = host
        self._port = port
        self.max_workers = max_workers
        self.codec = codec
        mapped = list(codec.values()) if isinstance(codec, Mapping) else [codec]
        self._registry = CodecRegistry([c for c in (*mapped, *(codecs or [])) if c is not None])
        self.version = version
        self.options = _with_message_length(options, max_message_length)
        self.interceptors = list(interceptors or [])
        for i in self.interceptors:
            if not callable(getattr(i, "intercept_service", None)):
                raise TypeError(f"interceptors must be grpc.ServerInterceptor objects, got {i!r}")
        self.auth_tokens = list(auth_tokens) if auth_tokens else None
        if tls is not None and not isinstance(tls, ServerTLS):
            raise TypeError("tls must be a splitlearn_comm.ServerTLS")
        self.tls = tls
        self.handle_signals = handle_signals
        self.access_log = access_log
        self.metrics_port = metrics_port
        self.max_decoded_bytes = max_decoded_bytes
        self._access_writer: Any = None
        self._metrics_http: Any = None
        self.grace = grace
        self._previous_handlers: Dict[int, Any] = {}
        self._core: Optional[Any] = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._torn_down = False
        self._loop = aio.ServerLoop(f"splitlearn-async-{id(self):x}")
        from .sessions import SessionStore

        self.sessions = SessionStore(max_sessions, max_session_bytes, session_idle_timeout)

    # -- lifecycle ------------------------------------------------------------

    def _address(self) -> str:
        """host:port, or the socket path of a unix: host (which has no port)."""
        if self.host.startswith(("unix:", "unix-abstract:")):
            return self.host
        return f"{self.host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._core.port if self._core is not None else self._port

    def start(self) -> "GRPCComputeServer":
        """Run ``setup()``, bind and start serving; returns at once."""
        if self.handle_signals and threading.current_thread() is not threading.main_thread():
            raise ValueError("handle_signals=True needs start() on the main thread "
                             "(Python delivers signals there)")
        with self._lock:
            if self._core is not None:
                raise RuntimeError("the server was already started; a stopped server cannot be "
                                   "restarted: create a new GRPCComputeServer")
            try:  # the first call would otherwise pay ~1 s to import torch on a worker
                import torch  # noqa: F401
            except ImportError:  # pragma: no cover - NumPy-only servers
                pass
            self._models.setup(self._run_maybe_async)
            c_codec = None  # a mapping is resolved per result tensor (_reply_leaves)
            if isinstance(self.codec, TensorCodec):
                c_codec = self._registry.c_codec(self.codec)
            server = _core.Server(
                compute=_make_dispatch(self._models, self._registry, self.codec, self.sessions,
                                       self._loop),
                info=_make_info(self._models, self.sessions), host=self.host,
                port=int(self._port), max_workers=int(self.max_workers),
                version=str(self.version), options=self.options, codec=c_codec,
                codecs=self._registry.table, auth_tokens=self.auth_tokens,
                tls=self.tls._args() if self.tls else None,
                intercept=_make_intercept(self.interceptors) if self.interceptors else None,
                max_decoded_bytes=int(self.max_decoded_bytes or 0),
                max_tensors=int(self.max_tensors or 0), max_depth=int(self.max_depth or 0),
                convert=_tensor.from_dlpack())
            try:
                server.start()
            except BaseException as e:
                self._models.teardown(self._run_maybe_async)  # setup() ran: undo it
                self._loop.stop()
                if isinstance(e, OSError):
                    raise OSError(f"could not start the server on {self.host}:{self._port}: {e}") from None
                raise
            self._core = server
            _live.add(self)
            if self.access_log:
                from .monitoring import AccessLogWriter

                self._access_writer = AccessLogWriter(server, self.access_log)
            if self.metrics_port is not None:
                from .monitoring import start_metrics_server

                bind = self.host if self.host not in ("", "0.0.0.0", "::") else "0.0.0.0"
                try:
                    self._metrics_http = start_metrics_server(self, int(self.metrics_port), bind)
                except BaseException as e:
                    self._abort_start()
                    if isinstance(e, OSError):
                        raise OSError(f"could not serve metrics and the dashboard on "
                                      f"{bind}:{self.metrics_port}: {e}") from None
                    raise
                self.metrics_port = self._metrics_http.server_port  # the bound port, also for 0
            if self.handle_signals:
                self._install_signal_handlers()
        logger.info("serving %s on %s (%d workers)%s", self._models.describe(),
                    self._address(), self.max_workers,
                    f", metrics on {self.metrics_url}" if self.metrics_url else "")
        return self

    def _run_maybe_async(self, fn: Any) -> None:
        """Call setup()/teardown(); a coroutine one runs on the server's event loop."""
        out = fn()
        if inspect.isawaitable(out):
            self._loop.run(out)

    def _abort_start(self) -> None:
        """Undo a start() that failed after the core started (called with the lock held)."""
        core, self._core = self._core, None
        _live.discard(self)
        if self._access_writer is not None:
            self._access_writer.close()
            self._access_writer = None
        if core is not None:
            core.stop(0.0)
        self._models.teardown(self._run_maybe_async)
        self._loop.stop()

    @property
    def metrics_url(self) -> Optional[str]:
        """``http://host:port/metrics`` (Prometheus text) while ``metrics_port`` serves,
        with the bound port (also for ``metrics_port=0``); None otherwise."""
        url = self.dashboard_url
        return None if url is None else url + "metrics"

    def _install_signal_handlers(self) -> None:
        import signal

        def on_signal(signum: int, frame: Any) -> None:
            logger.info("signal %d: stopping the server (grace %.1fs)", signum, self.grace)
            # handlers run in the main thread: put the previous ones back now, so a
            # second Ctrl-C behaves as it did before this server
            self._restore_signal_handlers()
            threading.Thread(target=self.stop, args=(self.grace,), daemon=True,
                             name="splitlearn-stop").start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, on_signal)

    def _restore_signal_handlers(self) -> None:
        import signal

        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def metrics(self) -> Dict[str, Any]:
        """The server's own metrics, kept in C: ``requests`` by (method, status name),
        ``requests_by_transport``: the Compute and ComputeBackward calls by how their
        tensors came (``"unary"``: one gRPC message, ``"stream"``: a stream of chunks,
        ``"shared_memory"``: a segment on this host; docs/shm.md), ``in_flight``,
        ``latency_seconds`` histograms by stage (cumulative ``buckets`` of (upper
        bound, count), ``count``, ``sum``) of Compute and ComputeBackward calls
        together, ``latency_seconds_by_method`` the same for each of the two
        (``{"Compute": {stage: histogram}, "ComputeBackward": ...}``),
        ``request_bytes``, ``response_bytes`` and ``access_log_dropped``;
        ``sessions``: the open sessions and the bytes they hold (see
        :meth:`SessionStore.stats
        <splitlearn_comm.sessions.SessionStore.stats>`); ``models``, for a server
        hosting several compute functions: each one's calls by status name and the
        seconds spent in it."""
        if self._core is None:
            m = {"requests": {}, "requests_by_transport": dict.fromkeys(_core.TRANSPORTS, 0),
                 "in_flight": 0, "latency_seconds": {}, "latency_seconds_by_method": {},
                 "request_bytes": 0, "response_bytes": 0, "access_log_dropped": 0}
        else:
            m = self._core.metrics()
        m["sessions"] = self.sessions.stats()
        if self._models.single is None:
            m["models"] = self._models.metrics()
        return m

    @property
    def dashboard_url(self) -> Optional[str]:
        """``http://HOST:PORT/``, the live dashboard, once started with ``metrics_port``
        (None otherwise)."""
        if self._metrics_http is None:
            return None
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.metrics_port}/"

    @property
    def serving(self) -> bool:
        """True while the server accepts calls (False while draining and after)."""
        return bool(self._core is not None and self._core.serving)

    def set_health(self, serving: bool) -> None:
        """Set what the standard health check (grpc.health.v1 Check and Watch, and
        HealthCheck) reports while the server runs: ``False`` makes it NOT_SERVING,
        so that clients balancing over replicas (``round_robin`` with client-side
        health checking) send it no new calls, and Kubernetes' readiness probe fails;
        the calls that still come are served. ``True`` makes it SERVING again.
        Watching clients see the change within about 50 ms. ``stop()`` reports
        NOT_SERVING whatever was set (docs/scaling.md)."""
        if self._core is None:
            raise RuntimeError("the server is not running")
        self._core.set_health(bool(serving))

    @property
    def health(self) -> str:
        """``"SERVING"`` or ``"NOT_SERVING"``: what grpc.health.v1 reports now."""
        return "SERVING" if self._core is not None and self._core.health else "NOT_SERVING"

    def stop(self, grace: Optional[float] = 5.0) -> None:
        """Stop gracefully: health checks answer NOT_SERVING, new calls get
        UNAVAILABLE, calls in flight get ``grace`` seconds to finish and the rest are
        cancelled; then ``teardown()`` runs once."""
        core = self._core
        if core is None:
            return
        core.stop(float(grace or 0.0))
        self._restore_signal_handlers()
        if self._access_writer is not None:
            self._access_writer.close()
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None
        with self._lock:
            if self._torn_down:
                return
            self._torn_down = True
        _live.discard(self)
        self.sessions.clear()
        try:
            self._models.teardown(self._run_maybe_async)
        finally:
            self._loop.stop()
            self._stopped.set()
            logger.info("stopped server on %s", self._address())

    def wait_for_termination(self, timeout: Optional[float] = None) -> bool:
        """Block until the server stops (or ``timeout`` seconds pass); True if stopped.
        Ctrl-C raises KeyboardInterrupt here promptly."""
        if self._core is None:
            return True
        if not self._core.wait(timeout):
            return False
        # stop() returns to its caller after teardown; wait for that too
        return self._stopped.wait(None if timeout is None else max(0.0, timeout))

    def __enter__(self) -> "GRPCComputeServer":
        if self._core is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(grace=1.0)

    def __repr__(self) -> str:
        return f"GRPCComputeServer({self._models.describe()}, {self.host}:{self.port})"


def _with_message_length(options: Optional[Sequence[Tuple[str, Any]]],
                         max_message_length: Optional[int]) -> List[Tuple[str, Any]]:
    """``options`` plus the two gRPC message limits for ``max_message_length`` (the
    earlier splitlearn-comm's argument), unless ``options`` sets them itself."""
    out = list(options or [])
    if max_message_length is None:
        return out
    if isinstance(max_message_length, bool) or not isinstance(max_message_length, int) or \
            max_message_length < 1:
        raise ValueError(f"max_message_length must be a positive number of bytes or None, "
                         f"not {max_message_length!r}")
    names = {name for name, _ in out}
    for name in ("grpc.max_receive_message_length", "grpc.max_send_message_length"):
        if name not in names:
            out.append((name, int(max_message_length)))
    return out


def _check_compute_fn(fn: Any, what: str = "compute_fn") -> None:
    if callable(getattr(fn, "compute", None)):
        return
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(fn, torch.nn.Module):
        raise TypeError(f"{what} is a torch.nn.Module ({type(fn).__name__}), not a "
                        "ComputeFunction: wrap it, GRPCComputeServer(ModelComputeFunction(model)) "
                        "(or TrainableComputeFunction(model, optimizer) to train it over the wire)")
    raise TypeError(f"{what} must be a ComputeFunction (an object with compute()), "
                    f"got {type(fn).__name__}")


def _call(fn: Callable[[], Any]) -> None:
    fn()


class _Models:
    """The compute functions a server hosts: one (``single``: every call goes to it,
    whatever its model_id) or several by model_id, with per-model call counters."""

    def __init__(self, compute_fn: Any) -> None:
        self.single: Optional[Any] = None
        self.by_id: Dict[str, Any] = {}
        if isinstance(compute_fn, Mapping):
            if not compute_fn:
                raise ValueError("compute_fn is an empty mapping: give {model_id: ComputeFunction}")
            for model_id, fn in compute_fn.items():
                if not isinstance(model_id, str) or not model_id:
                    raise TypeError(f"model ids must be non-empty strings, got {model_id!r}")
                _check_compute_fn(fn, f"compute_fn[{model_id!r}]")
            self.by_id = dict(compute_fn)
        else:
            _check_compute_fn(compute_fn)
            self.single = compute_fn
        self._lock = threading.Lock()
        self._seq = {id(fn): callable(getattr(fn, "backward", None))
                     and _takes_backward_seq(fn.backward) for fn in self.functions()}
        self._cache_kw = {id(fn): _takes(fn.compute, "past_key_values", "use_cache")
                          for fn in self.functions()}
        self._counts: Dict[str, Dict[str, Any]] = {
            model_id: {"requests": {}, "compute_seconds": 0.0} for model_id in self.by_id}

    def functions(self) -> List[Any]:
        return [self.single] if self.single is not None else list(self.by_id.values())

    def describe(self) -> str:
        if self.single is not None:
            return type(self.single).__name__
        return "{" + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in self.by_id.items()) + "}"

    def takes_backward_seq(self, fn: Any) -> bool:
        """Whether ``fn.backward()`` accepts ``backward_seq`` (worked out once)."""
        return self._seq.get(id(fn), False)

    def takes_cache(self, fn: Any) -> bool:
        """Whether ``fn.compute()`` accepts ``past_key_values`` and ``use_cache``
        (worked out once: inspecting a signature costs tens of microseconds)."""
        known = self._cache_kw.get(id(fn))
        return _takes(fn.compute, "past_key_values", "use_cache") if known is None else known

    def known(self) -> str:
        return ", ".join(repr(k) for k in sorted(self.by_id))

    def pick(self, model_id: Optional[str]) -> Tuple[Optional[str], Any]:
        """(model_id, function) for a call's model_id; Abort for an unknown one."""
        if self.single is not None:
            return None, self.single
        if not model_id:
            if len(self.by_id) == 1:
                return next(iter(self.by_id.items()))
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"this server hosts several compute functions; set model_id to one of "
                        f"{self.known()}")
        fn = self.by_id.get(model_id)
        if fn is None:
            raise Abort(grpc.StatusCode.NOT_FOUND,
                        f"unknown model_id {model_id!r}; this server hosts {self.known()}")
        return model_id, fn

    def count(self, model_id: Optional[str], method: str, code: str, seconds: float) -> None:
        """One call of ``model_id``: requests are keyed (method, status name), as the
        server's own ``requests`` are (method "Compute" or "ComputeBackward")."""
        if model_id is None:
            return
        key = (method.rsplit("/", 1)[-1], code)
        with self._lock:
            per = self._counts[model_id]
            per["requests"][key] = per["requests"].get(key, 0) + 1
            per["compute_seconds"] += seconds

    def metrics(self) -> Dict[str, Dict[str, Any]]:
        with self._lock:
            return {k: {"requests": dict(v["requests"]), "compute_seconds": v["compute_seconds"]}
                    for k, v in self._counts.items()}

    def setup(self, run: Callable[[Callable[[], Any]], None] = _call) -> None:
        """Each function's setup(), through ``run`` (the server's, which awaits an
        async one on its loop); on a failure, teardown() of those already set up."""
        done = []
        try:
            for fn in self.functions():
                setup = getattr(fn, "setup", None)
                if callable(setup):
                    run(setup)
                done.append(fn)
        except BaseException:
            self._teardown(done, run)
            raise

    def teardown(self, run: Callable[[Callable[[], Any]], None] = _call) -> None:
        self._teardown(self.functions(), run)

    @staticmethod
    def _teardown(functions: List[Any], run: Callable[[Callable[[], Any]], None] = _call) -> None:
        error: Optional[BaseException] = None
        for fn in reversed(functions):
            teardown = getattr(fn, "teardown", None)
            if not callable(teardown):
                continue
            try:
                run(teardown)
            except BaseException as e:  # the others still get theirs
                if error is None:
                    error = e
                else:
                    logger.error("teardown() of %s failed", type(fn).__name__, exc_info=True)
        if error is not None:
            raise error


def _make_info(models: _Models, sessions: Any = None):
    def one(fn: Any) -> Dict[str, str]:
        get_info = getattr(fn, "get_info", None)
        raw = get_info() if callable(get_info) else {"name": type(fn).__name__}
        return {str(k): str(v) for k, v in dict(raw or {}).items()}

    def add_sessions(custom: Dict[str, str]) -> None:
        if sessions is not None:  # once a session was opened (keeps older answers as they were)
            st = sessions.stats()
            if st["opened"]:
                for key in ("active", "bytes", "max_sessions", "max_bytes", "opened",
                            "evicted_bytes", "evicted_count", "evicted_idle"):
                    custom.setdefault(f"sessions.{key}", str(st[key]))

    def info() -> Tuple[str, str, Dict[str, str]]:
        if models.single is not None:
            custom = one(models.single)
            add_sessions(custom)
            device = str(getattr(models.single, "device", custom.get("device", "cpu")))
            return SERVICE_NAME, device, custom
        custom = {"models": ",".join(models.by_id)}
        devices = []
        for model_id, fn in models.by_id.items():
            for k, v in one(fn).items():
                custom[f"{model_id}.{k}"] = v
            devices.append(str(getattr(fn, "device", "cpu")))
        add_sessions(custom)
        return SERVICE_NAME, ",".join(dict.fromkeys(devices)), custom

    return info


def _log_exception(what: str, call: context.CallContext, exc: BaseException) -> None:
    """An exception from user code (compute(), an interceptor): logged once per call
    with its traceback, as grpcio logs it; the client gets INTERNAL."""
    logger.error("Exception calling application: %s raised %s: %s (%s from %s)", what,
                 type(exc).__name__, exc, call.method, call.peer,
                 exc_info=(type(exc), exc, exc.__traceback__))


def _make_intercept(interceptors: Sequence[grpc.ServerInterceptor]):
    """Run grpc.ServerInterceptors for a call (on a C worker thread, with the GIL)."""
    ours = grpc.unary_unary_rpc_method_handler(lambda request, ctx: None)

    def chain(i: int):
        if i == len(interceptors):
            return lambda details: ours
        return lambda details: interceptors[i].intercept_service(chain(i + 1), details)

    run = chain(0)

    def intercept(method: str, peer: str, metadata: Tuple, deadline: Optional[float],
                  state: Any = None) -> None:
        call = context.CallContext(method, peer, metadata, {}, deadline, None, state)
        context._set(call)
        try:
            run_one(call)
        except Abort:
            raise
        except Exception as e:
            _log_exception("an interceptor", call, e)
            raise
        finally:
            context._set(None)

    def run_one(call: context.CallContext) -> None:
        method = call.method
        handler = run(_HandlerCallDetails(method, call.metadata))
        if handler is ours:
            return
        if handler is None:
            raise Abort(grpc.StatusCode.UNIMPLEMENTED, f"method {method} not found")
        fn = handler.unary_unary
        if fn is None:
            raise Abort(grpc.StatusCode.UNIMPLEMENTED, "an interceptor returned a non-unary handler")
        ctx = _ServicerContext(call)
        fn(None, ctx)
        code = ctx.code()
        if code is None or code == grpc.StatusCode.OK:
            raise Abort(grpc.StatusCode.UNIMPLEMENTED,
                        "an interceptor replaced the handler without setting a status; "
                        "use context.abort() or context.set_code()")
        raise Abort(code, ctx.details() or code.name, call._trailing)

    return intercept


def _takes_backward_seq(backward: Any) -> bool:
    """Whether a backward() accepts ``backward_seq`` (TrainableComputeFunction's
    does; one a user wrote before it existed may not)."""
    try:
        params = inspect.signature(backward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "backward_seq" or p.kind is inspect.Parameter.VAR_KEYWORD
               for p in params)


def _backward_args(fields: Dict[str, Any], with_seq: bool) -> Dict[str, Any]:
    args = {"forward_id": fields.get("forward_id"),
            "learning_rate": fields.get("learning_rate"),
            "accumulation_step": fields.get("accumulation_step")}
    if with_seq:
        args["backward_seq"] = fields.get("backward_seq", 1)
    return args


def _takes(fn: Any, *names: str) -> bool:
    """Whether ``fn`` accepts every keyword in ``names`` (or **kwargs). The answer is
    cached per function (a bound method by its function, held weakly):
    inspect.signature costs more than a small round trip's whole dispatch."""
    key = getattr(fn, "__func__", fn)
    try:
        with _takes_lock:
            known = _takes_cache.get(key)
            if known is not None and names in known:
                return known[names]
    except TypeError:  # neither hashable nor weakly referable: not cached
        return _takes_uncached(fn, names)
    answer = _takes_uncached(fn, names)
    with _takes_lock:
        _takes_cache.setdefault(key, {})[names] = answer
    return answer


_takes_lock = threading.Lock()
_takes_cache: "weakref.WeakKeyDictionary[Any, Dict[Tuple[str, ...], bool]]" = \
    weakref.WeakKeyDictionary()


def _takes_uncached(fn: Any, names: Tuple[str, ...]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return True
    return all(n in params for n in names)


def _is_kv_pairs(obj: Any) -> bool:
    return obj is None or (isinstance(obj, (tuple, list)) and all(
        isinstance(p, (tuple, list)) and len(p) == 2 and all(_structure.is_tensor(t) for t in p)
        for p in obj))


def _reply_leaves(out: Any, kv_call: bool, spec: CodecSpec, registry: CodecRegistry
                  ) -> Tuple[List[Any], int, Any]:
    """The OutTensor objects, form and nodes of a result. A codec mapping names
    each tensor's codec here; otherwise the C core chooses (sl_server:
    response_codec: the server's codec, else the request's). The core encodes."""
    if kv_call and isinstance(out, tuple) and len(out) == 2 and _structure.is_tensor(out[0]) \
            and _is_kv_pairs(out[1]):
        # the original's (hidden_states, present_key_values): its wire fields
        items = [("", out[0])]
        for k, v in (out[1] or ()):
            items += [("", k.detach().float() if _tensor.is_torch_tensor(k) else k),
                      ("", v.detach().float() if _tensor.is_torch_tensor(v) else v)]
        form, nodes = _structure.SINGLE, None
    elif _structure.is_tensor(out) or isinstance(out, (int, float, complex)):
        # a bare number is a 0-d tensor, as before structures (old clients read it)
        form, items, nodes = _structure.SINGLE, [("", out)], None
    else:
        form, items, nodes = _structure.flatten(out)
    mapped = spec is not None and isinstance(spec, Mapping)
    if not mapped:  # every codec is the core's choice: the binding exports each
        return items, form, nodes
    leaves = []
    for i, (name, obj) in enumerate(items):
        t = _tensor.prepare_result(obj)
        c = None
        if mapped and not (form == _structure.SINGLE and i > 0):  # KV entries: raw float32
            codec = _structure.codec_for(spec, name)
            if codec is not None and _structure.accepts(codec, _structure.dtype_of(t)):
                c = registry.c_codec(codec)
        leaves.append((name, t, c))
    return leaves, form, nodes


def _general_call(c: Any, call: context.CallContext, fields: Dict[str, Any], compute_fn: Any,
                  models: "_Models", sessions: Any, loop: "aio.ServerLoop") -> Tuple[Any, bool]:
    """A call of ``compute_fn`` that is not the common one (dispatch's first
    branch): a model picked by model_id, ComputeBackward, a training step, a session
    step or a KV cache call. Returns (result, kv_call)."""
    name = type(compute_fn).__name__
    backward = getattr(compute_fn, "backward", None)
    if c.backward and not callable(backward):
        raise Abort(grpc.StatusCode.UNIMPLEMENTED,
                    f"{name} does not support ComputeBackward "
                    "(it has no backward() method; see docs/training.md)")
    # every tensor decoded in C; wrapped (torch.from_dlpack) and the structure
    # rebuilt in one pass
    if c.values is not None:  # made by the binding (convert=): one pass in C
        x, values = c.value, c.values
    elif (convert := _tensor.from_dlpack()) is not None:
        x, values = _core.rebuild(c.form, c.leaves, c.nodes, convert)
    else:  # pragma: no cover - NumPy arrays where torch is absent
        values = _tensor.as_tensors(c.leaves)
        x = _structure.unflatten(c.form, values, [leaf.name for leaf in c.leaves], c.nodes)
    # only a call that may carry a KV cache asks what compute() takes
    takes_cache = (c.n_kv > 0 or c.use_cache is not None) and models.takes_cache(compute_fn)
    kv_call = not c.backward and c.form == _structure.SINGLE and (
        c.n_kv > 0 or (c.use_cache is not None and takes_cache))

    def run() -> Any:
        if c.backward:
            return backward(x, **_backward_args(fields, models.takes_backward_seq(compute_fn)))
        if kv_call:
            if not takes_cache:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the request carries a KV cache (past_key_values) but "
                            f"{name}.compute() takes no past_key_values/use_cache "
                            "keywords")
            pkv = tuple((values[1 + 2 * i], values[2 + 2 * i]) for i in range(c.n_kv))
            return compute_fn.compute(x, past_key_values=pkv or None,
                                      use_cache=bool(c.use_cache))
        if (fields.get("forward_id") is not None
                or fields.get("training_mode") is not None) and \
                getattr(compute_fn, "supports_training", False):
            return compute_fn.compute_training(
                x, forward_id=fields.get("forward_id"),
                training=bool(fields.get("training_mode")))
        return compute_fn.compute(x)

    if sessions is not None and fields.get("session_id") is not None:
        from .sessions import run_step

        # a session's steps run in order: an async step is awaited here
        out = run_step(sessions, fields, call, lambda: aio.wait(run(), loop, call),
                       backward=bool(c.backward))
        if fields.get("session_close"):
            # a close answers an empty tensor
            out = x[:0] if _structure.is_tensor(x) else None
    else:
        out = run()
    return out, kv_call


def _make_dispatch(models: "_Models", registry: CodecRegistry,
                   server_codec: CodecSpec, sessions: Any = None,
                   loop: Optional["aio.ServerLoop"] = None) -> Callable[[Any], Any]:
    """The Python side of a Compute call, run on a C worker thread holding the GIL.
    A compute (or backward) that returns an awaitable is deferred: it runs on the
    server's event loop ``loop`` and the worker returns at once (in a session, whose
    steps run in order, the worker waits for it)."""
    loop = loop if loop is not None else aio.ServerLoop()
    tensor_type = _structure._torch_tensor_type()  # a tensor result is not awaitable: no check

    set_call, perf_counter, isawaitable = context._set, time.perf_counter, inspect.isawaitable
    mapped = isinstance(server_codec, Mapping)  # a codec per result tensor: _reply_leaves

    def encode(out: Any, kv_call: bool, call: context.CallContext) -> Tuple[List[Any], int, Any]:
        try:
            return _reply_leaves(out, kv_call, server_codec, registry)
        except Abort as e:
            if e.sl_code == grpc.StatusCode.INTERNAL.value[0]:
                _log_exception("a codec encoding the result", call, e)
            raise

    def dispatch(c: Any) -> Any:
        call = context.CallContext(c.method, c.peer, c.metadata, c.request_metadata, c.deadline,
                                   c.request_id, c.state)
        set_call(call)
        model_id: Optional[str] = None
        method = c.method
        t0 = 0.0
        try:
            compute_fn = models.single
            kv_call = False
            if (c.fields is None and compute_fn is not None and not c.backward and not c.n_kv
                    and c.use_cache is None and c.values is not None):
                # the common call: one compute function, no training, model, session or
                # KV cache field; its tensors were made by the binding (convert=)
                x = c.value
                t0 = perf_counter()
                out = compute_fn.compute(x)
            else:
                fields = c.fields or {}
                model_id, compute_fn = models.pick(fields.get("model_id"))
                t0 = perf_counter()
                out, kv_call = _general_call(c, call, fields, compute_fn, models, sessions, loop)
            if type(out) is not tensor_type and isawaitable(out):
                # an async def compute(): runs on the server's loop
                if c.state is not None and hasattr(c.state, "defer"):
                    aio.defer(_counted(out, models, model_id, method, call, t0), loop, call,
                              c.state, lambda o: encode(o, kv_call, call), t0)
                    return None
                out = aio.wait(out, loop, call)
            ms = (perf_counter() - t0) * 1e3
            if type(out) is tensor_type and not mapped:
                leaves, form, nodes = [("", out)], _structure.SINGLE, None
            else:
                leaves, form, nodes = encode(out, kv_call, call)
            models.count(model_id, method, "OK", ms / 1e3)
            return leaves, ms, call._trailing, form, nodes
        except Abort as e:
            models.count(model_id, method, _code_name(e.sl_code),
                         perf_counter() - t0 if t0 else 0.0)
            if call._trailing and not getattr(e, "sl_trailing", None):
                e.sl_trailing = call._trailing  # type: ignore[attr-defined]
            raise
        except Exception as e:
            _log_exception("compute()", call, e)
            models.count(model_id, method, "INTERNAL", perf_counter() - t0 if t0 else 0.0)
            if call._trailing:
                e.sl_trailing = call._trailing  # type: ignore[attr-defined]
            raise
        finally:
            set_call(None)

    return dispatch


async def _counted(awaitable: Any, models: "_Models", model_id: Optional[str], method: str,
                   call: context.CallContext, t0: float) -> Any:
    """A deferred (async) compute, logged and counted per model as a blocking one is."""
    try:
        out = await awaitable
    except Abort as e:
        models.count(model_id, method, _code_name(e.sl_code), time.perf_counter() - t0)
        raise
    except Exception as e:
        _log_exception("compute()", call, e)
        models.count(model_id, method, "INTERNAL", time.perf_counter() - t0)
        raise
    models.count(model_id, method, "OK", time.perf_counter() - t0)
    return out


def _code_name(code: int) -> str:
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c.name
    return "UNKNOWN"
