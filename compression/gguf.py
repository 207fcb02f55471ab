"""GGUF quantization through llama.cpp's own quantizer (`llama_model_quantize`)."""

from __future__ import annotations

import logging
from pathlib import Path

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
    "bf16": 32,
}


def quiet_llama_cpp(level: int = logging.ERROR) -> None:
    """llama-cpp-python prints every native log line unless its logger's level says otherwise."""
    import llama_cpp  # noqa: F401  (importing installs its log callback)

    logging.getLogger("llama-cpp-python").setLevel(level)


def quantize_gguf(src: Path, dst: Path, quant_type: str, *, threads: int) -> None:
    """Write `src` re-quantized to `quant_type` (a key of GGUF_TYPES) at `dst`."""
    import llama_cpp

    quiet_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[quant_type]
    params.nthread = threads
    # Our sources may already be quantized (the embedded model is Q4_1); llama.cpp dequantizes them.
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama_model_quantize({src.name} → {quant_type}) failed with code {rc}")
