"""Moving from the earlier pure-Python splitlearn-comm (issue 12, docs/migrating.md):
the names, arguments and methods its users relied on, and model_id routing (several
compute functions on one server)."""
from __future__ import annotations

import logging

import grpc
import pytest
torch = pytest.importorskip("torch", reason="needs torch, an optional extra "
                            "(pip install splitlearn-comm[torch])")

import splitlearn_comm as slc
from conftest import Echo

pytestmark = pytest.mark.timeout(60)


class Mul(slc.ComputeFunction):
    def __init__(self, k: float) -> None:
        self.k = k
        self.events = []

    def compute(self, input_tensor):
        return input_tensor * self.k

    def get_info(self):
        return {"name": f"times {self.k}", "k": self.k}

    def setup(self):
        self.events.append("setup")

    def teardown(self):
        self.events.append("teardown")


# -- names and arguments ---------------------------------------------------------------------


def test_compressed_codec_is_importable_from_core(serve, connect):
    from splitlearn_comm.core import CompressedTensorCodec, TensorCodec

    assert CompressedTensorCodec is slc.CompressedTensorCodec
    codec = CompressedTensorCodec(compression_level=6)
    assert isinstance(codec, TensorCodec)
    x = torch.zeros(64, 64)
    data, shape, meta = codec.encode(x)
    assert len(bytes(data)) < x.numel() * 4
    torch.testing.assert_close(codec.decode(data, shape, meta), x)
    client = connect(serve(Echo()), codec=codec)
    torch.testing.assert_close(client.compute(x), x)
    with pytest.raises(ImportError):
        from splitlearn_comm.core import NoSuchThing  # noqa: F401


def test_max_message_length_limits_the_server(serve, connect):
    server = serve(Echo(), max_message_length=4096)
    client = connect(server)
    assert client.compute(torch.ones(256)).shape == (256,)  # ~1 KiB
    with pytest.raises(grpc.RpcError) as info:
        client.compute(torch.ones(4096))  # 16 KiB
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_max_message_length_limits_the_client(serve, connect):
    class Big(slc.ComputeFunction):
        def compute(self, input_tensor):
            return torch.ones(4096)

    client = connect(serve(Big()), max_message_length=4096)
    assert ("grpc.max_receive_message_length", 4096) in client.options
    with pytest.raises(grpc.RpcError) as info:
        client.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # options the caller set win over max_message_length
    explicit = slc.GRPCComputeClient("127.0.0.1:1", max_message_length=10,
                                     options=[("grpc.max_receive_message_length", 99)])
    assert explicit.options == [("grpc.max_receive_message_length", 99),
                                ("grpc.max_send_message_length", 10)]
    explicit.close()
    with pytest.raises(ValueError, match="max_message_length"):
        slc.GRPCComputeClient("127.0.0.1:1", max_message_length=0)


def test_compute_with_timing(serve, connect):
    client = connect(serve(Mul(2.0)))
    out, timing = client.compute_with_timing(torch.ones(3))
    assert out.tolist() == [2.0, 2.0, 2.0]
    assert set(timing) == {"network_total_ms", "server_compute_ms", "network_overhead_ms"}
    assert all(isinstance(v, float) and v >= 0 for v in timing.values())
    assert timing["network_total_ms"] >= timing["server_compute_ms"]


def test_compute_with_a_model_id_as_second_argument_says_what_to_write(echo_client):
    with pytest.raises(TypeError, match=r"model_id='decoder'"):
        echo_client.compute(torch.ones(1), "decoder")


def test_compute_backward_with_a_forward_id(serve, connect):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(layer.state_dict())
    client = connect(serve(slc.TrainableComputeFunction(layer)))
    x = torch.randn(2, 4)
    # the training forward the earlier library sent with compute_with_cache(training_mode=True)
    y = client._tensor_call(x, forward_id="step-1", training_mode=True)
    g = torch.randn(2, 3)
    grad_x = client.compute_backward(g, "step-1")
    xr = x.clone().requires_grad_(True)
    reference(xr).backward(g)
    torch.testing.assert_close(y, reference(x).detach())
    torch.testing.assert_close(grad_x, xr.grad)
    with pytest.raises(grpc.RpcError) as info:
        client.compute_backward(g, "never-sent")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ValueError, match="forward_id"):
        client.compute_backward(g, "")


