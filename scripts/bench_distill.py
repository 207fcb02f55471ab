#!/usr/bin/env python
"""Evidence for distillation: distilled students of the default model against the teacher and its quants.

For one narrow task (the shipped word-forms prompt set: plurals, antonyms, ...) and for general chat prompts
(the shipped general set), the teacher (SmolLM2-135M-Instruct, float32 HF checkpoint of the embedded GGUF)
answers the prompts with recorded distributions; a student = teacher minus its `--drop-layers`
lowest-Block-Influence layers is then
  (a) left untrained (the pruned init),
  (b) trained on the teacher's sampled text with hard labels (SFT / behaviour cloning),
  (c) trained by KD on the teacher's full-vocabulary distributions (teacher in-process),
  (d) trained by KD from the records' top-20 + tail bucket only,
  (e) (c) then exported to GGUF and quantized to Q8_0 / Q4_K_M,
all with the same token budget, through the product path: `method: distill` profiles (with `then: gguf:q8_0`
/ `gguf:q4_k_m` for (e)) built by the ProfileBuilder through the artifact cache, as `shrinkserve distill`
builds them. Every model is scored against the teacher — KL(teacher ‖ model), top-1 agreement, and both on
the hardest 10% positions — on held-out traffic of the task (prompts never trained on), of general chat, and
on the held-out prose `shrinkserve eval` uses; plus single-stream decode tok/s and bytes on disk, beside the
teacher's own Q8_0 / Q4_K_M. Prints a markdown table, writes results.json and a plot.

    ./.venv/bin/python scripts/bench_distill.py --quick          # smoke run, a few minutes
    ./.venv/bin/python scripts/bench_distill.py                  # the evidence run (~30 min on a quiet 2-core box)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.distill import pipeline
from shrinkserve.compression.distill.evaluate import prose_examples, score_candidates

log = logging.getLogger("bench_distill")

# -------------------------------------------------------------------------------------------- prompts
# The shipped prompt sets (compression/data/prompts/, see compression/synthetic.py): one narrow task family
# (train + held-out files, whole prompts split again by the distillation's held-out fraction) and general chat.
SHIPPED = {"task": ("word_forms.train", "word_forms.heldout"), "general": ("general",)}


def prompt_rows(kind: str, n: int) -> list[dict[str, str]]:
    from shrinkserve.compression.synthetic import prompt_file

    rows = [json.loads(line) for name in SHIPPED[kind] for line in prompt_file(name).read_text().splitlines()
            if line.strip()]
    return [{k: r[k] for k in ("prompt", "system", "messages") if k in r} for r in rows][:n]


# -------------------------------------------------------------------------------------------- engines


def torch_engine(path: Path, threads: int, dtype: str) -> Any:
    from shrinkserve.server.engines.torch_engine import TorchEngine

    return TorchEngine(path, threads=threads, dtype=dtype)


def llamacpp_engine(path: Path, threads: int) -> Any:
    from shrinkserve.server.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine(path, threads=threads, context_length=2048)


def decode_speed(engine: Any, tokens: int, rounds: int) -> float:
    from shrinkserve.compression.quality import Scorer, decode_speed

    scorer = Scorer(engine)
    try:
        return decode_speed(scorer, tokens=tokens, rounds=rounds)
    finally:
        scorer.close()


def file_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


# -------------------------------------------------------------------------------------------- the run


def write_prompts(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def student_profile(prompts: Path, loss: str, a: argparse.Namespace, then: str | None = None) -> dict[str, Any]:
    """A `method: distill` profile as a user's YAML would write it."""
    profile = {
        "method": "distill",
        "data": {"synthetic": {"prompts": str(prompts), "max_tokens": a.max_new_tokens, "top_k": 20,
                               "temperature": 0.8, "top_p": 0.95}, "heldout_fraction": a.heldout_fraction},
        "student": {"drop_layers": a.drop_layers, "calibration_samples": a.calibration_samples},
        "loss": {"kind": loss},
        "budget": {"tokens": a.tokens, "seconds": a.seconds, "steps": None},
        "optimizer": {"lr": a.lr, "batch": a.batch, "accum": 1, "warmup_steps": a.warmup},
        "evaluation": {"every": a.eval_every, "examples": a.eval_examples, "patience": a.patience},
        "checkpoint_every": a.checkpoint_every, "device": a.device, "seed": 0,
    }
    return {**profile, "then": then} if then else profile


QUANTS = ("q8_0", "q4_k_m")
LABELS = {"ce": "(b) SFT on teacher text", "kd": "(c) KD full vocab", "topk": "(d) KD top-20+tail"}


