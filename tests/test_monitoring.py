"""The server's own metrics (kept in C), Prometheus, the access log, service info."""
from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request

import grpc
import pytest

import splitlearn_comm as slc
from conftest import Echo, NEEDS_TORCH

torch = pytest.importorskip("torch", reason=NEEDS_TORCH)


def settled(server: slc.GRPCComputeServer, calls: int, timeout: float = 5.0) -> dict:
    """The server's metrics once `calls` calls are counted: a call is counted just
    after its status went out, so the client may see the answer a moment earlier."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if sum(m["requests"].values()) >= calls or time.monotonic() > deadline:
            return m
        time.sleep(0.005)


def test_metrics_count_calls_by_method_and_code(serve, connect):
    class Picky(slc.ComputeFunction):
        def compute(self, x):
            if x.numel() == 1:
                slc.current_call().abort(grpc.StatusCode.INVALID_ARGUMENT, "one is too few")
            return x

    server = serve(Picky())
    client = connect(server)
    for _ in range(3):
        client.compute(torch.ones(8))
    with pytest.raises(slc.RpcError):
        client.compute(torch.ones(1))
    assert client.health_check()
    m = settled(server, 5)
    assert m["requests"][("Compute", "OK")] == 3
    assert m["requests"][("Compute", "INVALID_ARGUMENT")] == 1
    assert m["requests"][("HealthCheck", "OK")] == 1
    assert m["in_flight"] == 0
    total = m["latency_seconds"]["total"]
    assert total["count"] == 4 and total["sum"] > 0
    assert total["buckets"][-1] == (float("inf"), 4)  # cumulative
    assert set(m["latency_seconds"]) == {"receive", "decode", "queue", "compute", "encode",
                                         "send", "total"}
    assert m["request_bytes"] >= 3 * 32 and m["response_bytes"] >= 3 * 32


def test_latency_of_forward_and_backward_apart(serve, connect):
    """A training server's histograms, by method: the forward passes under Compute,
    the backward passes under ComputeBackward, and both together as before."""
    from prometheus_client import CollectorRegistry

    from splitlearn_comm.monitoring import ServerMetricsCollector

    torch.manual_seed(0)
    server = serve(slc.TrainableComputeFunction(torch.nn.Linear(4, 3), None))
    client = connect(server)
    for _ in range(2):
        x = torch.randn(5, 4, requires_grad=True)
        client.remote(x, training=True).sum().backward()
        assert x.grad is not None
    client.compute(torch.randn(5, 4))  # an inference call: Compute too
    m = settled(server, 5)
    by_method = m["latency_seconds_by_method"]
    assert set(by_method) == {"Compute", "ComputeBackward"}
    assert by_method["Compute"]["total"]["count"] == 3
    assert by_method["ComputeBackward"]["total"]["count"] == 2
    assert by_method["ComputeBackward"]["compute"]["sum"] > 0
    for stage in m["latency_seconds"]:
        both = [by_method[k][stage] for k in by_method]
        assert m["latency_seconds"][stage]["count"] == sum(h["count"] for h in both)
        assert m["latency_seconds"][stage]["sum"] == pytest.approx(sum(h["sum"] for h in both))
    registry = CollectorRegistry()
    registry.register(ServerMetricsCollector(server))
    assert registry.get_sample_value("splitlearn_call_duration_seconds_count",
                                     {"method": "ComputeBackward", "stage": "total"}) == 2


def test_prometheus_collector(serve, connect):
    from prometheus_client import CollectorRegistry, generate_latest

    from splitlearn_comm.monitoring import ServerMetricsCollector

    server = serve(Echo())
    connect(server).compute(torch.ones(4))
    settled(server, 1)
    registry = CollectorRegistry()
    registry.register(ServerMetricsCollector(server, labels={"server": "tail"}))
    text = generate_latest(registry).decode()
    assert 'splitlearn_requests_total{code="OK",method="Compute",server="tail"} 1.0' in text
    assert ('splitlearn_call_duration_seconds_count{method="Compute",server="tail",'
            'stage="compute"} 1.0') in text
    assert ('splitlearn_call_duration_seconds_bucket{le="+Inf",method="Compute",server="tail",'
            'stage="total"} 1.0') in text
    assert ('splitlearn_call_duration_seconds_count{method="ComputeBackward",server="tail",'
            'stage="total"} 0.0') in text
    assert "splitlearn_in_flight_requests" in text and "splitlearn_request_bytes_total" in text
    assert 'splitlearn_transport_requests_total{server="tail",transport="unary"} 1.0' in text
    assert 'splitlearn_transport_requests_total{server="tail",transport="stream"} 0.0' in text


def test_metrics_port_serves_metrics(serve, connect):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(Echo(), metrics_port=port)
    connect(server).compute(torch.ones(2))
    settled(server, 1)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'splitlearn_requests_total{code="OK",method="Compute"} 1.0' in body


def test_access_log_json_lines(serve, connect, caplog):
    logger = logging.getLogger("test.access")
    server = serve(Echo(), access_log=logger)
    client = connect(server)
    with caplog.at_level(logging.INFO, logger="test.access"):
        client.compute(torch.ones(2, 3), metadata=[("x", "y")])
        client.compute(torch.ones(5, dtype=torch.int64))
        server.stop(grace=1)  # writes what is queued
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "test.access"]
    assert len(lines) == 2
    # two workers each record their call once it has ended: in either order
    first = next(line for line in lines if line["input_dtype"] == "float32")
    assert first["method"] == "/splitlearn.comm.ComputeService/Compute"
    assert first["status"] == "OK" and first["peer"].startswith("ipv4:127.0.0.1")
    assert first["input_shape"] == [2, 3] and first["input_dtype"] == "float32"
    assert first["output_shape"] == [2, 3] and first["codec"] == "raw"
    assert first["bytes_in"] > 24 and first["request_id"] == 1
    assert set(first["durations_ms"]) >= {"decode", "compute", "total"}
    assert first["transport"] == "unary"
    assert sorted(line["input_dtype"] for line in lines) == ["float32", "int64"]


def test_get_info_values_of_any_type(serve, connect):
    class Info(slc.ComputeFunction):
        def compute(self, x):
            return x

        def get_info(self):
            return {"layers": 3, "lr": 0.1, "tags": ["a", "b"], "ok": True}

    info = connect(serve(Info())).get_service_info()["custom_info"]
    assert info == {"layers": "3", "lr": "0.1", "tags": "['a', 'b']", "ok": "True"}


def test_get_info_raising_is_a_clear_error_not_a_dead_server(serve, connect):
    class Broken(slc.ComputeFunction):
        def compute(self, x):
            return x

        def get_info(self):
            raise RuntimeError("no info today")

    client = connect(serve(Broken()))
    with pytest.raises(slc.RpcError) as info:
        client.get_service_info()
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "get_info() failed" in info.value.details() and "no info today" in info.value.details()
    assert torch.equal(client.compute(torch.ones(1)), torch.ones(1))
