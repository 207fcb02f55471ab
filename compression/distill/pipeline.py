"""The steps of `method: distill` (compression/distill/method.py plans them as cached nodes of the registry):

    teacher-data   (only for synthetic prompts)  teacher + prompts file + sampling → records/ (capture format)
    student-init   teacher + data + student shape → pruned HF checkpoint (BI scores in the manifest)
    student        teacher + data + student-init + full recipe → trained HF checkpoint

The trained student's artifact only appears when training has finished (the cache renames a complete
directory into place), so a half-trained student is never served. Training checkpoints live outside the
artifact, in the cache's work directory of the student's key, so a build killed at any point resumes
where its last checkpoint left off when the same profile is built again.

The artifact also holds `distill/heldout.jsonl` (the held-out split, never trained on: what
`score_on_traffic` measures the profile on) and `distill/result.json` (the training history).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from shrinkserve.compression.base_model import tool_version
from shrinkserve.compression.distill.data import (
    DistillExample,
    examples_digest,
    load_examples,
    read_jsonl_records,
    split_heldout,
    write_jsonl_records,
)
from shrinkserve.compression.distill.options import DistillOptions, SyntheticData
from shrinkserve.compression.traffic.reader import capture_files
from shrinkserve.compression.traffic.reader import read_records as read_capture_records

log = logging.getLogger("shrinkserve.distill")

# Bump when the code's output changes for the same recipe and inputs (it is part of every key below).
DISTILL_FORMAT = "1"
RECORDS_DIR = "records"  # inside the teacher-data artifact: the capture records
HELDOUT_NAME = "distill/heldout.jsonl"
RESULT_NAME = "distill/result.json"


# -- data ------------------------------------------------------------------------------------------------


def _is_jsonl_records(path: Path) -> bool:
    """Examples written by `write_examples` (JSONL with top-level `completion_ids`, not the older capture
    JSONL's `teacher_topk`, which compression/traffic/ reads)."""
    if path.suffix != ".jsonl":
        return False
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and "completion_ids" in row and "teacher_topk" not in row


def _files(paths: Sequence[Path]) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p).expanduser()
        out.extend(capture_files([p]) if p.is_dir() else [p])
    return out


def read_records(paths: Sequence[Path]) -> Iterator[Any]:
    """Records of the given files/directories: capture segments and the older capture JSONL
    (compression/traffic/), and example JSONL written by `write_examples` (tests, held-out splits)."""
    for path in _files(paths):
        if _is_jsonl_records(path):
            yield from read_jsonl_records([path])
        else:
            yield from read_capture_records([path])


def load_split(
    paths: Sequence[Path], opts: DistillOptions, *, vocab_size: int,
) -> tuple[list[DistillExample], list[DistillExample]]:
    """(train, held-out) examples of the data, cut to the training length; deterministic for the options."""
    records = read_records(paths)
    examples = load_examples(records, vocab_size=vocab_size, max_len=opts.optimizer.max_len)
    if opts.data.max_examples is not None:
        examples = examples[: opts.data.max_examples]
    train, held = split_heldout(examples, opts.data.heldout_fraction, seed=opts.seed)
    if not train:
        raise ValueError(f"no training examples in {[str(p) for p in paths]}")
    if opts.loss.kind == "topk" and not all(ex.has_topk for ex in train):
        raise ValueError("loss 'topk' needs top-k teacher logprobs in every record")
    return train, held


def write_examples(examples: Sequence[DistillExample], path: Path) -> None:
    def rec(ex: DistillExample) -> dict[str, Any]:
        r = ex.response_start
        out: dict[str, Any] = {"prompt_ids": ex.ids[:r], "completion_ids": ex.ids[r:]}
        if ex.topk_ids is not None:
            out.update(topk_ids=ex.topk_ids, topk_logprobs=ex.topk_logprobs)
        if ex.sampled_logprobs is not None:
            out["sampled_logprobs"] = ex.sampled_logprobs
        return out

    write_jsonl_records((rec(ex) for ex in examples), path)


def heldout_examples(artifact_dir: Path) -> list[DistillExample]:
    """The held-out split stored in a student's artifact (what `shrinkserve eval` scores it on)."""
    return load_examples(read_jsonl_records([Path(artifact_dir) / HELDOUT_NAME]))


