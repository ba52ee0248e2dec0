"""The live dashboard: a page on the metrics port, its JSON, and a multi-server poller.

A :class:`MetricsSampler` reads a metrics snapshot once per ``interval`` seconds (for a
local server, :meth:`GRPCComputeServer.metrics`, which copies the C core's atomic
counters and histograms; for a remote one, its Prometheus ``/metrics`` text), turns
the difference from the previous snapshot into rates, latency quantiles and time per
stage, and keeps the last ``history`` seconds of these samples in memory. The call
path never waits for it: the counters are the ones the server keeps anyway, and the
sampler is one background thread.

:class:`DashboardHTTPServer` serves, on one port:

* ``/``: the page (``dashboard.html``, one self-contained file shipped in the package:
  HTML, CSS and JavaScript drawing its charts on ``<canvas>``; nothing from the network);
* ``/api/dashboard?after=SEQ[,SEQ...]``: the samples newer than ``SEQ`` (one per server,
  or one for all) for every server (the page polls it every ``interval`` seconds);
* ``/metrics``: Prometheus text, when it serves a local server and ``prometheus_client``
  is installed.

The JSON (``version`` 1)::

    {"version": 1, "interval_s": 1.0, "history_s": 900.0, "now": 1764500000.0,
     "servers": [{"name": "127.0.0.1:9100", "source": "local" | "http://.../metrics",
                  "ok": true, "error": null, "seq": 42, "samples": [SAMPLE, ...]}]}

    SAMPLE = {"seq": 42, "t": 1764500000.0 (Unix seconds, taken just before reading the
                                            snapshot), "dt": 1.0,
              "totals": {"calls": N, "errors": N, "bytes_in": N, "bytes_out": N},
              "calls": {METHOD: per second}, "errors": {STATUS CODE: per second},
              "in_flight": N,
              "latency": {"p50": s, "p99": s, "mean": s} or null (no call in dt),
              "stages": {STAGE: mean seconds per call} (receive, decode, queue,
                         compute, encode, send),
              "bytes_in": per second, "bytes_out": per second,
              "store": {"waiting", "answered", "entries", "bytes", "max_entries",
                        "max_bytes"} or null (no activation store),
              "sessions": {"active", "bytes", "max_sessions", "max_bytes", "opened",
                           "closed", "evicted", "steps"} or null (no session yet),
              "models": {MODEL ID: {"calls": per second, "errors": per second,
                                    "latency": {...} or null}}}

Rates of the first sample after a start (or after a server's counters went back, as
when it restarted) are null.
"""
from __future__ import annotations

import collections
import http.server
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

logger = logging.getLogger("splitlearn_comm.dashboard")

__all__ = ["MetricsSampler", "DashboardHTTPServer", "local_source", "prometheus_source",
           "parse_prometheus", "page"]

#: Seconds of history kept, and between two samples.
HISTORY_S = 900.0
INTERVAL_S = 1.0

#: The stages shown in "time per stage" (``total`` is shown as latency).
STAGES = ("receive", "decode", "queue", "compute", "encode", "send")

Metrics = Dict[str, Any]


def page() -> bytes:
    """The dashboard page (``splitlearn_comm/dashboard.html``)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.html"),
              "rb") as f:
        return f.read()


# -- reading metrics --------------------------------------------------------------------


def _store_stats(compute_fn: Any) -> Optional[Dict[str, int]]:
    """Activation-store occupancy of every TrainableComputeFunction hosted, summed."""
    fns = list(compute_fn.values()) if isinstance(compute_fn, dict) else [compute_fn]
    total: Optional[Dict[str, int]] = None
    for fn in fns:
        stats = getattr(fn, "stats", None)
        if not callable(stats) or not getattr(fn, "supports_training", False):
            continue
        s = stats()
        part = {"waiting": int(s.get("waiting", 0)), "answered": int(s.get("answered", 0)),
                "bytes": int(s.get("bytes", 0)),
                "max_entries": int(getattr(fn, "max_entries", 0)),
                "max_bytes": int(getattr(fn, "max_bytes", 0))}
        if total is None:
            total = part
        else:
            for k, v in part.items():
                total[k] += v
    return total


def local_source(server: Any) -> Callable[[], Metrics]:
    """Read ``server.metrics()`` plus its activation-store occupancy."""

    def read() -> Metrics:
        m = dict(server.metrics())
        if "store" not in m:
            m["store"] = _store_stats(server.compute_fn)
        return m

    return read


def parse_prometheus(text: str) -> Metrics:
    """Prometheus text as the dict :meth:`GRPCComputeServer.metrics` returns (the parts
    the dashboard uses), summed over labels it does not know (e.g. ``server``)."""
    from prometheus_client.parser import text_string_to_metric_families

    m: Metrics = {"requests": {}, "in_flight": 0, "latency_seconds": {}, "request_bytes": 0,
                  "response_bytes": 0, "store": None, "sessions": None}
    hist: Dict[str, Dict[str, Any]] = {}
    store: Dict[str, int] = {}
    sessions: Dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "splitlearn_requests_total":
                key: Tuple[str, ...] = (labels.get("method", "other"), labels.get("code", "OK"))
                if labels.get("model_id"):
                    key = (*key, labels["model_id"])
                m["requests"][key] = m["requests"].get(key, 0) + int(value)
            elif name == "splitlearn_in_flight_requests":
                m["in_flight"] += int(value)
            elif name == "splitlearn_request_bytes_total":
                m["request_bytes"] += int(value)
            elif name == "splitlearn_response_bytes_total":
                m["response_bytes"] += int(value)
            elif name.startswith("splitlearn_call_duration_seconds"):
                h = hist.setdefault(labels.get("stage", "total"), {"b": {}, "count": 0, "sum": 0.0})
                if name.endswith("_bucket"):
                    le = float(labels["le"])
                    h["b"][le] = h["b"].get(le, 0) + int(value)
                elif name.endswith("_count"):
                    h["count"] += int(value)
                elif name.endswith("_sum"):
                    h["sum"] += float(value)
            elif name == "splitlearn_activation_store_entries":
                state = labels.get("state", "waiting")
                store[state] = store.get(state, 0) + int(value)
            elif name.startswith("splitlearn_activation_store_"):
                k = name[len("splitlearn_activation_store_"):]
                store[k] = store.get(k, 0) + int(value)
            elif name in _SESSION_METRICS:
                k = _SESSION_METRICS[name]
                sessions[k] = sessions.get(k, 0) + value
    for stage, h in hist.items():
        m["latency_seconds"][stage] = {"buckets": sorted(h["b"].items()), "count": h["count"],
                                       "sum": h["sum"]}
    if store:
        m["store"] = {k: store.get(k, 0) for k in ("waiting", "answered", "bytes", "max_entries",
                                                    "max_bytes")}
    if sessions:
        m["sessions"] = sessions
    return m


#: Prometheus session metrics (GRPCComputeServer sessions) and their keys in
#: ``server.metrics()["sessions"]``; evictions are summed over their reasons.
_SESSION_METRICS = {"splitlearn_sessions": "active", "splitlearn_session_bytes": "bytes",
                    "splitlearn_sessions_opened_total": "opened",
                    "splitlearn_sessions_closed_total": "closed",
                    "splitlearn_sessions_evicted_total": "evicted",
                    "splitlearn_session_steps_total": "steps",
                    "splitlearn_session_replayed_steps_total": "replayed_steps"}


def prometheus_source(url: str, timeout: float = 5.0) -> Callable[[], Metrics]:
    """Scrape ``url`` (a Prometheus ``/metrics`` endpoint) and parse it."""

    def read() -> Metrics:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return parse_prometheus(r.read().decode("utf-8", "replace"))

    return read


# -- turning two snapshots into a sample ------------------------------------------------


def _quantile(buckets: Sequence[Tuple[float, int]], q: float) -> Optional[float]:
    """The q-quantile of cumulative ``(upper bound, count)`` buckets, interpolated
    linearly inside the bucket it falls in (as Prometheus' histogram_quantile)."""
    if not buckets:
        return None
    n = buckets[-1][1]
    if n <= 0:
        return None
    rank = q * n
    lower, below = 0.0, 0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def _hist_delta(cur: Dict[str, Any], prev: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if not prev:
        return cur
    pb = dict(prev.get("buckets", ()))
    return {"buckets": [(le, n - pb.get(le, 0)) for le, n in cur.get("buckets", ())],
            "count": cur.get("count", 0) - prev.get("count", 0),
            "sum": cur.get("sum", 0.0) - prev.get("sum", 0.0)}


def _latency(hist: Optional[Dict[str, Any]]) -> Optional[Dict[str, float]]:
    if not hist or hist.get("count", 0) <= 0:
        return None
    b = hist["buckets"]
    return {"p50": _quantile(b, 0.5), "p99": _quantile(b, 0.99),
            "mean": hist["sum"] / hist["count"]}


def _split_requests(requests: Dict[Tuple[Any, ...], int]) -> Tuple[Dict[Tuple[str, str], int],
                                                         Dict[str, Dict[Tuple[str, str], int]]]:
    """Requests by (method, code), and by model id when the keys carry one."""
    flat: Dict[Tuple[str, str], int] = {}
    models: Dict[str, Dict[Tuple[str, str], int]] = {}
    for key, n in requests.items():
        method, code = key[0], key[1]
        flat[(method, code)] = flat.get((method, code), 0) + n
        if len(key) > 2 and key[2]:
            per = models.setdefault(str(key[2]), {})
            per[(method, code)] = per.get((method, code), 0) + n
    return flat, models


def _went_back(cur: Metrics, prev: Metrics) -> bool:
    """True when a counter decreased (the server restarted, or another one answers)."""
    flat_c, _ = _split_requests(cur.get("requests", {}))
    flat_p, _ = _split_requests(prev.get("requests", {}))
    if any(flat_c.get(k, 0) < n for k, n in flat_p.items()):
        return True
    return bool(cur.get("request_bytes", 0) < prev.get("request_bytes", 0)
                or cur.get("response_bytes", 0) < prev.get("response_bytes", 0))


def _block(req: Dict[Tuple[str, str], int], req_prev: Optional[Dict[Tuple[str, str], int]],
           dt: float) -> Tuple[Dict[str, float], Dict[str, float]]:
    calls: Dict[str, float] = {}
    errors: Dict[str, float] = {}
    for (method, code), n in req.items():
        d = n - (req_prev or {}).get((method, code), 0)
        calls[method] = calls.get(method, 0.0) + d / dt
        if code != "OK":
            errors[code] = errors.get(code, 0.0) + d / dt
    return calls, errors


def _round_dict(d: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`_round` of a sample."""
    out: Dict[str, Any] = _round(d)
    return out


def _round(v: Any) -> Any:
    """Floats to 6 significant digits (the JSON stays small), recursively; not the
    times (``t``)."""
    if isinstance(v, float):
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: x if k == "t" else _round(x) for k, x in v.items()}
    return v


def _sessions(d: Any) -> Optional[Dict[str, Any]]:
    """Session occupancy from ``metrics()["sessions"]`` (or the Prometheus session
    metrics): ``active``, ``bytes``, the limits ``max_sessions`` and ``max_bytes``
    (null when unknown, as over Prometheus), ``opened``, ``closed``, ``evicted`` (all
    reasons) and ``steps``; None while the server has had no session."""
    if not isinstance(d, dict):
        return None

    def num(key: str) -> Optional[float]:
        v = d.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    evicted = num("evicted")
    if evicted is None:
        parts = [num(k) for k in ("evicted_bytes", "evicted_count", "evicted_idle")]
        evicted = sum(p for p in parts if p is not None) if any(
            p is not None for p in parts) else None
    out = {"active": num("active") or 0, "bytes": num("bytes") or 0,
           "max_sessions": num("max_sessions"), "max_bytes": num("max_bytes"),
           "opened": num("opened"), "closed": num("closed"), "evicted": evicted,
           "steps": num("steps")}
    if not out["active"] and not out["opened"] and not out["steps"]:
        return None  # sessions unused: no panel
    return out


def make_sample(cur: Metrics, prev: Optional[Metrics], dt: float, seq: int,
                t: float) -> Dict[str, Any]:
    """One dashboard sample from the snapshot ``cur`` and the one ``dt`` seconds earlier
    (``prev``; None for the first: rates are then null)."""
    flat, models = _split_requests(cur.get("requests", {}))
    totals = {"calls": sum(flat.values()),
              "errors": sum(n for (_, code), n in flat.items() if code != "OK"),
              "bytes_in": int(cur.get("request_bytes", 0)),
              "bytes_out": int(cur.get("response_bytes", 0))}
    sample: Dict[str, Any] = {
        "seq": seq, "t": round(t, 3), "dt": round(dt, 4), "totals": totals,
        "calls": None, "errors": None, "in_flight": int(cur.get("in_flight", 0)),
        "latency": None, "stages": None, "bytes_in": None, "bytes_out": None,
        "store": cur.get("store") or None, "sessions": _sessions(cur.get("sessions")),
        "models": {}}
    if "models" in cur and isinstance(cur["models"], dict):
        # a server keeping metrics per model: {model id: {"requests": ..., ...}}
        for mid, mm in cur["models"].items():
            sub = {(k[0], k[1]): n for k, n in mm.get("requests", {}).items()}
            models[str(mid)] = sub
    if prev is None or dt <= 0 or _went_back(cur, prev):
        for mid in models:
            sample["models"][mid] = {"calls": None, "errors": None, "latency": None}
        return _round_dict(sample)
    flat_p, models_p = _split_requests(prev.get("requests", {}))
    if "models" in prev and isinstance(prev["models"], dict):
        models_p = {str(mid): {(k[0], k[1]): n for k, n in mm.get("requests", {}).items()}
                    for mid, mm in prev["models"].items()}
    sample["calls"], sample["errors"] = _block(flat, flat_p, dt)
    lat, lat_p = cur.get("latency_seconds", {}), prev.get("latency_seconds", {})
    sample["latency"] = _latency(_hist_delta(lat["total"], lat_p.get("total"))
                                 if "total" in lat else None)
    stages: Dict[str, float] = {}
    for stage in STAGES:
        if stage in lat:
            d = _hist_delta(lat[stage], lat_p.get(stage))
            if d["count"] > 0:
                stages[stage] = d["sum"] / d["count"]
    sample["stages"] = stages or None
    sample["bytes_in"] = (cur.get("request_bytes", 0) - prev.get("request_bytes", 0)) / dt
    sample["bytes_out"] = (cur.get("response_bytes", 0) - prev.get("response_bytes", 0)) / dt
    for mid, req in models.items():
        calls, errors = _block(req, models_p.get(mid), dt)
        latency = None
        mm, mp = (cur.get("models") or {}).get(mid), (prev.get("models") or {}).get(mid)
        if isinstance(mm, dict) and "total" in mm.get("latency_seconds", {}):
            latency = _latency(_hist_delta(mm["latency_seconds"]["total"],
                                           ((mp or {}).get("latency_seconds") or {}).get("total")))
        sample["models"][mid] = {"calls": sum(calls.values()), "errors": sum(errors.values()),
                                 "latency": latency}
    return _round_dict(sample)


class MetricsSampler:
    """Keeps ``history`` seconds of dashboard samples of one server.

    Args:
        read: returns a metrics snapshot (:func:`local_source`, :func:`prometheus_source`).
        name: how the page titles this server.
        source: where the numbers come from, as shown on the page.
        interval: seconds between two samples.
        history: seconds of samples kept.
    """

    def __init__(self, read: Callable[[], Metrics], name: str, source: str = "local",
                 interval: float = INTERVAL_S, history: float = HISTORY_S) -> None:
        if not interval > 0 or not history >= interval:
            raise ValueError("interval must be > 0 and history >= interval")
        self.read = read
        self.name = name
        self.source = source
        self.interval = float(interval)
        self.history = float(history)
        self._samples: "collections.deque[Dict[str, Any]]" = collections.deque(
            maxlen=int(history / interval) + 1)
        self._lock = threading.Lock()
        self._prev: Optional[Metrics] = None
        self._prev_at = 0.0
        self._seq = 0
        self._last_t = 0.0
        self._error: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def sample_once(self) -> Optional[Dict[str, Any]]:
        """Read one snapshot and append its sample (None when reading failed)."""
        now, wall = time.monotonic(), time.time()  # before reading: the sample's time
        try:
            cur = self.read()
        except Exception as e:  # an unreachable remote server: shown on the page
            if isinstance(e, urllib.error.HTTPError):
                why = f"HTTP {e.code} {e.reason}"
            elif isinstance(e, urllib.error.URLError):
                why = str(e.reason)
            else:
                why = f"{type(e).__name__}: {e}"
            with self._lock:
                self._error = why
                self._prev = None
            logger.debug("sampling %s failed: %s", self.name, self._error)
            return None
        with self._lock:
            self._seq += 1
            t = max(wall, self._last_t + 1e-3)
            self._last_t = t
            prev = self._prev
            sample = make_sample(cur, prev, now - self._prev_at if prev else 0.0, self._seq, t)
            self._prev, self._prev_at = cur, now
            self._error = None
            self._samples.append(sample)
            while self._samples and self._samples[0]["t"] < t - self.history:
                self._samples.popleft()
            return sample

    def snapshot(self, after: int = 0) -> Dict[str, Any]:
        """This server's part of the JSON: samples with ``seq > after``."""
        with self._lock:
            samples = [s for s in self._samples if s["seq"] > after]
            return {"name": self.name, "source": self.source, "ok": self._error is None,
                    "error": self._error, "seq": self._seq, "samples": samples}

    def start(self) -> "MetricsSampler":
        """Sample every ``interval`` seconds on a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="splitlearn-dashboard-sampler",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample_once()
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a slow scrape): start again from now
                next_at, delay = time.monotonic(), 0.0
            self._stop.wait(delay)

    def close(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)


# -- the HTTP server -----------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "DashboardHTTPServer"
    server_version = "splitlearn-comm"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urllib.parse.urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        try:
            if path in ("/", "/index.html", "/dashboard"):
                self._send(200, "text/html; charset=utf-8", self.server.page)
            elif path == "/api/dashboard":
                query = urllib.parse.parse_qs(url.query)
                try:
                    after = [int(a) for a in query.get("after", ["0"])[0].split(",")]
                except ValueError:
                    self._send(400, "text/plain; charset=utf-8",
                               b"after must be a sample's seq, or one per server separated "
                               b"by commas (e.g. after=12,40)\n")
                    return
                payload = json.dumps(self.server.payload(after), separators=(",", ":"))
                self._send(200, "application/json", payload.encode())
            elif path == "/metrics":
                code, ctype, body = self.server.prometheus()
                self._send(code, ctype, body)
            elif path == "/favicon.ico":
                self._send(204, "text/plain", b"")
            else:
                self._send(404, "text/plain; charset=utf-8",
                           b"not found: the dashboard is at /, its data at /api/dashboard, "
                           b"Prometheus metrics at /metrics\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("%s %s", self.address_string(), format % args)


class DashboardHTTPServer(http.server.ThreadingHTTPServer):
    """Serves the page, its JSON and (for a local server) ``/metrics`` on one port.

    Args:
        samplers: one :class:`MetricsSampler` per server shown (started here).
        host, port: where to listen (port 0: the OS picks; read :attr:`server_port`).
        registry: a ``prometheus_client`` registry served on ``/metrics`` (None: 404).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, samplers: Sequence[MetricsSampler], host: str = "127.0.0.1",
                 port: int = 0, registry: Any = None) -> None:
        if ":" in host:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__((host, int(port)), _Handler)
        self.samplers = list(samplers)
        self.registry = registry
        self.page = page()
        self._thread = threading.Thread(target=self.serve_forever, name="splitlearn-dashboard-http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)

    def start(self) -> "DashboardHTTPServer":
        for s in self.samplers:
            if s._thread is None:
                s.start()
        self._thread.start()
        return self

    def payload(self, after: Sequence[int] = (0,)) -> Dict[str, Any]:
        """The JSON the page polls: every server's samples with ``seq`` above its entry
        of ``after`` (one number: the same for all)."""
        first = self.samplers[0] if self.samplers else None
        if len(after) == 1:
            after = list(after) * len(self.samplers)
        return {"version": 1, "interval_s": first.interval if first else INTERVAL_S,
                "history_s": first.history if first else HISTORY_S, "now": round(time.time(), 3),
                "servers": [s.snapshot(after[i] if i < len(after) else 0)
                            for i, s in enumerate(self.samplers)]}

    def prometheus(self) -> Tuple[int, str, bytes]:
        if self.registry is None:
            return 404, "text/plain; charset=utf-8", b"no Prometheus metrics here\n"
        if self.registry == "missing":
            return (503, "text/plain; charset=utf-8",
                    b"Prometheus metrics need prometheus_client: pip install prometheus_client\n")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def close(self) -> None:
        """Stop serving and sampling."""
        for s in self.samplers:
            s.close()
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()


def metrics_url(address: str) -> str:
    """``HOST:PORT``, ``http://HOST:PORT`` or a full URL as the URL of a /metrics page."""
    if "://" not in address:
        address = "http://" + address
    parts = urllib.parse.urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"bad metrics address {address!r}: expected HOST:PORT or "
                         "http://HOST:PORT/metrics")
    if parts.port is None and "]" not in parts.netloc and ":" not in parts.netloc:
        raise ValueError(f"bad metrics address {address!r}: no port (expected HOST:PORT, the "
                         "server's --metrics-port)")
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def remote_dashboard(addresses: Iterable[str], host: str = "127.0.0.1", port: int = 0,
                     interval: float = INTERVAL_S, timeout: float = 5.0) -> DashboardHTTPServer:
    """A started dashboard polling the Prometheus endpoints of ``addresses``."""
    samplers: List[MetricsSampler] = []
    for address in addresses:
        url = metrics_url(address)
        name = urllib.parse.urlsplit(url).netloc
        samplers.append(MetricsSampler(prometheus_source(url, timeout),
                                       name=name, source=url, interval=interval))
    return DashboardHTTPServer(samplers, host, port).start()
