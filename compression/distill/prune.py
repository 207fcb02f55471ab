"""Depth (and optionally MLP-width) pruning of a Llama-architecture teacher into a student initialisation.

Layers go by Block Influence (ShortGPT): BI_i = 1 − mean_t cos(h_in_t, h_out_t), the hidden state entering
decoder layer i against the one leaving it, over calibration tokens. A layer that barely turns the residual
stream is the cheapest to lose. The first and the last layer are always kept (they map embeddings in and
out, and removing them costs far more than their BI says). Measured on the default model ahead of this
work: the teacher minus its 10 lowest-BI layers starts at prose KL ≈ 2.0, so a pruned student is an
initialisation for distillation, never a profile on its own.

MLP narrowing keeps, in every layer, the intermediate channels with the largest importance
mean_t |act(gate(x))_j · up(x)_j| · ‖down[:, j]‖₂ (what channel j adds to the residual stream, on average).

The output is a standard transformers checkpoint (config + safetensors + tokenizer), so every engine and
exporter that reads the teacher reads the student.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("shrinkserve.distill.prune")

Progress = Callable[[int], None]


@dataclass
class PruneResult:
    """What the manifest records about a pruned student."""

    layers_before: int
    kept_layers: list[int]  # teacher layer indices, in order
    dropped_layers: list[int]
    block_influence: list[float]  # per teacher layer
    intermediate_before: int
    intermediate_after: int
    parameters_before: int
    parameters_after: int
    calibration_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _decoder_layers(model: Any) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: only Llama-architecture models are pruned")
    return layers


@torch.inference_mode()
def measure(
    model: Any, sequences: Iterable[Sequence[int]], *, with_mlp: bool = False, progress: Progress | None = None,
) -> tuple[np.ndarray, list[np.ndarray] | None, int]:
    """(BI per layer [L], MLP channel importance per layer or None, tokens seen).

    Each sequence is run on its own (no padding, so every position is a real token) through forward hooks on
    the decoder layers; float64 accumulation.
    """
    layers = _decoder_layers(model)
    n_layers = len(layers)
    cos_sum = np.zeros(n_layers, dtype=np.float64)
    act_sum: list[torch.Tensor | None] = [None] * n_layers
    seen = 0
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def pre_hook(i: int) -> Callable[..., None]:
        def hook(_mod: Any, args: tuple, kwargs: dict) -> None:
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post_hook(i: int) -> Callable[..., None]:
        def hook(_mod: Any, _args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            h_in, h_out = inputs.pop(i).double(), out.double()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)  # [1, T]
            cos_sum[i] += float(cos.sum())
        return hook

    def mlp_hook(i: int) -> Callable[..., None]:
        def hook(mod: Any, args: tuple, _output: Any) -> None:
            x = args[0]
            a = (mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x)).abs().double().sum(dim=(0, 1))
            act_sum[i] = a if act_sum[i] is None else act_sum[i] + a
        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook(i)))
            if with_mlp:
                handles.append(layer.mlp.register_forward_hook(mlp_hook(i)))
        device = next(model.parameters()).device
        for seq in sequences:
            ids = torch.tensor([list(seq)], dtype=torch.long, device=device)
            model.model(input_ids=ids, use_cache=False)
            seen += ids.shape[1]
            if progress is not None:
                progress(ids.shape[1])
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("pruning needs calibration tokens")
    bi = 1.0 - cos_sum / seen
    importance = None
    if with_mlp:
        importance = []
        for layer, s in zip(layers, act_sum, strict=True):
            assert s is not None
            down_norm = layer.mlp.down_proj.weight.detach().double().norm(dim=0)  # [intermediate]
            importance.append((s.cpu() / seen * down_norm.cpu()).numpy())
    return bi, importance, seen


def choose_dropped(bi: Sequence[float], n_drop: int) -> list[int]:
    """The `n_drop` layers of lowest BI, never the first or last; ties go to the later layer (stable order)."""
    n = len(bi)
    if not 0 <= n_drop <= n - 2:
        raise ValueError(f"can drop 0..{n - 2} of {n} layers (first and last are kept), asked {n_drop}")
    middle = sorted(range(1, n - 1), key=lambda i: (bi[i], -i))
    return sorted(middle[:n_drop])


def narrowed_size(intermediate: int, ratio: float, multiple: int) -> int:
    """round(ratio × intermediate) to the nearest multiple (≥ one multiple, ≤ intermediate).

    The default multiple is 256 because llama.cpp's K-quants (Q4_K_M, …) need rows that are a multiple of 256
    wide; down_proj's rows are `intermediate` wide, and a narrower odd size silently falls back to another type.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError("mlp_ratio must be in (0, 1]")
    if ratio == 1.0:
        return intermediate
    size = max(multiple, round(ratio * intermediate / multiple) * multiple)
    return min(size, intermediate)


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def build_student(
    teacher: Any, kept: Sequence[int], channels: Sequence[np.ndarray] | None,
) -> Any:
    """A fresh model of the teacher's class with only `kept` layers (renumbered 0..) and, when given, only
    the listed MLP channels per kept layer (indices into the teacher's intermediate dimension, same count)."""
    from transformers import AutoModelForCausalLM

    cfg = teacher.config.__class__.from_dict(teacher.config.to_dict())
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [teacher.config.layer_types[i] for i in kept]
    if channels is not None:
        cfg.intermediate_size = len(channels[0])
    student = AutoModelForCausalLM.from_config(cfg, dtype=next(teacher.parameters()).dtype)
    src = teacher.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in src.items():
        if not name.startswith("model.layers."):
            out[name] = tensor
            continue
        idx_s, rest = name[len("model.layers."):].split(".", 1)
        old = int(idx_s)
        if old not in kept:
            continue
        new = list(kept).index(old)
        if channels is not None and rest.startswith("mlp."):
            keep = torch.as_tensor(np.sort(channels[new]), dtype=torch.long)
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                tensor = tensor.index_select(0, keep)
            elif rest == "mlp.down_proj.weight":
                tensor = tensor.index_select(1, keep)
            elif rest.endswith(".bias") and not rest.startswith("mlp.down_proj"):
                tensor = tensor.index_select(0, keep)
        out[f"model.layers.{new}.{rest}"] = tensor.clone()
    missing, unexpected = student.load_state_dict(out, strict=False)
    # Tied output heads appear as "missing" lm_head.weight; anything else is a bug in the mapping.
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"pruned state dict does not fit: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        student.tie_weights()
    return student


