"""Distillation: losses against direct references, BI pruning, training lowers held-out KL, traffic scoring,
data adapters, cache keys and the cached prune → distil chain (tiny models; the real model runs in
scripts/bench_distill.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shrinkserve.compression.distill.data import (
    DistillExample,
    example_from_record,
    examples_digest,
    read_jsonl_records,
    split_heldout,
)
from shrinkserve.compression.distill.evaluate import TorchLogits, score_candidates
from shrinkserve.compression.distill.losses import TAIL_EPS, cross_entropy, forward_kl, token_losses, topk_tail_kl
from shrinkserve.compression.distill.prune import choose_dropped, narrowed_size, prune
from shrinkserve.compression.distill.train import TrainConfig, collate, heldout_loss, train
from shrinkserve.compression.scoring import chunked_logprobs
from tests.distill_helpers import VOCAB, sampled_examples, save_tiny_teacher, student_builder, tiny_teacher

# ------------------------------------------------------------------------------------------- losses


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _ref_topk_tail(student: np.ndarray, ids: np.ndarray, t_lp: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Direct float64 reference: build the (|S|+1)-bucket distributions explicitly and take their KL."""
    q = np.exp(_log_softmax64(student))
    out = np.zeros(len(student))
    for n in range(len(student)):
        s = [int(i) for i, v in zip(ids[n], valid[n], strict=True) if v]
        p = np.array([np.exp(float(t)) for t, v in zip(t_lp[n], valid[n], strict=True) if v])
        qs = q[n, s]
        p_tail, q_tail = 1.0 - p.sum(), 1.0 - qs.sum()
        kl = sum(pi * (np.log(pi) - np.log(qi)) for pi, qi in zip(p, qs, strict=True) if pi > 0)
        if p_tail > TAIL_EPS:
            kl += p_tail * (np.log(p_tail) - np.log(q_tail))
        out[n] = kl
    return out


