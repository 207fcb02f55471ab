"""GGUF export of HF checkpoints (compression/gguf_export.py) and `then:` chains through the method registry.

The default model's own HF checkpoint, exported to F16 GGUF, must give llama.cpp the same tokens, the same
greedy text and near-identical logits as the HF model in torch float32; a pruned and narrowed student must
convert and load the same way; a method producing an HF checkpoint chains into GGUF and RTN profiles.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.methods import ArtifactKind, BuildJob, MethodHandler, MethodOptions, register_method
from shrinkserve.compression.methods.base import unregister_method
from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec

CHAT = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]


@pytest.fixture(scope="module")
def base_hf(cache_dir: Path) -> Path:
    """The default model's float32 HF checkpoint (materialized once into the session cache)."""
    b = ProfileBuilder(ArtifactCache(cache_dir), {"smollm2": BaseSpec()}, {"hf": ProfileSpec(method="hf")}, threads=2)
    return b.build("hf").path


def hf_model(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def chat_ids(tok: Any) -> list[int]:
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def torch_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def torch_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import DynamicCache

    from shrinkserve.compression.synthetic import cache_kwarg

    cache = {cache_kwarg(model): DynamicCache(config=model.config)}
    out, step = [], list(ids)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([step]), use_cache=True, **cache).logits[0, -1]
            step = [int(torch.argmax(logits))]
            out.append(step[0])
    return out


