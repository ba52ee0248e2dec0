#!/usr/bin/env python3
"""Split generation benchmark: server-side sessions against shipping the KV cache.

A decoder-only transformer of GPT-2 small's shape (d_model 768, 12 heads of 64,
12 blocks; seeded random weights) is split as in examples/split_generation.py: the
client keeps the embeddings, block 0, the final norm and the head; the server (a
child process on 127.0.0.1) runs blocks 1-11. After a prompt of C positions
(256 and 1024) the client generates tokens greedily, one per call. Two ways:

- session: the server keeps the cache of its blocks in a session
  (``client.session()`` + ``KVCacheComputeFunction``); a call carries the new
  token's hidden state (768 floats) each way;
- ship cache: the earlier library's ``compute_with_cache`` way -- the client keeps
  the server blocks' cache and sends it with every call, the server sends it back
  grown by one position. The cache travels as the same bytes packed into one
  float32 tensor with the hidden state (multi-tensor calls, issue 10, were not on
  main when this was written); the bytes on the wire are the same as separate
  tensors' up to a few bytes of framing.

Per generated token: wire bytes (request + response message bytes, from the
client's statistics) and wall time (median over the timed tokens). Both processes
use ``--threads`` torch threads.

    python3 benchmarks/bench_sessions.py           # writes the "Sessions" section of
                                                   # benchmarks/results.md (~1 minute)
    python3 benchmarks/bench_sessions.py --quick   # smoke run: prints only
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from _report import cpu_model, write_section  # noqa: E402

import splitlearn_comm as slc  # noqa: E402

BEGIN = "<!-- bench_sessions.py: begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_sessions.py: end -->"

D, HEADS, BLOCKS, VOCAB = 768, 12, 12, 1024
HD = D // HEADS
SERVER_BLOCKS = BLOCKS - 1


class Block(torch.nn.Module):
    """Pre-norm causal self-attention block with a KV cache (as in the example)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(D)
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.proj = torch.nn.Linear(D, D)
        self.ln2 = torch.nn.LayerNorm(D)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(D, 4 * D), torch.nn.GELU(),
                                       torch.nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor, past=None):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (z.view(b, t, HEADS, HD).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        else:
            k, v = k.contiguous(), v.contiguous()
        n = k.shape[2]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(HD)
        mask = torch.ones(t, n, dtype=torch.bool).tril(diagonal=n - t)
        att = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, D))
        return x + self.mlp(self.ln2(x)), (k, v)


def build(seed: int = 0):
    torch.manual_seed(seed)
    tok = torch.nn.Embedding(VOCAB, D)
    pos = torch.nn.Embedding(2048, D)
    blocks = torch.nn.ModuleList(Block() for _ in range(BLOCKS))
    norm = torch.nn.LayerNorm(D)
    head = torch.nn.Linear(D, VOCAB, bias=False)
    for m in (tok, pos, blocks, norm, head):
        m.eval()
    return tok, pos, blocks, norm, head


class ShipCache(slc.ComputeFunction):
    """The server of the 'ship cache' way: the request is [hidden (t*D) | past k, v of
    every server block (P positions each)] as one float32 vector; the answer is
    [hidden out | present k, v (P + t positions)]. t is in the call's metadata."""

    def __init__(self, blocks: Sequence[torch.nn.Module]) -> None:
        self.blocks = list(blocks)

    def compute(self, flat: torch.Tensor) -> torch.Tensor:
        t = int(dict(slc.current_call().metadata).get("t", "1"))
        per_pos = SERVER_BLOCKS * 2 * D
        p = (flat.numel() - t * D) // per_pos
        x = flat[:t * D].view(1, t, D)
        rest = flat[t * D:].view(SERVER_BLOCKS, 2, 1, HEADS, p, HD) if p else None
        outs = []
        with torch.inference_mode():
            for i, block in enumerate(self.blocks):
                past = (rest[i, 0], rest[i, 1]) if p else None
                x, (k, v) = block(x, past)
                outs += [k.reshape(-1), v.reshape(-1)]
            return torch.cat([x.reshape(-1), *outs])


