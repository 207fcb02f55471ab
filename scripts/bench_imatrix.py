#!/usr/bin/env python
"""Evidence for importance-matrix GGUF quantization on the default model (SmolLM2-135M-Instruct).

For each llama.cpp type (q4_0, q4_k_m, q3_k_m, q2_k by default) three profiles are built through the product
path (ProfileBuilder + artifact cache, as `shrinkserve serve` builds them): plain, with an imatrix from the
shipped calibration text, and with an imatrix from task traffic — the base answering the shipped word-forms
task's train prompts (compression/data/prompts/word_forms.train.jsonl, recorded like captured traffic by
compression/synthetic.py). Each is scored against the base (float32, PyTorch) like `shrinkserve eval`:
KL(base ‖ quant), top-1 agreement, and KL on the hardest 10% of positions, on
  - held-out prose (compression/data/heldout.txt, never used for any imatrix), and
  - held-out task traffic: the base's answers to word_forms.heldout.jsonl (prompts never used for the
    imatrix), scored on the response tokens as a distilled student's traffic is.
Prints a markdown table and writes results.json.

    ./.venv/bin/python scripts/bench_imatrix.py                 # the evidence run
    ./.venv/bin/python scripts/bench_imatrix.py --types q4_k_m --prose-tokens 1024   # smaller

Measured on a 2-core box shared with other jobs (load average 5-7): 24.5 min in all, of which the base's
answers to the 199 task prompts 9.6 min, the imatrices and 12 quantizations 3.5 min, scoring 11.5 min. A second
run with the same --out and --cache-dir reuses the traffic and the artifacts and only scores.
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

log = logging.getLogger("bench_imatrix")

TYPES = ("q4_0", "q4_k_m", "q3_k_m", "q2_k")
VARIANTS = ("plain", "calibration", "task")


def task_traffic(teacher_dir: Path, prompts: str, out: Path, a: argparse.Namespace) -> Path:
    """The base's answers to a shipped prompt set as a capture directory (made once per output dir)."""
    from shrinkserve.compression.synthetic import SyntheticConfig, generate_teacher_data, load_prompts

    if out.is_dir() and any(out.glob("*.sscap")):
        return out
    log.info("the base answers %s (recorded as traffic in %s)", prompts, out)
    cfg = SyntheticConfig(max_tokens=a.answer_tokens, temperature=0.7, top_p=0.95, seed=0, batch_size=8,
                          threads=a.threads)
    report = generate_teacher_data(teacher_dir, load_prompts(prompts), out, cfg, profile="base", progress=False)
    log.info("%s: %d answers, %d tokens in %.0f s", prompts, report.records, report.tokens, report.seconds)
    return out


