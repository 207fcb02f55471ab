"""The compression methods a profile can name, and what each needs and runs on."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Method:
    family: str  # "hf" | "gguf"
    variant: str | None  # gguf type, "file", or None
    engines: tuple[str, ...]

    @property
    def canonical(self) -> str:
        return self.family if self.variant is None else f"{self.family}:{self.variant}"

    @property
    def default_engine(self) -> str:
        return self.engines[0]

    @property
    def needs_path(self) -> bool:
        return self.variant == "file"


# Weight-only quantization of the HF checkpoint, served by the PyTorch engine through shrinkserve.kernels:
# int8 (per channel, round to nearest), rtn (4-bit round to nearest, per group), awq and gptq (4-bit), and
# prequantized (a user's GPTQ/AWQ checkpoint as the base, converted to our format).
TORCH_QUANT_METHODS = ("int8", "rtn", "awq", "gptq", "prequantized")


def parse_method(text: str) -> Method:
    """`hf`, `int8`, `rtn`, `awq`, `gptq`, `gguf:file` or `gguf:<type>` (case-insensitive) → Method."""
    family, _, variant = text.strip().lower().partition(":")
    if family in ("hf", *TORCH_QUANT_METHODS) and not variant:
        return Method(family, None, ("torch",))
    if family == "gguf" and (variant == "file" or variant in GGUF_TYPES):
        return Method("gguf", variant, ("llamacpp",))
    valid = ", ".join(["hf", *TORCH_QUANT_METHODS, "gguf:file"] + [f"gguf:{t}" for t in GGUF_TYPES])
    raise ValueError(f"unknown method {text!r}; valid: {valid}")
