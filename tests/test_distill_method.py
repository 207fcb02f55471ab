"""`method: distill` through the method registry: a profile's flat YAML → options, the DAG through the cache,
`then:` on the student, keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.distill.pipeline import HELDOUT_NAME, heldout_examples, write_examples
from tests.distill_helpers import sampled_examples, save_tiny_teacher


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("distill-method")
    teacher_dir = save_tiny_teacher(root / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    data = root / "capture.jsonl"
    write_examples(sampled_examples(teacher, 120, seed=5), data)
    return teacher_dir, data


def _profile(data: Path, **extra: object) -> dict:
    return {"method": "distill", "data": {"capture": [str(data)], "heldout_fraction": 0.2},
            "student": {"drop_layers": 2, "calibration_samples": 4},
            "budget": {"steps": 4, "tokens": None, "seconds": None}, "optimizer": {"batch": 8, "lr": 1e-3},
            "evaluation": {"every": 2, "patience": 0}, "device": "cpu", **extra}


def _builder(cache: Path, teacher_dir: Path, profiles: dict) -> object:
    from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec

    specs = {name: ProfileSpec.model_validate(p) for name, p in profiles.items()}
    return ProfileBuilder(ArtifactCache(cache), {"tiny": BaseSpec(source=str(teacher_dir))}, specs, threads=1)


def test_distill_profile_builds_a_student_through_the_registry(setup, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    teacher_dir, data = setup
    b = _builder(tmp_path / "cache", teacher_dir, {"student": _profile(data)})
    assert b.status("student")["state"] == "missing"
    built = b.build("student")
    assert built.method == "distill" and built.engine == "torch" and not built.cache_hit
    student = AutoModelForCausalLM.from_pretrained(built.path)
    assert student.config.num_hidden_layers == 4
    extra = built.manifest["extra"]
    assert extra["steps"] == 4 and extra["prune"]["dropped_layers"] and extra["heldout_examples"] > 0
    assert (built.path / HELDOUT_NAME).is_file() and heldout_examples(built.path)
    assert built.manifest["recipe"]["kind"] == "distill" and "device" not in built.manifest["recipe"]
    assert b.status("student")["state"] == "cached" and b.build("student").cache_hit
    assert not (tmp_path / "cache" / "work").exists() or not any((tmp_path / "cache" / "work").iterdir())
    assert b.profiles["student"].load == "lazy"  # the method's default: training is long


def test_distill_keys_follow_recipe_data_and_teacher(setup, tmp_path: Path) -> None:
    teacher_dir, data = setup
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(data.read_text().splitlines()[:-1]) + "\n")
    b = _builder(tmp_path / "cache", teacher_dir, {
        "a": _profile(data), "same": _profile(data, device="auto", checkpoint_every=3),
        "loss": _profile(data, loss={"kind": "topk"}), "data": {**_profile(other)},
        "shape": _profile(data, student={"drop_layers": 1}),
    })
    keys = {name: b.key(name) for name in ("a", "same", "loss", "data", "shape")}
    assert keys["a"] == keys["same"]
    assert len({keys[n] for n in ("a", "loss", "data", "shape")}) == 4


def test_distill_then_int8_quantizes_the_student(setup, tmp_path: Path) -> None:
    teacher_dir, data = setup
    b = _builder(tmp_path / "cache", teacher_dir, {"s": _profile(data), "s8": _profile(data, then=["int8"])})
    from shrinkserve.compression.distill.method import find_distill_node

    plain = b.build("s")
    quant = b.build("s8")
    assert quant.method == "distill+int8" and quant.key != plain.key
    # evaluation finds the student's held-out traffic through the chain
    found = find_distill_node(b.plan("s8").node)
    assert found is not None and found.key == plain.key
    manifest = json.loads((quant.path / "manifest.json").read_text()) if quant.path.is_dir() else quant.manifest
    assert list(manifest["inputs"].values()) == [plain.key]  # derived from the student artifact, not the base


def test_unknown_or_misplaced_distill_options_are_rejected(setup) -> None:
    from shrinkserve.compression.profiles import ProfileSpec

    _, data = setup
    with pytest.raises(ValueError, match=r"loss\.kind\n  Input should be 'kd', 'topk' or 'ce'"):
        ProfileSpec.model_validate(_profile(data, loss={"kind": "nope"}))
    with pytest.raises(ValueError, match="'group_size' means nothing for method 'distill'"):
        ProfileSpec.model_validate(_profile(data, group_size=32))  # a weight-only option means nothing here
    # distill is a first step only (a complete distill step, so its options are not what is refused)
    with pytest.raises(ValueError, match="then\\[0\\]: 'distill' takes only a base, but 'rtn' produces"):
        ProfileSpec.model_validate({"method": "rtn", "then": [_profile(data)]})


def test_evaluation_scores_a_student_and_its_quantized_form_on_held_out_traffic(setup, tmp_path: Path) -> None:
    """The server's and `shrinkserve eval`'s Evaluator: prose against the base, held-out traffic against the
    teacher, for the student and for `then: int8` of it; traffic gates apply; the report shows both."""
    import numpy as np

    from shrinkserve.compression.distill.evaluate import TorchLogits, score_on_traffic
    from shrinkserve.compression.quality import EvalSet
    from shrinkserve.server import report
    from shrinkserve.server.engines.loader import load_engine
    from shrinkserve.server.quality_runner import Evaluator, gate_failures
    from tests.distill_helpers import VOCAB

    teacher_dir, data = setup
    gate = {"max_traffic_kl": 1e-6, "min_traffic_top1": 0.0}
    profiles = {"s": _profile(data, gate=gate, dtype="float32"), "s8": _profile(data, then="int8"),
                "teacher": {"method": "hf"}}
    b = _builder(tmp_path / "cache", teacher_dir, profiles)
    rng = np.random.default_rng(0)
    tasks = [{"question": "t5 t6", "choices": ["t7", "t8"], "answer": 0}]
    evalset = EvalSet(" ".join(f"t{i}" for i in rng.integers(3, VOCAB, 200)), tasks, None, 64)
    evaluator = Evaluator(b, evalset, threads=1, traffic_tokens=None)  # all of the held-out traffic
    records = {}
    for name in ("s", "s8", "teacher"):
        built, spec = b.build(name), b.profiles[name]
        engine = load_engine(built, spec, 1)
        try:
            assert evaluator.stored(built, spec) is None
            total = evaluator.progress_total(name, spec, engine)
            ticks: list[int] = []
            records[name] = evaluator.run(name, built, spec, engine, progress=ticks.append)
            assert sum(ticks) == total
            assert evaluator.stored(built, spec) == records[name]
        finally:
            engine.close()
    evaluator.release()
    s, s8 = records["s"]["traffic"], records["s8"]["traffic"]
    assert "traffic" not in records["teacher"]
    assert s["student_key"] == s8["student_key"] == b.key("s") and s["data_sha256"] == s8["data_sha256"]
    assert s["tokens"] == sum(ex.n_response for ex in heldout_examples(b.build("s").path)) and s["kl"] > 0
    assert s8["kl"] != s["kl"] and 0 <= s8["top1"] <= 1
    # the same number as scoring the student (float32 here) directly against the teacher on its held-out split
    from transformers import AutoModelForCausalLM

    direct = score_on_traffic(TorchLogits(AutoModelForCausalLM.from_pretrained(b.build("s").path)),
                              heldout_examples(b.build("s").path),
                              teacher=TorchLogits(AutoModelForCausalLM.from_pretrained(teacher_dir)))
    assert direct["kl"] == pytest.approx(s["kl"], rel=1e-4) and direct["top1"] == s["top1"]
    # a cap on the held-out traffic scored: the first examples, and a record made under another cap is stale
    capped = Evaluator(b, evalset, threads=1, traffic_tokens=20)
    built, spec = b.build("s"), b.profiles["s"]
    assert capped.stored(built, spec) is None
    engine = load_engine(built, spec, 1)
    try:
        t = capped.run("s", built, spec, engine)["traffic"]
    finally:
        engine.close()
        capped.release()
    first = heldout_examples(built.path)[: t["examples"]]
    assert 20 <= t["tokens"] < s["tokens"] and t["tokens"] == sum(ex.n_response for ex in first)
    assert t["max_tokens"] == 20 and evaluator.stored(built, spec) is None
    failures = gate_failures(records["s"], b.profiles["s"])
    assert len(failures) == 1 and "max_traffic_kl" in failures[0]
    rows = report.collect(b, evalset.sha256)
    table = report.markdown(rows)
    assert "traffic KL" in table and "distill+int8" in table and f"{s8['kl']:.4f}" in table
    assert "FAIL max_traffic_kl" in table
    assert report.plot(rows, tmp_path / "report.png").stat().st_size > 0


def test_traffic_gates_need_a_student() -> None:
    from shrinkserve.compression.profiles import ProfileSpec

    with pytest.raises(ValueError, match="max_traffic_kl: method 'gguf:q8_0' has no held-out traffic"):
        ProfileSpec.model_validate({"method": "gguf:q8_0", "gate": {"max_traffic_kl": 0.1}})


def test_the_distill_command_builds_summarizes_and_evaluates(setup, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    teacher_dir, data = setup
    profile = {k: v for k, v in _profile(data).items() if k != "device"}
    config = {"bases": {"tiny": {"source": str(teacher_dir)}}, "cache_dir": str(tmp_path / "cache"),
              "profiles": {"s": profile, "q": {"method": "gguf:q8_0"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "shrinkserve.server.cli", "distill", "--config", str(tmp_path / "config.yaml")]
    done = subprocess.run([*cmd, "s", "--device", "cpu", "--eval", "--max-tokens", "64", "--tasks", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "student: 4 of 6 layers" in out and "trained: " in out and "4 steps" in out and "on cpu" in out
    assert "held-out traffic vs teacher" in out
    wrong = subprocess.run([*cmd, "q"], capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and "is not a distillation" in wrong.stderr
