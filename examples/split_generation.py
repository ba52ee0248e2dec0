"""Split text generation with the KV cache kept where it is computed.

A small decoder-only transformer (written here with torch.nn, seeded random
weights, nothing downloaded) is split in two:

* the client keeps the private parts: the token and position embeddings, the first
  block, the final norm and the LM head;
* the server (``KVCacheComputeFunction``) runs the middle blocks and keeps their
  KV cache in a server-side session (``client.session()``).

Each generated token sends one hidden state of ``d_model`` floats to the server and
gets one back; the server's cache never crosses the wire. The client also generates
the same tokens locally (the whole model in one process) and checks that both agree.

It then shows a session being evicted: a second conversation with a long prompt
pushes the server over its ``max_session_bytes``, the least recently used session
(the first conversation) is evicted, its next step fails with FAILED_PRECONDITION
("evicted for bytes"), and the client recovers by sending its prompt and the tokens
generated so far again in a new session.

Usage::

    python examples/split_generation.py                   # server in this process
    python examples/split_generation.py --codec fp16      # float16 activations
    python examples/split_generation.py --clients 4       # four conversations at once
    python examples/split_generation.py --serve --port 6000        # server only
    python examples/split_generation.py --connect 127.0.0.1:6000   # client only
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
import time
from typing import Any, List, Optional, Tuple

import grpc
import torch

import splitlearn_comm as slc

VOCAB = 256          # bytes: any text is a prompt
D_MODEL = 64
HEADS = 4
LAYERS = 4           # block 0 on the client, blocks 1..3 on the server
MAX_LEN = 512
SEED = 0

Past = Optional[Tuple[torch.Tensor, torch.Tensor]]


class Block(torch.nn.Module):
    """A pre-norm transformer block with causal self-attention and a KV cache:
    ``block(x, past) -> (y, present)``; ``past``/``present`` are (keys, values) of
    shape (batch, heads, positions, head_dim)."""

    def __init__(self, d_model: int = D_MODEL, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(d_model)
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.proj = torch.nn.Linear(d_model, d_model)
        self.ln2 = torch.nn.LayerNorm(d_model)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, past: Past = None) -> Tuple[torch.Tensor, Past]:
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        else:  # own storage: a view would keep the whole qkv output alive in the cache
            k, v = k.contiguous(), v.contiguous()
        n = k.shape[2]  # positions seen, the new ones last
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        # the query at position n - t + i sees keys 0 .. n - t + i
        mask = torch.ones(t, n, dtype=torch.bool).tril(diagonal=n - t)
        scores = scores.masked_fill(~mask, float("-inf"))
        att = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(att)
        x = x + self.mlp(self.ln2(x))
        return x, (k, v)


class TinyLM(torch.nn.Module):
    """The whole model, for local generation and to hand out its parts."""

    def __init__(self, seed: int = SEED) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok = torch.nn.Embedding(VOCAB, D_MODEL)
        self.pos = torch.nn.Embedding(MAX_LEN, D_MODEL)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = torch.nn.LayerNorm(D_MODEL)
        self.head = torch.nn.Linear(D_MODEL, VOCAB, bias=False)
        self.eval()

    def server_blocks(self) -> List[Block]:
        return list(self.blocks[1:])


class ClientPart:
    """The client's layers and its own cache (block 0's)."""

    def __init__(self, model: TinyLM) -> None:
        self.m = model
        self.past: Past = None
        self.length = 0

    def reset(self) -> None:
        self.past, self.length = None, 0

    @torch.inference_mode()
    def bottom(self, ids: List[int]) -> torch.Tensor:
        """Embed the new tokens and run block 0: the hidden states to send."""
        t = torch.tensor([ids])
        pos = torch.arange(self.length, self.length + len(ids)).unsqueeze(0)
        h, self.past = self.m.blocks[0](self.m.tok(t) + self.m.pos(pos), self.past)
        self.length += len(ids)
        return h

    @torch.inference_mode()
    def top(self, h: torch.Tensor) -> int:
        """The greedy next token from the last position's hidden state."""
        return int(self.m.head(self.m.norm(h[:, -1])).argmax(-1))


def generate_local(model: TinyLM, prompt: List[int], n_new: int) -> List[int]:
    """Greedy generation with the whole model here, the same cache steps as the
    split run (the prompt in one step, then one token per step)."""
    part = ClientPart(model)
    pasts: List[Past] = [None] * (LAYERS - 1)
    out: List[int] = []
    ids = list(prompt)
    with torch.inference_mode():
        while len(out) < n_new:
            h = part.bottom(ids)
            for i, block in enumerate(model.server_blocks()):
                h, pasts[i] = block(h, pasts[i])
            ids = [part.top(h)]
            out.append(ids[0])
    return out


#: gRPC codes of a call on a session the server no longer has.
SESSION_LOST = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


