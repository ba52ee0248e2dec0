"""Names of the earlier pure-Python splitlearn-comm that this version does not have:
an error that says what to use instead (docs/migrating.md), internal."""
from __future__ import annotations

import dis
import sys
from typing import Dict, NoReturn

_SEE = " (docs/migrating.md)"
#: Top-level names of the earlier package, and what replaced them.
TOP_LEVEL: Dict[str, str] = {
    "AsyncComputeServicer": ("AsyncComputeServicer is gone: there is no grpcio servicer; "
                             "AsyncGRPCComputeServer (or GRPCComputeServer, which runs async "
                             "compute functions on its event loop) serves them"),
    "ComputeServicer": ("ComputeServicer is gone: there is no grpcio servicer, GRPCComputeServer "
                        "serves on the gRPC C core (grpc.ServerInterceptor objects go to its "
                        "interceptors= argument)"),
    "serve": ("serve(compute_fn, port) is GRPCComputeServer(compute_fn, port=port, "
              "handle_signals=True).start().wait_for_termination() here (or the command line: "
              "splitlearn-comm serve module:factory --port PORT)"),
    "ClientUI": ("ClientUI (the Gradio UI) is not in this version: the server serves a live "
                 "dashboard with GRPCComputeServer(metrics_port=...), or see several servers "
                 "with the command splitlearn-comm dashboard (docs/monitoring.md)"),
    "ServerMonitoringUI": ("ServerMonitoringUI (the Gradio UI) is not in this version: "
                           "GRPCComputeServer(metrics_port=...) serves a live dashboard at / "
                           "and Prometheus metrics at /metrics (docs/monitoring.md)"),
}

#: Names of the earlier splitlearn_comm.core.
CORE: Dict[str, str] = {
    "KVCacheCodec": ("KVCacheCodec is gone: client.compute_with_cache() sends the cache in the "
                     "original's fields (raw float32), and compute() sends one as a structure "
                     "of tensors, each with its codec (docs/api.md)"),
}

#: GRPCComputeClient methods of the earlier package.
CLIENT: Dict[str, str] = {
    "get_server_monitoring_data": ("get_server_monitoring_data() is gone: the server's metrics "
                                   "are server.metrics() there, or Prometheus with metrics_port="),
    "clear_server_monitoring_data": ("clear_server_monitoring_data() is gone: the server's "
                                     "metrics are counters (server.metrics(), metrics_port=)"),
    "stream_monitoring": ("stream_monitoring() is gone: scrape the server's metrics_port= "
                          "with Prometheus"),
    "launch_ui": "launch_ui() (the Gradio UI) is not in this version",
}

_IMPORT_FROM = dis.opmap.get("IMPORT_FROM")


def missing(module: str, name: str, table: Dict[str, str]) -> NoReturn:
    """Raise for ``module.name``: with the table's explanation when it has one.

    ``from module import name`` turns an AttributeError from a module's
    ``__getattr__`` into a generic "cannot import name"; so when the caller is that
    statement, an ImportError carrying the explanation is raised instead."""
    message = table.get(name)
    if message is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    message += _SEE
    caller = sys._getframe(2)
    try:
        importing = caller.f_code.co_code[caller.f_lasti] == _IMPORT_FROM
    except (IndexError, TypeError):  # pragma: no cover - another interpreter's frames
        importing = False
    if importing:
        raise ImportError(message, name=module)
    raise AttributeError(message)
