"""The user's guide, as written, against this package.

DESIGN.md: "Every code block in [seed/extending.zh.md] must run against the package as
written there, apart from the imports it forgot." This test takes the ```python blocks
of the original guide (not a copy: the file the guide lives in) and runs them, in
order, in one namespace, in one child process, with only the names the guide uses
without defining them predefined:

* imports: ``grpc``, ``torch``, ``numpy as np``, ``time``, ``logging``, ``uuid``,
  ``json``, ``concurrent.futures as futures`` and the ``splitlearn_comm`` names
  (``GRPCComputeClient`` is never imported by the guide);
* objects: ``compute_fn``, ``preprocessing_fn``, ``model_fn``, ``postprocessing_fn``
  (ComputeFunctions) and ``request`` (a ``splitlearn_comm.protocol.ComputeRequest``).

A block that only defines classes proves little, so after each block a check uses
what it defined against real servers on 127.0.0.1 (port 0): the compute functions are
hosted and called, the retry strategies drive a client, the codecs carry tensors both
ways, the interceptors guard a server, the monitored functions are scraped and logged.

The guide's client block (under "认证拦截器") dials ``localhost:50051``; for it a server
guarded by the guide's own ``AuthInterceptor`` listens on 127.0.0.1:50051, bound only
if that port is free (the block is skipped, saying so, when it is not). Likewise
``MonitoredComputeFunction.setup()`` serves Prometheus on port 8000 as written when
8000 is free, else its counters are checked without the HTTP server.

Every block runs exactly as written: none needed replacing by its corrected form in
docs/zh/extending.md. Some run but are wrong in use; docs/extending.md and
docs/zh/extending.md carry the fixes, each with a "Changed" line (the sparse codec's
index layout for tensors of 2 or more dimensions, the CachingFunction key that ignores
shape and dtype, the circuit breaker that never resets its failure count and counts
the server's own errors, the Prometheus metrics registered on the global registry,
fixed ports...). The checks here use the guide's code as the guide does, and pin the
sparse codec's 2-D bug.

The last tests check that the English and Chinese pages have the same headings and
the same code (comments and docstrings aside), and define every class of the guide.

Each block is reported as its own test (``test_guide_block[NN-name]``); they share
one run of the child process.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest

from test_docs import _python, extract_blocks
from conftest import NEEDS_TORCH

torch = pytest.importorskip("torch", reason=NEEDS_TORCH)

ROOT = Path(__file__).resolve().parent.parent
DOCS_EN = ROOT / "docs" / "extending.md"
DOCS_ZH = ROOT / "docs" / "zh" / "extending.md"


def _find_guide() -> Optional[Path]:
    """The original guide: $SPLITLEARN_GUIDE, or seed/extending.zh.md in a shared/
    folder inside or beside the checkout (where the project keeps it)."""
    candidates = [os.environ.get("SPLITLEARN_GUIDE", "")]
    candidates += [str(ROOT / "shared" / "seed" / "extending.zh.md"),
                   str(ROOT.parent / "shared" / "seed" / "extending.zh.md")]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


GUIDE = _find_guide()
RUN_TIMEOUT_S = 150

#: Names the guide uses without defining them.
PRELUDE = r'''
import grpc
import torch
import numpy as np
import time
import logging
import uuid
import json
import concurrent.futures as futures
from splitlearn_comm import (ComputeFunction, GRPCComputeClient, GRPCComputeServer,
                             ModelComputeFunction, RetryStrategy, TensorCodec)
from splitlearn_comm.protocol import ComputeRequest


class _Normalize(ComputeFunction):
    def compute(self, input_tensor):
        return (input_tensor - input_tensor.mean()) / (input_tensor.std() + 1e-6)


class _Softmax(ComputeFunction):
    def compute(self, input_tensor):
        return torch.softmax(input_tensor, dim=-1)


torch.manual_seed(0)
compute_fn = ModelComputeFunction(torch.nn.Linear(4, 4))
preprocessing_fn = _Normalize()
model_fn = ModelComputeFunction(torch.nn.Linear(4, 3))
postprocessing_fn = _Softmax()
request = ComputeRequest(data=torch.arange(4.0).numpy().tobytes(), shape=[1, 4])
'''

#: Helpers of the checks (underscored: they stay out of the guide's way).
HELPERS = r'''
import io as _io
import socket as _socket
import sys as _sys
import urllib.request as _urlrequest
import splitlearn_comm as _slc
from splitlearn_comm import current_call as _current_call

_started = []


def _serve(fn, **kwargs):
    kwargs.setdefault("host", "127.0.0.1")
    kwargs.setdefault("port", 0)
    s = GRPCComputeServer(fn, **kwargs).start()
    _started.append(s)
    return s


def _client(server, **kwargs):
    kwargs.setdefault("retry_strategy", None)
    kwargs.setdefault("timeout", 20.0)
    return GRPCComputeClient(f"127.0.0.1:{server.port}", **kwargs)


def _port_free(port):
    """True when nothing listens on 127.0.0.1:port. SO_REUSEADDR, as the servers have,
    so that connections of an earlier run in TIME_WAIT do not count; no SO_REUSEPORT,
    so that a gRPC server holding the port (with SO_REUSEPORT) does."""
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class _Flaky(ComputeFunction):
    """Fails the first `failures` calls with `code`, then echoes."""

    def __init__(self, failures, code=grpc.StatusCode.UNAVAILABLE):
        self.failures, self.code, self.calls = failures, code, 0

    def compute(self, input_tensor):
        self.calls += 1
        if self.calls <= self.failures:
            _current_call().abort(self.code, f"flaky call {self.calls}")
        return input_tensor


class _Echo(ComputeFunction):
    def compute(self, input_tensor):
        return input_tensor


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())
'''

#: Run after the guide's block with this marker, in the same namespace.
AFTER: Dict[str, str] = {
    "class DataAugmentation": r'''
_x = torch.arange(6.0).reshape(2, 3)
with _serve(DataAugmentation(augmentation_prob=1.0)) as _s, _client(_s) as _c:
    _y = _c.compute(_x)
    _info = _c.get_service_info()["custom_info"]
assert _y.shape == _x.shape and float((_y - torch.flip(_x, dims=[-1])).abs().max()) < 0.1, _y
assert _info == {"name": "DataAugmentation", "augmentation_prob": "1.0"}, _info
''',
    "class CachingFunction": r'''
_fn = CachingFunction(torch.nn.Linear(4, 2), cache_size=2)
with _serve(_fn) as _s, _client(_s) as _c:           # setup() prints "Initializing cache ..."
    _x = torch.randn(3, 4)
    _a, _b = _c.compute(_x), _c.compute(_x)
    _c.compute(torch.randn(3, 4))
    _c.compute(torch.randn(3, 4))                    # evicts the oldest entry
    _info = _c.get_service_info()["custom_info"]
assert torch.equal(_a, _b)
assert _info["cache_hits"] == "1" and _info["cache_misses"] == "3", _info
assert _info["cache_hit_rate"] == "25.00%" and len(_fn.cache) == 0   # teardown() cleared it
''',
    "class EnsembleFunction": r'''
_models = [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)]
_x = torch.randn(5, 4)
with torch.no_grad():
    _expected = 0.5 * _models[0](_x) + 0.5 * _models[1](_x)
with _serve(EnsembleFunction(_models)) as _s, _client(_s) as _c:
    _y = _c.compute(_x)
    _info = _c.get_service_info()
assert torch.allclose(_y, _expected, atol=1e-6), (_y, _expected)
assert _info["device"] == "cpu" and _info["custom_info"]["num_models"] == "2", _info
''',
    "class PreprocessingPipeline": r'''
_x = torch.randn(10)
_expected = torch.clamp((_x - _x.mean()) / _x.std(), -3, 3) * 0.5
with _serve(pipeline) as _s, _client(_s) as _c:
    _y = _c.compute(_x)
    _info = _c.get_service_info()["custom_info"]
assert torch.allclose(_y, _expected, atol=1e-6)
assert _info["stages"] == "normalize, clamp, scale" and _info["num_stages"] == "3", _info
''',
    "class AdaptiveRetry": r'''
_fn = _Flaky(2)
_strategy = AdaptiveRetry(max_retries=5, base_delay=0.01)
with _serve(_fn) as _s, _client(_s, retry_strategy=_strategy) as _c:
    assert torch.equal(_c.compute(torch.ones(3)), torch.ones(3))
assert _fn.calls == 3, _fn.calls
_fn = _Flaky(5, grpc.StatusCode.INVALID_ARGUMENT)    # not retried: raised at once
with _serve(_fn) as _s, _client(_s, retry_strategy=AdaptiveRetry(base_delay=0.01)) as _c:
    try:
        _c.compute(torch.ones(3))
        raise AssertionError("no error")
    except grpc.RpcError as _e:
        assert _e.code() == grpc.StatusCode.INVALID_ARGUMENT
assert _fn.calls == 1, _fn.calls
''',
    "class CircuitBreakerRetry": r'''
# nothing listens on 127.0.0.1:1: UNAVAILABLE twice, then the breaker is open
_cb = CircuitBreakerRetry(failure_threshold=2, timeout=60.0)
with GRPCComputeClient("127.0.0.1:1", timeout=5.0, retry_strategy=_cb) as _c:
    _errors = []
    for _ in range(3):
        try:
            _c.compute(torch.ones(1))
        except Exception as _e:
            _errors.append(_e)
assert [type(_e) is _slc.RpcError for _e in _errors] == [True, True, False], _errors
assert _errors[0].code() == grpc.StatusCode.UNAVAILABLE
assert str(_errors[2]) == "Circuit breaker is OPEN" and _cb.state == CircuitState.OPEN
# recovery: after `timeout`, HALF_OPEN; `half_open_attempts` successes close it
_cb = CircuitBreakerRetry(failure_threshold=2, timeout=0.05, half_open_attempts=2)
with _serve(_Flaky(2)) as _s, _client(_s, retry_strategy=_cb) as _c:
    for _ in range(2):
        try:
            _c.compute(torch.ones(1))
        except grpc.RpcError:
            pass
    assert _cb.state == CircuitState.OPEN
    time.sleep(0.1)
    _c.compute(torch.ones(1))
    assert _cb.state == CircuitState.HALF_OPEN
    _c.compute(torch.ones(1))
    assert _cb.state == CircuitState.CLOSED and _cb.failure_count == 0
''',
    "class QuantizedTensorCodec": r'''
_x = torch.relu(torch.randn(64, 32))
with _serve(_Echo(), codecs=[QuantizedTensorCodec()]) as _s, \
        _client(_s, codec=QuantizedTensorCodec()) as _c:
    _y = _c.compute(_x)
_step = float(_x.max() - _x.min()) / 255
# it truncates (a step per trip) and the server answers in the request's codec
assert _y.dtype == torch.float32 and float((_y - _x).abs().max()) <= 2 * _step + 1e-6
''',
    "class SparseTensorCodec": r'''
import warnings as _warnings
_warnings.filterwarnings("ignore", category=UserWarning)   # torch: read-only buffers
_v = torch.relu(torch.randn(300))
with _serve(_Echo(), codecs=[SparseTensorCodec()]) as _s, \
        _client(_s, codec=SparseTensorCodec()) as _c:
    assert torch.equal(_c.compute(_v), _v)
# The guide's decode reads the (ndim, nnz) index array back as (nnz, ndim): wrong for
# tensors of 2 and more dimensions (docs/extending.md has the fix).
_m = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
assert not torch.equal(SparseTensorCodec().decode(*SparseTensorCodec().encode(_m)), _m)
''',
    "('grpc.max_send_message_length'": r'''
assert isinstance(server, GRPCComputeServer) and not server.serving and server.port == 50051
assert server.max_workers == 20 and len(server.options) == 7
# the same options, accepted by the C core, on a free port
with _serve(compute_fn, max_workers=20, options=server.options) as _s, _client(_s) as _c:
    assert _c.compute(torch.ones(2, 4)).shape == (2, 4)
''',
    "class MultiPortServer": r'''
assert [s.port for s in server.servers] == [50051, 50052, 50053]
assert [s.compute_fn for s in server.servers] == [preprocessing_fn, model_fn, postprocessing_fn]
# the guide's class as written, on free ports (and on 127.0.0.1: its servers' host
# attribute, read by start(), since the class takes no host)
_mps = MultiPortServer([(preprocessing_fn, 0), (model_fn, 0), (postprocessing_fn, 0)])
for _s in _mps.servers:
    _s.host = "127.0.0.1"
_mps.start()
_x = torch.randn(2, 4)
for _s in _mps.servers:
    with _client(_s) as _c:
        _x = _c.compute(_x)
assert _x.shape == (2, 3) and torch.allclose(_x.sum(dim=-1), torch.ones(2))
_mps.stop()
_mps.wait_for_termination()
assert not any(s.serving for s in _mps.servers)
''',
    "class LoggingInterceptor": r'''
# the block made a stock grpcio server (never started): it hosts nothing of ours
assert isinstance(server, grpc.Server)
server.stop(None)
_records = _Records()
logging.getLogger(__name__).addHandler(_records)
logging.getLogger(__name__).setLevel(logging.INFO)
with _serve(compute_fn, interceptors=[LoggingInterceptor()]) as _s, _client(_s) as _c:
    _c.compute(torch.ones(1, 4))
    _c.health_check()
assert _records.messages == ["RPC call: /splitlearn.comm.ComputeService/Compute",
                             "RPC call: /splitlearn.comm.ComputeService/HealthCheck"], \
    _records.messages
logging.getLogger(__name__).removeHandler(_records)
''',
    "class AuthInterceptor": r'''
if _auth_server is not None:
    _deadline = time.monotonic() + 10       # counted just after the status went out
    while _auth_server.metrics()["requests"].get(("Compute", "OK"), 0) < 1:
        assert time.monotonic() < _deadline, _auth_server.metrics()["requests"]
        time.sleep(0.01)
    try:
        client.stub.Compute(request)                   # no token: the guide's interceptor refuses
        raise AssertionError("no error")
    except grpc.RpcError as _e:
        assert _e.code() == grpc.StatusCode.UNAUTHENTICATED and _e.details() == "Invalid token"
    client.close()
    client.channel.close()
    _auth_server.stop(grace=0)
''',
    "class MonitoredComputeFunction": r'''
from prometheus_client import REGISTRY as _REGISTRY
_fn = MonitoredComputeFunction(torch.nn.Linear(4, 2))
_s = None
if _port_free(8000):
    try:
        _s = _serve(_fn)          # as written: setup() serves the default registry on port 8000
    except OSError:               # taken between the check and the bind
        _s = None
if _s is not None:
    with _s, _client(_s) as _c:
        _c.compute(torch.ones(1, 4))
        _c.compute(torch.ones(3, 4))
        try:
            _c.compute(torch.ones(1, 5))               # wrong shape: compute() raises
        except grpc.RpcError as _e:
            assert _e.code() == grpc.StatusCode.INTERNAL
    with _urlrequest.urlopen("http://127.0.0.1:8000/metrics", timeout=10) as _r:
        _text = _r.read().decode()
    assert "compute_requests_total 3.0" in _text and "compute_errors_total 1.0" in _text, _text
    assert "compute_duration_seconds_count 3.0" in _text, _text
else:
    print("port 8000 is in use: MonitoredComputeFunction.setup() not run "
          "(its start_http_server(8000) would fail); counters checked without HTTP")
    _fn.compute(torch.ones(1, 4))
    assert _REGISTRY.get_sample_value("compute_requests_total") == 1.0
''',
    "class LoggedComputeFunction": r'''
_records = _Records()
logging.getLogger(__name__).addHandler(_records)
logging.getLogger(__name__).setLevel(logging.INFO)
with _serve(LoggedComputeFunction(torch.nn.Linear(4, 2))) as _s, _client(_s) as _c:
    _c.compute(torch.ones(3, 4))
    try:
        _c.compute(torch.ones(3, 5))
    except grpc.RpcError as _e:
        assert _e.code() == grpc.StatusCode.INTERNAL
_entries = [json.loads(m) for m in _records.messages]
assert [e["success"] for e in _entries] == [True, False], _entries
assert _entries[0]["input_shape"] == [3, 4] and _entries[0]["output_shape"] == [3, 2]
assert _entries[1]["output_shape"] == []
assert str(uuid.UUID(_entries[0]["request_id"])) == _entries[0]["request_id"]
logging.getLogger(__name__).removeHandler(_records)
''',
}

#: Run before the guide's block with this marker.
BEFORE: Dict[str, str] = {
    # The client block dials localhost:50051 and sends the guide's token; a server
    # guarded by the guide's own AuthInterceptor (defined in this very block, hence
    # looked up when a call comes) answers there.
    "class AuthInterceptor": r'''
class _GuideAuth(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        auth = globals()["AuthInterceptor"](valid_tokens={"secret-token"})
        return auth.intercept_service(continuation, handler_call_details)


_auth_server = None
if _port_free(50051):
    try:
        # grpc.so_reuseport=0: no other server may share the port while we hold it
        _auth_server = _serve(compute_fn, port=50051, interceptors=[_GuideAuth()],
                              options=[("grpc.so_reuseport", 0)])
    except OSError:
        pass
if _auth_server is None:
    _SKIP = "127.0.0.1:50051 is in use: the guide's client block needs a server there"
''',
}

# Runs in the child: each block compiled under the guide's file name, padded so that
# tracebacks give the guide's own line numbers; one namespace for all.
_DRIVER = r"""
import json, sys, traceback
spec = json.load(sys.stdin)
ns = {"__name__": "__main__", "__file__": spec["file"]}
exec(compile(spec["prelude"], "<prelude>", "exec"), ns)
exec(compile(spec["helpers"], "<helpers>", "exec"), ns)
results = []


