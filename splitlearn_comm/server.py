"""The server: GRPCComputeServer hosts a ComputeFunction on the C core."""
from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Any, Dict, Optional, Sequence, Tuple

import grpc

from . import _core, _tensor, context
from .core import ComputeFunction, TensorCodec, _check_codec
from .errors import Abort

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
        raise Abort(code, details)

    def abort_with_status(self, status: Any) -> None:
        raise Abort(status.code, status.details)

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
        self._trailing = tuple(trailing_metadata)

    def send_initial_metadata(self, initial_metadata: Tuple) -> None:
        pass

    def set_compression(self, compression: Any) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass


class GRPCComputeServer:
    """Serve a :class:`ComputeFunction` over gRPC.

    Args:
        compute_fn: the function to host.
        host: address to bind ("0.0.0.0" for every IPv4 interface, "127.0.0.1", "::").
        port: port to bind; 0 lets the OS pick one (read it from :attr:`port`).
        max_workers: C worker threads, hence calls served at once.
        codec: the :class:`TensorCodec` for responses (``None``: raw).
        version: reported by HealthCheck and GetServiceInfo.
        options: gRPC channel arguments, ``[(name, value), ...]``, e.g.
            ``("grpc.max_receive_message_length", 100 * 1024 * 1024)``. Message
            sizes are unlimited (up to gRPC's 2 GiB) unless set here.
        interceptors: ``grpc.ServerInterceptor`` objects run, in order, before each
            Compute call.

    ``start()`` returns at once; ``stop(grace)`` drains; ``wait_for_termination()``
    blocks until stopped (Ctrl-C interrupts it). Usable as a context manager.
    Several servers can run in one process.
    """

    def __init__(self, compute_fn: ComputeFunction, host: str = "0.0.0.0", port: int = 50051,
                 max_workers: int = 10, codec: Optional[TensorCodec] = None,
                 version: str = "1.0.0", options: Optional[Sequence[Tuple[str, Any]]] = None,
                 interceptors: Optional[Sequence[grpc.ServerInterceptor]] = None) -> None:
        if not callable(getattr(compute_fn, "compute", None)):
            raise TypeError("compute_fn must be a ComputeFunction (an object with compute())")
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, not {max_workers}")
        _check_codec(codec)
        self.compute_fn = compute_fn
        self.host = host
        self._port = port
        self.max_workers = max_workers
        self.codec = codec or TensorCodec()
        self.version = version
        self.options = list(options or [])
        self.interceptors = list(interceptors or [])
        self._core: Optional[Any] = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._torn_down = False

    # -- lifecycle ------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._core.port if self._core is not None else self._port

    def start(self) -> "GRPCComputeServer":
        """Run ``setup()``, bind and start serving; returns at once."""
        with self._lock:
            if self._core is not None:
                raise RuntimeError("the server was already started")
            setup = getattr(self.compute_fn, "setup", None)
            if callable(setup):
                setup()
            server = _core.Server(_make_dispatch(self.compute_fn, self.interceptors),
                                  _make_info(self.compute_fn), self.host, int(self._port),
                                  int(self.max_workers), str(self.version), self.options)
            try:
                server.start()
            except OSError as e:
                raise OSError(f"could not start the server on {self.host}:{self._port}: {e}") from None
            self._core = server
            _live.add(self)
        logger.info("serving %s on %s:%d (%d workers)", type(self.compute_fn).__name__,
                    self.host, self.port, self.max_workers)
        return self

    def stop(self, grace: Optional[float] = 5.0) -> None:
        """Stop accepting calls, give those in flight ``grace`` seconds, cancel the rest,
        then run ``teardown()`` once."""
        core = self._core
        if core is None:
            return
        core.stop(float(grace or 0.0))
        with self._lock:
            if self._torn_down:
                return
            self._torn_down = True
        _live.discard(self)
        try:
            teardown = getattr(self.compute_fn, "teardown", None)
            if callable(teardown):
                teardown()
        finally:
            self._stopped.set()
            logger.info("stopped server on %s:%d", self.host, self.port)

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
        return f"GRPCComputeServer({type(self.compute_fn).__name__}, {self.host}:{self.port})"


def _make_info(compute_fn: ComputeFunction):
    def info() -> Tuple[str, str, Dict[str, str]]:
        get_info = getattr(compute_fn, "get_info", None)
        raw = get_info() if callable(get_info) else {"name": type(compute_fn).__name__}
        custom = {str(k): str(v) for k, v in dict(raw or {}).items()}
        device = str(getattr(compute_fn, "device", custom.get("device", "cpu")))
        return SERVICE_NAME, device, custom

    return info


def _make_dispatch(compute_fn: ComputeFunction, interceptors: Sequence[grpc.ServerInterceptor]):
    """The Python side of a Compute call, run on a C worker thread holding the GIL."""
    compute = compute_fn.compute
    ours = grpc.unary_unary_rpc_method_handler(lambda request, ctx: None)

    def run_interceptors(call: context.CallContext) -> None:
        details = _HandlerCallDetails(call.method, call.metadata)

        def chain(i: int):
            if i == len(interceptors):
                return lambda d: ours
            return lambda d: interceptors[i].intercept_service(chain(i + 1), d)

        handler = chain(0)(details)
        if handler is ours:
            return
        if handler is None:
            raise Abort(grpc.StatusCode.UNIMPLEMENTED, f"method {call.method} not found")
        ctx = _ServicerContext(call)
        fn = handler.unary_unary
        if fn is None:
            raise Abort(grpc.StatusCode.UNIMPLEMENTED, "interceptor returned a non-unary handler")
        fn(None, ctx)
        code = ctx.code() or grpc.StatusCode.UNKNOWN
        raise Abort(code if code != grpc.StatusCode.OK else grpc.StatusCode.UNKNOWN,
                    ctx.details() or "the call was handled by an interceptor")

    def dispatch(holder: Any, method: str, peer: str, metadata: Tuple, request_metadata: Dict,
                 deadline: Optional[float], request_id: Optional[int]) -> Tuple[Any, float]:
        call = context.CallContext(method, peer, metadata, request_metadata, deadline, request_id)
        context._set(call)
        try:
            if interceptors:
                run_interceptors(call)
            x = _tensor.as_tensor(holder)
            t0 = time.perf_counter()
            out = compute(x)
            ms = (time.perf_counter() - t0) * 1e3
            return _tensor.prepare_result(out), ms
        finally:
            context._set(None)

    return dispatch
