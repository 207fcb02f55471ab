"""GGUF quantization through llama.cpp's own quantizer (`llama_model_quantize`)."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# llama.cpp's `llama_ftype` values (include/llama.h) for the types we offer. Kept here rather than read
# from llama_cpp so settings validate without loading the native library.
GGUF_TYPES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
    "iq4_nl": 25,
    "iq4_xs": 30,
    "iq3_s": 26,
    "iq3_xxs": 23,
    "q2_k_s": 21,
    "iq2_xs": 20,
    "iq2_xxs": 19,
    "iq1_s": 24,
    "bf16": 32,
}

# Types llama.cpp refuses to quantize to without an importance matrix (src/llama-quant.cpp
# tensor_requires_imatrix: IQ3_XXS, IQ2_XS/XXS, IQ1_S tensors, and Q2_K inside a Q2_K_S file).
NEEDS_IMATRIX = ("iq3_xxs", "q2_k_s", "iq2_xs", "iq2_xxs", "iq1_s")


def quiet_llama_cpp(level: int = logging.ERROR) -> None:
    """llama-cpp-python prints every native log line unless its logger's level says otherwise."""
    import llama_cpp  # noqa: F401  (importing installs its log callback)

    logging.getLogger("llama-cpp-python").setLevel(level)


def quantize_gguf(
    src: Path, dst: Path, quant_type: str, *, threads: int, imatrix: Mapping[str, np.ndarray] | None = None,
    metadata: Mapping[str, str | int] | None = None,
) -> None:
    """Write `src` re-quantized to `quant_type` (a key of GGUF_TYPES) at `dst`.

    `imatrix`: {GGUF tensor name: mean x² per input column} weighting each weight's rounding error
    (llama_model_quantize_params.imatrix; see compression/imatrix.py). `metadata`: string / integer keys
    written into the output GGUF (llama-quantize records `quantize.imatrix.*` this way)."""
    import llama_cpp

    quiet_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[quant_type]
    params.nthread = threads
    # Our sources may already be quantized (the embedded model is Q4_1); llama.cpp dequantizes them.
    params.allow_requantize = True
    keep: list[object] = []  # what the C arrays point into lives until llama_model_quantize returns
    if imatrix:
        params.imatrix = _imatrix_array(llama_cpp, imatrix, keep)
    if metadata:
        params.kv_overrides = _kv_overrides(llama_cpp, metadata, keep)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama_model_quantize({src.name} → {quant_type}) failed with code {rc}")


def _imatrix_array(llama_cpp: Any, imatrix: Mapping[str, np.ndarray], keep: list[object]) -> Any:
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: the last is the terminator
    for entry, (name, values) in zip(entries, sorted(imatrix.items()), strict=False):
        data = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        keep += [data, encoded]
        entry.name = encoded
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = data.size
    keep.append(entries)
    return ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


def _kv_overrides(llama_cpp: Any, metadata: Mapping[str, str | int], keep: list[object]) -> Any:
    overrides = (llama_cpp.llama_model_kv_override * (len(metadata) + 1))()  # an empty key ends the array
    for o, (key, value) in zip(overrides, metadata.items(), strict=False):
        o.key = key.encode()[:127]
        if isinstance(value, int):
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            o.value.val_i64 = value
        else:
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            o.value.val_str = str(value).encode()[:127]
    keep.append(overrides)
    return ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
