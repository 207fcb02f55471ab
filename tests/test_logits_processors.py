"""Sampler parameters (server/runtime/logits_processors.py): vLLM/OpenAI semantics, validation, cost."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import pytest

from shrinkserve.server.runtime.logits_processors import (
    LogitBias,
    LogitsParams,
    LogitsParamsError,
    Penalties,
    build_processors,
    filter_scaled_logits,
    logits_params_from_request,
)

VOCAB = 49152  # the default model's


def reference_penalties(logits: np.ndarray, prompt: list[int], out: list[int], *, presence: float,
                        frequency: float, repetition: float) -> np.ndarray:
    """vLLM's apply_penalties written plainly: recomputed from scratch, dense masks."""
    x = logits.astype(np.float64).copy()
    counts = np.bincount(np.asarray(out, dtype=np.int64), minlength=len(x)) if out else np.zeros(len(x), int)
    seen = counts > 0
    seen_any = seen.copy()
    seen_any[np.asarray(prompt, dtype=np.int64)] = True
    rep = np.where(x > 0, x / repetition, x * repetition)
    x = np.where(seen_any, rep, x)
    x -= frequency * counts
    x -= presence * seen
    return x


# --------------------------------------------------------------------------- validation


def test_defaults_and_none() -> None:
    assert logits_params_from_request({}, VOCAB) == LogitsParams()
    none = dict.fromkeys(("presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p",
                          "logit_bias"))
    assert logits_params_from_request(none, VOCAB) == LogitsParams()
    assert logits_params_from_request({"top_k": -1}, VOCAB).top_k == 0
    p = logits_params_from_request({"presence_penalty": 2, "frequency_penalty": -2, "repetition_penalty": 1.3,
                                    "top_k": 40, "min_p": 0.05, "logit_bias": {"50": 10, "7": -100}}, VOCAB)
    assert p == LogitsParams(2.0, -2.0, 1.3, ((7, -100.0), (50, 10.0)), 40, 0.05)
    assert build_processors(LogitsParams(), prompt_ids=[1, 2], vocab_size=VOCAB) == ()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"logit_bias": {"5": "1"}}, "logit_bias"),
        ({"logit_bias": {"5": None}}, "logit_bias"),
    ],
)
def test_rejects(fields: dict, param: str) -> None:
    with pytest.raises(LogitsParamsError) as e:
        logits_params_from_request(fields, VOCAB)
    assert e.value.param == param
    assert isinstance(e.value, ValueError)


# --------------------------------------------------------------------------- semantics


def test_logit_bias_forces_and_bans_under_greedy() -> None:
    rng = np.random.default_rng(0)
    row = rng.normal(size=VOCAB).astype(np.float32)
    best = int(np.argmax(row))
    procs = build_processors(logits_params_from_request({"logit_bias": {str(best): -100, "123": 100}}, VOCAB),
                             prompt_ids=[], vocab_size=VOCAB)
    assert len(procs) == 1 and isinstance(procs[0], LogitBias)
    out = procs[0](row.copy(), [])
    assert int(np.argmax(out)) == 123
    assert out[best] == pytest.approx(row[best] - 100)
    assert out.dtype == np.float32


def test_penalties_match_the_reference_step_by_step() -> None:
    rng = np.random.default_rng(1)
    prompt = list(rng.integers(0, 300, size=50))
    kw = {"presence": 0.7, "frequency": 0.4, "repetition": 1.3}
    p = Penalties(vocab_size=VOCAB, prompt_ids=prompt, **kw)
    generated: list[int] = []
    for step in range(60):
        row = rng.normal(scale=4, size=VOCAB).astype(np.float32)
        want = reference_penalties(row, prompt, generated, **kw)
        got = p(row.copy(), generated)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5, err_msg=f"step {step}")
        generated.append(int(rng.integers(0, 400)))  # overlaps the prompt, repeats itself
    # A shorter history (the sequence was reset) is recounted from scratch.
    generated = generated[:3]
    row = rng.normal(size=VOCAB).astype(np.float32)
    np.testing.assert_allclose(p(row.copy(), generated), reference_penalties(row, prompt, generated, **kw),
                               rtol=1e-6, atol=1e-5)


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    row = np.zeros(10, dtype=np.float32)
    row[[1, 2, 3]] = [2.0, -2.0, 5.0]
    p = Penalties(vocab_size=10, prompt_ids=[1], repetition=2.0)
    out = p(row.copy(), [2])
    assert out[1] == 1.0  # prompt token, positive: divided
    assert out[2] == -4.0  # output token, negative: multiplied
    assert out[3] == 5.0  # never seen: untouched


