"""Distillation resumes after kill -9 from its last checkpoint and reproduces the uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


def _run(run_dir: Path, out: Path, *, sleep: float) -> None:
    """Worker: a fixed tiny teacher + data, KD with a checkpoint every step; the result goes to `out`."""
    sys.path.insert(0, str(REPO))
    from shrinkserve.compression.distill.prune import prune
    from shrinkserve.compression.distill.train import TrainConfig, train
    from tests.distill_helpers import sampled_examples, tiny_teacher

    torch.set_num_threads(1)  # the same reduction order in every process
    teacher = tiny_teacher(layers=6)
    data = sampled_examples(teacher, 120, seed=0)
    student, _ = prune(teacher, [ex.ids for ex in data[:8]], drop_layers=2)
    cfg = TrainConfig(loss="kd", steps=STEPS, batch=4, accum=2, lr=1e-3, warmup_steps=3, eval_every=3,
                      eval_examples=16, patience=0, checkpoint_every=1, keep_checkpoints=2, seed=7)
    result = train(student, data[:100], data[100:], cfg, teacher=teacher, run_dir=run_dir, progress=False,
                   on_step=lambda _row: time.sleep(sleep))
    h = hashlib.sha256()
    for name, tensor in sorted(student.state_dict().items()):
        h.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    out.write_text(json.dumps({**result.to_dict(), "weights_sha256": h.hexdigest()}))


def _worker(run_dir: Path, out: Path, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, str(run_dir), str(out), str(sleep)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    straight = _worker(tmp_path / "straight", tmp_path / "straight.json", 0.0)
    killed_out = tmp_path / "killed.json"
    victim = _worker(tmp_path / "killed", killed_out, 0.4)
    run = tmp_path / "killed"
    deadline = time.monotonic() + 300
    while not any(run.glob("step-0000000[4-9]")):
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not killed_out.exists()  # it really died mid-run
    resumed = _worker(run, killed_out, 0.0)
    for proc in (straight, resumed):
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output
    a = json.loads((tmp_path / "straight.json").read_text())
    b = json.loads(killed_out.read_text())
    assert a["resumed_from"] is None and b["resumed_from"] is not None and 4 <= b["resumed_from"] < STEPS
    assert b["steps"] == a["steps"] == STEPS and b["tokens"] == a["tokens"]
    assert [r["loss"] for r in b["history"]] == [r["loss"] for r in a["history"]]  # bit for bit
    assert b["evals"] == a["evals"] and b["best_step"] == a["best_step"]
    assert b["weights_sha256"] == a["weights_sha256"]
    # only complete checkpoints are left: the newest `keep` of them, no temp dirs
    names = sorted(p.name for p in run.iterdir())
    assert [n for n in names if n.startswith("step-")] == [f"step-{STEPS - 1:08d}", f"step-{STEPS:08d}"]
    assert not [n for n in names if n.startswith(".tmp-")]


def test_checkpoint_store_skips_leftovers_and_unreadable_checkpoints(tmp_path: Path) -> None:
    from shrinkserve.compression.distill.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path, keep=3)
    model = {"w": torch.arange(4.0)}
    for step in (1, 2, 3):
        store.save(step, {"w": model["w"] * step}, {"state": {}}, {"tokens": step})
    (tmp_path / ".tmp-crashed").mkdir()  # a save killed before its rename
    (tmp_path / "step-00000003" / "state.json").write_text("{torn")  # damage after the fact
    store = CheckpointStore(tmp_path, keep=3)
    assert not (tmp_path / ".tmp-crashed").exists()
    latest = store.latest()
    assert latest is not None and latest.step == 2 and latest.state["tokens"] == 2
    torch.testing.assert_close(latest.model_state()["w"], torch.arange(4.0) * 2)
    store.save(4, model, {}, {})
    store.save(5, model, {}, {})
    assert store.steps() == [3, 4, 5]


def test_a_run_directory_of_another_configuration_is_refused(tmp_path: Path) -> None:
    from shrinkserve.compression.distill.prune import prune
    from shrinkserve.compression.distill.train import TrainConfig, train
    from tests.distill_helpers import sampled_examples, tiny_teacher

    teacher = tiny_teacher(layers=4)
    data = sampled_examples(teacher, 16, seed=1)
    student, _ = prune(teacher, [ex.ids for ex in data[:4]], drop_layers=1)
    train(student, data, [], TrainConfig(loss="ce", steps=2, batch=4, checkpoint_every=1), run_dir=tmp_path,
          progress=False)
    # a longer budget is the same run, continued
    r = train(student, data, [], TrainConfig(loss="ce", steps=3, batch=4, checkpoint_every=1), run_dir=tmp_path,
              progress=False)
    assert r.resumed_from == 2 and r.steps == 3
    with pytest.raises(ValueError, match="another training configuration"):
        train(student, data, [], TrainConfig(loss="ce", steps=3, batch=4, lr=1e-2), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="or data"):
        train(student, data[:-1], [], TrainConfig(loss="ce", steps=3, batch=4, checkpoint_every=1), run_dir=tmp_path,
              progress=False)


def test_an_early_stop_stays_stopped_when_resumed(tmp_path: Path) -> None:
    from shrinkserve.compression.distill.prune import prune
    from shrinkserve.compression.distill.train import TrainConfig, train
    from tests.distill_helpers import sampled_examples, tiny_teacher

    teacher = tiny_teacher(layers=4)
    data = sampled_examples(teacher, 24, seed=1)
    cfg = dict(loss="kd", batch=4, lr=5.0, warmup_steps=0, grad_clip=None, eval_every=1, patience=1,
               checkpoint_every=1)
    student, _ = prune(teacher, [ex.ids for ex in data[:4]], drop_layers=1)
    first = train(student, data[:20], data[20:], TrainConfig(steps=20, **cfg), teacher=teacher, run_dir=tmp_path,
                  progress=False)
    assert first.stop_reason == "early_stop" and first.steps < 20
    again = train(student, data[:20], data[20:], TrainConfig(steps=40, **cfg), teacher=teacher, run_dir=tmp_path,
                  progress=False)
    assert again.stop_reason == "early_stop" and again.steps == first.steps and again.resumed_from == first.steps


def _build(root: Path, steps: int) -> None:
    """Worker: the cached prune → distil chain of a tiny teacher (tests/test_distill.py's options)."""
    sys.path.insert(0, str(REPO))
    from tests.distill_helpers import student_builder
    from tests.test_distill import _profile

    torch.set_num_threads(1)
    profile = _profile(root / "data.jsonl", budget={"steps": steps}, checkpoint_every=1, evaluation={"every": 50})
    built = student_builder(root / "cache", root / "teacher", {"s": profile}).build("s")
    (root / "extra.json").write_text(json.dumps(built.manifest["extra"]))


def test_a_killed_student_build_resumes_from_its_checkpoints(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from shrinkserve.compression.distill.pipeline import write_examples
    from tests.distill_helpers import sampled_examples, save_tiny_teacher

    save_tiny_teacher(tmp_path / "teacher")
    write_examples(sampled_examples(AutoModelForCausalLM.from_pretrained(tmp_path / "teacher"), 120, seed=2),
                   tmp_path / "data.jsonl")
    cmd = [sys.executable, __file__, "build", str(tmp_path), "150"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = tmp_path / "cache" / "work"
    deadline = time.monotonic() + 300
    while not any(runs.glob("*/step-*")):
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(1.0)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "extra.json").exists()
    assert not list((tmp_path / "cache" / "artifacts").glob("*/distill")), "no student artifact after a kill"
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    extra = json.loads((tmp_path / "extra.json").read_text())
    assert extra["steps"] == 150 and extra["resumed_from"] is not None and extra["resumed_from"] >= 1
    assert not any(runs.iterdir())  # the run's checkpoints went with the finished artifact


if __name__ == "__main__":
    if sys.argv[1] == "build":
        _build(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        _run(Path(sys.argv[1]), Path(sys.argv[2]), sleep=float(sys.argv[3]))