def run(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec

    torch.set_num_threads(a.threads)
    cache = ArtifactCache(Path(a.cache_dir).expanduser())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    profiles: dict[str, dict[str, Any]] = {"teacher": {"method": "hf", "dtype": "float32"},
                                           **{f"teacher-{q}": {"method": f"gguf:{q}"} for q in QUANTS}}
    for kind, n in (("task", a.task_prompts), ("general", a.general_prompts)):
        prompts = write_prompts(out / f"prompts-{kind}.jsonl", prompt_rows(kind, n))
        for loss in ("ce", "kd", "topk"):
            profiles[f"{kind}-{loss}"] = student_profile(prompts, loss, a)
        for q in QUANTS:
            profiles[f"{kind}-kd-{q}"] = student_profile(prompts, "kd", a, then=f"gguf:{q}")
    builder = ProfileBuilder(cache, {"smollm2": BaseSpec()},
                             {name: ProfileSpec.model_validate(p) for name, p in profiles.items()}, threads=a.threads)
    started = time.perf_counter()

    def built_row(name: str, **row: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        built = builder.build(name)
        return {**row, "path": built.path, "cache_hit": built.cache_hit,
                "build_seconds": round(time.perf_counter() - t0, 1)}

    rows: dict[str, dict[str, Any]] = {
        "teacher": built_row("teacher", set="-", label="teacher (f32, torch)", kind="torch", tokens=0)}
    teacher_dir = rows["teacher"]["path"]
    for q in QUANTS:
        rows[f"teacher+{q}"] = built_row(f"teacher-{q}", set="-", label=f"teacher {q.upper()} (llama.cpp)",
                                         kind="llamacpp", tokens=0)
    heldout: dict[str, list] = {}
    for kind in ("task", "general"):
        for loss in ("kd", "ce", "topk"):
            log.info("[%s] student by %s (%s tokens budget)", kind, loss, a.tokens)
            row = built_row(f"{kind}-{loss}", set=kind, label=LABELS[loss], kind="torch")
            extra = (cache.manifest(builder.key(f"{kind}-{loss}") or "") or {})["extra"]
            row.update(tokens=extra["tokens_trained"], seconds=extra["train_seconds"], stop=extra["stop_reason"])
            rows[f"{kind}:{loss}"] = row
            held = pipeline.heldout_examples(row["path"])
            assert kind not in heldout or pipeline.examples_digest(heldout[kind]) == pipeline.examples_digest(held)
            heldout[kind] = held
            if loss != "kd":
                continue
            init = cache.lookup(builder.plan(f"{kind}-kd").node.deps["student_init"].key or "")
            assert init is not None
            rows[f"{kind}:init"] = {"set": kind, "label": "(a) pruned, untrained", "path": init.path, "kind": "torch",
                                    "tokens": 0, "prune": init.manifest["extra"]["prune"]}
            for q in QUANTS:
                rows[f"{kind}:kd+{q}"] = built_row(f"{kind}-kd-{q}", set=kind, label=f"(e) KD + {q.upper()}",
                                                   kind="llamacpp", tokens=extra["tokens_trained"])
    data_seconds = time.perf_counter() - started
    order = ["init", "ce", "kd", "topk", "kd+q8_0", "kd+q4_k_m"]
    rows = {k: rows[k] for k in ["teacher", *(f"teacher+{q}" for q in QUANTS),
                                 *(f"{kind}:{v}" for kind in ("task", "general") for v in order)]}

    # -- quality: every model against the teacher, on each held-out set, the teacher read once per example
    teacher_engine = torch_engine(teacher_dir, a.threads, "float32")
    from shrinkserve.compression.quality import EvalSet

    prose_ids = teacher_engine.tokenize(EvalSet.load().text, add_special=False)[: a.prose_tokens]
    sets = {"task": heldout["task"][: a.heldout_max], "general": heldout["general"][: a.heldout_max],
            "prose": prose_examples(prose_ids)}
    engines: dict[str, Any] = {}
    for name, row in rows.items():
        engines[name] = (torch_engine(row["path"], a.threads, "float32") if row["kind"] == "torch"
                         else llamacpp_engine(row["path"], a.threads))
        row["bytes"] = file_bytes(row["path"])
    for set_name, examples in sets.items():
        log.info("scoring %d models on %s (%d examples)", len(engines), set_name, len(examples))
        scores = score_candidates(engines, examples, teacher=teacher_engine)
        for name, s in scores.items():
            rows[name][set_name] = {k: s[k] for k in ("tokens", "kl", "top1", "kl_hard10", "top1_hard10")}
    # -- speed: torch rows in the dtype they would serve in, llama.cpp rows as served
    for name, eng in engines.items():
        if rows[name]["kind"] == "torch" and a.speed_dtype != "float32":
            eng = torch_engine(rows[name]["path"], a.threads, a.speed_dtype)
        rows[name]["tok_s"] = decode_speed(eng, a.speed_tokens, a.speed_rounds)
        log.info("%s: %.1f tok/s", name, rows[name]["tok_s"])
    for eng in engines.values():
        close = getattr(eng, "close", None)
        if close:
            close()
    engines.clear()
    gc.collect()
    return {"rows": {k: {**v, "path": str(v["path"]) if v.get("path") else None} for k, v in rows.items()},
            "args": vars(a), "data_and_training_seconds": round(data_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "heldout": {k: {"examples": len(v), "response_tokens": sum(e.n_response for e in v)}
                        for k, v in sets.items()}}


# -------------------------------------------------------------------------------------------- report


def _fmt(row: dict[str, Any], s: str, key: str) -> str:
    v = row.get(s, {}).get(key)
    return "—" if v is None else (f"{v:.3f}" if "kl" in key else f"{v:.2f}")


def markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]
    t_speed = rows["teacher"].get("tok_s") or float("nan")
    t_bytes = rows["teacher"].get("bytes") or 1
    head = ("| set | model | tokens trained | task KL | task top-1 | task KL hard10 | task top-1 hard10 | "
            "general KL | general top-1 | prose KL | prose top-1 | prose KL hard10 | decode tok/s | × teacher | "
            "MB on disk | × teacher |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows.values():
        speed = r.get("tok_s")
        lines.append(
            f"| {r['set']} | {r['label']} | {r['tokens']} | {_fmt(r, 'task', 'kl')} | {_fmt(r, 'task', 'top1')} | "
            f"{_fmt(r, 'task', 'kl_hard10')} | {_fmt(r, 'task', 'top1_hard10')} | {_fmt(r, 'general', 'kl')} | "
            f"{_fmt(r, 'general', 'top1')} | {_fmt(r, 'prose', 'kl')} | {_fmt(r, 'prose', 'top1')} | "
            f"{_fmt(r, 'prose', 'kl_hard10')} | {speed:.1f} | {speed / t_speed:.2f} | {r['bytes'] / 1e6:.0f} | "
            f"{r['bytes'] / t_bytes:.2f} |")
    h = res["heldout"]
    lines.append("")
    lines.append(f"Held-out: task {h['task']['examples']} prompts / {h['task']['response_tokens']} response tokens, "
                 f"general {h['general']['examples']} / {h['general']['response_tokens']}, prose "
                 f"{h['prose']['response_tokens']} tokens. Total {res['total_seconds']:.0f} s "
                 f"(data + training {res['data_and_training_seconds']:.0f} s).")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [(k, r) for k, r in res["rows"].items() if k != "teacher"]
    names = [f"{r['set']}: {r['label']}" if r["set"] != "-" else r["label"] for _, r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(15, 0.45 * len(rows) + 2), sharey=True)
    y = np.arange(len(rows))
    for i, (s, color) in enumerate((("task", "C0"), ("general", "C1"), ("prose", "C2"))):
        vals = [r.get(s, {}).get("kl", np.nan) for _, r in rows]
        axes[0].barh(y + (i - 1) * 0.27, vals, height=0.27, color=color, label=f"held-out {s}")
    axes[0].set_xlabel("KL(teacher ‖ model), nats/token (lower is better)")
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[0].legend()
    t = res["rows"]["teacher"]["tok_s"]
    rel = [r.get("tok_s", np.nan) / t for _, r in rows]
    axes[1].barh(y, rel, color="C3")
    for yi, (v, (_, r)) in enumerate(zip(rel, rows, strict=True)):
        axes[1].text(v, yi, f" {r['bytes'] / 1e6:.0f} MB", va="center", fontsize=8)
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("decode tok/s relative to the f32 teacher (torch); size on disk")
    fig.suptitle("Distilled students vs the teacher and its quants (SmolLM2-135M-Instruct)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budget: checks the whole path in a few minutes")
    p.add_argument("--cache-dir", default=os.environ.get("SHRINKSERVE_CACHE_DIR", "~/.cache/shrinkserve"))
    p.add_argument("--out", default=".cache/bench-distill")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--drop-layers", type=int, default=10)
    p.add_argument("--tokens", type=int, default=12_000, help="response tokens trained per student")
    p.add_argument("--seconds", type=float, default=180.0, help="wall-clock cap per student (6 students)")
    p.add_argument("--task-prompts", type=int, default=200)
    p.add_argument("--general-prompts", type=int, default=120)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--heldout-max", type=int, default=40, help="held-out examples scored per set")
    p.add_argument("--prose-tokens", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--speed-tokens", type=int, default=32)
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--speed-dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()
    if a.quick:
        a.tokens, a.seconds, a.task_prompts, a.general_prompts = 200, 60.0, 30, 16
        a.max_new_tokens, a.heldout_max, a.prose_tokens, a.eval_every = 24, 6, 256, 5
        a.eval_examples, a.calibration_samples, a.speed_rounds, a.speed_tokens = 4, 8, 1, 16
        a.heldout_fraction = 0.25
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res = run(a)
    out = Path(a.out)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    table = markdown(res)
    (out / "table.md").write_text(table + "\n")
    plot(res, out / "distill.png")
    print(table)
    print(f"\nresults: {out / 'results.json'}, plot: {out / 'distill.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
