"""Synthetic teacher data: prompts from a file, answered in-process by a teacher HF checkpoint, recorded
with the teacher's top-k + sampled-token logprobs in the capture format (compression/traffic/).

The same records as captured traffic, so one reader serves distillation either way. Logprobs are those of
the teacher's raw distribution (before temperature / top-p), as the server reports them. Prompts go
through the teacher's chat template. Generation is batched (left-padded, one forward per step for all
rows) because on 2 CPU cores a batch of 8 gives several times the tokens/s of one stream; each prompt has
its own seeded RNG, so its sampled tokens do not depend on which batch it landed in (16 prompts answered
in batches of 8 and one at a time gave the same 348 tokens, logprobs within 2.5e-5; 23.5 against 16.7
tok/s on a shared 2-core box, one thread).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shrinkserve.compression import data_file
from shrinkserve.compression.scoring import log_softmax
from shrinkserve.compression.traffic.record import (
    CaptureRecord,
    TeacherIdentity,
    capture_record,
    sha256_text,
    tokenizer_fingerprint,
)
from shrinkserve.compression.traffic.writer import CaptureSettings, CaptureWriter

log = logging.getLogger("shrinkserve.synthetic")

# The shipped prompt sets (scripts/make_prompt_sets.py): general chat, and one narrow task split in two.
PROMPT_SETS = {
    "general": "prompts/general.jsonl",
    "word_forms.train": "prompts/word_forms.train.jsonl",
    "word_forms.heldout": "prompts/word_forms.heldout.jsonl",
}


@dataclass(frozen=True)
class Prompt:
    messages: tuple[dict[str, str], ...]
    id: str
    answer: str | None = None  # the expected answer, when the set has one (task prompts)


def prompt_file(name_or_path: str | Path) -> Path:
    """A shipped set by name (`general`, `word_forms.train`, `word_forms.heldout`) or a file path."""
    if isinstance(name_or_path, str) and name_or_path in PROMPT_SETS:
        return data_file(PROMPT_SETS[name_or_path])
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (shipped sets: {', '.join(PROMPT_SETS)})")
    return path


def load_prompts(source: str | Path) -> list[Prompt]:
    """`.jsonl`: one object per line with `prompt` (+ optional `system`, `id`, `answer`) or `messages`;
    any other file: one prompt per non-empty line."""
    path = prompt_file(source)
    prompts: list[Prompt] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(Prompt(({"role": "user", "content": line.strip()},), f"{path.stem}-{n}"))
            continue
        try:
            row = json.loads(line)
            if "messages" in row:
                messages = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"])
            else:
                system = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
                messages = (*system, {"role": "user", "content": str(row["prompt"])})
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a prompt ({exc}); expected {{\"prompt\": ...}} or "
                             "{\"messages\": [...]}") from exc
        prompts.append(Prompt(messages, str(row.get("id", f"{path.stem}-{n}")), row.get("answer")))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


class SyntheticConfig(BaseModel):
    """How the teacher answers: sampling, how much, and how fast."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(default=128, ge=1, le=4096, description="per answer")
    seed: int = 0
    top_k: int = Field(default=20, ge=1, le=100, description="teacher logprobs kept per token")
    batch_size: int = Field(default=8, ge=1, le=256)
    token_budget: int | None = Field(default=None, ge=1, description="stop starting new batches past this many "
                                                                     "generated tokens")
    seconds_budget: float | None = Field(default=None, gt=0, description="... or past this much wall time")
    dtype: str = Field(default="float32", pattern="^(float32|bfloat16)$")
    # One thread by default: with another process busy on a 2-core box, torch's 2 OpenMP threads made each
    # small linear 60x slower (7.8 ms against 0.12 ms) and generation ran at 1.5 tok/s against 23.5 with
    # one; on the idle box 2 threads gave 38.9 against 23.6 (batch 8, 2026-11-30). Pass them when idle.
    threads: int | None = Field(default=1, ge=1, description="torch threads; None = torch's default")


@dataclass
class SyntheticReport:
    records: int = 0
    tokens: int = 0
    seconds: float = 0.0
    prompts_skipped: int = 0  # not answered because a budget ran out
    files: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Temperature / top-p sampling of one row (the server's Sampler rule: nucleus over the sorted candidates)."""
    if temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        mass = np.cumsum(p[order]) / p.sum()
        keep = int(np.searchsorted(mass, top_p, side="left")) + 1
        cand, cdf = order[:keep], mass[:keep]
        pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        return int(cand[min(pick, keep - 1)])
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(p) - 1))


def teacher_identity(teacher_dir: Path, tokenizer: Any, config: Any, eos: frozenset[int], *, profile: str,
                     artifact_key: str | None = None) -> TeacherIdentity:
    from shrinkserve.compression.cache import hash_path
    from shrinkserve.compression.tokens import hf_token_pieces

    vocab = int(config.vocab_size)
    return TeacherIdentity(
        profile=profile, artifact_key=artifact_key,
        weights_sha256=None if artifact_key else hash_path(teacher_dir),
        tokenizer_sha256=tokenizer_fingerprint(hf_token_pieces(tokenizer, vocab)[:vocab], eos),
        chat_template_sha256=sha256_text(tokenizer.chat_template), vocab_size=vocab)


