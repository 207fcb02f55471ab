"""Teacher data from prompts, in-process: the teacher (an HF checkpoint in torch) answers each prompt through
its chat template, and every response token keeps the teacher's top-k and its own logprob under the RAW
distribution (temperature 1, before top-p: what interfaces.md §3 records, and what KD matches).

A stand-in for compression/synthetic.py (the capture branch's generator, same §3 fields in the real capture
format): pipeline.generate_synthetic uses this one only where that module is not installed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k_keep: int = 20  # teacher logprobs recorded per response token
    batch: int = 8
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sha256_file(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def teacher_identity(checkpoint: Path, *, profile: str, artifact_key: str | None, vocab_size: int) -> dict[str, Any]:
    """The §3 `teacher` block for an HF checkpoint directory."""
    template = checkpoint / "chat_template.jinja"
    return {
        "profile": profile, "artifact_key": artifact_key,
        "weights_sha256": _sha256_file(checkpoint / "model.safetensors"),
        "tokenizer_sha256": _sha256_file(checkpoint / "tokenizer.json"),
        "chat_template_sha256": _sha256_file(template), "vocab_size": vocab_size,
    }


Messages = list[dict[str, str]]


def chat_prompt_ids(tokenizer: Any, prompt: str | Messages) -> list[int]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    return [int(t) for t in ids]


@torch.inference_mode()
def generate_records(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Messages],
    sampling: SamplingConfig,
    *,
    teacher: dict[str, Any],
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """One §3-field record per prompt, in prompt order; deterministic for (prompts, sampling, weights)."""
    eos = {int(model.generation_config.eos_token_id)} if isinstance(model.generation_config.eos_token_id, int) \
        else {int(e) for e in (model.generation_config.eos_token_id or [tokenizer.eos_token_id])}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    records: list[dict[str, Any]] = []
    device = next(model.parameters()).device
    for b0 in range(0, len(prompts), sampling.batch):
        chunk = [chat_prompt_ids(tokenizer, p) for p in prompts[b0:b0 + sampling.batch]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(chunk):  # left padding: every row's next token is at the same column
            ids[i, width - len(c):] = torch.tensor(c)
            mask[i, width - len(c):] = 1
        torch.manual_seed(sampling.seed * 1_000_003 + b0)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, max_new_tokens=sampling.max_new_tokens,
            output_logits=True, return_dict_in_generate=True, pad_token_id=pad, eos_token_id=sorted(eos),
        )
        new = out.sequences[:, width:].cpu()
        raw = torch.stack(out.logits, dim=1).float().cpu()  # [B, steps, V], before any logits processor
        lp_all = torch.log_softmax(raw, dim=-1)
        for i, prompt_ids in enumerate(chunk):
            toks = new[i].tolist()
            n = len(toks)
            for j, t in enumerate(toks):
                if t in eos:
                    n = j + 1
                    break
            toks = toks[:n]
            lp = lp_all[i, :n]
            top = torch.topk(lp, sampling.top_k_keep, dim=-1)
            sampled = lp.gather(1, torch.tensor(toks)[:, None])[:, 0]
            records.append({
                "teacher": teacher,
                "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                             "max_tokens": sampling.max_new_tokens, "seed": sampling.seed},
                "prompt_ids": prompt_ids, "completion_ids": toks,
                "finish_reason": "stop" if toks and toks[-1] in eos else "length",
                "time": time.time(), "top_k": sampling.top_k_keep,
                "topk_ids": top.indices.numpy().astype(np.int32),
                "topk_logprobs": top.values.numpy().astype(np.float32),
                "sampled_logprobs": sampled.numpy().astype(np.float32),
            })
        if progress is not None:
            progress(len(chunk))
    return records


def read_prompts(path: Path) -> list[str | Messages]:
    """One prompt per line (blank and #-lines skipped); or JSONL rows with `prompt` (+ optional `system`) or
    `messages` (the layout of the shipped prompt sets in compression/data/prompts/)."""
    import json

    out: list[str | Messages] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not s.startswith("{"):
            out.append(s)
            continue
        row = json.loads(s)
        if "messages" in row:
            out.append([{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]])
        else:
            system = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
            out.append([*system, {"role": "user", "content": str(row["prompt"])}])
    return out
