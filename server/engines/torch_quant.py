"""Loading weight-only quantized checkpoints — compressed-tensors pack-quantized or shrinkserve's older own
format — dense parts into the HF model, quantized linears swapped for the CPU kernels of shrinkserve.kernels,
or (`dequantize=True`: the CUDA path, where those kernels do not run) for dense `nn.Linear`s holding
W = (codes - zeros) * scales in the compute dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from shrinkserve.compression.compressed_tensors import load_weight_only
from shrinkserve.compression.quant_format import QuantizedLinear


def _kernel_module(ql: QuantizedLinear, bias: torch.Tensor | None) -> torch.nn.Module:
    from shrinkserve.kernels import Int4Linear, Int8Linear

    if ql.bits == 8:
        return Int8Linear.from_quantized(ql.codes, ql.scales, bias=bias)
    assert ql.zeros is not None and ql.group_size is not None
    return Int4Linear.from_quantized(ql.codes, ql.scales, ql.zeros, ql.group_size, bias=bias)


def _dense_module(ql: QuantizedLinear, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.nn.Module:
    """The linear with its weights dequantized (in float32, then cast once: no double rounding)."""
    n, k = ql.codes.shape
    linear = torch.nn.Linear(k, n, bias=bias is not None, dtype=dtype, device="meta")
    linear.weight = torch.nn.Parameter(ql.dequantize().to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False)
    return linear


def load_quantized_model(path: Path, dtype: torch.dtype, *, dequantize: bool = False) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    _, dense, quantized = load_weight_only(path)
    config = AutoConfig.from_pretrained(path)
    # Built from the config without its quantization_config: transformers would otherwise set up its own
    # compressed-tensors quantizer; our kernels replace the linears below.
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if "lm_head" in quantized:
        # The output projection gets its own quantized weights; the embedding stays dense.
        config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in dense.items()}
    result = model.load_state_dict(state, strict=False)
    expected_missing = {f"{name}.weight" for name in quantized}
    if unexpected := set(result.unexpected_keys):
        raise ValueError(f"{path}: tensors the model does not have: {sorted(unexpected)[:5]}")
    if missing := set(result.missing_keys) - expected_missing - ({"lm_head.weight"} if config.tie_word_embeddings
                                                                  else set()):
        raise ValueError(f"{path}: weights missing from the checkpoint: {sorted(missing)[:5]}")
    for name, ql in quantized.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = state.get(f"{name}.bias")
        setattr(parent, attr, _dense_module(ql, bias, dtype) if dequantize else _kernel_module(ql, bias))
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