def generate_teacher_data(
    teacher_dir: Path, prompts: Sequence[Prompt], out: Path | CaptureWriter, config: SyntheticConfig | None = None, *,
    profile: str = "synthetic", artifact_key: str | None = None, source: str | None = None, progress: bool = True,
) -> SyntheticReport:
    """Answer `prompts` with the teacher at `teacher_dir` and append one record per answer to `out` (a capture
    directory or an open writer). Returns counts and speed; records are written as each batch finishes."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from shrinkserve.compression.tokens import eos_ids

    cfg = config or SyntheticConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=getattr(torch, cfg.dtype)).eval()
    eos = eos_ids(tok, model.generation_config)
    if not eos:
        raise ValueError(f"{teacher_dir}: the tokenizer names no end-of-sequence token")
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    teacher = teacher_identity(teacher_dir, tok, model.config, eos, profile=profile, artifact_key=artifact_key)
    writer = out if isinstance(out, CaptureWriter) else CaptureWriter(CaptureSettings(dir=out, retain_bytes=None,
                                                                                     top_k=cfg.top_k))
    report = SyntheticReport()
    started = time.perf_counter()
    total = cfg.token_budget or len(prompts) * cfg.max_tokens
    bar = tqdm(total=total, desc="teacher data", unit="tok", disable=not progress or None)
    try:
        for first in range(0, len(prompts), cfg.batch_size):
            elapsed = time.perf_counter() - started
            if (cfg.token_budget is not None and report.tokens >= cfg.token_budget) or \
                    (cfg.seconds_budget is not None and elapsed >= cfg.seconds_budget):
                report.prompts_skipped = len(prompts) - first
                break
            batch = list(enumerate(prompts[first : first + cfg.batch_size], start=first))
            for rec in _answer_batch(model, tok, batch, cfg, teacher, eos, pad, source, DynamicCache, torch):
                writer.record(rec)
                report.records += 1
                report.tokens += rec.n_tokens
                bar.update(rec.n_tokens)
            report.seconds = time.perf_counter() - started
            bar.set_postfix_str(f"{report.tokens_per_s:.0f} tok/s, {report.records} answers")
    finally:
        bar.close()
        if writer.current is not None:
            report.files.append(str(writer.current))
        if not isinstance(out, CaptureWriter):
            writer.close()
    report.seconds = time.perf_counter() - started
    if writer.dropped:
        raise OSError(f"{writer.dropped} record(s) could not be written to {out}")
    return report


def cache_kwarg(model: Any) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x warns, 5.40 removes the old name); an unknown
    # keyword would be swallowed by **kwargs and silently run without a cache, so ask the signature.
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _answer_batch(
    model: Any, tok: Any, batch: list[tuple[int, Prompt]], cfg: SyntheticConfig, teacher: TeacherIdentity,
    eos: frozenset[int], pad: int, source: str | None, cache_cls: Any, torch: Any,
) -> list[CaptureRecord]:
    prompt_ids = [list(tok(tok.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"]) for _, p in batch]
    width = max(map(len, prompt_ids))
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompt_ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompt_ids])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rngs = [np.random.default_rng([cfg.seed, index]) for index, _ in batch]
    n = len(batch)
    out_ids: list[list[int]] = [[] for _ in range(n)]
    topk_ids: list[list[np.ndarray]] = [[] for _ in range(n)]
    topk_lps: list[list[np.ndarray]] = [[] for _ in range(n)]
    sampled: list[list[float]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    cache = {cache_kwarg(model): cache_cls(config=model.config)}
    k = cfg.top_k
    with torch.inference_mode():
        while True:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **cache).logits[:, -1].float().numpy()
            step = []
            for r in range(n):
                if finish[r] is not None:
                    step.append(pad)
                    continue
                lp = log_softmax(logits[r])
                token = _sample(logits[r], cfg.temperature, cfg.top_p, rngs[r])
                top = np.argpartition(-lp, k - 1)[:k]
                top = top[np.lexsort((top, -lp[top]))]
                out_ids[r].append(token)
                topk_ids[r].append(top.astype(np.int32))
                topk_lps[r].append(lp[top].astype(np.float32))
                sampled[r].append(float(lp[token]))
                if token in eos:
                    finish[r] = "stop"
                elif len(out_ids[r]) >= cfg.max_tokens:
                    finish[r] = "length"
                step.append(token)
            if all(f is not None for f in finish):
                break
            ids = torch.tensor(step).unsqueeze(1)
            mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
    records = []
    for r, (index, prompt) in enumerate(batch):
        meta = {"source": source or "synthetic", "prompt_id": prompt.id, "prompt_index": index}
        if prompt.answer is not None:
            meta["answer"] = prompt.answer
        rec = capture_record(
            teacher, prompt_ids=prompt_ids[r], completion_ids=out_ids[r], finish_reason=str(finish[r]),
            params={"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                    "seed": [cfg.seed, index]},
            sampled_logprobs=sampled[r], topk=[list(zip(i.tolist(), lp.tolist(), strict=True))
                                               for i, lp in zip(topk_ids[r], topk_lps[r], strict=True)],
            meta=meta)
        records.append(rec)
    return records
