"""A profile's state changes under one lock, along the allowed transitions only (no model needed)."""

from __future__ import annotations

import threading

from shrinkserve.compression.profiles import ProfileSpec
from shrinkserve.server.runtime.registry import TRANSITIONS, ProfileRuntime
from shrinkserve.server.settings import ResolvedServing


def runtime() -> ProfileRuntime:
    return ProfileRuntime("p", ProfileSpec(method="gguf:q8_0"),
                          ResolvedServing(scheduler="batching", max_num_seqs=8, kv_cache_tokens=None, max_queue=32))


def test_many_threads_claim_a_pending_profile_and_exactly_one_wins() -> None:
    for _ in range(50):
        rt, wins, barrier = runtime(), [], threading.Barrier(16)

        def claim(rt: ProfileRuntime = rt, wins: list = wins, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            if rt.move("building", only_from={"pending"}):
                wins.append(threading.get_ident())

        threads = [threading.Thread(target=claim) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and rt.state == "building"


def test_end_states_stay_and_only_listed_transitions_happen() -> None:
    rt = runtime()
    assert not rt.move("ready")  # pending → ready skips the load
    assert rt.move("building") and rt.move("loading") and rt.move("evaluating") and rt.move("ready")
    assert rt.move("failed", error="vLLM server: gone") and rt.error == "vLLM server: gone"
    assert not rt.move("pending") and not rt.move("ready") and rt.state == "failed"  # failed is final
    rt = runtime()
    rt.move("building"), rt.move("loading"), rt.move("rejected")
    assert rt.state == "rejected" and not rt.move("ready", only_from={"loading", "evaluating"})
    assert all(to in TRANSITIONS for targets in TRANSITIONS.values() for to in targets)


def test_a_late_failure_and_a_shutdown_race_to_one_consistent_end() -> None:
    for _ in range(50):
        rt = runtime()
        for to in ("building", "loading", "ready"):
            rt.move(to)
        barrier = threading.Barrier(2)

        def fail(rt: ProfileRuntime = rt, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            rt.move("failed", error="vLLM server: exited")

        def shut(rt: ProfileRuntime = rt, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            rt.move("pending", only_from={"ready"})

        threads = [threading.Thread(target=fail), threading.Thread(target=shut)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Whichever comes first, the failure is what the profile ends in: a shutdown never hides it.
        assert rt.state == "failed" and rt.error == "vLLM server: exited"
