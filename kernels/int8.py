"""int8 weight-only linear on CPU via torch's ``_weight_int8pack_mm`` (per-output-channel scales).

Constraints of ``_weight_int8pack_mm(x [M, K], q int8 [N, K], scales [N])`` in torch 2.13, found by probing:

* x, scales and the output share one dtype (bf16, fp16 or fp32); q must be contiguous int8. Any N works.
* Only the bf16 path is vectorized (fp32 measured ~10x slower at batch 1).
* The AVX-512 bf16 path steps through K 16 at a time with no tail and uses *aligned* vector loads on x
  rows (32-byte) and q rows (16-byte). So K % 16 != 0 gives silently wrong results or a segfault, and so
  does a contiguous x whose data pointer is not 32-byte aligned (e.g. a view at an odd storage offset;
  offsets of 2 and 16 bytes segfaulted, 32 was fine). The int4 op uses unaligned loads and has neither issue.

Workarounds here: K is padded to a multiple of 16 with zero weight columns at pack time (x is then
zero-padded per call; zero columns add nothing, so results are exact), and an x whose data pointer is
misaligned is copied into a fresh (64-byte aligned) allocation before the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import COMPUTE_DTYPE, KernelBuffersMixin, flatten_activations, restore_shape

K_MULTIPLE = 16  # the bf16 kernel's K step
X_ALIGNMENT = 32  # bytes; _mm256_load_si256 on each activation row


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _validate(q: torch.Tensor, scales: torch.Tensor) -> None:
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"int8 codes must be an int8 [N, K] tensor, got {q.dtype} {tuple(q.shape)}")
    if tuple(scales.shape) != (q.shape[0],):
        raise ValueError(f"scales must have shape [N] = [{q.shape[0]}], got {tuple(scales.shape)}")
    if not (scales.is_floating_point() and torch.isfinite(scales).all()):
        raise ValueError("scales must be finite floats")


def prepare_activations(x2: torch.Tensor, padded_in_features: int) -> torch.Tensor:
    """Zero-pad K up to the packed width and guarantee the row alignment the kernel's aligned loads need."""
    k = x2.shape[1]
    if k != padded_in_features:
        return F.pad(x2, (0, padded_in_features - k))  # fresh allocation, hence aligned
    if x2.data_ptr() % X_ALIGNMENT:
        return x2.clone()
    return x2


class Int8Linear(KernelBuffersMixin, nn.Module):
    """Weight-only int8 linear: bf16 activations times per-channel int8 weights (W = q * s[:, None]).

    Activations of any float dtype and any leading shape are accepted; they are rounded to bf16 for the
    kernel and the output is returned in the activation dtype. Scales are stored in bf16 (the op requires
    the activation dtype). Bias, if any, is added in bf16 like ``F.linear`` on bf16 tensors.
    """

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.padded_in_features = _round_up(in_features, K_MULTIPLE)
        self.register_buffer("weight", torch.zeros(out_features, self.padded_in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, dtype=COMPUTE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=COMPUTE_DTYPE) if bias else None)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Store codes q int8 [N, K] and scales [N] (W = q * s[:, None]) in the kernel's layout, once."""
        _validate(q, scales)
        n, k = q.shape
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
        mod = cls(k, n, bias=bias is not None)
        # Copy into the module's own fresh buffer: rows must be 16-byte aligned for the kernel's loads.
        mod.weight[:, :k] = q.detach().cpu()
        mod.scales.copy_(scales.detach().cpu())
        if bias is not None:
            mod.bias = bias.detach().cpu().to(COMPUTE_DTYPE).clone()
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = prepare_activations(flatten_activations(x, self.in_features), self.padded_in_features)
        buffers = self._buffers  # direct dict lookups: nn.Module.__getattr__ costs ~1 us per buffer
        y = torch.ops.aten._weight_int8pack_mm(x2, buffers["weight"], buffers["scales"])
        bias = buffers["bias"]
        if bias is not None:
            y = y + bias
        return restore_shape(y, x)

    def weight_bytes(self) -> int:
        """Bytes the kernel reads per call for weights: int8 codes (K padding included) + scales."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
