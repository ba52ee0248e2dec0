"""Split-learning training over the wire, the client half (docs/training.md).

:func:`remote` (``GRPCComputeClient.remote``) and :class:`RemoteModule` put a remote
call into the client's autograd graph: ``loss.backward()`` sends the gradients of the
remote outputs with ComputeBackward and continues the backward pass into the
client's own layers with the input gradients the server returns. The server half is
:mod:`splitlearn_comm.training`. This module imports neither the client nor the
server modules (it is handed a client), so there is no import cycle.

torch is imported lazily, as everywhere in the package.
"""
from __future__ import annotations

import threading
import uuid
from typing import Any, Dict, Optional

from . import _structure
from ._metadata import CLIENT_ID_KEY
from ._metadata import normalize as normalize_metadata

__all__ = ["remote", "RemoteModule"]


def _torch() -> Any:
    import torch

    return torch


def _differentiable(t: Any) -> bool:
    return t.is_floating_point() or t.is_complex()


class _Call:
    """What the backward of one remote training call needs."""

    __slots__ = ("client", "forward_id", "learning_rate", "accumulation_step", "metadata",
                 "timeout", "backwards", "lock", "in_struct", "in_meta", "out_struct",
                 "out_diff", "out_meta", "single_in", "single_out", "session")

    def __init__(self, client: Any, learning_rate: Optional[float],
                 accumulation_step: Optional[int], metadata: Any,
                 timeout: Optional[float]) -> None:
        self.client = client
        self.forward_id = uuid.uuid4().hex
        self.learning_rate = learning_rate
        self.accumulation_step = accumulation_step
        self.metadata = metadata
        self.timeout = timeout
        self.backwards = 0  # backwards sent through this call's output so far
        self.lock = threading.Lock()
        self.in_struct: Any = None   # the input structure (its tensors are apply's inputs)
        self.in_meta: list = []      # (shape, dtype, device, differentiable) of each input
        self.out_struct: Any = None  # the output as the server sent it (until rebuilt)
        self.out_diff: list = []     # which output tensors carry gradients
        self.out_meta: list = []     # (shape, dtype, device) of each output tensor
        self.single_in = True
        self.single_out = True
        self.session: Dict[str, Any] = {}  # session_id and session_step in a session

    def next_backward(self) -> int:
        """The number of the backward about to be sent: 1, then 2 for a second
        backward through the same output (retain_graph=True), and so on. Retries
        of one backward reuse its number, so the server runs each number once."""
        with self.lock:
            self.backwards += 1
            return self.backwards


_function_class: Any = None


def _remote_function() -> Any:
    """The torch.autograd.Function of a remote call (made on first use: torch is lazy)."""
    global _function_class
    if _function_class is not None:
        return _function_class
    torch = _torch()
    from torch.autograd.function import once_differentiable

    class RemoteCall(torch.autograd.Function):
        """apply(call, anchor, *inputs) -> output tensors: the tensors of the input
        structure go in, the tensors of the output structure come out (the call
        rebuilds both structures)."""

        @staticmethod
        def forward(ctx: Any, call: _Call, anchor: Any, *inputs: Any) -> Any:
            x = inputs[0] if call.single_in else _structure.replace_tensors(call.in_struct, inputs)
            call.in_meta = [(tuple(t.shape), t.dtype, t.device, _differentiable(t))
                            for t in inputs]
            y = call.client._tensor_call(x, metadata=call.metadata, timeout=call.timeout,
                                         forward_id=call.forward_id, training_mode=True,
                                         **call.session)
            call.single_out = isinstance(y, torch.Tensor)
            outs = [y] if call.single_out else _structure.tensor_leaves(y)
            if not all(isinstance(t, torch.Tensor) for t in outs):
                raise TypeError("remote() returns torch tensors; send torch tensors to it")
            call.out_struct = y
            call.out_diff = [_differentiable(t) for t in outs]
            call.out_meta = [(tuple(t.shape), t.dtype, t.device) for t in outs]
            ctx.call = call
            fixed = [t for t, d in zip(outs, call.out_diff) if not d]
            if fixed:
                ctx.mark_non_differentiable(*fixed)  # masks, ids: they pass through
            return tuple(outs)

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, *grad_outputs: Any) -> Any:
            call = ctx.call
            grads = []
            for g, diff, (shape, dtype, device) in zip(grad_outputs, call.out_diff,
                                                      call.out_meta):
                if diff:
                    grads.append(g if g is not None else
                                 torch.zeros(shape, dtype=dtype, device=device))
            # every output's gradient in one ComputeBackward call
            send = grads[0] if call.single_out else tuple(grads)
            g = call.client._tensor_call(send, metadata=call.metadata, timeout=call.timeout,
                                         backward=True, forward_id=call.forward_id,
                                         learning_rate=call.learning_rate,
                                         accumulation_step=call.accumulation_step,
                                         backward_seq=call.next_backward(),
                                         **{k: v for k, v in call.session.items()
                                            if k == "session_id"})
            if call.single_in:
                got = [g]
            elif isinstance(g, (tuple, list)):
                got = list(g)
            else:
                raise RuntimeError(f"the server answered the backward of forward_id "
                                   f"{call.forward_id!r} with a {type(g).__name__}, not a tuple "
                                   "of input gradients")
            wanted = sum(1 for m in call.in_meta if m[3])
            if not call.single_in and len(got) != wanted:
                raise RuntimeError(f"the server answered the backward of forward_id "
                                   f"{call.forward_id!r} with {len(got)} input gradients for "
                                   f"{wanted} floating-point inputs")
            result = []
            k = 0
            for (shape, dtype, device, diff), need in zip(call.in_meta, ctx.needs_input_grad[2:]):
                if not diff:
                    result.append(None)
                    continue
                gi = got[k]
                k += 1
                if not need:
                    result.append(None)
                    continue
                if tuple(gi.shape) != shape:
                    raise RuntimeError(f"the server answered the backward of forward_id "
                                       f"{call.forward_id!r} with a gradient of shape "
                                       f"{tuple(gi.shape)} for an input of shape {shape}")
                result.append(gi.to(device=device, dtype=dtype))
            return (None, None, *result)

    _function_class = RemoteCall
    return RemoteCall


