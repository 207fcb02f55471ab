"""Our weight-only `QuantizedLinear`s as a compressed-tensors `pack-quantized` checkpoint, and back.

The file layout is what llm-compressor's `save_compressed` writes, so vLLM serves it as is (on CPU and
GPU) and transformers/llm-compressor tooling recognises it; our CPU kernels read it back directly:

    config.json                   the base's config + `quantization_config` (quant_method compressed-tensors,
                                  format pack-quantized, config_groups, ignore) as ModelCompressor.update_config
                                  writes it
    model.safetensors             dense tensors (embeddings, norms, biases) and per quantized linear:
        <m>.weight_packed         int32 [N, ceil(K * bits / 32)]: signed codes + 2^(bits-1), 32/bits per word,
                                  element j of a word at bits [j*bits, (j+1)*bits)   (compressed_tensors.pack_to_int32)
        <m>.weight_scale          [N, K/G] (group) or [N, 1] (channel)
        <m>.weight_zero_point     int32 [ceil(N * bits / 32), K/G]: packed along the OUTPUT dim (packed_dim=0);
                                  asymmetric schemes only
        <m>.weight_shape          int64 [2] = (N, K)
    tokenizer files, generation_config.json, chat_template.jinja     copied from the base
    shrinkserve_compressed_tensors.json     our provenance (method, library, lm_head handling); not read by vLLM

Conventions. compressed-tensors dequantizes W = (q - zp) * s with signed q in [-2^(b-1), 2^(b-1) - 1];
ours is W = (c - z) * s with unsigned c in [0, 2^b - 1]. So q = c - 8 and zp = z - 8 for 4 bits: the
same (c - z). A symmetric 4-bit scheme (z = 8) has zp = 0 and stores no zero point. Our 8-bit format is
symmetric per channel (W = c * s), i.e. compressed-tensors' channel strategy with zp = 0.

The packing helpers are compressed-tensors' own (`pack_to_int32` / `unpack_from_int32`), not re-derived;
compressed-tensors 0.19 (ours) and 0.17 (vLLM 0.32's) pack 4- and 8-bit values identically (checked by
tests/test_compressed_tensors.py against vLLM's venv when it is present).

Never loaded through transformers' own compressed-tensors loader: it mis-shapes packed zero points.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from shrinkserve.compression.quant_format import QuantizedLinear

SIDE_CAR = "shrinkserve_compressed_tensors.json"
WEIGHTS_FILE = "model.safetensors"
_COPY = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")
_PARAMS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def is_compressed_tensors_checkpoint(path: Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors"


# ---------------------------------------------------------------------------------------------------
# Schemes
# ---------------------------------------------------------------------------------------------------


def _is_symmetric(ql: QuantizedLinear) -> bool:
    if ql.bits == 8:
        return True
    assert ql.zeros is not None
    return bool((ql.zeros == 8).all())


def _scheme_key(ql: QuantizedLinear, symmetric: bool) -> tuple[int, int | None, bool]:
    return (ql.bits, ql.group_size if ql.bits == 4 else None, symmetric)


def _weights_args(bits: int, group_size: int | None, symmetric: bool) -> dict[str, Any]:
    """QuantizationArgs as compressed-tensors dumps them (validated through its own model when importable)."""
    args: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": symmetric,
                            "strategy": "group" if group_size else "channel", "group_size": group_size,
                            "dynamic": False, "actorder": None, "observer": "minmax"}
    try:
        from compressed_tensors.quantization import QuantizationArgs
    except ImportError:  # pragma: no cover - the Makefile installs it
        return args
    return QuantizationArgs(**args).model_dump()


def quantization_config(groups: list[tuple[list[str], dict[str, Any]]], ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` block of config.json, as ModelCompressor.update_config writes it."""
    config_groups = {f"group_{i}": {"targets": targets, "weights": weights, "input_activations": None,
                                    "output_activations": None, "format": "pack-quantized"}
                     for i, (targets, weights) in enumerate(groups)}
    try:
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig

        qc = QuantizationConfig(config_groups=config_groups, ignore=ignore, format="pack-quantized",
                                quantization_status="compressed").model_dump(exclude=["quant_method"])
        version = compressed_tensors.__version__
    except ImportError:  # pragma: no cover
        qc = {"config_groups": config_groups, "ignore": ignore, "format": "pack-quantized",
              "quantization_status": "compressed", "kv_cache_scheme": None, "global_compression_ratio": None}
        version = "unknown"
    return {"version": version, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **qc}


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def pack_linear(ql: QuantizedLinear) -> dict[str, torch.Tensor]:
    """One QuantizedLinear → its compressed-tensors tensors (local names: weight_packed, weight_scale, ...)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    n, k = ql.codes.shape
    if ql.bits == 8:
        q = ql.codes.to(torch.int8)
        return {"weight_packed": pack_to_int32(q, 8), "weight_scale": ql.scales.reshape(n, 1).clone(),
                "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if ql.bits != 4 or ql.zeros is None or ql.group_size is None:
        raise ValueError(f"only 4-bit group and 8-bit channel linears have a pack-quantized form (bits={ql.bits})")
    if int(ql.codes.max()) > 15:
        raise ValueError("4-bit codes must lie in 0..15")
    out = {"weight_packed": pack_to_int32((ql.codes.to(torch.int16) - 8).to(torch.int8), 4),
           "weight_scale": ql.scales.clone(), "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not _is_symmetric(ql):
        z = ql.zeros.float()
        if not torch.equal(z, z.round()) or float(z.min()) < 0 or float(z.max()) > 15:
            # compressed-tensors stores integer zero points in the code range; a float-domain or out-of-range
            # zero (e.g. a GPTQ v1 zero of 16) has no exact pack-quantized form.
            raise ValueError("pack-quantized needs integer zero points in 0..15")
        out["weight_zero_point"] = pack_to_int32((z - 8).to(torch.int8), 4, packed_dim=0).contiguous()
    return out


def save_compressed_tensors(
    out: Path,
    source_dir: Path,
    dense: dict[str, torch.Tensor],
    quantized: dict[str, QuantizedLinear],
    meta: dict[str, Any],
    *,
    dense_dtype: torch.dtype | None = torch.bfloat16,
) -> None:
    """Write a compressed-tensors pack-quantized checkpoint into `out` (an existing, empty directory).

    `dense` holds every tensor that stays dense (state-dict names); `quantized` the linears by module name
    (e.g. "model.layers.0.self_attn.q_proj", "lm_head"). Linears sharing (bits, group, symmetry) form one
    config group; the largest group targets the class "Linear" (as llm-compressor writes it), the others
    their exact module names, which take precedence in both compressed-tensors' and vLLM's matching.
    `lm_head` when not quantized goes to `ignore`.
    """
    from safetensors.torch import save_file

    out = Path(out)
    source_dir = Path(source_dir)
    for name in _COPY:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out / name)

    by_scheme: dict[tuple[int, int | None, bool], list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, ql in quantized.items():
        by_scheme.setdefault(_scheme_key(ql, _is_symmetric(ql)), []).append(name)
        for param, t in pack_linear(ql).items():
            tensors[f"{name}.{param}"] = t.contiguous()
    for key, value in dense.items():
        if key in tensors:
            raise ValueError(f"dense tensor {key} collides with a quantized parameter")
        if dense_dtype is not None and value.is_floating_point():
            value = value.to(dense_dtype)
        tensors[key] = value.contiguous()

    ordered = sorted(by_scheme.items(), key=lambda kv: -len(kv[1]))
    groups = []
    for i, ((bits, group_size, symmetric), names) in enumerate(ordered):
        # vLLM builds the head as a ParallelLMHead, which the class target "Linear" does not match: a quantized
        # head is always named explicitly (else vLLM keeps it dense and rejects lm_head.weight_packed).
        targets = (["Linear", *(["lm_head"] if "lm_head" in names else [])]) if i == 0 else sorted(names)
        groups.append((targets, _weights_args(bits, group_size, symmetric)))
    ignore = [] if "lm_head" in quantized else ["lm_head"]
    # A linear left dense whose class would match "Linear" must be ignored too (besides lm_head).
    quantized_names = set(quantized)
    for key in dense:
        mod = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and _looks_linear(mod) and mod not in quantized_names and mod not in ignore:
            ignore.append(mod)

    config = json.loads((source_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(groups, ignore)
    if "lm_head" in quantized and config.get("tie_word_embeddings"):
        # A quantized head cannot stay tied to the dense embedding: vLLM 0.32 would tie only `.weight` and skip
        # every `lm_head.*` tensor of a tied model, leaving the packed head uninitialised. Untied, it loads the
        # head's own packed weights (and our loader does the same).
        config["tie_word_embeddings"] = False
    if dense_dtype is not None:
        # transformers 5 writes "dtype", 4.x "torch_dtype"; vLLM's --dtype auto reads either.
        config["torch_dtype"] = config["dtype"] = str(dense_dtype).removeprefix("torch.")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / SIDE_CAR).write_text(json.dumps({**meta, "format": "compressed-tensors/pack-quantized"}, indent=2))


_LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _looks_linear(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in _LINEAR_SUFFIXES


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def _target_matches(target: str, name: str) -> int:
    """Match priority as compressed-tensors/vLLM order it: exact name 3, regex 2, class name ("Linear") 1."""
    if target == name:
        return 3
    if target.startswith("re:") and re.match(target[3:], name):
        return 2
    if target == "Linear":
        return 1
    return 0


def _scheme_for(name: str, config_groups: dict[str, Any], ignore: list[str]) -> dict[str, Any]:
    if any(_target_matches(t, name) >= 2 for t in ignore):
        raise ValueError(f"{name} is listed in `ignore` but has packed weights")
    best, best_rank = None, 0
    for group in config_groups.values():
        for target in group.get("targets") or []:
            rank = _target_matches(target, name)
            if rank > best_rank:
                best, best_rank = group, rank
    if best is None:
        raise ValueError(f"no config group targets {name}")
    return best


def _check_weights(name: str, w: dict[str, Any], fmt: str | None) -> None:
    problems = []
    if fmt not in (None, "pack-quantized"):
        problems.append(f"format {fmt!r}")
    if w.get("type") != "int":
        problems.append(f"type {w.get('type')!r}")
    if w.get("num_bits") not in (4, 8):
        problems.append(f"num_bits {w.get('num_bits')}")
    if w.get("strategy") not in ("group", "channel"):
        problems.append(f"strategy {w.get('strategy')!r}")
    if w.get("num_bits") == 8 and not w.get("symmetric", True):
        problems.append("asymmetric 8-bit")
    if w.get("actorder") not in (None, "static", False):
        problems.append(f"actorder {w.get('actorder')!r}")
    if problems:
        raise ValueError(f"{name}: unsupported compressed-tensors scheme ({', '.join(problems)}); "
                         "shrinkserve reads pack-quantized int weights, 4-bit group or 8-bit channel")


def unpack_linear(params: dict[str, torch.Tensor], weights: dict[str, Any], name: str) -> QuantizedLinear:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits = int(weights["num_bits"])
    shape = torch.Size(int(x) for x in params["weight_shape"].tolist())
    n, k = shape
    q = unpack_from_int32(params["weight_packed"], bits, shape)
    scales = params["weight_scale"]
    if "weight_g_idx" in params:
        g = int(weights["group_size"])
        if (params["weight_g_idx"].long() != torch.arange(k) // g).any():
            raise ValueError(f"{name}: activation-ordered groups (g_idx) are not supported")
    if bits == 8:
        if scales.numel() != n:
            raise ValueError(f"{name}: 8-bit weights need one scale per output channel")
        return QuantizedLinear(8, q, scales.reshape(n))
    if weights["strategy"] == "channel":
        group_size, scales = k, scales.reshape(n, 1)
    else:
        group_size = int(weights["group_size"])
    if tuple(scales.shape) != (n, k // group_size):
        raise ValueError(f"{name}: weight_scale shape {tuple(scales.shape)} != {(n, k // group_size)}")
    codes = (q.to(torch.int16) + 8).to(torch.uint8)
    if weights.get("symmetric", False) or "weight_zero_point" not in params:
        zeros = torch.full(tuple(scales.shape), 8.0)
    else:
        zp = unpack_from_int32(params["weight_zero_point"], 4, torch.Size((n, scales.shape[1])), packed_dim=0)
        zeros = zp.float() + 8
    return QuantizedLinear(4, codes, scales, zeros, group_size)


def load_compressed_tensors(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, QuantizedLinear]]:
    """(meta, dense tensors, quantized linears by module name) of a pack-quantized checkpoint — ours or one
    llm-compressor saved. Raises ValueError naming what is unsupported (activation quantization, fp8, ...)."""
    from safetensors.torch import load_file

    path = Path(path)
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path}: no compressed-tensors quantization_config in config.json")
    groups = qc.get("config_groups") or {}
    for gname, group in groups.items():
        if group.get("input_activations") or group.get("output_activations"):
            raise ValueError(f"{path}: {gname} quantizes activations; only weight-only schemes are supported")
        _check_weights(f"{path}: {gname}", group.get("weights") or {}, group.get("format") or qc.get("format"))
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    for f in files:
        tensors.update(load_file(str(f)))

    per_module: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        mod, _, param = key.rpartition(".")
        if param in _PARAMS:
            per_module.setdefault(mod, {})[param] = value
        else:
            dense[key] = value
    quantized: dict[str, QuantizedLinear] = {}
    for mod, params in per_module.items():
        if "weight_packed" not in params or "weight_shape" not in params:
            raise ValueError(f"{path}: {mod} has {sorted(params)} but no weight_packed/weight_shape")
        group = _scheme_for(mod, groups, qc.get("ignore") or [])
        quantized[mod] = unpack_linear(params, group["weights"], mod)
    meta: dict[str, Any] = {}
    if (path / SIDE_CAR).is_file():
        meta = json.loads((path / SIDE_CAR).read_text())
    first = next(iter(quantized.values()), None)
    meta.setdefault("bits", first.bits if first else None)
    meta.setdefault("group_size", first.group_size if first else None)
    meta["compressed_tensors_version"] = qc.get("version")
    return meta, dense, quantized


def convert_quantized_checkpoint(src: Path, out: Path) -> dict[str, Any]:
    """Rewrite one of shrinkserve's own weight-only checkpoints (compression/quant_format.py) as compressed-tensors
    into `out` (existing, empty). Dense tensors keep the dtype they were stored in."""
    from shrinkserve.compression.quant_format import load_quantized_checkpoint

    meta, dense, quantized = load_quantized_checkpoint(Path(src))
    save_compressed_tensors(Path(out), Path(src), dense, quantized, meta, dense_dtype=None)
    cfg_path = Path(out) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    floats = {v.dtype for v in dense.values() if v.is_floating_point()}
    if len(floats) == 1:
        cfg["torch_dtype"] = cfg["dtype"] = str(floats.pop()).removeprefix("torch.")
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return meta


def load_weight_only(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, QuantizedLinear]]:
    """(meta, dense, quantized) of any weight-only artifact: compressed-tensors (what every handler writes since
    quant_format 2) or shrinkserve's older own format (artifacts built before, and the rare prequantized import
    that has no pack-quantized form)."""
    from shrinkserve.compression.quant_format import load_quantized_checkpoint

    return load_compressed_tensors(path) if is_compressed_tensors_checkpoint(path) else load_quantized_checkpoint(path)


def weight_bits(path: Path) -> set[int]:
    """Bit widths of a weight-only artifact's quantized linears, from its config alone (no tensors read)."""
    from shrinkserve.compression.quant_format import QUANT_CONFIG

    path = Path(path)
    if is_compressed_tensors_checkpoint(path):
        qc = json.loads((path / "config.json").read_text())["quantization_config"]
        return {int((g.get("weights") or {}).get("num_bits", 0)) for g in (qc.get("config_groups") or {}).values()}
    if (path / QUANT_CONFIG).is_file():
        return {int(m["bits"]) for m in json.loads((path / QUANT_CONFIG).read_text())["modules"].values()}
    return set()
