"""Low-bit matmul kernels used by the PyTorch engine (AWQ/GPTQ/int8 profiles)."""
