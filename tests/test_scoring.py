"""compression/scoring.py: the primitives compression scores with, checked against the server's own prefill
(the same chunk boundaries give the same numbers) and against direct computations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from shrinkserve.compression.scoring import (
    chunk_ends,
    chunked_logprobs,
    hardest,
    kl_top1,
    log_softmax,
    prefill_last,
    top_k,
)

VOCAB = 11


class FakeSequence:
    """Logits that depend on the tokens so far *and* on how they were chunked, like real engines' last bits."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.tokens: list[int] = []
        self.prefill_ends: list[int] = []
        self.calls: list[tuple[int, ...]] = []

    def forward(self, ids: Sequence[int], *, all_logits: bool) -> np.ndarray:
        assert 0 < len(ids) <= self.max_batch
        self.calls.append(tuple(ids))
        rows = []
        for i, t in enumerate(ids):
            self.tokens.append(int(t))
            pos = len(self.tokens)
            rows.append(np.sin(np.arange(VOCAB) * (1 + sum(self.tokens) % 7) + pos) + 1e-6 * len(ids) + 0 * i)
        out = np.asarray(rows, dtype=np.float32)
        return out if all_logits else out[-1:]

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        self.prefill_ends = [e for e in self.prefill_ends if e <= n]

    def _drop_from(self, n: int) -> None:  # the server's Sequence API
        pass

    def reset(self) -> None:
        self.truncate(0)


class FakeEngine:
    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.eos_token_ids = frozenset()

    def new_sequence(self) -> FakeSequence:
        return FakeSequence(self.max_batch)


@pytest.mark.parametrize(("n", "max_batch"), [(1, 4), (2, 4), (5, 4), (8, 4), (9, 4), (17, 8), (3, 512)])
def test_chunking_and_logprobs_equal_the_servers_prefill(n: int, max_batch: int) -> None:
    from shrinkserve.server.generation import prefill

    ids = [(7 * i + 3) % VOCAB for i in range(n)]
    ours, theirs = FakeSequence(max_batch), FakeSequence(max_batch)
    last = prefill_last(ours, ids, max_batch)
    server_last, _ = prefill(FakeEngine(max_batch), theirs, ids, reuse_prefix=False)  # type: ignore[arg-type]
    assert ours.calls == theirs.calls
    assert np.array_equal(last, server_last)
    assert chunk_ends(n, max_batch)[-1] == n
    if n >= 2:
        ours, theirs = FakeSequence(max_batch), FakeSequence(max_batch)
        lp = chunked_logprobs(ours, ids, max_batch)
        _, server_lp = prefill(FakeEngine(max_batch), theirs, ids, want_prompt_logprobs=True,  # type: ignore[arg-type]
                               reuse_prefix=False)
        assert ours.calls == theirs.calls and lp.shape == (n - 1, VOCAB)
        assert np.array_equal(lp, server_lp)


def test_log_softmax_top_k_and_kl_match_direct_computation() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 4
    lp = log_softmax(logits)
    direct = np.log(np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum(1, keepdims=True))
    assert np.allclose(lp, direct, atol=1e-12)
    row = lp[0]
    assert [i for i, _ in top_k(row, 5)] == list(np.argsort(-row, kind="stable")[:5])
    assert top_k(np.array([0.0, 1.0, 1.0, -1.0]), 2) == [(1, 1.0), (2, 1.0)]  # ties: lower id first
    other = log_softmax(logits + rng.normal(size=logits.shape).astype(np.float32))
    kl, agree, ent = kl_top1(lp, other)
    p = np.exp(lp)
    assert np.allclose(kl, (p * (lp - other)).sum(1)) and (kl >= 0).all()
    assert np.array_equal(agree, lp.argmax(1) == other.argmax(1))
    assert np.allclose(ent, -(p * lp).sum(1))
    assert list(hardest(np.array([0.1, 0.9, 0.5, 0.7] * 5))) == [1, 5]  # 10% of 20 = the two highest


def test_compression_does_not_import_the_server() -> None:
    import subprocess
    import sys

    code = ("import sys, shrinkserve.compression.quality, shrinkserve.compression.profiles, "
            "shrinkserve.compression.traffic, shrinkserve.compression.synthetic, shrinkserve.compression.gguf_export; "
            "bad = [m for m in sys.modules if m.startswith('shrinkserve.server')]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
