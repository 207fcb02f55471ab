"""AWQ and GPTQ 4-bit through llm-compressor (the vLLM project's maintained quantization library).

Why llm-compressor: AutoAWQ is deprecated upstream and cannot run its output on CPU with torch 2.13;
gptqmodel asks for torch ≥ 2.14.1 and its AWQ took ~100 min here; llm-compressor runs both GPTQ and
AWQ on this CPU in minutes (see compression/awq_gptq_notes.md for the measurements). It pins an older
transformers, so `make setup` installs it with --no-deps; it works with transformers 5.23 for this use.

We run `oneshot` in memory and export the result ourselves as a compressed-tensors pack-quantized
checkpoint (compression/compressed_tensors.py; the layout the library's own `save_compressed` writes, plus
our optional quantized lm_head), with the library's own rounding, so the served weights equal the
library's fake-quantized ones exactly. AWQ also rescales RMSNorm weights, which is
why every non-quantized tensor is exported from the quantized model, not copied from the base.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from shrinkserve.compression.compressed_tensors import save_compressed_tensors
from shrinkserve.compression.quant_format import QuantizedLinear

log = logging.getLogger("shrinkserve.awq_gptq")


def _recipe(family: str, group_size: int, symmetric: bool) -> list[Any]:
    groups = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size}}}
    if family == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=128, dampening_frac=0.01)]
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    # AWQ pins its activation cache in page-locked memory, which CPU-only torch refuses.
    IntermediatesCache.pin_memory = lambda self, *a, **k: None  # type: ignore[method-assign]
    return [AWQModifier(duo_scaling=True), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]


@torch.no_grad()
def export_quantized(model: torch.nn.Module) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
    """(quantized linears, every other tensor) from a model quantized in memory by llm-compressor."""
    from compressed_tensors.quantization.lifecycle.forward import quantize

    quantized: dict[str, QuantizedLinear] = {}
    for name, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if not isinstance(mod, torch.nn.Linear) or scheme is None or scheme.weights is None:
            continue
        args = scheme.weights
        if args.num_bits != 4 or args.strategy != "group":
            raise ValueError(f"{name}: unexpected scheme {args}")
        g = args.group_size
        w, s = mod.weight.detach().float(), mod.weight_scale.detach().float()
        zp = getattr(mod, "weight_zero_point", None)
        g_idx = getattr(mod, "weight_g_idx", None)
        if g_idx is not None and (g_idx != torch.arange(w.shape[1]) // g).any():
            raise ValueError(f"{name}: non-contiguous groups are not supported")
        # The library stores signed codes -8..7 and zero points; +8 makes both unsigned with the same
        # (q - z) * s. Its own quantize() keeps its rounding at .5 ties (re-deriving flips some codes).
        codes = quantize(w, s, zp, args).float() + 8
        zeros = (torch.zeros_like(s) if zp is None else zp.float()) + 8
        quantized[name] = QuantizedLinear(4, codes.to(torch.uint8), s, zeros.round(), g)
    skip = {f"{n}.weight" for n in quantized}
    dense: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, value in model.state_dict().items():
        if key in skip or key.rsplit(".", 1)[-1] in ("weight_scale", "weight_zero_point", "weight_g_idx"):
            continue
        if key.startswith("lm_head.") and tied:
            continue
        dense[key] = value.detach().clone()
    return quantized, dense


def quantize_with_library(family: str, dense_dir: Path, out: Path, spec: Any) -> dict[str, Any]:
    """Build an AWQ or GPTQ artifact of the checkpoint at `dense_dir` into `out`."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shrinkserve.compression.calibration import calibration_samples
    from shrinkserve.compression.rtn import linear_layout, quantize_tensor

    if family not in ("awq", "gptq"):
        raise ValueError(f"unknown library method {family!r}")
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    cal = spec.calibration
    ids = calibration_samples(tokenizer, cal.file, cal.samples, cal.seq_len)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    log.info("%s: %d calibration samples x %d tokens, group %d", family, len(ids), cal.seq_len, spec.group_size)
    oneshot(model=model, dataset=dataset, recipe=_recipe(family, spec.group_size, spec.symmetric),
            num_calibration_samples=len(ids), max_seq_length=cal.seq_len, shuffle_calibration_samples=False,
            pipeline="sequential")
    quantized, dense = export_quantized(model)
    if spec.lm_head_bits is not None:
        # The libraries leave the tied output projection dense; quantize it in our own RTN path.
        _, emb_name = linear_layout(dense_dir)
        quantized["lm_head"] = quantize_tensor(dense[f"{emb_name}.weight"], spec.lm_head_bits, spec.group_size,
                                               spec.symmetric)
    dense = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in dense.items()}
    save_compressed_tensors(out, dense_dir, dense, quantized,
                            {"method": family, "bits": 4, "group_size": spec.group_size, "symmetric": spec.symmetric,
                             "lm_head_bits": spec.lm_head_bits, "library": "llmcompressor"})
    return {"quantized_modules": len(quantized), "calibration_samples": len(ids)}
