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
    little-endian) with its dtype, sent without a copy. ``TensorCodec(dtype=torch.float16)``
    casts on the wire and restores the original dtype on decode. Both run in C
    without the GIL. Other built-ins live in :mod:`splitlearn_comm.codecs`.

    To write your own, subclass and implement ``encode`` and ``decode``::

        class MyCodec(TensorCodec):
            def encode(self, tensor):
                return data, shape              # or (data, shape, metadata)
            def decode(self, data, shape):      # or (data, shape, metadata)
                return tensor

    ``data`` may be bytes, bytearray or any buffer; ``decode`` receives a buffer
    (``memoryview``-compatible: ``np.frombuffer``, slicing and ``int.from_bytes``
    work). ``metadata`` is a dict of str to float, int, str, bytes or bool (NumPy
    scalars included) and reaches ``decode`` with the same Python types; ``decode``
    is called with the same arity ``encode`` returned. The codec's name (its
    ``codec_name`` class attribute, default the class's qualified name) travels
    with the tensor so that the receiver decodes with the same codec: register it
    on both sides (``codec=`` or ``codecs=[...]`` of the client and the server).
    Subclasses need not call ``super().__init__()``.
    """

    #: The name that travels with the tensor (default: the class's qualified name).
    codec_name: Optional[str] = None

    def __init__(self, dtype: Any = None) -> None:
        self.dtype = dtype

    # -- what kind of codec this is --------------------------------------------

    @property
    def name(self) -> str:
        """The codec's wire name."""
        c = self._c_codec()
        if c is not None:
            return str(c.name)
        return type(self).codec_name or type(self).__qualname__

    def is_python(self) -> bool:
        """True for a codec implemented in Python (a subclass overriding encode/decode)."""
        return getattr(type(self), "_builtin", False) is False and (
            type(self).encode is not TensorCodec.encode or type(self).decode is not TensorCodec.decode)

    def _spec(self) -> Optional[tuple[Any, ...]]:
        """The C codec's arguments (kind, wire_dtype, per_channel, axis, algorithm, level)."""
        if self.is_python():
            return None
        dtype = getattr(self, "dtype", None)
        if dtype is None:
            return (0, "", False, 0, 0, 0)
        from . import _tensor

        return (1, _tensor.dtype_name(dtype), False, 0, 0, 0)

    def _c_codec(self) -> Any:
        """The C codec object (cached), or None for a Python codec."""
        cached = self.__dict__.get("_c")
        if cached is not None or self.is_python():
            return cached
        spec = self._spec()
        if spec is None:
            return None
        from . import _core

        inner = getattr(self, "_inner_spec", lambda: None)()
        kind, wire_dtype, per_channel, axis, algorithm, level = spec
        c = _core.Codec(kind, wire_dtype, per_channel, axis, algorithm, level, inner)
        self.__dict__["_c"] = c
        return c

    def accepts(self, dtype: Any) -> bool:
        """Whether this codec takes tensors of ``dtype`` (a torch/NumPy dtype or its
        name). In a structure, a tensor the codec does not take goes raw. Built-in
        codecs answer for themselves (``Int8Codec`` and the casts take floating
        point, ``SparseCOOCodec`` and ``CompressedTensorCodec`` take any dtype); a
        Python codec takes floating point unless it overrides this."""
        from . import _tensor

        name = _tensor.dtype_name(dtype)
        if self.is_python():
            return name in ("float16", "bfloat16", "float32", "float64")
        return bool(self._c_codec().accepts(name))

    # -- the protocol ------------------------------------------------------------

    def encode(self, tensor: Any) -> Tuple[Any, Tuple[int, ...], Dict[str, Any]]:
        """Encode ``tensor``: ``(data, shape, metadata)``. Built-ins run in C."""
        from . import _tensor

        t, _ = _tensor.prepare(tensor)
        payload, metadata = self._c_codec().encode(t)
        metadata["sl.dtype"] = _tensor.dtype_name(t.dtype)
        return memoryview(payload), tuple(t.shape), metadata

    def decode(self, data: Any, shape: Sequence[int],
               metadata: Optional[Dict[str, Any]] = None) -> Any:
        """Rebuild the tensor ``encode`` described."""
        from . import _core, _tensor

        metadata = dict(metadata or {})
        dtype = metadata.pop("sl.dtype", "float32")
        holder = _core.decode(self.name, data, tuple(shape), dtype, metadata)
        return _tensor.as_tensor(holder)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_c", None)  # the cached C codec: made again on first use
        return state

    def __repr__(self) -> str:
        dtype = getattr(self, "dtype", None)
        return f"{type(self).__name__}()" if dtype is None else f"{type(self).__name__}(dtype={dtype})"


def _check_codec(codec: Optional[TensorCodec]) -> None:
    if codec is None:
        return
    if not isinstance(codec, TensorCodec):
        hint = ""
        if isinstance(codec, int) and not isinstance(codec, bool):
            hint = (" (the earlier splitlearn-comm took max_message_length in this place: "
                    "pass it by name, max_message_length=...)")
        raise TypeError(f"codec must be a TensorCodec, got {type(codec).__name__}{hint}")


def __getattr__(name: str) -> Any:
    # The earlier splitlearn-comm exported its codecs from here too; the built-in
    # codecs live in splitlearn_comm.codecs (imported lazily: it imports this module).
    if name in ("CompressedTensorCodec", "Float16Codec", "BFloat16Codec", "Int8Codec",
                "SparseCOOCodec"):
        from . import codecs

        return getattr(codecs, name)
    from ._moved import CORE, missing

    missing(__name__, name, CORE)