def save():
    with open(spec["results"], "w") as f:
        json.dump(results, f)


try:
    for block in spec["blocks"]:
        ns.pop("_SKIP", None)
        try:
            if block["before"]:
                exec(compile(block["before"], f"<before {block['name']}>", "exec"), ns)
            if ns.get("_SKIP"):
                results.append({"status": "skipped", "reason": ns["_SKIP"]})
                continue
            exec(compile("\n" * (block["line"] - 1) + block["code"], spec["file"], "exec"), ns)
            if block["after"]:
                exec(compile(block["after"], f"<check after {block['name']}>", "exec"), ns)
        except BaseException:
            results.append({"status": "failed", "reason": traceback.format_exc()})
            break
        results.append({"status": "ok", "reason": ""})
        print(f"block {block['name']} (line {block['line']}): ok", flush=True)
finally:
    for s in ns.get("_started", []):
        s.stop(grace=0)
    save()
"""


class GuideBlock(NamedTuple):
    name: str
    line: int
    code: str


def _marker(code: str) -> Optional[str]:
    for m in AFTER:
        if m in code:
            return m
    return None


def guide_blocks() -> List[GuideBlock]:
    if GUIDE is None:
        return []
    blocks = []
    for i, b in enumerate(extract_blocks(GUIDE.read_text(encoding="utf-8")), 1):
        marker = _marker(b.code) or "block"
        name = marker.replace("class ", "").strip("('") if marker != "block" else "block"
        name = {"grpc.max_send_message_length": "grpc-options"}.get(name, name)
        blocks.append(GuideBlock(f"{i:02d}-{name}", b.line, b.code))
    return blocks


BLOCKS = guide_blocks()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_guide() -> dict:
    """Runs every block once, in a child process: the per-block results and the output."""
    assert GUIDE is not None
    with tempfile.TemporaryDirectory() as tmp:
        results_path = Path(tmp) / "results.json"
        spec = {
            "file": str(GUIDE),
            "prelude": PRELUDE,
            "helpers": HELPERS,
            "results": str(results_path),
            "blocks": [{"name": b.name, "line": b.line, "code": b.code,
                        "before": BEFORE.get(_marker(b.code) or "", ""),
                        "after": AFTER.get(_marker(b.code) or "", "")} for b in BLOCKS],
        }
        try:
            proc = subprocess.run([*_python(), "-c", _DRIVER], input=json.dumps(spec),
                                  cwd=ROOT, env=_env(), capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S)
            out, err, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, err, code = e.stdout or "", e.stderr or "", None
        results = json.loads(results_path.read_text()) if results_path.exists() else []
    return {"results": results, "stdout": out, "stderr": err, "code": code}


@pytest.fixture(scope="module")
def guide_run() -> dict:
    if GUIDE is None:
        pytest.skip("the user's guide (shared/seed/extending.zh.md) is not beside this checkout; "
                    "set SPLITLEARN_GUIDE to its path")
    return run_guide()


def test_the_guide_has_the_blocks_this_test_knows() -> None:
    if GUIDE is None:
        pytest.skip("the user's guide is not beside this checkout; set SPLITLEARN_GUIDE")
    assert len(BLOCKS) == 14, [b.name for b in BLOCKS]
    for marker in AFTER:   # every check found its block, once
        assert sum(marker in b.code for b in BLOCKS) == 1, marker


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[b.name for b in BLOCKS])
def test_guide_block(guide_run, index: int) -> None:
    block = BLOCKS[index]
    results = guide_run["results"]
    report = (f"\n--- child exit code {guide_run['code']} ---\n--- stdout ---\n"
              f"{guide_run['stdout']}\n--- stderr ---\n{guide_run['stderr']}")
    if index >= len(results):
        failed = [r for r in results if r["status"] == "failed"]
        pytest.fail(f"guide block {block.name} (line {block.line}) did not run"
                    + (f": an earlier block failed" if failed else "") + report)
    result = results[index]
    if result["status"] == "skipped":
        pytest.skip(result["reason"])
    assert result["status"] == "ok", (
        f"guide block {block.name} (line {block.line} of {GUIDE}) failed:\n{result['reason']}"
        + report)


def test_the_child_exits_cleanly(guide_run) -> None:
    assert guide_run["code"] == 0, (f"exit code {guide_run['code']}\n--- stdout ---\n"
                                    f"{guide_run['stdout']}\n--- stderr ---\n{guide_run['stderr']}")


# -- docs/extending.md and docs/zh/extending.md: the guide, corrected, in two languages ---

def _without_docstrings(code: str) -> str:
    """The code's syntax tree without docstrings (comments are not in it)."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _headings(text: str) -> List[int]:
    """The levels of the Markdown headings outside code blocks (but a table of
    contents' own heading, which the Chinese page keeps from the guide)."""
    levels, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,6} ", line) and line.split(" ", 1)[1] != "目录":
            levels.append(len(line.split(" ", 1)[0]))
    return levels


