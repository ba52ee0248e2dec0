"""What a new user hit in a first afternoon (issue 12): lost shapes, silent server
errors, retries nobody saw, addresses and timeouts taken at their word, and models
that could not be copied. Each test failed before its fix."""
from __future__ import annotations

import copy
import io
import logging
import pickle
import re
import socket

import grpc
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="needs torch, an optional extra "
                            "(pip install splitlearn-comm[torch])")

import splitlearn_comm as slc
from conftest import Echo


class Returns(slc.ComputeFunction):
    """Returns a fixed value, whatever the input."""

    def __init__(self, value):
        self.value = value

    def compute(self, input_tensor):
        return self.value


class Raises(slc.ComputeFunction):
    def compute(self, input_tensor):
        raise ZeroDivisionError("the model divided by zero")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- shapes are kept exactly -----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value, dtype", [
    (np.array(3.5), np.float64),
    (np.float32(2.5), np.float32),
    (np.int16(-4), np.int16),
    (7, np.int64),
    (1.5, np.float64),
    (True, np.bool_),
    (torch.tensor(2.0), np.float32),
])
def test_a_0d_result_comes_back_0d(serve, connect, value, dtype):
    client = connect(serve(Returns(value)))
    out = client.compute(torch.zeros(3))
    assert isinstance(out, torch.Tensor) and out.shape == ()
    assert out.item() == pytest.approx(float(np.asarray(value)))
    out = client.compute(np.zeros(3, dtype=np.float32))
    assert isinstance(out, np.ndarray) and out.shape == () and out.dtype == dtype


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [np.array(1.25, dtype=np.float32), np.float32(1.25)])
def test_a_0d_numpy_request_arrives_0d(echo_client, value):
    out = echo_client.compute(value)
    assert out.shape == () and out.dtype == np.float32 and float(out) == 1.25


@pytest.mark.timeout(60)
def test_non_contiguous_numpy_is_still_sent_by_value(echo_client):
    a = np.arange(12, dtype=np.float32).reshape(3, 4).T
    np.testing.assert_array_equal(echo_client.compute(a), a)


# -- input that cannot be sent ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("array", [np.array(["a", "b"]), np.array([object(), None]),
                                   np.array([b"x"]), np.zeros(2, dtype="datetime64[s]")])
def test_numpy_arrays_of_non_numbers_are_a_type_error(echo_client, array):
    with pytest.raises(TypeError, match=re.escape(f"dtype {array.dtype} cannot be sent")):
        echo_client.compute(array)
    assert echo_client.compute(np.ones(2, np.float32)).tolist() == [1.0, 1.0]


@pytest.mark.timeout(60)
def test_a_compute_returning_strings_is_internal_and_named(serve, connect, caplog):
    client = connect(serve(Returns(np.array(["a"]))))
    with caplog.at_level(logging.ERROR, logger="splitlearn_comm"):
        with pytest.raises(grpc.RpcError) as info:
            client.compute(torch.zeros(1))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "TypeError" in info.value.details() and "<U1" in info.value.details()


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_a_nested_tensor_is_a_type_error_that_names_it(echo_client, layout):
    nt = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)], layout=layout)
    with pytest.raises(TypeError, match="nested"):
        echo_client.compute(nt)


def test_serving_an_nn_module_suggests_model_compute_function():
    with pytest.raises(TypeError, match=r"ModelComputeFunction\(model\)"):
        slc.GRPCComputeServer(torch.nn.Linear(2, 2), host="127.0.0.1", port=0)
    with pytest.raises(TypeError, match="got int"):
        slc.GRPCComputeServer(3, host="127.0.0.1", port=0)


# -- timeouts and retry strategies ----------------------------------------------------------


def test_circuit_breaker_delay():
    assert slc.CircuitBreaker().delay(0) == 0.0
    inner = slc.FixedDelay(max_retries=2, delay=0.5)
    assert slc.CircuitBreaker(strategy=inner).delay(3) == 0.5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", [-1, -0.001, float("nan")])
