"""compression/scoring.py: the primitives compression scores with, checked against the serving core's prefill
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

    def _drop_from(self, n: int) -> None:  # the server's Sequence API
        pass


@pytest.mark.parametrize(("n", "max_batch"), [(1, 4), (2, 4), (5, 4), (8, 4), (9, 4), (17, 8), (3, 512)])
def test_chunking_follows_chunk_ends(n: int, max_batch: int) -> None:
    ids = [(7 * i + 3) % VOCAB for i in range(n)]
    seq = FakeSequence(max_batch)
    prefill_last(seq, ids, max_batch)
    ends = chunk_ends(n, max_batch)
    assert ends[-1] == n and [len(c) for c in seq.calls] == [b - a for a, b in zip([0, *ends], ends, strict=False)]
    assert all(0 < len(c) <= max_batch for c in seq.calls)
    if n >= 2:
        seq = FakeSequence(max_batch)
        lp = chunked_logprobs(seq, ids, max_batch)
        assert [len(c) for c in seq.calls] == [b - a for a, b in zip([0, *ends], ends, strict=False)]
        assert lp.shape == (n - 1, VOCAB)


def test_the_serving_core_prefills_in_the_same_chunks() -> None:
    """An echo request through the serving core cuts its prompt exactly as scoring does, so a profile scored
    in compression and the same profile answering echo logprobs give the same numbers."""
    import asyncio

    from shrinkserve.server.runtime.batching import BatchingCore
    from shrinkserve.server.runtime.types import GenerationRequest, SamplingParams
    from tests.fake_engine import FakeEngine

    engine = FakeEngine(max_batch=4)
    prompt = [(5 * i + 1) % 30 + 1 for i in range(11)]
    core = BatchingCore("fake", engine, max_seqs=2, slot_capacity=64, max_queue=1, probe=False)

    async def echo() -> None:
        req = GenerationRequest(prompt, SamplingParams(max_tokens=0, temperature=0), prompt_logprobs=0)
        ticket = await core.admit(1, max_total_tokens=len(prompt))
        try:
            [s async for s in core.generate(ticket, req)]
        finally:
            ticket.release()

    try:
        asyncio.run(echo())
    finally:
        core.close()
    prefill_steps = [f for f in engine.batches[0].forwards[1:]]  # the first forward is the core's warm-up
    ends = chunk_ends(len(prompt), engine.max_batch)
    assert [f[0][1] for f in prefill_steps] == [b - a for a, b in zip([0, *ends], ends, strict=False)]


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