def summary(extra: dict[str, Any]) -> str:
    """What `shrinkserve distill` prints about a student (from its manifest's extra)."""
    prune = extra.get("prune") or {}
    lines = []
    if prune:
        lines.append(f"student: {len(prune['kept_layers'])} of {prune['layers_before']} layers "
                     f"(dropped {prune['dropped_layers']} by block influence), intermediate "
                     f"{prune['intermediate_before']} → {prune['intermediate_after']}, "
                     f"{prune['parameters_after'] / 1e6:.1f}M of {prune['parameters_before'] / 1e6:.1f}M parameters")
    lines.append(f"trained: {extra['tokens_trained']} response tokens ({extra['sequence_tokens']} in all), "
                 f"{extra['steps']} steps, {extra['train_seconds']:.0f} s on {extra['device']}, stopped by "
                 f"{extra['stop_reason']}" + (f", resumed from step {extra['resumed_from']}"
                                              if extra.get("resumed_from") is not None else ""))
    if extra.get("heldout_initial") is not None:
        lines.append(f"held-out {extra['eval_metric']} ({extra['heldout_examples']} examples): "
                     f"{extra['heldout_initial']:.4f} pruned → {extra['heldout_best']:.4f} (step {extra['best_step']})")
    return "\n".join(lines)


# -- steps ---------------------------------------------------------------------------------------------


def teacher_data_generator() -> str:
    """Which generator makes synthetic teacher data (part of the data step's key: generators sample differently)."""
    return "synthetic/" + tool_version("shrinkserve")


def generate_synthetic(
    teacher_dir: Path, syn: SyntheticData, out_dir: Path, *, teacher_name: str, teacher_key: str | None,
    threads: int | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Teacher answers to the prompts file → capture records in `out_dir/records/` (compression/synthetic.py)."""
    from shrinkserve.compression.synthetic import SyntheticConfig, generate_teacher_data, load_prompts

    config = SyntheticConfig(temperature=syn.temperature, top_p=syn.top_p, max_tokens=syn.max_tokens, seed=syn.seed,
                             top_k=syn.top_k, threads=threads)
    report = generate_teacher_data(teacher_dir, load_prompts(syn.prompts.expanduser()), out_dir / RECORDS_DIR,
                                   config, profile=teacher_name, artifact_key=teacher_key,
                                   source=f"distill:{syn.prompts.name}", progress=progress)
    return {"records": report.records, "tokens": report.tokens, "generator": teacher_data_generator()}


def prune_step(
    teacher_dir: Path, data_paths: Sequence[Path], opts: DistillOptions, out: Path, *, threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The pruned student initialisation, BI measured on the training split's sequences."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from shrinkserve.compression.distill.prune import calibration_windows, prune_checkpoint

    vocab = int(AutoConfig.from_pretrained(teacher_dir).vocab_size)
    train, _ = load_split(data_paths, opts, vocab_size=vocab)
    shape = opts.student
    windows = calibration_windows(train, samples=shape.calibration_samples, seq_len=shape.calibration_len)
    with tqdm(total=sum(len(w) for w in windows), desc="block influence", unit="tok", disable=not progress) as bar:
        result = prune_checkpoint(teacher_dir, out, windows, drop_layers=shape.drop_layers, n_layers=shape.n_layers,
                                  mlp_ratio=shape.mlp_ratio, mlp_multiple=shape.mlp_multiple, threads=threads,
                                  progress=bar.update)
    return {"prune": result.to_dict()}


def distill_step(
    teacher_dir: Path, init_dir: Path, data_paths: Sequence[Path], opts: DistillOptions, out: Path, run_dir: Path,
    *, threads: int | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Train the pruned student; write the trained checkpoint + held-out split + history into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shrinkserve.compression.distill.train import train

    if threads:
        torch.set_num_threads(threads)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(init_dir)
    train_ex, held = load_split(data_paths, opts, vocab_size=int(teacher.config.vocab_size))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    result = train(student, train_ex, held, opts.train_config(), teacher=teacher, run_dir=run_dir,
                   device=opts.device, pad_id=pad, progress=progress)
    student.to("cpu")
    student.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "distill").mkdir()
    write_examples(held, out / HELDOUT_NAME)
    (out / RESULT_NAME).write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    init_manifest = init_dir / "manifest.json"
    prune = json.loads(init_manifest.read_text())["extra"].get("prune") if init_manifest.is_file() else None
    initial = result.evals[0][result.eval_metric] if result.evals else None
    return {
        "train_examples": len(train_ex), "heldout_examples": len(held), "heldout_sha256": examples_digest(held),
        "tokens_trained": result.tokens, "sequence_tokens": result.sequence_tokens, "steps": result.steps,
        "train_seconds": round(result.seconds, 1), "stop_reason": result.stop_reason, "device": result.device,
        "eval_metric": result.eval_metric, "resumed_from": result.resumed_from, "heldout_initial": initial,
        "heldout_best": result.best_eval, "best_step": result.best_step, "prune": prune,
        "parameters": sum(p.numel() for p in student.parameters()),
    }
