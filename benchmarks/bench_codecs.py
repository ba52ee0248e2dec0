#!/usr/bin/env python3
"""Codec benchmark: the built-in C codecs against the same transforms in NumPy/PyTorch.

For three float32 tensors of shape (16, 512, 768) (25.2 MB each: a ReLU activation,
about half zeros; a dense Gaussian; a gradient-like tensor, the gradient of an MSE
loss through a Linear(768, 768) with respect to its input) this measures, per
built-in codec and per alternative written in NumPy/PyTorch/Python:

  - bytes on the wire (and their ratio to the raw float32 bytes), the maximum
    absolute error and the relative RMS error of the decoded tensor;
  - encode throughput (float32 tensor in -> wire bytes out) and decode throughput
    (wire bytes in -> float32 torch tensor out), in GB/s of the float32 tensor
    (25.2 MB / median time; GB = 10^9 bytes).

  codec                     compared with
  Float16Codec              tensor.half() / .float()  (torch default threads, and 1)
  BFloat16Codec             tensor.bfloat16() / .float()
  Int8Codec                 the guide's QuantizedTensorCodec (NumPy);
                            torch.quantize_per_tensor / dequantize
  CompressedTensorCodec     zlib.compress / zlib.decompress of the tensor's bytes
    zstd (level 6, the default; levels 3 and 1), zlib (level 6), zstd over bfloat16
                            (and the zstandard package, only if already installed)
  SparseCOOCodec            the guide's SparseTensorCodec; tensor.to_sparse_coo()
  (reference)               tensor.clone(): one fresh float32 copy

The C codecs are timed through their raw entry points, ``codec._c_codec().encode(t)``
and ``splitlearn_comm._core.decode(...)`` followed by ``torch.from_dlpack``; the
Python-level ``codec.encode`` / ``codec.decode`` are checked to give the same result.
The guide's codecs are copied from the user's guide (seed/extending.zh.md), with
SparseTensorCodec's decode index layout fixed (as written it pairs the wrong
coordinates for tensors of 2 and more dimensions; the timing is the same).

For each codec and tensor it times, after two warm-up runs, first everything that
runs on one thread (the C codec, NumPy, zlib, torch after torch.set_num_threads(1)),
then the torch rows on torch's default thread count. Within a phase every repetition
runs each row once, in turn (encode, then decode; the order reversed every other
repetition), so that slow spells of a noisy machine hit them alike; the figure is
the median over repetitions, timed with time.perf_counter. It also runs
bench_codec_kernels.measure() (the conversion kernels alone, into existing buffers)
on the same element count.

    python3 benchmarks/bench_codecs.py           # full run (a few minutes); writes the
                                                 # "Codecs" section of benchmarks/results.md
    python3 benchmarks/bench_codecs.py --quick   # smoke run: prints only

The rest of results.md (the round-trip section, other scripts' sections) is kept as
it is. See benchmarks/README.md for how to read the output.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

try:  # the installed (or editable) package first, else this checkout
    import splitlearn_comm  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is run
    sys.path.insert(0, ROOT)
    import splitlearn_comm  # noqa: F401

import numpy as np
import torch

from _report import cpu_model, write_data, write_section  # noqa: E402

from splitlearn_comm import _core
from splitlearn_comm.codecs import (BFloat16Codec, CompressedTensorCodec, Float16Codec,
                                    Int8Codec, SparseCOOCodec)
from splitlearn_comm.core import TensorCodec

try:  # only if it is already installed: this benchmark installs nothing
    import zstandard  # type: ignore
except ImportError:
    zstandard = None

SHAPE = (16, 512, 768)
BEGIN = "<!-- bench_codecs.py: begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_codecs.py: end -->"


# --------------------------------------------------------------------------------------
# The user's guide's codecs (seed/extending.zh.md, "量化张量编解码器" and
# "稀疏张量编解码器"), as written there, apart from the one fix noted below
# --------------------------------------------------------------------------------------

class QuantizedTensorCodec(TensorCodec):
    """具有 8 位量化的编解码器，用于减少带宽。"""

    def encode(self, tensor):
        array = tensor.cpu().numpy()
        min_val = array.min()
        max_val = array.max()
        scale = (max_val - min_val) / 255.0
        if scale == 0:
            scale = 1.0
        quantized = ((array - min_val) / scale).astype(np.uint8)
        data = quantized.tobytes()
        metadata = {'min': min_val, 'max': max_val, 'scale': scale}
        shape = tuple(tensor.shape)
        return data, shape, metadata

    def decode(self, data, shape, metadata):
        quantized = np.frombuffer(data, dtype=np.uint8).reshape(shape)
        array = quantized.astype(np.float32) * metadata['scale'] + metadata['min']
        tensor = torch.from_numpy(array)
        return tensor


class SparseTensorCodec(TensorCodec):
    """用于稀疏张量 (COO 格式) 的编解码器。"""

    def encode(self, tensor):
        sparse = tensor.to_sparse_coo()
        indices = sparse.indices().cpu().numpy()
        values = sparse.values().cpu().numpy().astype(np.float32)
        indices_bytes = indices.tobytes()
        values_bytes = values.tobytes()
        data = (len(indices_bytes).to_bytes(4, 'little') + indices_bytes + values_bytes)
        shape = tuple(tensor.shape)
        return data, shape

    def decode(self, data, shape):
        indices_len = int.from_bytes(data[:4], 'little')
        indices_bytes = data[4:4 + indices_len]
        values_bytes = data[4 + indices_len:]
        indices = np.frombuffer(indices_bytes, dtype=np.int64)
        values = np.frombuffer(values_bytes, dtype=np.float32)
        indices_tensor = torch.from_numpy(indices).view(-1, len(shape))
        values_tensor = torch.from_numpy(values)
        sparse = torch.sparse_coo_tensor(indices_tensor.t(), values_tensor, shape)
        return sparse.to_dense()


class FixedSparseTensorCodec(SparseTensorCodec):
    """The guide's codec with its decode's index layout fixed: ``indices`` is
    (ndim, nnz) in C order, so ``view(len(shape), -1)`` restores it (the guide's
    ``view(-1, len(shape)).t()`` is right only for 1-D tensors). Same work."""

    def decode(self, data, shape):
        indices_len = int.from_bytes(data[:4], 'little')
        indices_bytes = data[4:4 + indices_len]
        values_bytes = data[4 + indices_len:]
        indices = np.frombuffer(indices_bytes, dtype=np.int64)
        values = np.frombuffer(values_bytes, dtype=np.float32)
        indices_tensor = torch.from_numpy(indices).view(len(shape), -1)
        values_tensor = torch.from_numpy(values)
        sparse = torch.sparse_coo_tensor(indices_tensor, values_tensor, shape)
        return sparse.to_dense()


# --------------------------------------------------------------------------------------
# The tensors
# --------------------------------------------------------------------------------------

@dataclass
class Sample:
    key: str
    label: str
    how: str
    x: torch.Tensor


def make_samples(seed: int = 0) -> List[Sample]:
    g = torch.Generator().manual_seed(seed)
    act = torch.relu(torch.randn(SHAPE, generator=g))
    dense = torch.randn(SHAPE, generator=g)
    # the gradient a server would send back through the cut: d loss / d activation
    torch.manual_seed(seed)
    lin = torch.nn.Linear(SHAPE[-1], SHAPE[-1])
    inp = act.clone().requires_grad_()
    target = torch.randn(SHAPE, generator=g)
    torch.nn.functional.mse_loss(lin(inp), target).backward()
    grad = inp.grad.detach().contiguous()
    return [
        Sample("act", "activation", "`torch.relu(torch.randn(16, 512, 768))`", act),
        Sample("dense", "dense", "`torch.randn(16, 512, 768)`", dense),
        Sample("grad", "gradient",
               "`x.grad` for `x` = the activation above, after "
               "`mse_loss(nn.Linear(768, 768)(x), torch.randn(16, 512, 768)).backward()`",
               grad),
    ]


# --------------------------------------------------------------------------------------
# Implementations: encode(x) -> wire, decode(wire, shape) -> float32 tensor
# --------------------------------------------------------------------------------------

@dataclass
class Impl:
    group: str                      # the codec being compared ("float16", ...)
    label: str                      # the row's name
    encode: Callable[[torch.Tensor], Any]
    decode: Callable[[Any, Tuple[int, ...]], torch.Tensor]
    nbytes: Callable[[Any], int]    # bytes on the wire (payload; metadata not counted)
    threads: Optional[int] = 1      # torch threads while it runs (None: torch's default)
    is_c: bool = False
    codec: Optional[TensorCodec] = None
    uses: str = "torch"             # what computes it, for the threads column
    # results, per sample key
    enc_s: Dict[str, float] = field(default_factory=dict)
    dec_s: Dict[str, float] = field(default_factory=dict)
    enc_faults: Dict[str, float] = field(default_factory=dict)  # minor page faults per call
    dec_faults: Dict[str, float] = field(default_factory=dict)
    wire: Dict[str, Tuple[int, float, float, float]] = field(default_factory=dict)


def c_impl(group: str, label: str, codec: TensorCodec) -> Impl:
    c = codec._c_codec()
    name = c.name

    def enc(x):
        return c.encode(x)

    def dec(w, shape):
        return torch.from_dlpack(_core.decode(name, w[0], shape, "float32", w[1]))

    return Impl(group, label, enc, dec, lambda w: memoryview(w[0]).nbytes, is_c=True, codec=codec,
                uses="C")


def _np_view(x: torch.Tensor) -> memoryview:
    return memoryview(x.numpy()).cast("B")


def _from_bytes(data: Any, dtype: Any, shape: Tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(shape))


def torch_quint8_encode(x: torch.Tensor):
    mn, mx = torch.aminmax(x)
    lo, hi = min(float(mn), 0.0), max(float(mx), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = int(min(255, max(0, round(-lo / scale))))
    return torch.quantize_per_tensor(x, scale, zp, torch.quint8).int_repr(), scale, zp


def torch_quint8_decode(w, shape):
    q, scale, zp = w
    return torch._make_per_tensor_quantized_tensor(q, scale, zp).dequantize()


def torch_coo_encode(x: torch.Tensor):
    s = x.to_sparse_coo()
    return s.indices(), s.values()


def torch_coo_decode(w, shape):
    return torch.sparse_coo_tensor(w[0], w[1], shape, is_coalesced=True).to_dense()


def torch_variants(group: str, label: str, enc, dec, nbytes) -> List[Impl]:
    """A torch row on 1 thread and, unless that is torch's default, on the default."""
    rows = [Impl(group, label, enc, dec, nbytes, threads=1)]
    if torch.get_num_threads() != 1:
        rows.append(Impl(group, label, enc, dec, nbytes, threads=None))
    return rows


