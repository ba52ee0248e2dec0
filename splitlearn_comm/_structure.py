"""Structures of tensors on the wire (internal).

A call carries one tensor (the single form of the original contract) or a
structure: dicts (str keys), tuples and lists nested in any way, whose leaves are
tensors, ``None``, Python ``bool``/``int``/``float``/``str``. :func:`flatten`
turns a structure into its tensors, each named by its path ("past.0.1"), and a
pre-order list of nodes; :func:`unflatten` rebuilds it. The C core checks every
received structure (docs/protocol.md) before this module sees it.

Codec choice per tensor (:func:`codec_for`): ``codec=`` is one codec, applied to
the tensors it accepts (built-in codecs say which dtypes they take; a Python
codec's :meth:`TensorCodec.accepts` defaults to floating point), or a mapping
from name or path prefix to codec; the others go raw.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from . import _core, _tensor

# sl_node_kind (csrc/core/message.h) = StructureNode.Kind (proto/)
TENSOR, NONE, TUPLE, LIST, DICT, INT, FLOAT, BOOL, STRING = range(1, 10)

# sl_msg_form
SINGLE, MAP, STRUCTURE = 0, 1, 2

_INT64 = (-(1 << 63), (1 << 63) - 1)

Node = Tuple[int, int, Optional[str], Any]


_SCALAR_KINDS = {bool: BOOL, int: INT, float: FLOAT, str: STRING}


def _torch_tensor_type() -> Any:
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else ()


def is_tensor(obj: Any) -> bool:
    """True for what travels as a tensor: torch.Tensor, numpy arrays and scalars,
    anything with ``__dlpack__``."""
    return (isinstance(obj, (np.ndarray, np.generic)) or _tensor.is_torch_tensor(obj)
            or (not isinstance(obj, (tuple, list, dict, str, int, float, type(None), type))
                and hasattr(obj, "__dlpack__")))


def flatten(obj: Any) -> Tuple[int, List[Tuple[str, Any]], Optional[List[Node]]]:
    """``(form, [(name, tensor), ...], nodes)`` for ``obj``: a bare tensor is the
    single form (nodes None); anything else the structure form."""
    if is_tensor(obj):
        return SINGLE, [("", obj)], None
    tensor_type = _torch_tensor_type()
    fast = _core.flatten(obj, tensor_type)  # the common shapes, in one pass in C
    if fast is not None:
        return STRUCTURE, fast[0], fast[1]
    leaves: List[Tuple[str, Any]] = []
    nodes: List[Node] = []
    _walk(obj, "", None, leaves, nodes, set(), tensor_type)
    return STRUCTURE, leaves, nodes


# The walkers below are module-level functions that take their state as arguments:
# a nested function that calls itself is a reference cycle (the function, its
# closure cell), which would keep every tensor of the call alive until the cycle
# collector runs, and make each call feed that collector.

def _add_tensor(o: Any, path: str, key: Optional[str], leaves: List[Tuple[str, Any]],
                nodes: List[Node], names: Set[str]) -> None:
    name = path or "0"
    if name in names:
        raise ValueError(f"two tensors of the structure have the same name {name!r}; "
                         "dict keys containing '.' can collide with nested paths")
    names.add(name)
    leaves.append((name, o))
    nodes.append((TENSOR, 0, key, None))


def _walk(o: Any, path: str, key: Optional[str], leaves: List[Tuple[str, Any]],
          nodes: List[Node], names: Set[str], tensor_type: Any) -> None:
    tp = type(o)
    if tp is tensor_type:
        _add_tensor(o, path, key, leaves, nodes, names)
        return
    if tp is tuple or tp is list:
        nodes.append((TUPLE if tp is tuple else LIST, len(o), key, None))
        prefix = path + "." if path else ""
        for i, child in enumerate(o):
            _walk(child, prefix + str(i), None, leaves, nodes, names, tensor_type)
        return
    if tp is dict:
        nodes.append((DICT, len(o), key, None))
        prefix = path + "." if path else ""
        for k, child in o.items():
            if type(k) is not str:
                raise TypeError(f"dict keys must be str, got {type(k).__name__} ({k!r}) at "
                                f"{path or 'the root'!r}")
            _walk(child, prefix + k, k, leaves, nodes, names, tensor_type)
        return
    kind = _SCALAR_KINDS.get(tp)
    if o is None:
        nodes.append((NONE, 0, key, None))
    elif kind is None and is_tensor(o):
        _add_tensor(o, path, key, leaves, nodes, names)
    elif kind is not None or isinstance(o, (bool, int, float, str)):
        if kind is None:  # a subclass (an IntEnum, ...): its base kind
            kind = BOOL if isinstance(o, bool) else INT if isinstance(o, int) else \
                FLOAT if isinstance(o, float) else STRING
        if kind == INT and not _INT64[0] <= o <= _INT64[1]:
            raise ValueError(f"the int at {path or 'the root'!r} does not fit 64 bits")
        nodes.append((kind, 0, key, int(o) if kind in (BOOL, INT) else
                      float(o) if kind == FLOAT else str(o)))
    elif isinstance(o, (tuple, list)):
        _walk(tuple(o) if isinstance(o, tuple) else list(o), path, key, leaves, nodes, names,
              tensor_type)
    elif isinstance(o, Mapping):
        _walk(dict(o), path, key, leaves, nodes, names, tensor_type)
    else:
        raise TypeError(f"cannot send a {tp.__name__} at {path or 'the root'!r}: a "
                        "structure holds tensors, dict/tuple/list, None, bool, int, float "
                        "and str")


def unflatten(form: int, tensors: Sequence[Any], names: Sequence[str],
              nodes: Optional[Sequence[Node]]) -> Any:
    """The object :func:`flatten` described (the map form gives a dict by name)."""
    if form == SINGLE:
        return tensors[0]
    if form == MAP:
        return dict(zip(names, tensors))
    assert nodes is not None
    return _build(nodes, 0, iter(tensors))[0]


def _build(nodes: Sequence[Node], pos: int, it: Any) -> Tuple[Any, int]:
    """The value whose node is ``nodes[pos]`` and the position after its subtree."""
    kind, size, _key, value = nodes[pos]
    pos += 1
    if kind == TENSOR:
        return next(it), pos
    if kind == TUPLE or kind == LIST:
        items = []
        for _ in range(size):
            v, pos = _build(nodes, pos, it)
            items.append(v)
        return (tuple(items) if kind == TUPLE else items), pos
    if kind == DICT:
        out = {}
        for _ in range(size):
            key = nodes[pos][2]  # (read before _build moves pos on)
            out[key], pos = _build(nodes, pos, it)
        return out, pos
    if kind == BOOL:
        return bool(value), pos
    return value, pos  # NONE (None), INT, FLOAT, STRING


CodecSpec = Union[None, Any, Mapping[str, Any]]


def check_codec_spec(codec: CodecSpec, what: str = "codec") -> None:
    """TypeError unless ``codec`` is None, a TensorCodec or a mapping of str to
    TensorCodec."""
    from .core import TensorCodec

    if codec is None or isinstance(codec, TensorCodec):
        return
    if isinstance(codec, Mapping):
        for k, v in codec.items():
            if not isinstance(k, str) or not isinstance(v, TensorCodec):
                raise TypeError(f"a {what} mapping maps tensor names or path prefixes (str) to "
                                f"TensorCodec objects; got {k!r}: {type(v).__name__}")
        return
    hint = ""
    if isinstance(codec, int) and not isinstance(codec, bool):
        hint = (" (the earlier splitlearn-comm took max_message_length in this place: pass it "
                "by name, max_message_length=...)")
    raise TypeError(f"{what} must be a TensorCodec, a mapping of name to TensorCodec, or None; "
                    f"got {type(codec).__name__}{hint}")


def codec_for(spec: CodecSpec, name: str) -> Any:
    """The codec ``spec`` gives the tensor named ``name`` (before the dtype check):
    a mapping matches the exact name, else the longest key that is a path prefix
    ("past" matches "past.0.1")."""
    if spec is None or not isinstance(spec, Mapping):
        return spec
    if name in spec:
        return spec[name]
    best, best_len = None, -1
    for key, codec in spec.items():
        if name.startswith(key + ".") and len(key) > best_len:
            best, best_len = codec, len(key)
    return best


def accepts(codec: Any, dtype: str) -> bool:
    """Whether ``codec`` takes tensors of ``dtype`` (a wire name)."""
    try:
        return bool(codec.accepts(dtype))
    except Exception:  # a user codec whose accepts() fails takes nothing
        return False


def dtype_of(obj: Any) -> str:
    return _tensor.dtype_name(getattr(obj, "dtype", "float32"))


def restore_kind(obj: Any) -> _tensor.Restore:
    """How results go back to a caller who sent ``obj``: as torch tensors (on the
    device of its first torch tensor) unless every tensor it sent was NumPy."""
    found_numpy = False
    stack = [obj]
    while stack:
        o = stack.pop()
        if _tensor.is_torch_tensor(o):
            return ("torch", o.device)
        if isinstance(o, (np.ndarray, np.generic)):
            found_numpy = True
        elif isinstance(o, (tuple, list)):
            stack.extend(reversed(o))
        elif isinstance(o, Mapping):
            stack.extend(reversed(list(o.values())))
    if found_numpy or "torch" not in sys.modules:
        return ("numpy", None) if found_numpy else ("torch", None)
    return ("torch", None)


def tensor_leaves(obj: Any) -> List[Any]:
    """The tensors of a structure, in the order :func:`flatten` names them."""
    out: List[Any] = []
    _collect(obj, out, _torch_tensor_type())
    return out


def _collect(o: Any, out: List[Any], tensor_type: Any) -> None:
    tp = type(o)
    if tp is tensor_type:
        out.append(o)
    elif tp is tuple or tp is list:
        for child in o:
            _collect(child, out, tensor_type)
    elif tp is dict:
        for child in o.values():
            _collect(child, out, tensor_type)
    elif tp in _SCALAR_KINDS or o is None:
        pass
    elif is_tensor(o):
        out.append(o)
    elif isinstance(o, (tuple, list)):
        for child in o:
            _collect(child, out, tensor_type)
    elif isinstance(o, Mapping):
        for child in o.values():
            _collect(child, out, tensor_type)


def replace_tensors(obj: Any, tensors: Sequence[Any]) -> Any:
    """``obj`` with its tensors (in :func:`tensor_leaves` order) replaced by
    ``tensors``; containers are rebuilt with the same types, other leaves kept."""
    return _replace(obj, iter(tensors), _torch_tensor_type())


def _replace(o: Any, it: Any, tensor_type: Any) -> Any:
    tp = type(o)
    if tp is tensor_type:
        return next(it)
    if tp is tuple:
        return tuple([_replace(c, it, tensor_type) for c in o])
    if tp is list:
        return [_replace(c, it, tensor_type) for c in o]
    if tp is dict:
        return {k: _replace(c, it, tensor_type) for k, c in o.items()}
    if tp in _SCALAR_KINDS or o is None:
        return o
    if is_tensor(o):
        return next(it)
    if isinstance(o, tuple):
        return tuple(_replace(c, it, tensor_type) for c in o)
    if isinstance(o, list):
        return [_replace(c, it, tensor_type) for c in o]
    if isinstance(o, Mapping):
        return {k: _replace(c, it, tensor_type) for k, c in o.items()}
    return o
