"""The ``splitlearn-comm`` command line: serve, health, info, bench, dashboard.

Run ``splitlearn-comm --help`` (or ``python -m splitlearn_comm --help``). Exit codes:

* 0: success;
* 1: the server could not be reached or answered with an error, an address is not
  ``HOST:PORT``, the server could not start, or (``bench``) some calls failed;
* 2: bad usage (argparse);
* 3: ``serve``'s MODULE does not import, or its OBJECT is missing or of the wrong kind;
* 130: interrupted (Ctrl-C) outside ``serve``.

What the command itself produces goes to stdout (errors to stderr); diagnostics go
through :mod:`logging` (``-v`` shows them).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("splitlearn_comm.cli")

PROG = "splitlearn-comm"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LOAD = 3
EXIT_INTERRUPTED = 130

#: The codecs ``--codec`` accepts, by wire name.
CODEC_NAMES = ("raw", "float16", "bfloat16", "int8", "zstd", "zlib", "sparse_coo")

#: gRPC target schemes passed through as they are (no HOST:PORT check).
_URI_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.%a-zA-Z]+\]|[^\s:\[\]/]+):(?P<port>\d+)$")

#: Largest pool of distinct random tensors ``bench`` keeps (bytes, all together).
_POOL_BYTES = 256 * 1024 * 1024
_POOL_SIZE = 8


class CLIError(Exception):
    """A failure the command reports in one line and turns into an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details  # printed before the message (e.g. a user traceback)


# -- argument types -------------------------------------------------------------------


def _int_in(lo: int, hi: Optional[int] = None, what: str = "a number") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {value}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number of seconds > 0, got 0")
    return value


def parse_shape(text: str) -> Tuple[int, ...]:
    """``"1,768"`` (or ``"1x768"``, ``"(1, 768)"``) as a tuple of positive ints."""
    cleaned = text.strip().strip("()[]").replace("x", ",").replace(" ", "")
    parts = [p for p in cleaned.split(",")]
    if cleaned.endswith(","):
        parts = parts[:-1]
    try:
        shape = tuple(int(p, 10) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a shape like 1,768 (comma-separated sizes), got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"every size in a shape must be >= 1, got {text!r}")
    return shape


def check_address(address: str) -> str:
    """Return ``address`` if it is ``HOST:PORT`` (port 1-65535), ``[IPv6]:PORT`` or a
    gRPC URI (``unix:``, ``dns:``, ``ipv4:``, ...); raise :class:`CLIError` (exit 1)."""
    if address.startswith(_URI_SCHEMES) and len(address) > address.index(":") + 1:
        return address
    m = _HOST_PORT.match(address)
    if m is None:
        from .client import bad_address_message

        raise CLIError(bad_address_message(address))
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise CLIError(f"bad address {address!r}: port {port} is not in 1-65535")
    return address


def make_codec(name: Optional[str]) -> Any:
    """The built-in codec object for a ``--codec`` name (None for None)."""
    if name is None:
        return None
    from . import codecs
    from .core import TensorCodec

    factories: Dict[str, Callable[[], Any]] = {
        "raw": TensorCodec,
        "float16": codecs.Float16Codec,
        "bfloat16": codecs.BFloat16Codec,
        "int8": codecs.Int8Codec,
        "zstd": lambda: codecs.CompressedTensorCodec(algorithm="zstd"),
        "zlib": lambda: codecs.CompressedTensorCodec(algorithm="zlib"),
        "sparse_coo": codecs.SparseCOOCodec,
    }
    return factories[name]()


# -- loading what `serve` hosts -------------------------------------------------------


def _is_path(module: str) -> bool:
    return module.endswith(".py") or os.sep in module or (os.altsep or "\0") in module