def remote(client: Any, tensor: Any, *, training: Optional[bool] = None,
           learning_rate: Optional[float] = None, accumulation_step: Optional[int] = None,
           metadata: Any = None, timeout: Optional[float] = None,
           _session_fields: Optional[Dict[str, Any]] = None) -> Any:
    """Run the server's slice on ``tensor`` as a step of the client's autograd graph.

    ``tensor`` is a torch.Tensor or a structure of them (dicts, tuples, lists, with
    scalar and None leaves), and the result is whatever structure the server
    returns. ``training`` (default: ``torch.is_grad_enabled()``) sends a training
    forward under a fresh forward_id; the floating-point result tensors require
    grad (integer and bool ones, masks and ids, pass through), and ``backward()``
    through them sends all their gradients in one ComputeBackward call (with
    ``learning_rate`` and ``accumulation_step``) and continues with the input
    gradients the server returns, one for every floating-point input tensor. With
    ``training`` false (e.g. under ``torch.no_grad()``) it is a plain inference
    Compute call and the server keeps nothing. ``metadata`` and ``timeout`` apply
    to both calls, which go through the client's retry strategy and codec.
    """
    torch = _torch()
    single = isinstance(tensor, torch.Tensor)
    inputs = [tensor] if single else _structure.tensor_leaves(tensor)
    bad = next((t for t in inputs if not isinstance(t, torch.Tensor)), None)
    if bad is not None or (single is False and _structure.is_tensor(tensor)):
        what = type(bad if bad is not None else tensor).__name__
        raise TypeError(f"remote() takes a torch.Tensor or a structure of them, got {what}")
    if training is None:
        training = torch.is_grad_enabled()
    if not training:
        return client._tensor_call(tensor, metadata=metadata, timeout=timeout,
                                   **(_session_fields or {}))
    if not torch.is_grad_enabled():
        raise ValueError("remote(training=True) needs autograd enabled (it is disabled here, "
                         "e.g. by torch.no_grad()): its backward could never be sent")
    # a client balancing over replicas pins its training steps to one of them (the
    # backward must reach the replica that kept the forward); the client id keys
    # the server's activation store by client
    step_client = client._training_client() if hasattr(client, "_training_client") else client
    client_id = getattr(step_client, "client_id", None)
    if client_id:
        metadata = normalize_metadata(metadata) + [(CLIENT_ID_KEY, client_id)]
    call = _Call(step_client, learning_rate, accumulation_step, metadata, timeout)
    call.session = dict(_session_fields or {})
    call.single_in = single
    call.in_struct = None if single else tensor
    # an anchor that requires grad puts the call in the graph even when no input
    # does (the server's layers still need their backward)
    needs = any(t.requires_grad for t in inputs)
    anchor = None if needs else torch.empty(0, requires_grad=True)
    outs = _remote_function().apply(call, anchor, *inputs)
    y, call.out_struct, call.in_struct = call.out_struct, None, None
    return outs[0] if call.single_out else _structure.replace_tensors(y, outs)


_module_class: Any = None


def _remote_module() -> Any:
    global _module_class
    if _module_class is not None:
        return _module_class
    torch = _torch()

    class RemoteModule(torch.nn.Module):
        """A ``torch.nn.Module`` whose forward is :func:`remote` on a client, so that a
        split model reads like a local one::

            model = torch.nn.Sequential(bottom, RemoteModule(client), head)

        In train mode with autograd on, its calls are training calls; otherwise
        inference calls. ``learning_rate``, ``accumulation_step``, ``metadata`` and
        ``timeout`` are passed to every call. It has no parameters of its own: the
        server's slice trains on the server.
        """

        def __init__(self, client: Any, *, learning_rate: Optional[float] = None,
                     accumulation_step: Optional[int] = None, metadata: Any = None,
                     timeout: Optional[float] = None) -> None:
            super().__init__()
            self.client = client
            self.learning_rate = learning_rate
            self.accumulation_step = accumulation_step
            self.metadata = metadata
            self.timeout = timeout

        def forward(self, *inputs: Any) -> Any:
            """``module(x)`` sends ``x`` (a tensor or a structure); ``module(a, b)``
            sends the tuple ``(a, b)``."""
            x = inputs[0] if len(inputs) == 1 else tuple(inputs)
            return remote(self.client, x, training=self.training and torch.is_grad_enabled(),
                          learning_rate=self.learning_rate,
                          accumulation_step=self.accumulation_step, metadata=self.metadata,
                          timeout=self.timeout)

        def extra_repr(self) -> str:
            return repr(self.client.server_address)

    RemoteModule.__module__ = __name__
    RemoteModule.__qualname__ = "RemoteModule"
    _module_class = RemoteModule
    return RemoteModule


def __getattr__(name: str) -> Any:
    if name == "RemoteModule":
        return _remote_module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
