"""shrinkserve's weight-only quantized checkpoint: an HF checkpoint directory whose quantized linears
are stored as integer codes + scales (+ zero points) instead of dense weights.

    config.json, tokenizer files      copied from the dense base
    model.safetensors                 every tensor that stays dense (embeddings, norms, biases, …)
    quantized.safetensors             <module>.codes / .scales / .zeros per quantized linear
    shrinkserve_quant.json            method, bits, group size, which modules, lm_head handling

Dequantized weight: 4-bit W[n, k] = (codes[n, k] - zeros[n, k // G]) * scales[n, k // G];
8-bit W[n, k] = codes[n, k] * scales[n]. 4-bit codes are packed two per byte on disk.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

QUANT_CONFIG = "shrinkserve_quant.json"
DENSE_FILE = "model.safetensors"
QUANT_FILE = "quantized.safetensors"
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


@dataclass
class QuantizedLinear:
    bits: int  # 4 or 8
    codes: torch.Tensor  # uint8 [N, K] in 0..15 (4-bit) or int8 [N, K] (8-bit)
    scales: torch.Tensor  # [N, K // G] (4-bit) or [N] (8-bit)
    zeros: torch.Tensor | None = None  # [N, K // G] (4-bit only)
    group_size: int | None = None

    def dequantize(self) -> torch.Tensor:
        if self.bits == 8:
            return self.codes.float() * self.scales.float()[:, None]
        assert self.zeros is not None and self.group_size is not None
        g = self.group_size
        s = self.scales.float().repeat_interleave(g, dim=1)
        z = self.zeros.float().repeat_interleave(g, dim=1)
        return (self.codes.float() - z) * s


def is_quantized_checkpoint(path: Path) -> bool:
    return (path / QUANT_CONFIG).is_file()


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    if codes.shape[-1] % 2:
        raise ValueError("4-bit packing needs an even number of input features")
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def save_quantized_checkpoint(
    out: Path,
    source_dir: Path,
    dense: dict[str, torch.Tensor],
    quantized: dict[str, QuantizedLinear],
    meta: dict[str, Any],
) -> None:
    """Write the checkpoint into `out` (an existing, empty directory)."""
    from safetensors.torch import save_file

    for name in _COPY:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out / name)
    save_file({k: v.contiguous() for k, v in dense.items()}, str(out / DENSE_FILE))
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, ql in quantized.items():
        tensors[f"{name}.codes"] = _pack4(ql.codes) if ql.bits == 4 else ql.codes.to(torch.int8).contiguous()
        tensors[f"{name}.scales"] = ql.scales.to(torch.float32).contiguous()
        if ql.zeros is not None:
            tensors[f"{name}.zeros"] = ql.zeros.to(torch.float32).contiguous()
        modules[name] = {"bits": ql.bits, "group_size": ql.group_size, "shape": list(ql.codes.shape)}
    save_file(tensors, str(out / QUANT_FILE))
    (out / QUANT_CONFIG).write_text(json.dumps({**meta, "format": 1, "modules": modules}, indent=2))


def load_quantized_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, QuantizedLinear]]:
    """(meta, dense tensors, quantized linears by module name)."""
    from safetensors.torch import load_file

    meta = json.loads((path / QUANT_CONFIG).read_text())
    dense = load_file(str(path / DENSE_FILE))
    tensors = load_file(str(path / QUANT_FILE))
    quantized = {}
    for name, info in meta["modules"].items():
        codes = tensors[f"{name}.codes"]
        quantized[name] = QuantizedLinear(
            bits=info["bits"],
            codes=_unpack4(codes) if info["bits"] == 4 else codes,
            scales=tensors[f"{name}.scales"],
            zeros=tensors.get(f"{name}.zeros"),
            group_size=info["group_size"],
        )
    return meta, dense, quantized
