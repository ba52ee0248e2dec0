"""The DLPack capsule protocol of received tensors, on its error paths.

A received tensor (``_core.DLPackTensor``) hands out one capsule. A consumer that
takes it renames the capsule and later calls the deleter; one that fails must leave
the capsule as it was. torch.from_dlpack does not always: when it cannot compute
strides it calls the deleter and raises with the capsule still unconsumed, so the
capsule's destructor would free the tensor a second time (the D1 crash). These tests
play such consumers with ctypes, on the real extension, and check that every order
of deleter call and capsule destruction frees the storage exactly once.
"""
from __future__ import annotations

import ctypes
import gc
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from splitlearn_comm import _core



def test_empty_shape_with_overflowing_strides_is_refused_before_any_tensor_exists() -> None:
    with pytest.raises(ValueError, match="overflow"):
        _core.decode("raw", b"", [0, 2**31 - 1, 2**31 - 1, 2**31 - 1], "float32", {})
    # an ordinary empty tensor still decodes
    holder = _core.decode("raw", b"", [0, 3], "float32", {})
    assert np.from_dlpack(holder).shape == (0, 3)


# Each scenario runs in a child process: a double free aborts the process, and the
# parent must see that as a failure rather than die with it.
CONSUMER = textwrap.dedent('''
    import ctypes, gc, sys
    import numpy as np
    from splitlearn_comm import _core

    api = ctypes.pythonapi
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    api.PyCapsule_SetName.restype = ctypes.c_int
    api.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]

    class DLTensor(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int),
                    ("device_id", ctypes.c_int), ("ndim", ctypes.c_int),
                    ("dtype", ctypes.c_uint32), ("shape", ctypes.c_void_p),
                    ("strides", ctypes.c_void_p), ("byte_offset", ctypes.c_uint64)]

    DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    class Managed(ctypes.Structure):
        _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                    ("deleter", DELETER)]

    class Versioned(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32),
                    ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER),
                    ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]

    scenario, versioned = sys.argv[1], sys.argv[2] == "1"
    name = b"dltensor_versioned" if versioned else b"dltensor"
    used = b"used_dltensor_versioned" if versioned else b"used_dltensor"
    for _ in range(200):
        holder = _core.decode("raw", bytes(4096), [1024], "float32", {})
        capsule = holder.__dlpack__(max_version=(1, 0)) if versioned else holder.__dlpack__()
        ptr = api.PyCapsule_GetPointer(capsule, name)
        managed = (Versioned if versioned else Managed).from_address(ptr)
        if scenario == "fail-after-deleter":      # torch's failing from_dlpack
            managed.deleter(ptr)
        elif scenario == "deleter-twice":          # a consumer that calls it twice
            assert api.PyCapsule_SetName(capsule, used) == 0
            managed.deleter(ptr)
            managed.deleter(ptr)
        elif scenario == "consumed-late-deleter":  # the normal order: rename, drop, delete
            assert api.PyCapsule_SetName(capsule, used) == 0
            deleter = managed.deleter
            del capsule, holder
            gc.collect()
            deleter(ptr)
            continue
        elif scenario == "never-consumed":
            pass
        del capsule, holder
        gc.collect()
    print("ok")
''')


@pytest.mark.parametrize("versioned", ["0", "1"], ids=["legacy", "versioned"])
@pytest.mark.parametrize("scenario", ["fail-after-deleter", "deleter-twice",
                                      "consumed-late-deleter", "never-consumed"])
def test_storage_is_freed_once_whatever_the_consumer_does(scenario: str, versioned: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CONSUMER, scenario, versioned],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_torch_from_dlpack_of_received_tensors_still_works() -> None:
    torch = pytest.importorskip("torch")
    holder = _core.decode("raw", np.arange(6, dtype="<f4").tobytes(), [2, 3], "float32", {})
    t = torch.from_dlpack(holder)
    del holder
    gc.collect()
    assert t.tolist() == [[0, 1, 2], [3, 4, 5]]
