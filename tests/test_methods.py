"""The method registry and profile specs: options are validated by the method (meaningless ones rejected),
`then:` chains are checked, and cache keys change exactly when a recipe field, the data or a tool version
changes. Planning only: nothing is built here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.methods import MethodHandler, parse_method, registered
from shrinkserve.compression.methods import base as methods_base
from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hf-base"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (d / "model.safetensors").write_bytes(b"not really weights")
    return d


def builder(tmp_path: Path, profiles: dict[str, dict[str, Any]], hf_dir: Path | None = None) -> ProfileBuilder:
    bases = {"smollm2": BaseSpec()}
    if hf_dir is not None:
        bases["user"] = BaseSpec(source=str(hf_dir))
    return ProfileBuilder(ArtifactCache(tmp_path / "cache"), bases,
                          {n: ProfileSpec(**{"base": "smollm2", **p}) for n, p in profiles.items()}, threads=1)


def key_of(tmp_path: Path, profile: dict[str, Any], hf_dir: Path | None = None) -> str | None:
    return builder(tmp_path, {"p": profile}, hf_dir).key("p")


# ------------------------------------------------------------------ specs

@pytest.mark.parametrize(("profile", "message"), [
    ({"method": "gguf:q8_0", "group_size": 32}, "'group_size' means nothing for method 'gguf:q8_0'"),
    ({"method": "rtn", "calibration": {"samples": 4}}, "'calibration' means nothing for method 'rtn'"),
    ({"method": "int8", "group_size": 32}, "only apply with lm_head_bits: 4"),
    ({"method": "hf", "symmetric": True}, "'symmetric' means nothing for method 'hf'"),
    ({"method": "rtn", "path": __file__}, "'path' means nothing for method 'rtn'"),
    ({"method": "rtn", "then": "gguf:q8_0"}, "'gguf:q8_0' takes hf, but 'rtn' produces a quantized artifact"),
    ({"method": "gguf:f16", "then": "gguf:q8_0"}, "'gguf:q8_0' takes hf, but 'gguf:f16' produces a gguf artifact"),
    ({"method": "hf", "then": [{"method": "rtn", "bits": 3}]}, "then[0]: method 'rtn' has no option 'bits'"),
    ({"method": "hf", "then": [{"group_size": 32}]}, "then[0]: a step needs 'method'"),
    ({"method": "hf", "then": "gguf:q4_k_m", "engine": "torch"}, "'hf+gguf:q4_k_m' cannot run on engine 'torch'"),
    ({"method": "gguf:q9_x"}, "unknown method 'gguf:q9_x'"),
    ({"method": "gguf:file"}, "method 'gguf:file' needs 'path'"),
    # engine options that mean nothing for the profile's engine or device
    ({"method": "gguf:q8_0", "engine": "vllm"}, "'gguf:q8_0' cannot run on engine 'vllm'"),
    ({"method": "gguf:q8_0", "device": "cuda"}, "device: cuda means nothing for engine llamacpp"),
    ({"method": "hf", "vllm": {"enforce_eager": True}}, "'vllm' options only apply to engine: vllm"),
    ({"method": "hf", "engine": "vllm", "vllm": {"no_such_flag": 1}}, "no_such_flag"),
    ({"method": "hf", "engine": "vllm", "threads": 2}, "'threads' means nothing for engine vllm"),
    ({"method": "hf", "engine": "vllm", "context_length": 512, "vllm": {"max_model_len": 512}},
     "context length given twice"),
    ({"method": "hf", "engine": "vllm", "dtype": "float16", "vllm": {"dtype": "bfloat16"}}, "dtype given twice"),
    ({"method": "int8", "engine": "vllm", "device": "cpu"}, "vLLM-CPU has no 8-bit weight-only kernel"),
    ({"method": "rtn", "engine": "vllm", "device": "cpu", "lm_head_bits": 8}, "lm_head_bits: 8 (an 8-bit output"),
    ({"method": "hf", "then": [{"method": "awq", "lm_head_bits": 8}], "engine": "vllm", "device": "cpu"},
     "vLLM-CPU has no 8-bit weight-only kernel"),
    ({"method": "hf", "engine": "vllm", "device": "cpu", "vllm": {"gpu_memory_utilization": 0.8}},
     "gpu_memory_utilization means nothing with device: cpu"),
    ({"method": "hf", "engine": "vllm", "device": "cpu", "vllm": {"tensor_parallel_size": 2}}, "needs GPUs"),
    ({"method": "hf", "engine": "vllm", "device": "cuda", "vllm": {"cpu_kvcache_space_gib": 4}},
     "mean nothing with device: cuda"),
])
def test_meaningless_or_invalid_options_are_rejected(profile: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        ProfileSpec(**profile)
    assert message in str(info.value)


def test_vllm_profiles_default_to_a_dense_head_and_take_their_options() -> None:
    """vLLM keeps a tied head dense (and has no 8-bit kernel on CPU): unless lm_head_bits is given, the served
    step of an `engine: vllm` profile keeps it dense; an explicit value stays (checked against the device)."""
    assert ProfileSpec(method="awq", engine="vllm").recipe.lm_head_bits is None  # type: ignore[attr-defined]
    assert ProfileSpec(method="awq").recipe.lm_head_bits == 8  # type: ignore[attr-defined]
    assert ProfileSpec(method="rtn", engine="vllm", lm_head_bits=4).recipe.lm_head_bits == 4  # type: ignore[attr-defined]
    chained = ProfileSpec(method="hf", then=["rtn"], engine="vllm")
    assert chained.steps[-1].options.lm_head_bits is None  # type: ignore[attr-defined]
    gpu = ProfileSpec(method="int8", engine="vllm", device="cuda", vllm={"tensor_parallel_size": 2,
                                                                       "gpu_memory_utilization": 0.85})
    assert gpu.vllm is not None and gpu.vllm.tensor_parallel_size == 2
    assert gpu.vllm_8bit_weights() == "method int8 (8-bit linears)"
    assert ProfileSpec(method="hf", engine="vllm").vllm_8bit_weights() is None


def test_flat_yaml_keeps_its_attributes_and_chains_resolve() -> None:
    spec = ProfileSpec(method="RTN", group_size=32, symmetric=True, lm_head_bits=None, load="lazy", dtype="float32")
    assert (spec.method, spec.engine, spec.group_size, spec.symmetric, spec.lm_head_bits) == (
        "rtn", "torch", 32, True, None)
    assert spec.recipe.model_dump() == {"group_size": 32, "symmetric": True, "lm_head_bits": None}
    chain = ProfileSpec(method="hf", then="GGUF:Q8_0")
    assert (chain.pipeline, chain.engine, chain.method) == ("hf+gguf:q8_0", "llamacpp", "hf")
    chain = ProfileSpec(method="hf", then=["int8", {"method": "rtn", "group_size": 128}][1:])
    assert chain.pipeline == "hf+rtn" and chain.steps[1].options.group_size == 128  # type: ignore[attr-defined]
    head4 = ProfileSpec(method="int8", lm_head_bits=4)
    assert head4.recipe.model_dump() == {"lm_head_bits": 4, "group_size": 64, "symmetric": False}
    awq = ProfileSpec(method="awq", calibration={"samples": 8})
    assert awq.recipe.calibration.samples == 8  # type: ignore[attr-defined]


def test_every_registered_method_parses_and_names_itself() -> None:
    for name, handler in registered().items():
        assert isinstance(handler, MethodHandler) and handler.name == name
        assert handler.engines and handler.output in ("hf", "gguf", "quantized")
        for method in handler.method_names()[:3]:
            extra: dict[str, Any] = {"path": __file__} if method == "gguf:file" else {}
            if method == "distill":
                extra = {"data": {"synthetic": {"prompts": str(PROMPTS)}}}
            assert ProfileSpec(method=method, **extra).pipeline == method


# ------------------------------------------------------------------ cache keys

PROMPTS = Path(__file__).resolve().parents[1] / "compression" / "data" / "prompts" / "general.jsonl"

# For every option of every registered method: a profile and variations that must each change the key.
KEY_CASES: dict[str, tuple[dict[str, Any], dict[str, list[Any]]]] = {
    "hf": ({"method": "hf", "base": "user"}, {}),
    "int8": ({"method": "int8"}, {"lm_head_bits": [None, 4], "group_size": [], "symmetric": []}),
    "int8-head4": ({"method": "int8", "lm_head_bits": 4}, {"group_size": [32, 128], "symmetric": [True]}),
    "rtn": ({"method": "rtn"}, {"group_size": [32, 128], "symmetric": [True], "lm_head_bits": [None, 4]}),
    "prequantized": ({"method": "prequantized", "base": "user"}, {}),
    "awq": ({"method": "awq"}, {"group_size": [32], "symmetric": [True], "lm_head_bits": [None],
                                "calibration": [{"samples": 16}, {"seq_len": 128}]}),
    "gptq": ({"method": "gptq"}, {"group_size": [128], "symmetric": [True], "lm_head_bits": [4],
                                  "calibration": [{"samples": 8}]}),
    "gguf": ({"method": "gguf:q8_0"}, {"type": ["q4_k_m", "q4_0", "f16"]}),
    "gguf-imatrix": ({"method": "gguf:q4_k_m", "imatrix": {}}, {"imatrix": [
        None, {"max_tokens": 1024}, {"seq_len": 256}, {"source": "file", "path": __file__}]}),
    "gguf:file": ({"method": "gguf:file", "path": __file__}, {"path": []}),
    # device and checkpoint_every change how a student trains, not what: not in the key (tests/test_distill.py);
    # teacher_profile needs a second profile (tests/test_distill_method.py).
    "distill": ({"method": "distill", "data": {"synthetic": {"prompts": str(PROMPTS)}}}, {
        "student": [{"drop_layers": 5}, {"mlp_ratio": 0.5}], "loss": [{"kind": "topk"}, {"mix": 0.2}],
        "data": [{"synthetic": {"prompts": str(PROMPTS), "temperature": 0.5}},
                 {"synthetic": {"prompts": str(PROMPTS)}, "heldout_fraction": 0.2},
                 {"synthetic": {"prompts": str(PROMPTS.with_name("word_forms.train.jsonl"))}}],
        "budget": [{"tokens": 1000}], "optimizer": [{"lr": 1e-3}], "evaluation": [{"every": 10}], "seed": [1],
        "device": [], "checkpoint_every": [], "teacher_profile": []}),
}


def _vary(field: str, value: Any) -> dict[str, Any]:
    if field == "type":
        return {"method": f"gguf:{value}"}
    return {field: value}


def test_key_cases_cover_every_option_of_every_method() -> None:
    covered = {name.split("-")[0]: set(variations) for name, (_, variations) in KEY_CASES.items()}
    for name, handler in registered().items():
        assert name in covered, f"add method {name!r} to KEY_CASES"
        assert set(handler.Options.model_fields) <= covered[name] | {
            f for n, (_, v) in KEY_CASES.items() if n.startswith(name) for f in v}, name


@pytest.mark.parametrize("case", list(KEY_CASES))
def test_key_changes_with_each_recipe_field_and_nothing_else(tmp_path: Path, hf_dir: Path, case: str) -> None:
    profile, variations = KEY_CASES[case]
    if case == "gguf:file":
        assert key_of(tmp_path, profile, hf_dir) is None  # served as is: no artifact, no key
        return
    key = key_of(tmp_path, profile, hf_dir)
    if case in ("hf",):
        assert key is None  # an HF-directory base is served as is
    else:
        assert key is not None and key == key_of(tmp_path, profile, hf_dir)  # stable
    # Serving and runtime fields never change the artifact.
    same = [{"load": "lazy"}, {"max_concurrency": 4}, {"max_queue": 3}, {"threads": 1}, {"context_length": 256},
            {"gate": {"max_kl": 0.1}}, {"is_teacher": True}, {"capture": False}, {"device": "cpu"}]
    if "torch" in parse_method(profile["method"])[0].engines:
        same.append({"dtype": "float32"})
    for extra in same:
        assert key_of(tmp_path, {**profile, **extra}, hf_dir) == key, extra
    seen = {key}
    for field, values in variations.items():
        for value in values:
            varied = key_of(tmp_path, {**profile, **_vary(field, value)}, hf_dir)
            assert varied not in seen, (field, value)
            seen.add(varied)


def test_int8_with_a_4bit_head_keys_its_group_size(tmp_path: Path) -> None:
    """The drift of the old code: int8 + lm_head_bits 4 quantizes the head with group_size/symmetric, so two
    such profiles with different group sizes must not share an artifact."""
    a = key_of(tmp_path, {"method": "int8", "lm_head_bits": 4, "group_size": 32})
    b = key_of(tmp_path, {"method": "int8", "lm_head_bits": 4, "group_size": 64})
    c = key_of(tmp_path, {"method": "int8", "lm_head_bits": 4})
    assert a != b and b == c


@pytest.mark.parametrize(("method", "dist"), [("awq", "llmcompressor"), ("gptq", "compressed-tensors"),
                                              ("rtn", "torch"), ("rtn", "transformers"),
                                              ("gguf:q4_k_m", "llama_cpp_python")])
def test_key_changes_with_the_tool_that_computes_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, dist: str,
) -> None:
    before = key_of(tmp_path, {"method": method})
    real = methods_base.tool_version
    monkeypatch.setattr(methods_base, "tool_version", lambda d: "999.0" if d == dist else real(d))
    assert key_of(tmp_path, {"method": method}) != before


def test_key_changes_with_the_calibration_data_not_its_path(tmp_path: Path) -> None:
    data = tmp_path / "cal.txt"
    data.write_text("some calibration text " * 50)
    copy = tmp_path / "elsewhere.txt"
    copy.write_text(data.read_text())
    k1 = key_of(tmp_path, {"method": "gptq", "calibration": {"file": str(data)}})
    assert key_of(tmp_path, {"method": "gptq", "calibration": {"file": str(copy)}}) == k1
    assert key_of(tmp_path, {"method": "gptq"}) != k1  # the shipped set is other data
    data.write_text("other calibration text " * 50)
    assert key_of(tmp_path, {"method": "gptq", "calibration": {"file": str(data)}}) != k1


def test_key_changes_with_the_base_and_chains_share_artifacts(tmp_path: Path, hf_dir: Path) -> None:
    b = builder(tmp_path, {"direct": {"method": "gguf:q8_0", "base": "user"},
                           "chain": {"method": "hf", "base": "user", "then": "gguf:q8_0"},
                           "embedded": {"method": "gguf:q8_0"},
                           "rtn-chain": {"method": "hf", "base": "user", "then": "rtn"},
                           "rtn": {"method": "rtn", "base": "user"}}, hf_dir)
    assert b.key("direct") == b.key("chain")  # same content from the same input: one artifact
    assert b.key("rtn-chain") == b.key("rtn")
    assert b.key("embedded") != b.key("direct")
    before = b.key("direct")
    (hf_dir / "model.safetensors").write_bytes(b"other weights")
    assert builder(tmp_path, {"direct": {"method": "gguf:q8_0", "base": "user"}}, hf_dir).key("direct") != before


def test_status_is_typed_and_reads_like_the_old_dict(tmp_path: Path) -> None:
    b = builder(tmp_path, {"q": {"method": "gguf:q4_0"}, "f": {"method": "gguf:file", "path": __file__}})
    row = b.status("q")
    assert (row["state"], row.state, row["path"], row["key"]) == ("missing", "missing", None, b.key("q"))
    assert row.as_dict()["method"] == "gguf:q4_0"
    src = b.status("f")
    assert src["state"] == "source" and src["path"] == str(Path(__file__).resolve()) and src["bytes"] > 0


def test_prequantized_needs_a_checkpoint_base(tmp_path: Path) -> None:
    b = builder(tmp_path, {"p": {"method": "prequantized"}})
    assert b.status("p").state == "error"
    with pytest.raises(ValueError, match="needs a GPTQ/AWQ checkpoint directory"):
        b.build("p")


def test_engines_are_loaders_registered_by_name() -> None:
    from shrinkserve.compression.profiles import BuiltProfile
    from shrinkserve.server.engines import loader

    assert {"llamacpp", "torch"} <= set(loader.LOADERS)
    with pytest.raises(ValueError, match="registered twice"):
        loader.register_engine("torch")(loader.LOADERS["torch"])
    built = BuiltProfile(name="x", method="hf", engine="vllm", path=Path("x"), bytes=0, cache_hit=True,
                         build_seconds=0.0)
    with pytest.raises(ValueError, match=r"not an in-process engine.*registered: llamacpp, torch"):
        loader.load_engine(built, None, 2)  # type: ignore[arg-type]
