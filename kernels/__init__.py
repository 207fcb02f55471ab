"""Low-bit matmul kernels used by the PyTorch engine (AWQ/GPTQ/int8 profiles)."""

if __name__ != "shrinkserve.kernels":
    # Reached as a top-level `kernels` (the repository root on sys.path): Hugging Face's `kernels`
    # distribution owns that name (transformers imports it); see _toplevel.py.
    import runpy

    runpy.run_path(__file__.removesuffix("__init__.py") + "_toplevel.py")["hand_over"](__name__)
else:
    from .int4 import Int4Linear
    from .int8 import Int8Linear
    from .reference import (
        dequantize_int4,
        dequantize_int8,
        int4_linear_ref,
        int8_linear_ref,
        quantize_int4_rtn,
        quantize_int8_per_channel,
    )

    __all__ = [
        "Int4Linear",
        "Int8Linear",
        "dequantize_int4",
        "dequantize_int8",
        "int4_linear_ref",
        "int8_linear_ref",
        "quantize_int4_rtn",
        "quantize_int8_per_channel",
    ]
