"""deploy/: the Kubernetes manifests and the Dockerfile agree with the server
(docs/deploy.md). The manifests are parsed; their ports, probes, annotations and
timings are checked against the CLI that the container runs and against a real
server answering the probes the way the kubelet and Prometheus ask them."""
import inspect
import os
import re
import urllib.request

import grpc
import pytest
import yaml

from splitlearn_comm import ComputeFunction, GRPCComputeServer, cli

from conftest import INSTALLED, NEEDS_TORCH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")


def _load(name):
    with open(os.path.join(DEPLOY, "kubernetes", name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@pytest.fixture(scope="module")
def deployment():
    (doc,) = _load("deployment.yaml")
    assert doc["kind"] == "Deployment" and doc["apiVersion"] == "apps/v1"
    return doc


@pytest.fixture(scope="module")
def container(deployment):
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def serve_args(container):
    """The container's args as the image's entry point (`splitlearn-comm serve`) reads them."""
    return cli.build_parser().parse_args(["serve", *container["args"]])


def _port(container, name):
    (p,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return p


class Echo(ComputeFunction):
    def compute(self, x):
        return x


def _check(channel, service=""):
    body = b"" if not service else b"\x0a" + bytes([len(service)]) + service.encode()
    reply = channel.unary_unary("/grpc.health.v1.Health/Check")(body, timeout=10)
    return {b"\x08\x01": "SERVING", b"\x08\x02": "NOT_SERVING"}[reply]


def test_ports_match_the_server_defaults_and_the_args(container, serve_args):
    defaults = cli.build_parser().parse_args(["serve", "m:o"])
    server_default = inspect.signature(GRPCComputeServer).parameters["port"].default
    assert serve_args.port == defaults.port == server_default == _port(container, "grpc")
    assert serve_args.host == "0.0.0.0"  # the kubelet probes the pod's IP
    assert serve_args.metrics_port == _port(container, "metrics")


def test_probes_ask_grpc_health_on_the_grpc_port(container, serve_args):
    ready, live, startup = (container[k] for k in ("readinessProbe", "livenessProbe",
                                                   "startupProbe"))
    for probe in (ready, live, startup):
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}
        assert probe["grpc"]["port"] == serve_args.port
    assert ready["grpc"].get("service", "") == ""
    assert live["grpc"]["service"] == startup["grpc"]["service"] == "liveness"


def test_probes_behave_as_meant_on_a_real_server(container):
    """Readiness follows NOT_SERVING (drain, set_health); liveness does not."""
    ready = container["readinessProbe"]["grpc"].get("service", "")
    live = container["livenessProbe"]["grpc"]["service"]
    server = GRPCComputeServer(Echo(), host="127.0.0.1", port=0).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            assert _check(ch, ready) == _check(ch, live) == "SERVING"
            server.set_health(False)
            assert _check(ch, ready) == "NOT_SERVING" and _check(ch, live) == "SERVING"
    finally:
        server.stop(1.0)


def test_prometheus_annotations_point_at_the_metrics_endpoint(deployment, serve_args):
    pytest.importorskip("prometheus_client")
    notes = deployment["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == serve_args.metrics_port
    server = GRPCComputeServer(Echo(), host="127.0.0.1", port=0, metrics_port=0).start()
    try:
        url = f"http://127.0.0.1:{server.metrics_port}{notes['prometheus.io/path']}"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and b"splitlearn" in r.read()
    finally:
        server.stop(1.0)


def test_graceful_stop_fits_the_termination_grace_period(deployment, container, serve_args):
    spec = deployment["spec"]["template"]["spec"]
    assert serve_args.drain_delay > 0 and serve_args.grace > 0
    assert spec["terminationGracePeriodSeconds"] > serve_args.drain_delay + serve_args.grace
    command = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in command    # SIGTERM to the server, PID 1 in the image
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_resources_are_requested(container):
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]


def test_the_headless_service_selects_the_replicas(deployment, container):
    (svc,) = _load("service.yaml")
    assert svc["kind"] == "Service" and svc["spec"]["clusterIP"] == "None"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in svc["spec"]["ports"]:
        assert names[port["targetPort"]] == port["port"]


def test_the_served_target_loads(container, monkeypatch):
    pytest.importorskip("torch", reason=f"deploy/model.py builds a torch model; {NEEDS_TORCH}")
    monkeypatch.syspath_prepend(DEPLOY)
    fn, name = cli.resolve_target(container["args"][0])
    assert callable(getattr(fn, "compute", None)) and name


@pytest.mark.skipif(INSTALLED, reason="checks the source tree the Dockerfile copies; this "
                                      "run tests an installed wheel from a copy without it")
def test_the_dockerfile_builds_the_wheel_and_serves_it(container, serve_args):
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = f.read()
    assert "pip wheel" in text and "/tmp/dist/*.whl" in text
    assert "torch==2.13.0" in text
    assert re.search(r'^ENTRYPOINT \["splitlearn-comm", "serve"\]$', text, re.M)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M)
               for p in line.split()}
    assert {serve_args.port, serve_args.metrics_port} <= exposed
    for src in re.findall(r"^COPY (?!--)(\S+) ", text, re.M):
        assert os.path.exists(os.path.join(ROOT, src)), src
    assert container["image"].startswith("splitlearn-comm-server:")