# -- model_id: several compute functions on one server ------------------------------------


def test_model_id_routes_to_its_function(serve, connect):
    enc, dec = Mul(2.0), Mul(3.0)
    server = serve({"encoder": enc, "decoder": dec})
    assert enc.events == dec.events == ["setup"]
    client = connect(server)
    assert client.compute(torch.ones(2), model_id="encoder").tolist() == [2.0, 2.0]
    assert client.compute(torch.ones(2), model_id="decoder").tolist() == [3.0, 3.0]
    # a client-wide default, overridden per call
    default = connect(server, model_id="decoder")
    assert default.compute(torch.ones(1)).tolist() == [3.0]
    assert default.compute(torch.ones(1), model_id="encoder").tolist() == [2.0]
    out, _ = default.compute_with_timing(torch.ones(1), "encoder")
    assert out.tolist() == [2.0]
    info = client.get_service_info()
    assert info["service_name"] == "splitlearn.comm.ComputeService"
    assert info["custom_info"]["models"] == "encoder,decoder"
    assert info["custom_info"]["decoder.name"] == "times 3.0"
    assert info["custom_info"]["encoder.k"] == "2.0"
    server.stop(grace=0)
    assert enc.events == dec.events == ["setup", "teardown"]


def test_unknown_or_missing_model_id(serve, connect):
    client = connect(serve({"encoder": Mul(2.0), "decoder": Mul(3.0)}))
    with pytest.raises(grpc.RpcError) as info:
        client.compute(torch.ones(1), model_id="classifier")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'classifier'" in info.value.details()
    assert "'decoder', 'encoder'" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'decoder', 'encoder'" in info.value.details()
    # the server keeps serving
    assert client.compute(torch.ones(1), model_id="decoder").tolist() == [3.0]


def test_one_function_keeps_todays_behaviour(serve, connect):
    server = serve(Mul(2.0))
    client = connect(server)
    assert client.compute(torch.ones(1), model_id="anything").tolist() == [2.0]
    assert "models" not in server.metrics()
    only = connect(serve({"only": Mul(5.0)}))
    assert only.compute(torch.ones(1)).tolist() == [5.0]  # no id needed with one entry


def test_bad_model_maps():
    with pytest.raises(ValueError, match="empty"):
        slc.GRPCComputeServer({})
    with pytest.raises(TypeError, match="model ids"):
        slc.GRPCComputeServer({1: Echo()})
    with pytest.raises(TypeError, match=r"compute_fn\['head'\].*ModelComputeFunction"):
        slc.GRPCComputeServer({"head": torch.nn.Linear(1, 1)})


def test_metrics_per_model(serve, connect):
    class Fails(slc.ComputeFunction):
        def compute(self, input_tensor):
            raise RuntimeError("no")

    server = serve({"ok": Mul(1.0), "bad": Fails()})
    client = connect(server)
    for _ in range(3):
        client.compute(torch.ones(1), model_id="ok")
    logging.getLogger("splitlearn_comm.server").disabled = True
    try:
        with pytest.raises(grpc.RpcError):
            client.compute(torch.ones(1), model_id="bad")
    finally:
        logging.getLogger("splitlearn_comm.server").disabled = False
    models = server.metrics()["models"]
    assert models["ok"]["requests"] == {("Compute", "OK"): 3}
    assert models["bad"]["requests"] == {("Compute", "INTERNAL"): 1}
    assert models["ok"]["compute_seconds"] >= 0.0
    prometheus = pytest.importorskip("prometheus_client")
    from splitlearn_comm.monitoring import ServerMetricsCollector

    registry = prometheus.CollectorRegistry()
    registry.register(ServerMetricsCollector(server))
    assert registry.get_sample_value("splitlearn_model_requests_total",
                                     {"model": "ok", "method": "Compute", "code": "OK"}) == 3
    assert registry.get_sample_value("splitlearn_model_requests_total",
                                     {"model": "bad", "method": "Compute",
                                      "code": "INTERNAL"}) == 1


