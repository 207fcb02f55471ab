"""One sequence's decoding, advanced by one logits row at a time; shared by every in-process core.

`DecodeState` has no loop and touches no model: a core feeds it the logits row of its sequence after
each forward and gets back the `Step` to release and the next token to feed (None once finished). So
the same sampling (per-request seeded RNG) runs whether a sequence decodes alone or as one row of a batch;
what a sampled token becomes (text, stop strings, logprobs, finish, capture) is `OutputProcessor`'s
(server/runtime/output.py), shared with the vLLM core.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shrinkserve.server.runtime.logits_processors import build_processors
from shrinkserve.server.runtime.output import OutputProcessor, TokenBytes, token_info
from shrinkserve.server.runtime.sampling import Sampler, log_softmax, top_k
from shrinkserve.server.runtime.types import GenerationRequest, LogitsProcessor, Step, TokenInfo


def prompt_token_infos(tok: TokenBytes, ids: Sequence[int], lp: np.ndarray, k: int) -> list[TokenInfo]:
    """Per-prompt-token logprobs (`lp[i]` predicts `ids[i + 1]`); the first token has none."""
    out = [token_info(tok, ids[0])]
    for pos in range(1, len(ids)):
        out.append(token_info(tok, ids[pos], lp[pos - 1][ids[pos]], top_k(lp[pos - 1], k)))
    return out


class DecodeState(OutputProcessor):
    """Sampler + stop text + counters of one sequence; `advance(row)` → (Step, next token or None).

    `capacity` is how many tokens the sequence's KV slot holds: a sampled token that could not be fed
    back ends the generation with "length" (admission makes max_tokens end it first in practice).
    `record` keeps each sampled token's raw logprob and top-k for `finished()` (traffic capture).
    """

    def __init__(self, req: GenerationRequest, tok: TokenBytes, *, capacity: int, record: bool = False) -> None:
        super().__init__(req, tok, record=record, capacity=capacity)
        self.sampler = Sampler(req.params)
        # The params' own processors (logit_bias, penalties) are built at the first row, when the logits
        # width is known; they are per sequence (the penalties keep counts), then the request's extras.
        self.processors: tuple[LogitsProcessor, ...] | None = None

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
        token = self._sample(row)
        if token is None:  # the constraint cannot continue: treat as a natural end
            return self.end("stop"), None
        constraint = self.req.constraint
        if constraint is not None:
            constraint.accept(token)
        # Logprob work only for a client that asked for logprobs or a captured request (one top-k for both).
        logprob, top = None, []
        if self.params.logprobs is not None or self.record:
            lp = log_softmax(row)
            logprob, top = float(lp[token]), top_k(lp, self.top_wanted)
        step = self.emit(token, logprob, top, done=constraint is not None and constraint.is_finished())
        return step, (None if self.finished else token)
