"""What a student trains on: token sequences whose response part the teacher produced, with optionally the
teacher's top-k distribution per response token (interfaces.md §3, the capture record).

`DistillExample` is the narrow type every part of distillation reads; `example_from_record` adapts a capture
record (compression/traffic/record.py's `CaptureRecord`, a mapping with the same keys, or a line of the older
capture JSONL) to it. `write_jsonl_records` / `read_jsonl_records` keep examples as JSONL with the same
field names: a student's held-out split, and small test data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class DistillExample:
    """One sequence: `ids[:response_start]` is the prompt, `ids[response_start:]` the teacher's response.

    Per response token j (predicting `ids[response_start + j]`), when the teacher's distribution was
    recorded: `topk_ids[j]`/`topk_logprobs[j]` best first, and `sampled_logprobs[j]` the logprob of the token
    actually sampled (also when it fell outside the top-k). Loss is only ever taken on response tokens.
    """

    ids: np.ndarray  # int64 [n]
    response_start: int
    topk_ids: np.ndarray | None = None  # int64 [n - response_start, k]
    topk_logprobs: np.ndarray | None = None  # float32 [n - response_start, k]
    sampled_logprobs: np.ndarray | None = None  # float32 [n - response_start]

    def __post_init__(self) -> None:
        n, r = len(self.ids), self.response_start
        if not 1 <= r < n:
            raise ValueError(f"response_start {r} must leave a non-empty prompt and response (n={n})")
        m = n - r
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise ValueError("topk_ids and topk_logprobs come together")
        if self.topk_ids is not None:
            assert self.topk_logprobs is not None
            ids, lps = self.topk_ids, self.topk_logprobs
            if ids.ndim != 2 or ids.shape[0] != m or lps.shape != ids.shape:
                raise ValueError(f"top-k arrays must be [{m}, k], got {ids.shape} / {lps.shape}")
        if self.sampled_logprobs is not None and self.sampled_logprobs.shape != (m,):
            raise ValueError(f"sampled_logprobs must be [{m}], got {self.sampled_logprobs.shape}")

    @property
    def n_response(self) -> int:
        return len(self.ids) - self.response_start

    @property
    def has_topk(self) -> bool:
        return self.topk_ids is not None

    def truncated(self, max_len: int) -> DistillExample:
        """The first `max_len` tokens (the prompt is kept whole; the response is cut)."""
        if len(self.ids) <= max_len:
            return self
        if max_len <= self.response_start:
            raise ValueError(f"max_len {max_len} leaves no response token (prompt has {self.response_start})")
        m = max_len - self.response_start
        return DistillExample(
            self.ids[:max_len], self.response_start,
            None if self.topk_ids is None else self.topk_ids[:m],
            None if self.topk_logprobs is None else self.topk_logprobs[:m],
            None if self.sampled_logprobs is None else self.sampled_logprobs[:m],
        )

    def prompt_digest(self) -> str:
        """Identifies the prompt: held-out splits are by prompt, so one prompt is never on both sides."""
        return hashlib.sha256(np.ascontiguousarray(self.ids[: self.response_start], dtype="<i8").tobytes()).hexdigest()


def _field(rec: Any, name: str, default: Any = None) -> Any:
    if isinstance(rec, Mapping):
        return rec.get(name, default)
    return getattr(rec, name, default)


def example_from_record(rec: Any, *, vocab_size: int | None = None) -> DistillExample:
    """Adapt one capture record (interfaces.md §3 fields, as attributes or mapping keys) to an example.

    Also reads a line of the older capture JSONL (`teacher_topk` = per token [[id, logprob], ...],
    no sampled-token logprob). A record whose teacher names another vocabulary size is refused: its token ids
    would silently mean other tokens.
    """
    prompt = np.asarray(_field(rec, "prompt_ids"), dtype=np.int64)
    completion = np.asarray(_field(rec, "completion_ids"), dtype=np.int64)
    if prompt.ndim != 1 or completion.ndim != 1 or len(prompt) == 0 or len(completion) == 0:
        raise ValueError("a record needs non-empty prompt_ids and completion_ids")
    teacher = _field(rec, "teacher")
    rec_vocab = _field(teacher, "vocab_size") if teacher is not None else None
    if vocab_size is not None and rec_vocab is not None and int(rec_vocab) != vocab_size:
        raise ValueError(f"record's teacher has vocab_size {rec_vocab}, the student {vocab_size}")
    topk_ids = _field(rec, "topk_ids")
    topk_lp = _field(rec, "topk_logprobs")
    sampled = _field(rec, "sampled_logprobs")
    old = _field(rec, "teacher_topk")
    if topk_ids is None and old:
        k = min(len(row) for row in old)
        if k > 0:
            topk_ids = [[int(i) for i, _ in row[:k]] for row in old]
            topk_lp = [[float(lp) for _, lp in row[:k]] for row in old]
    if sampled is not None and np.isnan(np.asarray(sampled, dtype=np.float64)).any():
        sampled = None  # legacy records: the sampled token's logprob was not kept (NaN = unknown)
    ids = np.concatenate([prompt, completion])
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids outside the vocabulary [0, {vocab_size})")
    def array(value: Any, dtype: Any, rows: bool) -> np.ndarray | None:
        if value is None or len(value) == 0:
            return None
        a = np.asarray(value, dtype=dtype)
        return a.reshape(len(completion), -1) if rows else a

    ex = DistillExample(ids, len(prompt), array(topk_ids, np.int64, True), array(topk_lp, np.float32, True),
                        array(sampled, np.float32, False))
    k_ids = ex.topk_ids
    if k_ids is not None and vocab_size is not None and (k_ids.min() < 0 or k_ids.max() >= vocab_size):
        raise ValueError(f"top-k ids outside the vocabulary [0, {vocab_size})")
    return ex


def record_to_jsonable(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A §3-field record as plain JSON types (arrays → nested lists)."""
    out: dict[str, Any] = {}
    for k, v in rec.items():
        out[k] = v.tolist() if isinstance(v, np.ndarray) else v
    return out


