"""Tensors in and out of the C core (internal).

Sending needs a contiguous CPU tensor that speaks DLPack; receiving gives a
DLPackTensor that torch.from_dlpack / numpy.from_dlpack wrap without a copy.
"""
from __future__ import annotations

import sys
from typing import Any, List, Tuple

import numpy as np
from numpy.typing import NDArray

from . import _core

# How a result is given back: ("torch", device) or ("numpy", None).
Restore = Tuple[str, Any]


_torch_module: Any = None


def _torch() -> Any:
    global _torch_module
    if _torch_module is None:
        import torch  # imported lazily: NumPy-only users never pay for it

        _torch_module = torch
    return _torch_module


def is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def prepare(obj: Any) -> Tuple[Any, Restore]:
    """Make `obj` sendable (contiguous, CPU, plain) and say how to give a result back."""
    torch = sys.modules.get("torch")
    if torch is not None and type(obj) is torch.Tensor and obj.is_cpu and \
            not obj.requires_grad and obj.layout is torch.strided and not obj.is_nested \
            and obj.is_contiguous() and not obj.is_conj() and not obj.is_neg():
        return obj, ("torch", obj.device)   # the common case, already sendable as it is
    if is_torch_tensor(obj):
        device = obj.device
        if getattr(obj, "is_nested", False):
            raise TypeError("nested tensors (torch.nested) cannot be sent: send their components "
                            "(t.unbind()) one by one, or a padded tensor "
                            "(torch.nested.to_padded_tensor(t, 0.0))")
        t = obj.detach()
        if t.layout != _torch().strided:
            raise TypeError(f"sparse and other non-strided tensors ({t.layout}) cannot be sent; "
                            "call .to_dense() first, or use a codec")
        if device.type != "cpu":
            t = t.cpu()  # the one copy to host; the result goes back to `device`
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        if not t.is_contiguous():
            t = t.contiguous()
        return t, ("torch", device)
    if isinstance(obj, np.generic):
        obj = np.asarray(obj)  # a 0-d array: the shape () is kept
    if isinstance(obj, np.ndarray):
        _check_numpy_dtype(obj.dtype)
        if obj.dtype.byteorder == ">" or (obj.dtype.byteorder == "=" and sys.byteorder == "big"):
            obj = obj.astype(obj.dtype.newbyteorder("<"))
        return _c_contiguous(obj), ("numpy", None)
    if hasattr(obj, "__dlpack__"):
        return obj, ("torch", None)
    raise TypeError("expected a torch.Tensor, a numpy.ndarray or an object with __dlpack__, "
                    f"got {type(obj).__name__}")


def sendable_as_is(obj: Any) -> bool:
    """True for a torch.Tensor that prepare() would return unchanged (contiguous,
    on the CPU, plain): the per-tensor fast paths' one test."""
    torch = sys.modules.get("torch")
    return torch is not None and type(obj) is torch.Tensor and obj.is_cpu and \
        not obj.requires_grad and obj.layout is torch.strided and not obj.is_nested \
        and obj.is_contiguous() and not obj.is_conj() and not obj.is_neg()


def exportable(obj: Any) -> Any:
    """What the binding exports for a prepared tensor: for a torch.Tensor its DLPack
    capsule (torch.utils.dlpack.to_dlpack costs a few hundred nanoseconds, the
    Tensor.__dlpack__ protocol method several microseconds); other objects as
    they are. A capsule is consumed once: make it right before each export."""
    torch = sys.modules.get("torch")
    if torch is not None and type(obj) is torch.Tensor:
        return torch.utils.dlpack.to_dlpack(obj)
    return obj


def _check_numpy_dtype(dtype: np.dtype[Any]) -> None:
    """Refuse NumPy dtypes that are not tensors of numbers (object, str, bytes, void, ...)."""
    if dtype.kind not in "biufc" or dtype.fields is not None:
        raise TypeError(f"NumPy arrays of dtype {dtype} cannot be sent: only bool, integer, "
                        "floating-point and complex dtypes can (convert strings or objects to "
                        "numbers first)")


def _c_contiguous(a: NDArray[Any]) -> NDArray[Any]:
    """`a` in C order, keeping its shape: np.ascontiguousarray makes 0-d arrays 1-d."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def dtype_name(dtype: Any) -> str:
    """A dtype's wire name, as PyTorch spells it ("float32", "bfloat16", "bool")."""
    if isinstance(dtype, str):
        return dtype.replace("torch.", "")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return str(np.dtype(dtype).name)


