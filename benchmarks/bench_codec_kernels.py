"""float16/bfloat16 conversion kernels of the C core against PyTorch's own.

Run on demand (not part of the test suite):

    python3 benchmarks/bench_codec_kernels.py

It compiles the codec sources of csrc/core into a temporary shared library with
gcc -O2 (the same flags the extension gets), then times, in this one process and
on the same buffers, 16M-element conversions:

  torch fresh   x.half() / x.float() / x.bfloat16(): allocates the output
  torch warm    out.copy_(x) into an existing tensor
  C warm        sl_f32_to_f16() etc. into the same existing tensor (one thread)

torch is timed with torch.set_num_threads(1) and with its default thread count;
the C kernels always run on one thread. GB/s counts bytes read plus written.
"""

import ctypes
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = os.path.join(ROOT, "csrc", "core")
N = 16 << 20


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


def best(f, reps=20):
    f()
    b = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        b = min(b, time.perf_counter() - t)
    return b


def main():
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_lib(tmp)
        x = torch.randn(N)
        h, b = x.half(), x.bfloat16()
        ho = torch.zeros(N, dtype=torch.half)
        bo = torch.zeros(N, dtype=torch.bfloat16)
        fo = torch.zeros(N)
        P, S = ctypes.c_void_p, ctypes.c_size_t(N)
        rows = [
            ("f32->f16", lambda: x.half(), lambda: ho.copy_(x),
             lambda: lib.sl_f32_to_f16(P(x.data_ptr()), P(ho.data_ptr()), S)),
            ("f16->f32", lambda: h.float(), lambda: fo.copy_(h),
             lambda: lib.sl_f16_to_f32(P(h.data_ptr()), P(fo.data_ptr()), S)),
            ("f32->bf16", lambda: x.bfloat16(), lambda: bo.copy_(x),
             lambda: lib.sl_f32_to_bf16(P(x.data_ptr()), P(bo.data_ptr()), S)),
            ("bf16->f32", lambda: b.float(), lambda: fo.copy_(b),
             lambda: lib.sl_bf16_to_f32(P(b.data_ptr()), P(fo.data_ptr()), S)),
        ]
        default_threads = torch.get_num_threads()
        print(f"torch {torch.__version__}, {N} elements, GB/s = (read + written) / best time")
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            print(f"\ntorch threads = {threads}")
            print(f"{'':10s} {'torch fresh':>12s} {'torch warm':>12s} {'C warm':>12s}")
            for name, fresh, warm, ours in rows:
                gb = N * 6 / 1e9
                t = [min(best(fresh), best(fresh)), min(best(warm), best(warm)),
                     min(best(ours), best(ours))]
                print(f"{name:10s} " + " ".join(f"{gb / v:7.2f} GB/s" for v in t)
                      + "   (" + " / ".join(f"{v * 1e3:.2f}" for v in t) + " ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
