"""Send activations in fewer bytes: a codec written in Python next to built-in ones.

A server hosts the bottom half of a small transformer-sized block (a Linear layer
and a ReLU, hidden size 768). The client sends it a batch of activations with each
of these codecs and compares the answer with the same layers run locally:

* ``TensorCodec()``: raw, the default (zero-copy, exact);
* ``ScaledHalfCodec``: defined below, in Python: float16 on the wire, scaled so
  that small values keep their precision;
* ``Int8Codec()``: built in, 8-bit quantization (a quarter of the bytes);
* ``CompressedTensorCodec(3, inner=BFloat16Codec())``: built in, bfloat16 then zstd.

For each one it prints the request's payload size, the bytes saved against raw,
and the largest difference from the local result. A Python codec must be known to
both sides, so the server is given ``codecs=[ScaledHalfCodec()]``; the built-in
codecs need no configuration. The server answers in the codec of each request.

Usage::

    python examples/custom_codec.py
    python examples/custom_codec.py --batch 4 --seq 128

Everything runs in this process on 127.0.0.1 (a free port) and exits when done.
See docs/codecs.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import numpy as np
import torch

from splitlearn_comm import (BFloat16Codec, CompressedTensorCodec, GRPCComputeClient,
                             GRPCComputeServer, Int8Codec, ModelComputeFunction, TensorCodec)

HIDDEN = 768


class ScaledHalfCodec(TensorCodec):
    """float16 on the wire, scaled so that the largest |value| maps to 2**14.

    Plain float16 loses digits below 6.1e-5 and flushes values below 6e-8 to zero;
    scaling first keeps the relative precision of float16 (about 3 decimal digits)
    for tensors of any magnitude, such as gradients. The scale (a float) and the
    original dtype (a str) travel in the metadata.
    """

    codec_name = "scaled-half"

    def encode(self, tensor):
        t = torch.as_tensor(tensor)  # the client may be given a NumPy array
        amax = float(t.abs().max()) if t.numel() else 0.0
        scale = 2.0 ** 14 / amax if amax > 0 else 1.0
        half = (t.double() * scale).to(torch.float16)
        metadata = {"scale": scale, "dtype": str(t.dtype).removeprefix("torch.")}
        return half.numpy().tobytes(), tuple(t.shape), metadata

    def decode(self, data, shape, metadata):
        half = np.frombuffer(data, dtype="<f2").reshape(shape)
        values = torch.from_numpy(half.astype(np.float64) / metadata["scale"])
        return values.to(getattr(torch, metadata["dtype"]))


def build_bottom(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU())


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per call (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    bottom = build_bottom()
    torch.manual_seed(1)
    x = torch.relu(torch.randn(args.batch, args.seq, HIDDEN))  # activations from the layer before
    with torch.no_grad():
        expected = bottom(x)
    raw_bytes = x.numel() * x.element_size()

    codecs = [
        ("raw", TensorCodec(), 1e-5),
        ("scaled-half (Python)", ScaledHalfCodec(), 0.05),
        ("int8 (built in)", Int8Codec(), 0.5),
        ("zstd over bfloat16 (built in)", CompressedTensorCodec(3, inner=BFloat16Codec()), 0.5),
    ]
    server = GRPCComputeServer(ModelComputeFunction(bottom, model_name="bottom"),
                               host="127.0.0.1", port=0, codecs=[ScaledHalfCodec()])
    server.start()
    print(f"server on 127.0.0.1:{server.port}; request tensor {tuple(x.shape)}, "
          f"{raw_bytes} bytes raw")
    ok = True
    try:
        for label, codec, tolerance in codecs:
            with GRPCComputeClient(f"127.0.0.1:{server.port}", codec=codec, timeout=60,
                                   retry_strategy=None) as client:
                y = client.compute(x)
            payload = len(codec.encode(x)[0])  # the request's payload, as the client sent it
            saved = raw_bytes - payload
            error = float((y - expected).abs().max())
            within = error <= tolerance
            ok = ok and within and y.dtype == expected.dtype and y.shape == expected.shape
            print(f"codec {label}: {payload} bytes, {saved} bytes saved "
                  f"({saved / raw_bytes:.0%}), max error {error:.2e}"
                  f"{'' if within else f' OVER the tolerance {tolerance}'}")
    finally:
        server.stop(grace=1.0)
    print("all results within tolerance" if ok else "some results out of tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
