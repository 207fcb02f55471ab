"""Batched decode on the PyTorch engine: packed per-sequence attention vs a padded batch vs one forward per sequence.

For one torch profile, N sequences are prefilled with prompts of different lengths, then decode steps
are timed three ways (rounds interleaved, so a noisy neighbour hits all alike):
- packed: what the engine does (server/engines/torch_batch.py): one forward, all tokens in one row,
  linears batched, SDPA per sequence over its own K/V;
- padded: one forward with batch dimension N, K/V kept in per-layer [N, kv_heads, capacity, head_dim]
  buffers, ONE SDPA call per layer with a padding mask;
- serial: one transformers forward per sequence with its own DynamicCache (the engine before batching).

    .venv/bin/python scripts/bench_torch_batch.py --config /tmp/rtn.yaml --profile rtn-g64 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.profiles import ProfileBuilder
from shrinkserve.server.engines import torch_batch as tb
from shrinkserve.server.engines.loader import load_engine
from shrinkserve.server.settings import load_settings

PADDED = "shrinkserve_padded_bench"


class PaddedStep:
    """[N, kv_heads, cap, head_dim] per layer; row i holds sequence i at lengths[i] positions."""

    is_compileable = False

    def __init__(self, n: int) -> None:
        self.n = n
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths = [0] * n
        self.new = [0] * n

    def load(self, kvs: list[tb.SeqKV]) -> None:
        layers = len(kvs[0].k)
        cap = max(kv.length for kv in kvs) + 512
        for layer in range(layers):
            k0 = kvs[0].k[layer]
            assert k0 is not None
            kb = k0.new_zeros((self.n, k0.shape[0], cap, k0.shape[2]))
            vb = kb.clone()
            for i, kv in enumerate(kvs):
                kb[i, :, : kv.length] = kv.k[layer][:, : kv.length]  # type: ignore[index]
                vb[i, :, : kv.length] = kv.v[layer][:, : kv.length]  # type: ignore[index]
            self.k.append(kb)
            self.v.append(vb)
        self.lengths = [kv.length for kv in kvs]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *a: object, **kw: object) -> tuple:
        for i in range(self.n):  # one new token per row
            self.k[layer][i, :, self.lengths[i]] = key[i, :, 0]
            self.v[layer][i, :, self.lengths[i]] = value[i, :, 0]
        end = max(self.lengths) + 1
        mask = torch.arange(end).unsqueeze(0) <= torch.tensor(self.lengths).unsqueeze(1)  # [N, end]
        return (self.k[layer][:, :, :end], mask), (self.v[layer][:, :, :end], mask)

    def finish(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]


def padded_attention(module: torch.nn.Module, query: torch.Tensor, key: tuple, value: tuple,
                     attention_mask: object, scaling: float | None = None, **kw: object) -> tuple:
    (k, mask), (v, _) = key, value
    o = F.scaled_dot_product_attention(query, k, v, attn_mask=mask[:, None, None, :], scale=scaling, enable_gqa=True)
    return o.transpose(1, 2).contiguous(), None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path)
    p.add_argument("--profile", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=100)
    args = p.parse_args()
    from transformers import AttentionInterface, DynamicCache

    settings = load_settings(args.config)
    builder = ProfileBuilder(ArtifactCache(settings.cache_dir), settings.bases, settings.profiles,
                             threads=settings.threads)
    spec = settings.profiles[args.profile]
    engine = load_engine(builder.build(args.profile), spec, args.threads or settings.threads)
    torch.set_num_threads(args.threads or settings.threads)
    model = engine.model  # type: ignore[attr-defined]
    tb.register()
    AttentionInterface.register(PADDED, padded_attention)
    base = engine.tokenize("Once upon a time in a city by the sea there lived an old sailor who " * 20)
    prompts = [base[: args.prompt_tokens - 7 * i] for i in range(args.batch)]
    times: dict[str, list[float]] = {"packed": [], "padded": [], "serial": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for mode in times:
                kvs = [tb.SeqKV() for _ in prompts]
                model.config._attn_implementation = tb.ATTN_NAME
                last = [tb.packed_forward(model, [(kv, ids, False)])[0][-1]
                        for kv, ids in zip(kvs, prompts, strict=True)]
                toks = [int(r.argmax()) for r in last]
                if mode == "serial":
                    model.config._attn_implementation = "sdpa"
                    caches = []
                    for ids in prompts:
                        c = DynamicCache(config=model.config)
                        model(input_ids=torch.tensor([ids]), cache=c, use_cache=True, logits_to_keep=1)
                        caches.append(c)
                elif mode == "padded":
                    model.config._attn_implementation = PADDED
                    padded = PaddedStep(len(kvs))
                    padded.load(kvs)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    if mode == "packed":
                        work = [(kv, [t], False) for kv, t in zip(kvs, toks, strict=True)]
                        rows = [r[-1] for r in tb.packed_forward(model, work)]
                    elif mode == "padded":
                        pos = torch.tensor(padded.lengths).unsqueeze(1)
                        out = model(input_ids=torch.tensor(toks).unsqueeze(1), position_ids=pos, cache=padded,
                                    use_cache=True, logits_to_keep=1)
                        padded.finish()
                        rows = list(out.logits[:, -1].float())
                    else:
                        rows = [model(input_ids=torch.tensor([[t]]), cache=c, use_cache=True, logits_to_keep=1)
                                .logits[0, -1].float() for c, t in zip(caches, toks, strict=True)]
                    toks = [int(r.argmax()) for r in rows]
                times[mode].append((time.perf_counter() - t0) / args.steps)
    model.config._attn_implementation = "sdpa"
    print(f"{args.profile}, {args.batch} sequences of ~{args.prompt_tokens} tokens, {args.steps} steps x "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads")
    print("| mode | best ms/step | median ms/step | tok/s (best) |")
    print("|---|---|---|---|")
    for mode, t in times.items():
        print(f"| {mode} | {1000 * min(t):.1f} | {1000 * statistics.median(t):.1f} | {args.batch / min(t):.1f} |")


if __name__ == "__main__":
    main()