def restore(holder: Any, how: Restore) -> Any:
    """Wrap a received DLPackTensor as the caller's kind of tensor."""
    kind, device = how
    if kind == "numpy":
        return np.from_dlpack(holder)
    # the capsule, not the holder: torch's from_dlpack skips its stream and device
    # negotiation for a capsule (a few microseconds per tensor)
    t = _torch().from_dlpack(holder.__dlpack__())
    if device is not None and device.type != "cpu":
        t = t.to(device)
    return t


def convert_like(result: Any, how: Restore) -> Any:
    """A Python codec's decoded result as the caller's kind of tensor, on its device."""
    kind, device = how
    if kind == "numpy":
        return result.numpy() if is_torch_tensor(result) else np.asarray(result)
    if isinstance(result, np.ndarray):
        result = _torch().from_numpy(result)
    if device is not None and device.type != "cpu" and is_torch_tensor(result):
        result = result.to(device)
    return result


def as_tensor(holder: Any) -> Any:
    """A received tensor as torch.Tensor (server side; NumPy when torch is absent)."""
    try:
        torch = _torch()
    except ImportError:  # pragma: no cover - torch is a hard requirement of servers in practice
        return np.from_dlpack(holder)
    return torch.from_dlpack(holder.__dlpack__())  # a capsule: no stream negotiation


def from_dlpack() -> Any:
    """What wraps a received tensor's DLPack capsule as a torch.Tensor, no copy
    (for _core.rebuild); None where torch is absent (NumPy's from_dlpack takes
    objects with __dlpack__, not capsules: as_tensors() is the way there)."""
    global _from_dlpack
    if _from_dlpack is None:
        try:
            torch = _torch()
        except ImportError:  # pragma: no cover - torch is a hard requirement of servers in practice
            return None
        # what torch.from_dlpack does with a capsule, without its Python frame and
        # checks (a tenth of a microsecond per tensor); the public function otherwise
        _from_dlpack = getattr(torch._C, "_from_dlpack", None) or torch.from_dlpack
    return _from_dlpack


_from_dlpack: Any = None


def as_tensors(leaves: Any) -> List[Any]:
    """The tensors of received leaves as torch.Tensors (server side; NumPy when torch
    is absent): one DLPack capsule and one from_dlpack each, no copy."""
    try:
        from_dlpack = _torch().from_dlpack
    except ImportError:  # pragma: no cover - torch is a hard requirement of servers in practice
        return [np.from_dlpack(leaf.tensor) for leaf in leaves]
    return [from_dlpack(leaf.tensor.__dlpack__()) for leaf in leaves]


def prepare_result(obj: Any) -> Any:
    """Make a compute() result sendable: a contiguous CPU tensor without autograd."""
    if (is_torch_tensor(obj) or isinstance(obj, (np.ndarray, np.generic))
            or hasattr(obj, "__dlpack__")):
        return prepare(obj)[0]
    if isinstance(obj, (int, float, complex, bool)):
        return prepare(np.asarray(obj))[0]  # a 0-d array: the shape () is kept
    raise TypeError(f"compute() must return a tensor, got {type(obj).__name__}")


def decoded(obj: Any) -> Any:
    """A Python codec's decode() result, made exportable for the C core (which
    copies it into the received tensor's storage): a contiguous CPU tensor."""
    if is_torch_tensor(obj) or isinstance(obj, (np.ndarray, np.generic)) or hasattr(obj, "__dlpack__"):
        if is_torch_tensor(obj) and obj.layout != _torch().strided:
            obj = obj.to_dense()
        return prepare(obj)[0]
    raise TypeError(f"decode() must return a tensor (torch.Tensor or numpy.ndarray), "
                    f"got {type(obj).__name__}")


def export_slow(obj: Any) -> Any:
    """What the binding exports for a leaf that is not a plain CPU torch.Tensor
    (those it exports itself, in C): ``obj`` made sendable (to the CPU, contiguous,
    conjugate and negative bits resolved, NumPy byte order fixed; a Python number
    as a 0-d array), or the error that says why it cannot be."""
    return exportable(prepare_result(obj))


_core.set_export_fallback(export_slow)
