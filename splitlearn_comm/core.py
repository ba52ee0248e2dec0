"""The classes users subclass: ComputeFunction, ModelComputeFunction, TensorCodec."""
from __future__ import annotations

import abc
from typing import Any, Dict, Optional, Sequence, Tuple


class ComputeFunction(abc.ABC):
    """What a server hosts: a function from one tensor to another.

    Subclass it and implement :meth:`compute`. The server calls ``compute`` on its
    worker threads (up to ``max_workers`` at once, each holding the GIL only while
    Python runs), so keep shared state thread-safe. ``setup`` runs once when the
    server starts, before the first call; ``teardown`` once when it stops, after
    the calls in flight have finished. Subclasses need not call
    ``super().__init__()``.
    """

    @abc.abstractmethod
    def compute(self, input_tensor: Any) -> Any:
        """Return the output tensor for ``input_tensor`` (a ``torch.Tensor``)."""

    def get_info(self) -> Dict[str, str]:
        """Metadata reported by ``GetServiceInfo`` (string keys and values)."""
        return {"name": type(self).__name__}

    def setup(self) -> None:
        """Called once when the server starts."""

    def teardown(self) -> None:
        """Called once when the server stops."""


class ModelComputeFunction(ComputeFunction):
    """Host a ``torch.nn.Module``: eval mode, no autograd, inputs moved to ``device``.

    Args:
        model: the module (moved to ``device``).
        device: where the model runs ("cpu", "cuda", "cuda:1", ...).
        model_name: name reported by ``get_info()`` (default: the module's class name).
    """

    def __init__(self, model: Any, device: str = "cpu", model_name: Optional[str] = None) -> None:
        self.device = str(device)
        self.model = model.to(self.device)
        self.model.eval()
        self.model_name = model_name or type(model).__name__

    def compute(self, input_tensor: Any) -> Any:
        import torch

        with torch.no_grad():
            return self.model(input_tensor.to(self.device))

    def get_info(self) -> Dict[str, str]:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "name": self.model_name,
            "model_class": type(self.model).__name__,
            "device": self.device,
            "parameters": str(n_params),
        }


class TensorCodec:
    """How a tensor is turned into bytes on the wire.

    ``TensorCodec()`` is the built-in raw codec: the tensor's own bytes (C order,
    little-endian) with its dtype, sent without a copy by the C core. It is what a
    client and server use when no codec is given.

    The extension protocol (``encode`` returning ``(data, shape)`` or
    ``(data, shape, metadata)`` and the matching ``decode``) is what custom codecs
    implement; the methods below are the raw codec's, in Python, for reference and
    for tests.
    """

    #: The name that travels with the tensor.
    name: str = "raw"

    def encode(self, tensor: Any) -> Tuple[bytes, Tuple[int, ...]]:
        """Return the tensor's raw bytes and its shape."""
        from . import _tensor

        t, _ = _tensor.prepare(tensor)
        import numpy as np

        array = np.from_dlpack(t) if not isinstance(t, np.ndarray) else t
        return array.tobytes(), tuple(array.shape)

    def decode(self, data: Any, shape: Sequence[int], metadata: Optional[Dict[str, Any]] = None,
               dtype: str = "float32") -> Any:
        """Rebuild a tensor of ``dtype`` from raw bytes and a shape."""
        import torch

        return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(tuple(shape))

    def _is_builtin_raw(self) -> bool:
        return (type(self) is TensorCodec or
                (type(self).encode is TensorCodec.encode and type(self).decode is TensorCodec.decode))


def _check_codec(codec: Optional[TensorCodec]) -> None:
    """0.1 carries the raw codec only; refuse others clearly rather than ignore them."""
    if codec is None:
        return
    if not isinstance(codec, TensorCodec):
        raise TypeError(f"codec must be a TensorCodec, got {type(codec).__name__}")
    if not codec._is_builtin_raw():
        raise NotImplementedError(
            f"codec {type(codec).__qualname__}: custom and compressing codecs are not in this "
            "release yet; use the raw codec (codec=None)")
