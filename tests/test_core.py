"""The decode state and the batching core on a fake engine (tests/fake_engine.py): no model, milliseconds each."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from shrinkserve.server.runtime.batching import BatchingCore, probe_batch_invariance
from shrinkserve.server.runtime.decode import DecodeState
from shrinkserve.server.runtime.output import StopText
from shrinkserve.server.runtime.types import (
    Busy,
    Draining,
    FinishedGeneration,
    GenerationRequest,
    NeverFits,
    SamplingParams,
    Step,
)
from tests.fake_engine import EOS, VOCAB, FakeEngine, ids_of


def greedy(max_tokens: int = 8, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]


def row_for(token: int, *, second: int | None = None) -> np.ndarray:
    row = np.zeros(VOCAB, dtype=np.float32)
    row[token] = 10.0
    if second is not None:
        row[second] = 9.0
    return row


# ---------------------------------------------------------------- DecodeState


def drive(state: DecodeState, tokens: list[int]) -> list[Step]:
    steps = []
    for t in tokens:
        step, nxt = state.advance(row_for(t))
        steps.append(step)
        if nxt is None:
            break
    return steps


def test_stop_string_across_tokens_is_held_back_and_cut() -> None:
    engine = FakeEngine()
    state = DecodeState(GenerationRequest([1], greedy(stop=("c!",))), engine, capacity=100)
    steps = drive(state, ids_of("abc!d"))
    assert [s.text for s in steps] == ["a", "b", "", ""]  # "c" waits: it may start "c!"
    assert steps[-1].finish_reason == "stop" and "".join(s.text for s in steps) == "ab"
    assert sum(s.n_tokens for s in steps) == 4


def test_held_back_text_is_released_when_the_stop_string_does_not_complete() -> None:
    state = DecodeState(GenerationRequest([1], greedy(max_tokens=3, stop=("cx",))), FakeEngine(), capacity=100)
    steps = drive(state, ids_of("bcd"))
    assert [s.text for s in steps] == ["b", "", "cd"] and steps[-1].finish_reason == "length"


def test_utf8_split_across_tokens_is_never_released_half() -> None:
    state = DecodeState(GenerationRequest([1], greedy(max_tokens=4)), FakeEngine(), capacity=100)
    steps = drive(state, ids_of("aé€"))
    assert [s.text for s in steps] == ["a", "", "é", "€"]
    assert [t.bytes for s in steps for t in s.tokens] == [b"a", b"\xc3", b"\xa9", "€".encode()]


def test_eos_ends_with_stop_counted_but_not_listed_and_ignore_eos_goes_on() -> None:
    state = DecodeState(GenerationRequest([1], greedy()), FakeEngine(), capacity=100)
    steps = drive(state, [1, EOS])
    assert steps[-1].finish_reason == "stop" and steps[-1].tokens == [] and steps[-1].n_tokens == 1
    going = DecodeState(GenerationRequest([1], greedy(max_tokens=3, ignore_eos=True)), FakeEngine(), capacity=100)
    steps = drive(going, [1, EOS, 2])
    assert [s.finish_reason for s in steps] == [None, None, "length"]


def test_length_at_max_tokens_and_at_slot_capacity() -> None:
    state = DecodeState(GenerationRequest([1, 2], greedy(max_tokens=100)), FakeEngine(), capacity=5)
    steps = drive(state, [3] * 10)
    # 2 prompt tokens + 3 fed back fill 5 positions; the 4th sampled token cannot be fed
    assert len(steps) == 4 and steps[-1].finish_reason == "length"


def test_logprobs_are_raw_and_top_k_ordered() -> None:
    req = GenerationRequest([1], SamplingParams(max_tokens=1, temperature=0.0, logprobs=2))
    state = DecodeState(req, FakeEngine(), capacity=100)
    step, _ = state.advance(row_for(5, second=6))
    (info,) = step.tokens
    assert info.id == 5 and [a.id for a in info.top or []] == [5, 6]
    assert info.logprob == pytest.approx(info.top[0].logprob) and info.top[0].logprob > info.top[1].logprob


def test_same_seed_same_tokens() -> None:
    rows = [np.random.default_rng(i).standard_normal(VOCAB).astype(np.float32) for i in range(20)]

    def sample(seed: int) -> list[int]:
        state = DecodeState(GenerationRequest([1], SamplingParams(max_tokens=20, seed=seed, ignore_eos=True)),
                            FakeEngine(), capacity=100)
        return [state.advance(r)[0].tokens[0].id for r in rows]

    assert sample(7) == sample(7) and sample(7) != sample(8)


def test_processors_and_constraint_shape_sampling_but_not_reported_logprobs() -> None:
    class OnlyOdd:
        def __init__(self) -> None:
            self.accepted: list[int] = []

        def allowed(self) -> np.ndarray:
            return np.arange(VOCAB) % 2 == 1

        def accept(self, token: int) -> None:
            self.accepted.append(token)

        def is_finished(self) -> bool:
            return len(self.accepted) >= 2

    def ban_three(logits: np.ndarray, generated: object) -> np.ndarray:
        logits[3] = -np.inf
        return logits

    constraint = OnlyOdd()
    req = GenerationRequest([1], SamplingParams(max_tokens=10, temperature=0.0, logprobs=0),
                            processors=(ban_three,), constraint=constraint)
    state = DecodeState(req, FakeEngine(), capacity=100)
    raw = row_for(4, second=3)
    raw[5] = 8.0
    step, nxt = state.advance(raw)  # 4 is even (masked), 3 is banned: 5
    assert step.tokens[0].id == 5 and nxt == 5
    assert step.tokens[0].logprob < -1.0  # under the raw row, where 4 dominated
    step, nxt = state.advance(raw)
    assert step.finish_reason == "stop" and nxt is None and constraint.accepted == [5, 5]


def test_stop_text_unit() -> None:
    st = StopText(["ab"])
    assert st.push(b"xa") == ("x", False) and st.push(b"b") == ("", True)


# ---------------------------------------------------------------- BatchingCore


def make_core(engine: FakeEngine, **kw: object) -> BatchingCore:
    args: dict = {"max_seqs": 4, "slot_capacity": 64, "kv_tokens": 256, "max_queue": 8}
    args.update(kw)
    return BatchingCore("fake", engine, **args)


async def run_one(core: BatchingCore, req: GenerationRequest) -> list[Step]:
    ticket = await core.admit(1, max_total_tokens=req.max_total_tokens)
    try:
        return [s async for s in core.generate(ticket, req)]
    finally:
        ticket.release()


def text(steps: list[Step]) -> str:
    return "".join(s.text for s in steps)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def test_batched_rows_equal_solo_rows_and_decode_is_one_forward(engine: FakeEngine) -> None:
    prompts = [ids_of(p) for p in ("hello", "abc", "the end", "zz top")]
    reqs = [GenerationRequest(p, SamplingParams(max_tokens=12, seed=i, ignore_eos=True)) for i, p in enumerate(prompts)]
    core = make_core(engine)
    try:
        async def alone() -> list[str]:
            return [text(await run_one(core, r)) for r in reqs]

        async def together() -> list[str]:
            return [text(s) for s in await asyncio.gather(*(run_one(core, r) for r in reqs))]

        solo = asyncio.run(alone())
        forwards_before = len(core.model.forwards)
        batched = asyncio.run(together())
        assert solo == batched and all(len(t) >= 12 for t in solo)
        decode_steps = [f for f in core.model.forwards[forwards_before:] if all(n == 1 for _, n in f)]
        assert max(len(f) for f in decode_steps) == 4  # one forward carried all four sequences
        assert core.batch_invariant is True
    finally:
        core.close()
    assert engine.closed and core.model.closed


def test_each_row_keeps_its_own_stop_seed_and_logprobs(engine: FakeEngine) -> None:
    a, b = ids_of("ab"), ids_of("cd")
    engine.script(a, ids_of("xyz!q"))
    engine.script(b, [*ids_of("héllo"), EOS])
    core = make_core(engine)
    try:
        async def go() -> tuple[list[Step], list[Step]]:
            ra = GenerationRequest(a, SamplingParams(max_tokens=10, temperature=0.0, stop=("z!",), logprobs=1))
            rb = GenerationRequest(b, SamplingParams(max_tokens=10, temperature=0.0))
            return await asyncio.gather(run_one(core, ra), run_one(core, rb))

        sa, sb = asyncio.run(go())
    finally:
        core.close()
    assert text(sa) == "xy" and sa[-1].finish_reason == "stop"
    assert all(t.logprob is not None and len(t.top or []) == 1 for s in sa for t in s.tokens)
    assert text(sb) == "héllo" and sb[-1].finish_reason == "stop" and sb[-1].n_tokens == 1
    assert all(t.logprob is None for s in sb for t in s.tokens)


def test_non_invariant_profile_gives_seeded_requests_their_own_forward() -> None:
    engine = FakeEngine(invariant=False)
    core = make_core(engine)
    assert core.batch_invariant is False
    seeded = GenerationRequest(ids_of("seed me"), SamplingParams(max_tokens=10, temperature=0.0, seed=3,
                                                                 ignore_eos=True))
    others = [GenerationRequest(ids_of(f"other {c}"), SamplingParams(max_tokens=10, temperature=0.0,
                                                                      ignore_eos=True)) for c in "abc"]
    try:
        alone = text(asyncio.run(run_one(core, seeded)))

        async def crowded() -> list[list[Step]]:
            return await asyncio.gather(*(run_one(core, r) for r in [others[0], seeded, *others[1:]]))

        results = asyncio.run(crowded())
    finally:
        core.close()
    assert text(results[1]) == alone  # the seeded one is unaffected by the batch
    # the others did batch (a batched row of this fake prefers "z")
    assert all(text(r).count("z") >= 5 for i, r in enumerate(results) if i != 1), [text(r) for r in results]
    assert alone.count("z") < 5


def test_probe_detects_batch_dependence() -> None:
    tokens = ids_of("a probe prompt")
    assert probe_batch_invariance(FakeEngine().new_batch(4, 64, 256), tokens)
    model = FakeEngine(invariant=False).new_batch(4, 64, 256)
    assert not probe_batch_invariance(model, tokens)
    assert model.free_slots == 4


def test_cancel_frees_the_slot_only_after_the_running_step(engine: FakeEngine) -> None:
    core = make_core(engine, max_seqs=1, max_queue=4)
    engine.step_delay = 0.02  # 50 steps last a second: time to catch one in the middle
    req = GenerationRequest(ids_of("long"), SamplingParams(max_tokens=50, ignore_eos=True))

    async def go() -> None:
        ticket = await core.admit(1, max_total_tokens=req.max_total_tokens)
        gen = core.generate(ticket, req)
        await gen.__anext__()
        engine.gate = threading.Event()  # the next step blocks inside the "forward"
        assert await asyncio.to_thread(core.model.blocked.wait, 5)
        released_before = list(core.model.released)
        await gen.aclose()  # the client leaves while a forward runs
        await asyncio.sleep(0.05)
        assert core.model.released == released_before  # the slot is still in the running forward
        engine.gate.set()
        engine.gate = None
        engine.step_delay = 0.0
        deadline = time.monotonic() + 5
        while core.stats().running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert core.model.released[-1] == 0 and core.stats().running == 0
        ticket.release()
        # the one slot serves the next request
        steps = await run_one(core, GenerationRequest(ids_of("next"), greedy(max_tokens=3, ignore_eos=True)))
        assert steps[-1].finish_reason == "length"

    try:
        asyncio.run(go())
    finally:
        engine.gate = None
        core.close()


def test_full_queue_is_busy_and_a_queued_request_runs_later(engine: FakeEngine) -> None:
    engine.step_delay = 0.005
    core = make_core(engine, max_seqs=1, max_queue=1)
    req = GenerationRequest(ids_of("x"), SamplingParams(max_tokens=20, ignore_eos=True))

    async def go() -> None:
        first = await core.admit(1, max_total_tokens=req.max_total_tokens)
        queued = asyncio.ensure_future(core.admit(1, max_total_tokens=req.max_total_tokens))
        await asyncio.sleep(0.01)
        assert not queued.done() and core.stats().waiting == 1
        with pytest.raises(Busy):
            await core.admit(1, max_total_tokens=req.max_total_tokens)
        steps = [s async for s in core.generate(first, req)]
        first.release()
        assert steps[-1].finish_reason == "length"
        second = await asyncio.wait_for(queued, 5)
        second.release()
        assert core.stats().waiting == 0

    try:
        asyncio.run(go())
    finally:
        core.close()


def test_request_longer_than_a_slot_never_fits(engine: FakeEngine) -> None:
    core = make_core(engine, slot_capacity=32)
    try:
        with pytest.raises(NeverFits):
            asyncio.run(core.admit(1, max_total_tokens=33))
    finally:
        core.close()


def test_admission_counts_sequences_and_the_pool_decides_who_runs(engine: FakeEngine) -> None:
    core = make_core(engine, max_seqs=4, slot_capacity=80, kv_tokens=100)
    reqs = [GenerationRequest(ids_of(f"prompt {i} " * 5), greedy(max_tokens=30, ignore_eos=True)) for i in range(2)]

    async def go() -> list[list[Step]]:
        # 2 x (45 + 30) positions > 100: both are admitted at once, the pool makes room as they run
        return await asyncio.gather(*(run_one(core, r) for r in reqs))

    try:
        results = asyncio.run(go())
    finally:
        core.close()
    assert all(r[-1].finish_reason == "length" and sum(s.n_tokens for s in r) == 30 for r in results)


def test_drain_finishes_then_aborts_and_refuses_new_work(engine: FakeEngine) -> None:
    engine.step_delay = 0.01
    core = make_core(engine, max_seqs=1, max_queue=2)
    long = GenerationRequest(ids_of("go"), SamplingParams(max_tokens=60, ignore_eos=True))

    async def go() -> None:
        ticket = await core.admit(1, max_total_tokens=long.max_total_tokens)
        queued = asyncio.ensure_future(core.admit(1, max_total_tokens=10))
        seen: list[Step] = []

        async def consume(it: AsyncIterator[Step]) -> None:
            async for s in it:
                seen.append(s)

        consumer = asyncio.ensure_future(consume(core.generate(ticket, long)))
        await asyncio.sleep(0.05)
        await core.drain(time.monotonic() + 0.1)
        await asyncio.wait_for(consumer, 5)
        assert seen[-1].finish_reason == "abort" and 0 < len(seen) < 60
        with pytest.raises(Draining):
            await queued
        with pytest.raises(Draining):
            await core.admit(1, max_total_tokens=10)
        ticket.release()

    try:
        asyncio.run(go())
    finally:
        core.close()


def test_finished_generations_reach_observers(engine: FakeEngine) -> None:
    seen: list[FinishedGeneration] = []
    prompt = ids_of("cap")
    engine.script(prompt, [*ids_of("ok"), EOS])
    core = make_core(engine, observers=[seen.append])
    req = GenerationRequest(prompt, greedy(max_tokens=10), capture_top_k=3)
    try:
        asyncio.run(run_one(core, req))
        engine.script(prompt, [*ids_of("ok"), EOS])
        asyncio.run(run_one(core, GenerationRequest(prompt, greedy(max_tokens=10))))
    finally:
        core.close()
    (fin,) = seen  # the request admitted without capture (capture_top_k 0) reached no observer
    assert fin.completion_ids == [*ids_of("ok"), EOS] and fin.finish_reason == "stop"
    assert len(fin.sampled_logprobs) == len(fin.topk) == 3
    assert all(len(k) == 3 and k[0][1] >= k[-1][1] for k in fin.topk)
    assert fin.topk[0][0][0] == fin.completion_ids[0]  # greedy: the sampled token is the top one


def test_echo_prompt_logprobs_and_zero_max_tokens(engine: FakeEngine) -> None:
    core = make_core(engine)
    prompt = ids_of("abcdefghijklm")  # longer than one prefill chunk (8)
    try:
        steps = asyncio.run(run_one(core, GenerationRequest(prompt, greedy(max_tokens=0), prompt_logprobs=1)))
    finally:
        core.close()
    (step,) = steps
    assert step.finish_reason == "length" and step.n_tokens == 0
    lp = step.prompt_logprobs
    assert lp is not None and [t.id for t in lp] == prompt and lp[0].logprob is None
    assert all(t.logprob is not None and t.logprob <= 0 for t in lp[1:])


def test_thread_tuner_prefers_the_faster_count_and_rarely_retries_the_slower() -> None:
    from shrinkserve.server.engines.base import ThreadTuner

    tuner = ThreadTuner([1, 2], patience=20, busy=lambda: False)
    cost = {1: 0.01, 2: 1.0}  # 2 threads spinning against a busy neighbour
    picks = []
    for _ in range(6000):
        t = tuner.pick(1)
        picks.append(t)
        tuner.record(1, t, cost[t])
    spent = sum(cost[t] for t in picks)
    assert picks.count(2) >= 2  # tried, and tried again later
    assert sum(cost[t] for t in picks if t == 2) / spent < 0.1  # exploring costs little
    # another step shape is measured on its own: 8-token steps where 2 threads are faster
    for _ in range(50):
        t = tuner.pick(8)
        tuner.record(8, t, {1: 0.2, 2: 0.1}[t])
    assert tuner.pick(8) == 2 and tuner.pick(1) == 1


def test_thread_tuner_does_not_try_a_larger_team_on_a_busy_box() -> None:
    from shrinkserve.server.engines.base import ThreadTuner

    busy = [True]
    tuner = ThreadTuner([1, 2], patience=5, busy=lambda: busy[0])
    for _ in range(200):
        t = tuner.pick(1)
        assert t == 1
        tuner.record(1, t, 0.01)
    busy[0] = False
    assert tuner.pick(1) == 2  # once cores are idle, the larger team gets its try


def test_a_failing_request_fails_alone(engine: FakeEngine) -> None:
    def broken(logits: np.ndarray, generated: object) -> np.ndarray:
        if len(generated) >= 2:  # type: ignore[arg-type]
            raise ValueError("processor bug")
        return logits

    core = make_core(engine)
    bad = GenerationRequest(ids_of("bad"), SamplingParams(max_tokens=10, ignore_eos=True), processors=(broken,))
    good = GenerationRequest(ids_of("good"), SamplingParams(max_tokens=10, ignore_eos=True))

    async def go() -> tuple[object, list[Step]]:
        return await asyncio.gather(run_one(core, bad), run_one(core, good), return_exceptions=True)

    try:
        failed, ok = asyncio.run(go())
        assert isinstance(failed, ValueError) and str(failed) == "processor bug"
        assert isinstance(ok, list) and ok[-1].finish_reason == "length" and sum(s.n_tokens for s in ok) == 10
        # the failed sequence's slot is freed; the finished one's KV stays as an idle prefix entry
        assert core.stats().running == 0 and core.model.free_slots == core.model.max_seqs - 1
    finally:
        core.close()


def test_client_leaving_the_queue_returns_its_place(engine: FakeEngine) -> None:
    core = make_core(engine, max_seqs=1, max_queue=2)

    async def go() -> None:
        held = await core.admit(1, max_total_tokens=10)
        leaver = asyncio.ensure_future(core.admit(1, max_total_tokens=10))
        stayer = asyncio.ensure_future(core.admit(1, max_total_tokens=10))
        await asyncio.sleep(0.01)
        assert core.stats().waiting == 2
        leaver.cancel()  # the client hung up while queued
        await asyncio.sleep(0.01)
        assert core.stats().waiting == 1
        held.release()
        (await asyncio.wait_for(stayer, 1)).release()
        assert core.admission.seqs_held == 0 and core.admission.tokens_held == 0

    try:
        asyncio.run(go())
    finally:
        core.close()


def test_unseeded_prompts_join_the_decode_forward_seeded_ones_prefill_alone(engine: FakeEngine) -> None:
    core = make_core(engine)
    engine.step_delay = 0.005  # the first two are still decoding when the others arrive
    first = [GenerationRequest(ids_of(p), SamplingParams(max_tokens=30, ignore_eos=True)) for p in ("ab", "cd")]
    late_unseeded = GenerationRequest(ids_of("unseeded"), SamplingParams(max_tokens=3, ignore_eos=True))
    late_seeded = GenerationRequest(ids_of("seed"), SamplingParams(max_tokens=3, seed=1, ignore_eos=True))
    try:
        n0 = len(core.model.forwards)  # the warm-up and the invariance probe

        async def go() -> None:
            running = [asyncio.ensure_future(run_one(core, r)) for r in first]
            while len(core.model.forwards) < n0 + 4:
                await asyncio.sleep(0.005)
            await asyncio.gather(run_one(core, late_unseeded), run_one(core, late_seeded), *running)

        asyncio.run(go())
    finally:
        core.close()
    n_unseeded, n_seeded = len(late_unseeded.prompt_ids), len(late_seeded.prompt_ids)  # 8 and 4 tokens: one chunk
    mixed = [f for f in core.model.forwards[n0:] if any(n == n_unseeded for _, n in f) and any(n == 1 for _, n in f)]
    assert mixed, str(core.model.forwards)  # the unseeded prompt rode with decode rows
    seeded = [f for f in core.model.forwards[n0:] if any(n == n_seeded for _, n in f)]
    assert seeded and all(len(f) == 1 for f in seeded), str(core.model.forwards)  # the seeded prompt alone


def test_a_shared_forward_carries_at_most_one_chunk_of_prompt_tokens(engine: FakeEngine) -> None:
    # Prompts arriving together while others decode: their chunks join the decode forward only up to
    # max_chunk prompt tokens in all (llama.cpp's batch holds max_chunk + slots tokens; overshooting it
    # wrote past the llama_batch: "NULL pointer access" under 8 concurrent streams).
    core = make_core(engine, max_seqs=6)
    engine.step_delay = 0.005
    first = [GenerationRequest(ids_of(p), SamplingParams(max_tokens=40, ignore_eos=True)) for p in ("ab", "cd")]
    # 7 tokens each with max_batch 8: two of them never fit one forward together
    late = [GenerationRequest(ids_of(p), SamplingParams(max_tokens=3, ignore_eos=True))
            for p in ("pqrstuv", "wxyzabc", "defghij", "klmnopq")]
    try:
        n0 = len(core.model.forwards)

        async def go() -> list[list[Step]]:
            running = [asyncio.ensure_future(run_one(core, r)) for r in first]
            while len(core.model.forwards) < n0 + 3:
                await asyncio.sleep(0.005)
            return await asyncio.gather(*(run_one(core, r) for r in late), *running)

        results = asyncio.run(go())
    finally:
        core.close()
    assert all(r[-1].finish_reason == "length" for r in results)
    for f in core.model.forwards[n0:]:
        prompt_tokens = sum(n for _, n in f if n > 1)
        assert prompt_tokens <= engine.max_batch, str(f)
        assert sum(n for _, n in f) <= engine.max_batch + 6, str(f)


def test_background_forwards_wait_for_traffic_and_foreground_never_waits_for_them() -> None:
    from shrinkserve.server.engines.base import CpuBudget

    cpu = CpuBudget(2)
    busy = threading.Event()
    busy.set()
    cpu.busy = busy.is_set
    ran = threading.Event()

    def evaluation() -> None:
        with cpu.background(), cpu.use(2):
            ran.set()

    worker = threading.Thread(target=evaluation)
    worker.start()
    time.sleep(0.2)
    assert not ran.is_set()  # requests in flight: the background forward waits
    t0 = time.perf_counter()
    with cpu.use(2):  # a request's forward goes first, at once
        assert time.perf_counter() - t0 < 0.05
        busy.clear()
        time.sleep(0.2)
        assert not ran.is_set()  # nothing in flight any more, but a forward still holds the cores
    worker.join(timeout=2)
    assert ran.is_set()
    with cpu.use(1):  # outside background(), the same thread is foreground again
        pass
