"""The quantized checkpoint format and the GPTQ/AWQ importer, on tensors with known codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shrinkserve.compression.compressed_tensors import is_compressed_tensors_checkpoint, load_weight_only
from shrinkserve.compression.prequantized import import_prequantized
from shrinkserve.compression.quant_format import (
    QuantizedLinear,
    _pack4,
    _unpack4,
    load_quantized_checkpoint,
    save_quantized_checkpoint,
)

N, K, G = 16, 64, 32


def _codes(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = torch.rand(N, K // G, generator=gen) + 0.01
    zeros = torch.randint(0, 16, (N, K // G), generator=gen).float()
    return q, scales, zeros


def test_nibble_packing_round_trips_and_halves_the_bytes() -> None:
    q, _, _ = _codes(0)
    packed = _pack4(q)
    assert packed.numel() == q.numel() // 2
    assert torch.equal(_unpack4(packed), q)
    assert packed[0, 0] == (q[0, 0] | (q[0, 1] << 4))  # low nibble = even column


def test_checkpoint_save_load_keeps_codes_and_dense_tensors(tmp_path: Path) -> None:
    q, s, z = _codes(1)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    dense = {"model.norm.weight": torch.ones(8, dtype=torch.bfloat16)}
    ql4 = QuantizedLinear(4, q, s, z, G)
    ql8 = QuantizedLinear(8, torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N))
    save_quantized_checkpoint(out, src, dense, {"a.q": ql4, "lm_head": ql8}, {"method": "rtn"})
    meta, dense2, quantized = load_quantized_checkpoint(out)
    assert meta["method"] == "rtn" and set(meta["modules"]) == {"a.q", "lm_head"}
    assert torch.equal(dense2["model.norm.weight"], dense["model.norm.weight"])
    assert torch.equal(quantized["a.q"].codes, q) and torch.equal(quantized["lm_head"].codes, ql8.codes)
    assert torch.allclose(quantized["a.q"].dequantize(), ql4.dequantize())
    w = ql4.dequantize()
    assert torch.allclose(w[3, 40], (q[3, 40].float() - z[3, 1]) * s[3, 1])


# Independent packers written from the formats' descriptions, to check the importer's unpacking.


def _gptq_pack(q_kn: torch.Tensor) -> torch.Tensor:  # [K, N] codes → [K/8, N] int32, along K
    words = torch.zeros(q_kn.shape[0] // 8, q_kn.shape[1], dtype=torch.int64)
    for j in range(8):
        words |= q_kn[j::8].long() << (4 * j)
    return words.to(torch.int64).apply_(lambda v: v - (1 << 32) if v >= (1 << 31) else v).to(torch.int32)


def _col_pack(v: torch.Tensor, order: list[int]) -> torch.Tensor:  # [R, C] → [R, C/8] along columns
    words = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for slot, col in enumerate(order):
        words |= v[:, col::8].long() << (4 * slot)
    return words.apply_(lambda x: x - (1 << 32) if x >= (1 << 31) else x).to(torch.int32)


def _write_source(tmp_path: Path, tensors: dict[str, torch.Tensor], qc: dict) -> Path:
    src = tmp_path / "prequant"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    tensors["model.norm.weight"] = torch.ones(4)
    save_file(tensors, str(src / "model.safetensors"))
    return src


@pytest.mark.parametrize("v2", [False, True])
def test_gptq_import_recovers_codes_scales_and_zeros(tmp_path: Path, v2: bool) -> None:
    q, s, z = _codes(2)
    stored_zeros = z.t() - (0 if v2 else 1)  # v1 stores zero - 1
    tensors = {
        "layer.qweight": _gptq_pack(q.t().contiguous()),
        "layer.qzeros": _col_pack(stored_zeros.clamp(min=0), list(range(8))),
        "layer.scales": s.t().contiguous().half(),
        "layer.g_idx": torch.arange(K, dtype=torch.int32) // G,
    }
    qc = {"quant_method": "gptq", "bits": 4, "group_size": G, "sym": False}
    if v2:
        qc["checkpoint_format"] = "gptq_v2"
    out = tmp_path / "out"
    out.mkdir()
    import_prequantized(_write_source(tmp_path, tensors, qc), out)
    _, dense, quantized = load_weight_only(out)
    got = quantized["layer"]
    assert torch.equal(got.codes, q)
    expected_z = stored_zeros.clamp(min=0).t() + (0 if v2 else 1)
    assert torch.equal(got.zeros, expected_z.float())
    assert torch.allclose(got.scales, s.half().float())
    assert set(dense) == {"model.norm.weight"}
    # Stored as compressed-tensors: the source's GPTQ config is replaced by the pack-quantized one.
    assert is_compressed_tensors_checkpoint(out)


def test_gptq_v1_zero_of_16_keeps_our_own_format(tmp_path: Path) -> None:
    """A v1 stored zero of 15 reads back as 16: no pack-quantized form, so the import keeps our format (still
    served by the PyTorch engine) instead of failing."""
    q, s, z = _codes(5)
    stored = z.t().clone()
    stored[0, 0] = 15  # → zero 16
    tensors = {"layer.qweight": _gptq_pack(q.t().contiguous()), "layer.qzeros": _col_pack(stored, list(range(8))),
               "layer.scales": s.t().contiguous().half(), "layer.g_idx": torch.arange(K, dtype=torch.int32) // G}
    out = tmp_path / "out"
    out.mkdir()
    info = import_prequantized(_write_source(tmp_path, tensors, {"quant_method": "gptq", "bits": 4,
                                                                 "group_size": G}), out)
    assert info["format"] == "shrinkserve" and not is_compressed_tensors_checkpoint(out)
    got = load_weight_only(out)[2]["layer"]
    assert float(got.zeros[0, 0]) == 16.0 and torch.equal(got.codes, q)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_awq_import_undoes_the_interleaved_order(tmp_path: Path) -> None:
    q, s, z = _codes(3)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    tensors = {
        "layer.qweight": _col_pack(q.t().contiguous(), order),
        "layer.qzeros": _col_pack(z.t().contiguous(), order),
        "layer.scales": s.t().contiguous().half(),
    }
    out = tmp_path / "out"
    out.mkdir()
    import_prequantized(_write_source(tmp_path, tensors,
                                      {"quant_method": "awq", "bits": 4, "group_size": G, "version": "gemm"}), out)
    got = load_weight_only(out)[2]["layer"]
    assert torch.equal(got.codes, q)
    assert torch.equal(got.zeros, z)


def test_importer_rejects_what_it_cannot_serve(tmp_path: Path) -> None:
    q, s, z = _codes(4)
    tensors = {"layer.qweight": _gptq_pack(q.t().contiguous()), "layer.qzeros": _col_pack(z.t(), list(range(8))),
               "layer.scales": s.t().contiguous().half(),
               "layer.g_idx": torch.randperm(K, generator=torch.Generator().manual_seed(0)).int() // G}
    src = _write_source(tmp_path, tensors, {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": True})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="act-order"):
        import_prequantized(src, out)
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 3,
                                                                         "group_size": 32}}))
    with pytest.raises(ValueError, match="4-bit"):
        import_prequantized(src, out)
