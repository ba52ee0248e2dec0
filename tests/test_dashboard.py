"""The live dashboard: its JSON, the page, the remote poller and CLI, the Grafana
dashboard's metric names, and the page itself in headless Chromium."""
from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

import grpc
import pytest
torch = pytest.importorskip("torch", reason="needs torch, an optional extra "
                            "(pip install splitlearn-comm[torch])")

import splitlearn_comm as slc
from conftest import PYTHON, ROOT, Echo, subprocess_env
from splitlearn_comm import dashboard
from splitlearn_comm.training import TrainableComputeFunction

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import headless_chromium  # noqa: E402

GRAFANA = Path(ROOT) / "deploy" / "grafana" / "splitlearn-comm.json"


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def get_json(url: str) -> Dict[str, Any]:
    return json.loads(get(url))


def total_calls(server: slc.GRPCComputeServer) -> int:
    return sum(server.metrics()["requests"].values())


def settled_total(server: slc.GRPCComputeServer, timeout: float = 10.0) -> int:
    """The server's call count once nothing is in flight (a call is counted just after
    its status went out, so the client may see its answer a moment earlier)."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        m = server.metrics()
        n = sum(m["requests"].values())
        if (m["in_flight"] == 0 and n == last) or time.monotonic() > deadline:
            return n
        last = n
        time.sleep(0.05)


def wait_sample(url: str, pred, timeout: float = 30.0) -> Dict[str, Any]:
    """Poll the JSON until a sample of the first server satisfies ``pred``."""
    deadline = time.monotonic() + timeout
    while True:
        data = get_json(url + "api/dashboard")
        for s in reversed(data["servers"][0]["samples"]):
            if pred(s):
                return s
        if time.monotonic() > deadline:
            pytest.fail(f"no sample matched within {timeout} s; last: "
                        f"{data['servers'][0]['samples'][-1:]}")
        time.sleep(0.2)


class Picky(slc.ComputeFunction):
    def compute(self, x):
        if x.numel() == 1:
            slc.current_call().abort(grpc.StatusCode.INVALID_ARGUMENT, "one is too few")
        return x


# -- the JSON endpoint ---------------------------------------------------------------------


def test_json_endpoint_reports_calls_errors_latency_stages_bytes(serve, connect):
    server = serve(Picky(), metrics_port=0)
    assert server.dashboard_url == f"http://127.0.0.1:{server.metrics_port}/"
    client = connect(server)
    for _ in range(20):
        client.compute(torch.ones(256))
    for _ in range(3):
        with pytest.raises(slc.RpcError):
            client.compute(torch.ones(1))
    n = settled_total(server)
    assert n == 23
    m = server.metrics()
    sample = wait_sample(server.dashboard_url, lambda s: s["totals"]["calls"] == n)
    assert sample["totals"] == {"calls": 23, "errors": 3, "bytes_in": m["request_bytes"],
                                "bytes_out": m["response_bytes"]}
    data = get_json(server.dashboard_url + "api/dashboard")
    assert data["version"] == 1 and data["interval_s"] == 1.0 and data["history_s"] == 900.0
    (srv,) = data["servers"]
    assert srv["ok"] and srv["error"] is None and srv["source"] == "local"
    assert srv["name"] == f"127.0.0.1:{server.port}"
    samples = srv["samples"]
    seqs = [s["seq"] for s in samples]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(b["t"] > a["t"] for a, b in zip(samples, samples[1:]))
    rated = [s for s in samples if s["calls"] is not None]
    # the rates, integrated over the samples, give the counts back
    assert sum(s["calls"].get("Compute", 0) * s["dt"] for s in rated) == pytest.approx(
        23 - samples[0]["totals"]["calls"], abs=0.01)
    assert sum(s["errors"].get("INVALID_ARGUMENT", 0) * s["dt"] for s in rated) == \
        pytest.approx(3 - samples[0]["totals"]["errors"], abs=0.01)
    busy = [s for s in rated if s["latency"] is not None]
    if samples[0]["totals"]["calls"] < 23:  # some calls fell after the first sample
        assert busy
    for s in busy:
        assert 0 < s["latency"]["p50"] <= s["latency"]["p99"]
        assert set(s["stages"]) <= set(dashboard.STAGES) and "compute" in s["stages"]
        assert s["bytes_in"] > 0 and s["bytes_out"] > 0
    assert all(s["store"] is None and s["sessions"] is None and s["models"] == {}
               for s in samples)
    # only what is newer than `after`
    last = samples[-1]["seq"]
    newer = get_json(server.dashboard_url + f"api/dashboard?after={last}")["servers"][0]
    assert all(s["seq"] > last for s in newer["samples"])
    assert newer["seq"] >= last


def test_http_routes_and_bad_queries(serve):
    server = serve(Echo(), metrics_port=0)
    url = server.dashboard_url
    html = get(url).decode()
    assert html.startswith("<!doctype html>") and "<canvas" in html
    assert 'name="viewport"' in html  # usable on a phone
    # self-contained: nothing loaded from elsewhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "external resource"
    assert "@import" not in html and "fetch(\"http" not in html
    assert get(url + "index.html") == get(url)
    assert b"splitlearn_in_flight_requests" in get(url + "metrics")
    for path, code in (("nope", 404), ("api/dashboard?after=x", 400)):
        with pytest.raises(urllib.error.HTTPError) as e:
            get(url + path)
        assert e.value.code == code
        assert b"/api/dashboard" in e.value.read() or code == 400
    req = urllib.request.Request(url + "api/dashboard", method="HEAD")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200 and r.read() == b""
    # the server keeps serving
    assert get_json(url + "api/dashboard")["servers"][0]["ok"]


def test_busy_metrics_port_is_a_clear_error_and_leaves_nothing_running(serve):
    first = serve(Echo(), metrics_port=0)
    server = slc.GRPCComputeServer(Echo(), host="127.0.0.1", port=0,
                                   metrics_port=first.metrics_port)
    with pytest.raises(OSError, match=f"127.0.0.1:{first.metrics_port}"):
        server.start()
    assert not server.serving
    # the first server's dashboard is untouched
    assert get_json(first.dashboard_url + "api/dashboard")["servers"][0]["ok"]


def test_activation_store_occupancy_in_json_and_prometheus(serve, connect):
    torch.manual_seed(0)
    fn = TrainableComputeFunction(torch.nn.Linear(4, 4), lambda p: torch.optim.SGD(p, lr=0.1),
                                  max_entries=8, max_bytes=1 << 20)
    server = serve(fn, metrics_port=0)
    client = connect(server)
    outs = [client.remote(torch.randn(2, 4, requires_grad=True)) for _ in range(3)]
    sample = wait_sample(server.dashboard_url,
                         lambda s: s["store"] is not None and s["store"]["waiting"] == 3)
    assert sample["store"]["max_entries"] == 8 and sample["store"]["max_bytes"] == 1 << 20
    assert sample["store"]["bytes"] == fn.stats()["bytes"] > 0
    outs[0].sum().backward()
    sample = wait_sample(server.dashboard_url,
                         lambda s: s["store"]["waiting"] == 2 and s["store"]["answered"] == 1)
    text = get(server.dashboard_url + "metrics").decode()
    assert 'splitlearn_activation_store_entries{state="waiting"} 2.0' in text
    assert 'splitlearn_activation_store_entries{state="answered"} 1.0' in text
    assert "splitlearn_activation_store_max_entries 8.0" in text
    # the remote dashboard reads the same from the Prometheus text
    parsed = dashboard.parse_prometheus(text)
    assert parsed["store"]["waiting"] == 2 and parsed["store"]["max_bytes"] == 1 << 20


def test_session_occupancy_in_json_and_prometheus(serve, connect):
    pytest.importorskip("prometheus_client")

    class RunningSum(slc.ComputeFunction):
        def compute(self, x):
            session = slc.current_call().session
            if session is None:
                return x
            session["sum"] = session.get("sum", 0) + x
            return session["sum"]

    server = serve(RunningSum(), metrics_port=0, max_sessions=4)
    client = connect(server)
    assert wait_sample(server.dashboard_url, lambda s: s["seq"] >= 1)["sessions"] is None
    with client.session() as a, client.session() as b:
        for _ in range(3):
            a.compute(torch.ones(256))
        b.compute(torch.ones(4))
        sample = wait_sample(server.dashboard_url, lambda s: s["sessions"] is not None
                             and s["sessions"]["active"] == 2 and s["sessions"]["steps"] == 4)
        assert sample["sessions"]["max_sessions"] == 4 and sample["sessions"]["opened"] == 2
        assert sample["sessions"]["bytes"] >= 256 * 4
        parsed = dashboard.parse_prometheus(get(server.dashboard_url + "metrics").decode())
        assert parsed["sessions"]["active"] == 2 and parsed["sessions"]["steps"] == 4
        remote = dashboard.make_sample(parsed, None, 0.0, 1, 1.0)["sessions"]
        assert remote["active"] == 2 and remote["max_sessions"] is None  # not exported
    sample = wait_sample(server.dashboard_url, lambda s: s["sessions"] is not None
                         and s["sessions"]["active"] == 0)
    assert sample["sessions"]["closed"] == 2


# -- samples from snapshots ------------------------------------------------------------------


def _hist(counts: List[int], total: float) -> Dict[str, Any]:
    bounds = [0.001, 0.01, 0.1, float("inf")]
    cum, acc = [], 0
    for b, c in zip(bounds, counts):
        acc += c
        cum.append((b, acc))
    return {"buckets": cum, "count": acc, "sum": total}


def _snap(ok: int, bad: int, hist: Dict[str, Any], nbytes: int, **extra) -> Dict[str, Any]:
    return {"requests": {("Compute", "OK"): ok, ("Compute", "UNAVAILABLE"): bad},
            "in_flight": 2, "latency_seconds": {"total": hist, "compute": hist},
            "request_bytes": nbytes, "response_bytes": 2 * nbytes, **extra}


def test_make_sample_rates_quantiles_and_resets():
    prev = _snap(10, 0, _hist([10, 0, 0, 0], 0.005), 1000)
    # 100 more calls in 2 s: 50 under 1 ms, 40 in (1, 10] ms, 10 in (10, 100] ms
    cur = _snap(106, 4, _hist([60, 40, 10, 0], 0.005 + 0.5), 5000)
    s = dashboard.make_sample(cur, prev, 2.0, seq=7, t=1000.0)
    assert s["seq"] == 7 and s["t"] == 1000.0
    assert s["calls"] == {"Compute": 50.0} and s["errors"] == {"UNAVAILABLE": 2.0}
    assert s["bytes_in"] == 2000.0 and s["bytes_out"] == 4000.0 and s["in_flight"] == 2
    assert s["totals"] == {"calls": 110, "errors": 4, "bytes_in": 5000, "bytes_out": 10000}
    # p50: rank 50 is the last call of the first bucket; p99: rank 99 lies 9/10 into (10, 100] ms
    assert s["latency"]["p50"] == pytest.approx(0.001)
    assert s["latency"]["p99"] == pytest.approx(0.01 + 0.09 * 9 / 10)
    assert s["latency"]["mean"] == pytest.approx(0.005)
    assert s["stages"] == {"compute": pytest.approx(0.005)}
    # counters that went back (a restarted server): no rates, totals still shown
    r = dashboard.make_sample(prev, cur, 1.0, seq=8, t=1001.0)
    assert r["calls"] is None and r["latency"] is None and r["totals"]["calls"] == 10
    # the first sample has no rates
    assert dashboard.make_sample(cur, None, 0.0, 1, 1.0)["calls"] is None
    # sessions (server.metrics()["sessions"]): occupancy, limits, counters
    stats = {"active": 3, "bytes": 1024, "max_sessions": 8, "max_bytes": 4096,
             "idle_timeout": 60.0, "opened": 5, "closed": 1, "evicted_bytes": 1,
             "evicted_count": 0, "evicted_idle": 1, "steps": 9, "replayed_steps": 0,
             "sizes": {"a": 1000, "b": 24}}
    s = dashboard.make_sample(dict(cur, sessions=stats), prev, 1.0, 9, 1002.0)
    assert s["sessions"] == {"active": 3, "bytes": 1024, "max_sessions": 8, "max_bytes": 4096,
                             "opened": 5, "closed": 1, "evicted": 2, "steps": 9}
    unused = dict(stats, active=0, bytes=0, opened=0, closed=0, evicted_bytes=0,
                  evicted_idle=0, steps=0, sizes={})
    assert dashboard.make_sample(dict(cur, sessions=unused), prev, 1.0, 9, 1002.0)[
        "sessions"] is None  # no session yet: no panel


def test_make_sample_per_model_ids():
    """Requests keyed (method, code, model id), as a server with model_id routing may
    keep them, or a "models" block: both become the per-model series."""
    prev = {"requests": {("Compute", "OK", "enc"): 1, ("Compute", "OK", "dec"): 1},
            "latency_seconds": {}}
    cur = {"requests": {("Compute", "OK", "enc"): 5, ("Compute", "OK", "dec"): 3,
                        ("Compute", "NOT_FOUND", "dec"): 2}, "latency_seconds": {}}
    s = dashboard.make_sample(cur, prev, 1.0, 2, 2.0)
    assert s["calls"] == {"Compute": 8.0} and s["errors"] == {"NOT_FOUND": 2.0}
    assert s["models"] == {"enc": {"calls": 4.0, "errors": 0.0, "latency": None},
                           "dec": {"calls": 4.0, "errors": 2.0, "latency": None}}
    h0, h1 = _hist([0, 0, 0, 0], 0.0), _hist([0, 4, 0, 0], 0.02)
    prev = {"requests": {("Compute", "OK"): 0}, "latency_seconds": {"total": h0},
            "models": {"enc": {"requests": {("Compute", "OK"): 0},
                               "latency_seconds": {"total": h0}}}}
    cur = {"requests": {("Compute", "OK"): 4}, "latency_seconds": {"total": h1},
           "models": {"enc": {"requests": {("Compute", "OK"): 4},
                              "latency_seconds": {"total": h1}}}}
    s = dashboard.make_sample(cur, prev, 1.0, 2, 2.0)
    assert s["models"]["enc"]["calls"] == 4.0
    assert s["models"]["enc"]["latency"]["p50"] == pytest.approx(0.001 + 0.009 / 2)


def test_sampler_keeps_only_its_history():
    n = {"v": 0}

    def read():
        n["v"] += 1
        return {"requests": {("Compute", "OK"): n["v"]}, "latency_seconds": {}}

    sampler = dashboard.MetricsSampler(read, "x", interval=0.01, history=0.05)
    for _ in range(20):
        sampler.sample_once()
    snap = sampler.snapshot()
    assert snap["seq"] == 20 and len(snap["samples"]) <= 6
    assert snap["samples"][-1]["totals"]["calls"] == 20

    def broken():
        raise ConnectionRefusedError("nobody home")

    bad = dashboard.MetricsSampler(broken, "y")
    assert bad.sample_once() is None
    snap = bad.snapshot()
    assert not snap["ok"] and "nobody home" in snap["error"] and snap["samples"] == []


# -- several servers: the remote poller and its command -----------------------------------


def test_remote_dashboard_polls_several_servers_side_by_side(serve, connect):
    pytest.importorskip("prometheus_client")
    a, b = serve(Echo(), metrics_port=0), serve(Picky(), metrics_port=0)
    for _ in range(5):
        connect(a).compute(torch.ones(3))
    with pytest.raises(slc.RpcError):
        connect(b).compute(torch.ones(1))
    na, nb = settled_total(a), settled_total(b)
    with socket_closed() as dead:
        http = dashboard.remote_dashboard(
            [f"127.0.0.1:{a.metrics_port}", f"http://127.0.0.1:{b.metrics_port}/metrics",
             f"127.0.0.1:{dead}"], interval=0.2, timeout=2.0)
    try:
        url = f"http://127.0.0.1:{http.server_port}/"
        assert get(url).startswith(b"<!doctype html>")
        deadline = time.monotonic() + 30
        while True:
            data = get_json(url + "api/dashboard")
            srv = data["servers"]
            last = [s["samples"][-1]["totals"] if s["samples"] else None for s in srv]
            if (last[0] and last[0]["calls"] == na and last[1] and last[1]["calls"] == nb
                    and srv[2]["error"]):
                break
            assert time.monotonic() < deadline, data
            time.sleep(0.1)
        assert [s["name"] for s in srv] == [f"127.0.0.1:{a.metrics_port}",
                                             f"127.0.0.1:{b.metrics_port}", f"127.0.0.1:{dead}"]
        assert srv[0]["ok"] and srv[1]["ok"] and not srv[2]["ok"]
        assert last[1]["errors"] == 1
        assert srv[0]["source"] == f"http://127.0.0.1:{a.metrics_port}/metrics"
        assert "Connection refused" in srv[2]["error"] or "refused" in srv[2]["error"].lower()
        # one `after` per server
        seqs = ",".join(str(s["seq"]) for s in srv)
        again = get_json(url + f"api/dashboard?after={seqs}")["servers"]
        for before, now in zip(srv, again):
            assert all(s["seq"] > before["seq"] for s in now["samples"])
    finally:
        http.close()


class socket_closed:
    """A port on 127.0.0.1 nobody listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc: Any) -> None:
        pass