def test_frequency_and_presence_count_only_the_output() -> None:
    row = np.zeros(10, dtype=np.float32)
    p = Penalties(vocab_size=10, prompt_ids=[5, 5, 5], presence=0.5, frequency=0.25)
    out = p(row.copy(), [1, 1, 1, 2])
    assert out[1] == pytest.approx(-(0.5 + 3 * 0.25))
    assert out[2] == pytest.approx(-(0.5 + 0.25))
    assert out[5] == 0.0


def test_min_p_matches_its_softmax_definition() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3, size=VOCAB)
    for temperature in (0.5, 1.0, 1.7):
        for min_p in (0.01, 0.1, 0.5):
            scaled = (logits / temperature).astype(np.float32)
            probs = np.exp(scaled - scaled.max())
            probs /= probs.sum()
            keep = probs >= min_p * probs.max()
            out = filter_scaled_logits(scaled.copy(), min_p=min_p)
            assert np.array_equal(np.isfinite(out), keep)
    assert filter_scaled_logits(np.array([1.0, 3.0, 3.0, 2.0]), min_p=1.0).tolist() == [-math.inf, 3, 3, -math.inf]


def test_top_k_keeps_k_and_ties() -> None:
    x = np.array([0.1, 5.0, 3.0, 3.0, -1.0, 4.0], dtype=np.float32)
    assert np.isfinite(filter_scaled_logits(x.copy(), top_k=2)).tolist() == [False, True, False, False, False, True]
    assert np.isfinite(filter_scaled_logits(x.copy(), top_k=3)).sum() == 4  # the tie at the 3rd place stays
    assert np.isfinite(filter_scaled_logits(x.copy(), top_k=0)).all()
    assert np.isfinite(filter_scaled_logits(x.copy(), top_k=100)).all()


def test_order_is_bias_then_penalties() -> None:
    # Bias first: a token pushed positive by the bias is then divided (not multiplied) by the penalty.
    params = LogitsParams(repetition_penalty=2.0, logit_bias=((3, 4.0),))
    procs = build_processors(params, prompt_ids=[3], vocab_size=8)
    row = np.full(8, -1.0, dtype=np.float32)
    for p in procs:
        row = p(row, [])
    assert row[3] == pytest.approx((-1.0 + 4.0) / 2.0)


# --------------------------------------------------------------------------- cost


def test_per_token_cost_is_well_under_a_millisecond() -> None:
    rng = np.random.default_rng(3)
    prompt = list(rng.integers(0, VOCAB, size=500))
    params = LogitsParams(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2,
                          logit_bias=tuple((int(t), 1.0) for t in rng.integers(0, VOCAB, size=50)), top_k=50,
                          min_p=0.05)
    procs = build_processors(params, prompt_ids=prompt, vocab_size=VOCAB)
    generated: list[int] = []
    costs = []
    for _ in range(300):
        row = rng.normal(size=VOCAB).astype(np.float32)
        t = time.perf_counter()
        for p in procs:
            row = p(row, generated)
        filter_scaled_logits(row / 0.8, top_k=params.top_k, min_p=params.min_p)
        costs.append(time.perf_counter() - t)
        generated.append(int(rng.integers(0, VOCAB)))
    median = statistics.median(costs)
    print(f"processors + min_p + top_k on a {VOCAB}-wide row: median {median * 1e3:.3f} ms")
    assert median < 1e-3