def serve(mode: str) -> int:
    _, _, blocks, _, _ = build()
    fn = (slc.KVCacheComputeFunction(list(blocks[1:])) if mode == "session"
          else ShipCache(list(blocks[1:])))
    server = slc.GRPCComputeServer(fn, host="127.0.0.1", port=0, max_workers=2,
                                   max_session_bytes=8 << 30)
    server.start()
    print(f"port {server.port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(grace=1)
    return 0


class Child:
    def __init__(self, mode: str, threads: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", mode, "--threads",
             str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.proc.kill()
            raise RuntimeError(f"the benchmark server did not start: {line!r}")
        self.address = f"127.0.0.1:{int(line.split()[1])}"

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def generate(mode: str, address: str, context: int, tokens: int) -> Dict[str, float]:
    """Prefill ``context`` positions, then generate ``tokens``; per-token figures."""
    tok, pos, blocks, norm, head = build()
    client = slc.GRPCComputeClient(address, retry_strategy=None, timeout=300)
    client.connect(60)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, context), generator=g)
    past0 = None
    length = 0
    cache: Optional[torch.Tensor] = None  # ship: the server blocks' cache, flat
    session = client.session() if mode == "session" else None
    times: List[float] = []
    sent: List[int] = []
    try:
        for step in range(tokens + 1):
            t0 = time.perf_counter()
            s0 = client.get_statistics()
            with torch.inference_mode():
                p = torch.arange(length, length + ids.shape[1]).unsqueeze(0)
                h, past0 = blocks[0](tok(ids) + pos(p), past0)
            length += ids.shape[1]
            t = h.shape[1]
            if session is not None:
                h = session.compute(h)
            else:
                flat = h.reshape(-1) if cache is None else torch.cat([h.reshape(-1), cache])
                out = client.compute(flat, metadata={"t": str(t)})
                h = out[:t * D].view(1, t, D)
                cache = out[t * D:]
            with torch.inference_mode():
                nxt = head(norm(h[:, -1])).argmax(-1)
            ids = nxt.view(1, 1)
            s1 = client.get_statistics()
            if step > 0:  # step 0 is the prefill
                times.append(time.perf_counter() - t0)
                sent.append(s1["bytes_sent"] + s1["bytes_received"] - s0["bytes_sent"]
                            - s0["bytes_received"])
    finally:
        if session is not None:
            session.close()
        client.close()
    return {"ms": 1e3 * statistics.median(times), "bytes": statistics.mean(sent)}


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def report(rows: List[Tuple[int, str, Dict[str, float]]], threads: int, tokens: int,
           seconds: float, command: str) -> str:
    out = [BEGIN, "", "## Sessions: split generation, KV cache on the server vs shipped", "",
           f"`{command}`, {datetime.date.today().isoformat()}, {cpu_model()}, "
           f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
           f"{torch.__version__}, {threads} torch thread(s) per process; took {seconds:.0f} s.",
           "",
           f"d_model {D}, {HEADS} heads of {HD}, {BLOCKS} blocks (client: embeddings, block 0, "
           f"norm, head; server: blocks 1-{BLOCKS - 1}), float32, raw codec, server in a "
           f"child process on 127.0.0.1. Per generated token after a prompt of C positions "
           f"(median time of {tokens} tokens; bytes: request + response message bytes).",
           "",
           "| context C | way | wire bytes / token | ms / token |",
           "|---:|---|---:|---:|"]
    by = {}
    for context, mode, r in rows:
        by[(context, mode)] = r
        out.append(f"| {context} | {mode} | {_mb(r['bytes'])} | {r['ms']:.1f} |")
    out.append("")
    for context in sorted({c for c, _, _ in rows}):
        s, k = by.get((context, "session")), by.get((context, "ship cache"))
        if s and k:
            out.append(f"- C = {context}: sessions send {k['bytes'] / s['bytes']:.0f}x fewer "
                       f"bytes per token and take {k['ms'] / s['ms']:.1f}x less time.")
    out += ["",
            "The shipped cache travels as one float32 tensor (hidden state and the server "
            "blocks' keys and values packed together: the same bytes as separate tensors, "
            "since multi-tensor calls were not on main yet). It grows by one position per "
            "token each way; the session's messages stay at one hidden state each way.",
            "", END, ""]
    return "\n".join(out)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 positions, 3 tokens; prints only")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--contexts", default="256,1024")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--output", help="the markdown file whose Sessions section to write "
                                    "(default benchmarks/results.md; none for --quick)")
    p.add_argument("--serve", metavar="MODE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.serve:
        return serve(args.serve)
    contexts = [256] if args.quick else [int(c) for c in args.contexts.split(",")]
    tokens = 3 if args.quick else args.tokens
    start = time.perf_counter()
    rows: List[Tuple[int, str, Dict[str, float]]] = []
    for mode, serve_mode in (("session", "session"), ("ship cache", "ship")):
        child = Child(serve_mode, args.threads)
        try:
            for context in contexts:
                r = generate(serve_mode, child.address, context, tokens)
                rows.append((context, mode, r))
                print(f"C={context} {mode}: {_mb(r['bytes'])}/token, {r['ms']:.1f} ms/token",
                      flush=True)
        finally:
            child.close()
    rows.sort(key=lambda r: (r[0], r[1] != "session"))
    command = "benchmarks/bench_sessions.py" + (" " + " ".join(argv) if argv else "")
    text = report(rows, args.threads, tokens, time.perf_counter() - start, command)
    print(text)
    output = args.output or (None if args.quick else os.path.join(HERE, "results.md"))
    if output:
        write_section(output, text, BEGIN, END)
        print(f"wrote the Sessions section of {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
