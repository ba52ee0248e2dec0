"""Server metrics for Prometheus, and the structured access log.

The server measures itself in C (atomic counters and fixed-bucket histograms; no
GIL and no Python per call). :meth:`GRPCComputeServer.metrics` returns them as a
dict; :class:`ServerMetricsCollector` exposes them to ``prometheus_client``
(an optional dependency: ``pip install prometheus_client``), and
``GRPCComputeServer(..., metrics_port=9100)`` serves them on ``/metrics``.

Metric names (Prometheus conventions: base units, ``_total`` counters):

=========================================  ==========  ==================================
``splitlearn_requests_total``              counter     calls by ``method`` and ``code``
``splitlearn_errors_total``                counter     calls that did not end OK, by ``method``
``splitlearn_transport_requests_total``    counter     Compute/ComputeBackward calls by how
                                                       their tensors came, ``transport``:
                                                       unary, stream, shared_memory
``splitlearn_in_flight_requests``          gauge       calls being served
``splitlearn_request_bytes_total``         counter     message bytes received
``splitlearn_response_bytes_total``        counter     message bytes sent
``splitlearn_call_duration_seconds``       histogram   Compute/ComputeBackward, by ``method``
                                                       and ``stage``: receive, decode, queue
                                                       (waiting for the GIL), compute,
                                                       encode, send, total
``splitlearn_access_log_dropped_total``    counter     access log records dropped (full ring)
``splitlearn_activation_store_entries``    gauge       forwards kept by a TrainableComputeFunction,
                                                       by ``state``: waiting (for their
                                                       backward), answered (kept for retries)
``splitlearn_activation_store_bytes``      gauge       bytes of tensors the store keeps
``splitlearn_activation_store_max_entries`` gauge      its limits (``max_entries``,
``splitlearn_activation_store_max_bytes``  gauge       ``max_bytes``)
``splitlearn_sessions``                    gauge       open sessions (``client.session()``)
``splitlearn_session_bytes``               gauge       bytes of tensors the sessions hold
``splitlearn_session_max_bytes``           gauge       bytes of tensors of the largest session
``splitlearn_sessions_opened_total``       counter     sessions opened
``splitlearn_sessions_closed_total``       counter     sessions closed by their clients
``splitlearn_sessions_evicted_total``      counter     sessions dropped, by ``reason``: bytes,
                                                       count, idle
``splitlearn_session_steps_total``         counter     session steps run
``splitlearn_session_replayed_steps_total`` counter    retried steps answered from the record
=========================================  ==========  ==================================

The activation-store gauges are there only when the server hosts a
:class:`~splitlearn_comm.TrainableComputeFunction`.

The metrics port serves, besides ``/metrics``, the live dashboard at ``/`` and its JSON
at ``/api/dashboard`` (:mod:`splitlearn_comm.dashboard`).
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any, Dict, Iterator, Optional, Union

__all__ = ["AccessLogWriter", "ServerMetricsCollector", "start_metrics_server"]

logger = logging.getLogger("splitlearn_comm.monitoring")


def _prometheus() -> tuple[Any, Any, Any]:
    try:
        import prometheus_client  # noqa: F401
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("Prometheus metrics need prometheus_client: "
                          "pip install 'splitlearn-comm[prometheus]'") from e
    return CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


class ServerMetricsCollector:
    """A ``prometheus_client`` collector reading a server's C metrics at scrape time.

    ``prometheus_client.REGISTRY.register(ServerMetricsCollector(server))`` adds the
    server's metrics to the default registry; ``server`` is a
    :class:`GRPCComputeServer` (started or not) and may be labelled with ``labels``
    (e.g. ``{"server": "tail"}``) when one process runs several.
    """

    def __init__(self, server: Any, labels: Optional[dict[str, str]] = None) -> None:
        self.server = server
        self.labels = dict(labels or {})

    def collect(self) -> Iterator[Any]:
        counter, gauge, histogram = _prometheus()
        m = self.server.metrics()
        extra = list(self.labels)
        values = list(self.labels.values())
        requests = counter("splitlearn_requests_total", "Calls served, by method and status code.",
                           labels=["method", "code", *extra])
        errors = counter("splitlearn_errors_total", "Calls that did not end OK, by method.",
                         labels=["method", *extra])
        failed: dict[str, Any] = {}
        for (method, code), n in m["requests"].items():
            requests.add_metric([method, code, *values], n)
            if code != "OK":
                failed[method] = failed.get(method, 0) + n
        for method, n in failed.items():
            errors.add_metric([method, *values], n)
        yield requests
        yield errors
        transport = counter("splitlearn_transport_requests_total",
                            "Compute and ComputeBackward calls, by how their tensors came "
                            "(one message, a stream of chunks, or shared memory).",
                            labels=["transport", *extra])
        for name, n in m.get("requests_by_transport", {}).items():
            transport.add_metric([name, *values], n)
        yield transport
        in_flight = gauge("splitlearn_in_flight_requests", "Calls being served.", labels=extra)
        in_flight.add_metric(values, m["in_flight"])
        yield in_flight
        for name, key, doc in (("splitlearn_request_bytes_total", "request_bytes",
                                "Message bytes received."),
                               ("splitlearn_response_bytes_total", "response_bytes",
                                "Message bytes sent."),
                               ("splitlearn_access_log_dropped_total", "access_log_dropped",
                                "Access log records dropped because the ring was full.")):
            c = counter(name, doc, labels=extra)
            c.add_metric(values, m[key])
            yield c
        store = _store(self.server)
        if store is not None:
            entries = gauge("splitlearn_activation_store_entries",
                            "Forwards kept by the activation store, by state.",
                            labels=["state", *extra])
            for state in ("waiting", "answered"):
                entries.add_metric([state, *values], store[state])
            yield entries
            for key, doc in (("bytes", "Bytes of tensors the activation store keeps."),
                             ("max_entries", "The activation store's max_entries."),
                             ("max_bytes", "The activation store's max_bytes.")):
                g = gauge(f"splitlearn_activation_store_{key}", doc, labels=extra)
                g.add_metric(values, store[key])
                yield g
        h = histogram("splitlearn_call_duration_seconds",
                      "Compute and ComputeBackward calls, by method and stage.",
                      labels=["method", "stage", *extra])
        for method, stages in m["latency_seconds_by_method"].items():
            for stage, hist in stages.items():
                buckets = [("+Inf" if b == float("inf") else repr(b), n)
                           for b, n in hist["buckets"]]
                h.add_metric([method, stage, *values], buckets, hist["sum"])
        yield h
        models = m.get("models")
        if models:  # a server hosting several compute functions (model_id)
            calls = counter("splitlearn_model_requests_total",
                            "Compute and ComputeBackward calls, by model_id, method and "
                            "status code.", labels=["model", "method", "code", *extra])
            seconds = counter("splitlearn_model_compute_seconds_total",
                              "Seconds spent in each model's compute() and backward().",
                              labels=["model", *extra])
            for model, per in models.items():
                for (method, code), n in per["requests"].items():
                    calls.add_metric([model, method, code, *values], n)
                seconds.add_metric([model, *values], per["compute_seconds"])
            yield calls
            yield seconds
        sessions = m.get("sessions")
        if sessions is not None:
            yield from _session_metrics(sessions, counter, gauge, extra, values)


def _session_metrics(s: dict[str, Any], counter: Any, gauge: Any, extra: list[Any],
                     values: list[Any]) -> Iterator[Any]:
    for name, value, doc in (
            ("splitlearn_sessions", s["active"], "Open sessions."),
            ("splitlearn_session_bytes", s["bytes"], "Bytes of tensors the sessions hold."),
            ("splitlearn_session_max_bytes", max(s["sizes"].values(), default=0),
             "Bytes of tensors held by the largest session.")):
        g = gauge(name, doc, labels=extra)
        g.add_metric(values, value)
        yield g
    for name, key, doc in (("splitlearn_sessions_opened_total", "opened", "Sessions opened."),
                           ("splitlearn_sessions_closed_total", "closed",
                            "Sessions closed by their clients."),
                           ("splitlearn_session_steps_total", "steps", "Session steps run."),
                           ("splitlearn_session_replayed_steps_total", "replayed_steps",
                            "Retried session steps answered from the record.")):
        c = counter(name, doc, labels=extra)
        c.add_metric(values, s[key])
        yield c
    ev = counter("splitlearn_sessions_evicted_total", "Sessions dropped by the server, by reason.",
                 labels=["reason", *extra])
    for reason in ("bytes", "count", "idle"):
        ev.add_metric([reason, *values], s["evicted_" + reason])
    yield ev


def _store(server: Any) -> Optional[Dict[str, Any]]:
    from .dashboard import _store_stats

    return _store_stats(getattr(server, "compute_fn", None))


def start_metrics_server(server: Any, port: int, addr: str = "0.0.0.0",
                         interval: float = 1.0) -> Any:
    """Serve ``server``'s metrics on ``http://addr:port/``: the live dashboard at ``/``,
    its JSON at ``/api/dashboard`` and Prometheus text at ``/metrics`` (its own
    registry; without ``prometheus_client`` that page says how to install it and the
    dashboard still works). Returns the started
    :class:`~splitlearn_comm.dashboard.DashboardHTTPServer` (``server_port``,
    ``close()``)."""
    from .dashboard import DashboardHTTPServer, MetricsSampler, local_source

    registry: Any
    try:
        _prometheus()
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        registry.register(ServerMetricsCollector(server))
    except ImportError:
        logger.warning("prometheus_client is not installed: /metrics on port %d will say so; "
                       "the dashboard works without it", port)
        registry = "missing"
    sampler = MetricsSampler(local_source(server), name=f"{server.host}:{server.port}",
                             interval=interval)
    http = DashboardHTTPServer([sampler], addr, port, registry=registry).start()
    logger.info("dashboard on http://%s:%d/, metrics on http://%s:%d/metrics", addr,
                http.server_port, addr, http.server_port)
    return http


class AccessLogWriter:
    """Writes a server's access log: one JSON line per call through ``logging``.

    Records are made in C on the call path (no GIL) and queued in a bounded ring;
    this writer's one thread takes them in batches and logs them at INFO on
    ``logger`` (default ``splitlearn_comm.access``). Fields: time, method, peer,
    status, request_id, forward_id, input/output shape and dtype, codec, bytes in and
    out, and durations in ms by stage.
    """

    def __init__(self, core: Any, target: Union[bool, logging.Logger, None] = True,
                 capacity: int = 65536) -> None:
        self.logger = target if isinstance(target, logging.Logger) else \
            logging.getLogger("splitlearn_comm.access")
        self._core = core
        self._stop = threading.Event()
        core.access_log_enable(capacity)
        self._thread = threading.Thread(target=self._run, name="splitlearn-access-log",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            for record in self._core.take_access_log(512, 0.0 if stopping else 0.2):
                self.logger.info(json.dumps(record, separators=(",", ":")))
            if stopping:
                return

    def close(self) -> None:
        """Write what is queued and stop the thread."""
        self._stop.set()
        self._thread.join(10)
