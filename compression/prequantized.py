"""Import a user's pre-quantized 4-bit checkpoint (AutoGPTQ/GPTQModel "gptq" or AutoAWQ "gemm" format)
as a compressed-tensors pack-quantized checkpoint, so it serves through the same CPU kernels and in vLLM.

One case has no pack-quantized form: a classic GPTQ v1 checkpoint whose stored zero of 15 reads back as 16
(the v1 "zero - 1" convention wrapping around). Such an import keeps shrinkserve's own weight-only format
(compression/quant_format.py), which the PyTorch engine still reads; vLLM cannot serve it.

Packed layouts (both int32 words of eight 4-bit values, scales [K/G, N] in fp16):
- GPTQ: qweight [K/8, N] packed along K (value j of word i is input k = 8i + j); qzeros [K/G, N/8] packed
  along N, stored as zero - 1 in the classic v1 format; g_idx [K] gives each input's group.
- AWQ (GEMM): qweight [K, N/8] and qzeros [K/G, N/8] packed along N in the interleaved order
  0, 2, 4, 6, 1, 3, 5, 7; zeros stored as is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from shrinkserve.compression.compressed_tensors import pack_linear, save_compressed_tensors
from shrinkserve.compression.quant_format import QuantizedLinear, save_quantized_checkpoint
from shrinkserve.compression.rtn import load_dense_state

log = logging.getLogger("shrinkserve.prequantized")

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] → [R * 8, C]: value j of word (r, c) lands at row 8r + j."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    vals = (words.to(torch.int32).unsqueeze(1) >> shifts[None, :, None]) & 0xF  # [R, 8, C]
    return vals.reshape(-1, words.shape[1])


def _unpack_cols(words: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 [R, C] → [R, C * 8]: value j of word (r, c) is column 8c + order[j]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    vals = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [R, C, 8] by storage slot
    out = torch.empty_like(vals)
    out[..., list(order)] = vals
    return out.reshape(words.shape[0], -1)


def quantization_config(model_dir: Path) -> dict[str, Any] | None:
    cfg = json.loads((model_dir / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if qc is None and (model_dir / "quantize_config.json").is_file():
        qc = json.loads((model_dir / "quantize_config.json").read_text())
        qc.setdefault("quant_method", "gptq")
    return qc


def _linear_from_gptq(prefix: str, t: dict[str, torch.Tensor], group_size: int, v1_zeros: bool) -> QuantizedLinear:
    q = _unpack_rows(t[f"{prefix}.qweight"])  # [K, N]
    k = q.shape[0]
    g_idx = t.get(f"{prefix}.g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // group_size):
        raise ValueError(f"{prefix}: act-order (desc_act) GPTQ checkpoints are not supported")
    zeros = _unpack_cols(t[f"{prefix}.qzeros"]).float() + (1 if v1_zeros else 0)  # [K/G, N]
    scales = t[f"{prefix}.scales"].float()  # [K/G, N]
    return QuantizedLinear(4, q.t().contiguous().to(torch.uint8), scales.t().contiguous(), zeros.t().contiguous(),
                           group_size)


def _linear_from_awq(prefix: str, t: dict[str, torch.Tensor], group_size: int) -> QuantizedLinear:
    q = _unpack_cols(t[f"{prefix}.qweight"], _AWQ_ORDER)  # [K, N]
    zeros = _unpack_cols(t[f"{prefix}.qzeros"], _AWQ_ORDER).float()  # [K/G, N]
    scales = t[f"{prefix}.scales"].float()
    return QuantizedLinear(4, q.t().contiguous().to(torch.uint8), scales.t().contiguous(), zeros.t().contiguous(),
                           group_size)


def import_prequantized(model_dir: Path, out: Path) -> dict[str, Any]:
    """Convert a GPTQ/AWQ 4-bit checkpoint at `model_dir` into a shrinkserve quantized checkpoint at `out`."""
    qc = quantization_config(model_dir)
    if not qc:
        raise ValueError(f"{model_dir} has no quantization_config: not a GPTQ/AWQ checkpoint")
    method = str(qc.get("quant_method", "")).lower()
    bits, group_size = int(qc.get("bits", qc.get("w_bit", 0))), int(qc.get("group_size", qc.get("q_group_size", 0)))
    if bits != 4 or group_size <= 0:
        raise ValueError(f"only 4-bit grouped checkpoints are supported, got bits={bits} group_size={group_size}")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"AWQ version {qc.get('version')!r} is not supported (only 'gemm')")
    if method not in ("gptq", "awq"):
        raise ValueError(f"quantization method {method!r} is not supported (gptq, awq)")
    state = load_dense_state(model_dir)
    prefixes = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    v1 = method == "gptq" and str(qc.get("checkpoint_format", "gptq")).lower() != "gptq_v2"
    quantized = {}
    for p in prefixes:
        quantized[p] = (_linear_from_gptq(p, state, group_size, v1) if method == "gptq"
                        else _linear_from_awq(p, state, group_size))
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            state.pop(f"{p}.{suffix}", None)
    dense = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items()}
    meta = {"method": f"import:{method}", "bits": 4, "group_size": group_size,
            "symmetric": bool(qc.get("sym", False)), "lm_head_bits": None}
    try:
        for ql in quantized.values():
            pack_linear(ql)  # raises where a zero point has no pack-quantized form
    except ValueError as exc:
        log.warning("%s: %s; imported in shrinkserve's own weight-only format (the PyTorch engine serves it, "
                    "vLLM cannot)", model_dir, exc)
        save_quantized_checkpoint(out, model_dir, dense, quantized, meta)
        # The copied config still describes the source's packed format; ours replaces it.
        cfg = json.loads((out / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        return {"quantized_modules": len(quantized), "source_format": method, "format": "shrinkserve"}
    save_compressed_tensors(out, model_dir, dense, quantized, meta)
    return {"quantized_modules": len(quantized), "source_format": method, "format": "compressed-tensors"}
