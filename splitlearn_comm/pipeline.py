"""Pipelined split training: micro-batches in flight (GPipe-style).

One training step of a split model ``head(remote(bottom(x)))`` sends the whole
batch, waits for the server's forward, runs the head, sends the gradient back and
waits again: the client, the network and the server take turns. A
:class:`Pipeline` cuts the batch into ``chunks`` micro-batches and keeps them in
flight: every micro-batch's bottom forward is computed and sent while the earlier
ones travel and run on the server; then the backwards go in reverse order, each
micro-batch's head backward overlapping the server's backward of the one before.
The server applies one optimizer step per batch (each backward carries
``accumulation_step = chunks``), and each micro-batch's loss is weighted by its
share of the batch, so the parameter updates equal those of the unpipelined step
on the whole batch (up to float rounding).
"""
from __future__ import annotations

import collections
import logging
import uuid
from typing import Any, Callable, List, Optional, Tuple

from ._async import CallFuture, compute_async

logger = logging.getLogger("splitlearn_comm.pipeline")


class Pipeline:
    """GPipe-style pipelined training steps over a :class:`GRPCComputeClient`.

    Args:
        client: the client of a server hosting a ``TrainableComputeFunction`` (or
            another compute function with ``backward()``).
        chunks: micro-batches per batch (K). The batch is cut along dimension 0
            with ``torch.chunk``; a batch smaller than K gives fewer micro-batches.
        learning_rate: sent with every backward (the server's optimizer lr), or None.
        metadata, timeout: for every call, as for ``compute()``.
        loss_reduction: ``"mean"`` (default) when ``loss_fn`` averages over its
            micro-batch, as torch's losses do by default: each micro-batch's loss is
            weighted by its share of the batch, so the sum is the batch mean.
            ``"sum"`` when ``loss_fn`` sums: no weighting.

    Use :meth:`step` in place of the forward and ``loss.backward()`` of one
    training step; step the client-side optimizer after it as usual.
    """

    def __init__(self, client: Any, chunks: int = 4, *, learning_rate: Optional[float] = None,
                 metadata: Any = None, timeout: Optional[float] = None,
                 loss_reduction: str = "mean") -> None:
        if int(chunks) < 1:
            raise ValueError(f"chunks must be >= 1, not {chunks}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', not {loss_reduction!r}")
        self.client = client
        self.chunks = int(chunks)
        self.learning_rate = learning_rate
        self.metadata = metadata
        self.timeout = timeout
        self.loss_reduction = loss_reduction

    def step(self, x: Any, target: Any, bottom: Optional[Callable[[Any], Any]],
             loss_fn: Callable[[Any, Any], Any],
             head: Optional[Callable[[Any], Any]] = None,
             return_outputs: bool = False) -> Any:
        """One training step on the batch ``x`` with labels ``target``.

        ``bottom`` runs on the client before the server's slice (None: the batch
        goes to the server as it is; its parameters
        get their gradients here; ``None`` gradients are accumulated, not reset),
        ``head`` after it (optional), ``loss_fn(output, target)`` gives the loss.
        Returns the batch's loss as a float (with ``return_outputs=True``: the loss
        and the batch's outputs, detached, in batch order). Gradients of ``bottom`` and ``head``
        are accumulated into ``.grad`` (call ``zero_grad()`` before and your
        optimizer's ``step()`` after); the server steps once, after the last
        micro-batch's backward.

        On a failed call the calls still in flight are cancelled and the error is
        raised; the server may then hold part of the batch's gradients.
        """
        import torch

        xs = torch.chunk(x, self.chunks, dim=0)
        ts = torch.chunk(target, self.chunks, dim=0)
        if len(xs) != len(ts):
            raise ValueError(f"x and target split into {len(xs)} and {len(ts)} micro-batches: "
                             "their first dimensions differ")
        n = len(xs)
        total = int(x.shape[0])
        fids = [uuid.uuid4().hex for _ in range(n)]
        acts: List[Any] = []
        forwards: List[CallFuture] = []
        backwards: "collections.deque[Tuple[Any, ...]]" = collections.deque()
        loss_value = 0.0
        outputs: List[Any] = [None] * n
        try:
            # every forward in flight: the bottom of micro-batch i+1 runs while i travels
            for i in range(n):
                a = bottom(xs[i]) if bottom is not None else xs[i]
                acts.append(a)
                forwards.append(self._call(a.detach(), forward_id=fids[i], training_mode=True))
            # backwards in reverse; the head of i overlaps the server's backward of i+1
            for i in reversed(range(n)):
                y = forwards[i].result().detach().requires_grad_(True)
                out = head(y) if head is not None else y
                if return_outputs:
                    outputs[i] = out.detach()
                loss = loss_fn(out, ts[i])
                if self.loss_reduction == "mean":
                    loss = loss * (xs[i].shape[0] / total)
                loss.backward()
                loss_value += float(loss.detach())
                grad = y.grad if y.grad is not None else torch.zeros_like(y)
                backwards.append((i, self._call(grad, backward=True, forward_id=fids[i],
                                                learning_rate=self.learning_rate,
                                                accumulation_step=n, backward_seq=1)))
                if len(backwards) > 1:
                    self._finish_backward(acts, *backwards.popleft())
            while backwards:
                self._finish_backward(acts, *backwards.popleft())
        except BaseException:
            for f in forwards:
                f.cancel()
            for _, f in backwards:
                f.cancel()
            raise
        if return_outputs:
            return loss_value, torch.cat(outputs, dim=0)
        return loss_value

    def _call(self, tensor: Any, **fields: Any) -> CallFuture:
        return compute_async(self.client, tensor, metadata=self.metadata, timeout=self.timeout,
                             **fields)

    @staticmethod
    def _finish_backward(acts: List[Any], i: int, fut: CallFuture) -> None:
        grad_input = fut.result()
        a = acts[i]
        if a.requires_grad:
            a.backward(grad_input.to(device=a.device, dtype=a.dtype))

    def __repr__(self) -> str:
        return f"Pipeline({self.client!r}, chunks={self.chunks})"


def pipeline(client: Any, chunks: int = 4, **kwargs: Any) -> Pipeline:
    """A :class:`Pipeline` of ``chunks`` micro-batches over ``client``."""
    return Pipeline(client, chunks=chunks, **kwargs)
