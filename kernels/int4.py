"""int4 weight-only linear on CPU via torch's ``_weight_int4pack_mm_for_cpu`` (AVX-512/AVX2 "tinygemm").

Why this kernel: on this machine (AVX-512, no AMX, 2 cores) it beats bf16 ``F.linear`` at decode batch
sizes because it reads 4x fewer weight bytes and dequantizes in registers (see scripts/bench_kernels.py).

Constraints of the aten ops in torch 2.13 (found by probing; the module checks or works around each):

* ``_convert_weight_to_int4pack_for_cpu(q_int32 [N, K], innerKTiles)``: codes 0..15 as int32, N % 16 == 0,
  K even. Returns uint8 [N, K/2] in a layout that depends on the CPU ISA (AVX-512 and AVX2 builds tile
  differently), so the packed tensor must not be saved and loaded elsewhere; re-pack from (q, s, z).
  ``innerKTiles`` is ignored on CPU.
* ``_weight_int4pack_mm_for_cpu(x [M, K], packed, group_size, scales_and_zeros [K/G, N, 2])``: group_size in
  {32, 64, 128, 256}, K % group_size == 0, x 2-D contiguous; x and scales_and_zeros must have the same
  dtype (bf16, fp16 or fp32). It dequantizes as ``W = (q - 8) * s + zf`` with a float-domain zero ``zf``,
  so our integer-domain zero z maps to ``zf = (8 - z) * s``. Only the bf16 path is vectorized.

Fallbacks: N not a multiple of 16 is padded with all-zero rows at pack time and the extra outputs are
sliced off (the slice is a view). Group sizes outside {32, 64, 128, 256} or K % group_size != 0 raise
ValueError: no exact re-grouping exists for them.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import COMPUTE_DTYPE, KernelBuffersMixin, flatten_activations, restore_shape
from .reference import check_int4_args

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu rejects other N


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_int4_weight(q: torch.Tensor, n_padded: int) -> torch.Tensor:
    """uint8 codes [N, K] -> torch's CPU int4 layout [n_padded, K/2]; padding rows are code 0 (scale 0 -> output 0)."""
    n, k = q.shape
    codes = torch.zeros(n_padded, k, dtype=torch.int32)
    codes[:n] = q
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)


def pack_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, n_padded: int) -> torch.Tensor:
    """s, z [N, K/G] (integer-domain zero) -> [K/G, n_padded, 2] bf16 with (s, zf = (8 - z) * s) as the op expects."""
    n, groups = scales.shape
    s = scales.to(torch.float32)
    # Computed in float32 and rounded to bf16 once, so zf carries one rounding rather than two.
    zf = (8.0 - zeros.to(torch.float32)) * s
    out = torch.zeros(groups, n_padded, 2, dtype=torch.float32)
    out[:, :n, 0] = s.t()
    out[:, :n, 1] = zf.t()
    return out.to(COMPUTE_DTYPE).contiguous()


def _validate(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
    check_int4_args(q, scales, zeros, group_size)
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} unsupported by the int4 CPU op; use one of {SUPPORTED_GROUP_SIZES}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("int4 codes must lie in 0..15")
    if not (scales.is_floating_point() and torch.isfinite(scales).all()):
        raise ValueError("scales must be finite floats")
    if not torch.isfinite(zeros.to(torch.float32)).all():
        raise ValueError("zeros must be finite")


class Int4Linear(KernelBuffersMixin, nn.Module):
    """Weight-only int4 linear: bf16 activations times group-quantized 4-bit weights, dequantized in the kernel.

    Activations of any float dtype and any leading shape are accepted; they are rounded to bf16 for the
    kernel (the op's float32 path is unvectorized) and the output is returned in the activation dtype.
    Scales and float-domain zeros are stored in bf16, as the op requires them in the activation dtype.
    Bias, if any, is added in bf16 like ``F.linear`` on bf16 tensors.
    """

    weight_packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False) -> None:
        super().__init__()
        if group_size not in SUPPORTED_GROUP_SIZES or in_features % group_size:
            raise ValueError(
                f"need group_size in {SUPPORTED_GROUP_SIZES} dividing in_features; got {group_size} and {in_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.padded_out_features = _round_up(out_features, N_MULTIPLE)
        # Not persistent: the packed layout is ISA-specific, so state_dicts must carry (q, s, z), not this.
        packed = torch.zeros(self.padded_out_features, in_features // 2, dtype=torch.uint8)
        self.register_buffer("weight_packed", packed, persistent=False)
        self.register_buffer(
            "scales_and_zeros",
            torch.zeros(in_features // group_size, self.padded_out_features, 2, dtype=COMPUTE_DTYPE),
            persistent=False,
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=COMPUTE_DTYPE) if bias else None)

    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> Int4Linear:
        """Pack codes q [N, K] (0..15), scales/zeros [N, K // group_size] (W = (q - z) * s) once, here."""
        _validate(q, scales, zeros, group_size)
        n, k = q.shape
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
        mod = cls(k, n, group_size, bias=bias is not None)
        n_pad = mod.padded_out_features
        mod.weight_packed = pack_int4_weight(q.detach().cpu(), n_pad)
        mod.scales_and_zeros = pack_scales_and_zeros(scales.detach().cpu(), zeros.detach().cpu(), n_pad)
        if bias is not None:
            mod.bias = bias.detach().cpu().to(COMPUTE_DTYPE).clone()
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = flatten_activations(x, self.in_features)
        buffers = self._buffers  # direct dict lookups: nn.Module.__getattr__ costs ~1 us per buffer
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, buffers["weight_packed"], self.group_size, buffers["scales_and_zeros"]
        )
        if self.padded_out_features != self.out_features:
            y = y[:, : self.out_features]
        bias = buffers["bias"]
        if bias is not None:
            y = y + bias
        return restore_shape(y, x)

    def weight_bytes(self) -> int:
        """Bytes the kernel reads per call for weights: packed codes + scales/zeros (padding rows included)."""
        return sum(t.numel() * t.element_size() for t in (self.weight_packed, self.scales_and_zeros))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
