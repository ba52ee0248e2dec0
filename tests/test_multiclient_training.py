"""Many clients, one server half in training (docs/scaling.md): 4 client processes x
50 steps against one TrainableComputeFunction; the server's parameters equal a
local replay of the steps in the order the server ran them."""
import os
import subprocess
import sys
import threading

import pytest

from conftest import NEEDS_TORCH

torch = pytest.importorskip("torch", reason=NEEDS_TORCH)

import _train_client as tc  # noqa: E402  (imports torch)
from splitlearn_comm import GRPCComputeServer, TrainableComputeFunction, context

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENTS, STEPS = 4, 50


def _tags():
    md = dict(context.current_call().metadata)
    return int(md["x-client"]), int(md["x-step"]), md["sl-client-id"]


class Logged(TrainableComputeFunction):
    """Logs each training forward and backward, in the order they run (one at a time)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.order_lock = threading.Lock()
        self.log = []
        self.client_ids = {}

    def compute_training(self, input_tensor, forward_id=None, training=True):
        client, step, cid = _tags()
        with self.order_lock:
            self.log.append(("F", client, step))
            self.client_ids.setdefault(client, set()).add(cid)
            return super().compute_training(input_tensor, forward_id=forward_id,
                                            training=training)

    def backward(self, grad_output, forward_id=None, learning_rate=None,
                 accumulation_step=None):
        client, step, _ = _tags()
        with self.order_lock:
            self.log.append(("B", client, step))
            return super().backward(grad_output, forward_id=forward_id,
                                    learning_rate=learning_rate,
                                    accumulation_step=accumulation_step)


def replay(log):
    """The same steps, in the same order, with no network: the reference."""
    top = TrainableComputeFunction(tc.top_model(), lambda p: torch.optim.SGD(p, lr=tc.LR_TOP))
    bottoms = [tc.bottom_model(c) for c in range(CLIENTS)]
    opts = [torch.optim.SGD(b.parameters(), lr=tc.LR_BOTTOM) for b in bottoms]
    pending = {}
    for kind, c, k in log:
        fid = f"{c}-{k}"
        if kind == "F":
            x, y = tc.batch(c, k)
            h = bottoms[c](x)
            out = top.compute_training(h.detach(), forward_id=fid)
            pending[fid] = (h, out, y)
        else:
            h, out, y = pending.pop(fid)
            o = out.detach().requires_grad_(True)
            torch.nn.functional.mse_loss(o, y).backward()
            grad_in = top.backward(o.grad, forward_id=fid)
            opts[c].zero_grad()
            h.backward(grad_in)
            opts[c].step()
    assert not pending
    return top.model


@pytest.mark.timeout(600)
def test_four_clients_train_one_server_half_like_a_local_replay():
    torch.set_num_threads(1)
    fn = Logged(tc.top_model(), lambda p: torch.optim.SGD(p, lr=tc.LR_TOP))
    server = GRPCComputeServer(fn, host="127.0.0.1", port=0, max_workers=8).start()
    procs = []
    try:
        # the package the test runs against first (the sanitizer build under make asan)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [p for p in [os.environ.get("PYTHONPATH")] if p] + [os.path.dirname(HERE)]))
        for c in range(CLIENTS):
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(HERE, "_train_client.py"),
                 f"127.0.0.1:{server.port}", str(c), str(STEPS)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0 and "DONE" in out, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        server.stop(1.0)
    log = fn.log
    assert len(log) == 2 * CLIENTS * STEPS
    for c in range(CLIENTS):   # each client's own steps in order, forward before backward
        mine = [(kind, k) for kind, cc, k in log if cc == c]
        assert mine == [(kind, k) for k in range(STEPS) for kind in ("F", "B")]
    # each client under one id of its own
    ids = [fn.client_ids[c] for c in range(CLIENTS)]
    assert all(len(s) == 1 for s in ids) and len(set.union(*ids)) == CLIENTS
    assert fn.stats()["backward_calls"] == CLIENTS * STEPS
    reference = replay(log)
    for (name, p), q in zip(fn.model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    # and training did move the parameters
    assert not torch.allclose(next(tc.top_model().parameters()), next(fn.model.parameters()))