def prune(
    teacher: Any,
    calibration: Iterable[Sequence[int]],
    *,
    drop_layers: int | None = None,
    n_layers: int | None = None,
    mlp_ratio: float = 1.0,
    mlp_multiple: int = 256,
    progress: Progress | None = None,
) -> tuple[Any, PruneResult]:
    """(student model, what was chosen and why). Exactly one of `drop_layers` / `n_layers`."""
    n = len(_decoder_layers(teacher))
    if (drop_layers is None) == (n_layers is None):
        raise ValueError("give exactly one of drop_layers and n_layers")
    n_drop = drop_layers if drop_layers is not None else n - int(n_layers)  # type: ignore[arg-type]
    narrow = mlp_ratio < 1.0
    bi, importance, seen = measure(teacher, calibration, with_mlp=narrow, progress=progress)
    if not np.all(np.isfinite(bi)):
        raise ValueError("block influence is not finite (calibration produced NaN/inf hidden states)")
    dropped = choose_dropped(bi.tolist(), n_drop)
    kept = [i for i in range(n) if i not in dropped]
    intermediate = int(teacher.config.intermediate_size)
    channels = None
    if narrow:
        assert importance is not None
        size = narrowed_size(intermediate, mlp_ratio, mlp_multiple)
        channels = [np.argsort(-importance[i], kind="stable")[:size] for i in kept]
    student = build_student(teacher, kept, channels)
    result = PruneResult(
        layers_before=n, kept_layers=kept, dropped_layers=dropped, block_influence=[float(x) for x in bi],
        intermediate_before=intermediate,
        intermediate_after=intermediate if channels is None else len(channels[0]),
        parameters_before=_params(teacher), parameters_after=_params(student), calibration_tokens=seen,
    )
    log.info("pruned %d → %d layers (dropped %s by BI), intermediate %d → %d, %.1fM → %.1fM parameters",
             n, len(kept), dropped, result.intermediate_before, result.intermediate_after,
             result.parameters_before / 1e6, result.parameters_after / 1e6)
    return student, result


def calibration_windows(examples: Iterable[Any], *, samples: int, seq_len: int) -> list[list[int]]:
    """Up to `samples` windows of at most `seq_len` tokens, one per example's whole sequence (prompt +
    response: BI should see the kind of text the student will serve), in order (deterministic)."""
    out = []
    for ex in examples:
        ids = [int(t) for t in ex.ids[:seq_len]]
        if len(ids) >= 2:
            out.append(ids)
        if len(out) >= samples:
            break
    return out


def text_windows(token_ids: Sequence[int], *, samples: int, seq_len: int) -> list[list[int]]:
    """Windows cut from a tokenized calibration text (compression/data/calibration.txt or the user's)."""
    n = max(1, min(samples, math.ceil(len(token_ids) / seq_len)))
    return [list(token_ids[i * seq_len:(i + 1) * seq_len]) for i in range(n) if len(token_ids[i * seq_len:]) >= 2]


def prune_checkpoint(
    src: Path, out: Path, calibration: Iterable[Sequence[int]], *, drop_layers: int | None = None,
    n_layers: int | None = None, mlp_ratio: float = 1.0, mlp_multiple: int = 256, threads: int | None = None,
    progress: Progress | None = None,
) -> PruneResult:
    """Load the teacher checkpoint `src`, prune it, write the student (weights, config, tokenizer) to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    teacher = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    student, result = prune(teacher, calibration, drop_layers=drop_layers, n_layers=n_layers, mlp_ratio=mlp_ratio,
                            mlp_multiple=mlp_multiple, progress=progress)
    student.generation_config = teacher.generation_config
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return result
