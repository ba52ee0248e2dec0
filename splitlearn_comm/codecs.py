"""Built-in tensor codecs, implemented in C (no GIL), and the codec registry.

=======================  =================================================  ====================
codec                    what goes on the wire                              error
=======================  =================================================  ====================
``TensorCodec()``        the tensor's own bytes (default; zero-copy)        none
``TensorCodec(dtype=)``  the tensor cast to ``dtype``; restored on decode   the cast's rounding
``Float16Codec()``       float32 as IEEE half (bit-identical to .half())    half's rounding
``BFloat16Codec()``      float32 as bfloat16 (bit-identical to .bfloat16())  bfloat16's rounding
``Int8Codec(axis=None)`` 8-bit affine quantization, per tensor or channel   at most scale / 2
``CompressedTensorCodec``  zstd or zlib over another codec's payload       that codec's
``SparseCOOCodec()``     indices and values of the non-zero elements        none
=======================  =================================================  ====================
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

from . import _core
from .core import TensorCodec

__all__ = [
    "BFloat16Codec",
    "CodecError",
    "CodecRegistry",
    "CompressedTensorCodec",
    "Float16Codec",
    "Int8Codec",
    "SparseCOOCodec",
    "TensorCodec",
]

# sl_codec_kind numbers (csrc/core/codec.h)
_RAW, _CAST, _FLOAT16, _BFLOAT16, _INT8, _COMPRESSED, _SPARSE = range(7)
_ALGORITHMS = {"zstd": 0, "zlib": 1}


#: A codec failed (a Python codec's ``encode``/``decode`` raised or returned
#: something else than the protocol says), or a tensor arrived in a codec this side
#: does not know. A ``ValueError``; raised by the C core (``_core.CodecError``).
CodecError = _core.CodecError


class _Builtin(TensorCodec):
    _builtin = True
    _kind = _RAW

    def _spec(self) -> tuple[Any, ...]:
        return (self._kind, "", False, 0, 0, 0)


class Float16Codec(_Builtin):
    """float32 as IEEE 754 half precision on the wire (half the bytes).

    Conversion rounds to nearest even and is bit-identical to ``tensor.half()``;
    values beyond 65504 become inf. Only float32 tensors are encoded; a result of
    another dtype goes back raw.
    """

    _kind = _FLOAT16

    def __init__(self) -> None:
        pass


class BFloat16Codec(_Builtin):
    """float32 as bfloat16 on the wire (half the bytes, float32's range).

    Bit-identical to ``tensor.bfloat16()``; about 3 significant decimal digits.
    """

    _kind = _BFLOAT16

    def __init__(self) -> None:
        pass


class Int8Codec(_Builtin):
    """8-bit affine quantization: a quarter of float32's bytes.

    Each value is mapped to one of 256 levels spanning the tensor's (or the
    channel's, with ``axis``) range, widened to include 0 so that zeros (ReLU
    outputs) come back exact; the error is at most half a step,
    ``(max(hi, 0) - min(lo, 0)) / 255 / 2``, per element. NaN and inf cannot be
    quantized: such a tensor is refused (a server answering in int8 sends such a
    result raw instead).

    Args:
        axis: quantize per channel along this axis (e.g. 1 for NCHW activations);
            ``None`` uses one scale for the whole tensor.
    """

    _kind = _INT8

    def __init__(self, axis: Optional[int] = None) -> None:
        self.axis = axis

    def _spec(self) -> tuple[Any, ...]:
        return (_INT8, "", self.axis is not None, int(self.axis or 0), 0, 0)

    def __repr__(self) -> str:
        return f"Int8Codec(axis={self.axis})"


class CompressedTensorCodec(_Builtin):
    """Lossless zstd or zlib compression, optionally over another built-in codec.

    Args:
        compression_level: zstd 1-22 or zlib 0-9 (default 6).
        algorithm: ``"zstd"`` (fast) or ``"zlib"``.
        inner: a built-in codec applied first, e.g. ``BFloat16Codec()`` (default raw).
    """

    _kind = _COMPRESSED

    def __init__(self, compression_level: int = 6, algorithm: str = "zstd",
                 inner: Optional[TensorCodec] = None) -> None:
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm must be 'zstd' or 'zlib', not {algorithm!r}")
        if inner is not None and (not isinstance(inner, TensorCodec) or inner.is_python()
                                  or isinstance(inner, CompressedTensorCodec)):
            raise TypeError("inner must be a built-in, non-compressing codec")
        self.compression_level = compression_level
        self.algorithm = algorithm
        self.inner = inner

    def _spec(self) -> tuple[Any, ...]:
        return (_COMPRESSED, "", False, 0, _ALGORITHMS[self.algorithm], int(self.compression_level))

    def _inner_spec(self) -> Optional[tuple[Any, ...]]:
        return None if self.inner is None else self.inner._spec()

    def __repr__(self) -> str:
        return (f"CompressedTensorCodec(compression_level={self.compression_level}, "
                f"algorithm={self.algorithm!r}, inner={self.inner!r})")


class SparseCOOCodec(_Builtin):
    """Only the non-zero elements (flat indices and values): exact, any dtype.

    Pays off when fewer than about half the elements (a third for 8-byte dtypes)
    are non-zero, e.g. ReLU outputs or sparse gradients.
    """

    _kind = _SPARSE

    def __init__(self) -> None:
        pass


class CodecRegistry:
    """The Python codecs one side knows, by wire name (built-ins are always known).

    Each Python codec is entered into the C core's codec table
    (``_core.python_codec``: trampolines that take the GIL and call its
    ``encode``/``decode``); :attr:`table` is the ``_core.Codecs`` the core decodes
    with. The core does every encoding and decoding; nothing here runs a codec.
    """

    def __init__(self, codecs: Iterable[TensorCodec] = ()) -> None:
        self._codecs: Dict[str, TensorCodec] = {}
        self._c: Dict[str, Any] = {}
        self._table: Any = None
        for codec in codecs:
            self.register(codec)

    def register(self, codec: TensorCodec) -> None:
        if not isinstance(codec, TensorCodec):
            raise TypeError(f"codecs must be TensorCodec instances, got {type(codec).__name__}")
        if not codec.is_python() or self._codecs.get(codec.name) is codec:
            return
        from . import _tensor

        accepts = [d for d in _core.DTYPES.split(", ") if codec.accepts(d)]
        c = _core.python_codec(codec, codec.name, accepts, _tensor.as_tensor, _tensor.decoded)
        self._codecs[codec.name] = codec
        self._c[codec.name] = c
        self._table = None

    def get(self, name: str) -> TensorCodec:
        try:
            return self._codecs[name]
        except KeyError:
            raise CodecError(f"unknown codec {name!r}; known codecs: {self.table.names}") from None

    def c_codec(self, codec: TensorCodec) -> Any:
        """The ``_core.Codec`` the core encodes with (a Python codec is registered)."""
        if not codec.is_python():
            return codec._c_codec()
        self.register(codec)
        return self._c[codec.name]

    @property
    def table(self) -> Any:
        """The ``_core.Codecs`` of the Python codecs registered (made again after a change)."""
        table = self._table
        if table is None:
            table = self._table = _core.Codecs(list(self._c.values()))
        return table

    def names(self) -> list[str]:
        return list(self._codecs)