def test_a_negative_timeout_is_a_value_error(echo_client, bad):
    with pytest.raises(ValueError, match="timeout"):
        slc.GRPCComputeClient("127.0.0.1:50051", timeout=bad)
    with pytest.raises(ValueError, match="timeout"):
        echo_client.compute(torch.ones(1), timeout=bad)
    with pytest.raises(ValueError, match="timeout"):
        echo_client.connect(timeout=bad)
    with pytest.raises(ValueError, match="timeout"):
        echo_client.health_check(timeout=bad)
    with pytest.raises(ValueError, match="attempt_timeout"):
        slc.ExponentialBackoff(attempt_timeout=bad)
    with pytest.raises(ValueError, match="attempt_timeout"):
        slc.FixedDelay(attempt_timeout=bad)
    # None and 0 keep their meaning (no deadline); a good call still works
    assert echo_client.compute(torch.ones(1), timeout=None).tolist() == [1.0]


# -- the server says what went wrong ----------------------------------------------------


def _errors(caplog) -> list:
    return [r for r in caplog.records
            if r.levelno == logging.ERROR and r.name.startswith("splitlearn_comm")]


@pytest.mark.timeout(60)
def test_an_exception_in_compute_is_logged_once_per_call_with_its_traceback(serve, connect,
                                                                               caplog):
    client = connect(serve(Raises()))
    with caplog.at_level(logging.ERROR, logger="splitlearn_comm"):
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as info:
                client.compute(torch.ones(1))
            assert info.value.code() == grpc.StatusCode.INTERNAL
    errors = _errors(caplog)
    assert len(errors) == 2, [r.getMessage() for r in errors]
    for r in errors:
        assert r.getMessage().startswith("Exception calling application")
        assert "ZeroDivisionError" in r.getMessage()
        assert r.exc_info is not None and r.exc_info[0] is ZeroDivisionError
        assert "the model divided by zero" in caplog.text


@pytest.mark.timeout(60)
def test_a_chosen_status_is_not_logged_as_an_error(serve, connect, caplog):
    class Refuses(slc.ComputeFunction):
        def compute(self, input_tensor):
            slc.current_call().abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input")

    client = connect(serve(Refuses()))
    with caplog.at_level(logging.ERROR, logger="splitlearn_comm"):
        with pytest.raises(grpc.RpcError):
            client.compute(torch.ones(1))
    assert _errors(caplog) == []


@pytest.mark.timeout(60)
def test_an_exception_in_an_interceptor_is_logged_once(serve, connect, caplog):
    class Broken(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):
            raise KeyError("no such tenant")

    client = connect(serve(Echo(), interceptors=[Broken()]))
    with caplog.at_level(logging.ERROR, logger="splitlearn_comm"):
        with pytest.raises(grpc.RpcError) as info:
            client.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    errors = _errors(caplog)
    assert len(errors) == 1
    assert errors[0].getMessage().startswith("Exception calling application")
    assert errors[0].exc_info[0] is KeyError


@pytest.mark.timeout(60)
def test_metrics_port_0_logs_the_bound_port(serve, caplog):
    pytest.importorskip("prometheus_client")
    with caplog.at_level(logging.INFO, logger="splitlearn_comm"):
        server = serve(Echo(), metrics_port=0)
    assert server.metrics_port != 0
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    assert server.metrics_url == url
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.endswith(f"metrics on {url}") for m in messages
               if not m.startswith("serving ")), messages
    serving = [m for m in messages if m.startswith("serving ")]
    assert serving and serving[-1].endswith(f", metrics on {url}"), serving


# -- the client says what went wrong ------------------------------------------------------


@pytest.mark.timeout(60)
def test_each_retry_is_logged_at_warning(caplog):
    port = closed_port()
    client = slc.GRPCComputeClient(f"127.0.0.1:{port}", timeout=30,
                                   retry_strategy=slc.FixedDelay(max_retries=2, delay=0.01))
    with client, caplog.at_level(logging.WARNING, logger="splitlearn_comm"):
        with pytest.raises(grpc.RpcError) as info:
            client.compute(torch.ones(1))
    assert info.value.attempts == 3
    retries = [r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING and r.getMessage().startswith("retrying")]
    assert len(retries) == 2, retries
    for n, message in enumerate(retries, start=1):
        assert "/splitlearn.comm.ComputeService/Compute" in message
        assert f"attempt {n} failed with UNAVAILABLE" in message
        assert "in 0.01 s" in message


