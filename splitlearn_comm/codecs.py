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


class CodecError(ValueError):
    """A codec failed, or a tensor arrived in a codec this side does not know."""


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
    """The Python codecs one side knows, by wire name (built-ins are always known)."""

    def __init__(self, codecs: Iterable[TensorCodec] = ()) -> None:
        self._codecs: Dict[str, TensorCodec] = {}
        for codec in codecs:
            self.register(codec)

    def register(self, codec: TensorCodec) -> None:
        if not isinstance(codec, TensorCodec):
            raise TypeError(f"codecs must be TensorCodec instances, got {type(codec).__name__}")
        if codec.is_python():
            self._codecs[codec.name] = codec

    def get(self, name: str) -> TensorCodec:
        try:
            return self._codecs[name]
        except KeyError:
            from . import _core

            known = ", ".join([_core.BUILTIN_CODECS, *self._codecs])
            raise CodecError(f"unknown codec {name!r}; known codecs: {known}") from None

    def names(self) -> list[str]:
        return list(self._codecs)


def encode_python(codec: TensorCodec, tensor: Any) -> tuple[Any, ...]:
    """Run a Python codec's encode: the (data, shape, dtype, name, metadata) the C core sends."""
    from . import _tensor

    try:
        result = codec.encode(tensor)
    except Exception as e:
        raise CodecError(f"codec {codec.name!r} failed to encode: {type(e).__name__}: {e}") from e
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise CodecError(f"codec {codec.name!r}: encode() must return (data, shape) or "
                         f"(data, shape, metadata), got {type(result).__name__}")
    data, shape = result[0], result[1]
    metadata: Dict[str, Any] = dict(result[2] or {}) if len(result) == 3 else {}
    metadata["sl.arity"] = len(result)
    return (data, tuple(int(d) for d in shape), _tensor.dtype_name(getattr(tensor, "dtype", "float32")),
            codec.name, metadata)


def decode_python(codec: TensorCodec, data: Any, shape: tuple[int, ...], metadata: Dict[str, Any]) -> Any:
    """Run a Python codec's decode with the arity its encoder used."""
    metadata = dict(metadata)
    arity = metadata.pop("sl.arity", 3)
    if arity == 2:
        return codec.decode(data, shape)
    return codec.decode(data, shape, metadata)
