"""One sequence's decoding, advanced by one logits row at a time; shared by every in-process core.

`DecodeState` has no loop and touches no model: a core feeds it the logits row of its sequence after
each forward and gets back the `Step` to release and the next token to feed (None once finished). So
the same sampling (per-request seeded RNG), UTF-8-safe stop-string hold-back, logprobs and capture
top-k run identically whether a sequence decodes alone or as one row of a batch.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

import numpy as np

from shrinkserve.server.runtime.logits_processors import build_processors
from shrinkserve.server.runtime.sampling import Sampler, log_softmax, top_k
from shrinkserve.server.runtime.types import (
    FinishedGeneration,
    GenerationRequest,
    LogitsProcessor,
    SamplingParams,
    Step,
    TokenInfo,
)


class TokenBytes(Protocol):
    eos_token_ids: Collection[int]

    def token_bytes(self, token_id: int) -> bytes: ...


def token_info(tok: TokenBytes, token: int, logprobs: np.ndarray | None, k: int | None) -> TokenInfo:
    raw = tok.token_bytes(token)
    info = TokenInfo(token, raw.decode("utf-8", errors="replace"), raw)
    if logprobs is not None:
        info.logprob = float(logprobs[token])
        info.top = []
        for alt, lp in top_k(logprobs, k or 0):
            alt_raw = tok.token_bytes(alt)
            info.top.append(TokenInfo(alt, alt_raw.decode("utf-8", errors="replace"), alt_raw, lp))
    return info


def prompt_token_infos(tok: TokenBytes, ids: Sequence[int], lp: np.ndarray, k: int) -> list[TokenInfo]:
    """Per-prompt-token logprobs (`lp[i]` predicts `ids[i + 1]`); the first token has none."""
    out = [token_info(tok, ids[0], None, None)]
    for pos in range(1, len(ids)):
        out.append(token_info(tok, ids[pos], lp[pos - 1], k))
    return out


class StopText:
    """Turns token bytes into text released in order, holding back what may still become a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.buf = bytearray()
        self.released = 0  # characters of the decoded text already handed out

    def _text(self, final: bool) -> str:
        if final:
            return self.buf.decode("utf-8", errors="replace")
        # An incomplete UTF-8 sequence at the end waits for the next token's bytes.
        for cut in range(4):
            try:
                return self.buf[: len(self.buf) - cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
        return self.buf.decode("utf-8", errors="replace")

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Add a token's bytes; return (text to release now, whether a stop string matched)."""
        self.buf += piece
        text = self._text(final=False)
        for stop in self.stops:
            at = text.find(stop, max(0, self.released - len(stop) + 1))
            if at != -1:
                out = text[self.released : max(at, self.released)]
                self.released = max(at, self.released)
                return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        end = max(self.released, len(text) - hold)
        out = text[self.released : end]
        self.released = end
        return out, False

    def flush(self) -> str:
        text = self._text(final=True)
        out = text[self.released :]
        self.released = len(text)
        return out


class GenerationEnd:
    """How a generation ends, shared by `DecodeState` (in-process engines) and the vLLM core's stream: the
    finishing step, the abort step (held-back text flushed), and the record handed to observers (capture).
    Expects `req`, `params`, `text` (StopText), `generated`, `sampled_logprobs`, `topk`, `finish_reason`."""

    req: GenerationRequest
    params: SamplingParams
    text: StopText
    generated: list[int]
    sampled_logprobs: list[float]
    topk: list[list[tuple[int, float]]]
    finish_reason: str | None

    def _finish(self, step: Step, reason: str) -> Step:
        self.finish_reason = step.finish_reason = reason
        return step

    def abort(self) -> Step:
        """The final step of a cancelled or drained generation: the held-back text, finish_reason "abort"."""
        self.finish_reason = "abort"
        return Step(self.text.flush(), finish_reason="abort")

    def finished_generation(self, profile: str) -> FinishedGeneration:
        assert self.finish_reason is not None
        return FinishedGeneration(profile=profile, prompt_ids=list(self.req.prompt_ids),
                                  completion_ids=list(self.generated), finish_reason=self.finish_reason,
                                  params=self.params, sampled_logprobs=list(self.sampled_logprobs),
                                  topk=list(self.topk), route=self.req.route)


class DecodeState(GenerationEnd):
    """Sampler + stop text + counters of one sequence; `advance(row)` → (Step, next token or None).

    `capacity` is how many tokens the sequence's KV slot holds: a sampled token that could not be fed
    back ends the generation with "length" (admission makes max_tokens end it first in practice).
    `record` keeps each sampled token's raw logprob and top-k for `finished()` (traffic capture).
    """

    def __init__(self, req: GenerationRequest, tok: TokenBytes, *, capacity: int, record: bool = False) -> None:
        self.req = req
        self.params = req.params
        self.tok = tok
        self.capacity = capacity
        self.record = record
        self.sampler = Sampler(req.params)
        # The params' own processors (logit_bias, penalties) are built at the first row, when the logits
        # width is known; they are per sequence (the penalties keep counts), then the request's extras.
        self.processors: tuple[LogitsProcessor, ...] | None = None
        self.text = StopText(req.params.stop)
        self.generated: list[int] = []
        self.sampled_logprobs: list[float] = []
        self.topk: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def start(self, prompt_lp: np.ndarray | None) -> Step | None:
        """After prefill: the step carrying prompt logprobs (echo), or the final step when max_tokens is 0."""
        first = Step("")
        if prompt_lp is not None:
            first.prompt_logprobs = prompt_token_infos(self.tok, self.req.prompt_ids, prompt_lp,
                                                       self.req.prompt_logprobs or 0)
        if self.params.max_tokens == 0:
            self.finish_reason = first.finish_reason = "length"
            return first
        return first if first.prompt_logprobs is not None else None

    def _sample(self, row: np.ndarray) -> int | None:
        """processors → constraint mask → temperature/min-p/top-k/top-p → RNG; None when the constraint
        allows nothing."""
        logits = row
        if self.processors is None:
            self.processors = build_processors(self.params, prompt_ids=self.req.prompt_ids,
                                               vocab_size=row.shape[-1]) + tuple(self.req.processors)
        if self.processors:
            logits = row.astype(np.float32, copy=True)
            for proc in self.processors:
                logits = proc(logits, self.generated)
            # Extreme penalties overflow (a logit divided by a repetition_penalty of 1e-300): NaN would make
            # the draw pick an arbitrary (even a masked) token, +inf would poison the softmax.
            np.nan_to_num(logits, copy=False, nan=-np.inf, posinf=np.finfo(np.float32).max, neginf=-np.inf)
        constraint = self.req.constraint
        if constraint is not None:
            mask = constraint.allowed()
            if mask is not None:
                if not mask.any():
                    return None
                logits = np.where(mask, logits, -np.inf).astype(np.float32, copy=False)
                if logits.max() == -np.inf:  # every allowed token was pushed to -inf: choose among them
                    logits = np.where(mask, 0.0, -np.inf).astype(np.float32)
        return self.sampler(logits)

    def advance(self, row: np.ndarray) -> tuple[Step, int | None]:
        """Sample from one raw logits row; return the step to release and the token to feed next."""
        assert not self.finished, "advance() after the generation finished"
        params = self.params
        token = self._sample(row)
        if token is None:  # the constraint cannot continue: treat as a natural end
            return self._finish(Step(self.text.flush()), "stop"), None
        constraint = self.req.constraint
        if constraint is not None:
            constraint.accept(token)
        self.generated.append(token)
        want_lp = params.logprobs is not None or self.record
        lp = log_softmax(row) if want_lp else None
        if self.record:
            assert lp is not None
            self.sampled_logprobs.append(float(lp[token]))
            self.topk.append(top_k(lp, self.req.capture_top_k))
        if token in self.tok.eos_token_ids and not params.ignore_eos:
            return self._finish(Step(self.text.flush(), n_tokens=1), "stop"), None
        info = token_info(self.tok, token, lp if params.logprobs is not None else None, params.logprobs)
        released, stopped = self.text.push(info.bytes)
        if stopped or (constraint is not None and constraint.is_finished()):
            tail = "" if stopped else self.text.flush()
            return self._finish(Step(released + tail, [info], n_tokens=1), "stop"), None
        if len(self.generated) >= params.max_tokens or len(self.req.prompt_ids) + len(self.generated) > self.capacity:
            return self._finish(Step(released + self.text.flush(), [info], n_tokens=1), "length"), None
        return Step(released, [info], n_tokens=1), token