def test_metrics_url_forms():
    assert dashboard.metrics_url("h:9100") == "http://h:9100/metrics"
    assert dashboard.metrics_url("http://h:9100") == "http://h:9100/metrics"
    assert dashboard.metrics_url("https://h:1/x/metrics") == "https://h:1/x/metrics"
    assert dashboard.metrics_url("[::1]:9100") == "http://[::1]:9100/metrics"
    for bad in ("h", "ftp://h:1", "http://:80"):
        with pytest.raises(ValueError, match="bad metrics address"):
            dashboard.metrics_url(bad)


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "splitlearn_comm", *args], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _first_line(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    out: List[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not out or not out[0]:
        proc.kill()
        pytest.fail(f"no line within {timeout} s; stderr: {proc.stderr.read()}")
    return out[0].rstrip("\n")


@pytest.mark.timeout(120)
def test_cli_dashboard_command(serve, connect):
    pytest.importorskip("prometheus_client")
    a, b = serve(Echo(), metrics_port=0), serve(Echo(), metrics_port=0)
    connect(a).compute(torch.ones(2))
    proc = _cli("dashboard", f"127.0.0.1:{a.metrics_port}", f"127.0.0.1:{b.metrics_port}",
                "--port", "0", "--interval", "0.5")
    try:
        line = _first_line(proc)
        m = re.match(r"dashboard on (http://127\.0\.0\.1:\d+/) for 2 servers: ", line)
        assert m, line
        url = m.group(1)
        deadline = time.monotonic() + 30
        while True:
            srv = get_json(url + "api/dashboard")["servers"]
            if srv[0]["samples"] and srv[0]["samples"][-1]["totals"]["calls"] == 1:
                break
            assert time.monotonic() < deadline, srv
            time.sleep(0.2)
        assert len(srv) == 2 and srv[1]["ok"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    r = subprocess.run([PYTHON, "-m", "splitlearn_comm", "dashboard", "nohostport"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "bad metrics address" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(120)
def test_cli_serve_dashboard(tmp_path: Path):
    (tmp_path / "echo_mod.py").write_text(
        "import splitlearn_comm as slc\n"
        "class E(slc.ComputeFunction):\n"
        "    def compute(self, x):\n"
        "        return x\n")
    proc = subprocess.Popen([PYTHON, "-m", "splitlearn_comm", "serve", "echo_mod.py:E",
                             "--port", "0", "--dashboard"], cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _first_line(proc).startswith("serving E on 127.0.0.1:")
        line = _first_line(proc)
        m = re.match(r"dashboard on (http://127\.0\.0\.1:\d+/) ", line)
        assert m, line
        assert get(m.group(1)).startswith(b"<!doctype html>")
        assert get_json(m.group(1) + "api/dashboard")["servers"][0]["ok"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- the Grafana dashboard ------------------------------------------------------------------


def _exported_names(serve, connect, labels: Optional[set] = None) -> set:
    """The metric names a server exports; with ``labels``, their label names are
    added to it."""
    from prometheus_client import CollectorRegistry, generate_latest

    from splitlearn_comm.monitoring import ServerMetricsCollector

    fn = TrainableComputeFunction(torch.nn.Linear(2, 2), None)
    server = serve(fn)
    client = connect(server)
    client.compute(torch.ones(1, 2))
    with pytest.raises(slc.RpcError):  # so that the error counters have samples too
        client.compute(torch.ones(1, 3))
    settled_total(server)
    registry = CollectorRegistry()
    registry.register(ServerMetricsCollector(server))
    names = set()
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
            if labels is not None:
                labels.update(re.findall(r'[{,]([a-zA-Z_][a-zA-Z0-9_]*)="', line))
    return names


def test_grafana_dashboard_uses_only_exported_metrics(serve, connect):
    pytest.importorskip("prometheus_client")
    board = json.loads(GRAFANA.read_text())
    exprs: List[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(board)
    assert len(exprs) >= 8, "the Grafana dashboard has lost its panels"
    used = {n for e in exprs for n in re.findall(r"\bsplitlearn_[a-z_]+\b", e)}
    labels: set = set()
    exported = _exported_names(serve, connect, labels)
    missing = sorted(used - exported)
    assert not missing, f"the Grafana dashboard uses metrics no collector exports: {missing}"
    # and it shows every kind of metric there is
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}
    unused = sorted(f for f in families
                    if not any(n == f or n.startswith(f + "_") for n in used))
    assert not unused, f"exported but not on the Grafana dashboard: {unused}"
    # labels the panels group by exist on those metrics (Prometheus adds instance and job)
    assert {"method", "code", "stage", "le", "transport"} <= labels
    for e in exprs:
        for label in re.findall(r"by \(([^)]*)\)", e):
            for name in (x.strip() for x in label.split(",")):
                assert name in labels | {"instance", "job"}, e


# -- the page in a real browser --------------------------------------------------------------


def _png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.timeout(240)
def test_dashboard_in_headless_chromium(serve, connect, tmp_path: Path):
    exe = headless_chromium.find_chromium()
    if exe is None:
        pytest.skip("no Chromium: scripts/install-system-deps.sh installs Debian's chromium "
                    "package where it can (it could not here)")
    fn = TrainableComputeFunction(torch.nn.Linear(64, 64), lambda p: torch.optim.SGD(p, lr=0.01),
                                  max_entries=64)
    server = serve(fn, metrics_port=0, max_workers=4)
    stop = threading.Event()
    errors: List[BaseException] = []

    def load(i: int) -> None:
        try:
            client = connect(server)
            while not stop.is_set():
                x = torch.randn(8, 64, requires_grad=True)
                client.remote(x).sum().backward()  # Compute and ComputeBackward
                client.compute(torch.randn(16, 64))
                time.sleep(0.005)
        except BaseException as e:  # pragma: no cover - shown below
            errors.append(e)

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    try:
        with headless_chromium.Browser(exe, timeout=60) as browser:
            page = browser.open(server.dashboard_url, width=1280, height=900)
            # the charts have data
            page.wait_for("window.dashboard && window.dashboard.servers.length === 1 && "
                          "['calls', 'latency', 'stages', 'bytes', 'store'].every(p => "
                          "+document.querySelector(`canvas[data-panel=${p}]`).dataset.points >= 2)",
                          timeout=90)
            assert not errors, errors
            assert page.evaluate("window.dashboard.failures") == 0
            assert page.evaluate("document.querySelector('.panel[data-panel=store]')"
                                 ".classList.contains('hidden')") is False
            assert page.evaluate("document.querySelector('.panel[data-panel=sessions]')"
                                 ".classList.contains('hidden')") is True  # no sessions here
            methods = page.evaluate("Array.from(document.querySelectorAll("
                                    "'.panel[data-panel=calls] .legend span'), e => e.textContent)")
            assert any(m.startswith("Compute ") for m in methods), methods
            assert any(m.startswith("ComputeBackward ") for m in methods), methods

            # hovering a chart shows the values at that time in every chart's legend
            x, y = page.evaluate("(() => {const r = document.querySelector("
                                 "'canvas[data-panel=latency]').getBoundingClientRect(); "
                                 "return [r.left + r.width * 0.8, r.top + r.height / 2];})()")
            page.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
            page.wait_for("document.querySelectorAll('.legend .when').length >= 5", timeout=10)
            when = page.evaluate("document.querySelector('.panel[data-panel=calls] .legend "
                                 ".when').textContent")
            assert re.fullmatch(r"\d\d:\d\d:\d\d", when), when
            page.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 2, "y": 2})
            page.wait_for("document.querySelectorAll('.legend .when').length === 0", timeout=10)

            # under load: a count shown after time A lies between the server's counts at A
            # and now (the page shows the server's own counter, one refresh behind)
            before, at = total_calls(server), time.time()
            page.wait_for(f"window.dashboard.servers[0].samples.length && "
                          f"window.dashboard.servers[0].samples.at(-1).t > {at} && "
                          f"document.querySelector('[data-role=calls-total]').dataset.value",
                          timeout=60)
            shown = int(page.evaluate("+document.querySelector('[data-role=calls-total]')"
                                      ".dataset.value"))
            after = total_calls(server)
            assert before <= shown <= after, (before, shown, after)
            assert shown == page.evaluate("window.dashboard.servers[0].shownCalls")
            assert page.evaluate("document.querySelector('[data-role=calls-total]')"
                                 ".textContent") == f"{shown:,}"

            # load stopped: the page shows exactly server.metrics()' count
            stop.set()
            for t in threads:
                t.join(30)
            assert not errors, errors
            n = settled_total(server)
            page.wait_for(f"+document.querySelector('[data-role=calls-total]').dataset.value "
                          f"=== {n}", timeout=30)
            assert total_calls(server) == n
            shot = page.screenshot(str(tmp_path / "dashboard.png"))
            w, h = _png_size(Path(shot))
            assert w == 1280 and h >= 900

            # a phone screen: nothing wider than the screen
            phone = browser.open(server.dashboard_url, width=390, height=844, scale=2,
                                 mobile=True)
            phone.wait_for("window.dashboard && window.dashboard.polls >= 2 && "
                           "+document.querySelector('canvas[data-panel=calls]').dataset.points >= 2",
                           timeout=60)
            assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            width = phone.evaluate("document.querySelector('canvas[data-panel=latency]')"
                                   ".getBoundingClientRect().width")
            assert 300 <= width <= 390
            phone.screenshot(str(tmp_path / "dashboard-phone.png"))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    artifacts = os.environ.get("SPLITLEARN_TEST_ARTIFACTS")
    if artifacts:  # keep the screenshots (CI uploads them)
        os.makedirs(artifacts, exist_ok=True)
        for name in ("dashboard.png", "dashboard-phone.png"):
            (Path(artifacts) / name).write_bytes((tmp_path / name).read_bytes())


def test_pictures_the_docs_link_exist():
    """The dashboard screenshot (make dashboard-screenshot) and the benchmark figures
    (make bench-figures) are in the repository where the Markdown links them."""
    for md in (Path(ROOT) / "docs" / "monitoring.md", Path(ROOT) / "benchmarks" / "results.md"):
        links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md.read_text())
        assert links, f"{md} links no picture"
        for link in links:
            path = md.parent / link
            assert path.is_file(), f"{md.name} links {link}, which is missing"
            w, h = _png_size(path)
            assert w >= 300 and h >= 200, (link, w, h)


@pytest.mark.timeout(240)
def test_side_by_side_and_optional_panels_in_headless_chromium(serve, connect):
    """Two servers in one page: a real one read over its Prometheus endpoint, and one
    whose metrics have sessions and per-model series (as servers with sessions and
    model_id routing keep them). Side by side on a wide screen, stacked on a phone; the
    sessions and per-model panels appear only where there is such data."""
    pytest.importorskip("prometheus_client")
    exe = headless_chromium.find_chromium()
    if exe is None:
        pytest.skip("no Chromium: scripts/install-system-deps.sh installs Debian's chromium "
                    "package where it can (it could not here)")
    real = serve(Echo(), metrics_port=0)
    client = connect(real)
    n = {"v": 0}

    def with_models() -> Dict[str, Any]:
        n["v"] += 1
        v = n["v"]
        h = {"buckets": [(0.001, 3 * v), (0.01, 4 * v), (float("inf"), 4 * v)], "count": 4 * v,
             "sum": 0.01 * v}
        return {"requests": {("Compute", "OK"): 4 * v},
                "in_flight": 1, "latency_seconds": {"total": h}, "request_bytes": 100 * v,
                "response_bytes": 100 * v, "store": None,
                "sessions": {"active": 2 + v % 3, "bytes": 1000 * v},
                "models": {"encoder": {"requests": {("Compute", "OK"): 3 * v},
                                       "latency_seconds": {"total": h}},
                           "decoder": {"requests": {("Compute", "OK"): v},
                                       "latency_seconds": {"total": h}}}}

    samplers = [dashboard.MetricsSampler(dashboard.prometheus_source(
                    dashboard.metrics_url(f"127.0.0.1:{real.metrics_port}")),
                    name="real", interval=0.5),
                dashboard.MetricsSampler(with_models, name="synthetic", interval=0.5)]
    http = dashboard.DashboardHTTPServer(samplers).start()
    try:
        url = f"http://127.0.0.1:{http.server_port}/"
        with headless_chromium.Browser(exe, timeout=60) as browser:
            page = browser.open(url, width=1280, height=900)
            for _ in range(5):
                client.compute(torch.ones(4))
            page.wait_for("window.dashboard && window.dashboard.servers.length === 2 && "
                          "Array.from(document.querySelectorAll('section.server canvas"
                          "[data-panel=calls]')).every(c => +c.dataset.points >= 2) && "
                          "+document.querySelector('section[data-index=\"1\"] canvas"
                          "[data-panel=models]').dataset.points >= 2", timeout=90)

            def shown(index: int, panel: str) -> bool:
                return not page.evaluate(
                    f"document.querySelector('section[data-index=\"{index}\"] "
                    f".panel[data-panel={panel}]').classList.contains('hidden')")

            for panel in ("sessions", "models", "models_p99"):
                assert not shown(0, panel) and shown(1, panel), panel
            assert not shown(0, "store") and not shown(1, "store")
            legend = page.evaluate("document.querySelector('section[data-index=\"1\"] "
                                   ".panel[data-panel=models] .legend').textContent")
            assert "encoder" in legend and "decoder" in legend
            boxes = page.evaluate("Array.from(document.querySelectorAll('section.server'), "
                                  "e => {const r = e.getBoundingClientRect(); "
                                  "return [r.left, r.top, r.width];})")
            assert boxes[0][1] == boxes[1][1] and boxes[1][0] > boxes[0][0] + boxes[0][2] - 1
            assert page.evaluate("document.title") == "real, synthetic · splitlearn-comm"

            phone = browser.open(url, width=390, height=844, scale=2, mobile=True)
            phone.wait_for("window.dashboard && window.dashboard.servers.length === 2", 60)
            boxes = phone.evaluate("Array.from(document.querySelectorAll('section.server'), "
                                   "e => {const r = e.getBoundingClientRect(); "
                                   "return [r.left, r.top, r.width, r.height];})")
            assert boxes[1][1] >= boxes[0][1] + boxes[0][3]  # stacked
            assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        http.close()
