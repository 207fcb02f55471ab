"""One KV pool per profile, preemption and the automatic prefix cache, on the fake engine (milliseconds each)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from shrinkserve.server.engines.base import KvFull, Work
from shrinkserve.server.runtime.batching import BatchingCore
from shrinkserve.server.runtime.prefix import best_match, common_prefix, probe_prefix_reuse, reusable
from shrinkserve.server.runtime.types import GenerationRequest, NeverFits, SamplingParams, Step
from tests.fake_engine import FakeEngine, ids_of
from tests.test_core import run_one, text


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def make_core(engine: FakeEngine, **kw: object) -> BatchingCore:
    args: dict = {"max_seqs": 4, "slot_capacity": 128, "max_queue": 16}
    args.update(kw)
    return BatchingCore("fake", engine, **args)


def cached(steps: list[Step]) -> int:
    return sum(s.cached_tokens for s in steps)


# ---------------------------------------------------------------- pool accounting


def test_shared_cells_are_counted_once_and_freed_with_their_last_holder() -> None:
    model = FakeEngine().new_batch(4, 64, 100)
    a, b, c = model.acquire(), model.acquire(), model.acquire()
    model.step([Work(a, list(range(1, 9)))])
    model.step([Work(a, [1, 2])])
    assert model.used_tokens() == 10
    model.share(a, b, 8)
    assert model.used_tokens() == 10 and b.tokens == a.tokens[:8]
    model.step([Work(b, [3, 4, 5])])
    assert model.used_tokens() == 13  # b's own 3 cells
    model.share(b, c, 11)  # 8 of a's cells and 3 of b's
    assert model.used_tokens() == 13
    model.release(a)  # a's first 8 cells live on in b and c; its last 2 go
    assert model.used_tokens() == 11
    model.truncate(b, 4)
    assert model.used_tokens() == 11  # c still holds them all
    model.step([Work(b, [9])])  # a new cell at position 4 of b, not c's
    assert model.used_tokens() == 12 and model.free_tokens == 88
    model.release(c)
    assert model.used_tokens() == 5
    with pytest.raises(ValueError):
        model.share(b, b, 2)  # the destination must be empty


def test_a_copying_engine_counts_every_copy() -> None:
    model = FakeEngine(shares_cells=False).new_batch(3, 64, 100)
    a, b = model.acquire(), model.acquire()
    model.step([Work(a, [1, 2, 3, 4])])
    model.share(a, b, 3)
    assert model.used_tokens() == 7


def test_a_step_past_the_pool_raises_kv_full() -> None:
    model = FakeEngine().new_batch(2, 64, 10)
    a, b = model.acquire(), model.acquire()
    model.step([Work(a, list(range(1, 9)))])
    with pytest.raises(KvFull):
        model.step([Work(b, [1, 2, 3])])
    assert b.tokens == [] and model.used_tokens() == 8


# ---------------------------------------------------------------- block matching


def test_prefix_matching_stops_at_the_first_differing_token() -> None:
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2 and common_prefix([], [1]) == 0
    model = FakeEngine().new_batch(3, 64)
    held, other = model.acquire(), model.acquire()
    held.tokens, other.tokens = [5, 6, 7, 8, 9, 10], [5, 6, 1]
    # never the last token of the new prompt (its logits start the decode)
    assert reusable([5, 6, 7, 8], held.tokens, 0, strict=False, chunk=4) == 3
    assert reusable([5, 6, 7, 0, 9, 10, 11], held.tokens, 0, strict=False, chunk=4) == 3
    # strict: whole chunks of canonical KV only
    assert reusable([5, 6, 7, 8, 9, 10, 11], held.tokens, 6, strict=True, chunk=4) == 4
    assert reusable([5, 6, 7, 8, 9, 10, 11], held.tokens, 3, strict=True, chunk=4) == 0
    m = best_match([5, 6, 7, 8, 0], [(other, 0), (held, 0)], strict=False, chunk=4)
    assert m is not None and m.slot is held and m.tokens == 4
    assert best_match([1, 2], [(held, 0)], strict=False, chunk=4) is None


def test_prefix_reuse_probe_leaves_every_slot_free() -> None:
    model = FakeEngine().new_batch(4, 64)
    assert probe_prefix_reuse(model, ids_of("a probe prompt for reuse"))  # the fake's rows follow its tokens only
    assert model.free_slots == 4 and model.used_tokens() == 0
    assert not probe_prefix_reuse(model, ids_of("ab"))  # too short to tell


# ---------------------------------------------------------------- the core


def test_one_request_may_use_the_whole_context_and_more_is_refused() -> None:
    core = make_core(FakeEngine(), max_seqs=4, slot_capacity=128, kv_tokens=128)
    try:
        assert core.context_length == 128
        prompt = ids_of("a long prompt " * 7)  # 98 tokens: far more than a quarter of the pool
        steps = asyncio.run(run_one(core, GenerationRequest(prompt, greedy(28))))
        assert steps[-1].finish_reason == "length" and sum(s.n_tokens for s in steps) == 28
        with pytest.raises(NeverFits, match="128 tokens"):
            asyncio.run(core.admit(1, max_total_tokens=129))
    finally:
        core.close()


def test_second_request_sharing_a_prefix_reuses_its_kv_and_says_so() -> None:
    engine = FakeEngine()
    core = make_core(engine)
    system = ids_of("you are a helpful assistant. ")  # 29 tokens
    first = GenerationRequest(system + ids_of("hi"), greedy(6))
    second = GenerationRequest(system + ids_of("bye"), greedy(6))
    try:
        cold = asyncio.run(run_one(core, second))
        a = asyncio.run(run_one(core, first))
        b = asyncio.run(run_one(core, second))
        stats = core.stats()
    finally:
        core.close()
    assert cached(a) == len(system)  # the idle entry `second` left holds the system prompt
    assert cached(b) == len(second.prompt_ids) - 1  # its own prompt, all but the last token
    assert text(b) == text(cold) and cached(cold) == 0
    assert stats.prefix_queries == 3 * len(system) + 2 + 3 + 3
    assert stats.prefix_hits == cached(a) + cached(b)
    assert any(n == len(system) for _, _, n in engine.batches[0].shared)


def test_running_sequences_are_prefix_sources_too() -> None:
    engine = FakeEngine()
    engine.step_delay = 0.002
    core = make_core(engine)
    system = ids_of("shared instructions here ")

    async def go() -> list[list[Step]]:
        first = asyncio.ensure_future(run_one(core, GenerationRequest(system + ids_of("one"), greedy(40))))
        await asyncio.sleep(0.05)  # `first` is decoding
        second = await run_one(core, GenerationRequest(system + ids_of("two"), greedy(4)))
        return [await first, second]

    try:
        _, second = asyncio.run(go())
    finally:
        core.close()
    assert cached(second) == len(system)


def test_seeded_request_on_a_non_invariant_profile_reuses_whole_canonical_chunks_only() -> None:
    engine = FakeEngine(invariant=False)  # max_batch 8: chunks end at 8, 16, ...
    core = make_core(engine)
    assert core.batch_invariant is False and not core.reuse_any
    prefix = ids_of("abcdefghijklmnopqrst")  # 20 tokens
    seeded = GenerationRequest(prefix + ids_of("xyz"), SamplingParams(max_tokens=8, seed=5, ignore_eos=True))
    try:
        cold = asyncio.run(run_one(core, seeded))
        # an unseeded prompt computed in shared forwards is no canonical source for a seeded one...
        asyncio.run(run_one(core, GenerationRequest(prefix + ids_of("q"), greedy(2))))
        warm = asyncio.run(run_one(core, seeded))
    finally:
        core.close()
    # ... the seeded one's own earlier prefill is: two whole chunks (16 tokens), computed alone
    assert cached(cold) == 0 and cached(warm) == 16
    assert text(warm) == text(cold)


def test_request_with_echo_logprobs_computes_every_prompt_row() -> None:
    core = make_core(FakeEngine())
    prompt = ids_of("echo me please")
    try:
        asyncio.run(run_one(core, GenerationRequest(prompt, greedy(2))))
        steps = asyncio.run(run_one(core, GenerationRequest(prompt, greedy(0), prompt_logprobs=1)))
    finally:
        core.close()
    assert cached(steps) == 0 and len(steps[0].prompt_logprobs or []) == len(prompt)


def test_preempted_greedy_sequence_resumes_to_the_same_text() -> None:
    """Four sequences growing to 70 tokens each in a pool of 160: some must be preempted and recomputed."""
    prompts = [ids_of(f"story {c} begins") for c in "abcd"]
    reqs = [GenerationRequest(p, greedy(56)) for p in prompts]
    solo_core = make_core(FakeEngine(), max_seqs=1)
    try:
        alone = [text(asyncio.run(run_one(solo_core, r))) for r in reqs]
    finally:
        solo_core.close()
    engine = FakeEngine()
    core = make_core(engine, kv_tokens=160, prefix_slots=0)

    async def together() -> list[list[Step]]:
        return await asyncio.gather(*(run_one(core, r) for r in reqs))

    try:
        results = asyncio.run(together())
        stats = core.stats()
    finally:
        core.close()
    assert stats.preemptions > 0
    assert [text(r) for r in results] == alone
    assert all(r[-1].finish_reason == "length" and sum(s.n_tokens for s in r) == 56 for r in results)
    assert all(not isinstance(s, Exception) for r in results for s in r)


def test_idle_prefix_entries_are_evicted_least_recently_used_first() -> None:
    engine = FakeEngine()
    core = make_core(engine, max_seqs=1, kv_tokens=64, prefix_slots=2)
    a, b, c = (ids_of(x) for x in ("aaaa aaaa aaaa aaaa", "bbbb bbbb bbbb bbbb", "cccc cccc cccc cccc"))
    try:
        asyncio.run(run_one(core, GenerationRequest(a, greedy(2))))
        asyncio.run(run_one(core, GenerationRequest(b, greedy(2))))
        asyncio.run(run_one(core, GenerationRequest([*a, 1], greedy(2))))  # touches a's entry (a now newer than b)
        asyncio.run(run_one(core, GenerationRequest(c, greedy(2))))  # needs room: b goes, not a
        held = [list(s.tokens[:4]) for s in engine.batches[0]._slots.values()]
        again_a = asyncio.run(run_one(core, GenerationRequest([*a, 2], greedy(2))))
    finally:
        core.close()
    assert a[:4] in held and b[:4] not in held
    assert cached(again_a) >= len(a)


def test_idle_entries_hold_at_most_idle_kv_tokens_and_the_newest_stay() -> None:
    engine = FakeEngine()
    core = make_core(engine, max_seqs=2, kv_tokens=512, prefix_slots=4, idle_kv_tokens=40)
    model = engine.batches[0]
    system = ids_of("system prompt ")  # 14 tokens shared by the two chats below
    long = ids_of("a long document nobody asks about again " * 2)  # 80 tokens: more than the bound alone
    try:
        asyncio.run(run_one(core, GenerationRequest(long, greedy(4))))
        after_long = model.used_tokens()  # dropped as soon as it finished: it alone is over the bound
        asyncio.run(run_one(core, GenerationRequest(system + ids_of("one"), greedy(4))))
        asyncio.run(run_one(core, GenerationRequest(system + ids_of("two"), greedy(4))))
        held = model.used_tokens()
        warm = asyncio.run(run_one(core, GenerationRequest(system + ids_of("three"), greedy(4))))
        unbounded = make_core(FakeEngine(), max_seqs=2, kv_tokens=512, prefix_slots=4)
        try:
            asyncio.run(run_one(unbounded, GenerationRequest(long, greedy(4))))
            kept = unbounded.model.used_tokens()
        finally:
            unbounded.close()
    finally:
        core.close()
    assert after_long == 0 and kept == len(long) + 3  # without a bound it stays (the last token is never fed)
    assert 0 < held <= 40  # the two chats share the system prompt's cells: both fit
    assert cached(warm) >= len(system)


def test_a_flood_of_distinct_prompts_never_holds_more_than_the_pool() -> None:
    engine = FakeEngine()
    core = make_core(engine, kv_tokens=96)
    peak = [0]
    model = engine.batches[0]
    original = model.step

    def watched(work: list[Work]) -> list:
        rows = original(work)
        peak[0] = max(peak[0], model.used_tokens())
        return rows

    model.step = watched  # type: ignore[method-assign]

    async def flood() -> list[list[Step]]:
        return await asyncio.gather(*(run_one(core, GenerationRequest(ids_of(f"distinct prompt {i} " * 3),
                                                                          greedy(8))) for i in range(12)))

    try:
        results = asyncio.run(flood())
    finally:
        core.close()
    assert all(r[-1].finish_reason == "length" for r in results)
    assert 0 < peak[0] <= 96


def test_client_leaving_while_preempted_frees_everything() -> None:
    engine = FakeEngine()
    engine.step_delay = 0.003
    core = make_core(engine, max_seqs=2, kv_tokens=64, prefix_slots=0)
    # `new` is preempted when the pool fills, and cannot come back before `old` ends
    old = GenerationRequest(ids_of("the old one, with a long prompt of forty"), greedy(20))
    new = GenerationRequest(ids_of("a new one"), greedy(50))

    async def go() -> None:
        t_old = await core.admit(1, max_total_tokens=old.max_total_tokens)
        t_new = await core.admit(1, max_total_tokens=new.max_total_tokens)
        first = asyncio.ensure_future(_consume(core.generate(t_old, old)))
        await asyncio.sleep(0.01)
        gen = core.generate(t_new, new)
        await gen.__anext__()
        deadline = time.monotonic() + 5
        while core.stats().waiting == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        assert core.stats().preemptions > 0 and core.stats().waiting == 1  # `new` is preempted
        await gen.aclose()
        steps = await asyncio.wait_for(first, 10)
        assert steps[-1].finish_reason == "length" and sum(s.n_tokens for s in steps) == 20
        t_old.release()
        t_new.release()
        while core.stats().running and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert core.stats().running == 0 and core.stats().waiting == 0

    async def _consume(it) -> list[Step]:  # type: ignore[no-untyped-def]
        return [s async for s in it]

    try:
        asyncio.run(go())
        held = [s for s in engine.batches[0]._slots.values() if s.tokens]
    finally:
        core.close()
    assert [len(s.tokens) for s in held] == [len(old.prompt_ids) + 19]  # the finished one's idle entry only


def test_cancelled_sequence_frees_its_slot_between_steps() -> None:
    engine = FakeEngine()
    core = make_core(engine, max_seqs=1)
    req = GenerationRequest(ids_of("long"), greedy(50))
    engine.step_delay = 0.01

    async def go() -> None:
        ticket = await core.admit(1, max_total_tokens=req.max_total_tokens)
        gen = core.generate(ticket, req)
        await gen.__anext__()
        engine.gate = threading.Event()
        assert await asyncio.to_thread(engine.batches[0].blocked.wait, 5)
        await gen.aclose()
        engine.gate.set()
        engine.gate = None
        deadline = time.monotonic() + 5
        while core.stats().running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        ticket.release()

    try:
        asyncio.run(go())
    finally:
        engine.gate = None
        core.close()
    assert engine.batches[0].released and engine.batches[0].used_tokens() == 0


def test_seeded_requests_on_a_laned_engine_run_alone_and_never_hold_pool_kv() -> None:
    """llama.cpp lays out a pooled sequence wherever cells are free, so its rows depend on the pool: a seeded
    sequence on a non-invariant profile gets a lane of its own, sized to its request, freed at its end."""
    engine = FakeEngine(invariant=False, lanes=True)
    core = make_core(engine)
    prompt = ids_of("a seeded prompt of some length")
    seeded = GenerationRequest(prompt, SamplingParams(max_tokens=10, seed=9, ignore_eos=True))
    others = [GenerationRequest(ids_of(f"other {c}"), greedy(30)) for c in "abc"]

    async def crowded() -> list[list[Step]]:
        return await asyncio.gather(*(run_one(core, r) for r in [others[0], seeded, *others[1:]]))

    try:
        alone = asyncio.run(run_one(core, seeded))
        results = asyncio.run(crowded())
        stats = core.stats()
    finally:
        core.close()
    assert text(results[1]) == text(alone) and cached(results[1]) == cached(alone) == 0
    assert len(engine.lane_batches) == 2 and all(lane.closed for lane in engine.lane_batches)
    assert all(lane.slot_capacity == seeded.max_total_tokens for lane in engine.lane_batches)
    assert all(len(f) == 1 for lane in engine.lane_batches for f in lane.forwards)  # alone in every forward
    assert stats.prefix_queries == 2 * len(prompt) + sum(len(r.prompt_ids) for r in others)
