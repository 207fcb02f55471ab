"""Round-to-nearest weight-only quantization (int8 per channel, int4 per group) of a dense HF checkpoint.

RTN is the baseline AWQ/GPTQ must beat at the same group size, and int8 RTN is the nearly lossless
CPU profile. Unlike the library paths, it can also quantize the (tied) lm_head, ~21% of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shrinkserve.compression.compressed_tensors import save_compressed_tensors
from shrinkserve.compression.quant_format import QuantizedLinear


def load_dense_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def linear_layout(model_dir: Path) -> tuple[list[str], str]:
    """(names of every nn.Linear in the model, name of the input embedding module), without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is embedding)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)], emb_name


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedLinear:
    from shrinkserve.kernels.reference import quantize_int4_rtn, quantize_int8_per_channel

    if bits == 8:
        q, s = quantize_int8_per_channel(w.float())
        return QuantizedLinear(8, q, s)
    if bits == 4:
        q, s, z = quantize_int4_rtn(w.float(), group_size, symmetric)
        return QuantizedLinear(4, q, s, z, group_size)
    raise ValueError(f"unsupported bit width {bits}")


def quantize_rtn(
    model_dir: Path, out: Path, *, bits: int, group_size: int = 64, symmetric: bool = False,
    lm_head_bits: int | None = 8,
) -> dict[str, Any]:
    """Quantize every linear of the checkpoint in `model_dir` into a compressed-tensors pack-quantized checkpoint at
    `out` (compression/compressed_tensors.py: what vLLM serves and our engine reads).

    `lm_head_bits` None keeps the output projection dense (tied to the embedding, as the libraries do).
    """
    state = load_dense_state(model_dir)
    names, emb_name = linear_layout(model_dir)
    quantized: dict[str, QuantizedLinear] = {}
    for name in names:
        key = f"{name}.weight"
        if name == "lm_head":
            if lm_head_bits is None:
                continue
            # Tied checkpoints store only the embedding; the lm_head gets its own quantized copy.
            w = state.pop(key) if key in state else state[f"{emb_name}.weight"]
            quantized[name] = quantize_tensor(w, lm_head_bits, group_size, symmetric)
            continue
        if group_size and bits == 4 and state[key].shape[1] % group_size:
            raise ValueError(f"{name}: in_features {state[key].shape[1]} is not a multiple of group size {group_size}")
        quantized[name] = quantize_tensor(state.pop(key), bits, group_size, symmetric)
    # What stays dense is served in bf16 anyway; storing it so keeps "bytes on disk" honest.
    dense = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items()}
    meta = {"method": "int8" if bits == 8 else "rtn", "bits": bits, "group_size": group_size if bits == 4 else None,
            "symmetric": symmetric, "lm_head_bits": lm_head_bits}
    save_compressed_tensors(out, model_dir, dense, quantized, meta)
    return {"quantized_modules": len(quantized)}