def _user_traceback(exc: BaseException) -> str:
    """The traceback of an exception user code raised, without our and importlib's frames."""
    tb = exc.__traceback__
    ours = (os.path.abspath(__file__), os.path.dirname(importlib.__file__))
    while tb is not None and tb.tb_next is not None:
        name = tb.tb_frame.f_code.co_filename
        if not (name.startswith("<frozen importlib") or os.path.abspath(name) == ours[0]
                or os.path.dirname(os.path.abspath(name)) == ours[1]):
            break
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def import_target(module: str) -> Any:
    """Import MODULE: a dotted module name or a path to a ``.py`` file."""
    if _is_path(module):
        path = os.path.abspath(module)
        if not os.path.isfile(path):
            raise CLIError(f"cannot import {module!r}: no such file", EXIT_LOAD)
        name = os.path.splitext(os.path.basename(path))[0] or "module"
        if not name.isidentifier():
            name = re.sub(r"\W", "_", name)
        name = f"{name}" if name not in sys.modules else f"_splitlearn_cli_{name}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CLIError(f"cannot import {module!r}: not a Python source file", EXIT_LOAD)
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)  # so that it can import its neighbours
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException as e:
            sys.modules.pop(name, None)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise CLIError(f"importing {module!r} failed: {type(e).__name__}: {e}", EXIT_LOAD,
                           details=_user_traceback(e)) from None
        return mod
    if not all(part.isidentifier() for part in module.split(".")):
        raise CLIError(f"cannot import {module!r}: not a dotted module name or a .py file",
                       EXIT_LOAD)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` would
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        parts = module.split(".")
        ours = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if e.name in ours:
            raise CLIError(f"cannot import module {module!r}: no module named {e.name!r} "
                           f"(searched sys.path from {cwd})", EXIT_LOAD) from None
        raise CLIError(f"importing {module!r} failed: {type(e).__name__}: {e}", EXIT_LOAD,
                       details=_user_traceback(e)) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise CLIError(f"importing {module!r} failed: {type(e).__name__}: {e}", EXIT_LOAD,
                       details=_user_traceback(e)) from None


def _describe(obj: Any) -> str:
    if inspect.isclass(obj):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if inspect.ismodule(obj):
        return f"the module {obj.__name__}"
    if inspect.isroutine(obj):
        return f"the function {getattr(obj, '__qualname__', obj)!r}"
    text = repr(obj)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} (a {type(obj).__module__}.{type(obj).__qualname__})"


def _torch_module_type() -> Optional[type]:
    torch = sys.modules.get("torch")  # a module built on torch has imported it already
    nn = getattr(torch, "nn", None)
    return getattr(nn, "Module", None)


def _as_compute_function(obj: Any) -> Optional[Any]:
    """``obj`` as something to host, or None when it is not an instance of a hostable kind."""
    from .core import ComputeFunction, ModelComputeFunction

    if isinstance(obj, ComputeFunction):
        return obj
    module_type = _torch_module_type()
    if module_type is not None and isinstance(obj, module_type):
        return ModelComputeFunction(obj)
    if (not inspect.isclass(obj) and not inspect.ismodule(obj) and not inspect.isroutine(obj)
            and callable(getattr(obj, "compute", None))):
        return obj  # duck-typed, as GRPCComputeServer accepts it
    return None


_KINDS = ("a ComputeFunction instance, a ComputeFunction subclass, a torch.nn.Module "
          "instance, or a zero-argument factory returning one of those")


def resolve_target(target: str) -> Tuple[Any, str]:
    """Load ``MODULE:OBJECT`` and return (the ComputeFunction to host, its display name)."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"expected MODULE:OBJECT, got {target!r}", EXIT_USAGE)
    module = import_target(module_name)
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = f"module {module_name!r}" if i == 0 else \
                repr(f"{module_name}:{'.'.join(attr.split('.')[:i])}")
            names = sorted(n for n, v in vars(obj).items()
                           if not n.startswith("_") and not inspect.ismodule(v)) \
                if hasattr(obj, "__dict__") else []
            hint = f"; it has: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}" \
                if names else ""
            raise CLIError(f"{where} has no attribute {part!r}{hint}", EXIT_LOAD) from None
    from .core import ComputeFunction

    fn = _as_compute_function(obj)
    if fn is None and inspect.isclass(obj):
        module_type = _torch_module_type()
        hostable = issubclass(obj, ComputeFunction) or (
            module_type is not None and issubclass(obj, module_type))
        if not hostable:
            raise CLIError(f"{target!r} is {_describe(obj)}, which is not {_KINDS}", EXIT_LOAD)
        if inspect.isabstract(obj):
            missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
            raise CLIError(f"{target!r} is the abstract class {obj.__qualname__} "
                           f"(it does not implement {missing})", EXIT_LOAD)
        made = _call_factory(target, obj, "instantiating")
        fn = _as_compute_function(made)
        if fn is None:  # a __new__ that returned something else
            raise CLIError(f"instantiating {target!r} gave {_describe(made)}", EXIT_LOAD)
    elif fn is None and callable(obj) and not inspect.ismodule(obj):
        made = _call_factory(target, obj, "calling")
        fn = _as_compute_function(made)
        if fn is None:
            raise CLIError(f"{target!r} is a factory, but it returned {_describe(made)}, which is "
                           "not a ComputeFunction or a torch.nn.Module instance", EXIT_LOAD)
    elif fn is None:
        raise CLIError(f"{target!r} is {_describe(obj)}, which is not {_KINDS}", EXIT_LOAD)
    name = getattr(fn, "model_name", None) or type(fn).__name__
    return fn, str(name)


def _call_factory(target: str, factory: Any, verb: str) -> Any:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        required = [p.name for p in sig.parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                           p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if required:
            raise CLIError(f"{target!r} is {_describe(factory)}, which needs arguments "
                           f"({', '.join(required)}); serve calls it with none: "
                           "give it defaults, or point at a zero-argument factory", EXIT_LOAD)
    try:
        return factory()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise CLIError(f"{verb} {target!r} failed: {type(e).__name__}: {e}", EXIT_LOAD,
                       details=_user_traceback(e)) from None


# -- serve ------------------------------------------------------------------------------


def _format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import GRPCComputeServer

    kwargs: Dict[str, Any] = {}
    if args.dashboard and args.metrics_port is None:
        args.metrics_port = 0  # a free port: the dashboard lives on the metrics port
    if args.metrics_port is not None:
        if "metrics_port" not in inspect.signature(GRPCComputeServer).parameters:
            raise CLIError("--metrics-port: metrics are not available in this build "
                           "(GRPCComputeServer has no metrics_port parameter)")
        kwargs["metrics_port"] = args.metrics_port
    fn, name = resolve_target(args.target)
    try:
        import torch  # noqa: F401  (compute() gets torch tensors: import it now, not on
    except ImportError:  # the first call, which would otherwise pay for it)
        pass
    server = GRPCComputeServer(fn, host=args.host, port=args.port, max_workers=args.workers,
                               codec=make_codec(args.codec), version=args.version,
                               grace=args.grace, **kwargs)

    stop_requested = threading.Event()
    stop_now = threading.Event()

    def drain_then_stop() -> None:
        # NOT_SERVING first: balancing clients move away while the calls that still
        # come are served; then the graceful stop
        if args.drain_delay > 0:
            try:
                server.set_health(False)
            except RuntimeError:  # not started yet, or already stopping
                pass
            stop_now.wait(args.drain_delay)
        server.stop(0 if stop_now.is_set() else args.grace)

    def on_signal(signum: int, frame: Any) -> None:
        if stop_requested.is_set():
            logger.warning("second signal %d: stopping now", signum)
            stop_now.set()
            threading.Thread(target=server.stop, args=(0,), daemon=True,
                             name="splitlearn-cli-stop-now").start()
            return
        stop_requested.set()
        print(f"stopping (drain {args.drain_delay:g} s, grace {args.grace:g} s)",
              file=sys.stderr, flush=True)
        threading.Thread(target=drain_then_stop, daemon=True, name="splitlearn-cli-stop").start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except OSError as e:
            raise CLIError(str(e)) from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise CLIError(f"starting the server failed: {type(e).__name__}: {e}",
                           details=_user_traceback(e)) from None
        metrics = getattr(server, "metrics_url", None)
        print(f"serving {name} on {_format_host_port(args.host, server.port)}"
              + (f", metrics on {metrics}" if metrics else ""), flush=True)
        url = getattr(server, "dashboard_url", None)
        if url:
            print(f"dashboard on {url} (Prometheus metrics on {url}metrics)", flush=True)
        if stop_requested.is_set():  # a signal came while starting
            drain_then_stop()
        while not server.wait_for_termination(timeout=0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop(0)  # no-op once stopped
    print("stopped", file=sys.stderr, flush=True)
    return EXIT_OK


# -- client helpers -----------------------------------------------------------------------


def _client(address: str, timeout: float, codec: Any = None) -> Any:
    from .client import GRPCComputeClient

    return GRPCComputeClient(check_address(address), timeout=timeout, retry_strategy=None,
                             codec=codec)


def _rpc_failure(address: str, what: str, e: BaseException) -> CLIError:
    code = e.code() if callable(getattr(e, "code", None)) else None
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    name = getattr(code, "name", type(e).__name__)
    if name == "UNAVAILABLE":
        lead = f"cannot reach {address}"
    elif name == "DEADLINE_EXCEEDED":
        lead = f"{address} did not answer {what} in time"
    else:
        lead = f"{what} on {address} failed"
    return CLIError(f"{lead}: {name}: {details}")


def _format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s"


# -- health -------------------------------------------------------------------------------


def cmd_health(args: argparse.Namespace) -> int:
    import grpc

    with _client(args.address, args.timeout) as client:
        try:
            reply = client.stub.HealthCheck(timeout=args.timeout)
        except grpc.RpcError as e:
            raise _rpc_failure(args.address, "HealthCheck", e) from None
    if reply.status != "ok":
        message = f": {reply.message}" if reply.message else ""
        raise CLIError(f"{args.address} is {reply.status or 'unhealthy'}{message}")
    print(f"ok version={reply.version} uptime={_format_duration(reply.uptime_seconds)}")
    return EXIT_OK


# -- info ---------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    import grpc

    with _client(args.address, args.timeout) as client:
        try:
            info = client.get_service_info(timeout=args.timeout)
        except grpc.RpcError as e:
            raise _rpc_failure(args.address, "GetServiceInfo", e) from None
    info = dict(info)
    info["custom_info"] = dict(info.get("custom_info") or {})
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return EXIT_OK
    rows = [
        ("address", args.address),
        ("service", info.get("service_name", "")),
        ("version", info.get("version", "")),
        ("device", info.get("device", "")),
        ("uptime", _format_duration(info.get("uptime_seconds"))),
        ("requests", str(info.get("total_requests", 0))),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    custom = info["custom_info"]
    if custom:
        print("custom_info:")
        w = max(len(k) for k in custom)
        for key in sorted(custom):
            print(f"  {key:<{w}}  {custom[key]}")
    else:
        print("custom_info: (none)")
    return EXIT_OK


# -- bench --------------------------------------------------------------------------------


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (as numpy's default) of sorted values."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


_NUMPY_DTYPES = ("float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64",
                 "bool")
DTYPES = _NUMPY_DTYPES + ("bfloat16",)


def _random_tensors(shape: Tuple[int, ...], dtype: str, count: int) -> List[Any]:
    """Up to ``count`` distinct random tensors (fewer when they would be large)."""
    import numpy as np

    elements = math.prod(shape)
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    count = max(1, min(count, _POOL_SIZE, _POOL_BYTES // max(1, elements * itemsize)))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        if dtype in ("float32", "float64", "float16", "bfloat16"):
            a = rng.standard_normal(shape, dtype=np.float32)
            if dtype == "bfloat16":
                import torch

                out.append(torch.from_numpy(a).to(torch.bfloat16))
                continue
            a = a.astype(dtype)
        elif dtype == "bool":
            a = rng.integers(0, 2, shape, dtype=np.uint8).astype(bool)
        else:
            info = np.iinfo(dtype)
            a = rng.integers(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype,
                             endpoint=True)
        out.append(a)
    return out


def _nbytes(t: Any) -> int:
    n = getattr(t, "nbytes", None)
    if isinstance(n, int):
        return n
    return int(t.numel() * t.element_size())  # torch


class _Progress:
    """A one-line progress bar on stderr, redrawn at most ``hz`` times a second."""

    def __init__(self, total: int, enabled: bool, stream: Any = None, hz: float = 10.0) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interval = 1.0 / hz
        self._last = 0.0
        self._start = time.perf_counter()
        self._width = 0

    def update(self, done: int, errors: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        frac = done / self.total if self.total else 1.0
        bar_width = 30
        filled = int(bar_width * frac)
        elapsed = max(now - self._start, 1e-9)
        line = (f"[{'#' * filled}{'.' * (bar_width - filled)}] {done}/{self.total} "
                f"{frac * 100:3.0f}%  {done / elapsed:.0f} calls/s  errors {errors}")
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()


def run_bench(client: Any, tensors: List[Any], n: int, concurrency: int, timeout: float,
              progress: _Progress, stop: Optional[threading.Event] = None) -> Dict[str, Any]:
    """Send ``n`` tensors from ``concurrency`` threads sharing ``client``; the raw results."""
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "errors": 0, "sent": 0, "received": 0}
    latencies: List[float] = []
    errors: Dict[str, int] = {}
    examples: Dict[str, str] = {}
    stop = stop or threading.Event()

    def worker(index: int) -> None:
        while not stop.is_set():
            with lock:
                i = state["next"]
                if i >= n:
                    return
                state["next"] = i + 1
            x = tensors[(i + index) % len(tensors)]
            t0 = time.perf_counter()
            try:
                y = client.compute(x, timeout=timeout)
            except Exception as e:  # counted, reported in the summary
                ms = (time.perf_counter() - t0) * 1e3
                code = e.code() if callable(getattr(e, "code", None)) else None
                key = getattr(code, "name", None) or type(e).__name__
                detail = e.details() if callable(getattr(e, "details", None)) else str(e)
                with lock:
                    state["done"] += 1
                    state["errors"] += 1
                    errors[key] = errors.get(key, 0) + 1
                    examples.setdefault(key, str(detail))
                logger.debug("call %d failed after %.1f ms: %s", i, ms, e)
                continue
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                state["done"] += 1
                latencies.append(ms)
                state["sent"] += _nbytes(x)
                state["received"] += _nbytes(y)

    finished = threading.Event()
    running = [concurrency]

    def run(index: int) -> None:
        try:
            worker(index)
        finally:
            with lock:
                running[0] -= 1
                if running[0] == 0:
                    finished.set()

    threads = [threading.Thread(target=run, args=(k,), daemon=True, name=f"bench-{k}")
               for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    try:
        while not finished.wait(progress.interval if progress.enabled else 0.25):
            with lock:
                done, errs = state["done"], state["errors"]
            progress.update(done, errs)
    except KeyboardInterrupt:
        stop.set()  # no new calls; the ones in flight end by their deadline
        finished.wait(min(timeout, 5.0))
        raise
    finally:
        elapsed = time.perf_counter() - start
        with lock:
            progress.update(state["done"], state["errors"], force=True)
        progress.close()
    return {"elapsed": elapsed, "latencies": latencies, "errors": errors, "examples": examples,
            "sent": state["sent"], "received": state["received"], "done": state["done"]}


def summarize(raw: Dict[str, Any], concurrency: int) -> Dict[str, Any]:
    """The bench summary (what ``--json`` prints)."""
    lat = sorted(raw["latencies"])
    elapsed = max(raw["elapsed"], 1e-9)

    def r(x: float, nd: int = 3) -> Optional[float]:
        return None if math.isnan(x) else round(x, nd)

    return {
        "count": raw["done"],
        "ok": len(lat),
        "failed": raw["done"] - len(lat),
        "errors": dict(sorted(raw["errors"].items())),
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 4),
        "latency_ms": {
            "p50": r(_percentile(lat, 50)),
            "p90": r(_percentile(lat, 90)),
            "p99": r(_percentile(lat, 99)),
            "max": r(lat[-1]) if lat else None,
            "mean": r(sum(lat) / len(lat)) if lat else None,
        },
        "calls_per_s": round(len(lat) / elapsed, 2),
        "mb_per_s_sent": round(raw["sent"] / 1e6 / elapsed, 3),
        "mb_per_s_received": round(raw["received"] / 1e6 / elapsed, 3),
        "bytes_sent": raw["sent"],
        "bytes_received": raw["received"],
    }


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def cmd_bench(args: argparse.Namespace) -> int:
    import grpc

    if args.dtype == "bfloat16":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise CLIError("--dtype bfloat16 needs PyTorch, which is not installed") from None
    tensors = _random_tensors(args.shape, args.dtype, args.n)
    nbytes = _nbytes(tensors[0])
    codec = make_codec(args.codec)
    with _client(args.address, args.timeout, codec=codec) as client:
        try:
            client.stub.HealthCheck(timeout=min(args.timeout, 10.0))
        except grpc.RpcError as e:
            raise _rpc_failure(args.address, "HealthCheck", e) from None
        for i in range(args.warmup):
            try:
                client.compute(tensors[i % len(tensors)], timeout=args.timeout)
            except grpc.RpcError as e:
                raise _rpc_failure(args.address, f"warm-up call {i + 1}", e) from None
            except (TypeError, ValueError) as e:
                raise CLIError(f"cannot send a {args.dtype} tensor of shape {args.shape}: {e}") \
                    from None
        progress = _Progress(args.n, enabled=not args.no_progress and sys.stderr.isatty())
        raw = run_bench(client, tensors, args.n, args.concurrency, args.timeout, progress)
    summary = summarize(raw, args.concurrency)
    summary.update({"address": args.address, "shape": list(args.shape), "dtype": args.dtype,
                    "codec": args.codec or "raw", "tensor_bytes": nbytes})
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        lat = summary["latency_ms"]
        errors = ", ".join(f"{k}: {v}" for k, v in summary["errors"].items()) or "none"
        rows = [
            ("address", args.address),
            ("tensor", f"{args.dtype} {tuple(args.shape)}, {nbytes} bytes, "
                       f"codec {summary['codec']}"),
            ("calls", f"{summary['count']} ({summary['ok']} ok, {summary['failed']} failed) "
                      f"from {args.concurrency} threads in {summary['elapsed_s']:.3f} s"),
            ("errors", errors),
            ("latency ms", f"p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  "
                           f"p99 {_ms(lat['p99'])}  max {_ms(lat['max'])}"),
            ("throughput", f"{summary['calls_per_s']:.1f} calls/s, "
                           f"{summary['mb_per_s_sent']:.3f} MB/s sent, "
                           f"{summary['mb_per_s_received']:.3f} MB/s received"),
        ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
    for key, detail in sorted(raw["examples"].items()):
        print(f"{PROG} bench: {key}: {detail}", file=sys.stderr)
    return EXIT_OK if summary["failed"] == 0 else EXIT_FAILURE


# -- dashboard ----------------------------------------------------------------------------


def cmd_dashboard(args: argparse.Namespace) -> int:
    from . import dashboard

    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise CLIError("the dashboard reads the servers' Prometheus metrics and needs "
                       "prometheus_client: pip install prometheus_client") from None
    urls = []
    for address in args.addresses:
        try:
            urls.append(dashboard.metrics_url(address))
        except ValueError as e:
            raise CLIError(str(e)) from None
    try:
        http = dashboard.remote_dashboard(urls, host=args.host, port=args.port,
                                          interval=args.interval, timeout=args.timeout)
    except OSError as e:
        raise CLIError(f"could not serve the dashboard on "
                       f"{_format_host_port(args.host, args.port)}: {e}") from None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        host = "127.0.0.1" if args.host in ("", "0.0.0.0") else args.host
        print(f"dashboard on http://{_format_host_port(host, http.server_port)}/ for "
              f"{len(urls)} server{'s' if len(urls) != 1 else ''}: {', '.join(urls)}",
              flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        http.close()
    print("stopped", file=sys.stderr, flush=True)
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve, probe and benchmark splitlearn-comm compute servers.",
        epilog="Exit codes: 0 ok; 1 server unreachable or failing, bad address; 2 bad usage; "
               "3 serve's MODULE:OBJECT could not be loaded. Run '%(prog)s COMMAND --help' "
               "for a command's options.")
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log diagnostics to stderr (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="host a ComputeFunction or torch.nn.Module",
                       description="Import MODULE and host OBJECT until SIGINT or SIGTERM. "
                                   "OBJECT is a ComputeFunction instance or subclass, a "
                                   "torch.nn.Module instance, or a zero-argument factory "
                                   "returning one of those.")
    p.add_argument("target", metavar="MODULE:OBJECT",
                   help="e.g. mypkg.models:Head or ./server.py:make_head")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_int_in(0, 65535, "a port"), default=50051,
                   help="port to bind; 0 picks a free one (default %(default)s)")
    p.add_argument("--workers", type=_int_in(1, None, "a worker count"), default=10,
                   help="worker threads, hence calls served at once (default %(default)s)")
    p.add_argument("--codec", choices=CODEC_NAMES, default=None, metavar="CODEC",
                   help=f"codec for responses: {', '.join(CODEC_NAMES)} (default: the codec "
                        "each request came in)")
    p.add_argument("--metrics-port", type=_int_in(0, 65535, "a port"), default=None,
                   metavar="N", help="serve the live dashboard (/) and Prometheus metrics "
                                     "(/metrics) on this port; 0 picks a free one")
    p.add_argument("--dashboard", action="store_true",
                   help="serve the live dashboard (on --metrics-port, or a free port when "
                        "that is not given) and print its address")
    p.add_argument("--grace", type=_non_negative_float, default=5.0, metavar="SECONDS",
                   help="seconds calls in flight get to finish on shutdown (default %(default)s)")
    p.add_argument("--drain-delay", type=_non_negative_float, default=0.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, report NOT_SERVING and keep serving this long "
                        "before the graceful stop, so that balancing clients and Kubernetes "
                        "move away first (default %(default)s)")
    p.add_argument("--version", dest="version", default="1.0.0", metavar="V",
                   help="version reported by HealthCheck and GetServiceInfo "
                        "(default %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("health", help="check that a server is healthy",
                       description="Call HealthCheck; exit 0 and print 'ok' when healthy, "
                                   "exit 1 otherwise.")
    p.add_argument("address", metavar="ADDRESS", help="HOST:PORT of the server")
    p.add_argument("--timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                   help="deadline of the call (default %(default)s)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("info", help="show a server's GetServiceInfo",
                       description="Call GetServiceInfo and print it (custom_info included).")
    p.add_argument("address", metavar="ADDRESS", help="HOST:PORT of the server")
    p.add_argument("--timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                   help="deadline of the call (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="measure latency and throughput",
                       description="Send N random tensors from CONCURRENCY threads sharing one "
                                   "client and summarize latency and throughput.")
    p.add_argument("address", metavar="ADDRESS", help="HOST:PORT of the server")
    p.add_argument("--shape", type=parse_shape, required=True,
                   help="tensor shape, comma-separated, e.g. 1,768")
    p.add_argument("--dtype", choices=DTYPES, default="float32", metavar="DTYPE",
                   help=f"tensor dtype: {', '.join(DTYPES)} (default %(default)s)")
    p.add_argument("-n", "--count", dest="n", type=_int_in(1, None, "a call count"),
                   default=1000, metavar="N", help="calls to time (default %(default)s)")
    p.add_argument("--concurrency", type=_int_in(1, 4096, "a thread count"), default=8,
                   help="threads sending at once (default %(default)s)")
    p.add_argument("--codec", choices=CODEC_NAMES, default=None, metavar="CODEC",
                   help=f"codec for requests: {', '.join(CODEC_NAMES)} (default raw)")
    p.add_argument("--warmup", type=_int_in(0, None, "a call count"), default=10, metavar="N",
                   help="untimed calls first (default %(default)s)")
    p.add_argument("--timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="deadline of each call (default %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown only when stderr is a terminal)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("dashboard", help="a live dashboard of several servers side by side",
                       description="Poll the Prometheus metrics endpoints of one or more "
                                   "servers (their --metrics-port) and serve a live dashboard "
                                   "of them, side by side, until SIGINT or SIGTERM.")
    p.add_argument("addresses", metavar="ADDRESS", nargs="+",
                   help="a server's metrics endpoint: HOST:PORT (its metrics port) or "
                        "http://HOST:PORT/metrics")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the dashboard listens on (default %(default)s)")
    p.add_argument("--port", type=_int_in(0, 65535, "a port"), default=8050,
                   help="port the dashboard listens on; 0 picks a free one "
                        "(default %(default)s)")
    p.add_argument("--interval", type=_positive_float, default=1.0, metavar="SECONDS",
                   help="seconds between two polls of each server (default %(default)s)")
    p.add_argument("--timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                   help="deadline of one poll (default %(default)s)")
    p.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except CLIError as e:
        if e.code == EXIT_USAGE:
            parser.exit(EXIT_USAGE, f"{PROG} {args.command}: error: {e}\n")
        if e.details:
            sys.stderr.write(e.details)
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (e.g. piped into `head`): not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
