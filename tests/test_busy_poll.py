"""Busy polling (docs/api.md, "Busy polling"): a blocking call looks for its reply
without sleeping for up to ``busy_poll`` seconds, stops polling after a run of
polls that the reply outlasted, and never polls in a process bound to one CPU.

Whether a call polled is read from the calling thread's CPU time: a call that
polls keeps its thread running while the server's compute() sleeps; one that
sleeps uses next to no CPU. The margins are wide (tens of milliseconds polled
against a few), so a loaded machine does not change the verdict.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import time

import pytest
torch = pytest.importorskip("torch", reason="needs torch, an optional extra "
                            "(pip install splitlearn-comm[torch])")

import splitlearn_comm as slc
from splitlearn_comm import _core

from conftest import PYTHON, Echo, subprocess_env

pytestmark = pytest.mark.timeout(120)

MULTI_CPU = len(os.sched_getaffinity(0)) >= 2
needs_two_cpus = pytest.mark.skipif(not MULTI_CPU, reason="busy polling is off on one CPU")


class Sleepy(slc.ComputeFunction):
    """Returns its input after sleeping (the GIL released meanwhile)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def compute(self, input_tensor):
        time.sleep(self.seconds)
        return input_tensor


def cpu_of_calls(client: slc.GRPCComputeClient, n: int) -> float:
    """The calling thread's CPU seconds over ``n`` calls (each checked)."""
    x = torch.arange(6.0)
    start = time.thread_time()
    for _ in range(n):
        assert torch.equal(client.compute(x), x)
    return time.thread_time() - start


@needs_two_cpus
def test_default_setting_and_how_to_change_it(serve, connect):
    server = serve(Echo())
    client = connect(server)
    assert client.busy_poll == pytest.approx(_core.BUSY_POLL) == pytest.approx(200e-6)
    assert connect(server, busy_poll=0).busy_poll == 0.0
    client.busy_poll = 1e-3
    assert client.busy_poll == pytest.approx(1e-3)
    # copies and pinned clients keep the setting
    assert pickle.loads(pickle.dumps(client)).busy_poll == pytest.approx(1e-3)
    assert client.pinned().busy_poll == pytest.approx(1e-3)
    for bad in (-1e-6, 2.0, float("nan")):
        with pytest.raises(ValueError, match="busy_poll"):
            client.busy_poll = bad
        with pytest.raises(ValueError, match="busy_poll"):
            slc.GRPCComputeClient(f"127.0.0.1:{server.port}", busy_poll=bad)
    client.close()
    assert client.busy_poll == pytest.approx(1e-3)  # still readable
    with pytest.raises(ValueError, match="closed"):
        client.busy_poll = 0


@needs_two_cpus
def test_a_call_polls_for_its_reply_then_sleeps(serve, connect):
    server = serve(Sleepy(0.03))
    polling = connect(server, busy_poll=0.5)
    sleeping = connect(server, busy_poll=0)
    cpu_of_calls(polling, 1)  # connected
    cpu_of_calls(sleeping, 1)
    # each call polls through the server's 30 ms of sleep
    assert cpu_of_calls(polling, 3) > 0.03
    assert cpu_of_calls(sleeping, 3) < 0.02


@needs_two_cpus
def test_polling_stops_when_replies_keep_outlasting_the_window(serve, connect):
    server = serve(Sleepy(0.01))
    client = connect(server, busy_poll=0.004)
    cpu_of_calls(client, 4)  # four polls of 4 ms that the 10 ms replies outlast
    # the next 16 calls sleep at once (the back-off); polling all of them would
    # have cost 64 ms of CPU
    assert cpu_of_calls(client, 16) < 0.03
    # and the results are right throughout (checked in cpu_of_calls)


@needs_two_cpus
def test_polling_comes_back_when_replies_are_quick_again(serve, connect):
    sleepy = Sleepy(0.01)
    server = serve(sleepy)
    client = connect(server, busy_poll=0.004)
    cpu_of_calls(client, 4 + 16)  # backed off, then a probe that misses: 32 more
    sleepy.seconds = 0.0
    cpu_of_calls(client, 40)  # the 32 skipped calls end, the next probe gets its reply
    sleepy.seconds = 0.002  # replies within the window: every call polls them
    assert cpu_of_calls(client, 10) > 0.01


def test_no_polling_in_a_process_bound_to_one_cpu_or_with_the_variable():
    code = (
        "import os, splitlearn_comm as slc\n"
        "cpu = min(os.sched_getaffinity(0))\n"
        "print(slc.GRPCComputeClient('127.0.0.1:1').busy_poll)\n"
        "os.sched_setaffinity(0, {cpu})\n"
        "print(slc.GRPCComputeClient('127.0.0.1:1', busy_poll=1e-3).busy_poll)\n"
    )
    env = subprocess_env()
    out = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ([str(_core.BUSY_POLL), "0.0"] if MULTI_CPU else ["0.0", "0.0"])
    env["SPLITLEARN_BUSY_POLL"] = "0"
    out = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["0.0", "0.0"]
