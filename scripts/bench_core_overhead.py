"""Per-token overhead of the serving core on a GGUF profile: wall time per token minus llama_decode time.

One sequence decodes through `BatchingCore` (the scheduler thread, DecodeState, delivery to the event
loop) while every `llama_decode` call is timed; the difference per token is what the server adds on the
decode's critical path (the HTTP side runs on the event loop, in parallel with the next decode).

    .venv/bin/python scripts/bench_core_overhead.py --profile q4_k_m --tokens 200
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import llama_cpp

from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.profiles import ProfileBuilder
from shrinkserve.server.engines.llamacpp import LlamaCppEngine
from shrinkserve.server.runtime.batching import BatchingCore
from shrinkserve.server.runtime.types import GenerationRequest, SamplingParams
from shrinkserve.server.settings import load_settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path)
    p.add_argument("--profile", default="q4_k_m")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    settings = load_settings(args.config)
    builder = ProfileBuilder(ArtifactCache(settings.cache_dir), settings.bases, settings.profiles,
                             threads=settings.threads)
    engine = LlamaCppEngine(builder.build(args.profile).path, threads=settings.threads)
    core = BatchingCore(args.profile, engine, max_seqs=8, slot_capacity=1024, max_queue=8)
    spent = [0.0, 0]
    decode = llama_cpp.llama_decode

    def timed(ctx: object, batch: object) -> int:
        t0 = time.perf_counter()
        rc = decode(ctx, batch)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1
        return rc

    llama_cpp.llama_decode = timed

    async def one(temperature: float) -> list[float]:
        req = GenerationRequest(engine.tokenize("Story: once upon a time"),
                                SamplingParams(max_tokens=args.tokens, temperature=temperature, ignore_eos=True))
        ticket = await core.admit(1, max_total_tokens=req.max_total_tokens)
        stamps = [time.perf_counter() async for _ in core.generate(ticket, req)]
        ticket.release()
        return stamps

    print(f"{args.profile}: {args.tokens} tokens per round, one sequence")
    print("| sampling | ms/token (wall) | ms/llama_decode | overhead ms/token |")
    print("|---|---|---|---|")
    try:
        for _ in range(args.rounds):
            for temperature in (0.0, 1.0):
                stamps = asyncio.run(one(temperature))
                spent[:] = [0.0, 0]
                stamps = asyncio.run(one(temperature))
                wall = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
                per = spent[0] / spent[1]
                label = "greedy" if temperature == 0 else "temperature 1"
                print(f"| {label} | {1000 * wall:.2f} | {1000 * per:.2f} | {1000 * (wall - per):.2f} |")
    finally:
        llama_cpp.llama_decode = decode
        core.close()


if __name__ == "__main__":
    main()
