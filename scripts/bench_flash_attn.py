#!/usr/bin/env python
"""Flash attention on llama.cpp's CPU backend: does it move a GGUF's quality against the base?

For each llama.cpp type (f16, q8_0, q4_k_m, q4_0 by default) the profile is built through the product path
(ProfileBuilder + artifact cache) and scored on held-out prose (compression/data/heldout.txt, windows of
--window tokens) against the base (float32, PyTorch), like `shrinkserve eval`: KL(base ‖ quant), top-1
agreement and KL on the hardest 10% of positions — once with flash attention off (what shrinkserve runs) and
once on (llama-server's CPU default, `-fa auto`). Also printed: KL(off ‖ on), how far the two runs of the same
file are from each other, next to KL(base ‖ off), how far the file is from the base.

    ./.venv/bin/python scripts/bench_flash_attn.py                       # ~5 min on 2 idle cores
    ./.venv/bin/python scripts/bench_flash_attn.py --types q4_k_m --prose-tokens 1024 --window 1024

Prints a markdown table and writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("bench_flash_attn")

TYPES = ("f16", "q8_0", "q4_k_m", "q4_0")


def run(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from shrinkserve.compression.cache import ArtifactCache
    from shrinkserve.compression.distill.evaluate import prose_examples, score_candidates
    from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec
    from shrinkserve.compression.quality import EvalSet
    from shrinkserve.compression.scoring import chunked_logprobs, kl_top1
    from shrinkserve.server.engines.llamacpp import LlamaCppEngine
    from shrinkserve.server.engines.torch_engine import TorchEngine

    torch.set_num_threads(a.threads)
    started = time.perf_counter()
    cache = ArtifactCache(Path(a.cache_dir).expanduser())
    specs = {"base": ProfileSpec(method="hf", dtype="float32"),
             **{t: ProfileSpec(method=f"gguf:{t}") for t in a.types}}
    builder = ProfileBuilder(cache, {"smollm2": BaseSpec()}, specs, threads=a.threads)
    teacher = TorchEngine(builder.build("base").path, threads=a.threads, dtype="float32")
    paths = {t: builder.build(t).path for t in a.types}
    prose_ids = teacher.tokenize(EvalSet.load().text, add_special=False)[: a.prose_tokens]
    examples = prose_examples(prose_ids, window=a.window)
    rows: dict[str, dict[str, Any]] = {}
    for t in a.types:
        engines = {fa: LlamaCppEngine(paths[t], threads=a.threads, context_length=max(2048, a.window),
                                      flash_attn=fa == "on") for fa in ("off", "on")}
        t0 = time.perf_counter()
        scores = score_candidates(engines, examples, teacher=teacher)
        # The two settings against each other, position by position on the same windows.
        seqs = {fa: e.new_sequence() for fa, e in engines.items()}
        between = []
        for ex in examples:
            off = chunked_logprobs(seqs["off"], ex.ids, engines["off"].max_batch)
            on = chunked_logprobs(seqs["on"], ex.ids, engines["on"].max_batch)
            between.append(kl_top1(off, on))
        kl_off_on = float(np.concatenate([b[0] for b in between]).mean())
        top1_off_on = float(np.concatenate([b[1] for b in between]).mean())
        rows[t] = {"bytes": paths[t].stat().st_size, "seconds": round(time.perf_counter() - t0, 1),
                   **{fa: {k: scores[fa][k] for k in ("tokens", "kl", "top1", "kl_hard10", "top1_hard10")}
                      for fa in ("off", "on")},
                   "kl_off_on": kl_off_on, "top1_off_on": top1_off_on}
        log.info("%s: KL off %.5f on %.5f; off vs on %.6f (%.1f s)", t, rows[t]["off"]["kl"], rows[t]["on"]["kl"],
                 kl_off_on, rows[t]["seconds"])
        for e in engines.values():
            e.close()
    return {"model": "SmolLM2-135M-Instruct GGUFs vs its float32 HF checkpoint", "types": list(a.types),
            "prose_tokens": len(prose_ids), "window": a.window, "threads": a.threads,
            "total_seconds": round(time.perf_counter() - started, 1), "rows": rows}


def table(res: dict[str, Any]) -> str:
    lines = ["| type | MB | KL off | KL on | change | top-1 off / on | KL hard10 off / on | KL(off ‖ on) "
             "| top-1 off vs on |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t, r in res["rows"].items():
        off, on = r["off"], r["on"]
        change = (on["kl"] - off["kl"]) / off["kl"] if off["kl"] else 0.0
        lines.append(f"| {t} | {r['bytes'] / 1e6:.1f} | {off['kl']:.5f} | {on['kl']:.5f} | {100 * change:+.1f}% | "
                     f"{off['top1']:.4f} / {on['top1']:.4f} | {off['kl_hard10']:.4f} / {on['kl_hard10']:.4f} | "
                     f"{r['kl_off_on']:.6f} | {r['top1_off_on']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=list(TYPES))
    p.add_argument("--prose-tokens", type=int, default=4096, help="held-out prose tokens scored")
    p.add_argument("--window", type=int, default=1024, help="tokens per scored window (attention span)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=os.environ.get("SHRINKSERVE_CACHE_DIR", "~/.cache/shrinkserve"))
    p.add_argument("--out", default="bench-flash-attn")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res = run(a)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, "results.json").write_text(json.dumps(res, indent=2))
    print(table(res))


if __name__ == "__main__":
    main()