class Llama:
    """llama.cpp on a GGUF file, flash attention off (float32 attention sums, the closest to transformers)."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        from shrinkserve.compression.gguf import quiet_llama_cpp

        quiet_llama_cpp()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, n_threads=2,
                                   flash_attn=False, verbose=False)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval(out[-1:])
        return out

    def close(self) -> None:
        self.llm.close()


def top1_agreement(gguf: Path, hf_dir: Path) -> float:
    """How often llama.cpp on `gguf` and transformers on `hf_dir` (float32) pick the same next token, teacher
    forced over ~500 tokens of held-out prose."""
    from shrinkserve.compression.quality import EvalSet

    tok, model = hf_model(hf_dir)
    ids = list(tok(EvalSet.load().text[:2500], add_special_tokens=False)["input_ids"])[:500]
    llama = Llama(gguf)
    try:
        ours = llama.logits(ids).argmax(-1)
    finally:
        llama.close()
    return float((ours == torch_logits(model, ids).argmax(-1)).mean())


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def assert_same_model(hf_dir: Path, gguf: Path, *, greedy: int = 20) -> None:
    tok, model = hf_model(hf_dir)
    llama = Llama(gguf)
    try:
        prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        ids = chat_ids(tok)
        assert llama.tokenize(prompt) == ids  # the chat prompt, special tokens parsed, tokenizes the same
        out = torch_greedy(model, ids, greedy)
        assert llama.greedy(ids, greedy) == out, tok.decode(out)
        full = ids + out
        ref, ours = log_softmax(torch_logits(model, full)), log_softmax(llama.logits(full))
        kl = (np.exp(ref) * (ref - ours)).sum(-1)
        # F16 weights against float32: measured mean KL 9e-6, max |Δlogit| 0.09 on the default model.
        assert kl.mean() < 1e-3 and kl.max() < 1e-2, (kl.mean(), kl.max())
        assert (ref.argmax(-1) == ours.argmax(-1)).mean() >= 0.97
    finally:
        llama.close()


@pytest.mark.slow
def test_export_of_the_default_model_matches_torch(base_hf: Path, cache_dir: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    b = ProfileBuilder(ArtifactCache(cache_dir), {"user": BaseSpec(source=str(base_hf))},
                       {"f16": ProfileSpec(method="gguf:f16")}, threads=2)
    built = b.build("f16")
    assert built.path.name == "model-f16.gguf" and built.manifest["recipe"] == {"kind": "gguf-export", "type": "f16"}
    assert built.manifest["extra"]["tokenizer_pre"] == "smollm"
    fields = GGUFReader(built.path).fields
    value = {k: fields[k].contents() for k in ("general.architecture", "llama.block_count", "tokenizer.ggml.pre",
                                                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")}
    tok, _ = hf_model(base_hf)
    assert value == {"general.architecture": "llama", "llama.block_count": 30, "tokenizer.ggml.pre": "smollm",
                     "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                     "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": tok.chat_template}
    assert len(fields["tokenizer.ggml.merges"].contents()) == 48900
    assert_same_model(base_hf, built.path, greedy=24)


# ------------------------------------------------------------------ a pruned student, and chains


def prune(src: Path, out: Path, keep: list[int], ffn: int | None) -> dict[str, Any]:
    """A student: the layers `keep` of `src`, with the MLP narrowed to its first `ffn` channels."""
    import torch

    tok, model = hf_model(src)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
        if ffn is not None:
            mlp = layer.mlp
            for name in ("gate_proj", "up_proj"):
                lin = getattr(mlp, name)
                new = torch.nn.Linear(lin.in_features, ffn, bias=False)
                new.weight.data = lin.weight.data[:ffn].clone()
                setattr(mlp, name, new)
            down = torch.nn.Linear(ffn, mlp.down_proj.out_features, bias=False)
            down.weight.data = mlp.down_proj.weight.data[:, :ffn].clone()
            mlp.down_proj = down
    model.config.num_hidden_layers = len(keep)
    if ffn is not None:
        model.config.intermediate_size = ffn
    if hasattr(model.config, "layer_types") and model.config.layer_types is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"kept_layers": keep}


@pytest.mark.slow
def test_a_pruned_and_narrowed_student_converts_and_loads(base_hf: Path, tmp_path: Path) -> None:
    from shrinkserve.compression.gguf_export import export_hf_to_gguf

    student = tmp_path / "student"
    prune(base_hf, student, keep=[0, 1, 2, 29], ffn=768)
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 4
    facts = export_hf_to_gguf(student, tmp_path / "student.gguf")
    assert facts["tensors"] == 2 + 4 * 9  # embeddings + final norm, 9 tensors per layer, tied lm_head
    assert_same_model(student, tmp_path / "student.gguf", greedy=12)


class PruneOptions(MethodOptions):
    keep: list[int]
    ffn: int | None = None


class TestPrune(MethodHandler):
    """A stand-in for distillation: any method whose output is an HF checkpoint directory."""

    Options = PruneOptions
    engines = ("torch",)
    output: ClassVar[ArtifactKind] = "hf"
    tools = ("torch", "transformers")
    builds: ClassVar[list[str]] = []

    def build(self, opts: MethodOptions, job: BuildJob) -> dict[str, Any]:
        assert isinstance(opts, PruneOptions)
        TestPrune.builds.append(job.profile)
        return prune(job.inputs["model"], job.out, opts.keep, opts.ffn)


@pytest.fixture
def test_prune() -> Iterator[type[TestPrune]]:
    register_method("test-prune")(TestPrune)
    TestPrune.builds.clear()
    yield TestPrune
    unregister_method("test-prune")


@pytest.mark.slow
def test_then_chains_build_and_load(test_prune: type[TestPrune], base_hf: Path, cache_dir: Path) -> None:
    student = {"method": "test-prune", "keep": [0, 1, 29], "ffn": 512}
    profiles = {
        "student": ProfileSpec(**student),
        "student-q8": ProfileSpec(**student, then="gguf:q8_0"),
        "student-rtn": ProfileSpec(**student, then=[{"method": "rtn", "group_size": 32}]),
        "hf-base-q4": ProfileSpec(method="gguf:q4_k_m", base="user"),
    }
    assert profiles["student-q8"].pipeline == "test-prune+gguf:q8_0" and profiles["student-q8"].engine == "llamacpp"
    bases = {"smollm2": BaseSpec(), "user": BaseSpec(source=str(base_hf))}
    b = ProfileBuilder(ArtifactCache(cache_dir), bases, profiles, threads=2)
    q8 = b.build("student-q8")
    assert q8.path.name == "model-q8_0.gguf" and not q8.cache_hit and test_prune.builds == ["student-q8"]
    assert q8.manifest["name"] == "smollm2/test-prune+q8_0"
    # The student itself and its RTN quantization reuse the cached student: it is built once.
    own = b.build("student")
    assert own.cache_hit and json.loads((own.path / "config.json").read_text())["num_hidden_layers"] == 3
    # The Q8_0 GGUF is that student (not the base, not noise): it picks the student's next token.
    assert top1_agreement(q8.path, own.path) > 0.9
    rtn = b.build("student-rtn")
    assert test_prune.builds == ["student-q8"]
    # weight-only artifacts are compressed-tensors pack-quantized checkpoints (what vLLM serves as is)
    groups = json.loads((rtn.path / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["weights"]["group_size"] for g in groups.values() if g["weights"]["num_bits"] == 4} == {32}
    from shrinkserve.server.engines.torch_engine import TorchEngine

    engine = TorchEngine(rtn.path, threads=2, dtype="float32")
    try:
        seq = engine.new_sequence()
        assert seq.forward(chat_ids(engine.tokenizer), all_logits=False).shape == (1, 49152)
    finally:
        engine.close()
    # A second build of the whole chain is a cache hit that touches nothing upstream.
    again = b.build("student-q8")
    assert again.cache_hit and again.path == q8.path and test_prune.builds == ["student-q8"]
    status = b.status("student-q8")
    assert status.state == "cached" and status.method == "test-prune+gguf:q8_0"
    # GGUF profiles now derive from a user's HF-directory base (rejected before).
    q4 = b.build("hf-base-q4")
    assert q4.path.name == "model-q4_k_m.gguf" and q4.manifest["name"] == "user/q4_k_m"
    assert top1_agreement(q4.path, base_hf) > 0.75  # Q4_K_M of the default model: ~0.88 on held-out prose