def test_the_english_and_chinese_pages_have_the_same_structure_and_code() -> None:
    en_text, zh_text = DOCS_EN.read_text(encoding="utf-8"), DOCS_ZH.read_text(encoding="utf-8")
    assert _headings(en_text) == _headings(zh_text)
    en = [b for b in extract_blocks(en_text) if b.run]
    zh = [b for b in extract_blocks(zh_text) if b.run]
    assert len(en) == len(zh), (len(en), len(zh))
    for a, b in zip(en, zh):
        assert _without_docstrings(a.code) == _without_docstrings(b.code), (
            f"docs/extending.md line {a.line} and docs/zh/extending.md line {b.line} differ "
            "beyond comments and docstrings")


def test_the_pages_cover_every_class_of_the_guide() -> None:
    if GUIDE is None:
        pytest.skip("the user's guide is not beside this checkout; set SPLITLEARN_GUIDE")
    classes = re.findall(r"^class (\w+)", GUIDE.read_text(encoding="utf-8"), re.M)
    assert len(classes) == 15, classes
    for page in (DOCS_EN, DOCS_ZH):
        text = page.read_text(encoding="utf-8")
        missing = [c for c in classes if not re.search(rf"^class {c}\b", text, re.M)]
        assert not missing, f"{page.relative_to(ROOT)} lacks {missing}"
