#!/usr/bin/env python
"""Evidence for issue 10: distilled students of the default model against the teacher and its quants.

For one narrow task (the shipped word-forms prompt set: plurals, antonyms, ...; ISO-8601 date conversion
from templates where the set is not installed) and for general chat prompts, the teacher (SmolLM2-135M-
Instruct, float32 HF checkpoint of the embedded GGUF) answers the prompts with recorded distributions; a
student = teacher minus its `--drop-layers` lowest-Block-Influence layers is then
  (a) left untrained (the pruned init),
  (b) trained on the teacher's sampled text with hard labels (SFT / behaviour cloning),
  (c) trained by KD on the teacher's full-vocabulary distributions (teacher in-process),
  (d) trained by KD from the records' top-20 + tail bucket only,
  (e) (c) then exported to GGUF and quantized to Q8_0 / Q4_K_M,
all with the same token budget, through the product path (compression/distill/pipeline.py and the artifact
cache). Every model is scored against the teacher — KL(teacher ‖ model), top-1 agreement, and both on the
hardest 10% positions — on held-out traffic of the task (prompts never trained on), of general chat, and on
the held-out prose `shrinkserve eval` uses; plus single-stream decode tok/s and bytes on disk, beside the
teacher's own Q8_0 / Q4_K_M. Prints a markdown table, writes results.json and a plot.

    ./.venv/bin/python scripts/bench_distill.py --quick          # smoke run, a few minutes
    ./.venv/bin/python scripts/bench_distill.py                  # the evidence run (~30 min on a quiet 2-core box)

Without compression/gguf_export.py (the capture branch's HF → GGUF exporter) the (e) rows are reported as
TODO and skipped.
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

from shrinkserve.compression import data_file
from shrinkserve.compression.base_model import BaseSource, hf_checkpoint, plan_hf_checkpoint
from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.distill import pipeline
from shrinkserve.compression.distill.evaluate import prose_examples, score_candidates
from shrinkserve.compression.distill.options import DistillOptions

log = logging.getLogger("bench_distill")

# -------------------------------------------------------------------------------------------- prompts
# The shipped prompt sets (compression/data/prompts/, see compression/synthetic.py); where they are absent,
# a narrow task (ISO dates) and a general set come from the templates below.
SHIPPED = {"task": ("prompts/word_forms.train.jsonl", "prompts/word_forms.heldout.jsonl"),
           "general": ("prompts/general.jsonl",)}

ISO_SYSTEM = ("Convert the date the user gives to ISO 8601. Reply with the date only: YYYY-MM-DD, or "
              "YYYY-MM-DDTHH:MM when a time of day is given.")
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
TOPICS = ["photosynthesis", "the water cycle", "compound interest", "how vaccines work", "black holes",
          "the French Revolution", "machine learning", "plate tectonics", "the immune system", "inflation",
          "how a bicycle stays upright", "the internet", "volcanoes", "sleep", "recycling", "the moon's phases",
          "democracy", "electric cars", "coffee", "the Roman Empire", "honey bees", "rainbows", "gravity",
          "the stock market", "meditation", "dinosaurs", "solar panels", "the printing press", "tides", "jazz"]
TEMPLATES = ["Explain {} in simple terms.", "Write three short facts about {}.", "Why does {} matter?",
             "Give a one-paragraph summary of {}.", "What is a common misconception about {}?",
             "Write a short poem about {}.", "How would you teach a child about {}?"]


def _date_prompt(i: int) -> dict[str, str]:
    import random

    r = random.Random(i)
    y, m, d = r.randint(1950, 2030), r.randint(1, 12), r.randint(1, 28)
    style = r.randint(0, 4)
    month = MONTHS[m - 1]
    text = [f"{d} {month} {y}", f"{month[:3]} {d} {y}", f"{m:02d}/{d:02d}/{y} (US format, month first)",
            f"{d}th {month} {y}", f"{d} {month} {y}, {r.randint(0, 23):02d}:{r.choice([0, 15, 30, 45]):02d}"][style]
    return {"prompt": f"Convert to ISO 8601: {text}", "system": ISO_SYSTEM}


def prompt_rows(kind: str, n: int) -> list[dict[str, str]]:
    try:
        files = [data_file(p) for p in SHIPPED[kind]]
        if all(f.is_file() for f in files):
            rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
            rows = [{k: r[k] for k in ("prompt", "system", "messages") if k in r} for r in rows]
            return rows[:n]
    except (OSError, ValueError):
        pass
    if kind == "task":
        return [_date_prompt(i) for i in range(n)]
    return [{"prompt": t.format(topic)} for t in TEMPLATES for topic in TOPICS][:n]


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


def teacher_gguf(cache: ArtifactCache, quant: str, threads: int) -> Path:
    from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec

    builder = ProfileBuilder(cache, {"default": BaseSpec()}, {quant: ProfileSpec(method=f"gguf:{quant}")},
                             threads=threads)
    return builder.build(quant).path


def student_gguf(student_dir: Path, out_dir: Path, quant: str, threads: int) -> Path | None:
    """(e): the student through the HF → GGUF exporter, then llama.cpp's quantizer. None when the exporter
    (compression/gguf_export.py, capture branch) is not there yet."""
    try:
        from shrinkserve.compression.gguf_export import export_hf_to_gguf  # type: ignore[import-not-found]
    except ImportError:
        return None
    from shrinkserve.compression.gguf import quantize_gguf

    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "model-f16.gguf"
    if not f16.is_file():
        export_hf_to_gguf(student_dir, f16)
    out = out_dir / f"model-{quant}.gguf"
    if not out.is_file():
        quantize_gguf(f16, out, quant, threads=threads)
    return out


# -------------------------------------------------------------------------------------------- the run


def write_prompts(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def options(prompts: Path, loss: str, a: argparse.Namespace) -> DistillOptions:
    return DistillOptions.model_validate({
        "data": {"synthetic": {"prompts": str(prompts), "max_tokens": a.max_new_tokens, "top_k": 20,
                               "temperature": 0.8, "top_p": 0.95}, "heldout_fraction": a.heldout_fraction},
        "student": {"drop_layers": a.drop_layers, "calibration_samples": a.calibration_samples},
        "loss": {"kind": loss},
        "budget": {"tokens": a.tokens, "seconds": a.seconds, "steps": None},
        "optimizer": {"lr": a.lr, "batch": a.batch, "accum": 1, "warmup_steps": a.warmup},
        "evaluation": {"every": a.eval_every, "examples": a.eval_examples, "patience": a.patience},
        "checkpoint_every": a.checkpoint_every, "device": a.device, "seed": 0,
    })


def run(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    cache = ArtifactCache(Path(a.cache_dir).expanduser())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = BaseSource.resolve("default", "embedded")
    teacher_dir, _, _ = hf_checkpoint(cache, base)
    teacher_key = plan_hf_checkpoint(base).key
    started = time.perf_counter()

    students: dict[str, dict[str, Any]] = {}  # row name -> {path, kind, set, tokens, ...}
    heldout: dict[str, list] = {}
    for kind, n in (("task", a.task_prompts), ("general", a.general_prompts)):
        prompts = write_prompts(out / f"prompts-{kind}.jsonl", prompt_rows(kind, n))
        for loss in ("ce", "kd", "topk"):
            opts = options(prompts, loss, a)
            log.info("[%s] student by %s (%s tokens budget)", kind, loss, a.tokens)
            t0 = time.perf_counter()
            art, hit = pipeline.build_student(cache, opts, teacher_dir, teacher_key=teacher_key,
                                              teacher_name=f"smollm2-{kind}", threads=a.threads)
            extra = art.manifest["extra"]
            label = {"ce": "(b) SFT on teacher text", "kd": "(c) KD full vocab", "topk": "(d) KD top-20+tail"}[loss]
            students[f"{kind}:{loss}"] = {"set": kind, "label": label, "path": art.path, "kind": "torch",
                                          "tokens": extra["tokens_trained"], "seconds": extra["train_seconds"],
                                          "cache_hit": hit, "build_seconds": round(time.perf_counter() - t0, 1),
                                          "stop": extra["stop_reason"]}
            held = pipeline.heldout_examples(art.path)
            assert kind not in heldout or pipeline.examples_digest(heldout[kind]) == pipeline.examples_digest(held)
            heldout[kind] = held
            if loss == "kd":
                init_plan = pipeline.plan(opts, teacher_key, f"smollm2-{kind}")[1]
                init = cache.lookup(init_plan.key)
                assert init is not None
                students[f"{kind}:init"] = {"set": kind, "label": "(a) pruned, untrained", "path": init.path,
                                            "kind": "torch", "tokens": 0, "prune": init.manifest["extra"]["prune"]}
                for quant in ("q8_0", "q4_k_m"):
                    gguf = student_gguf(art.path, out / f"student-{kind}-kd", quant, a.threads)
                    students[f"{kind}:kd+{quant}"] = {
                        "set": kind, "label": f"(e) KD + {quant.upper()}", "path": gguf, "kind": "llamacpp",
                        "tokens": extra["tokens_trained"], "todo": gguf is None}
    data_seconds = time.perf_counter() - started

    rows: dict[str, dict[str, Any]] = {"teacher": {"set": "-", "label": "teacher (f32, torch)", "path": teacher_dir,
                                                   "kind": "torch", "tokens": 0}}
    for quant in ("q8_0", "q4_k_m"):
        rows[f"teacher+{quant}"] = {"set": "-", "label": f"teacher {quant.upper()} (llama.cpp)",
                                    "path": teacher_gguf(cache, quant, a.threads), "kind": "llamacpp", "tokens": 0}
    order = ["init", "ce", "kd", "topk", "kd+q8_0", "kd+q4_k_m"]
    for kind in ("task", "general"):
        for v in order:
            rows[f"{kind}:{v}"] = students[f"{kind}:{v}"]

    # -- quality: every model against the teacher, on each held-out set, the teacher read once per example
    teacher_engine = torch_engine(teacher_dir, a.threads, "float32")
    from shrinkserve.compression.quality import EvalSet

    prose_ids = teacher_engine.tokenize(EvalSet.load().text, add_special=False)[: a.prose_tokens]
    sets = {"task": heldout["task"][: a.heldout_max], "general": heldout["general"][: a.heldout_max],
            "prose": prose_examples(prose_ids)}
    engines: dict[str, Any] = {}
    for name, row in rows.items():
        if row.get("todo"):
            continue
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
        if r.get("todo"):
            lines.append(f"| {r['set']} | {r['label']} | {r['tokens']} | TODO: needs compression/gguf_export.py "
                         "(capture branch) | | | | | | | | | | | | |")
            continue
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

    rows = [(k, r) for k, r in res["rows"].items() if not r.get("todo") and k != "teacher"]
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