def make_impls() -> List[Impl]:
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    guide_q, guide_s = QuantizedTensorCodec(), FixedSparseTensorCodec()
    impls: List[Impl] = []
    impls += torch_variants("copy", "`x.clone()` / `w.clone()`",
                            lambda x: x.clone(), lambda w, s: w.clone(), nb)

    impls.append(c_impl("float16", "`Float16Codec()` (C)", Float16Codec()))
    impls += torch_variants("float16", "torch `x.half()` / `w.float()`",
                            lambda x: x.half(), lambda w, s: w.float(), nb)

    impls.append(c_impl("bfloat16", "`BFloat16Codec()` (C)", BFloat16Codec()))
    impls += torch_variants("bfloat16", "torch `x.bfloat16()` / `w.float()`",
                            lambda x: x.bfloat16(), lambda w, s: w.float(), nb)

    impls.append(c_impl("int8", "`Int8Codec()` (C)", Int8Codec()))
    impls.append(Impl("int8", "guide `QuantizedTensorCodec` (NumPy)",
                      lambda x: guide_q.encode(x),
                      lambda w, s: guide_q.decode(w[0], w[1], w[2]),
                      lambda w: len(w[0]), uses="NumPy"))
    impls += torch_variants("int8", "torch `quantize_per_tensor` / `dequantize`",
                            torch_quint8_encode, torch_quint8_decode,
                            lambda w: nb(w[0]))

    impls.append(c_impl("zstd", "`CompressedTensorCodec()` zstd level 6 (C)",
                        CompressedTensorCodec()))
    impls.append(c_impl("zstd", "`CompressedTensorCodec(3)` zstd level 3 (C)",
                        CompressedTensorCodec(3)))
    impls.append(c_impl("zstd", "`CompressedTensorCodec(1)` zstd level 1 (C)",
                        CompressedTensorCodec(1)))
    if zstandard is not None:
        for level in (6, 3, 1):
            cctx = zstandard.ZstdCompressor(level=level)
            dctx = zstandard.ZstdDecompressor()
            impls.append(Impl("zstd", f"`zstandard` level {level} (Python package)",
                              lambda x, c=cctx: c.compress(_np_view(x)),
                              lambda w, s, d=dctx: _from_bytes(
                                  d.decompress(w, max_output_size=4 * math.prod(s)),
                                  np.float32, s),
                              len, uses="zstandard"))
    impls.append(c_impl("zlib", "`CompressedTensorCodec(algorithm=\"zlib\")` level 6 (C)",
                        CompressedTensorCodec(algorithm="zlib")))
    impls.append(Impl("zlib", "`zlib.compress(level=6)` (Python stdlib)",
                      lambda x: zlib.compress(_np_view(x), 6),
                      lambda w, s: _from_bytes(zlib.decompress(w, bufsize=4 * math.prod(s)),
                                               np.float32, s),
                      len, uses="zlib"))

    impls.append(c_impl("zstd+bf16", "`CompressedTensorCodec(inner=BFloat16Codec())` (C)",
                        CompressedTensorCodec(inner=BFloat16Codec())))
    impls.append(Impl("zstd+bf16", "torch `x.bfloat16()` + `zlib.compress(level=6)`",
                      lambda x: zlib.compress(_np_view(x.bfloat16().view(torch.int16)), 6),
                      lambda w, s: _from_bytes(zlib.decompress(w, bufsize=2 * math.prod(s)),
                                               np.int16, s).view(torch.bfloat16).float(),
                      len, uses="torch + zlib"))

    impls.append(c_impl("sparse", "`SparseCOOCodec()` (C)", SparseCOOCodec()))
    impls.append(Impl("sparse", "guide `SparseTensorCodec` (torch + NumPy)",
                      lambda x: guide_s.encode(x), lambda w, s: guide_s.decode(w[0], w[1]),
                      lambda w: len(w[0]), uses="torch + NumPy"))
    impls += torch_variants("sparse", "torch `x.to_sparse_coo()` / `.to_dense()`",
                            torch_coo_encode, torch_coo_decode,
                            lambda w: nb(w[0]) + nb(w[1]))
    return impls