def test_training_per_model(serve, connect):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    a0 = [p.detach().clone() for p in a.parameters()]
    b0 = [p.detach().clone() for p in b.parameters()]
    server = serve({"a": slc.TrainableComputeFunction(a, lambda p: torch.optim.SGD(p, lr=0.1)),
                    "b": slc.TrainableComputeFunction(b, lambda p: torch.optim.SGD(p, lr=0.1))})
    client = connect(server, model_id="b")
    model = torch.nn.Sequential(slc.RemoteModule(client)).train()
    x = torch.randn(4, 3, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.shape == (4, 3)
    # only b stepped
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), a0))
    assert not all(torch.equal(p, q) for p, q in zip(b.parameters(), b0))
    assert server.metrics()["models"]["b"]["requests"] == {("Compute", "OK"): 1,
                                                           ("ComputeBackward", "OK"): 1}
    assert server.metrics()["models"]["a"]["requests"] == {}


# -- what is gone says what replaced it ------------------------------------------------------


def test_names_that_are_gone_say_what_replaced_them():
    with pytest.raises(ImportError, match=r"no grpcio servicer.*docs/migrating\.md"):
        from splitlearn_comm import AsyncComputeServicer  # noqa: F401
    from splitlearn_comm import AsyncGRPCComputeServer, serve_async  # noqa: F401  (back)
    with pytest.raises(ImportError, match=r"GRPCComputeServer\(compute_fn, port=port"):
        from splitlearn_comm import serve  # noqa: F401
    with pytest.raises(ImportError, match="KVCacheCodec"):
        from splitlearn_comm.core import KVCacheCodec  # noqa: F401
    assert not hasattr(slc, "ComputeServicer")  # feature tests still work
    with pytest.raises(AttributeError, match="no grpcio servicer"):
        slc.ComputeServicer  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        slc.Nope  # noqa: B018
    client = slc.GRPCComputeClient("127.0.0.1:1")
    with pytest.raises(AttributeError, match=r"metrics_port=.*docs/migrating\.md"):
        client.get_server_monitoring_data()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        client.nope  # noqa: B018
    client.close()


def test_positional_arguments_of_the_earlier_signatures_are_refused_clearly():
    with pytest.raises(TypeError, match="max_message_length=..."):
        slc.GRPCComputeServer(Echo(), "127.0.0.1", 0, 10, 100 * 1024 * 1024)


def test_exponential_backoff_multiplier():
    policy = slc.ExponentialBackoff(initial_delay=0.5, max_delay=100.0, jitter=0.0, multiplier=3.0)
    assert [policy.delay(n) for n in range(3)] == [0.5, 1.5, 4.5]
    assert slc.ExponentialBackoff(jitter=0.0).delay(2) == 4.0
    with pytest.raises(ValueError, match="multiplier"):
        slc.ExponentialBackoff(multiplier=0.5)


def test_the_c_retry_loop_uses_the_multiplier(caplog):
    client = slc.GRPCComputeClient("127.0.0.1:1", timeout=30, retry_strategy=slc.ExponentialBackoff(
        max_retries=2, initial_delay=0.01, jitter=0.0, multiplier=5.0))
    with client, caplog.at_level(logging.WARNING, logger="splitlearn_comm"):
        with pytest.raises(grpc.RpcError):
            client.compute(torch.ones(1))
    delays = [r.getMessage().split(" in ")[1].split(" s:")[0] for r in caplog.records
              if r.getMessage().startswith("retrying")]
    assert delays == ["0.01", "0.05"]
