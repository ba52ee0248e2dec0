"""float16/bfloat16 conversion kernels of the C core against PyTorch's own.

Run on demand (not part of the test suite):

    python3 benchmarks/bench_codec_kernels.py            # 16M elements, prints a table
    python3 benchmarks/bench_codec_kernels.py -n 6291456 # another element count

`benchmarks/bench_codecs.py` runs the same measurement (through `measure()` below) on
the size of its activation tensor and puts it in the "Codecs" section of
`benchmarks/results.md`.

It compiles the codec sources of csrc/core into a temporary shared library with
gcc -O2 (the same optimisation level the extension gets; the extension itself
exports no kernel symbols: it is built with -fvisibility=hidden), then times, in
this one process and on the same buffers:

  torch fresh   x.half() / x.float() / x.bfloat16(): allocates the output
  torch warm    out.copy_(x) into an existing tensor
  C warm        sl_f32_to_f16() etc. into the same existing tensor (one thread)

torch is timed with torch.set_num_threads(1) and with its default thread count;
the C kernels always run on one thread. Each repetition runs the three once, in
turn, after a warm-up; the figure is the median over repetitions (time.perf_counter).
GB/s here counts bytes read plus written (6 bytes per element); bench_codecs.py
converts to its own unit, bytes of the float32 tensor.
"""

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = os.path.join(ROOT, "csrc", "core")
N = 16 << 20
KERNELS = ("f32->f16", "f16->f32", "f32->bf16", "bf16->f32")


def build_lib(tmp):
    srcs = [os.path.join(CORE, f) for f in sorted(os.listdir(CORE))
            if f.startswith("codec") and f.endswith(".c")]
    srcs += [os.path.join(CORE, f) for f in ("tensor.c", "dtype.c", "sl_common.c")]
    flags = subprocess.check_output(["pkg-config", "--cflags", "--libs", "libzstd", "zlib"],
                                    text=True).split()
    out = os.path.join(tmp, "libslcodec.so")
    subprocess.check_call(["gcc", "-std=gnu11", "-O2", "-shared", "-fPIC", "-I" + CORE, *srcs,
                           *flags, "-lpthread", "-lm", "-o", out])
    return ctypes.CDLL(out)


def _medians(fns, reps, warmup=2):
    """Median time of each function, the functions run in turn in every repetition."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def measure(n=N, reps=15, thread_counts=None):
    """Time the four conversions of n elements.

    Returns {"n", "reps", "rows"}: rows are (threads, kernel, torch fresh s,
    torch warm s, C warm s), medians. torch's thread count is restored afterwards.
    """
    default_threads = torch.get_num_threads()
    if thread_counts is None:
        thread_counts = sorted({1, default_threads})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_lib(tmp)
        x = torch.randn(n)
        h, b = x.half(), x.bfloat16()
        ho = torch.zeros(n, dtype=torch.half)
        bo = torch.zeros(n, dtype=torch.bfloat16)
        fo = torch.zeros(n)
        P, S = ctypes.c_void_p, ctypes.c_size_t(n)
        cases = [
            ("f32->f16", lambda: x.half(), lambda: ho.copy_(x),
             lambda: lib.sl_f32_to_f16(P(x.data_ptr()), P(ho.data_ptr()), S)),
            ("f16->f32", lambda: h.float(), lambda: fo.copy_(h),
             lambda: lib.sl_f16_to_f32(P(h.data_ptr()), P(fo.data_ptr()), S)),
            ("f32->bf16", lambda: x.bfloat16(), lambda: bo.copy_(x),
             lambda: lib.sl_f32_to_bf16(P(x.data_ptr()), P(bo.data_ptr()), S)),
            ("bf16->f32", lambda: b.float(), lambda: fo.copy_(b),
             lambda: lib.sl_bf16_to_f32(P(b.data_ptr()), P(fo.data_ptr()), S)),
        ]
        # the C kernels must give torch's bits, or the comparison means nothing
        for name, fresh, warm, ours in cases:
            ref = fresh()
            ours()
            out = ho if name == "f32->f16" else bo if name == "f32->bf16" else fo
            bits = torch.int32 if out.dtype == torch.float32 else torch.int16
            if not torch.equal(out.view(bits), ref.view(bits)):
                raise AssertionError(f"{name}: the C kernel's bits differ from torch's")
        try:
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for name, fresh, warm, ours in cases:
                    t = _medians([fresh, warm, ours], reps)
                    rows.append((threads, name, *t))
        finally:
            torch.set_num_threads(default_threads)
    return {"n": n, "reps": reps, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=N, help=f"elements per conversion (default {N})")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions (default 15)")
    args = p.parse_args(argv)
    res = measure(args.n, args.reps)
    n = res["n"]
    gb = n * 6 / 1e9
    print(f"torch {torch.__version__}, {n} elements, GB/s = (read + written) / median time "
          f"of {res['reps']}")
    current = None
    for threads, name, *t in res["rows"]:
        if threads != current:
            current = threads
            print(f"\ntorch threads = {threads}")
            print(f"{'':10s} {'torch fresh':>12s} {'torch warm':>12s} {'C warm':>12s}")
        print(f"{name:10s} " + " ".join(f"{gb / v:7.2f} GB/s" for v in t)
              + "   (" + " / ".join(f"{v * 1e3:.2f}" for v in t) + " ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