GROUP_TITLES = {
    "copy": "reference",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "zstd": "zstd",
    "zlib": "zlib",
    "zstd+bf16": "zstd over bf16",
    "sparse": "sparse COO",
}


# --------------------------------------------------------------------------------------
# Correctness checks (once per tensor, before timing)
# --------------------------------------------------------------------------------------

def _bits16(t: Any) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(memoryview(t), dtype=np.int16).copy())


def check(impls: List[Impl], s: Sample, problems: List[str], notes: List[str]) -> None:
    x = s.x
    for impl in impls:
        if impl.threads is None:  # a default-threads twin: same bytes as its 1-thread row
            continue
        w = impl.encode(x)
        y = impl.decode(w, tuple(x.shape))
        if y.dtype != torch.float32 or tuple(y.shape) != tuple(x.shape):
            problems.append(f"{s.label}: {impl.label} decoded {y.dtype} {tuple(y.shape)}")
            continue
        if impl.is_c:
            # the Python-level entry points give the same tensor
            data, shape, md = impl.codec.encode(x)
            y2 = impl.codec.decode(data, shape, md)
            if not torch.equal(y2, y):
                problems.append(f"{s.label}: {impl.label}: codec.encode/decode differ "
                                "from the raw C entry points")
        if impl.group in ("copy", "zstd", "zlib", "sparse") and not torch.equal(y, x):
            problems.append(f"{s.label}: {impl.label} is not lossless")
        if impl.group == "zstd+bf16" and not torch.equal(y, x.bfloat16().float()):
            problems.append(f"{s.label}: {impl.label} does not give x.bfloat16().float()")
        if impl.is_c and impl.group in ("float16", "bfloat16"):
            ref = x.half() if impl.group == "float16" else x.bfloat16()
            if not torch.equal(_bits16(w[0]), ref.view(torch.int16).reshape(-1)):
                problems.append(f"{s.label}: {impl.label}'s payload is not bit-identical "
                                f"to torch's")
            if not torch.equal(y, ref.float()):
                problems.append(f"{s.label}: {impl.label} decodes differently from torch")
        if impl.is_c and impl.group == "int8":
            # codec_quant.c's bound: scale/2, plus the final rounding to float32 (half
            # an ulp of the decoded value) and a relative 1e-12 of scale
            scale = float(w[1]["scale"])
            ya = y.abs()
            half_ulp = (torch.nextafter(ya, torch.full_like(ya, math.inf)) - ya).double() / 2
            excess = (y.double() - x.double()).abs() - scale / 2 - half_ulp
            if float(excess.max()) > 1e-12 * scale:
                problems.append(f"{s.label}: Int8Codec error exceeds scale/2 + half an ulp by "
                                f"{float(excess.max()):g} (scale {scale:g})")
        d = (y.double() - x.double())
        nz = x != 0
        flushed = int(((y == 0) & nz).sum())
        impl.wire[s.key] = (impl.nbytes(w),
                            float(d.abs().max()),
                            float(d.norm() / x.double().norm()),
                            flushed / max(1, int(nz.sum())))
        del w, y, d
    for impl in impls:
        if impl.threads is None:
            for twin in impls:
                if twin.label == impl.label and twin.threads == 1 and s.key in twin.wire:
                    impl.wire[s.key] = twin.wire[s.key]
    # the guide's sparse decode as written, on this 3-D tensor
    if s.key == "act":
        guide = SparseTensorCodec()
        data, shape = guide.encode(x)
        try:
            ok = torch.equal(guide.decode(data, shape), x)
        except Exception as e:  # noqa: BLE001
            ok = False
            notes.append(f"the guide's `SparseTensorCodec.decode`, as written, raises "
                         f"{type(e).__name__} on the 3-D activation")
        else:
            if not ok:
                notes.append("the guide's `SparseTensorCodec.decode`, as written, returns the "
                             "wrong tensor for the 3-D activation (its index layout is right "
                             "for 1-D tensors only); the rows above use it with that fixed, "
                             "which costs the same")


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_group(impls: List[Impl], s: Sample, min_reps: int, max_reps: int,
               budget_s: float) -> int:
    """Median encode and decode time of each implementation of one codec on one
    tensor. Two phases: first everything that runs on one thread (the C codecs,
    NumPy, zlib, torch set to 1 thread), then the torch rows on torch's default
    thread count; in each, every repetition runs all its rows in turn. Returns the
    repetition count."""
    x = s.x
    shape = tuple(x.shape)
    default_threads = torch.get_num_threads()
    phases = [[i for i in impls if i.threads == 1], [i for i in impls if i.threads is None]]
    reps = min_reps
    try:
        for members in phases:
            if not members:
                continue
            torch.set_num_threads(1 if members[0].threads == 1 else default_threads)
            wires = {}
            round_s = 0.0
            for impl in members:  # warm-up (twice), and the wire each decode starts from
                for k in range(2):
                    t0 = time.perf_counter()
                    w = impl.encode(x)
                    impl.decode(w, shape)
                    if k == 1:
                        round_s += time.perf_counter() - t0
                        wires[id(impl)] = w
                    del w
            reps = int(max(min_reps, min(max_reps, budget_s // max(round_s, 1e-9))))
            enc: Dict[int, List[float]] = {id(i): [] for i in members}
            dec: Dict[int, List[float]] = {id(i): [] for i in members}
            fe: Dict[int, int] = {id(i): 0 for i in members}
            fd: Dict[int, int] = {id(i): 0 for i in members}
            gc.collect()
            gc.disable()
            try:
                for r in range(reps):
                    # alternate the order, so that no row always follows the same one
                    for impl in (members if r % 2 == 0 else members[::-1]):
                        wire = wires[id(impl)]
                        f0 = _minflt()
                        t0 = time.perf_counter()
                        w = impl.encode(x)
                        t1 = time.perf_counter()
                        f1 = _minflt()
                        del w
                        f2 = _minflt()
                        t2 = time.perf_counter()
                        y = impl.decode(wire, shape)
                        t3 = time.perf_counter()
                        f3 = _minflt()
                        del y
                        enc[id(impl)].append(t1 - t0)
                        dec[id(impl)].append(t3 - t2)
                        fe[id(impl)] += f1 - f0
                        fd[id(impl)] += f3 - f2
            finally:
                gc.enable()
            for impl in members:
                impl.enc_s[s.key] = statistics.median(enc[id(impl)])
                impl.dec_s[s.key] = statistics.median(dec[id(impl)])
                impl.enc_faults[s.key] = fe[id(impl)] / reps
                impl.dec_faults[s.key] = fd[id(impl)] / reps
            del wires
    finally:
        torch.set_num_threads(default_threads)
    return reps


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def _cpu_flags() -> str:
    want = ["avx2", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return ", ".join(w for w in want if w in have) or "none of " + ", ".join(want)
    except OSError:
        pass
    return "unknown"


def _pkg_version(name: str) -> str:
    try:
        return subprocess.check_output(["pkg-config", "--modversion", name], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "unknown"


def machine_info() -> Dict[str, str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        cap = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{usable} usable (nproc), {os.cpu_count()} online",
        "load average at the start (1, 5, 15 min)": _load(),
        "cpu": cpu_model(),
        "cpu features": _cpu_flags(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (ATen CPU capability {cap}, "
                 f"default threads {torch.get_num_threads()})",
        "numpy": np.__version__,
        "zlib": f"Python's {zlib.ZLIB_RUNTIME_VERSION}; the C core's {_pkg_version('zlib')}",
        "libzstd (C core)": _pkg_version("libzstd"),
        "zstandard (Python)": getattr(zstandard, "__version__", "?") if zstandard
        else "not installed (its rows are left out)",
        "splitlearn-comm": getattr(splitlearn_comm, "__version__", "?"),
    }


def _gbs(nbytes: int, s: Optional[float]) -> str:
    if s is None:
        return "-"
    v = nbytes / s / 1e9
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _err(v: float) -> str:
    return "0" if v == 0 else f"{v:.2e}"


def _threads(impl: Impl) -> str:
    if impl.threads is None:
        return f"{torch.get_num_threads()} (default)"
    return "1" if impl.uses == "torch" else f"1 ({impl.uses})"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def wire_table(impls: List[Impl], s: Sample) -> List[str]:
    raw = s.x.numel() * 4
    lines = ["| codec | implementation | bytes on the wire | wire / raw | max abs error "
             "| relative RMS error | non-zeros decoded as 0 |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for impl in impls:
        if impl.threads is None or s.key not in impl.wire or impl.group == "copy":
            continue
        n, mx, rel, flushed = impl.wire[s.key]
        lines.append(f"| {GROUP_TITLES[impl.group]} | {impl.label} | {_size(n)} | {n / raw:.3f} "
                     f"| {_err(mx)} | {_err(rel)} | {flushed * 100:.2f}% |")
    return lines


def speed_table(impls: List[Impl], samples: List[Sample]) -> List[str]:
    head = "| codec | implementation | threads |"
    rule = "|---|---|--:|"
    for s in samples:
        head += f" {s.label} encode | {s.label} decode |"
        rule += "--:|--:|"
    lines = [head, rule]
    for impl in impls:
        row = f"| {GROUP_TITLES[impl.group]} | {impl.label} | {_threads(impl)} |"
        for s in samples:
            nbytes = s.x.numel() * 4
            row += (f" {_gbs(nbytes, impl.enc_s.get(s.key))} "
                    f"| {_gbs(nbytes, impl.dec_s.get(s.key))} |")
        lines.append(row)
    return lines


def kernel_table(res: Dict[str, Any]) -> List[str]:
    nbytes = res["n"] * 4
    lines = ["| conversion | torch threads | torch fresh (`x.half()`...) | torch warm "
             "(`out.copy_(x)`) | C warm (`sl_f32_to_f16()`...) | C warm / torch warm |",
             "|---|--:|--:|--:|--:|--:|"]
    for threads, name, fresh, warm, ours in res["rows"]:
        lines.append(f"| {name} | {threads} | {_gbs(nbytes, fresh)} | {_gbs(nbytes, warm)} "
                     f"| {_gbs(nbytes, ours)} | {warm / ours:.2f}x |")
    return lines


def _find(impls: List[Impl], group: str, c: bool, threads: Optional[int] = None) -> Optional[Impl]:
    for i in impls:
        if i.group == group and i.is_c == c and (c or i.threads == threads) \
                and (c or i.label.startswith("torch")):
            return i
    return None


def _ratio_text(a: Impl, b: Impl, samples: List[Sample], which: str) -> Tuple[float, float, float]:
    """min, geometric mean, max over the samples of time(b) / time(a) (> 1: a faster)."""
    d_a = a.enc_s if which == "enc" else a.dec_s
    d_b = b.enc_s if which == "enc" else b.dec_s
    rs = [d_b[s.key] / d_a[s.key] for s in samples if s.key in d_a and s.key in d_b]
    gm = math.exp(sum(math.log(r) for r in rs) / len(rs))
    return min(rs), gm, max(rs)


def _verdict(lo: float, gm: float, hi: float) -> str:
    if hi < 0.995:
        return f"the C codec slower on every tensor, by {_pct(1 - hi, 1 - lo)}"
    if lo > 1.005:
        return f"the C codec faster on every tensor, by {_pct(lo - 1, hi - 1)}"
    return f"either way, within {max(1 - lo, hi - 1) * 100:.0f}%"


def _pct(a: float, b: float) -> str:
    a, b = round(a * 100), round(b * 100)
    return f"{a}%" if a == b else f"{a}-{b}%"


def _by(impls: List[Impl], group: str, pred: Callable[[Impl], bool]) -> Optional[Impl]:
    for i in impls:
        if i.group == group and pred(i):
            return i
    return None


def _rng(vals: Sequence[float]) -> str:
    lo, hi = min(vals), max(vals)
    f = (lambda v: f"{v:.2f}") if hi < 10 else (lambda v: f"{v:.1f}")
    return f(lo) if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}"


def reading(impls: List[Impl], samples: List[Sample], kernels: Optional[Dict[str, Any]]
            ) -> List[str]:
    out: List[str] = []
    by_key = {s.key: s for s in samples}
    keys = [s.key for s in samples]
    raw = math.prod(SHAPE) * 4
    default_threads = torch.get_num_threads()

    def gbs(i: Impl, which: str) -> List[float]:
        d = i.enc_s if which == "enc" else i.dec_s
        return [raw / d[k] / 1e9 for k in keys if k in d]

    # 1. float16 / bfloat16 against torch
    lines = []
    gms = []
    for group, tname in (("float16", ".half() / .float()"), ("bfloat16", ".bfloat16() / .float()")):
        c = _find(impls, group, True)
        t = _find(impls, group, False, 1)
        if c is None or t is None:
            continue
        parts = []
        for which, word in (("enc", "encode"), ("dec", "decode")):
            lo, gm, hi = _ratio_text(c, t, samples, which)
            gms.append((gm, f"{group} {word}"))
            span = f" ({lo:.2f}-{hi:.2f}x)" if f"{lo:.2f}" != f"{hi:.2f}" else ""
            parts.append(f"{word} {gm:.2f}x{span}: {_verdict(lo, gm, hi)}")
        lines.append(f"`{group}` against torch `{tname}` on 1 thread: " + "; ".join(parts))
    if lines:
        low = [name for gm, name in gms if gm < 0.97]
        worst = min(gm for gm, _ in gms)
        if not low:
            answer = "yes (every geometric mean at or above torch's, or within 3% of it)"
        elif worst >= 0.9:
            answer = ("nearly: every geometric mean is within 10% of torch's, but "
                      + ", ".join(low) + " stayed below it")
        else:
            answer = "no: " + ", ".join(low) + " fell more than 3% behind torch's"
        out.append("- **Are the C float16/bfloat16 conversions at least as fast as PyTorch's "
                   f"own?** On one thread, {answer}. Below, torch time / C time (above 1: the "
                   "C codec is faster), geometric mean over the tensors with the range in "
                   "brackets, both sides allocating their output:")
        out += [f"  - {x}." for x in lines]
        if worst >= 0.9:
            out.append("  - Between runs of this script on this machine these ratios move by "
                       "about 10% either way (the decodes most), so read them as on par rather "
                       "than as a winner.")
    if kernels:
        one = [r for r in kernels["rows"] if r[0] == 1]
        many = [r for r in kernels["rows"] if r[0] != 1]
        if one:
            txt = ("  - The kernels alone, into existing buffers (the kernel table), torch "
                   "`out.copy_(x)` time / C time on 1 thread: "
                   + ", ".join(f"{r[1]} {r[3] / r[4]:.2f}x" for r in one) + ".")
            if many:
                sp = statistics.median(r[4] / r[3] for r in many)
                if sp > 1.2:
                    txt += (f" There, with calls back to back, torch on {many[0][0]} threads "
                            f"converted about {sp:.1f}x as fast as the single-threaded C "
                            "kernel: the C codecs do not split one conversion across threads "
                            "(a server runs several calls at once instead).")
                else:
                    rs = [r[4] / r[3] for r in many]
                    txt += (f" torch on {many[0][0]} threads converted at "
                            f"{_rng(rs)}x the single-threaded C kernel's speed there (see "
                            "the next point on torch's default threads).")
            out.append(txt)
    faults = []
    for group in ("float16", "bfloat16"):
        c, t = _find(impls, group, True), _find(impls, group, False, 1)
        if c is not None and t is not None and "act" in c.enc_faults and "act" in t.enc_faults:
            faults.append(f"{group}: C {c.enc_faults['act']:.0f} / {c.dec_faults['act']:.0f}, "
                          f"torch {t.enc_faults['act']:.0f} / {t.dec_faults['act']:.0f}")
    if faults:
        most = max(max(i.enc_faults.get("act", 0), i.dec_faults.get("act", 0))
                   for i in impls if i.group in ("float16", "bfloat16") and i.threads == 1)
        txt = ("  - Minor page faults per call on the activation, encode / decode, 1 thread: "
               + "; ".join(faults) + ". The C core takes its output buffers from a pool of "
               "freed blocks (the same shape every step, as in training); torch gets them "
               "from `malloc`")
        if most < 100:
            txt += (", which here handed back memory already touched, so these rows compare "
                    "the conversions plus the allocator, not fresh pages.")
        else:
            txt += (", which may hand back fresh pages that fault on first touch; where one "
                    "side faults, that more than the conversion makes the gap.")
        out.append(txt)
    copy1 = _by(impls, "copy", lambda i: i.threads == 1)
    copyd = _by(impls, "copy", lambda i: i.threads is None)
    if copy1 and copyd and default_threads != 1:
        ratios = [copy1.enc_s[k] / copyd.enc_s[k] for k in keys if k in copyd.enc_s]
        if ratios and min(ratios) < 0.8 and max(ratios) > 1.2:
            how = ("sometimes far slower than on 1 thread and sometimes faster (an OpenMP "
                   "region ends when its slowest thread does, and on this VM the second "
                   "thread often seems to start late)")
        elif ratios and max(ratios) < 0.8:
            how = ("slower than on 1 thread throughout (an OpenMP region ends when its "
                   "slowest thread does, and on this VM the second thread often seems to "
                   "start late)")
        elif ratios and min(ratios) > 1.2:
            how = "faster than on 1 thread throughout, both vCPUs being free"
        else:
            how = "about as fast as on 1 thread"
        flat = ""
        times = sorted(t for i in impls if i.threads is None and i.group != "sparse"
                       for d in (i.enc_s, i.dec_s) for t in d.values())
        if times:
            mid = statistics.median(times)
            near = [t for t in times if abs(t - mid) <= 0.05 * mid]
            if len(near) >= len(times) / 2:
                flat = (f" Of the {len(times)} default-thread timings of the non-sparse "
                        f"rows, {len(near)} came out at {mid * 1e3:.1f} ms give or take 5%, "
                        "whatever the work (a copy, a conversion, a dequantization): a fixed "
                        "wait of the 2-thread region on this VM, not the cost of the work.")
        out.append(
            f"- **torch on its default {default_threads} threads** was {how}: a plain "
            f"`clone()` went at {_rng(gbs(copyd, 'enc'))} GB/s across the tensors against "
            f"{_rng(gbs(copy1, 'enc'))} GB/s on 1 thread.{flat} Read the 1-thread rows as "
            "the comparison of code (the C codecs use one thread), the default-thread rows "
            "as what this machine gave at the time.")
    # 2. the other codecs' speed
    i8 = _find(impls, "int8", True)
    i8t = _find(impls, "int8", False, 1)
    i8g = _by(impls, "int8", lambda i: "guide" in i.label)
    if i8 and i8t and i8g:
        out.append(
            f"- **`Int8Codec` is the slow one among the casts**: it encodes at "
            f"{_rng(gbs(i8, 'enc'))} GB/s, against {_rng(gbs(i8g, 'enc'))} GB/s for the "
            f"guide's NumPy codec and {_rng(gbs(i8t, 'enc'))} GB/s for torch's "
            f"`quantize_per_tensor` on one thread; it decodes at {_rng(gbs(i8, 'dec'))} GB/s "
            f"against torch's {_rng(gbs(i8t, 'dec'))}. Its loops are scalar, in double "
            "precision, with a division and a `floor` per element (csrc/core/codec_quant.c)"
            + ("; its errors are torch's to 1% (half a step at most)"
               if all(k in i8.wire and k in i8t.wire
                      and abs(i8.wire[k][2] - i8t.wire[k][2]) <= 0.01 * i8t.wire[k][2]
                      for k in keys) else "")
            + ". The "
            "guide's `QuantizedTensorCodec` truncates instead of rounding, so its error "
            "reaches a whole step "
            + (f"(max abs {i8g.wire['act'][1]:.2e} on the activation against "
               f"{i8.wire['act'][1]:.2e})" if "act" in i8g.wire and "act" in i8.wire else "")
            + ".")
    sp = _find(impls, "sparse", True)
    spt = _find(impls, "sparse", False, 1)
    spg = _by(impls, "sparse", lambda i: "guide" in i.label)
    if sp and spt and spg:
        out.append(
            f"- **Sparse COO**: `SparseCOOCodec` encodes at {_rng(gbs(sp, 'enc'))} GB/s, "
            f"torch's `to_sparse_coo()` (1 thread) at {_rng(gbs(spt, 'enc'))} and the guide's "
            f"codec at {_rng(gbs(spg, 'enc'))}; decoding, {_rng(gbs(sp, 'dec'))} against "
            f"{_rng(gbs(spt, 'dec'))} and {_rng(gbs(spg, 'dec'))} GB/s. torch's format also "
            "sends an int64 index per dimension (28 bytes per non-zero here, 8 for the C "
            "codec).")
    z = {lvl: _by(impls, "zstd", lambda i, l=lvl: i.is_c and f"zstd level {l}" in i.label)
         for lvl in (6, 3, 1)}
    zl = _find(impls, "zlib", True)
    zlp = _by(impls, "zlib", lambda i: not i.is_c)
    zb = _find(impls, "zstd+bf16", True)
    if all(z.values()) and zl and zlp and zb and "act" in z[6].wire:
        a = lambda i: raw / i.enc_s["act"] / 1e9  # noqa: E731
        same = all(0.85 <= zlp.enc_s[k] / zl.enc_s[k] <= 1.15 for k in keys)
        out.append(
            f"- **Compression costs CPU**: on the activation, zstd level 6 (the codec's "
            f"default) encodes at {a(z[6]):.2f} GB/s, level 3 at {a(z[3]):.2f}, level 1 at "
            f"{a(z[1]):.2f}, for {z[6].wire['act'][0] / raw:.3f} / "
            f"{z[3].wire['act'][0] / raw:.3f} / {z[1].wire['act'][0] / raw:.3f} of the raw "
            f"bytes: level 6 takes {z[6].enc_s['act'] / z[3].enc_s['act']:.1f}x level 3's "
            f"time and {z[6].enc_s['act'] / z[1].enc_s['act']:.1f}x level 1's"
            + (f"; on the dense tensor all three send about {z[6].wire['dense'][0] / raw:.3f}"
               if "dense" in z[6].wire and "dense" in z[1].wire
               and abs(z[6].wire["dense"][0] - z[1].wire["dense"][0]) < 0.005 * raw
               else "")
            + f". zlib encodes at {a(zl):.2f} GB/s and "
            f"decodes at {raw / zl.dec_s['act'] / 1e9:.2f}, against zstd level 6's "
            f"{raw / z[6].dec_s['act'] / 1e9:.2f}; "
            + ("the C zlib codec and Python's `zlib.compress` run the same library at the "
               "same level and go at the same speed (the C one without the GIL). "
               if same else "")
            + f"zstd over bfloat16 encodes at {_rng(gbs(zb, 'enc'))} GB/s. A 25 MB tensor "
            "takes 25 ms at 1 GB/s of network; compress only when the link is slower than "
            "the encoder.")
    # 3. which codec for which case (sizes and errors: deterministic for the seed)
    def w(group: str, key: str) -> Optional[Tuple[int, float, float, float]]:
        i = _find(impls, group, True)
        return None if i is None else i.wire.get(key)

    act, gr, de = "act", "grad", "dense"
    if act in by_key:
        sp_, zs, zb_, i8_ = w("sparse", act), w("zstd", act), w("zstd+bf16", act), w("int8", act)
        if sp_ and zs and zb_ and i8_:
            zero = float((by_key[act].x == 0).float().mean())
            out.append(
                f"- **ReLU activation** ({zero * 100:.0f}% zeros): `SparseCOOCodec` sends "
                f"{sp_[0] / raw:.2f} of the raw bytes (a 4-byte index and a 4-byte value per "
                f"non-zero), so at half zeros it saves nothing; it pays only when clearly "
                f"fewer than half the elements are non-zero. Lossless zstd gets "
                f"{zs[0] / raw:.2f}. The best trade here is "
                f"`CompressedTensorCodec(inner=BFloat16Codec())`: {zb_[0] / raw:.2f} of the "
                f"raw bytes (the zeros compress away, the rest is bfloat16) with bfloat16's "
                f"error (relative RMS {zb_[2]:.1e}), against `Int8Codec`'s "
                f"{i8_[0] / raw:.2f} with relative RMS {i8_[2]:.1e}.")
    if de in by_key:
        zs, f16, i8_, sp_ = w("zstd", de), w("float16", de), w("int8", de), w("sparse", de)
        if zs and f16 and i8_ and sp_:
            out.append(
                f"- **Dense Gaussian**: lossless compression barely helps (zstd "
                f"{zs[0] / raw:.2f}: random mantissas do not compress) and `SparseCOOCodec` "
                f"doubles the bytes ({sp_[0] / raw:.2f}). For half the bytes use "
                f"`Float16Codec` (relative RMS {f16[2]:.1e}) or `BFloat16Codec`; for a "
                f"quarter, `Int8Codec` (relative RMS {i8_[2]:.1e}).")
    if gr in by_key:
        f16, bf, i8_ = w("float16", gr), w("bfloat16", gr), w("int8", gr)
        if f16 and bf and i8_:
            mag = float(by_key[gr].x.abs().max())
            out.append(
                f"- **Gradient** (largest magnitude {mag:.1e}, nearly all values below "
                f"float16's smallest normal, 6.1e-05): `Float16Codec` loses "
                f"{f16[2] * 100:.1f}% relative RMS and decodes {f16[3] * 100:.1f}% of the "
                f"non-zero values as 0; `BFloat16Codec` (float32's range) keeps it to "
                f"{bf[2] * 100:.2f}% and `Int8Codec` (its scale comes from the tensor's own "
                f"range) to {i8_[2] * 100:.2f}%. Send gradients as bfloat16 or int8, or scale "
                f"them before float16.")
    return out


def render(impls: List[Impl], samples: List[Sample], info: Dict[str, str],
           kernels: Optional[Dict[str, Any]], kernel_note: str, reps: Dict[str, List[int]],
           problems: List[str], notes: List[str], args: argparse.Namespace,
           elapsed_s: float) -> str:
    raw = math.prod(SHAPE) * 4
    out = [BEGIN, "", "# Codecs", ""]
    if args.quick:
        out += ["**Quick (smoke) run: too few repetitions for these figures to mean "
                "anything.**", ""]
    rep_lo = min(min(v) for v in reps.values())
    rep_hi = max(max(v) for v in reps.values())
    out += [
        "Generated by `benchmarks/bench_codecs.py` (how to run and read it: "
        "`benchmarks/README.md`). Each built-in codec of `splitlearn_comm.codecs` (C, one "
        "thread, GIL released) against the same transform written with PyTorch, NumPy or "
        "Python's `zlib`, on float32 tensors of shape (16, 512, 768) "
        f"({raw / 1e6:.1f} MB). Encode: the float32 tensor in, the wire bytes out; decode: "
        "the wire bytes in, a float32 torch tensor out. The C codecs are timed through "
        "their raw entry points (`codec._c_codec().encode(t)`; `_core.decode(...)` then "
        "`torch.from_dlpack`); `codec.encode` / `codec.decode` were checked to give the same "
        "tensors. For each codec and tensor, first everything that runs on one thread (the "
        "C codec, NumPy, `zlib`, torch set to 1 thread), then the torch rows on torch's "
        "default thread count; within each phase every repetition runs all the rows in "
        f"turn. The figures are medians of {rep_lo}-{rep_hi} repetitions after two warm-up "
        "runs (`time.perf_counter`).",
        "",
        "Machine and software:",
        "",
    ]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [
        f"- load average at the end: {_load()}",
        f"- command: `{' '.join(['benchmarks/bench_codecs.py'] + args.argv)}` "
        f"({elapsed_s:.0f} s)",
        "",
        "**These figures come from a small, shared, noisy 2-vCPU virtual machine**; the "
        "same command run twice can differ by 10-30%. Compare rows of one run only. Bytes "
        "and errors do not depend on the machine (the tensors are seeded).",
        "",
        "## Tensors",
        "",
        "| tensor | made by | zeros | max abs value | std |",
        "|---|---|--:|--:|--:|",
    ]
    for s in samples:
        x = s.x
        out.append(f"| {s.label} | {s.how} | {float((x == 0).float().mean()) * 100:.1f}% "
                   f"| {float(x.abs().max()):.3g} | {float(x.std()):.3g} |")
    out += [
        "",
        "## Bytes on the wire",
        "",
        f"Raw float32: {_size(raw)}. `bytes on the wire`: the payload only (the codecs' "
        "metadata, a few scalars, is not counted). `relative RMS error`: "
        "‖decoded − x‖₂ / ‖x‖₂. `non-zeros decoded as 0`: the share of x's non-zero "
        "elements that come back as 0 (underflow). torch's float16/bfloat16 conversions "
        "give the same bytes as the C codecs (checked bit for bit), so they have no rows "
        "of their own.",
    ]
    for s in samples:
        out += ["", f"### {s.label[0].upper() + s.label[1:]}: {s.how}", ""]
        rows = [i for i in impls if not (i.group in ("float16", "bfloat16") and not i.is_c)]
        out += wire_table(rows, s)
    out += [
        "",
        "## Encode and decode throughput",
        "",
        f"GB/s of the float32 tensor ({raw / 1e6:.1f} MB / median time; GB = 10^9 bytes), "
        "higher is faster. `threads`: the threads the row computes with (the C codecs, NumPy "
        "and `zlib` always use one; torch rows ran with `torch.set_num_threads(1)` and with "
        "torch's default). Every implementation allocates its output, as a codec must, so "
        "these include the cost of getting that memory (page faults where the allocator "
        "hands back fresh pages), which the kernel table below leaves out. The first rows, "
        "a plain copy (`clone()`), give the machine's scale.",
        "",
    ]
    out += speed_table(impls, samples)
    out += ["", "## float16/bfloat16 conversion kernels alone", ""]
    if kernels:
        out += [
            f"From `benchmarks/bench_codec_kernels.py` (`measure()`), {kernels['n']:,} "
            f"elements (the tensors above), medians of {kernels['reps']} repetitions, GB/s of "
            "the float32 side as above. The C kernels are the library's own sources, "
            "compiled by that script with gcc -O2 into a test library (the extension "
            "exports no kernel symbols). `fresh` allocates the output like the codecs do; "
            "`warm` writes into an existing tensor, which isolates the conversion itself.",
            "",
        ]
        out += kernel_table(kernels)
    else:
        out += [f"Not run: {kernel_note}"]
    out += ["", "## Reading", ""]
    out += reading(impls, samples, kernels)
    out += [
        "- **Which codec for which case**, on these figures: dense activations where half "
        "the bytes are enough: `BFloat16Codec` (or `Float16Codec` when values stay well "
        "inside ±65504 and above 6e-5); ReLU-like activations: "
        "`CompressedTensorCodec(inner=BFloat16Codec())` when the link is slower than the "
        "encoder, `SparseCOOCodec` only when well under half the elements are non-zero "
        "(and then exactly); a quarter of the bytes with a bounded error: `Int8Codec`; "
        "gradients: `BFloat16Codec` or `Int8Codec`, not `Float16Codec`; exact dense "
        "tensors: raw, since zstd saves little on random float32 and costs much CPU.",
        "",
        "## Checks",
        "",
    ]
    if problems:
        out += [f"- **PROBLEM**: {p}" for p in problems]
    else:
        out.append("- All passed: the C float16/bfloat16 payloads are bit-identical to "
                   "torch's `.half()`/`.bfloat16()` and decode to torch's `.float()`; zstd, "
                   "zlib and sparse COO (C and the alternatives) are lossless; zstd over "
                   "bfloat16 decodes to `x.bfloat16().float()`; `Int8Codec`'s error stays within "
                   "scale/2 (plus the final rounding to float32, as codec_quant.c documents); "
                   "`codec.encode`/`codec.decode` match the raw C entry points.")
    out += [f"- {n[0].upper() + n[1:]}." for n in notes]
    out += ["", END, ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------

def data(impls: List[Impl], samples: List[Sample], info: Dict[str, str],
         args: argparse.Namespace) -> Dict[str, Any]:
    """Bytes, errors and (when timed) GB/s of every row, as plain data
    (benchmarks/data/codecs.json)."""
    rows = []
    for s in samples:
        raw = s.x.numel() * 4
        for impl in impls:
            if impl.threads is None or s.key not in impl.wire or impl.group == "copy":
                continue
            n, mx, rel, flushed = impl.wire[s.key]
            enc, dec = impl.enc_s.get(s.key), impl.dec_s.get(s.key)
            rows.append({"tensor": s.label, "codec": GROUP_TITLES[impl.group],
                         "implementation": impl.label, "c": impl.is_c, "raw_bytes": raw,
                         "wire_bytes": n, "wire_over_raw": n / raw, "max_abs_error": mx,
                         "relative_rms_error": rel, "nonzeros_flushed": flushed,
                         "encode_gb_s": raw / enc / 1e9 if enc else None,
                         "decode_gb_s": raw / dec / 1e9 if dec else None})
    return {"script": "bench_codecs.py", "quick": bool(args.quick),
            "wire_only": bool(args.wire_only), "info": info, "shape": list(SHAPE),
            "rows": rows}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: the activation tensor only, 3 repetitions, no kernel "
                        "table; prints the report and writes no file unless --output is given")
    p.add_argument("--reps", type=int, default=7, metavar="N",
                   help="at least N timed repetitions per codec and tensor (default 7; more "
                        "for fast codecs, up to 5N, within --budget)")
    p.add_argument("--budget", type=float, default=4.0, metavar="S",
                   help="seconds of timed repetitions to aim for per codec and tensor, "
                        "beyond the minimum (default 4)")
    p.add_argument("--no-kernels", action="store_true",
                   help="skip bench_codec_kernels.measure() (needs gcc and pkg-config)")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="the markdown file whose Codecs section to write (default "
                        "benchmarks/results.md; none for --quick)")
    p.add_argument("--wire-only", action="store_true",
                   help="only bytes on the wire and errors (no timing, seconds): write "
                        "data/codecs.json beside the output for plot_results.py, leave the "
                        "markdown alone")
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
    output = args.output
    if output is None and not args.quick:
        output = os.path.join(HERE, "results.md")
    min_reps, max_reps = (3, 3) if args.quick else (args.reps, 5 * args.reps)

    begun = time.perf_counter()
    info = machine_info()
    samples = make_samples()
    if args.quick:
        samples = samples[:1]
    impls = make_impls()
    groups: Dict[str, List[Impl]] = {}
    for impl in impls:
        groups.setdefault(impl.group, []).append(impl)

    problems: List[str] = []
    notes: List[str] = []
    if zstandard is None:
        notes.append("the `zstandard` Python package is not installed here, so there is no "
                     "Python zstd row (the benchmark installs nothing)")
    reps: Dict[str, List[int]] = {}
    for s in samples:
        print(f"{s.label}: checking", flush=True)
        check(impls, s, problems, notes)
        if args.wire_only:
            continue
        for g, members in groups.items():
            n = time_group(members, s, min_reps, max_reps, args.budget)
            reps.setdefault(g, []).append(n)
            for impl in members:
                nb = s.x.numel() * 4
                print(f"  {g:10s} {impl.label[:60]:60s} threads={_threads(impl):11s} "
                      f"enc {_gbs(nb, impl.enc_s[s.key]):>6} GB/s  "
                      f"dec {_gbs(nb, impl.dec_s[s.key]):>6} GB/s  (n={n})", flush=True)
    for p in problems:
        print("PROBLEM:", p, flush=True)

    if args.wire_only:
        path = write_data(output or os.path.join(HERE, "results.md"), "codecs",
                          data(impls, samples, info, args))
        print(f"wrote {os.path.relpath(path)}")
        return 1 if problems else 0

    kernels, kernel_note = None, ""
    if not args.quick and not args.no_kernels:
        sys.path.insert(0, HERE)
        try:
            import bench_codec_kernels

            print("conversion kernels (bench_codec_kernels.measure)", flush=True)
            kernels = bench_codec_kernels.measure(math.prod(SHAPE), reps=max(31, 4 * args.reps))
        except Exception as e:  # noqa: BLE001 - a missing compiler should not lose the rest
            kernel_note = f"bench_codec_kernels.measure() failed: {type(e).__name__}: {e}"
            print(kernel_note, flush=True)
    else:
        kernel_note = "skipped (--quick or --no-kernels)."

    report = render(impls, samples, info, kernels, kernel_note, reps, problems, notes, args,
                    time.perf_counter() - begun)
    if output:
        write_section(output, report, BEGIN, END)
        write_data(output, "codecs", data(impls, samples, info, args))
        shown = os.path.relpath(output)
        print(f"wrote the Codecs section of {output if shown.startswith('..') else shown}")
    else:
        print()
        print(report)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
