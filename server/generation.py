"""The decoding loop shared by all engines: prefill, sample, detokenize, stop, cancel.

Runs in a worker thread; yields `Step`s that the HTTP layer turns into responses or SSE chunks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from shrinkserve.server.engines.base import Engine, Sequence
from shrinkserve.server.sampling import Sampler, SamplingParams, log_softmax, top_k


@dataclass
class TokenInfo:
    """One token as logprobs report it, with the most likely alternatives at its position."""

    id: int
    text: str
    bytes: bytes
    logprob: float | None = None
    top: list[TokenInfo] | None = None
    teacher: list[tuple[int, float]] | None = None  # top-k (id, logprob) kept for traffic capture


@dataclass
class Step:
    text: str  # newly released output text (may be empty while a stop sequence might be forming)
    tokens: list[TokenInfo] = field(default_factory=list)  # tokens generated since the previous step
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last step
    prompt_logprobs: list[TokenInfo] | None = None  # only on the first step, when asked for
    uncounted: int = 0  # tokens consumed but not listed (the end-of-sequence token)


class Cancelled(Exception):
    pass


def _token_info(engine: Engine, token: int, logprobs: np.ndarray | None, k: int | None) -> TokenInfo:
    raw = engine.token_bytes(token)
    info = TokenInfo(token, raw.decode("utf-8", errors="replace"), raw)
    if logprobs is not None:
        info.logprob = float(logprobs[token])
        info.top = []
        for alt, lp in top_k(logprobs, k or 0):
            alt_raw = engine.token_bytes(alt)
            info.top.append(TokenInfo(alt, alt_raw.decode("utf-8", errors="replace"), alt_raw, lp))
    return info


def prefill(
    engine: Engine,
    seq: Sequence,
    ids: Seq[int],
    cancel: threading.Event | None = None,
    *,
    want_prompt_logprobs: bool = False,
    reuse_prefix: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Feed `ids` into `seq`; return (logits after the last id, logprobs for positions 1..n-1 or None).

    Logits depend, in their last bits, on how tokens were batched. So a prompt is always cut the same
    way — chunks of `engine.max_batch` from position 0, the prompt's last token on its own — and cached
    KV is reused only up to a chunk end that an earlier prefill cut identically. The same request with
    the same seed then gives the same text whatever the slot served before, and a repeated prompt
    (or a shared system prompt cut at the same place) costs one decode step. Per-position logprobs
    need every position's logits, so they disable reuse.
    """
    n = len(ids)
    ends = [*range(engine.max_batch, n - 1, engine.max_batch), n - 1, n] if n > 1 else [n]
    ends = sorted(set(e for e in ends if e > 0))
    keep = 0
    if reuse_prefix and not want_prompt_logprobs:
        cached, common = seq.tokens, 0
        limit = min(len(cached), n - 1)
        while common < limit and cached[common] == ids[common]:
            common += 1
        reusable = set(seq.prefill_ends)
        keep = max((e for e in ends if e <= common and e in reusable), default=0)
    seq.truncate(keep)
    rows: list[np.ndarray] = []
    last: np.ndarray | None = None
    start = keep
    for end in ends:
        if end <= keep:
            continue
        if cancel is not None and cancel.is_set():
            raise Cancelled
        logits = seq.forward(ids[start:end], all_logits=want_prompt_logprobs)
        seq.prefill_ends.append(end)
        if want_prompt_logprobs:
            rows.append(log_softmax(logits))
        last = logits[-1]
        start = end
    assert last is not None
    prompt_lp = np.concatenate(rows)[:-1] if want_prompt_logprobs else None
    return last, prompt_lp


def prompt_token_infos(engine: Engine, ids: Seq[int], lp: np.ndarray, k: int) -> list[TokenInfo]:
    """Per-prompt-token logprobs: the first token has none (nothing precedes it)."""
    out = [_token_info(engine, ids[0], None, None)]
    for pos in range(1, len(ids)):
        out.append(_token_info(engine, ids[pos], lp[pos - 1], k))
    return out


class _StopText:
    """Turns token bytes into text released in order, holding back what may still become a stop string."""

    def __init__(self, stops: Seq[str]) -> None:
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


def generate(
    engine: Engine,
    seq: Sequence,
    prompt_ids: Seq[int],
    params: SamplingParams,
    cancel: threading.Event,
    *,
    prompt_logprobs: int | None = None,
    teacher_top_k: int = 0,
) -> Iterator[Step]:
    """Decode up to `params.max_tokens` tokens after `prompt_ids`, one Step per token.

    `prompt_logprobs` (top-k count) asks for per-position logprobs of the prompt itself (echo);
    `teacher_top_k` keeps each generated token's top-k distribution in `TokenInfo.teacher`.
    """
    try:
        logits, prompt_lp = prefill(engine, seq, prompt_ids, cancel, want_prompt_logprobs=prompt_logprobs is not None)
    except Cancelled:
        yield Step("", finish_reason="abort")
        return
    first = Step("")
    if prompt_lp is not None:
        first.prompt_logprobs = prompt_token_infos(engine, prompt_ids, prompt_lp, prompt_logprobs or 0)
    if params.max_tokens == 0:
        first.finish_reason = "length"
        yield first
        return
    if first.prompt_logprobs is not None:
        yield first

    sampler = Sampler(params)
    text = _StopText(params.stop)
    want_lp = params.logprobs is not None or teacher_top_k > 0
    generated = 0
    while True:
        if cancel.is_set():
            yield Step(text.flush(), finish_reason="abort")
            return
        token = sampler(logits)
        generated += 1
        lp = log_softmax(logits) if want_lp else None
        if token in engine.eos_token_ids and not params.ignore_eos:
            yield Step(text.flush(), finish_reason="stop", uncounted=1)
            return
        info = _token_info(engine, token, lp if params.logprobs is not None else None, params.logprobs)
        if teacher_top_k > 0:
            assert lp is not None
            info.teacher = top_k(lp, teacher_top_k)
        released, stopped = text.push(info.bytes)
        if stopped:
            yield Step(released, [info], finish_reason="stop")
            return
        if generated >= params.max_tokens or len(seq.tokens) >= engine.context_length:
            yield Step(released + text.flush(), [info], finish_reason="length")
            return
        yield Step(released, [info])
        logits = seq.forward([token], all_logits=False)[0]
