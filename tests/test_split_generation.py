"""Split text generation with the KV cache in a server-side session (issue 11):
examples/split_generation.py's transformer, server and client, as a test.

* greedy generation of 64 tokens over the wire gives exactly the tokens of the same
  model run locally: raw codec, and with a float16 codec on the activations (both
  ways); measured with this model and seed: 64/64 tokens with float16, so the test
  asserts equality;
* four clients generating at once, each in its own session, each equal to local;
* the server's cache is in the session: its bytes are what the cache of the
  server's blocks takes, exactly;
* eviction under a small max_session_bytes: the evicted conversation's next step is
  FAILED_PRECONDITION "evicted for bytes", and the client recovers by sending its
  prompt (and the tokens so far) again, ending with the local tokens;
* the example script runs as a user would run it and exits 0.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, List

import grpc
import pytest

torch = pytest.importorskip("torch")

import splitlearn_comm as slc  # noqa: E402

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 64


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("split_generation",
                                                  ROOT / "examples" / "split_generation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ex = _example()


@pytest.fixture(scope="module")
def model():
    return ex.TinyLM(0)


@pytest.mark.parametrize("codec", [None, slc.Float16Codec()], ids=["raw", "float16"])
def test_generation_over_the_wire_equals_local(serve, connect, model, codec) -> None:
    server = serve(ex.server_fn(model))
    client = connect(server, codec=codec)
    prompt = list(b"Once upon a time")
    local = ex.generate_local(model, prompt, TOKENS)
    seen: List[int] = []

    def after(tokens: List[int]) -> None:
        # the server holds the cache of its 3 blocks for every position sent so far
        # (the prompt, then one per token but the last), plus the step's answer
        if len(tokens) in (1, 10):
            positions = len(prompt) + len(tokens) - 1
            answer = (len(prompt) if len(tokens) == 1 else 1) * ex.D_MODEL * 4
            sizes = server.metrics()["sessions"]["sizes"]
            assert list(sizes.values()) == [positions * ex.bytes_per_position() + answer]
            seen.append(len(tokens))

    remote, restarts = ex.generate_remote(model, client, prompt, TOKENS, after_step=after)
    assert restarts == 0 and seen == [1, 10]
    assert remote == local
    m = server.metrics()["sessions"]
    assert m["opened"] == 1 and m["steps"] == TOKENS and m["active"] == 0


def test_several_clients_at_once_each_in_its_own_session(serve, connect, model) -> None:
    server = serve(ex.server_fn(model), max_workers=4)
    prompts = [list(f"client {i} says hello".encode()) for i in range(4)]
    results: List[Any] = [None] * len(prompts)
    errors: List[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = ex.generate_remote(model, connect(server), prompts[i], TOKENS)[0]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for prompt, remote in zip(prompts, results):
        assert remote == ex.generate_local(model, prompt, TOKENS)
    m = server.metrics()["sessions"]
    assert m["opened"] == 4 and m["steps"] == 4 * TOKENS and m["evicted_bytes"] == 0


def test_eviction_gives_the_documented_error_and_the_client_recovers(serve, connect,
                                                                     model) -> None:
    limit = ex.bytes_per_position() * 110
    server = serve(ex.server_fn(model), max_session_bytes=limit)
    client = connect(server)
    prompt = list(b"the first conversation")
    errors: List[str] = []

    def interrupt(tokens: List[int]) -> None:
        if len(tokens) == 16:  # a long second conversation pushes the first one out
            with client.session() as other:
                other.compute(ex.ClientPart(model).bottom(list(b"x" * 80)))
            assert server.metrics()["sessions"]["evicted_bytes"] == 1

    tokens, restarts = ex.generate_remote(model, client, prompt, TOKENS, after_step=interrupt,
                                          log=errors.append)
    assert restarts == 1
    assert len(errors) == 1
    assert "session lost (evicted-bytes)" in errors[0]
    assert "was evicted for bytes" in errors[0] and "max_session_bytes" in errors[0]
    assert tokens == ex.generate_local(model, prompt, TOKENS)

    # the error itself, as a client sees it
    s = client.session()
    s.compute(ex.ClientPart(model).bottom(prompt))
    with client.session() as other:
        other.compute(ex.ClientPart(model).bottom(list(b"y" * 80)))
    with pytest.raises(grpc.RpcError) as e:
        s.compute(ex.ClientPart(model).bottom([1]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert s.lost_reason == "evicted-bytes"
    s.close()


def test_the_example_runs() -> None:
    from conftest import subprocess_env

    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "split_generation.py"),
                           "--clients", "2"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=150)
    out = proc.stdout
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert out.count(f"match with local generation: {TOKENS}/{TOKENS} tokens") == 3, out
    assert "session lost (evicted-bytes)" in out and "1 restart(s)" in out, out