def write_jsonl_records(records: Iterable[Mapping[str, Any]], path: Path) -> int:
    """Write §3-field records as JSONL (held-out splits, test data)."""
    n = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(record_to_jsonable(rec), separators=(",", ":")) + "\n")
            n += 1
    return n


def read_jsonl_records(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Records from JSONL files (§3 field names, or the older capture layout). A torn last line is skipped."""
    for path in paths:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as exc:
                if n == len(lines):  # an append cut short by a crash: the record never completed
                    continue
                raise ValueError(f"{path}:{n}: not a JSON record ({exc})") from exc


def load_examples(
    records: Iterable[Any], *, vocab_size: int | None = None, max_len: int | None = None,
) -> list[DistillExample]:
    out = []
    for rec in records:
        ex = example_from_record(rec, vocab_size=vocab_size)
        out.append(ex.truncated(max_len) if max_len is not None else ex)
    return out


def split_heldout(
    examples: Sequence[DistillExample], fraction: float, *, seed: int = 0,
) -> tuple[list[DistillExample], list[DistillExample]]:
    """(train, held-out): whole prompts go to one side, chosen by a seeded hash of the prompt's tokens, so
    the split is stable when records are appended and a repeated prompt never leaks into the held-out side."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError("held-out fraction must be in [0, 1)")
    train, held = [], []
    for ex in examples:
        h = hashlib.sha256(f"{seed}:{ex.prompt_digest()}".encode()).digest()
        (held if int.from_bytes(h[:8], "big") / 2**64 < fraction else train).append(ex)
    return train, held


def examples_digest(examples: Sequence[DistillExample]) -> str:
    """sha256 of the examples' contents, in order: part of a student's cache key."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{len(ex.ids)}:{ex.response_start}:".encode())
        h.update(np.ascontiguousarray(ex.ids, dtype="<i8").tobytes())
        for arr, dt in ((ex.topk_ids, "<i8"), (ex.topk_logprobs, "<f4"), (ex.sampled_logprobs, "<f4")):
            h.update(b"-" if arr is None else np.ascontiguousarray(arr, dtype=dt).tobytes())
    return h.hexdigest()
