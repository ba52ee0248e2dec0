#!/usr/bin/env python3
"""Split transformer inference with a KV cache: many tensors per call.

The client keeps the token embedding and the output head; the server hosts two
transformer decoder layers (causal self-attention with a KV cache, and an MLP).
Each call carries a structure, one message each way:

    request  {"hidden": (batch, new, d) float32, "mask": (batch, past+new) bool,
              "past": ((key, value), (key, value)) or None}
    reply    {"hidden": (batch, new, d), "present": ((key, value), (key, value)),
              "stats": {"cached": int, "attn_max": float}}

The first call sends the prompt (prefill); every later call sends one new token and
the cache the server returned the step before. The mask marks padding (the second
sequence of the batch is shorter). The hidden states travel as bfloat16 and the cache
as float16 (a codec mapping by name and path prefix); the bool mask goes raw, as
every codec leaves non-float tensors alone. The script checks the greedy tokens and
the hidden states against the same model run locally.

    python3 examples/transformer_kv_cache.py [--steps 6] [--prompt 8]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import splitlearn_comm as slc  # noqa: E402

D, HEADS, LAYERS, VOCAB = 64, 4, 2, 100


class DecoderLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.out = torch.nn.Linear(D, D)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(D, 4 * D), torch.nn.GELU(),
                                       torch.nn.Linear(4 * D, D))
        self.norm1 = torch.nn.LayerNorm(D)
        self.norm2 = torch.nn.LayerNorm(D)

    def forward(self, h: torch.Tensor, mask: torch.Tensor,
                past: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[Any, ...]:
        b, n, _ = h.shape
        q, k, v = self.qkv(self.norm1(h)).split(D, dim=-1)
        q, k, v = (t.view(b, n, HEADS, D // HEADS).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        total = k.shape[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
        causal = torch.ones(n, total, dtype=torch.bool).tril(total - n)
        allowed = causal[None, None] & mask[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        y = (attn @ v).transpose(1, 2).reshape(b, n, D)
        h = h + self.out(y)
        h = h + self.mlp(self.norm2(h))
        return h, (k, v), float(attn.max())


class Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(DecoderLayer() for _ in range(LAYERS))

    def forward(self, x: dict) -> dict:
        h, mask, past = x["hidden"], x["mask"], x["past"]
        present, attn_max = [], 0.0
        for i, layer in enumerate(self.layers):
            h, kv, m = layer(h, mask, None if past is None else past[i])
            present.append(kv)
            attn_max = max(attn_max, m)
        return {"hidden": h, "present": tuple(present),
                "stats": {"cached": int(present[0][0].shape[2]), "attn_max": attn_max}}


class StackFunction(slc.ComputeFunction):
    """The server's slice: the decoder layers, inference only."""

    def __init__(self, model: Stack) -> None:
        self.model = model.eval()

    def compute(self, x: dict) -> dict:
        with torch.no_grad():
            return self.model(x)


def generate(step_fn: Any, embed: torch.nn.Embedding, head: torch.nn.Linear,
             prompt: torch.Tensor, lengths: torch.Tensor, steps: int, log: bool) -> Tuple[Any, Any]:
    """Greedy decoding: prefill with the prompt, then one token per call."""
    batch, n = prompt.shape
    mask = torch.arange(n)[None, :] < lengths[:, None]
    x = {"hidden": embed(prompt), "mask": mask, "past": None}
    tokens, last_hidden = [], None
    for step in range(steps):
        with torch.no_grad():
            y = step_fn(x)
            logits = head(y["hidden"][:, -1])
        nxt = logits.argmax(dim=-1)
        tokens.append(nxt)
        last_hidden = y["hidden"]
        if log:
            print(f"step {step}: sent {x['hidden'].shape[1]} position(s), cache now "
                  f"{y['stats']['cached']} long, {len(y['present'])} layers of (key, value) "
                  f"{tuple(y['present'][0][0].shape)}, next tokens {nxt.tolist()}")
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.bool)], dim=1)
        x = {"hidden": embed(nxt[:, None]), "mask": mask, "past": y["present"]}
    return torch.stack(tokens, dim=1), last_hidden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    embed, head, stack = torch.nn.Embedding(VOCAB, D), torch.nn.Linear(D, VOCAB), Stack()
    prompt = torch.randint(0, VOCAB, (2, args.prompt))
    lengths = torch.tensor([args.prompt, args.prompt - 3])   # the second one is padded

    codec = {"hidden": slc.BFloat16Codec(), "past": slc.Float16Codec(),
             "present": slc.Float16Codec()}
    with slc.GRPCComputeServer(StackFunction(stack), host="127.0.0.1", port=0,
                               codec=codec) as server:
        with slc.GRPCComputeClient(f"127.0.0.1:{server.port}", codec=codec) as client:
            remote_tokens, remote_hidden = generate(client.compute, embed, head, prompt, lengths,
                                                    args.steps, log=True)
            stats = client.get_statistics()
    local_tokens, local_hidden = generate(StackFunction(stack).compute, embed, head, prompt,
                                          lengths, args.steps, log=False)
    err = float((remote_hidden - local_hidden).abs().max())
    print(f"{stats['successful_requests']} calls, {stats['bytes_sent']} bytes sent, "
          f"{stats['bytes_received']} bytes received")
    print(f"tokens {remote_tokens.tolist()} (local {local_tokens.tolist()})")
    print(f"max difference of the last hidden states from local: {err:.4f}")
    if err > 0.1:
        raise SystemExit("the remote run drifted from the local one")
    print("matches the local run within the codecs' rounding")


if __name__ == "__main__":
    main()
