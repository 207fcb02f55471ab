"""The capture record: one finished generation with the teacher's per-token distributions, and the teacher's
identity (artifact, tokenizer and chat template) a reader checks before interpreting its token ids."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel


@dataclass(frozen=True)
class TeacherIdentity:
    """Which model produced the distributions; a student's trainer checks it before reading ids."""

    profile: str
    artifact_key: str | None = None  # cache key of the served artifact
    weights_sha256: str | None = None  # content hash when the profile serves a source as is
    tokenizer_sha256: str | None = None  # see tokenizer_fingerprint(); None only in legacy records
    chat_template_sha256: str | None = None
    vocab_size: int | None = None


@dataclass
class CaptureRecord:
    """One finished generation with the teacher's per-token distributions (interfaces.md §3)."""

    teacher: TeacherIdentity
    sampling: dict[str, Any]
    prompt_ids: list[int]
    completion_ids: list[int]  # every sampled token incl. a final EOS (legacy records: without the EOS)
    finish_reason: str
    time: float
    top_k: int
    topk_ids: np.ndarray  # int32 [n, k], best first
    topk_logprobs: np.ndarray  # float32 [n, k]
    sampled_logprobs: np.ndarray  # float32 [n]: the sampled token's own logprob (NaN: unknown, legacy only)
    route: str | None = None
    text: str | None = None  # legacy records only: the rendered prompt + completion text
    # Provenance beyond the serving route, e.g. synthetic data: {"source": "synthetic", "prompt_id": ...}.
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, k = len(self.completion_ids), self.top_k
        self.topk_ids = np.asarray(self.topk_ids, dtype=np.int32).reshape(n, k)
        self.topk_logprobs = np.asarray(self.topk_logprobs, dtype=np.float32).reshape(n, k)
        self.sampled_logprobs = np.asarray(self.sampled_logprobs, dtype=np.float32).reshape(n)

    @property
    def n_tokens(self) -> int:
        return len(self.completion_ids)

    @property
    def tail_mass(self) -> np.ndarray:
        """Per token, the probability outside the top-k: 1 − Σ exp(top-k logprobs) (float64, ≥ 0)."""
        return np.clip(1.0 - np.exp(self.topk_logprobs.astype(np.float64)).sum(axis=1), 0.0, 1.0)


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


_SPECIAL_LOOKING = re.compile(rb"<[^\s<>]{1,64}>")


def tokenizer_fingerprint(pieces: Iterable[bytes], eos_token_ids: Iterable[int] = ()) -> str:
    """sha256 over the output bytes of every ordinary token id: the id ↔ text mapping a reader needs to
    interpret captured ids.

    Engines disagree on control tokens: llama.cpp gives `<repo_name>` and its kin no bytes and counts 3
    ids as end-of-generation, the PyTorch engine writes them out and knows 1 EOS (SmolLM2, measured). So
    empty pieces and special-looking ones (`<...>` without spaces) are left out, and so are the EOS ids
    (kept for the signature's sake): the same model then has the same fingerprint whichever engine serves it.
    """
    del eos_token_ids
    h = hashlib.sha256()
    n = 0
    for i, piece in enumerate(pieces):
        n = i + 1
        if not piece or _SPECIAL_LOOKING.fullmatch(piece):
            continue
        h.update(struct.pack("<II", i, len(piece)))
        h.update(piece)
    h.update(struct.pack("<I", n))
    return h.hexdigest()


def served_teacher(
    profile: str, built: Any, *, token_bytes: Callable[[int], bytes], vocab_size: int, eos_token_ids: Iterable[int],
    chat_template: str | None,
) -> TeacherIdentity:
    """The identity of a served profile, once per load: `built` is its BuiltProfile (artifact key, or the
    content hash of a source served as is: hashed here when nobody has yet); the rest is the engine's
    tokenizer (`token_bytes(i)` for every id, EOS ids, chat template)."""
    from shrinkserve.compression.cache import hash_path

    weights = None
    if built.key is None:
        weights = getattr(built, "source_digest", None) or hash_path(Path(built.path))
    return TeacherIdentity(
        profile=profile, artifact_key=built.key, weights_sha256=weights,
        tokenizer_sha256=tokenizer_fingerprint((token_bytes(i) for i in range(vocab_size)), eos_token_ids),
        chat_template_sha256=sha256_text(chat_template), vocab_size=vocab_size)


def _sampling_dict(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        raw = dataclasses.asdict(params)
    elif isinstance(params, BaseModel):
        raw = params.model_dump()
    elif isinstance(params, Mapping):
        raw = dict(params)
    else:
        raw = dict(vars(params))
    return json.loads(json.dumps(raw, default=list))  # tuples → lists; anything odd fails loudly


def capture_record(
    teacher: TeacherIdentity, *, prompt_ids: Sequence[int], completion_ids: Sequence[int], finish_reason: str,
    params: Any, sampled_logprobs: Sequence[float], topk: Sequence[Sequence[tuple[int, float]]],
    route: str | None = None, time_: float | None = None, meta: Mapping[str, Any] | None = None,
) -> CaptureRecord:
    """A record from the fields of a finished generation (interfaces.md §1 `FinishedGeneration`)."""
    n = len(completion_ids)
    if len(topk) != n or len(sampled_logprobs) != n:
        raise ValueError(f"{n} completion tokens but {len(topk)} top-k rows and {len(sampled_logprobs)} logprobs")
    k = len(topk[0]) if n else 0
    if any(len(row) != k for row in topk):
        raise ValueError("top-k rows differ in length")
    ids = np.array([[t for t, _ in row] for row in topk], dtype=np.int32).reshape(n, k)
    lps = np.array([[lp for _, lp in row] for row in topk], dtype=np.float32).reshape(n, k)
    return CaptureRecord(teacher, _sampling_dict(params), [int(t) for t in prompt_ids],
                         [int(t) for t in completion_ids], str(finish_reason),
                         time.time() if time_ is None else time_, k, ids, lps,
                         np.asarray(sampled_logprobs, dtype=np.float32), route, meta=dict(meta or {}))


def record_from_finished(fin: Any, teacher: TeacherIdentity, *, route: str | None = None) -> CaptureRecord:
    """A record from a `FinishedGeneration` (or anything with its attributes)."""
    return capture_record(teacher, prompt_ids=fin.prompt_ids, completion_ids=fin.completion_ids,
                          finish_reason=fin.finish_reason, params=fin.params, sampled_logprobs=fin.sampled_logprobs,
                          topk=fin.topk, route=route)


def decode_record(rec: CaptureRecord, tokenizer: Any) -> str:
    """Prompt + completion as text (special tokens written out), with an HF tokenizer."""
    if rec.text is not None:
        return rec.text
    return str(tokenizer.decode(rec.prompt_ids + rec.completion_ids, skip_special_tokens=False))


def is_heldout(rec: CaptureRecord, fraction: float, salt: str = "") -> bool:
    """A deterministic train / held-out split by prompt: the same prompt ids always fall on the same side
    (a repeated prompt cannot leak into both), whatever the order or the number of records."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction {fraction} is not within [0, 1]")
    h = hashlib.sha256(salt.encode() + np.asarray(rec.prompt_ids, dtype="<i4").tobytes()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction
