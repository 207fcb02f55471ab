"""Every way a request ends hands its admission ticket back, explicitly: a normal finish, an engine error, a
client that cancels or disconnects (before the first byte, mid-stream, or waiting for a non-streamed answer),
and a drain. The garbage collector is off in every test, and each run stays referenced until the check, so
nothing here can pass through a finalizer. Batching core on the fake engine: no model, well under a second each.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import ClientDisconnect

from shrinkserve.server.api.deps import unless_disconnected
from shrinkserve.server.api.openai import RunStream
from shrinkserve.server.protocol.errors import ClientGone
from shrinkserve.server.runtime.batching import BatchingCore
from shrinkserve.server.runtime.metrics import Metrics
from shrinkserve.server.runtime.types import SamplingParams
from shrinkserve.server.serving import base
from tests.fake_engine import FakeBatch, FakeEngine, ids_of


@pytest.fixture(autouse=True)
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def core(engine: FakeEngine) -> Iterator[BatchingCore]:
    c = BatchingCore("fake", engine, max_seqs=2, slot_capacity=128, kv_tokens=256, max_queue=4, probe=False)
    try:
        yield c
    finally:
        if engine.gate is not None:
            engine.gate.set()
        c.close()


async def start(core: BatchingCore, metrics: Metrics, *, n: int = 1, max_tokens: int = 8) -> base.Run:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rt = SimpleNamespace(core=core, name="fake")
    prompts = ["once upon", "a time"]
    prepared = base.Prepared(rt, base.choices([ids_of(p) for p in prompts], params, n),  # type: ignore[arg-type]
                             prompts, time.perf_counter(), n=n)
    run = await base.start(prepared, metrics)
    assert core.admission.seqs_held > 0
    return run


async def returned(core: BatchingCore) -> None:
    """Wait until the admission holds nothing: a running generation's share comes back from the scheduler
    thread through the event loop once its slot is free."""
    deadline = time.monotonic() + 5.0
    while core.admission.seqs_held or core.admission.tokens_held or core.stats().running:
        assert time.monotonic() < deadline, (f"ticket not returned: {core.admission.seqs_held} sequences, "
                                             f"{core.admission.tokens_held} tokens held")
        await asyncio.sleep(0.01)


def aborted(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("shrinkserve_request_success_total",
                                             {"profile": "fake", "finished_reason": "abort"}) or 0.0


def test_a_run_has_no_finalizer() -> None:
    assert "__del__" not in vars(base.Run)


@pytest.mark.parametrize("n", [1, 2])
def test_normal_finish(core: BatchingCore, n: int) -> None:
    async def go() -> None:
        m = Metrics()
        run = await start(core, m, n=n)
        async with run:
            outcomes = await run.collect()
        assert all(o.finish_reason == "length" for o in outcomes)
        await returned(core)
        streamed = await start(core, m, n=n)
        async for _ in streamed.steps():  # consumed to the end, never closed by hand
            pass
        await returned(core)
        assert streamed.ticket.returned and aborted(m) == 0

    asyncio.run(go())


@pytest.mark.parametrize("n", [1, 2])
def test_engine_error(core: BatchingCore, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    def broken(self: FakeBatch, work: Any) -> Any:
        raise RuntimeError("the forward failed")

    monkeypatch.setattr(FakeBatch, "step", broken)

    async def go() -> None:
        run = await start(core, Metrics(), n=n)
        with pytest.raises(RuntimeError, match="the forward failed"):
            async with run:
                await run.collect()
        await returned(core)

    asyncio.run(go())


def test_client_gone_while_waiting_for_a_non_streamed_answer(core: BatchingCore, engine: FakeEngine) -> None:
    engine.gate = threading.Event()  # every forward blocks: the generation cannot finish by itself

    class Request:
        async def is_disconnected(self) -> bool:
            return True

    async def go() -> None:
        m = Metrics()
        run = await start(core, m, max_tokens=64)
        with pytest.raises(ClientGone):
            async with run:
                await unless_disconnected(Request(), run.collect(), poll=0.01)  # type: ignore[arg-type]
        assert engine.gate is not None
        engine.gate.set()
        await returned(core)
        assert aborted(m) == 1  # the running prompt; the second one never started

    asyncio.run(go())


def test_a_handler_that_fails_before_generating_returns_the_ticket(core: BatchingCore) -> None:
    async def go() -> None:
        run = await start(core, Metrics(), n=2)
        with pytest.raises(ValueError):
            async with run:
                raise ValueError("rendering the response failed")
        await returned(core)

    asyncio.run(go())


def test_client_cancel_mid_stream(core: BatchingCore, engine: FakeEngine) -> None:
    engine.step_delay = 0.01

    async def go() -> None:
        m = Metrics()
        run = await start(core, m, max_tokens=100)
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in run.steps():
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()  # what the server does to a request whose client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        await returned(core)
        assert aborted(m) == 1

    asyncio.run(go())


async def sse(run: base.Run) -> AsyncGenerator[str, None]:
    async for _, step in run.steps():
        yield f"data: {step.text}\n\n"


def http_scope(spec_version: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "method": "POST",
            "path": "/v1/completions", "headers": []}


def test_stream_whose_client_left_before_the_first_byte(core: BatchingCore) -> None:
    async def go() -> None:
        run = await start(core, Metrics(), n=2)
        body = sse(run)  # referenced until the end: only the response's own close can free the ticket

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            raise OSError("connection reset")  # gone before the headers went out

        with pytest.raises(ClientDisconnect):
            await RunStream(body, run)(http_scope("2.4"), receive, send)
        await returned(core)

    asyncio.run(go())


@pytest.mark.parametrize("spec_version", ["2.4", "2.0"])
def test_stream_whose_client_left_mid_stream(core: BatchingCore, engine: FakeEngine, spec_version: str) -> None:
    engine.step_delay = 0.01

    async def go() -> None:
        m = Metrics()
        run = await start(core, m, max_tokens=100)
        body = sse(run)
        gone = asyncio.Event()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if len(sent) == 3:  # headers and two chunks, then the client goes away
                gone.set()
                if spec_version == "2.4":
                    raise OSError("connection reset")
                await asyncio.sleep(3600)  # older servers: the disconnect arrives through receive()

        try:
            await RunStream(body, run)(http_scope(spec_version), receive, send)
        except ClientDisconnect:
            assert spec_version == "2.4"
        await returned(core)
        assert aborted(m) == 1  # the running prompt, cut short; the second one never started

    asyncio.run(go())


def test_drain(core: BatchingCore, engine: FakeEngine) -> None:
    engine.step_delay = 0.01

    async def go() -> None:
        m = Metrics()
        run = await start(core, m, max_tokens=100)
        first = asyncio.Event()
        finishes: list[str | None] = []

        async def consume() -> None:
            async with run:
                async for _, step in run.steps():
                    first.set()
                    if step.finish_reason is not None:
                        finishes.append(step.finish_reason)

        task = asyncio.create_task(consume())
        await first.wait()
        await core.drain(time.monotonic())  # past the deadline at once: what runs is aborted
        await asyncio.wait_for(task, 5.0)
        await returned(core)
        assert finishes[0] == "abort"

    asyncio.run(go())
