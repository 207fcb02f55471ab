#!/usr/bin/env python
"""What idle KV in llama.cpp's unified pool costs every decoding row, with flash attention off and on.

One `LlamaCppBatch` (the serving core's batch model: one context, unified KV of --pool tokens) on a GGUF:
--rows sequences of --prompt tokens decode --steps tokens together, alone in the pool, then beside one idle
sequence of --idle tokens (a finished prompt kept for prefix reuse), then alone again; flash attention off and
on alternate --rounds times in one process, so the ratios come from one run.

    .venv/bin/python scripts/bench_unified_kv.py --profile q4_k_m
    .venv/bin/python scripts/bench_unified_kv.py --gguf model.gguf --rows 8 --idle 4800 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gguf_of(profile: str) -> Path:
    out = subprocess.run([str(ROOT / ".venv/bin/shrinkserve"), "profiles", "--json"], capture_output=True,
                         text=True, check=True)
    return Path(next(p for p in json.loads(out.stdout) if p["name"] == profile)["path"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", help="GGUF file (default: --profile's artifact)")
    p.add_argument("--profile", default="q4_k_m")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--prompt", type=int, default=300, help="prompt tokens per row")
    p.add_argument("--idle", type=int, default=4800, help="tokens of the idle sequence")
    p.add_argument("--pool", type=int, default=8192)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()

    from shrinkserve.server.engines.base import Work
    from shrinkserve.server.engines.llamacpp import LlamaCppBatch, LlamaCppEngine

    gguf = Path(a.gguf) if a.gguf else gguf_of(a.profile)
    print(f"{gguf.name}: {a.rows} rows x {a.prompt} prompt tokens, {a.steps} steps, pool {a.pool}, "
          f"idle sequence {a.idle} tokens, {a.threads} threads")
    print("| flash attention | alone tok/s | beside idle tok/s | ratio | alone again tok/s |")
    print("|---|---|---|---|---|")
    for _ in range(a.rounds):
        for fa in (False, True):
            engine = LlamaCppEngine(gguf, threads=a.threads, flash_attn=fa)
            model = engine.new_batch(a.rows + 2, a.pool, a.pool)
            base = engine.tokenize("The quick brown fox jumps over the lazy dog. " * 400)
            ids = base[: a.prompt]

            def rate(model: LlamaCppBatch = model, ids: list[int] = ids) -> float:
                slots = [model.acquire() for _ in range(a.rows)]
                for s in slots:
                    model.step([Work(s, ids)])
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    model.step([Work(s, [42]) for s in slots])
                seconds = time.perf_counter() - t0
                for s in slots:
                    model.release(s)
                return a.steps * a.rows / seconds

            alone = rate()
            idle = model.acquire()
            long = (base * (a.idle // len(base) + 1))[: a.idle]
            for i in range(0, a.idle, model.max_chunk):
                model.step([Work(idle, long[i : i + model.max_chunk])])
            beside = rate()
            model.release(idle)
            again = rate()
            print(f"| {'on' if fa else 'off'} | {alone:.1f} | {beside:.1f} | {beside / alone:.2f} | {again:.1f} |",
                  flush=True)
            model.close()
            engine.close()


if __name__ == "__main__":
    main()