class ProgressLog:
    """Logs every quarter of the tokens scored (scoring 12 models takes minutes on a busy 2-core box)."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done, self.next = what, max(total, 1), 0, max(total, 1) // 4

    def __call__(self, n: int) -> None:
        self.done += n
        if self.done >= self.next:
            log.info("%s: %d of %d tokens scored", self.what, self.done, self.total)
            self.next += self.total // 4


def profiles(types: list[str], task_dir: Path, a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"base": {"method": "hf", "dtype": "float32"}}
    for t in types:
        out[f"{t}/plain"] = {"method": f"gguf:{t}"}
        out[f"{t}/calibration"] = {"method": f"gguf:{t}",
                                   "imatrix": {"source": "calibration", "max_tokens": a.imatrix_tokens}}
        out[f"{t}/task"] = {"method": f"gguf:{t}", "imatrix": {"source": "traffic", "path": str(task_dir),
                                                               "max_tokens": a.imatrix_tokens}}
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from shrinkserve.compression.cache import ArtifactCache
    from shrinkserve.compression.distill.data import load_examples
    from shrinkserve.compression.distill.evaluate import prose_examples, score_candidates
    from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec
    from shrinkserve.compression.quality import EvalSet
    from shrinkserve.compression.traffic.reader import read_records
    from shrinkserve.server.engines.llamacpp import LlamaCppEngine
    from shrinkserve.server.engines.torch_engine import TorchEngine

    torch.set_num_threads(a.threads)
    started = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = ArtifactCache(Path(a.cache_dir).expanduser())
    base_only = ProfileBuilder(cache, {"smollm2": BaseSpec()}, {"base": ProfileSpec(method="hf", dtype="float32")},
                               threads=a.threads)
    teacher_dir = base_only.build("base").path
    task_dir = task_traffic(teacher_dir, "word_forms.train", out / "traffic-train", a)
    held_dir = task_traffic(teacher_dir, "word_forms.heldout", out / "traffic-heldout", a)
    data_seconds = time.perf_counter() - started

    types = list(a.types)
    builder = ProfileBuilder(cache, {"smollm2": BaseSpec()},
                             {n: ProfileSpec.model_validate(p) for n, p in profiles(types, task_dir, a).items()},
                             threads=a.threads)
    rows: dict[str, dict[str, Any]] = {}
    for t in types:
        for v in VARIANTS:
            t0 = time.perf_counter()
            built = builder.build(f"{t}/{v}")
            extra = (built.manifest or {}).get("extra") or {}
            rows[f"{t}/{v}"] = {"type": t, "imatrix": v, "path": str(built.path), "bytes": built.path.stat().st_size,
                                "build_seconds": round(time.perf_counter() - t0, 1), "cache_hit": built.cache_hit,
                                "imatrix_tokens": (extra.get("imatrix") or {}).get("tokens")}
            log.info("built %s/%s (%s, %.1f s)", t, v, "hit" if built.cache_hit else "built",
                     rows[f"{t}/{v}"]["build_seconds"])
    build_seconds = time.perf_counter() - started - data_seconds

    teacher = TorchEngine(teacher_dir, threads=a.threads, dtype="float32")
    prose_ids = teacher.tokenize(EvalSet.load().text, add_special=False)[: a.prose_tokens]
    sets = {"prose": prose_examples(prose_ids), "task": load_examples(read_records([held_dir]))}
    engines = {name: LlamaCppEngine(Path(r["path"]), threads=a.threads, context_length=2048)
               for name, r in rows.items()}
    for set_name, examples in sets.items():
        log.info("scoring %d models on held-out %s (%d sequences)", len(engines), set_name, len(examples))
        progress = ProgressLog(f"held-out {set_name}", sum(len(ex.ids) - ex.response_start for ex in examples))
        for name, s in score_candidates(engines, examples, teacher=teacher, progress=progress).items():
            rows[name][set_name] = {k: s[k] for k in ("tokens", "kl", "top1", "kl_hard10", "top1_hard10")}
    for t in types:  # KL reduction against the plain quantization of the same type
        plain = rows[f"{t}/plain"]
        for v in VARIANTS[1:]:
            r = rows[f"{t}/{v}"]
            r["kl_reduction"] = {s: 1.0 - r[s]["kl"] / plain[s]["kl"] for s in sets}
    return {"model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF) vs its float32 HF checkpoint",
            "types": types, "imatrix_tokens": a.imatrix_tokens, "prose_tokens": a.prose_tokens,
            "task_heldout_examples": len(sets["task"]),
            "task_heldout_tokens": rows[f"{types[0]}/plain"]["task"]["tokens"],
            "threads": a.threads, "data_seconds": round(data_seconds, 1), "build_seconds": round(build_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1), "rows": rows}


def table(res: dict[str, Any]) -> str:
    lines = ["| type | imatrix | MB | prose KL | prose top-1 | prose KL hard10 | task KL | task top-1 | "
             "task KL hard10 | KL vs plain (prose / task) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        red = r.get("kl_reduction")
        red_s = f"{-100 * red['prose']:+.1f}% / {-100 * red['task']:+.1f}%" if red else "-"
        p, t = r["prose"], r["task"]
        lines.append(f"| {r['type']} | {r['imatrix']} | {r['bytes'] / 1e6:.1f} | {p['kl']:.4f} | {p['top1']:.3f} | "
                     f"{p['kl_hard10']:.4f} | {t['kl']:.4f} | {t['top1']:.3f} | {t['kl_hard10']:.4f} | {red_s} |")
        del name
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=list(TYPES))
    p.add_argument("--imatrix-tokens", type=int, default=8192, help="imatrix max_tokens")
    p.add_argument("--prose-tokens", type=int, default=2048, help="held-out prose tokens scored")
    p.add_argument("--answer-tokens", type=int, default=48, help="longest task answer generated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=os.environ.get("SHRINKSERVE_CACHE_DIR", "~/.cache/shrinkserve"))
    p.add_argument("--out", default="bench-imatrix")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res = run(a)
    Path(a.out, "results.json").write_text(json.dumps(res, indent=2))
    print(table(res))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=2))
    print(json.dumps({n: {"prose": r["prose"], "task": r["task"], "kl_reduction": r.get("kl_reduction")}
                      for n, r in res["rows"].items()}, indent=2))


if __name__ == "__main__":
    main()
