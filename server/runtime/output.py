"""One output path for every core: a sampled token → the `Step` a client sees, and how a generation ends.

`OutputProcessor` is what `DecodeState` (in-process engines: it samples from logits rows first) and the vLLM
core's stream (tokens vLLM sampled) share: detokenization through `StopText` (stop strings held back, UTF-8
safe), the client's logprobs, EOS, stop strings, max_tokens and the context's end as finish reasons, and the
capture record handed to observers. A new core only schedules, then feeds each token here.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Protocol

from shrinkserve.server.runtime.types import FinishedGeneration, GenerationRequest, Step, TokenInfo


class TokenBytes(Protocol):
    eos_token_ids: Collection[int]

    def token_bytes(self, token_id: int) -> bytes: ...


def token_info(tok: TokenBytes, token: int, logprob: float | None = None,
               top: Sequence[tuple[int, float]] = ()) -> TokenInfo:
    """A token as the client sees it; with `logprob`, its logprob and the alternatives `top` (best first)."""
    raw = tok.token_bytes(token)
    info = TokenInfo(token, raw.decode("utf-8", errors="replace"), raw)
    if logprob is not None:
        info.logprob = float(logprob)
        info.top = []
        for alt, lp in top:
            alt_raw = tok.token_bytes(alt)
            info.top.append(TokenInfo(alt, alt_raw.decode("utf-8", errors="replace"), alt_raw, float(lp)))
    return info


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


class OutputProcessor:
    """One generation's output: `emit(token, ...)` appends a sampled token and returns its `Step` (final when
    the generation ends); `abort()` ends it early; `finished_generation()` is the record observers get.

    `capacity`: how many tokens the sequence's KV holds (None: the engine ends it itself); a token that could not
    be fed back ends the generation with "length". `record`: keep each token's logprob and capture top-k.
    """

    def __init__(self, req: GenerationRequest, tok: TokenBytes, *, record: bool = False,
                 capacity: int | None = None) -> None:
        self.req = req
        self.params = req.params
        self.tok = tok
        self.record = record
        self.capacity = capacity
        self.text = StopText(req.params.stop)
        self.generated: list[int] = []
        self.sampled_logprobs: list[float] = []
        self.topk: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def top_wanted(self) -> int:
        """How many alternatives per token the client and the capture need (the widest of the two)."""
        return max(self.params.logprobs or 0, self.req.capture_top_k if self.record else 0)

    def emit(self, token: int, logprob: float | None = None, top: Sequence[tuple[int, float]] = (), *,
             done: bool = False) -> Step:
        """`logprob`/`top`: the token's raw logprob and at least `top_wanted` alternatives, best first (None/()
        when nobody asked); `done`: an output constraint has nothing left to generate."""
        params = self.params
        self.generated.append(token)
        if self.record:
            self.sampled_logprobs.append(logprob if logprob is not None and not math.isnan(logprob) else -math.inf)
            self.topk.append(list(top[: self.req.capture_top_k]))
        if token in self.tok.eos_token_ids and not params.ignore_eos:
            return self._finish(Step(self.text.flush(), n_tokens=1), "stop")
        info = token_info(self.tok, token, logprob if params.logprobs is not None else None,
                          top[: params.logprobs or 0])
        released, stopped = self.text.push(info.bytes)
        if stopped or done:
            tail = "" if stopped else self.text.flush()
            return self._finish(Step(released + tail, [info], n_tokens=1), "stop")
        full = self.capacity is not None and len(self.req.prompt_ids) + len(self.generated) > self.capacity
        if len(self.generated) >= params.max_tokens or full:
            return self._finish(Step(released + self.text.flush(), [info], n_tokens=1), "length")
        return Step(released, [info], n_tokens=1)

    def end(self, reason: str, text: str | None = None) -> Step:
        """A final step with no token: the held-back text (or `text`), ended for `reason`."""
        return self._finish(Step(self.text.flush() if text is None else text), reason)

    def _finish(self, step: Step, reason: str) -> Step:
        self.finish_reason = step.finish_reason = reason
        return step

    def abort(self) -> Step:
        """The final step of a cancelled or drained generation: the held-back text, finish_reason "abort"."""
        return self.end("abort")

    def finished_generation(self, profile: str) -> FinishedGeneration:
        assert self.finish_reason is not None
        return FinishedGeneration(profile=profile, prompt_ids=list(self.req.prompt_ids),
                                  completion_ids=list(self.generated), finish_reason=self.finish_reason,
                                  params=self.params, sampled_logprobs=list(self.sampled_logprobs),
                                  topk=list(self.topk), route=self.req.route)