@pytest.mark.timeout(60)
def test_each_retry_of_an_async_call_is_logged_at_warning(caplog):
    port = closed_port()
    client = slc.GRPCComputeClient(f"127.0.0.1:{port}", timeout=30,
                                   retry_strategy=slc.FixedDelay(max_retries=2, delay=0.01))
    with client, caplog.at_level(logging.WARNING, logger="splitlearn_comm"):
        with pytest.raises(grpc.RpcError) as info:
            client.compute_async(torch.ones(1)).result(30)
    assert info.value.attempts == 3
    retries = [r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING and r.getMessage().startswith("retrying")]
    assert len(retries) == 2, retries
    for n, message in enumerate(retries, start=1):
        assert "/splitlearn.comm.ComputeService/Compute" in message
        assert f"attempt {n} failed with UNAVAILABLE" in message


@pytest.mark.timeout(60)
def test_a_python_run_of_a_builtin_strategy_logs_its_retries_too(caplog):
    calls = []

    def attempt():
        calls.append(1)
        raise slc.RpcError(grpc.StatusCode.UNAVAILABLE, "down", method="/m", target="t")

    with caplog.at_level(logging.WARNING, logger="splitlearn_comm"):
        with pytest.raises(grpc.RpcError):
            slc.FixedDelay(max_retries=1, delay=0.0).execute(attempt)
    assert len(calls) == 2
    assert any("attempt 1 failed with UNAVAILABLE: down" in r.getMessage()
               for r in caplog.records)


@pytest.mark.timeout(60)
def test_a_name_that_does_not_resolve_is_not_retried():
    client = slc.GRPCComputeClient("no-such-host.invalid:50051", timeout=30,
                                   retry_strategy=slc.FixedDelay(max_retries=3, delay=5.0))
    with client:
        with pytest.raises(grpc.RpcError) as info:
            client.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details().startswith("DNS resolution failed")
    assert info.value.attempts == 1


@pytest.mark.parametrize("address", ["http://127.0.0.1:50051", "https://example.org:443",
                                     "grpc://host:1"])
def test_an_address_with_a_url_scheme_is_refused(address):
    with pytest.raises(ValueError, match=r"bad address .*expected HOST:PORT") as info:
        slc.GRPCComputeClient(address)
    assert "not a gRPC scheme" in str(info.value)


@pytest.mark.parametrize("address", ["dns:///127.0.0.1:50051", "ipv4:127.0.0.1:50051",
                                     "passthrough:///127.0.0.1:50051",
                                     "unix:/tmp/sl.sock", "localhost:50051", "[::1]:50051"])
def test_grpc_targets_still_pass(address):
    slc.GRPCComputeClient(address).close()


@pytest.mark.timeout(60)
def test_wait_for_ready_timeout_says_why(connect):
    client = slc.GRPCComputeClient(f"127.0.0.1:{closed_port()}", timeout=1.0,
                                   retry_strategy=None, wait_for_ready=True)
    with client:
        with pytest.raises(grpc.RpcError) as info:
            client.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "last connectivity error" in info.value.details()
    assert "connection refused" in info.value.details().lower()


@pytest.mark.timeout(60)
def test_wait_for_ready_timeout_on_a_slow_server_adds_nothing(serve, connect):
    import time

    class Slow(slc.ComputeFunction):
        def compute(self, input_tensor):
            call = slc.current_call()
            while call.is_active():
                time.sleep(0.01)
            # The server sees its deadline pass by its own clock; gRPC's deadline
            # timer on the client may fire later on a loaded machine, so a reply
            # sent at once could still arrive in time. Reply well after both.
            time.sleep(1.0)
            return input_tensor

    client = connect(serve(Slow()), timeout=0.5, wait_for_ready=True)
    with pytest.raises(grpc.RpcError) as info:
        client.compute(torch.ones(1))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "connectivity" not in info.value.details()


# -- a model holding a RemoteModule can be copied and checkpointed ------------------------


@pytest.mark.timeout(60)
def test_remote_module_survives_deepcopy_pickle_and_torch_save(serve):
    server = serve(slc.ModelComputeFunction(torch.nn.Linear(4, 2)))
    client = slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=slc.CircuitBreaker(
        strategy=slc.FixedDelay(max_retries=1, delay=0.1)), codec=slc.Float16Codec(),
        max_message_length=1 << 20)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), slc.RemoteModule(client)).eval()
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = model(x)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                  torch.load(buf, weights_only=False)]
        for m in copies:
            assert m[1].client is not client  # its own channel to the same server
            assert m[1].client.server_address == client.server_address
            assert m[1].client.options == client.options
            torch.testing.assert_close(m(x), expected)
            m[1].client.close()
    client.close()

