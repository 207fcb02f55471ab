"""The narrow interface every engine implements.

An engine owns loaded weights and a tokenizer. It hands out `Sequence`s: one KV cache each, which
take token ids and return next-token logits. Sampling, stop handling, logprobs and cancellation
live above engines (server/generation.py), so every engine behaves the same for the same logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence as Seq

import numpy as np


class Sequence(ABC):
    """One generation slot: a KV cache and the tokens it holds."""

    tokens: list[int]
    # Where the prefill that computed the cached positions cut its chunks (see generation.prefill).
    prefill_ends: list[int]

    @abstractmethod
    def forward(self, ids: Seq[int], *, all_logits: bool) -> np.ndarray:
        """Append `ids` (at most `Engine.max_batch` of them) to the cache.

        Returns float32 logits of shape [len(ids), vocab] if `all_logits`, else [1, vocab] for the last.
        """

    def truncate(self, n: int) -> None:
        """Keep only the first `n` cached tokens (prefix reuse across requests)."""
        if n < len(self.tokens):
            self._drop_from(n)
            del self.tokens[n:]
        self.prefill_ends = [e for e in self.prefill_ends if e <= n]

    @abstractmethod
    def _drop_from(self, n: int) -> None:
        """Remove cached positions n.. from the KV cache."""

    def reset(self) -> None:
        self.truncate(0)

    def close(self) -> None:  # noqa: B027 - most engines free a sequence with the garbage collector
        """Free the sequence's native memory now (a llama.cpp context); unusable afterwards."""


class Engine(ABC):
    name: str
    context_length: int
    vocab_size: int
    max_batch: int  # most tokens one forward() call takes
    eos_token_ids: frozenset[int]
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None

    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Text → ids; special-token text like `<|im_start|>` becomes its token."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token contributes to the output text (empty for control tokens)."""

    def detokenize(self, ids: Seq[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    @abstractmethod
    def new_sequence(self) -> Sequence:
        """A fresh slot; callers keep one per concurrent generation."""

    @abstractmethod
    def close(self) -> None:
        """Free native memory; the engine is unusable afterwards."""