def test_forward_kl_and_ce_match_float64_references() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 3, (16, 50)), rng.normal(0, 3, (16, 50))
    ps, pt = _log_softmax64(s), _log_softmax64(t)
    ref_kl = (np.exp(pt) * (pt - ps)).sum(axis=1)
    got = forward_kl(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, ref_kl, rtol=1e-4, atol=1e-5)
    targets = rng.integers(0, 50, 16)
    ce = cross_entropy(torch.tensor(s, dtype=torch.float32), torch.tensor(targets)).numpy()
    np.testing.assert_allclose(ce, -ps[np.arange(16), targets], rtol=1e-5, atol=1e-5)
    mixed = token_losses("kd", torch.tensor(s, dtype=torch.float32), torch.tensor(targets), mix=0.25,
                         teacher_logits=torch.tensor(t, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(mixed, 0.75 * ref_kl - 0.25 * ps[np.arange(16), targets], rtol=1e-4, atol=1e-5)


def test_topk_tail_kl_matches_the_bucket_reference_and_is_not_a_renormalised_topk() -> None:
    rng = np.random.default_rng(1)
    n, v, k = 24, 40, 6
    s, t = rng.normal(0, 2.5, (n, v)), rng.normal(0, 2.5, (n, v))
    pt = _log_softmax64(t)
    ids = np.argsort(-pt, axis=1)[:, :k]
    t_lp = np.take_along_axis(pt, ids, axis=1)
    valid = np.ones((n, k), dtype=bool)
    valid[::3, 4:] = False  # rows with fewer recorded entries (padding)
    got = topk_tail_kl(torch.tensor(s, dtype=torch.float32), torch.tensor(ids), torch.tensor(t_lp, dtype=torch.float32),
                       torch.tensor(valid)).numpy()
    np.testing.assert_allclose(got, _ref_topk_tail(s, ids, t_lp, valid), rtol=1e-4, atol=1e-5)

    # A renormalised top-k KL ignores the tail: it is a different (wrong) number here.
    ps = _log_softmax64(s)
    renorm = []
    for r in range(n):
        p = np.exp(t_lp[r]) / np.exp(t_lp[r]).sum()
        q = np.exp(ps[r, ids[r]]) / np.exp(ps[r, ids[r]]).sum()
        renorm.append((p * np.log(p / q)).sum())
    assert not np.allclose(got[1::3], np.array(renorm)[1::3], rtol=1e-2)

    # With every id recorded the tail is empty and the loss is the full KL.
    all_ids = np.argsort(-pt, axis=1)
    full = topk_tail_kl(torch.tensor(s, dtype=torch.float32), torch.tensor(all_ids),
                        torch.tensor(np.take_along_axis(pt, all_ids, axis=1), dtype=torch.float32)).numpy()
    np.testing.assert_allclose(full, (np.exp(pt) * (pt - ps)).sum(axis=1), rtol=1e-4, atol=1e-5)


def test_topk_tail_kl_gradient_is_finite_when_the_teacher_tail_is_zero() -> None:
    s = torch.randn(4, 10, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    t_lp = torch.log(torch.tensor([[0.5, 0.5], [1.0, 1e-30], [0.9, 0.1], [0.7, 0.3]]))
    loss = topk_tail_kl(s, ids, t_lp).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_collate_adds_the_sampled_token_outside_the_topk_as_a_known_bucket() -> None:
    ex = DistillExample(np.array([5, 6, 7, 8, 9]), 2, np.array([[7, 1], [3, 4], [9, 2]]),
                        np.log(np.array([[0.6, 0.2], [0.5, 0.1], [0.9, 0.05]], dtype=np.float32)),
                        np.log(np.array([0.6, 0.02, 0.9], dtype=np.float32)))
    b = collate([ex], want_topk=True, include_sampled=True)
    assert b.cols.tolist() == [1, 2, 3] and b.targets.tolist() == [7, 8, 9]
    assert b.topk_ids is not None and b.topk_valid is not None and b.topk_logprobs is not None
    # token 8 was sampled outside its top-2: it becomes a third known category with its own logprob
    assert b.topk_ids[1].tolist() == [3, 4, 8] and b.topk_valid[1].tolist() == [True, True, True]
    assert b.topk_valid[0].tolist() == [True, True, False] and b.topk_valid[2].tolist() == [True, True, False]
    assert float(b.topk_logprobs[1, 2].exp()) == pytest.approx(0.02, rel=1e-5)


# ------------------------------------------------------------------------------------------ pruning


def _make_identity(model: torch.nn.Module, layer: int) -> None:
    """A decoder layer whose attention and MLP add nothing: out == in, so its BI is exactly 0."""
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight.zero_()
        model.model.layers[layer].mlp.down_proj.weight.zero_()


def test_block_influence_drops_the_lowest_layers_but_never_the_first_or_last(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    teacher = tiny_teacher(layers=8)
    for i in (0, 3, 5, 7):
        _make_identity(teacher, i)
    calib = [list(range(3, 20)), list(range(10, 40))]
    student, res = prune(teacher, calib, drop_layers=2)
    assert res.block_influence[0] == pytest.approx(0.0, abs=1e-6)
    assert res.dropped_layers == [3, 5]  # zero-BI middle layers; 0 and 7 (also zero) are kept
    assert res.kept_layers == [0, 1, 2, 4, 6, 7]
    assert choose_dropped(res.block_influence, 2) == [3, 5]
    # the dropped layers were identities: the student computes exactly what the teacher does
    ids = torch.tensor([calib[1]])
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # n_layers is the other way to say it; too many layers to drop is refused
    assert prune(teacher, calib, n_layers=6)[1].dropped_layers == [3, 5]
    with pytest.raises(ValueError, match=r"can drop 0\.\.6 of 8 layers \(first and last are kept\), asked 7"):
        prune(teacher, calib, drop_layers=7)

    student.save_pretrained(tmp_path / "s")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert loaded.config.num_hidden_layers == 6 and len(loaded.model.layers) == 6
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, teacher(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # KV-cache bookkeeping follows the new numbering (generation works through the cache)
    out = loaded.generate(input_ids=ids[:, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_mlp_narrowing_keeps_the_channels_that_matter() -> None:
    teacher = tiny_teacher(layers=4, intermediate_size=64)
    dead = torch.arange(0, 64, 2)  # half the channels write nothing to the residual stream
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0
    calib = [list(range(3, 30))]
    student, res = prune(teacher, calib, drop_layers=0, mlp_ratio=0.5, mlp_multiple=8)
    assert res.intermediate_after == 32 and student.config.intermediate_size == 32
    assert res.parameters_after < res.parameters_before
    ids = torch.tensor(calib)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # to the nearest multiple: 1075 → 1024 (down), 1229 → 1280 (up)
    assert narrowed_size(1536, 0.7, 256) == 1024 and narrowed_size(1536, 0.8, 256) == 1280
    assert narrowed_size(1536, 1.0, 256) == 1536 and narrowed_size(1536, 0.01, 256) == 256


# ----------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def teacher_and_data() -> tuple[torch.nn.Module, list[DistillExample], list[DistillExample]]:
    torch.set_num_threads(1)
    teacher = tiny_teacher(layers=6)
    data = sampled_examples(teacher, 240, seed=0)
    return teacher, data[:200], data[200:]


def test_a_few_steps_of_distillation_lower_heldout_kl_below_the_pruned_init(teacher_and_data) -> None:
    teacher, train_ex, held = teacher_and_data
    final = {}
    for loss in ("kd", "topk", "ce"):
        student, _ = prune(teacher, [ex.ids for ex in train_ex[:8]], drop_layers=2)
        cfg = TrainConfig(loss=loss, steps=30, batch=8, lr=1e-3, warmup_steps=2, eval_every=10, eval_examples=40,
                          patience=0, seed=0)
        before = heldout_loss(student, held, "kl", teacher=teacher)
        result = train(student, train_ex, held, cfg, teacher=teacher, progress=False)
        final[loss] = after = heldout_loss(student, held, "kl", teacher=teacher)
        assert result.evals[0]["kl"] == pytest.approx(before)
        assert result.steps == 30 and result.stop_reason == "steps" and result.eval_metric == "kl"
        assert result.tokens == 30 * 8 * 12 == result.history[-1]["tokens"]
        assert after == pytest.approx(result.best_eval) and after < before, (loss, result.evals)
        if loss != "ce":  # matching distributions: clearly better than the pruned init after 30 steps
            assert after < 0.9 * before, (loss, result.evals)
    # on these 2400 tokens hard labels (the sampled tokens) carry less than the teacher's distributions
    assert final["kd"] < final["ce"] and final["topk"] < final["ce"], final


def test_budgets_and_early_stop(teacher_and_data) -> None:
    teacher, train_ex, held = teacher_and_data
    student, _ = prune(teacher, [ex.ids for ex in train_ex[:8]], drop_layers=2)
    r = train(student, train_ex, held, TrainConfig(loss="topk", tokens=100, batch=4, eval_every=100), progress=False)
    assert r.stop_reason == "tokens" and 100 <= r.tokens < 100 + 4 * 12 and r.eval_metric == "topk_kl"
    # a learning rate that only makes things worse: held-out KL never improves, training stops and returns the
    # best (= initial) weights
    student, _ = prune(teacher, [ex.ids for ex in train_ex[:8]], drop_layers=2)
    init = {k: v.clone() for k, v in student.state_dict().items()}
    r = train(student, train_ex, held, TrainConfig(loss="kd", steps=50, batch=8, lr=5.0, warmup_steps=0,
                                                   eval_every=1, patience=2, grad_clip=None), teacher=teacher,
              progress=False)
    assert r.stop_reason == "early_stop" and r.steps == 2 and r.best_step == 0
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, init[k])
    with pytest.raises(ValueError, match="budget"):
        TrainConfig(loss="kd")
    with pytest.raises(ValueError, match="teacher"):
        train(student, train_ex, held, TrainConfig(loss="kd", steps=1), progress=False)


def test_training_is_deterministic_for_a_seed(teacher_and_data) -> None:
    teacher, train_ex, held = teacher_and_data
    curves = []
    for seed in (0, 0, 1):
        student, _ = prune(teacher, [ex.ids for ex in train_ex[:8]], drop_layers=2)
        r = train(student, train_ex, held, TrainConfig(loss="kd", steps=4, batch=4, eval_every=10, seed=seed),
                  teacher=teacher, progress=False)
        curves.append([row["loss"] for row in r.history])
    assert curves[0] == curves[1] and curves[0] != curves[2]


# ------------------------------------------------------------------------------------------ scoring


def test_scoring_on_traffic_against_the_teacher(teacher_and_data) -> None:
    teacher, train_ex, held = teacher_and_data
    student, _ = prune(teacher, [ex.ids for ex in train_ex[:8]], drop_layers=2)
    t_eng, s_eng = TorchLogits(teacher, max_batch=7), TorchLogits(student, max_batch=7)
    scores = score_candidates({"teacher": t_eng, "student": s_eng}, held, teacher=t_eng)
    assert scores["teacher"]["kl"] == pytest.approx(0.0, abs=1e-6) and scores["teacher"]["top1"] == 1.0
    s = scores["student"]
    assert s["tokens"] == sum(ex.n_response for ex in held) and s["examples"] == len(held)
    # the same KL as the training loop's held-out measurement (same positions, same definition)
    assert s["kl"] > 0
    assert s["kl"] == pytest.approx(heldout_loss(student, held, "kl", teacher=teacher), rel=1e-4)
    # top-1 agreement and the hardest tenth (highest teacher entropy), computed directly on the response tokens
    kl, agree, entropy = [], [], []
    with torch.no_grad():
        for ex in held:
            ids, rows = torch.from_numpy(ex.ids)[None], slice(ex.response_start - 1, len(ex.ids) - 1)
            t_lp = torch.log_softmax(teacher(input_ids=ids).logits[0, rows].double(), -1)
            s_lp = torch.log_softmax(student(input_ids=ids).logits[0, rows].double(), -1)
            kl.append((t_lp.exp() * (t_lp - s_lp)).sum(-1).numpy())
            agree.append((t_lp.argmax(-1) == s_lp.argmax(-1)).numpy())
            entropy.append(-(t_lp.exp() * t_lp).sum(-1).numpy())
    kl_all, agree_all, entropy_all = np.concatenate(kl), np.concatenate(agree), np.concatenate(entropy)
    hard = np.argsort(-entropy_all)[: len(entropy_all) // 10]
    assert s["top1"] == pytest.approx(agree_all.mean()) and 0 < s["top1"] < 1
    assert s["kl_hard10"] == pytest.approx(kl_all[hard].mean(), rel=1e-4)
    assert s["top1_hard10"] == pytest.approx(agree_all[hard].mean())
    # chunked feeding gives the full-sequence logprobs
    lp = chunked_logprobs(t_eng.new_sequence(), held[0].ids, 3)
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=torch.from_numpy(held[0].ids)[None]).logits[0].double(), -1).numpy()
    np.testing.assert_allclose(lp, full[:-1], rtol=1e-4, atol=1e-4)
    # without a teacher engine the records stand in (top-k + tail), and say so
    rec = score_candidates({"student": s_eng}, held)["student"]
    assert rec["teacher"] == "records" and rec["kl"] < s["kl"] and rec["tokens"] == s["tokens"]


# --------------------------------------------------------------------------------------------- data


def test_record_adapter_reads_capture_fields_objects_and_the_old_jsonl(tmp_path: Path) -> None:
    rec = {"teacher": {"vocab_size": VOCAB}, "prompt_ids": [5, 6], "completion_ids": [7, 2],
           "topk_ids": [[7, 1], [2, 3]], "topk_logprobs": [[-0.1, -3.0], [-0.2, -2.0]],
           "sampled_logprobs": [-0.1, -0.2]}
    ex = example_from_record(rec, vocab_size=VOCAB)
    assert ex.ids.tolist() == [5, 6, 7, 2] and ex.response_start == 2 and ex.topk_ids.shape == (2, 2)
    obj = SimpleNamespace(**{**rec, "teacher": SimpleNamespace(vocab_size=VOCAB),
                             "sampled_logprobs": np.array([np.nan, np.nan], dtype=np.float32)})
    ex2 = example_from_record(obj, vocab_size=VOCAB)
    assert ex2.sampled_logprobs is None and np.array_equal(ex2.topk_ids, ex.topk_ids)
    with pytest.raises(ValueError, match="vocab_size"):
        example_from_record(rec, vocab_size=VOCAB + 1)
    old = {"prompt_ids": [5, 6], "completion_ids": [7], "teacher_topk": [[[7, -0.1], [1, -3.0]]], "text": "x"}
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(old) + "\n" + json.dumps(rec) + "\n" + '{"prompt_ids": [1, 2], "compl')  # torn tail
    got = [example_from_record(r) for r in read_jsonl_records([path])]
    assert len(got) == 2 and got[0].topk_ids.tolist() == [[7, 1]] and got[0].sampled_logprobs is None


def test_heldout_split_is_by_prompt_and_stable() -> None:
    exs = [DistillExample(np.array([3 + i % 10, 4, 5, 6]), 2) for i in range(200)]  # 10 distinct prompts
    train, held = split_heldout(exs, 0.3, seed=0)
    assert {e.prompt_digest() for e in train}.isdisjoint({e.prompt_digest() for e in held})
    assert len(train) + len(held) == 200 and held
    again = split_heldout(list(reversed(exs)), 0.3, seed=0)[1]
    assert sorted(e.prompt_digest() for e in again) == sorted(e.prompt_digest() for e in held)
    assert examples_digest(exs[:3]) != examples_digest(exs[1:4])


# ------------------------------------------------------------------------------- options and cache


def _write_records(path: Path, examples: list[DistillExample]) -> Path:
    from shrinkserve.compression.distill.pipeline import write_examples

    write_examples(examples, path)
    return path


def _profile(records: Path, **kw: object) -> dict:
    """A `method: distill` profile of the tiny teacher (the options are validated by the registry)."""
    base = {"method": "distill", "data": {"capture": [str(records)], "heldout_fraction": 0.2},
            "student": {"drop_layers": 2, "calibration_samples": 8},
            "budget": {"steps": 10, "tokens": None, "seconds": None},
            "optimizer": {"batch": 8, "lr": 1e-3, "warmup_steps": 1},
            "evaluation": {"every": 5, "patience": 0}, "checkpoint_every": 2, "device": "cpu"}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def _options(records: Path, **kw: object):
    from shrinkserve.compression.distill.options import DistillOptions

    return DistillOptions.model_validate({k: v for k, v in _profile(records, **kw).items() if k != "method"})


def test_student_key_changes_with_recipe_data_and_tools_but_not_with_device(tmp_path: Path, teacher_and_data,
                                                                           monkeypatch) -> None:
    from shrinkserve.compression.distill.method import Distill

    _, train_ex, _ = teacher_and_data
    teacher_dir = save_tiny_teacher(tmp_path / "teacher")
    other_teacher = save_tiny_teacher(tmp_path / "other-teacher", seed=1)
    data = _write_records(tmp_path / "a.jsonl", train_ex)

    def key(records: Path = data, teacher: Path = teacher_dir, **kw: object) -> str:
        return student_builder(tmp_path / "cache", teacher, {"p": _profile(records, **kw)}).key("p")

    k = key()
    assert key() == k
    assert key(device="auto", checkpoint_every=7, load="eager") == k
    changed = [
        dict(loss={"kind": "topk"}), dict(loss={"mix": 0.1}), dict(seed=1), dict(student={"drop_layers": 3}),
        dict(student={"mlp_ratio": 0.5}), dict(optimizer={"lr": 2e-3}), dict(budget={"steps": 11}),
        dict(data={"heldout_fraction": 0.3}), dict(evaluation={"patience": 2}),
    ]
    keys = {key(**c) for c in changed}
    assert k not in keys and len(keys) == len(changed)
    assert key(teacher=other_teacher) != k
    data2 = _write_records(tmp_path / "b.jsonl", train_ex[:-1])
    assert key(records=data2) != k
    monkeypatch.setattr(Distill, "tool_constants", {"shrinkserve_distill": "999"})
    assert key() != k
    monkeypatch.undo()
    # the pruned init does not depend on the loss: two students of one shape share it
    b = student_builder(tmp_path / "cache", teacher_dir, {"ce": _profile(data, loss={"kind": "ce"}),
                                                          "kd": _profile(data)})
    assert b.plan("ce").node.deps["student_init"].key == b.plan("kd").node.deps["student_init"].key
    with pytest.raises(ValueError, match="not both"):
        _options(data, student={"n_layers": 4})
    with pytest.raises(ValueError, match="needs data"):
        _options(data, data={"capture": []})


def test_prune_then_distill_through_the_cache(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from shrinkserve.compression.distill import pipeline

    teacher_dir = save_tiny_teacher(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    data = _write_records(tmp_path / "data.jsonl", sampled_examples(teacher, 240, seed=3))
    builder = student_builder(tmp_path / "cache", teacher_dir, {"s": _profile(data)})
    built = builder.build("s")
    assert not built.cache_hit
    extra = built.manifest["extra"]
    assert extra["steps"] == 10 and extra["stop_reason"] == "steps" and extra["device"] == "cpu"
    assert extra["prune"]["dropped_layers"] and len(extra["prune"]["block_influence"]) == 6
    assert extra["heldout_best"] < extra["heldout_initial"]
    student = AutoModelForCausalLM.from_pretrained(built.path)
    assert student.config.num_hidden_layers == 4
    held = pipeline.heldout_examples(built.path)
    assert len(held) == extra["heldout_examples"] > 0
    assert built.key is not None and not builder.cache.work_dir(built.key).exists()  # checkpoints went
    again = builder.build("s")
    assert again.cache_hit and again.key == built.key
    text = pipeline.summary(extra)
    assert "4 of 6 layers" in text and "10 steps" in text and "pruned →" in text


def test_synthetic_teacher_data_feeds_the_chain(tmp_path: Path) -> None:
    from shrinkserve.compression.distill import pipeline

    teacher_dir = save_tiny_teacher(tmp_path / "teacher")
    rng = np.random.default_rng(0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(" ".join(f"t{i}" for i in rng.integers(4, VOCAB, 4)) + "\n" for _ in range(40)))
    profile = {
        "method": "distill",
        "data": {"synthetic": {"prompts": str(prompts), "max_tokens": 8, "top_k": 5}, "heldout_fraction": 0.2},
        "student": {"drop_layers": 2, "calibration_samples": 4}, "loss": {"kind": "topk"},
        "budget": {"steps": 3, "tokens": None, "seconds": None}, "evaluation": {"every": 3}, "device": "cpu"}
    builder = student_builder(tmp_path / "cache", teacher_dir, {"s": profile})
    built = builder.build("s")
    data_node = builder.plan("s").node.deps["synthetic"]
    data = builder.cache.lookup(data_node.key)
    assert data is not None and data.manifest["extra"]["records"] == 40
    records = list(pipeline.read_records([data.path / pipeline.RECORDS_DIR]))
    assert len(records) == 40
    ex = example_from_record(records[0], vocab_size=VOCAB)
    assert 1 <= ex.n_response <= 8 and ex.topk_ids.shape == (ex.n_response, 5) and ex.sampled_logprobs is not None
    extra = built.manifest["extra"]
    assert extra["train_examples"] + extra["heldout_examples"] == 40 and extra["steps"] == 3