def generate_remote(model: TinyLM, client: slc.GRPCComputeClient, prompt: List[int],
                    n_new: int, after_step: Any = None, log: Any = None) -> Tuple[List[int], int]:
    """Greedy generation with the middle blocks on the server, their cache in a
    session. Returns (tokens, restarts): when the server has lost the session
    (evicted, idle, restarted) the prompt and the tokens so far are sent again in a
    new session. ``after_step(tokens)`` runs after every token (for the demo)."""
    part = ClientPart(model)
    out: List[int] = []
    restarts = 0
    session = client.session()
    ids = list(prompt)
    try:
        while len(out) < n_new:
            try:
                h = session.compute(part.bottom(ids))
            except grpc.RpcError as e:
                if e.code() not in SESSION_LOST:
                    raise
                if log:
                    log(f"session lost ({session.lost_reason}): {e.details()}")
                restarts += 1
                session.close()
                session = client.session()
                part.reset()
                ids = list(prompt) + out  # re-run the prompt and what was generated
                continue
            ids = [part.top(h)]
            out.append(ids[0])
            if after_step is not None:
                after_step(out)
    finally:
        session.close()
    return out, restarts


def server_fn(model: TinyLM) -> slc.KVCacheComputeFunction:
    return slc.KVCacheComputeFunction(model.server_blocks(), model_name="tinylm-middle")


def bytes_per_position(batch: int = 1) -> int:
    """Server cache bytes per position of one session (float32 keys and values)."""
    return (LAYERS - 1) * 2 * batch * D_MODEL * 4


def _codec(name: str) -> Optional[slc.TensorCodec]:
    return {"raw": None, "fp16": slc.Float16Codec()}[name]


def _text(tokens: List[int]) -> str:
    return bytes(tokens).decode("latin-1").encode("unicode_escape").decode()[:60]


def run_clients(address: str, args: argparse.Namespace) -> int:
    model = TinyLM(args.seed)
    prompts = [list(f"conversation {i}: hello, server".encode()) for i in range(args.clients)]
    results: List[Any] = [None] * args.clients

    def one(i: int) -> None:
        with slc.GRPCComputeClient(address, codec=_codec(args.codec)) as client:
            t0 = time.perf_counter()
            tokens, _ = generate_remote(model, client, prompts[i], args.tokens)
            results[i] = (tokens, time.perf_counter() - t0, client.get_statistics())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = True
    for i, (tokens, secs, stats) in enumerate(results):
        local = generate_local(model, prompts[i], args.tokens)
        same = sum(a == b for a, b in zip(tokens, local))
        ok = ok and (same == len(local) or args.codec != "raw")
        print(f"client {i}: {len(tokens)} tokens in {secs:.2f} s "
              f"({1e3 * secs / len(tokens):.1f} ms/token), "
              f"{stats['bytes_sent'] + stats['bytes_received']} bytes on the wire; "
              f"match with local generation: {same}/{len(local)} tokens")
        print(f"  remote: {_text(tokens)!s}")
        print(f"  local:  {_text(local)!s}")
    return 0 if ok else 1


def run_eviction_demo(args: argparse.Namespace) -> int:
    """Two conversations on a server whose max_session_bytes fits one long one."""
    model = TinyLM(args.seed)
    limit = bytes_per_position() * 110
    server = slc.GRPCComputeServer(server_fn(model), host="127.0.0.1", port=0,
                                   max_session_bytes=limit)
    with server, slc.GRPCComputeClient(f"127.0.0.1:{server.port}") as client:
        prompt = list(b"the first conversation")
        long_prompt = list(b"x" * 80)

        def interrupt(tokens: List[int]) -> None:
            if len(tokens) == 16:  # a second conversation with a long prompt arrives
                with client.session() as other:
                    other.compute(ClientPart(model).bottom(long_prompt))
                    print(f"second conversation: sessions hold "
                          f"{server.metrics()['sessions']['bytes']} bytes "
                          f"(max_session_bytes {limit})")

        tokens, restarts = generate_remote(model, client, prompt, args.tokens,
                                           after_step=interrupt, log=print)
        local = generate_local(model, prompt, args.tokens)
        same = sum(a == b for a, b in zip(tokens, local))
        s = server.metrics()["sessions"]
        print(f"eviction demo: {restarts} restart(s), {s['evicted_bytes']} session(s) evicted "
              f"for bytes; match with local generation: {same}/{len(local)} tokens")
    return 0 if restarts >= 1 else 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", action="store_true", help="only run the server")
    p.add_argument("--connect", metavar="HOST:PORT", help="only run the client(s)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--codec", choices=["raw", "fp16"], default="raw")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--no-eviction-demo", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.connect:
        return run_clients(args.connect, args)
    server = slc.GRPCComputeServer(server_fn(TinyLM(args.seed)), host="127.0.0.1",
                                   port=args.port, handle_signals=args.serve)
    server.start()
    print(f"listening on 127.0.0.1:{server.port}", flush=True)
    if args.serve:
        server.wait_for_termination()
        return 0
    try:
        rc = run_clients(f"127.0.0.1:{server.port}", args)
        s = server.metrics()["sessions"]
        print(f"server: {s['opened']} sessions opened, {s['active']} open now, "
              f"{s['steps']} steps")
    finally:
        server.stop(grace=1)
    if rc == 0 and not args.no_eviction_demo:
        rc = run_eviction_demo(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
